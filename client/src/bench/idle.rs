//! Idle memory: what one logged-in, silent connection costs.
//!
//! The server runs in another process, so its cost is its RSS growth
//! (`VmRSS` in `/proc/PID/status`) while K idle connections are open. The
//! relay runs in this process next to the clients, so its cost is this
//! process's growth minus the clients' own share, which the first step
//! measured (this process's growth while only the connections to the
//! server were open):
//!
//! 1. settle; read the server's RSS and ours (medians of a few reads);
//! 2. open K connections to the server; settle; read both again;
//! 3. keeping those open (so freed memory cannot be reused and hide a
//!    cost), open K connections to the relay; settle; read ours again;
//! 4. each connection to the server sends one large frame (a
//!    [`LARGE_TEXT_BYTES`] text to user 0: the server reads it whole and
//!    refuses it), one connection at a time, so a frame is freed before the
//!    next arrives and only what it leaves behind adds up; settle; read the
//!    server's RSS again: the cost of an idle connection after a large
//!    frame, which a read buffer kept at its largest frame's size would
//!    raise by about that size (tungstenite did, before the patch in
//!    `server/vendor/`);
//! 5. close everything.
//!
//! Only loopback targets (this is a lot of connections), at most
//! [`super::IDLE_CONNS_MAX`], and never more than the file-descriptor
//! limit allows: this process holds 3 descriptors per K (two client
//! sockets and the relay's side), so K shrinks to fit, and says so.

use std::fmt;
use std::time::Duration;

use im_proto::UserId;

use super::{BenchOptions, Login};
use crate::{Client, Event};

/// Descriptors kept free for everything else (the load phase, logs).
const FD_RESERVE: u64 = 256;

/// The text of the large frame each idle connection sends in step 4: a
/// frame of about 60 KiB, below the server's 64 KiB frame limit. (Each
/// bench client then keeps a write buffer of that size: tungstenite's
/// write buffer keeps its largest frame's size. That is this process's
/// memory, not the server's, and is read before step 4.)
pub const LARGE_TEXT_BYTES: usize = 60 * 1024;

/// How long the server may take to answer one large frame.
const LARGE_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the idle measurement found; every figure is `None` when the part
/// was skipped or could not be measured.
#[derive(Clone, Debug, Default)]
pub struct IdleReport {
    /// Why the measurement did not run.
    pub skipped: Option<String>,
    /// Idle connections asked for (per side).
    pub requested: usize,
    /// Idle connections tried (per side), after the descriptor limit.
    pub attempted: usize,
    /// This process's soft `RLIMIT_NOFILE` after raising it.
    pub nofile_limit: Option<u64>,
    /// Connections logged in to the server under test.
    pub server_opened: usize,
    /// Connections logged in to the relay.
    pub baseline_opened: usize,
    /// Logins that failed, on either side.
    pub failed: usize,
    /// The server's RSS before and with its idle connections, in bytes.
    pub server_rss: Option<(u64, u64)>,
    /// Server RSS growth per idle connection, in bytes.
    pub bytes_per_idle_conn: Option<f64>,
    /// The server's RSS once every idle connection had also sent one large
    /// frame, in bytes.
    pub server_rss_after_large_frame: Option<u64>,
    /// Server RSS growth per idle connection counted after each had sent
    /// one large frame, in bytes: against [`Self::bytes_per_idle_conn`],
    /// what a large frame leaves behind.
    pub bytes_per_idle_conn_after_large_frame: Option<f64>,
    /// Large frames the server answered (one per idle connection).
    pub large_frames_answered: usize,
    /// This process's growth per connection to the server: the client side.
    pub client_bytes_per_idle_conn: Option<f64>,
    /// The relay's growth per idle connection (its share of this process's
    /// growth, the client side taken off), in bytes.
    pub baseline_bytes_per_idle_conn: Option<f64>,
    /// Warnings and the first errors, in words.
    pub notes: Vec<String>,
}

impl fmt::Display for IdleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(why) = &self.skipped {
            return writeln!(f, "idle memory: skipped ({why})");
        }
        let bytes = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0} B"));
        writeln!(
            f,
            "idle memory ({} asked, {} tried; {} open on the server, {} on the relay, {} failed):",
            self.requested, self.attempted, self.server_opened, self.baseline_opened, self.failed
        )?;
        if let Some((before, after)) = self.server_rss {
            write!(
                f,
                "  server RSS {:.1} MiB -> {:.1} MiB",
                before as f64 / MIB,
                after as f64 / MIB
            )?;
            match self.server_rss_after_large_frame {
                Some(large) => writeln!(
                    f,
                    " -> {:.1} MiB after one large frame each",
                    large as f64 / MIB
                )?,
                None => writeln!(f)?,
            }
        }
        writeln!(
            f,
            "  per idle connection: server {}, baseline relay {}, (bench client side {})",
            bytes(self.bytes_per_idle_conn),
            bytes(self.baseline_bytes_per_idle_conn),
            bytes(self.client_bytes_per_idle_conn)
        )?;
        writeln!(
            f,
            "  per idle connection after one {} KiB frame each: server {} ({} of {} frames answered)",
            LARGE_TEXT_BYTES / 1024,
            bytes(self.bytes_per_idle_conn_after_large_frame),
            self.large_frames_answered,
            self.server_opened
        )?;
        if self.bytes_per_idle_conn.is_some_and(|b| b < 1024.0) {
            writeln!(
                f,
                "  note: the server's RSS barely grew: it is reusing memory freed by earlier \
                 connections (the allocator keeps it); measure on a freshly started server"
            )?;
        }
        for note in &self.notes {
            writeln!(f, "  note: {note}")?;
        }
        Ok(())
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// Runs the idle measurement; never fails the bench (what went wrong is in
/// the report). `nofile`: this process's soft descriptor limit, already
/// raised as far as it goes.
pub(crate) async fn measure(opts: &BenchOptions, relay_url: &str, nofile: u64) -> IdleReport {
    let mut report = IdleReport {
        requested: opts.idle_conns,
        ..IdleReport::default()
    };
    let skip = |mut report: IdleReport, why: String| {
        tracing::info!("idle memory: skipped: {why}");
        report.skipped = Some(why);
        report
    };
    if opts.idle_conns == 0 {
        return skip(report, "--idle-conns 0".into());
    }
    let Some(pid) = opts.server_pid else {
        return skip(
            report,
            "no --server-pid: the server's memory cannot be read".into(),
        );
    };
    if !super::is_loopback(&opts.url) {
        return skip(
            report,
            format!(
                "{} is not a loopback address; idle connections are opened only to this machine",
                opts.url
            ),
        );
    }
    if let Err(e) = vm_rss(Some(pid)) {
        return skip(report, format!("cannot read /proc/{pid}/status: {e}"));
    }

    // Descriptors: fit K in.
    let limit = nofile;
    report.nofile_limit = Some(limit);
    let open_now = open_fds().unwrap_or(64);
    let fit =
        usize::try_from(limit.saturating_sub(open_now + FD_RESERVE) / 3).unwrap_or(usize::MAX);
    report.attempted = opts.idle_conns.min(fit);
    if report.attempted < opts.idle_conns {
        report.notes.push(format!(
            "the descriptor limit ({limit}) fits {} idle connections per side, not {}",
            report.attempted, opts.idle_conns
        ));
    }
    if report.attempted == 0 {
        return skip(report, format!("no descriptors to spare (limit {limit})"));
    }
    if let Some(server_limit) = nofile_of(pid)
        && server_limit < report.attempted as u64 + 64
    {
        report.notes.push(format!(
            "the server's own descriptor limit is {server_limit}: expect failed logins (raise it with ulimit -n before starting the server)"
        ));
    }

    let users: Vec<UserId> = (0..report.attempted as u64)
        .map(|i| UserId(opts.idle_user_base + i))
        .collect();
    let sample = |pid| rss_median(pid, opts.rss_samples, opts.rss_interval);

    tokio::time::sleep(opts.idle_settle).await;
    let (server_before, own_before) = match (sample(Some(pid)).await, sample(None).await) {
        (Ok(s), Ok(o)) => (s, o),
        (Err(e), _) | (_, Err(e)) => return skip(report, format!("reading RSS: {e}")),
    };
    tracing::info!(
        conns = report.attempted,
        "idle memory: opening connections to the server"
    );
    let mut server_conns = open(
        &Login::new(opts, &opts.url),
        users.clone(),
        opts,
        &mut report,
    )
    .await;
    report.server_opened = server_conns.len();
    tokio::time::sleep(opts.idle_settle).await;
    let server_after = sample(Some(pid)).await;
    let own_with_server = sample(None).await;

    tracing::info!(
        conns = report.attempted,
        "idle memory: opening connections to the baseline relay"
    );
    let relay_conns = open(&Login::new(opts, relay_url), users, opts, &mut report).await;
    report.baseline_opened = relay_conns.len();
    tokio::time::sleep(opts.idle_settle).await;
    let own_with_both = sample(None).await;

    tracing::info!(
        conns = server_conns.len(),
        "idle memory: one large frame per connection to the server"
    );
    report.large_frames_answered = send_large_frames(&mut server_conns, &mut report.notes).await;
    tokio::time::sleep(opts.idle_settle).await;
    let server_after_large = sample(Some(pid)).await;

    tracing::info!("idle memory: closing");
    let mut all = server_conns;
    all.extend(relay_conns);
    let stuck = super::close_all(all).await;
    if stuck > 0 {
        report
            .notes
            .push(format!("{stuck} idle connections did not finish closing"));
    }

    let per_conn = |before: u64, after: u64, n: usize| {
        (n > 0).then(|| (after as f64 - before as f64) / n as f64)
    };
    match server_after {
        Ok(after) => {
            report.server_rss = Some((server_before, after));
            report.bytes_per_idle_conn = per_conn(server_before, after, report.server_opened);
        }
        Err(e) => report.notes.push(format!("reading the server's RSS: {e}")),
    }
    match server_after_large {
        // A figure only when every connection's frame was read.
        Ok(after) if report.large_frames_answered == report.server_opened => {
            report.server_rss_after_large_frame = Some(after);
            report.bytes_per_idle_conn_after_large_frame =
                per_conn(server_before, after, report.server_opened);
        }
        Ok(_) => report.notes.push(format!(
            "only {} of {} large frames were answered: no figure after large frames",
            report.large_frames_answered, report.server_opened
        )),
        Err(e) => report.notes.push(format!("reading the server's RSS: {e}")),
    }
    if let (Ok(with_server), Ok(with_both)) = (own_with_server, own_with_both) {
        report.client_bytes_per_idle_conn = per_conn(own_before, with_server, report.server_opened);
        report.baseline_bytes_per_idle_conn =
            per_conn(with_server, with_both, report.baseline_opened)
                .zip(report.client_bytes_per_idle_conn)
                .map(|(both, client)| both - client);
    }
    report
}

/// Step 4: each client sends one [`LARGE_TEXT_BYTES`] text to user 0 and
/// waits for the server's answer before the next one sends. Returns how
/// many were answered; notes the first failures.
async fn send_large_frames(clients: &mut [Client], notes: &mut Vec<String>) -> usize {
    let text = "x".repeat(LARGE_TEXT_BYTES);
    let first_id = super::unix_ns();
    let mut answered = 0;
    let mut failed = 0;
    for (i, client) in clients.iter_mut().enumerate() {
        let id = first_id + i as u64;
        let answer = async {
            client
                .send(UserId(0), &text, id)
                .await
                .map_err(|e| e.to_string())?;
            loop {
                match client.next_event().await {
                    Some(Event::SendResult { client_msg_id, .. }) if client_msg_id == id => {
                        return Ok(());
                    }
                    Some(Event::Closed(cause)) => return Err(format!("closed: {cause:?}")),
                    None => return Err("the connection task ended".to_owned()),
                    Some(_) => {}
                }
            }
        };
        match tokio::time::timeout(LARGE_ANSWER_TIMEOUT, answer).await {
            Ok(Ok(())) => answered += 1,
            outcome => {
                failed += 1;
                if failed <= 3 {
                    let why = match outcome {
                        Ok(Err(e)) => e,
                        _ => format!("no answer within {LARGE_ANSWER_TIMEOUT:?}"),
                    };
                    notes.push(format!("a large frame was not answered: {why}"));
                }
            }
        }
    }
    answered
}

/// Logs the users in; returns the clients that made it, noting failures.
async fn open(
    login: &Login,
    users: Vec<UserId>,
    opts: &BenchOptions,
    report: &mut IdleReport,
) -> Vec<Client> {
    let mut clients = Vec::with_capacity(users.len());
    for result in super::connect_many(login, users, opts.connect_concurrency, false).await {
        match result {
            Ok(client) => clients.push(client),
            Err(e) => {
                report.failed += 1;
                if report.failed <= 3 {
                    report.notes.push(format!("idle login failed: {e}"));
                }
            }
        }
    }
    clients
}

/// `VmRSS` of a process (this one for `None`), in bytes.
pub fn vm_rss(pid: Option<u32>) -> std::io::Result<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let status = std::fs::read_to_string(&path)?;
    parse_vm_rss(&status).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("no VmRSS line in {path}"),
        )
    })
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut fields = line["VmRSS:".len()..].split_whitespace();
    let kib: u64 = fields.next()?.parse().ok()?;
    (fields.next() == Some("kB")).then_some(kib * 1024)
}

/// The median of `samples` reads, `interval` apart.
async fn rss_median(pid: Option<u32>, samples: usize, interval: Duration) -> std::io::Result<u64> {
    let mut reads = Vec::with_capacity(samples);
    for i in 0..samples {
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        reads.push(vm_rss(pid)?);
    }
    reads.sort_unstable();
    Ok(reads[reads.len() / 2])
}

/// Descriptors this process has open.
fn open_fds() -> std::io::Result<u64> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count() as u64)
}

/// Another process's soft descriptor limit, from `/proc/PID/limits`.
fn nofile_of(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    parse_nofile(&limits)
}

fn parse_nofile(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss_in_bytes() {
        let status = "Name:\tim-server\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(1234 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert!(vm_rss(None).unwrap() > 0);
    }

    #[test]
    fn reads_the_nofile_soft_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95000                95000                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_nofile(limits), Some(1024));
    }
}
