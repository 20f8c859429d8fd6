//! `im-client` as a script sees it: exit statuses and what it prints when
//! the server ends the session. Against a scripted fake server on a real
//! loopback socket, through the real binary.

use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use im_proto::Body;
use im_proto::pb;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// How the fake server treats the one client it serves.
#[derive(Clone, Copy)]
enum Script {
    /// Logs it in, then closes with this code and reason after 100 ms.
    CloseWith(u16, &'static str),
    /// Logs it in and answers its close.
    Polite,
    /// Refuses the login.
    Refuse,
}

async fn fake_server(script: Script) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let _login = ws.next().await;
        if let Script::Refuse = script {
            let e = im_proto::msg::error(pb::ErrorCode::Unauthorized, "login refused: no");
            let _ = ws.send(Message::Binary(im_proto::encode(e))).await;
            let _ = ws.close(None).await;
            return;
        }
        let ok = Body::LoginOk(pb::LoginOk {
            conn_id: 1,
            user_id: 1001,
            ..Default::default()
        });
        ws.send(Message::Binary(im_proto::encode(ok)))
            .await
            .unwrap();
        match script {
            Script::CloseWith(code, reason) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.into(),
                };
                let _ = ws.close(Some(frame)).await;
                while ws.next().await.is_some() {}
            }
            // tungstenite answers the client's close by itself.
            _ => while ws.next().await.is_some() {},
        }
    });
    url
}

/// Runs `im-client --user 1001` against `url` with stdin held open for
/// `stdin_open`; returns (exit code, stderr).
async fn run_client(url: &str, stdin_open: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_im-client"))
        .args(["--url", url, "--user", "1001", "--linger", "100ms"])
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run im-client");
    let stdin = child.stdin.take();
    tokio::time::sleep(stdin_open).await;
    drop(stdin);
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_normal_close_by_the_server_is_one_line_and_status_3() {
    for (code, reason) in [
        (1001, "idle timeout"),
        (1012, "node draining; reconnect"),
        (4001, "superseded by a newer connection"),
    ] {
        let url = fake_server(Script::CloseWith(code, reason)).await;
        let (status, stderr) = run_client(&url, Duration::from_secs(2)).await;
        assert_eq!(status, Some(3), "{code}: {stderr}");
        assert_eq!(
            stderr.trim(),
            format!("closed by the server: {code} {reason}"),
            "one line, no error, no backtrace"
        );
    }
}

#[tokio::test]
async fn stdin_ending_closes_cleanly_with_status_0() {
    let url = fake_server(Script::Polite).await;
    let (status, stderr) = run_client(&url, Duration::from_millis(100)).await;
    assert_eq!(status, Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

#[tokio::test]
async fn a_refused_login_is_an_error_with_status_1() {
    let url = fake_server(Script::Refuse).await;
    let (status, stderr) = run_client(&url, Duration::from_secs(2)).await;
    assert_eq!(status, Some(1), "{stderr}");
    assert!(stderr.contains("login refused"), "{stderr}");
}
