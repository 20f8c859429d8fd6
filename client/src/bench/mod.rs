//! `im-client bench`: a load generator on real sockets.
//!
//! One [`run`] measures three things and compares each with a baseline, a
//! bare WebSocket [`relay::Relay`] the bench starts in its own process:
//!
//! 1. Throughput and latency ([`load`]): N pairs of distinct users, sender
//!    A_i → receiver B_i, logged in with the real [`crate::Client`]. Each
//!    sender keeps at most `window` messages in flight (sent, neither
//!    delivered nor refused) and sends as fast as that allows, or paced at
//!    `rate / N` messages per second. A message's text is its send time, so
//!    its receiver computes send→deliver latency into an HDR histogram.
//! 2. The same load against the relay: `ratio = msgs_per_s /
//!    baseline_msgs_per_s`.
//! 3. Idle memory ([`idle`]): K logged-in idle connections to the server
//!    under test, its RSS growth per connection (`/proc/PID/status`), and
//!    the relay's, measured as this process's growth; then the server's
//!    growth per connection again once each has sent one large frame.
//!
//! Users: the pairs are `user_base + 2i` → `user_base + 2i + 1`
//! (100001 → 100002, ...), idle connections `idle_user_base + i`. Message
//! ids start from the wall clock in nanoseconds, so a hardened server's
//! 24 h dedup never mistakes a new run's message for an old one (each
//! message leaves a dedup key in Redis for that long).

pub mod idle;
pub mod load;
pub mod relay;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use im_proto::UserId;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::{Client, ClientError, Event, Options};

pub use idle::IdleReport;
pub use load::{Latency, LoadReport};

/// The most idle connections one run opens to each side.
pub const IDLE_CONNS_MAX: usize = 20_000;
/// The most sender→receiver pairs one run drives.
pub const PAIRS_MAX: usize = 2_000;
/// The most messages one sender may have in flight; at most the client's
/// command queue, so a sender never blocks on a full queue while its
/// answers pile up unread.
pub const WINDOW_MAX: usize = 256;
/// The longest load phase.
pub const DURATION_MAX: Duration = Duration::from_secs(3600);

/// What to measure, and how.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// The server under test, `ws://host:port/ws`.
    pub url: String,
    /// Hardened servers: mint login tokens with this secret.
    pub auth_secret: Option<String>,
    /// Sender→receiver pairs.
    pub pairs: usize,
    /// How long senders send, per load phase.
    pub duration: Duration,
    /// Total messages per second over all senders; `None`: as fast as the
    /// window allows.
    pub rate: Option<f64>,
    /// Messages one sender may have in flight.
    pub window: usize,
    /// Idle connections for the memory measurement (0 skips it).
    pub idle_conns: usize,
    /// The server's process id, for its RSS; `None` skips the idle part.
    pub server_pid: Option<u32>,
    /// The first pair's sender.
    pub user_base: u64,
    /// The first idle connection's user.
    pub idle_user_base: u64,
    /// Hardened: the device id every bench connection logs in with.
    pub device: String,
    /// After the senders stop, how long to wait for messages in flight.
    pub drain_timeout: Duration,
    /// Before each memory reading, let the processes settle this long.
    pub idle_settle: Duration,
    /// RSS reads per memory reading (their median counts).
    pub rss_samples: usize,
    /// Time between RSS reads.
    pub rss_interval: Duration,
    /// Logins in progress at once.
    pub connect_concurrency: usize,
}

impl BenchOptions {
    /// Defaults for everything but the target.
    pub fn new(url: impl Into<String>) -> BenchOptions {
        BenchOptions {
            url: url.into(),
            auth_secret: None,
            pairs: 4,
            duration: Duration::from_secs(10),
            rate: None,
            window: 64,
            idle_conns: 5_000,
            server_pid: None,
            user_base: 100_001,
            idle_user_base: 200_001,
            device: "bench".to_owned(),
            drain_timeout: Duration::from_secs(5),
            idle_settle: Duration::from_secs(2),
            rss_samples: 5,
            rss_interval: Duration::from_millis(200),
            connect_concurrency: 64,
        }
    }

    /// Refuses settings outside the bench's bounds.
    pub fn validate(&self) -> anyhow::Result<()> {
        crate::host_port(&self.url)?;
        anyhow::ensure!(
            (1..=PAIRS_MAX).contains(&self.pairs),
            "--pairs must be 1..={PAIRS_MAX}"
        );
        anyhow::ensure!(
            !self.duration.is_zero() && self.duration <= DURATION_MAX,
            "--duration must be above 0 and at most {DURATION_MAX:?}"
        );
        anyhow::ensure!(
            (1..=WINDOW_MAX).contains(&self.window),
            "--window must be 1..={WINDOW_MAX}"
        );
        if let Some(rate) = self.rate {
            anyhow::ensure!(
                rate.is_finite() && rate > 0.0,
                "--rate must be a positive number"
            );
        }
        anyhow::ensure!(
            self.idle_conns <= IDLE_CONNS_MAX,
            "--idle-conns must be at most {IDLE_CONNS_MAX}"
        );
        anyhow::ensure!(
            self.connect_concurrency >= 1 && self.rss_samples >= 1,
            "connect_concurrency and rss_samples must be at least 1"
        );
        anyhow::ensure!(
            self.user_base > 0 && self.idle_user_base > 0,
            "user ids start at 1"
        );
        Ok(())
    }
}

/// Everything one run measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    /// The load on the server under test.
    pub target: LoadReport,
    /// The same load on the baseline relay.
    pub baseline: LoadReport,
    /// Idle connections' memory.
    pub idle: IdleReport,
    pub pairs: usize,
    pub duration: Duration,
    pub rate: Option<f64>,
    pub window: usize,
    /// The machine's 1-minute load average at the start and at the end
    /// (`/proc/loadavg`): above the core count, others were competing for
    /// the CPU and the figures are noisy.
    pub loadavg: (Option<f64>, Option<f64>),
}

impl BenchReport {
    /// CPU microseconds per delivered message: the server's (needs
    /// `--server-pid`), this process's in the server phase (the bench
    /// clients), and this process's in the relay phase (relay and clients
    /// together: the clients' share is not taken off, since it differs
    /// between the phases: a hardened client acks every delivery, and
    /// per-message costs fall as batches grow). Less sensitive to a busy
    /// machine than msgs/s.
    pub fn cpu_us_per_msg(&self) -> (Option<f64>, Option<f64>, Option<f64>) {
        let per_msg = |cpu: Option<Duration>, load: &LoadReport| {
            (load.delivered > 0).then_some(())?;
            Some(cpu?.as_secs_f64() * 1e6 / load.delivered as f64)
        };
        (
            per_msg(self.target.server_cpu, &self.target),
            per_msg(self.target.own_cpu, &self.target),
            per_msg(self.baseline.own_cpu, &self.baseline),
        )
    }

    /// `msgs_per_s / baseline_msgs_per_s`, when the baseline delivered any.
    pub fn ratio(&self) -> Option<f64> {
        (self.baseline.msgs_per_s > 0.0).then(|| self.target.msgs_per_s / self.baseline.msgs_per_s)
    }

    /// The machine-readable summary: one JSON object. `null` marks what was
    /// not measured.
    pub fn to_json(&self) -> serde_json::Value {
        let t = &self.target;
        let b = &self.baseline;
        let (server_cpu, client_cpu, relay_and_client_cpu) = self.cpu_us_per_msg();
        json!({
            "msgs_per_s": round(t.msgs_per_s, 1),
            "baseline_msgs_per_s": round(b.msgs_per_s, 1),
            "ratio": self.ratio().map(|r| round(r, 4)),
            "p50_ms": t.latency.p50_ms.map(|v| round(v, 3)),
            "p99_ms": t.latency.p99_ms.map(|v| round(v, 3)),
            "p999_ms": t.latency.p999_ms.map(|v| round(v, 3)),
            "max_ms": t.latency.max_ms.map(|v| round(v, 3)),
            "bytes_per_idle_conn": self.idle.bytes_per_idle_conn.map(|v| round(v, 0)),
            "bytes_per_idle_conn_after_large_frame": self.idle.bytes_per_idle_conn_after_large_frame.map(|v| round(v, 0)),
            "baseline_bytes_per_idle_conn": self.idle.baseline_bytes_per_idle_conn.map(|v| round(v, 0)),
            "client_bytes_per_idle_conn": self.idle.client_bytes_per_idle_conn.map(|v| round(v, 0)),
            "idle_conns": self.idle.server_opened,
            "baseline_idle_conns": self.idle.baseline_opened,
            "baseline_p50_ms": b.latency.p50_ms.map(|v| round(v, 3)),
            "baseline_p99_ms": b.latency.p99_ms.map(|v| round(v, 3)),
            "baseline_p999_ms": b.latency.p999_ms.map(|v| round(v, 3)),
            "pairs": self.pairs,
            "duration_s": self.duration.as_secs_f64(),
            "rate": self.rate,
            "window": self.window,
            "sent": t.sent,
            "delivered": t.delivered,
            "latency_samples": t.latency.count,
            "errors": t.errors(),
            "refused": t.refused,
            "lost": t.lost,
            "disconnects": t.disconnects,
            "server_errors": t.server_errors,
            "baseline_errors": b.errors(),
            "slowest": t.slowest.iter().map(|s| json!({
                "at_s": round(s.at.as_secs_f64(), 1),
                "max_ms": round(s.max_ms, 3),
            })).collect::<Vec<_>>(),
            "server_cpu_us_per_msg": server_cpu.map(|v| round(v, 1)),
            "client_cpu_us_per_msg": client_cpu.map(|v| round(v, 1)),
            "baseline_process_cpu_us_per_msg": relay_and_client_cpu.map(|v| round(v, 1)),
            "loadavg_start": self.loadavg.0,
            "loadavg_end": self.loadavg.1,
        })
    }
}

fn round(v: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (v * scale).round() / scale
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pace = match self.rate {
            Some(r) => format!("paced at {r} msgs/s in total"),
            None => "full speed".to_owned(),
        };
        writeln!(
            f,
            "bench: {} pairs, {:?} per phase, {pace}, window {} per sender",
            self.pairs, self.duration, self.window
        )?;
        writeln!(f, "server under test: {}", self.target)?;
        writeln!(f, "baseline relay:    {}", self.baseline)?;
        match self.ratio() {
            Some(r) => writeln!(f, "ratio (server / baseline msgs/s): {r:.3}")?,
            None => writeln!(f, "ratio: n/a (the baseline delivered nothing)")?,
        }
        let us = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1} µs"));
        let (server_cpu, client_cpu, relay_and_client_cpu) = self.cpu_us_per_msg();
        writeln!(
            f,
            "CPU per delivered message: server {} (bench clients {}); baseline relay and its clients {}",
            us(server_cpu),
            us(client_cpu),
            us(relay_and_client_cpu)
        )?;
        for note in self.target.notes.iter().chain(&self.baseline.notes) {
            writeln!(f, "  note: {note}")?;
        }
        if let (Some(start), Some(end)) = self.loadavg {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            writeln!(
                f,
                "load average {start:.2} at the start, {end:.2} at the end ({cores} cores){}",
                if start.max(end) > cores as f64 + 0.5 {
                    ": other work competed for the CPU, expect noise"
                } else {
                    ""
                }
            )?;
        }
        write!(f, "{}", self.idle)
    }
}

/// Runs the whole bench: idle memory first (on quiet processes), then the
/// load on the server under test, then the same load on the relay.
///
/// Raises this process's soft file-descriptor limit to its hard limit.
pub async fn run(opts: BenchOptions) -> anyhow::Result<BenchReport> {
    opts.validate()?;
    let load_at_start = loadavg();
    let nofile = raise_nofile_limit();
    // The pairs' connections, and the relay's side of them.
    let needed = 4 * opts.pairs as u64 + 64;
    anyhow::ensure!(
        nofile >= needed,
        "{} pairs need about {needed} file descriptors; the limit is {nofile}",
        opts.pairs
    );
    // Fail fast on a wrong URL or secret, before the idle part's waits.
    let probe = Login::new(&opts, &opts.url)
        .connect(UserId(opts.user_base))
        .await
        .with_context(|| format!("logging in to {}", opts.url))?;
    close(probe, CLOSE_TIMEOUT).await;
    let relay = relay::Relay::start()
        .await
        .context("starting the baseline relay")?;
    let idle = idle::measure(&opts, &relay.url(), nofile).await;
    tracing::info!(url = %opts.url, "load on the server under test");
    let target = load::run(&opts, &opts.url, opts.server_pid)
        .await
        .with_context(|| format!("load on {}", opts.url))?;
    tracing::info!(url = %relay.url(), "the same load on the baseline relay");
    let baseline = load::run(&opts, &relay.url(), None)
        .await
        .context("load on the baseline relay")?;
    relay.stop().await;
    Ok(BenchReport {
        target,
        baseline,
        idle,
        pairs: opts.pairs,
        duration: opts.duration,
        rate: opts.rate,
        window: opts.window,
        loadavg: (load_at_start, loadavg()),
    })
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft
/// limit in force.
fn raise_nofile_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "could not raise RLIMIT_NOFILE");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    }
}

/// The 1-minute load average, if this system tells.
fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// How the bench's connections log in.
#[derive(Clone, Debug)]
pub(crate) struct Login {
    url: String,
    secret: Option<String>,
    device: String,
}

impl Login {
    pub(crate) fn new(opts: &BenchOptions, url: &str) -> Login {
        Login {
            url: url.to_owned(),
            secret: opts.auth_secret.clone(),
            device: opts.device.clone(),
        }
    }

    fn options(&self, user: UserId, resume_after_seq: u64) -> Options {
        let mut options = Options::new(user, &self.url);
        if let Some(secret) = &self.secret {
            options.token = im_proto::token::mint(secret.as_bytes(), user, unix_s() + 3600);
            options.device = self.device.clone();
            options.resume_after_seq = resume_after_seq;
        }
        options
    }

    /// Logs in from the inbox's start (idle connections: their inboxes stay
    /// empty).
    pub(crate) async fn connect(&self, user: UserId) -> Result<Client, ClientError> {
        Client::connect(self.options(user, 0)).await
    }

    /// Logs in past whatever earlier runs left in a hardened inbox, so it is
    /// not replayed into this run: when the first login reports a non-empty
    /// inbox, it closes and logs in again resuming after its last message.
    pub(crate) async fn connect_fresh(&self, user: UserId) -> Result<Client, ClientError> {
        let client = self.connect(user).await?;
        let last = client.inbox_last_seq();
        if last == 0 {
            return Ok(client);
        }
        close(client, CLOSE_TIMEOUT).await;
        Client::connect(self.options(user, last)).await
    }
}

/// How long a clean close may take before the bench moves on.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

fn unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix time in nanoseconds: the start of a run's message ids.
pub(crate) fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2))
        .unwrap_or(0)
}

/// Closes cleanly, reading (and dropping) events until the close is done;
/// gives up after `timeout`. Returns whether the close completed.
pub(crate) async fn close(mut client: Client, timeout: Duration) -> bool {
    if client.close().await.is_err() {
        // The connection task is gone already.
        return true;
    }
    tokio::time::timeout(timeout, async {
        while let Some(event) = client.next_event().await {
            if matches!(event, Event::Closed(_)) {
                break;
            }
        }
    })
    .await
    .is_ok()
}

/// Closes every client, all at once; returns how many did not finish
/// their close within [`CLOSE_TIMEOUT`].
pub(crate) async fn close_all(clients: Vec<Client>) -> usize {
    let mut closing = JoinSet::new();
    for client in clients {
        closing.spawn(close(client, CLOSE_TIMEOUT));
    }
    let mut stuck = 0;
    while let Some(done) = closing.join_next().await {
        if !matches!(done, Ok(true)) {
            stuck += 1;
        }
    }
    stuck
}

/// Logs every user in, at most `concurrency` at a time; results in the
/// order of `users`.
pub(crate) async fn connect_many(
    login: &Login,
    users: Vec<UserId>,
    concurrency: usize,
    fresh: bool,
) -> Vec<Result<Client, ClientError>> {
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut logins = JoinSet::new();
    let count = users.len();
    for (i, user) in users.into_iter().enumerate() {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let login = login.clone();
        logins.spawn(async move {
            let result = if fresh {
                login.connect_fresh(user).await
            } else {
                login.connect(user).await
            };
            drop(slot);
            (i, result)
        });
    }
    let mut results: Vec<Option<Result<Client, ClientError>>> = (0..count).map(|_| None).collect();
    while let Some(done) = logins.join_next().await {
        match done {
            Ok((i, result)) => results[i] = Some(result),
            Err(e) => tracing::error!(error = %e, "a login task failed"),
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or(Err(ClientError::Closed)))
        .collect()
}

/// A bounded list of error descriptions: the first few, and a count.
#[derive(Debug, Default)]
pub(crate) struct Notes {
    inner: Mutex<(Vec<String>, u64)>,
}

impl Notes {
    const KEPT: usize = 8;

    pub(crate) fn add(&self, note: String) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.1 += 1;
        if inner.0.len() < Self::KEPT {
            inner.0.push(note);
        }
    }

    /// The kept notes, plus one line for those left out.
    pub(crate) fn take(&self) -> Vec<String> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (mut kept, total) = (std::mem::take(&mut inner.0), inner.1);
        if total > kept.len() as u64 {
            kept.push(format!("... and {} more", total - kept.len() as u64));
        }
        kept
    }
}

/// Resolves once the watched flag is true (or its sender is gone).
pub(crate) async fn stopped(flag: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await.
    let _ = flag.wait_for(|stopped| *stopped).await.map(|_| ());
}

/// Whether `url` names this machine (127.0.0.0/8, ::1 or localhost).
pub fn is_loopback(url: &str) -> bool {
    let Ok(uri) = url.parse::<tokio_tungstenite::tungstenite::http::Uri>() else {
        return false;
    };
    let Some(host) = uri.host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_are_recognised() {
        assert!(is_loopback("ws://127.0.0.1:8080/ws"));
        assert!(is_loopback("ws://127.3.2.1:8080/ws"));
        assert!(is_loopback("ws://localhost:8080/ws"));
        assert!(is_loopback("ws://[::1]:8080/ws"));
        assert!(!is_loopback("ws://10.0.0.1:8080/ws"));
        assert!(!is_loopback("ws://example.com/ws"));
        assert!(!is_loopback("not a url"));
    }

    #[test]
    fn options_are_bounded() {
        let ok = BenchOptions::new("ws://127.0.0.1:1/ws");
        assert!(ok.validate().is_ok());
        for bad in [
            BenchOptions {
                pairs: 0,
                ..ok.clone()
            },
            BenchOptions {
                window: WINDOW_MAX + 1,
                ..ok.clone()
            },
            BenchOptions {
                idle_conns: IDLE_CONNS_MAX + 1,
                ..ok.clone()
            },
            BenchOptions {
                rate: Some(0.0),
                ..ok.clone()
            },
            BenchOptions {
                duration: Duration::ZERO,
                ..ok.clone()
            },
            BenchOptions {
                url: "http://127.0.0.1/ws".into(),
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn notes_keep_the_first_few() {
        let notes = Notes::default();
        for i in 0..20 {
            notes.add(format!("n{i}"));
        }
        let kept = notes.take();
        assert_eq!(kept.len(), Notes::KEPT + 1);
        assert_eq!(kept[0], "n0");
        assert_eq!(kept.last().unwrap(), "... and 12 more");
    }
}
