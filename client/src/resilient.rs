//! A client that stays connected (hardened profile): it reconnects with
//! backoff, resumes its inbox after the last sequence it received, resends
//! sends the server has not answered (the server deduplicates them by
//! client message id), retries sends refused as "unavailable", and drops
//! duplicate deliveries. It stops only when asked to, or when a newer
//! connection of the same device supersedes it (close 4001).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use im_proto::UserId;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::{Client, CloseCause, Event, Options};

/// A byte stream the client can run over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Opens a new connection to a server (TCP in production, turmoil in the
/// simulation). Called again for every reconnect.
pub type Dial = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = io::Result<Box<dyn Stream>>> + Send>> + Send + Sync,
>;

/// A [`Dial`] over real TCP to `host:port` of `options.url`.
pub fn tcp_dial(url: &str) -> Result<Dial, crate::ClientError> {
    let addr = crate::host_port(url)?;
    Ok(Arc::new(move || {
        let addr = addr.clone();
        Box::pin(async move {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s) as Box<dyn Stream>)
        })
    }))
}

/// Reconnection and retry settings.
#[derive(Clone, Debug)]
pub struct Resilience {
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Sends not yet answered; one more is refused at once.
    pub pending_max: usize,
    /// Delivered (sender, client_msg_id) pairs remembered to drop duplicates.
    pub dedup_window: usize,
    /// Delay before resending sends refused as unavailable.
    pub retry_after: Duration,
}

impl Default for Resilience {
    fn default() -> Self {
        Resilience {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            pending_max: 1024,
            dedup_window: 4096,
            retry_after: Duration::from_secs(1),
        }
    }
}

/// What the resilient client reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResilientEvent {
    /// A connection logged in.
    Connected { conn_id: u64 },
    /// A connection ended; unless `Stopped` follows, a reconnect comes.
    Disconnected { conn_id: u64, cause: CloseCause },
    /// A dial or login failed; a retry follows after backoff.
    ConnectFailed { error: String },
    /// One of [`Event::Delivered`], [`Event::SendResult`], [`Event::ServerError`].
    Event(Event),
    /// The client gave up for good (closed by the user, or superseded).
    Stopped(CloseCause),
}

enum Cmd {
    Send { to: UserId, text: String, id: u64 },
    Close,
    Reconnect,
    PauseReading(bool),
}

/// Handle to a running resilient client.
pub struct Resilient {
    commands: mpsc::Sender<Cmd>,
    events: mpsc::Receiver<ResilientEvent>,
}

impl Resilient {
    /// Starts connecting in the background (on the current runtime).
    pub fn start(dial: Dial, options: Options, resilience: Resilience) -> Resilient {
        let (commands, rx) = mpsc::channel(options.commands_max);
        let (tx, events) = mpsc::channel(options.events_max);
        tokio::spawn(run(dial, options, resilience, rx, tx));
        Resilient { commands, events }
    }

    pub async fn send(
        &self,
        to: UserId,
        text: &str,
        client_msg_id: u64,
    ) -> Result<(), crate::ClientError> {
        self.command(Cmd::Send {
            to,
            text: text.to_owned(),
            id: client_msg_id,
        })
        .await
    }

    /// Closes cleanly and stops reconnecting.
    pub async fn close(&self) -> Result<(), crate::ClientError> {
        self.command(Cmd::Close).await
    }

    /// Drops the current connection and reconnects at once.
    pub async fn reconnect(&self) -> Result<(), crate::ClientError> {
        self.command(Cmd::Reconnect).await
    }

    pub async fn pause_reading(&self, paused: bool) -> Result<(), crate::ClientError> {
        self.command(Cmd::PauseReading(paused)).await
    }

    pub async fn next_event(&mut self) -> Option<ResilientEvent> {
        self.events.recv().await
    }

    async fn command(&self, cmd: Cmd) -> Result<(), crate::ClientError> {
        self.commands
            .send(cmd)
            .await
            .map_err(|_| crate::ClientError::Closed)
    }
}

struct State {
    last_seq: u64,
    seen: BTreeSet<(u64, u64)>,
    seen_order: VecDeque<(u64, u64)>,
    /// Unanswered sends by client_msg_id.
    pending: BTreeMap<u64, (UserId, String)>,
    /// Sends refused as unavailable, to resend after `retry_after`.
    retry: BTreeSet<u64>,
    paused: bool,
}

async fn run(
    dial: Dial,
    options: Options,
    r: Resilience,
    mut commands: mpsc::Receiver<Cmd>,
    events: mpsc::Sender<ResilientEvent>,
) {
    let mut st = State {
        last_seq: options.resume_after_seq,
        seen: BTreeSet::new(),
        seen_order: VecDeque::new(),
        pending: BTreeMap::new(),
        retry: BTreeSet::new(),
        paused: false,
    };
    let mut backoff = r.backoff_min;
    loop {
        let mut opts = options.clone();
        opts.resume_after_seq = st.last_seq;
        let attempt = async {
            let stream = dial().await.map_err(crate::ClientError::Connect)?;
            Client::connect_over(stream, opts).await
        };
        let outcome = match tokio::time::timeout(options.login_timeout, attempt).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err("timed out".to_owned()),
        };
        let mut client = match outcome {
            Ok(c) => c,
            Err(error) => {
                let _ = events.send(ResilientEvent::ConnectFailed { error }).await;
                if wait_or_stop(&mut commands, &mut st, &r, backoff).await {
                    let _ = events
                        .send(ResilientEvent::Stopped(CloseCause::ByUser))
                        .await;
                    return;
                }
                backoff = (backoff * 2).min(r.backoff_max);
                continue;
            }
        };
        backoff = r.backoff_min;
        let conn_id = client.conn_id().0;
        let _ = events.send(ResilientEvent::Connected { conn_id }).await;
        if st.paused {
            let _ = client.pause_reading(true).await;
        }
        // Whatever was not answered on the last connection goes again.
        for (&id, (to, text)) in &st.pending {
            let _ = client.send(*to, text, id).await;
        }
        st.retry.clear();
        let mut stopping = false;
        let retry_timer = tokio::time::sleep(Duration::MAX);
        tokio::pin!(retry_timer);
        let cause = loop {
            tokio::select! {
                biased;
                cmd = commands.recv(), if !stopping => match cmd {
                    Some(Cmd::Send { to, text, id }) => {
                        if st.pending.len() >= r.pending_max {
                            let refused = Event::SendResult { client_msg_id: id, accepted: false, reason: "too many unanswered sends".into() };
                            let _ = events.send(ResilientEvent::Event(refused)).await;
                            continue;
                        }
                        st.pending.insert(id, (to, text.clone()));
                        let _ = client.send(to, &text, id).await;
                    }
                    Some(Cmd::Close) | None => {
                        stopping = true;
                        let _ = client.close().await;
                    }
                    Some(Cmd::Reconnect) => {
                        let _ = client.abort().await;
                    }
                    Some(Cmd::PauseReading(p)) => {
                        st.paused = p;
                        let _ = client.pause_reading(p).await;
                    }
                },
                _ = &mut retry_timer, if !st.retry.is_empty() => {
                    for id in std::mem::take(&mut st.retry) {
                        if let Some((to, text)) = st.pending.get(&id) {
                            let _ = client.send(*to, text, id).await;
                        }
                    }
                }
                event = client.next_event() => match event {
                    Some(Event::Delivered { from, text, client_msg_id, seq }) => {
                        st.last_seq = st.last_seq.max(seq);
                        let key = (from.0, client_msg_id);
                        if st.seen.insert(key) {
                            st.seen_order.push_back(key);
                            if st.seen_order.len() > r.dedup_window
                                && let Some(old) = st.seen_order.pop_front()
                            {
                                st.seen.remove(&old);
                            }
                            let e = Event::Delivered { from, text, client_msg_id, seq };
                            if events.send(ResilientEvent::Event(e)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Some(Event::SendResult { client_msg_id, accepted, reason }) => {
                        if !accepted && reason.starts_with("unavailable") {
                            st.retry.insert(client_msg_id);
                            retry_timer.as_mut().reset(tokio::time::Instant::now() + r.retry_after);
                            continue;
                        }
                        st.pending.remove(&client_msg_id);
                        let e = Event::SendResult { client_msg_id, accepted, reason };
                        let _ = events.send(ResilientEvent::Event(e)).await;
                    }
                    Some(e @ Event::ServerError { .. }) => {
                        let _ = events.send(ResilientEvent::Event(e)).await;
                    }
                    Some(Event::Closed(cause)) => break cause,
                    None => break CloseCause::Lost("connection task ended".into()),
                },
            }
        };
        let _ = events
            .send(ResilientEvent::Disconnected {
                conn_id,
                cause: cause.clone(),
            })
            .await;
        let superseded = matches!(cause, CloseCause::ByServer { code, .. } if code == im_proto::close_code::SUPERSEDED);
        if stopping || superseded {
            let _ = events.send(ResilientEvent::Stopped(cause)).await;
            return;
        }
        if wait_or_stop(&mut commands, &mut st, &r, backoff).await {
            let _ = events
                .send(ResilientEvent::Stopped(CloseCause::ByUser))
                .await;
            return;
        }
        backoff = (backoff * 2).min(r.backoff_max);
    }
}

/// Waits `delay` before the next dial while still taking commands: sends
/// queue up, Reconnect cuts the wait short. Returns true on Close.
async fn wait_or_stop(
    commands: &mut mpsc::Receiver<Cmd>,
    st: &mut State,
    r: &Resilience,
    delay: Duration,
) -> bool {
    let until = tokio::time::Instant::now() + delay;
    loop {
        tokio::select! {
            biased;
            cmd = commands.recv() => match cmd {
                Some(Cmd::Send { to, text, id }) => {
                    if st.pending.len() < r.pending_max {
                        st.pending.insert(id, (to, text));
                    }
                }
                Some(Cmd::Close) | None => return true,
                Some(Cmd::Reconnect) => return false,
                Some(Cmd::PauseReading(p)) => st.paused = p,
            },
            _ = tokio::time::sleep_until(until) => return false,
        }
    }
}
