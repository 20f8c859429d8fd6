//! Malformed input: each kind gets a clear answer (an Error envelope and/or
//! a close with the proper code), the server keeps serving, and a chat
//! between two other users is not disturbed.

use futures_util::{SinkExt, StreamExt};
use im_proto::pb::ErrorCode;
use im_proto::{Body, msg};
use im_server::Profile;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Node, PATIENCE, chat, send};

type Raw = WebSocketStream<TcpStream>;

async fn raw(node: &Node) -> Raw {
    let addr = node
        .url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .to_owned();
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_tungstenite::client_async(node.url.as_str(), tcp)
        .await
        .unwrap()
        .0
}

async fn logged_in(node: &Node, user: u64) -> Raw {
    let mut ws = raw(node).await;
    ws.send(Message::Binary(im_proto::encode(msg::login(user))))
        .await
        .unwrap();
    match read(&mut ws).await {
        Some(Message::Binary(b)) => assert!(matches!(im_proto::decode(&b), Ok(Body::LoginOk(_)))),
        other => panic!("expected LoginOk, got {other:?}"),
    }
    ws
}

async fn read(ws: &mut Raw) -> Option<Message> {
    tokio::time::timeout(PATIENCE, ws.next())
        .await
        .expect("the server answers within the patience window")
        .map(|r| r.expect("a readable frame"))
}

/// Reads until the close frame; returns (error codes seen, close code).
async fn until_close(ws: &mut Raw) -> (Vec<i32>, u16) {
    let mut errors = Vec::new();
    loop {
        match read(ws).await {
            Some(Message::Binary(b)) => {
                if let Ok(Body::Error(e)) = im_proto::decode(&b) {
                    errors.push(e.code);
                }
            }
            Some(Message::Close(Some(frame))) => return (errors, frame.code.into()),
            Some(Message::Close(None)) => return (errors, 1005),
            Some(_) => {}
            None => panic!("stream ended without a close frame"),
        }
    }
}

/// Runs `abuse` on its own connection while 1001 and 1002 keep chatting;
/// returns what the abusive connection saw.
async fn bystanders_unharmed(
    test: &str,
    abuse: impl AsyncFnOnce(&Node) -> (Vec<i32>, u16),
) -> (Vec<i32>, u16) {
    let node = Node::start(Profile::Phase3, test).await;
    let mut a = node.connect(1001).await;
    let mut b = node.connect(1002).await;
    chat(&mut a, &mut b, "before", 1).await;
    let seen = abuse(&node).await;
    chat(&mut a, &mut b, "after", 2).await;
    chat(&mut b, &mut a, "and back", 3).await;
    node.stop().await;
    seen
}

#[tokio::test]
async fn text_frame_is_closed_with_1003() {
    let (errors, code) = bystanders_unharmed("bad_text", async |node| {
        let mut ws = logged_in(node, 1003).await;
        ws.send(Message::text("hello?")).await.unwrap();
        until_close(&mut ws).await
    })
    .await;
    assert_eq!(code, 1003);
    assert_eq!(errors, [ErrorCode::Protocol as i32]);
}

#[tokio::test]
async fn undecodable_protobuf_is_closed_with_1007() {
    let (errors, code) = bystanders_unharmed("bad_proto", async |node| {
        let mut ws = logged_in(node, 1003).await;
        ws.send(Message::binary(vec![0xff, 0xff, 0xff, 0xff]))
            .await
            .unwrap();
        until_close(&mut ws).await
    })
    .await;
    assert_eq!(code, 1007);
    assert_eq!(errors, [ErrorCode::Protocol as i32]);
}

#[tokio::test]
async fn envelope_without_body_is_closed_with_1002() {
    let (errors, code) = bystanders_unharmed("bad_empty", async |node| {
        let mut ws = logged_in(node, 1003).await;
        ws.send(Message::binary(Vec::new())).await.unwrap();
        until_close(&mut ws).await
    })
    .await;
    assert_eq!(code, 1002);
    assert_eq!(errors, [ErrorCode::Protocol as i32]);
}

#[tokio::test]
async fn server_only_message_from_a_client_is_closed_with_1002() {
    let (errors, code) = bystanders_unharmed("bad_direction", async |node| {
        let mut ws = logged_in(node, 1003).await;
        let deliver = Body::Deliver(im_proto::pb::Deliver {
            from_user_id: 1001,
            text: "forged".into(),
            ..Default::default()
        });
        ws.send(Message::Binary(im_proto::encode(deliver)))
            .await
            .unwrap();
        until_close(&mut ws).await
    })
    .await;
    assert_eq!(code, 1002);
    assert_eq!(errors, [ErrorCode::Protocol as i32]);
}

#[tokio::test]
async fn oversized_frame_is_closed_with_1009() {
    let (_errors, code) = bystanders_unharmed("bad_size", async |node| {
        let mut ws = logged_in(node, 1003).await;
        let max = im_server::Limits::default().frame_bytes_max;
        let body = msg::send(1001, "x".repeat(max + 1), 1);
        // The server may hang up while we are still writing.
        let _ = ws.send(Message::Binary(im_proto::encode(body))).await;
        until_close(&mut ws).await
    })
    .await;
    assert_eq!(code, 1009);
}

#[tokio::test]
async fn message_before_login_gets_not_logged_in_and_1008() {
    let (errors, code) = bystanders_unharmed("bad_order", async |node| {
        let mut ws = raw(node).await;
        ws.send(Message::Binary(im_proto::encode(msg::send(1001, "hi", 1))))
            .await
            .unwrap();
        until_close(&mut ws).await
    })
    .await;
    assert_eq!(code, 1008);
    assert_eq!(errors, [ErrorCode::NotLoggedIn as i32]);
}

#[tokio::test]
async fn login_as_user_zero_is_refused_with_1008() {
    let (errors, code) = bystanders_unharmed("bad_user", async |node| {
        let mut ws = raw(node).await;
        ws.send(Message::Binary(im_proto::encode(msg::login(0))))
            .await
            .unwrap();
        until_close(&mut ws).await
    })
    .await;
    assert_eq!(code, 1008);
    assert_eq!(errors, [ErrorCode::Unauthorized as i32]);
}

#[tokio::test]
async fn second_login_on_one_connection_is_closed_with_1008() {
    let (errors, code) = bystanders_unharmed("bad_relogin", async |node| {
        let mut ws = logged_in(node, 1003).await;
        ws.send(Message::Binary(im_proto::encode(msg::login(1001))))
            .await
            .unwrap();
        until_close(&mut ws).await
    })
    .await;
    assert_eq!(code, 1008);
    assert_eq!(errors, [ErrorCode::Protocol as i32]);
}

#[tokio::test]
async fn unknown_recipient_is_rejected_and_the_connection_stays() {
    let node = Node::start(Profile::Phase3, "bad_recipient").await;
    let mut a = node.connect(1001).await;
    let mut b = node.connect(1002).await;
    let (accepted, reason) = send(&mut a, 0, "to nobody", 1).await;
    assert!(!accepted);
    assert!(reason.contains("unknown recipient"), "{reason}");
    chat(&mut a, &mut b, "still here", 2).await;
    node.stop().await;
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_with_1013() {
    let node = Node::start_with(Profile::Phase3, "limit", |c| c.limits.connections_max = 2).await;
    let mut a = node.connect(1001).await;
    let mut b = node.connect(1002).await;
    let mut third = raw(&node).await;
    let (_, code) = until_close(&mut third).await;
    assert_eq!(code, 1013);
    chat(&mut a, &mut b, "unharmed", 1).await;
    node.stop().await;
}

#[tokio::test]
async fn a_server_with_small_frame_limits_still_serves_connections() {
    // Frame limits below the write buffer once made every handshake panic.
    let node = Node::start_with(Profile::Phase3, "small_frames", |c| {
        c.limits.frame_bytes_max = 1024;
        c.limits.message_bytes_max = 1024;
    })
    .await;
    let mut a = node.connect(1001).await;
    let mut b = node.connect(1002).await;
    chat(&mut a, &mut b, "small frames", 1).await;
    node.stop().await;
}

#[tokio::test]
async fn handshake_on_another_path_is_refused_with_404() {
    let node = Node::start(Profile::Phase3, "bad_path").await;
    let addr = node
        .url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .to_owned();
    let tcp = TcpStream::connect(&addr).await.unwrap();
    let err = tokio_tungstenite::client_async(format!("ws://{addr}/chat"), tcp)
        .await
        .expect_err("only /ws is served");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 404),
        other => panic!("expected an HTTP 404, got {other}"),
    }
    node.stop().await;
}

#[tokio::test]
async fn silent_connection_is_closed_after_the_login_timeout() {
    let node = Node::start_with(Profile::Phase3, "login_timeout", |c| {
        c.limits.login_timeout = std::time::Duration::from_millis(200)
    })
    .await;
    let mut ws = raw(&node).await;
    let (errors, code) = until_close(&mut ws).await;
    assert_eq!(code, 1008);
    assert_eq!(errors, [ErrorCode::NotLoggedIn as i32]);
    node.stop().await;
}
