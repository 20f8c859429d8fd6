//! Shutdown the way deployments do it: the real `im-server` binary, the
//! real signal. SIGTERM (systemd, `docker stop`, Kubernetes) and SIGINT
//! (Ctrl-C) both drain: every connection is told 1012 (reconnect
//! elsewhere), every lease is released, and the process exits 0 within
//! its drain time.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use im_client::{Client, CloseCause, Event};
use im_server::Bug;
use redis::AsyncCommands;

use crate::hardened::{SECRET, now_s};
use crate::support::{redis, redis_conn};

/// A running `im-server` process, killed on drop.
struct Process {
    child: Child,
    url: String,
    prefix: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(test: &str, bugs: &[Bug]) -> Process {
    let port = im_server::testing::free_port();
    let prefix = format!("test:{test}:");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_im-server"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--redis", redis().url()])
        .args(["--auth-secret", std::str::from_utf8(SECRET).unwrap()])
        .args(["--key-prefix", &prefix])
        .args(["--drain-timeout", "2s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for bug in bugs {
        cmd.args(["--bug", bug.name()]);
    }
    let child = cmd.spawn().expect("start im-server");
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "im-server did not listen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Process {
        child,
        url: format!("ws://127.0.0.1:{port}/ws"),
        prefix,
    }
}

async fn connect(p: &Process, user: u64) -> Client {
    let mut o = im_client::Options::new(im_proto::UserId(user), &p.url);
    o.token = im_proto::token::mint(SECRET, im_proto::UserId(user), now_s() + 3600);
    o.device = "d1".into();
    Client::connect(o).await.expect("log in")
}

async fn leases(prefix: &str, user: u64) -> i64 {
    let mut con = redis_conn().await;
    con.zcard(format!("{prefix}im:{{u:{user}}}:conns"))
        .await
        .unwrap()
}

/// Sends `signal` to a server with two logged-in users; checks the drain.
async fn drain(test: &str, signal: &str, bugs: &[Bug]) -> Result<(), String> {
    let mut p = start(test, bugs).await;
    let mut a = connect(&p, 1001).await;
    let mut b = connect(&p, 1002).await;
    assert_eq!(leases(&p.prefix, 1001).await, 1, "a lease while online");
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &p.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let sent_at = Instant::now();
    let mut problems = Vec::new();
    for c in [&mut a, &mut b] {
        let cause = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match c.next_event().await {
                    Some(Event::Closed(cause)) => return cause,
                    None => return CloseCause::Lost("client gone".into()),
                    Some(_) => {}
                }
            }
        })
        .await
        .unwrap_or(CloseCause::Lost("no close within 5 s".into()));
        if !matches!(cause, CloseCause::ByServer { code: 1012, .. }) {
            problems.push(format!("{} closed with {cause:?}, not 1012", c.user()));
        }
    }
    let exit = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break Some(s);
        }
        if sent_at.elapsed() > Duration::from_secs(5) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    match exit {
        Some(s) if s.success() => {}
        Some(s) => problems.push(format!("exited with {s}")),
        None => problems.push("still running 5 s after the signal".into()),
    }
    for user in [1001, 1002] {
        let n = leases(&p.prefix, user).await;
        if n != 0 {
            problems.push(format!("{user} still holds {n} lease(s) after the drain"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[tokio::test]
async fn sigterm_drains_connections_and_releases_leases() {
    drain("sig_term", "TERM", &[])
        .await
        .expect("SIGTERM drains");
    let with_bug = drain("sig_term_bug", "TERM", &[Bug::SigtermKills]).await;
    assert!(
        with_bug.is_err(),
        "with sigterm_kills SIGTERM must not drain"
    );
}

#[tokio::test]
async fn sigint_drains_connections_and_releases_leases() {
    drain("sig_int", "INT", &[]).await.expect("SIGINT drains");
}
