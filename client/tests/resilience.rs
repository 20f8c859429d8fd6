//! The client never waits for good: a clean close over a dead path ends
//! within its close timeout, an unanswered send goes again after the
//! answer timeout, and a flood of sends gets through to a caller that
//! reads events while it sends. Each against a scripted fake server on a
//! real loopback socket.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use im_client::resilient::{Resilience, Resilient, ResilientEvent, tcp_dial};
use im_client::{Client, CloseCause, Event, Options};
use im_proto::pb;
use im_proto::{Body, UserId, msg};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

type Ws = WebSocketStream<TcpStream>;

const PATIENCE: Duration = Duration::from_secs(5);

/// A fake server: accepts one connection after another and hands each,
/// logged in, to `script`. Returns its URL.
async fn fake_server<F, Fut>(script: F) -> String
where
    F: Fn(Ws) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let script = std::sync::Arc::new(script);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let script = script.clone();
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
                // The login, answered as a hardened server would.
                let _ = next_body(&mut ws).await;
                let ok = Body::LoginOk(pb::LoginOk {
                    conn_id: 1,
                    user_id: 1001,
                    heartbeat_interval_ms: 10_000,
                    heartbeat_timeout_ms: 25_000,
                    ..Default::default()
                });
                ws.send(Message::Binary(im_proto::encode(ok)))
                    .await
                    .unwrap();
                script(ws).await;
            });
        }
    });
    url
}

async fn next_body(ws: &mut Ws) -> Option<Body> {
    loop {
        match ws.next().await? {
            Ok(Message::Binary(b)) => return im_proto::decode(&b).ok(),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn a_clean_close_over_a_dead_path_ends_within_the_close_timeout() {
    // Logs in, then never reads again: the close frame is never answered.
    let url = fake_server(|ws| async move {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(ws);
    })
    .await;
    let mut o = Options::new(UserId(1001), &url);
    o.close_timeout = Duration::from_millis(300);
    let mut client = Client::connect(o).await.unwrap();
    client.close().await.unwrap();
    let ended = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(Event::Closed(cause)) = client.next_event().await {
                return cause;
            }
        }
    })
    .await
    .expect("the close must end within its timeout, not wait for a reply for good");
    assert_eq!(ended, CloseCause::ByUser);
}

#[tokio::test]
async fn an_unanswered_send_goes_again_with_the_same_id() {
    // Swallows the first Send; answers every later one.
    let url = fake_server(|mut ws| async move {
        let mut seen = 0;
        while let Some(body) = next_body(&mut ws).await {
            if let Body::Send(s) = body {
                seen += 1;
                if seen > 1 {
                    let answer =
                        Message::Binary(im_proto::encode(msg::accepted(s.client_msg_id, 7)));
                    ws.send(answer).await.unwrap();
                }
            }
        }
    })
    .await;
    let mut o = Options::new(UserId(1001), &url);
    o.token = "t".into();
    let r = Resilience {
        answer_timeout: Duration::from_millis(300),
        ..Resilience::default()
    };
    let mut client = Resilient::start(tcp_dial(&url).unwrap(), o, r);
    client.send(UserId(1002), "hello", 42).await.unwrap();
    let answers = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(ResilientEvent::Event(Event::SendResult {
                client_msg_id,
                accepted,
                ..
            })) = client.next_event().await
            {
                return (client_msg_id, accepted);
            }
        }
    })
    .await
    .expect("the send must be answered after a resend");
    assert_eq!(answers, (42, true));
}

#[tokio::test]
async fn a_flood_of_ten_thousand_sends_gets_through_to_a_caller_that_reads_events() {
    // Answers every Send at once, in order.
    let url = fake_server(|mut ws| async move {
        while let Some(body) = next_body(&mut ws).await {
            if let Body::Send(s) = body {
                let answer = Message::Binary(im_proto::encode(msg::accepted(s.client_msg_id, 1)));
                if ws.send(answer).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let mut o = Options::new(UserId(1001), &url);
    o.token = "t".into();
    let mut client = Resilient::start(tcp_dial(&url).unwrap(), o, Resilience::default());
    let sender = client.sender();
    const N: u64 = 10_000;
    let mut next_id = 1;
    let mut answered = 0;
    tokio::time::timeout(Duration::from_secs(60), async {
        while answered < N {
            tokio::select! {
                sent = sender.send(UserId(1002), "flood", next_id), if next_id <= N => {
                    sent.unwrap();
                    next_id += 1;
                }
                event = client.next_event() => match event {
                    Some(ResilientEvent::Event(Event::SendResult { accepted: true, .. })) => answered += 1,
                    Some(ResilientEvent::Event(Event::SendResult { reason, .. })) => panic!("refused: {reason}"),
                    None => panic!("client stopped"),
                    _ => {}
                },
            }
        }
    })
    .await
    .expect("10,000 sends answered");
}
