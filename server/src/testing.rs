//! A throwaway `redis-server` for tests that need the real thing.
//!
//! Tests start their own server on a free loopback port (so they never touch
//! data on 127.0.0.1:6379), or use `REDIS_URL` when it is set. On CI
//! (`CI=true`) a missing `redis-server` is a failure, never a silent skip.
//!
//! Invariant: a server started here never outlives the process that started
//! it, however that process ends: a normal exit that skips destructors (a
//! `static` is never dropped), a panic, Ctrl-C, or SIGKILL. `Drop` cannot
//! promise that, and the workspace forbids the `unsafe` that
//! `prctl(PR_SET_PDEATHSIG)` would need, so the tie is a pipe: the server is
//! started by a small `sh` script ([`WRAPPER`]) that leaves a watcher
//! reading the pipe from the test process. The kernel closes the test's end
//! whenever the test process dies, and at end of file the watcher kills the
//! server's process group.
//!
//! Every server started here carries [`MARKER`] in its command line
//! (`pgrep -af imsim-test-redis`), followed by `run=$IMSIM_TEST_RUN` and
//! `owner=<pid of the test process>`, so a check (`.ci/run`) can find
//! leftovers of its own run and tell them from a system `redis-server` or
//! another run's. This needs Redis 7.0 or later (`proc-title-template`).

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// In the command line of every process started here, to find leftovers.
pub const MARKER: &str = "imsim-test-redis";

/// Names the run in the marker (`run=<tag>`), so a check can find its own
/// run's leftovers on a machine where others run tests too.
pub const RUN_ENV: &str = "IMSIM_TEST_RUN";

/// Run as `sh -c WRAPPER imsim-test-redis <redis-server arguments>` with
/// stdin a pipe from the test process, in a new process group whose id is
/// the shell's pid. The shell keeps the pipe on fd 3, forks a watcher that
/// blocks on it, and replaces itself with redis-server, so the server is
/// the test's own child (its pid is the group id) and holds no copy of the
/// pipe. At end of file, however the test process ended, the watcher kills
/// the group: the server and itself. The watcher's membership keeps the
/// group id from being reused while it waits, so that kill never reaches
/// another process, even when the server has died and been reaped before.
pub const WRAPPER: &str = r#"exec 3<&0 </dev/null
( cat <&3 >/dev/null; kill -KILL -$$ ) &
exec redis-server "$@" 3<&- >/dev/null"#;

/// A `redis-server` child process on a free loopback port, killed on drop
/// and when the test process dies; or, with `REDIS_URL` set, that server.
#[derive(Debug)]
pub struct RedisProcess {
    child: Option<Child>,
    url: String,
    port: u16,
}

impl RedisProcess {
    /// Starts `redis-server --port <free> --save "" --appendonly no` through
    /// [`WRAPPER`], or takes `REDIS_URL`. Panics (fails the test) when
    /// neither works: a test that needs Redis must not pass without it.
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
        let run: String = std::env::var(RUN_ENV)
            .unwrap_or_else(|_| "-".to_owned())
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
            .collect();
        let title = format!(
            "{{title}} {{listen-addr}} {MARKER} run={run} owner={}",
            std::process::id()
        );
        let mut child = Command::new("sh")
            .args(["-c", WRAPPER, MARKER])
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--proc-title-template", &title])
            // The pipe's only writer is this process: its death is the
            // watcher's end of file.
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Out of the terminal's foreground group: Ctrl-C reaches the
            // test process only, and the pipe alone ends the server.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start sh for redis-server ({e})"));
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "redis-server exited ({status}) before listening on port {port}; \
                     its error is above. Install Redis 7.0 or later \
                     (apt-get install redis-server) or set REDIS_URL"
                );
            }
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

    /// The server's process id, when this started it (not for `REDIS_URL`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for RedisProcess {
    /// Kills the server and waits for it, so it is gone when drop returns.
    /// The server is not reaped before both kills, so neither can reach a
    /// process that reused its pid.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.stdin.take());
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    /// Set only for the helper process that `dies_with_the_test_process`
    /// starts; the helper test does nothing without it.
    const HOLD_ENV: &str = "IMSIM_TEST_HOLD_REDIS";

    /// A process's state letter from `/proc/<pid>/stat`, or `None` when the
    /// process is gone. A zombie (`Z`) is dead, just not yet reaped.
    fn state(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (in parentheses) may hold spaces: skip past it.
        stat.rsplit_once(')')?.1.trim_start().chars().next()
    }

    fn alive(pid: u32) -> bool {
        state(pid).is_some_and(|s| s != 'Z' && s != 'X')
    }

    /// Reads the `held redis: pid=<n> port=<n>` that
    /// `hold_a_redis_until_killed` prints. With `--nocapture` it follows
    /// libtest's `test <name> ... ` on the same line.
    fn parse_held(line: &str) -> Option<(u32, u16)> {
        let (_, rest) = line.split_once("held redis: ")?;
        let mut pid = None;
        let mut port = None;
        for field in rest.split_whitespace() {
            match field.split_once('=') {
                Some(("pid", v)) => pid = v.parse().ok(),
                Some(("port", v)) => port = v.parse().ok(),
                _ => {}
            }
        }
        Some((pid?, port?))
    }

    /// Waits for the first `held redis:` line of `reader`; `None` at end of file.
    fn read_held(reader: impl BufRead) -> Option<(u32, u16)> {
        reader
            .lines()
            .map_while(Result::ok)
            .find_map(|line| parse_held(&line))
    }

    /// The helper: starts a server, tells its parent where, and waits to be
    /// killed. Ignored, so a plain run skips it.
    #[test]
    #[ignore = "a helper for dies_with_the_test_process"]
    fn hold_a_redis_until_killed() {
        if std::env::var_os(HOLD_ENV).is_none() {
            return;
        }
        let redis = RedisProcess::start();
        println!(
            "held redis: pid={} port={}",
            redis.pid().expect("a server of our own"),
            redis.port()
        );
        // The parent kills this process long before; the deadline only
        // keeps a broken parent from leaving it behind.
        std::thread::sleep(Duration::from_secs(60));
    }

    /// The issue: a server in a `static` was never dropped and outlived the
    /// test binary. SIGKILL, which runs no destructor at all, is the worst
    /// case: the server must still be gone within seconds.
    #[test]
    fn dies_with_the_test_process() {
        let mut helper = Command::new(std::env::current_exe().unwrap())
            .args(["testing::tests::hold_a_redis_until_killed", "--exact"])
            .args(["--ignored", "--nocapture", "--test-threads=1"])
            .env(HOLD_ENV, "1")
            .env_remove("REDIS_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("re-run this test binary");
        let stdout = BufReader::new(helper.stdout.take().unwrap());
        let Some((pid, port)) = read_held(stdout) else {
            let _ = helper.kill();
            panic!("the helper exited ({:?}) without a server", helper.wait());
        };
        assert!(alive(pid), "the helper's redis-server {pid} is running");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(
            String::from_utf8_lossy(&cmdline).contains(MARKER),
            "the server is recognisable by {MARKER:?}: {:?}",
            String::from_utf8_lossy(&cmdline)
        );

        helper.kill().unwrap(); // SIGKILL
        helper.wait().unwrap();

        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) {
            assert!(
                Instant::now() < deadline,
                "redis-server {pid} (port {port}) outlived its test process by 5 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Not checked: that the port is closed. Another test may start its
        // server on that port the moment it is free.
    }

    /// `Drop` (the non-static uses) ends the server before it returns.
    #[test]
    fn drop_kills_the_server() {
        if std::env::var_os("REDIS_URL").is_some() {
            return; // not ours to kill
        }
        let redis = RedisProcess::start();
        let pid = redis.pid().unwrap();
        assert!(alive(pid));
        drop(redis);
        assert!(!alive(pid), "redis-server {pid} is gone after drop");
    }

    #[test]
    fn parses_the_helpers_line() {
        let out = "running 1 test\ntest t ... held redis: pid=42 port=6380\n";
        assert_eq!(read_held(out.as_bytes()), Some((42, 6380)));
        assert_eq!(read_held("running 1 test\n".as_bytes()), None);
    }
}
