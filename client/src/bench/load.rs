//! Throughput and latency: N sender→receiver pairs on one endpoint.
//!
//! Each sender keeps at most `window` messages in flight, counted by a
//! per-pair semaphore: a send takes a permit, and the receiver's delivery
//! (or the server's refusal) gives it back. A message's text is the time
//! it was sent (or, when paced, was due to be sent: so a stall shows up as
//! latency instead of hiding as fewer samples, the coordinated-omission
//! correction), in nanoseconds since the run's start; its receiver, in the
//! same process, subtracts that from its arrival time.
//!
//! When the duration is up the senders stop, the bench waits (up to the
//! drain timeout) for what is in flight, then stops every task and closes
//! every connection. `msgs_per_s` counts deliveries within the duration.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use im_proto::UserId;
use tokio::sync::{Semaphore, SemaphorePermit, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{BenchOptions, Login, Notes};
use crate::{Client, CloseCause, Event};

/// Highest latency the histogram tells apart, in microseconds (one hour);
/// higher values are recorded as this.
const LATENCY_MAX_US: u64 = 3_600_000_000;
/// The timeline's resolution: the worst latency per slot of send time.
const SLOT: Duration = Duration::from_millis(100);
/// How many of the slowest slots a report names.
const SLOWEST_KEPT: usize = 5;
/// Receivers share this many histograms (about 190 KB each), so memory
/// does not grow with the number of pairs.
const HISTOGRAM_STRIPES: usize = 16;

/// The worst latency of the messages sent within one 100 ms slot.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowSlot {
    /// The slot's start, from the phase's start.
    pub at: Duration,
    pub max_ms: f64,
}

/// Send→deliver latency percentiles, in milliseconds; `None` without
/// samples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub mean_ms: Option<f64>,
}

impl Latency {
    /// Reads percentiles off a histogram of microseconds.
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_ms: Some(ms(h.value_at_quantile(0.5))),
            p99_ms: Some(ms(h.value_at_quantile(0.99))),
            p999_ms: Some(ms(h.value_at_quantile(0.999))),
            max_ms: Some(ms(h.max())),
            mean_ms: Some(h.mean() / 1000.0),
        }
    }
}

/// What one load phase measured on one endpoint.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub url: String,
    /// Deliveries within the duration, per second of it.
    pub msgs_per_s: f64,
    /// Sends issued.
    pub sent: u64,
    /// Sends the server accepted.
    pub accepted: u64,
    /// Sends the server refused.
    pub refused: u64,
    /// Sends the server never answered.
    pub unanswered: u64,
    /// Deliveries, within the duration and while draining.
    pub delivered: u64,
    /// Deliveries within the duration.
    pub delivered_in_window: u64,
    /// Sends neither refused nor delivered by the end of the drain.
    pub lost: u64,
    /// Deliveries of a message already delivered, or out of order.
    pub duplicates: u64,
    /// Deliveries from before this run (a replayed inbox).
    pub stale: u64,
    /// Deliveries from the wrong sender, or with text not written by us.
    pub misdelivered: u64,
    /// Connections that ended during the phase.
    pub disconnects: u64,
    /// Error envelopes from the server.
    pub server_errors: u64,
    /// Connections whose clean close did not complete in time.
    pub close_timeouts: usize,
    pub latency: Latency,
    /// CPU time the server process (`--server-pid`) used while the load
    /// ran, when it was given.
    pub server_cpu: Option<Duration>,
    /// CPU time this process (clients, and the relay when it is the
    /// target) used while the load ran.
    pub own_cpu: Option<Duration>,
    /// The slowest 100 ms slots of send time, slowest first: where stalls
    /// were.
    pub slowest: Vec<SlowSlot>,
    /// The first few errors, in words.
    pub notes: Vec<String>,
    /// The send→deliver histogram, in microseconds.
    pub histogram: Histogram<u64>,
}

impl LoadReport {
    /// Everything that went wrong, counted together.
    pub fn errors(&self) -> u64 {
        self.refused
            + self.lost
            + self.duplicates
            + self.misdelivered
            + self.disconnects
            + self.server_errors
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.3} ms"));
        let l = &self.latency;
        write!(
            f,
            "{}\n  {:.0} msgs/s delivered; latency p50 {}, p99 {}, p99.9 {}, max {} ({} samples)\n  \
             sent {}, accepted {}, refused {}, unanswered {}, delivered {}, lost {}, \
             duplicates {}, stale {}, misdelivered {}, disconnects {}, server errors {}",
            self.url,
            self.msgs_per_s,
            ms(l.p50_ms),
            ms(l.p99_ms),
            ms(l.p999_ms),
            ms(l.max_ms),
            l.count,
            self.sent,
            self.accepted,
            self.refused,
            self.unanswered,
            self.delivered,
            self.lost,
            self.duplicates,
            self.stale,
            self.misdelivered,
            self.disconnects,
            self.server_errors
        )?;
        if !self.slowest.is_empty() {
            let slots: Vec<String> = self
                .slowest
                .iter()
                .map(|s| format!("{:.1}s: {:.1} ms", s.at.as_secs_f64(), s.max_ms))
                .collect();
            write!(f, "\n  slowest 100 ms of send time: {}", slots.join(", "))?;
        }
        Ok(())
    }
}

/// One pair's counters, shared by its sender and receiver tasks.
struct Pair {
    /// Free places in the sender's window.
    window: Semaphore,
    sent: AtomicU64,
    answered: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    delivered: AtomicU64,
    /// A side disconnected: nothing more will settle.
    dead: AtomicBool,
}

impl Pair {
    fn new(window: usize) -> Pair {
        Pair {
            window: Semaphore::new(window),
            sent: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            dead: AtomicBool::new(false),
        }
    }

    /// Every send answered, and every accepted one delivered.
    fn settled(&self) -> bool {
        let sent = self.sent.load(Ordering::Acquire);
        self.dead.load(Ordering::Acquire)
            || (self.answered.load(Ordering::Acquire) >= sent
                && self.delivered.load(Ordering::Acquire) + self.refused.load(Ordering::Acquire)
                    >= sent)
    }
}

/// What every task of one phase shares.
struct Run {
    /// Time zero of the message timestamps.
    epoch: Instant,
    /// Senders stop here; deliveries after it do not count for throughput.
    deadline: Instant,
    /// Message ids are `id_base + 1, + 2, ...` per sender.
    id_base: u64,
    /// Paced: time between one sender's messages.
    interval: Option<Duration>,
    pairs: usize,
    notes: Notes,
    /// The worst latency (µs) per [`SLOT`] of send time.
    timeline: Vec<AtomicU64>,
    /// Send→deliver latencies (µs); receiver `i` records into `i % len`.
    histograms: Vec<Mutex<Histogram<u64>>>,
    disconnects: AtomicU64,
    server_errors: AtomicU64,
}

impl Run {
    fn note_event(&self, who: &str, event: &Event) {
        match event {
            Event::ServerError { code, detail } => {
                self.server_errors.fetch_add(1, Ordering::Relaxed);
                self.notes
                    .add(format!("{who}: server error {code}: {detail}"));
            }
            Event::Closed(cause) => {
                self.disconnects.fetch_add(1, Ordering::Relaxed);
                self.notes.add(format!("{who}: disconnected: {cause:?}"));
            }
            _ => {}
        }
    }
}

/// What a receiver task hands back.
struct Received {
    client: Option<Client>,
    in_window: u64,
    duplicates: u64,
    stale: u64,
    misdelivered: u64,
}

/// Drives the load on `url` and measures it.
/// `server_pid`: a process whose CPU time to account (the server's).
pub(crate) async fn run(
    opts: &BenchOptions,
    url: &str,
    server_pid: Option<u32>,
) -> anyhow::Result<LoadReport> {
    let login = Login::new(opts, url);
    let senders: Vec<UserId> = (0..opts.pairs as u64)
        .map(|i| UserId(opts.user_base + 2 * i))
        .collect();
    let receivers: Vec<UserId> = senders.iter().map(|s| UserId(s.0 + 1)).collect();
    // Receivers first, positioned after their inboxes' ends.
    let receiving = super::connect_many(&login, receivers.clone(), opts.connect_concurrency, true);
    let receiving = receiving.await;
    let sending = super::connect_many(&login, senders.clone(), opts.connect_concurrency, false);
    let sending = sending.await;
    let mut first_error = None;
    let mut connected = Vec::with_capacity(2 * opts.pairs);
    for (user, result) in receivers
        .iter()
        .chain(&senders)
        .zip(receiving.into_iter().chain(sending))
    {
        match result {
            Ok(client) => connected.push(client),
            Err(e) => {
                first_error.get_or_insert_with(|| format!("user {user}: {e}"));
            }
        }
    }
    if let Some(first) = first_error {
        super::close_all(connected).await;
        anyhow::bail!("logging in the pairs on {url} failed; first: {first}");
    }
    let sending = connected.split_off(opts.pairs);
    let receiving = connected;

    let server_cpu_before = server_pid.and_then(|pid| cpu_time(Some(pid)).ok());
    let own_cpu_before = cpu_time(None).ok();
    let epoch = Instant::now();
    let run = Arc::new(Run {
        epoch,
        deadline: epoch + opts.duration,
        id_base: super::unix_ns(),
        interval: opts
            .rate
            .map(|rate| Duration::from_secs_f64(opts.pairs as f64 / rate)),
        pairs: opts.pairs,
        notes: Notes::default(),
        timeline: {
            let span = opts.duration + opts.drain_timeout + SLOT;
            let slots = span.as_millis().div_ceil(SLOT.as_millis());
            (0..slots).map(|_| AtomicU64::new(0)).collect()
        },
        histograms: (0..opts.pairs.min(HISTOGRAM_STRIPES))
            .map(|_| Mutex::new(new_histogram()))
            .collect(),
        disconnects: AtomicU64::new(0),
        server_errors: AtomicU64::new(0),
    });
    let pairs: Vec<Arc<Pair>> = (0..opts.pairs)
        .map(|_| Arc::new(Pair::new(opts.window)))
        .collect();
    let (stop, stop_rx) = watch::channel(false);
    let mut send_tasks = JoinSet::new();
    let mut receive_tasks = JoinSet::new();
    for (i, (client, pair)) in sending.into_iter().zip(&pairs).enumerate() {
        send_tasks.spawn(sender(
            client,
            receivers[i],
            i,
            pair.clone(),
            run.clone(),
            stop_rx.clone(),
        ));
    }
    for (i, (client, pair)) in receiving.into_iter().zip(&pairs).enumerate() {
        receive_tasks.spawn(receiver(
            client,
            senders[i],
            i,
            pair.clone(),
            run.clone(),
            stop_rx.clone(),
        ));
    }

    tokio::time::sleep_until(run.deadline).await;
    let drain_until = run.deadline + opts.drain_timeout;
    while !pairs.iter().all(|p| p.settled()) && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = stop.send(true);
    let used = |before: Option<Duration>, pid| {
        let after = cpu_time(pid).ok()?;
        Some(after.saturating_sub(before?))
    };
    let server_cpu = server_pid.and_then(|pid| used(server_cpu_before, Some(pid)));
    let own_cpu = used(own_cpu_before, None);

    let mut clients = Vec::with_capacity(2 * opts.pairs);
    while let Some(done) = send_tasks.join_next().await {
        if let Some(client) = done.context("a sender task failed")? {
            clients.push(client);
        }
    }
    let (mut in_window, mut duplicates, mut stale, mut misdelivered) = (0, 0, 0, 0);
    while let Some(done) = receive_tasks.join_next().await {
        let r = done.context("a receiver task failed")?;
        in_window += r.in_window;
        duplicates += r.duplicates;
        stale += r.stale;
        misdelivered += r.misdelivered;
        clients.extend(r.client);
    }
    let close_timeouts = super::close_all(clients).await;
    let mut histogram = new_histogram();
    for stripe in &run.histograms {
        histogram
            .add(&*lock(stripe))
            .context("merging latency histograms")?;
    }

    let sum = |f: fn(&Pair) -> &AtomicU64| -> u64 {
        pairs.iter().map(|p| f(p).load(Ordering::Acquire)).sum()
    };
    let sent = sum(|p| &p.sent);
    let refused = sum(|p| &p.refused);
    let delivered = sum(|p| &p.delivered);
    let mut notes = run.notes.take();
    if close_timeouts > 0 {
        notes.push(format!(
            "{close_timeouts} connections did not finish closing"
        ));
    }
    Ok(LoadReport {
        url: url.to_owned(),
        msgs_per_s: in_window as f64 / opts.duration.as_secs_f64(),
        sent,
        accepted: sum(|p| &p.accepted),
        refused,
        unanswered: sent.saturating_sub(sum(|p| &p.answered)),
        delivered,
        delivered_in_window: in_window,
        lost: sent.saturating_sub(refused + delivered),
        duplicates,
        stale,
        misdelivered,
        disconnects: run.disconnects.load(Ordering::Acquire),
        server_errors: run.server_errors.load(Ordering::Acquire),
        close_timeouts,
        latency: Latency::from_histogram(&histogram),
        server_cpu,
        own_cpu,
        slowest: slowest(&run.timeline),
        notes,
        histogram,
    })
}

fn lock(stripe: &Mutex<Histogram<u64>>) -> std::sync::MutexGuard<'_, Histogram<u64>> {
    stripe.lock().unwrap_or_else(|e| e.into_inner())
}

fn new_histogram() -> Histogram<u64> {
    // Three significant figures from 1 µs to an hour.
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("constant, valid histogram bounds")
}

/// Clock ticks per second in `/proc/PID/stat` (Linux's `USER_HZ`, 100 on
/// every architecture it ships for).
const USER_HZ: u64 = 100;

/// User plus system CPU time of a process, all its threads (this process
/// for `None`), from `/proc/PID/stat`.
pub fn cpu_time(pid: Option<u32>) -> std::io::Result<Duration> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(&path)?;
    parse_cpu_ticks(&stat)
        .map(|ticks| Duration::from_millis(ticks * 1000 / USER_HZ))
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unexpected format of {path}"),
            )
        })
}

/// utime + stime (fields 14 and 15; the command name, field 2, may hold
/// spaces and parentheses, so fields are counted after its last `)`).
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The slowest slots of a timeline, slowest first.
fn slowest(timeline: &[AtomicU64]) -> Vec<SlowSlot> {
    let mut slots: Vec<(usize, u64)> = timeline
        .iter()
        .map(|worst| worst.load(Ordering::Acquire))
        .enumerate()
        .filter(|&(_, us)| us > 0)
        .collect();
    slots.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    slots
        .into_iter()
        .take(SLOWEST_KEPT)
        .map(|(i, us)| SlowSlot {
            at: SLOT * u32::try_from(i).unwrap_or(u32::MAX),
            max_ms: us as f64 / 1000.0,
        })
        .collect()
}

/// Waits for the pacing schedule (if any), then for a place in the window.
async fn slot(window: &Semaphore, due: Option<Instant>) -> Result<SemaphorePermit<'_>, ()> {
    if let Some(at) = due {
        tokio::time::sleep_until(at).await;
    }
    window.acquire().await.map_err(|_| ())
}

/// Sends until the deadline, reads the answers until told to stop; hands
/// back the client if the connection is still up.
async fn sender(
    mut client: Client,
    to: UserId,
    index: usize,
    pair: Arc<Pair>,
    run: Arc<Run>,
    mut stop: watch::Receiver<bool>,
) -> Option<Client> {
    let who = format!("sender {}", client.user());
    let mut last_id = run.id_base;
    // Paced senders start spread over one interval.
    let mut due = run
        .interval
        .map(|i| run.epoch + i.mul_f64(index as f64 / run.pairs as f64));
    let mut sending = true;
    loop {
        tokio::select! {
            biased;
            _ = super::stopped(&mut stop) => return Some(client),
            event = client.next_event() => match event {
                Some(Event::SendResult { accepted, reason, .. }) => {
                    pair.answered.fetch_add(1, Ordering::AcqRel);
                    if accepted {
                        pair.accepted.fetch_add(1, Ordering::AcqRel);
                    } else {
                        pair.refused.fetch_add(1, Ordering::AcqRel);
                        pair.window.add_permits(1);
                        run.notes.add(format!("{who}: send refused: {reason}"));
                    }
                }
                Some(Event::Delivered { .. }) => {}
                Some(event @ Event::ServerError { .. }) => run.note_event(&who, &event),
                Some(event @ Event::Closed(_)) => {
                    run.note_event(&who, &event);
                    pair.dead.store(true, Ordering::Release);
                    return None;
                }
                None => {
                    run.note_event(&who, &Event::Closed(CloseCause::Lost("event stream ended".into())));
                    pair.dead.store(true, Ordering::Release);
                    return None;
                }
            },
            _ = tokio::time::sleep_until(run.deadline), if sending => sending = false,
            permit = slot(&pair.window, due), if sending => {
                let Ok(permit) = permit else {
                    sending = false;
                    continue;
                };
                let now = Instant::now();
                if now >= run.deadline {
                    sending = false;
                    continue;
                }
                // The receiver (or a refusal) gives the place back.
                permit.forget();
                let stamp = due.unwrap_or(now).duration_since(run.epoch);
                let stamp = u64::try_from(stamp.as_nanos()).unwrap_or(u64::MAX);
                last_id += 1;
                pair.sent.fetch_add(1, Ordering::AcqRel);
                if client.send(to, &stamp.to_string(), last_id).await.is_err() {
                    run.note_event(&who, &Event::Closed(CloseCause::Lost("send failed: connection task gone".into())));
                    pair.dead.store(true, Ordering::Release);
                    return None;
                }
                if let (Some(at), Some(interval)) = (due.as_mut(), run.interval) {
                    *at += interval;
                }
            }
        }
    }
}

/// Takes deliveries until told to stop: checks each, records its latency,
/// and frees its place in the sender's window.
async fn receiver(
    mut client: Client,
    from: UserId,
    index: usize,
    pair: Arc<Pair>,
    run: Arc<Run>,
    mut stop: watch::Receiver<bool>,
) -> Received {
    let who = format!("receiver {}", client.user());
    let stripe = &run.histograms[index % run.histograms.len()];
    let mut r = Received {
        client: None,
        in_window: 0,
        duplicates: 0,
        stale: 0,
        misdelivered: 0,
    };
    let mut last_id = run.id_base;
    loop {
        tokio::select! {
            biased;
            _ = super::stopped(&mut stop) => {
                r.client = Some(client);
                return r;
            }
            event = client.next_event() => match event {
                Some(Event::Delivered { from: sender, text, client_msg_id, .. }) => {
                    let now = Instant::now();
                    let stamp = text.parse::<u64>();
                    if sender != from || stamp.is_err() {
                        r.misdelivered += 1;
                        run.notes.add(format!("{who}: unexpected delivery from {sender}: {text:?}"));
                        continue;
                    }
                    if client_msg_id <= run.id_base {
                        r.stale += 1;
                        continue;
                    }
                    if client_msg_id <= last_id {
                        r.duplicates += 1;
                        run.notes.add(format!("{who}: message {client_msg_id} after {last_id}"));
                        continue;
                    }
                    last_id = client_msg_id;
                    let sent_at = Duration::from_nanos(stamp.unwrap_or_default());
                    let latency = now.duration_since(run.epoch).saturating_sub(sent_at);
                    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
                    lock(stripe).saturating_record(micros);
                    let slot = sent_at.as_millis() / SLOT.as_millis();
                    if let Some(worst) = usize::try_from(slot).ok().and_then(|i| run.timeline.get(i)) {
                        worst.fetch_max(micros, Ordering::Relaxed);
                    }
                    if now <= run.deadline {
                        r.in_window += 1;
                    }
                    pair.delivered.fetch_add(1, Ordering::AcqRel);
                    pair.window.add_permits(1);
                }
                Some(Event::SendResult { .. }) => {}
                Some(event @ Event::ServerError { .. }) => run.note_event(&who, &event),
                Some(event @ Event::Closed(_)) => {
                    run.note_event(&who, &event);
                    pair.dead.store(true, Ordering::Release);
                    return r;
                }
                None => {
                    run.note_event(&who, &Event::Closed(CloseCause::Lost("event stream ended".into())));
                    pair.dead.store(true, Ordering::Release);
                    return r;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_ticks_after_the_command_name() {
        let stat =
            "1817 (im server) S 1 1817 1 0 -1 4194560 2951 0 0 0 250 75 0 0 20 0 3 0 1234 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        assert!(cpu_time(None).is_ok());
    }

    #[test]
    fn the_slowest_slots_come_first() {
        let timeline: Vec<AtomicU64> = [0, 5_000, 90_000, 7_000]
            .into_iter()
            .map(AtomicU64::new)
            .collect();
        let slots = slowest(&timeline);
        assert_eq!(slots.len(), 3);
        assert_eq!(slots[0].at, Duration::from_millis(200));
        assert_eq!(slots[0].max_ms, 90.0);
        assert_eq!(slots[2].at, Duration::from_millis(100));
    }
}
