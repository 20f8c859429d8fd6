//! A throwaway `redis-server` for tests that need the real thing.
//!
//! Tests start their own server on a free loopback port (so they never touch
//! data on 127.0.0.1:6379), or use `REDIS_URL` when it is set. On CI
//! (`CI=true`) a missing `redis-server` is a failure, never a silent skip.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process on a free loopback port, killed on drop;
/// or, with `REDIS_URL` set, that server.
#[derive(Debug)]
pub struct RedisProcess {
    child: Option<Child>,
    url: String,
    port: u16,
}

impl RedisProcess {
    /// Starts `redis-server --port <free> --save "" --appendonly no`, or
    /// takes `REDIS_URL`. Panics (fails the test) when neither works: a
    /// test that needs Redis must not pass without it.
    pub fn start() -> RedisProcess {
        if let Ok(url) = std::env::var("REDIS_URL") {
            let port = url
                .rsplit(':')
                .next()
                .and_then(|p| p.trim_end_matches('/').parse().ok())
                .unwrap_or(6379);
            return RedisProcess {
                child: None,
                url,
                port,
            };
        }
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}); install it (apt-get install redis-server) or set REDIS_URL")
            });
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not listen on port {port} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisProcess {
            child: Some(child),
            url: format!("redis://127.0.0.1:{port}/"),
            port,
        }
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port that was free a moment ago (bind to 0, read it, release it).
pub fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral loopback port")
}
