//! The post-mortem's success criteria, live, against phase 3; and phase 1's
//! root cause (online_users never cleaned), asserted as its known bug.

use im_server::Profile;

use crate::support::{Node, chat, close, send};

#[tokio::test]
async fn phase3_two_way_chat_works() {
    let node = Node::start(Profile::Phase3, "p3_two_way").await;
    let mut a = node.connect(1001).await;
    let mut b = node.connect(1002).await;
    chat(&mut a, &mut b, "hello 1002", 1).await;
    chat(&mut b, &mut a, "hello 1001", 1).await;
    node.stop().await;
}

#[tokio::test]
async fn phase3_many_messages_in_a_row_all_arrive_in_order() {
    let node = Node::start(Profile::Phase3, "p3_many").await;
    let mut a = node.connect(1001).await;
    let mut b = node.connect(1002).await;
    for i in 1..=200 {
        chat(&mut a, &mut b, &format!("message {i}"), i).await;
    }
    node.stop().await;
}

#[tokio::test]
async fn phase3_several_users_online_at_once_can_all_talk() {
    let node = Node::start(Profile::Phase3, "p3_several").await;
    let mut clients = Vec::new();
    for user in 1001..=1005 {
        clients.push(node.connect(user).await);
    }
    let mut id = 0;
    for i in 0..clients.len() {
        for j in 0..clients.len() {
            if i != j {
                id += 1;
                let (a, b) = two(&mut clients, i, j);
                chat(a, b, &format!("{i}->{j}"), id).await;
            }
        }
    }
    for user in 1001..=1005 {
        assert!(node.online(user).await);
    }
    node.stop().await;
}

#[tokio::test]
async fn phase3_after_a_reconnect_first_and_later_messages_work_both_ways() {
    let node = Node::start(Profile::Phase3, "p3_reconnect").await;
    let mut a = node.connect(1001).await;
    let mut b = node.connect(1002).await;
    chat(&mut a, &mut b, "before", 1).await;
    close(a).await;
    node.wait_connections(1).await;
    let mut a = node.connect(1001).await;
    for i in 2..=6 {
        chat(&mut b, &mut a, &format!("to 1001 #{i}"), i).await;
        chat(&mut a, &mut b, &format!("to 1002 #{i}"), i).await;
    }
    // Both reconnect.
    close(a).await;
    close(b).await;
    node.wait_connections(0).await;
    let mut a = node.connect(1001).await;
    let mut b = node.connect(1002).await;
    chat(&mut a, &mut b, "after both reconnected", 10).await;
    chat(&mut b, &mut a, "and back", 10).await;
    node.stop().await;
}

#[tokio::test]
async fn phase3_online_users_follows_disconnects() {
    let node = Node::start(Profile::Phase3, "p3_presence").await;
    let a = node.connect(1001).await;
    let mut b = node.connect(1002).await;
    assert!(node.online(1001).await && node.online(1002).await);
    close(a).await;
    node.wait_connections(1).await;
    assert!(
        !node.online(1001).await,
        "1001 left but is still in online_users"
    );
    assert!(node.online(1002).await);
    // And the sender hears the truth.
    let (accepted, reason) = send(&mut b, 1001, "are you there?", 1).await;
    assert!(!accepted);
    assert!(reason.contains("offline"), "{reason}");
    node.stop().await;
}

#[tokio::test]
async fn phase1_known_bug_user_stays_in_online_users_after_disconnect() {
    let node = Node::start(Profile::Phase1, "p1_presence").await;
    let a = node.connect(1001).await;
    let mut b = node.connect(1002).await;
    close(a).await;
    node.wait_connections(1).await;
    assert!(node.server.registry().get(im_proto::UserId(1001)).is_none());
    assert!(
        node.online(1001).await,
        "phase 1 must keep 1001 in online_users after it left (the seed's root cause)"
    );
    // ...so the sender is told "sent" for a message nobody receives.
    let (accepted, _) = send(&mut b, 1001, "into the void", 1).await;
    assert!(
        accepted,
        "phase 1 reports a message to a departed user as sent"
    );
    node.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_closes_clients_with_going_away_and_cleans_presence() {
    let node = Node::start(Profile::Phase3, "shutdown").await;
    let mut a = node.connect(1001).await;
    let prefix = node.key_prefix.clone();
    node.stop().await;
    loop {
        if let im_client::Event::Closed(cause) = crate::support::next(&mut a).await {
            assert_eq!(
                cause,
                im_client::CloseCause::ByServer {
                    code: 1001,
                    reason: "server shutting down".into()
                }
            );
            break;
        }
    }
    let mut con = crate::support::redis_conn().await;
    let online: bool = redis::cmd("SISMEMBER")
        .arg(format!("{prefix}online_users"))
        .arg(1001)
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(!online, "phase 3 cleanup runs on shutdown");
}

fn two<T>(v: &mut [T], i: usize, j: usize) -> (&mut T, &mut T) {
    assert_ne!(i, j);
    if i < j {
        let (l, r) = v.split_at_mut(j);
        (&mut l[i], &mut r[0])
    } else {
        let (l, r) = v.split_at_mut(i);
        (&mut r[0], &mut l[j])
    }
}

#[tokio::test]
async fn metrics_endpoint_counts_connections_pushes_and_presence_writes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], im_server::testing::free_port()));
    im_server::metrics::install_prometheus(addr).unwrap();
    let node = Node::start(Profile::Phase3, "metrics").await;
    let mut a = node.connect(1001).await;
    let mut b = node.connect(1002).await;
    chat(&mut a, &mut b, "counted", 1).await;
    // The exporter renders on request; ask it like Prometheus would.
    let deadline = tokio::time::Instant::now() + crate::support::PATIENCE;
    let body = loop {
        let mut body = String::new();
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            s.read_to_string(&mut body).await.unwrap();
        }
        if body.contains("im_pushes_total{result=\"delivered\"}") {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no push counted in:\n{body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    for name in [
        "im_connections_live",
        "im_presence_writes_total{op=\"sadd\",outcome=\"ok\"}",
        "process_resident_memory_bytes",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    node.stop().await;
}
