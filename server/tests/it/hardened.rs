//! The hardened profile, live: signed tokens decide who you are; hostile
//! input gets a clear error and changes nothing.

use futures_util::{SinkExt, StreamExt};
use im_client::{Client, ClientError, Event, Options};
use im_proto::pb::{self, ErrorCode};
use im_proto::{Body, UserId};
use im_server::Profile;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Node, PATIENCE, chat, delivery, next, send};

pub const SECRET: &[u8] = b"live-test-secret";

pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub async fn node(test: &str) -> Node {
    Node::start_with(Profile::Hardened, test, |c| {
        c.auth_secret = Some(SECRET.to_vec())
    })
    .await
}

pub fn options(node: &Node, user: u64, secret: &[u8], device: &str) -> Options {
    let mut o = Options::new(UserId(user), &node.url);
    o.token = im_proto::token::mint(secret, UserId(user), now_s() + 3600);
    o.device = device.into();
    o
}

pub async fn login(node: &Node, user: u64) -> Client {
    Client::connect(options(node, user, SECRET, "d1"))
        .await
        .expect("login with a valid token")
}

#[tokio::test]
async fn hardened_users_with_valid_tokens_chat_both_ways() {
    let node = node("h_chat").await;
    let mut a = login(&node, 1001).await;
    let mut b = login(&node, 1002).await;
    for i in 1..=20 {
        chat(&mut a, &mut b, &format!("to b {i}"), i).await;
        chat(&mut b, &mut a, &format!("to a {i}"), i).await;
    }
    node.stop().await;
}

#[tokio::test]
async fn a_token_signed_with_the_wrong_secret_gets_nothing_through() {
    let node = node("h_wrong_secret").await;
    let err = Client::connect(options(&node, 1001, b"not the secret", "d1"))
        .await
        .err()
        .expect("a forged token must not log in");
    match err {
        ClientError::LoginRefused(why) => assert!(why.contains("bad token signature"), "{why}"),
        other => panic!("expected a refused login, got {other}"),
    }
    node.stop().await;
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let node = node("h_expired").await;
    let mut o = options(&node, 1001, SECRET, "d1");
    o.token = im_proto::token::mint(SECRET, UserId(1001), now_s() - 1);
    match Client::connect(o).await {
        Err(ClientError::LoginRefused(why)) => assert!(why.contains("expired"), "{why}"),
        Err(other) => panic!("expected a refused login, got {other}"),
        Ok(_) => panic!("an expired token logged in"),
    }
    node.stop().await;
}

#[tokio::test]
async fn the_claimed_user_id_is_ignored_in_favour_of_the_token() {
    let node = node("h_claim").await;
    let mut victim = login(&node, 1002).await;
    // The token says 1001; the login message claims 1002.
    let mut o = options(&node, 1001, SECRET, "d1");
    o.user = UserId(1002);
    let mut mallory = Client::connect(o).await.unwrap();
    assert_eq!(
        mallory.user(),
        UserId(1001),
        "the server binds the token's user"
    );
    let (accepted, _) = send(&mut mallory, 1002, "who am I", 1).await;
    assert!(accepted);
    let (from, _) = delivery(&mut victim).await;
    assert_eq!(
        from, 1001,
        "the message carries the token's user, not the claim"
    );
    node.stop().await;
}

#[tokio::test]
async fn messages_to_an_offline_user_wait_in_its_inbox() {
    let node = node("h_offline").await;
    // 1002 is a user (it logged in once), now away.
    crate::support::close(login(&node, 1002).await).await;
    let mut a = login(&node, 1001).await;
    let (accepted, _) = send(&mut a, 1002, "while you were out", 1).await;
    assert!(accepted, "hardened stores for offline recipients");
    let mut b = login(&node, 1002).await;
    assert_eq!(delivery(&mut b).await, (1001, "while you were out".into()));
    node.stop().await;
}

#[tokio::test]
async fn a_newer_connection_of_the_same_device_supersedes_the_older_with_4001() {
    let node = node("h_supersede").await;
    let mut old = login(&node, 1001).await;
    let _new = login(&node, 1001).await;
    loop {
        if let Event::Closed(cause) = next(&mut old).await {
            assert!(
                matches!(cause, im_client::CloseCause::ByServer { code: 4001, .. }),
                "{cause:?}"
            );
            break;
        }
    }
    node.stop().await;
}

#[tokio::test]
async fn an_ack_for_a_sequence_never_sent_gets_bad_sequence_and_changes_nothing() {
    let node = node("h_bad_ack").await;
    let _recipient = login(&node, 1002).await;
    let mut ws = raw_login(&node, 1001, 0).await;
    send_body(&mut ws, Body::Ack(pb::Ack { seq: u64::MAX / 2 })).await;
    let error = first_error(&mut ws).await;
    assert_eq!(error.code, ErrorCode::BadSequence as i32);
    // Still logged in and useful: a send is answered.
    send_body(&mut ws, im_proto::msg::send(1002, "still here", 1)).await;
    loop {
        match tokio::time::timeout(PATIENCE, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => {
                if let Ok(Body::SendResult(r)) = im_proto::decode(&b) {
                    assert_eq!(r.status, pb::SendStatus::Accepted as i32);
                    break;
                }
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("expected a send result, got {other:?}"),
        }
    }
    node.stop().await;
}

#[tokio::test]
async fn a_resume_point_from_the_future_is_refused_with_1008() {
    let node = node("h_future").await;
    let mut ws = raw_login(&node, 1001, u64::MAX / 2).await;
    let mut code = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(PATIENCE, ws.next()).await {
        if let Message::Close(Some(f)) = m {
            code = Some(u16::from(f.code));
            break;
        }
    }
    assert_eq!(code, Some(1008));
    node.stop().await;
}

pub async fn raw_login(node: &Node, user: u64, resume: u64) -> WebSocketStream<TcpStream> {
    let addr = node
        .url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .to_owned();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(node.url.as_str(), tcp)
        .await
        .unwrap();
    let login = Body::Login(pb::Login {
        user_id: user,
        token: im_proto::token::mint(SECRET, UserId(user), now_s() + 60),
        device_id: "raw".into(),
        resume_after_seq: resume,
        ..Default::default()
    });
    send_body(&mut ws, login).await;
    ws
}

pub async fn send_body(ws: &mut WebSocketStream<TcpStream>, body: Body) {
    ws.send(Message::Binary(im_proto::encode(body)))
        .await
        .unwrap();
}

pub async fn first_error(ws: &mut WebSocketStream<TcpStream>) -> pb::Error {
    loop {
        match tokio::time::timeout(PATIENCE, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => {
                if let Ok(Body::Error(e)) = im_proto::decode(&b) {
                    return e;
                }
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("expected an Error envelope, got {other:?}"),
        }
    }
}

/// A client that logs in and then says nothing (no heartbeats) is closed
/// with 4003 one heartbeat timeout after it was last heard, even though
/// the server's own heartbeat ticks several times meanwhile. (A tick used
/// to restart the read timeout, so a silent peer was never closed: found
/// by the simulation and by the byte fuzzer.)
#[tokio::test]
async fn a_silent_client_is_closed_with_4003_although_the_server_keeps_beating() {
    let node = Node::start_with(Profile::Hardened, "h_silent", |c| {
        c.auth_secret = Some(SECRET.to_vec());
        c.hardened.heartbeat_interval = std::time::Duration::from_millis(100);
        c.hardened.heartbeat_timeout = std::time::Duration::from_millis(350);
    })
    .await;
    let mut ws = raw_login(&node, 1001, 0).await;
    let (mut beats, mut code) = (0, None);
    // The server beats every 100 ms, so the whole wait needs a deadline.
    let _ = tokio::time::timeout(PATIENCE, async {
        while let Some(Ok(m)) = ws.next().await {
            match m {
                Message::Binary(b) => {
                    if let Ok(Body::Heartbeat(hb)) = im_proto::decode(&b)
                        && !hb.reply
                    {
                        beats += 1;
                    }
                }
                Message::Close(f) => {
                    code = f.map(|f| u16::from(f.code));
                    break;
                }
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(
        code,
        Some(im_proto::close_code::HEARTBEAT_TIMEOUT),
        "not closed within {PATIENCE:?} ({beats} heartbeats seen)"
    );
    assert!(
        beats >= 2,
        "the server beat {beats} times before the timeout; the test needs ticks inside it"
    );
    node.stop().await;
}
