//! A client that stays connected (hardened profile): it reconnects with
//! backoff, resumes its inbox after the last sequence it received, resends
//! sends the server has not answered (the server deduplicates them by
//! client message id), retries sends refused as "unavailable", and drops
//! duplicate deliveries. Sends to one recipient go one at a time, in order:
//! a send refused and retried can never be stored after its successor. A
//! send is never left waiting for an answer for good: unanswered after
//! `answer_timeout`, it goes again (same id; the server deduplicates), and
//! a temporary refusal (`retry_after`) sends it again after that delay. It
//! stops only when asked to, or when a newer connection of the same device
//! supersedes it (close 4001). Answers name only the client message id, so
//! a second message with an id that still waits for its answer is refused
//! at once ([`crate::ClientError::IdInUse`]); the same message again is a
//! retry, answered once.

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
    /// Sends not yet answered. While this many wait, [`Resilient::send`]
    /// waits for an answer to free a place (backpressure). Sends to a
    /// recipient the server asked to wait for ("retry later": its inbox is
    /// full, or Redis is away) do not count here but against
    /// `parked_max`, so that one recipient who is away does not hold up
    /// every other conversation.
    pub pending_max: usize,
    /// Sends queued behind a "retry later" (see `pending_max`). While this
    /// many wait as well, [`Resilient::send`] waits.
    pub parked_max: usize,
    /// Delivered (sender, client_msg_id) pairs remembered to drop duplicates.
    pub dedup_window: usize,
    /// A send on the wire with no answer after this long is sent again,
    /// with the same id, on the same connection (the server deduplicates
    /// it). The server answers within its write timeout or closes the
    /// connection, so this is a second line of defence.
    pub answer_timeout: Duration,
}

impl Default for Resilience {
    fn default() -> Self {
        Resilience {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            pending_max: 1024,
            parked_max: 4096,
            dedup_window: 4096,
            answer_timeout: Duration::from_secs(15),
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
    /// The server refused a send for now (its store is unreachable, the
    /// recipient's inbox is full): it goes again, same id, after `after`.
    Retrying {
        client_msg_id: u64,
        reason: String,
        after: Duration,
    },
    /// One of [`Event::Delivered`], [`Event::SendResult`] (only final
    /// answers, once per send), [`Event::ServerError`].
    Event(Event),
    /// The client gave up for good (closed by the user, or superseded).
    Stopped(CloseCause),
}

#[derive(Clone, Debug)]
enum Cmd {
    Send { to: UserId, text: String, id: u64 },
    Close,
    Reconnect,
    PauseReading(bool),
}

/// Handle to a running resilient client.
///
/// Backpressure: [`Resilient::send`] waits while `pending_max` sends are
/// unanswered (and while `commands_max` commands are queued); answers
/// arrive as events, and the client stops taking answers from the network
/// while `events_max` events wait unread. So a caller that sends more than
/// `pending_max` messages must read events meanwhile, from the same task
/// through [`Resilient::sender`] in a `select!`, or from another task;
/// then nothing ever waits for good. Nothing is refused for want of room.
pub struct Resilient {
    commands: mpsc::Sender<Cmd>,
    controls: mpsc::Sender<Cmd>,
    events: mpsc::Receiver<ResilientEvent>,
    waiting: Waiting,
}

/// The sends that wait for a final answer, by client message id (shared
/// by the handles, which refuse a second message with an id in use, and
/// the loop, which forgets an id once it is answered for good).
type Waiting = Arc<std::sync::Mutex<BTreeMap<u64, (UserId, String)>>>;

/// Takes `id` for a send of `text` to `to`: true if it is new, false for
/// the same message again (an application's retry: it waits once, and one
/// answer comes); `IdInUse` for another message with an id still waiting.
fn claim(waiting: &Waiting, to: UserId, text: &str, id: u64) -> Result<bool, crate::ClientError> {
    let mut waiting = waiting.lock().unwrap_or_else(|e| e.into_inner());
    match waiting.get(&id) {
        Some((t, x)) if *t == to && x == text => Ok(false),
        Some(_) => Err(crate::ClientError::IdInUse(id)),
        None => {
            waiting.insert(id, (to, text.to_owned()));
            Ok(true)
        }
    }
}

/// Sends on a [`Resilient`] client from wherever its events are not read.
#[derive(Clone, Debug)]
pub struct ResilientSender {
    commands: mpsc::Sender<Cmd>,
    controls: mpsc::Sender<Cmd>,
    waiting: Waiting,
}

impl ResilientSender {
    /// As [`Resilient::send`].
    pub async fn send(
        &self,
        to: UserId,
        text: &str,
        client_msg_id: u64,
    ) -> Result<(), crate::ClientError> {
        let new = claim(&self.waiting, to, text, client_msg_id)?;
        let sent = self
            .command(Cmd::Send {
                to,
                text: text.to_owned(),
                id: client_msg_id,
            })
            .await;
        if new && sent.is_err() {
            self.waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&client_msg_id);
        }
        sent
    }

    /// As [`Resilient::close`].
    pub async fn close(&self) -> Result<(), crate::ClientError> {
        self.command(Cmd::Close).await
    }

    /// As [`Resilient::reconnect`].
    pub async fn reconnect(&self) -> Result<(), crate::ClientError> {
        self.command(Cmd::Reconnect).await
    }

    /// As [`Resilient::pause_reading`].
    pub async fn pause_reading(&self, paused: bool) -> Result<(), crate::ClientError> {
        self.command(Cmd::PauseReading(paused)).await
    }

    async fn command(&self, cmd: Cmd) -> Result<(), crate::ClientError> {
        route(&self.commands, &self.controls, cmd).await
    }
}

/// Sends go to the bounded send queue (which waits while the outbox is
/// full); controls (close, reconnect, pause) to their own queue, which the
/// client always takes, so a caller can, say, resume reading while its
/// sends wait for answers that only reading will bring.
async fn route(
    commands: &mpsc::Sender<Cmd>,
    controls: &mpsc::Sender<Cmd>,
    cmd: Cmd,
) -> Result<(), crate::ClientError> {
    let queue = match cmd {
        Cmd::Send { .. } => commands,
        _ => controls,
    };
    queue
        .send(cmd)
        .await
        .map_err(|_| crate::ClientError::Closed)
}

/// What the client's loop takes in: controls first, always; sends only
/// while the outbox has room.
struct Inputs {
    sends: mpsc::Receiver<Cmd>,
    controls: mpsc::Receiver<Cmd>,
}

impl Inputs {
    /// The next command; `None` once every handle is gone.
    async fn next(&mut self, room: bool) -> Option<Cmd> {
        tokio::select! {
            biased;
            ctl = self.controls.recv() => ctl,
            cmd = self.sends.recv(), if room => match cmd {
                Some(cmd) => Some(cmd),
                // No sender left, but the controls say when to stop.
                None => std::future::pending().await,
            },
        }
    }
}

impl Resilient {
    /// Starts connecting in the background (on the current runtime).
    pub fn start(dial: Dial, options: Options, resilience: Resilience) -> Resilient {
        let (commands, sends) = mpsc::channel(options.commands_max);
        let (controls, control_rx) = mpsc::channel(CONTROLS_MAX);
        let (tx, events) = mpsc::channel(options.events_max);
        let inputs = Inputs {
            sends,
            controls: control_rx,
        };
        let waiting = Waiting::default();
        tokio::spawn(run(dial, options, resilience, inputs, tx, waiting.clone()));
        Resilient {
            commands,
            controls,
            events,
            waiting,
        }
    }

    /// A handle for sending while this one reads events.
    pub fn sender(&self) -> ResilientSender {
        ResilientSender {
            commands: self.commands.clone(),
            controls: self.controls.clone(),
            waiting: self.waiting.clone(),
        }
    }

    /// Queues a message; the final answer arrives as
    /// [`Event::SendResult`]. Waits while the client is full (see above).
    pub async fn send(
        &self,
        to: UserId,
        text: &str,
        client_msg_id: u64,
    ) -> Result<(), crate::ClientError> {
        self.sender().send(to, text, client_msg_id).await
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
        route(&self.commands, &self.controls, cmd).await
    }
}

/// Controls waiting for the client's loop (it takes them at once).
const CONTROLS_MAX: usize = 16;

struct State {
    last_seq: u64,
    seen: BTreeSet<(u64, u64)>,
    seen_order: VecDeque<(u64, u64)>,
    /// Unanswered sends.
    outbox: Outbox,
    paused: bool,
}

/// Unanswered sends, queued per recipient. Only the oldest of each queue
/// is on the wire; the next goes once it is answered. The server stores
/// sends in the order they arrive, so with pipelining a send refused as
/// unavailable and retried would be stored after a successor that got
/// through (found by `im-sim sweep`, seed 18: Redis restarting between two
/// sends). One in flight per conversation keeps each sender's order.
///
/// Each head has a due time: when it goes (again) unless answered first.
/// Sent, it is due again after the answer timeout; refused for now, after
/// the server's `retry_after`.
#[derive(Debug, Default)]
struct Outbox {
    sends: BTreeMap<u64, (UserId, String)>,
    queues: BTreeMap<UserId, VecDeque<u64>>,
    due: BTreeMap<u64, tokio::time::Instant>,
    /// Recipients whose head was refused "retry later" and not yet
    /// answered for good: their queues are parked.
    parked: BTreeSet<UserId>,
}

impl Outbox {
    #[cfg(test)]
    fn len(&self) -> usize {
        self.sends.len()
    }

    /// Whether another send may be taken: fewer than `pending_max` wait
    /// in conversations that flow, and fewer than `parked_max` behind a
    /// "retry later".
    fn has_room(&self, r: &Resilience) -> bool {
        let parked: usize = self
            .parked
            .iter()
            .filter_map(|to| self.queues.get(to))
            .map(VecDeque::len)
            .sum();
        self.sends.len() - parked < r.pending_max && parked < r.parked_max
    }

    /// Queues a send; true when it heads its queue (send it now). An id
    /// already waiting is not queued twice.
    fn push(&mut self, to: UserId, text: String, id: u64) -> bool {
        if self.sends.contains_key(&id) {
            return false;
        }
        self.sends.insert(id, (to, text));
        let queue = self.queues.entry(to).or_default();
        queue.push_back(id);
        queue.len() == 1
    }

    /// The send `id` if it is on the wire (heads its queue).
    fn head(&self, id: u64) -> Option<(UserId, &str)> {
        let (to, text) = self.sends.get(&id)?;
        (self.queues.get(to)?.front() == Some(&id)).then_some((*to, text.as_str()))
    }

    /// Every send that should be on the wire, for a new connection.
    fn heads(&self) -> Vec<(u64, UserId, String)> {
        self.queues
            .values()
            .filter_map(|q| q.front())
            .map(|id| {
                let (to, text) = &self.sends[id];
                (*id, *to, text.clone())
            })
            .collect()
    }

    /// `id` was answered for good: forgets it; `None` if it was not
    /// waiting (a second answer, to a resend); else its recipient's next
    /// send, if that is now the head.
    fn answered(&mut self, id: u64) -> Option<Option<(u64, UserId, String)>> {
        let (to, _) = self.sends.remove(&id)?;
        self.due.remove(&id);
        if self.queues.get(&to).and_then(|q| q.front()) == Some(&id) {
            self.parked.remove(&to);
        }
        let Some(queue) = self.queues.get_mut(&to) else {
            return Some(None);
        };
        let was_head = queue.front() == Some(&id);
        queue.retain(|q| *q != id);
        let Some(&next) = queue.front() else {
            self.queues.remove(&to);
            return Some(None);
        };
        if !was_head {
            return Some(None);
        }
        let (to, text) = &self.sends[&next];
        Some(Some((next, *to, text.clone())))
    }

    /// The earliest due time, if any send is due at all.
    fn next_due(&self) -> Option<tokio::time::Instant> {
        self.due.values().min().copied()
    }

    /// Heads due by `now`, in id order.
    fn due_by(&self, now: tokio::time::Instant) -> Vec<(u64, UserId, String)> {
        self.due
            .iter()
            .filter(|(_, at)| **at <= now)
            .filter_map(|(id, _)| {
                let (to, text) = self.head(*id)?;
                Some((*id, to, text.to_owned()))
            })
            .collect()
    }
}

/// One connection's life in the resilient loop: puts `id` on the wire and
/// marks it due again after the answer timeout.
async fn put_on_wire(
    client: &Client,
    st: &mut State,
    r: &Resilience,
    id: u64,
    to: UserId,
    text: &str,
) {
    st.outbox
        .due
        .insert(id, tokio::time::Instant::now() + r.answer_timeout);
    let _ = client.send(to, text, id).await;
}

async fn run(
    dial: Dial,
    options: Options,
    r: Resilience,
    mut commands: Inputs,
    events: mpsc::Sender<ResilientEvent>,
    waiting: Waiting,
) {
    let mut st = State {
        last_seq: options.resume_after_seq,
        seen: BTreeSet::new(),
        seen_order: VecDeque::new(),
        outbox: Outbox::default(),
        paused: false,
    };
    let mut backoff = r.backoff_min;
    // Each attempt a higher connection_seq (when the app gave a start), so
    // a login of an attempt abandoned here cannot outrank a later one.
    let mut connection_seq = options.connection_seq;
    loop {
        let mut opts = options.clone();
        opts.resume_after_seq = st.last_seq;
        opts.connection_seq = connection_seq;
        if connection_seq > 0 {
            connection_seq += 1;
        }
        let attempt = tokio::time::timeout(options.login_timeout, async {
            let stream = dial().await.map_err(crate::ClientError::Connect)?;
            Client::connect_over(stream, opts).await
        });
        tokio::pin!(attempt);
        // Commands keep coming while a login is under way: sends queue up,
        // a Reconnect abandons this attempt (its socket is dropped) and
        // dials again at once, a Close stops.
        let mut abandoned = false;
        let outcome = loop {
            tokio::select! {
                biased;
                cmd = commands.next(st.outbox.has_room(&r)) => match cmd {
                    Some(Cmd::Send { to, text, id }) => {
                        st.outbox.push(to, text, id);
                    }
                    Some(Cmd::PauseReading(p)) => st.paused = p,
                    Some(Cmd::Reconnect) => {
                        abandoned = true;
                        break Err("abandoned for a new attempt".to_owned());
                    }
                    Some(Cmd::Close) | None => {
                        let _ = events
                            .send(ResilientEvent::Stopped(CloseCause::ByUser))
                            .await;
                        return;
                    }
                },
                result = &mut attempt => break match result {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(_) => Err("timed out".to_owned()),
                },
            }
        };
        let mut client = match outcome {
            Ok(c) => c,
            Err(error) => {
                let _ = events.send(ResilientEvent::ConnectFailed { error }).await;
                if abandoned {
                    backoff = r.backoff_min;
                    continue;
                }
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
        for (id, to, text) in st.outbox.heads() {
            put_on_wire(&client, &mut st, &r, id, to, &text).await;
        }
        let mut stopping = false;
        let due_timer = tokio::time::sleep(Duration::MAX);
        tokio::pin!(due_timer);
        let cause = loop {
            if let Some(at) = st.outbox.next_due() {
                due_timer.as_mut().reset(at);
            }
            tokio::select! {
                biased;
                cmd = commands.next(st.outbox.has_room(&r)), if !stopping => match cmd {
                    Some(Cmd::Send { to, text, id }) => {
                        if st.outbox.push(to, text.clone(), id) {
                            put_on_wire(&client, &mut st, &r, id, to, &text).await;
                        }
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
                _ = &mut due_timer, if st.outbox.next_due().is_some() => {
                    for (id, to, text) in st.outbox.due_by(tokio::time::Instant::now()) {
                        put_on_wire(&client, &mut st, &r, id, to, &text).await;
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
                    Some(Event::SendResult { client_msg_id, accepted, reason, code, retry_after }) => {
                        if !accepted && let Some(after) = retry_after {
                            if let Some((to, _)) = st.outbox.head(client_msg_id) {
                                st.outbox.parked.insert(to);
                                st.outbox.due.insert(client_msg_id, tokio::time::Instant::now() + after);
                                let e = ResilientEvent::Retrying { client_msg_id, reason, after };
                                let _ = events.send(e).await;
                            }
                            continue;
                        }
                        let Some(next) = st.outbox.answered(client_msg_id) else {
                            // The answer to a resend of something answered.
                            continue;
                        };
                        waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&client_msg_id);
                        if let Some((id, to, text)) = next {
                            put_on_wire(&client, &mut st, &r, id, to, &text).await;
                        }
                        let e = Event::SendResult { client_msg_id, accepted, reason, code, retry_after };
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
        // 4001 comes only from the connection in hand: an abandoned one
        // (a login that timed out, a dropped socket) is never read again,
        // so its close cannot stop the client.
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
/// queue up (while there is room), Reconnect cuts the wait short. Returns
/// true on Close.
async fn wait_or_stop(
    commands: &mut Inputs,
    st: &mut State,
    r: &Resilience,
    delay: Duration,
) -> bool {
    let until = tokio::time::Instant::now() + delay;
    loop {
        tokio::select! {
            biased;
            cmd = commands.next(st.outbox.has_room(r)) => match cmd {
                Some(Cmd::Send { to, text, id }) => {
                    st.outbox.push(to, text, id);
                }
                Some(Cmd::Close) | None => return true,
                Some(Cmd::Reconnect) => return false,
                Some(Cmd::PauseReading(p)) => st.paused = p,
            },
            _ = tokio::time::sleep_until(until) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outbox_puts_one_send_per_recipient_on_the_wire_in_order() {
        let mut o = Outbox::default();
        assert!(o.push(UserId(2), "a".into(), 1));
        assert!(!o.push(UserId(2), "b".into(), 2), "waits behind 1");
        assert!(o.push(UserId(3), "c".into(), 3), "another conversation");
        assert!(
            !o.push(UserId(2), "a".into(), 1),
            "a duplicate id is not queued"
        );
        assert_eq!(o.len(), 3);
        let heads: Vec<u64> = o.heads().iter().map(|h| h.0).collect();
        assert_eq!(heads, vec![1, 3]);
        assert!(o.head(2).is_none());
        assert_eq!(o.answered(1), Some(Some((2, UserId(2), "b".into()))));
        assert_eq!(o.head(2), Some((UserId(2), "b")));
        assert_eq!(o.answered(2), Some(None));
        assert_eq!(o.answered(3), Some(None));
        assert_eq!(o.answered(3), None, "a second answer is not an answer");
        assert_eq!(o.len(), 0);
    }

    #[test]
    fn a_conversation_told_to_retry_later_does_not_use_up_the_room_of_the_others() {
        let r = Resilience {
            pending_max: 2,
            parked_max: 3,
            ..Resilience::default()
        };
        let mut o = Outbox::default();
        o.push(UserId(2), "a".into(), 1);
        o.push(UserId(2), "b".into(), 2);
        assert!(!o.has_room(&r), "two unanswered: full");
        // The server asks to retry 1 later (2's inbox is full): its
        // conversation is parked, and the others have room again.
        o.parked.insert(UserId(2));
        assert!(o.has_room(&r));
        o.push(UserId(2), "c".into(), 3);
        assert!(!o.has_room(&r), "three parked: the parked room is full");
        o.push(UserId(3), "d".into(), 4);
        // Retried and accepted: the conversation flows again.
        o.parked.clear();
        o.push(UserId(2), "e".into(), 5);
        assert_eq!(o.answered(1), Some(Some((2, UserId(2), "b".into()))));
        assert!(o.parked.is_empty());
        assert!(!o.has_room(&r), "four unanswered in flowing conversations");
    }

    #[test]
    fn a_second_message_with_an_id_still_waiting_is_refused_and_a_retry_is_not() {
        let waiting = Waiting::default();
        assert!(claim(&waiting, UserId(2), "a", 1).unwrap(), "new");
        assert!(
            !claim(&waiting, UserId(2), "a", 1).unwrap(),
            "the same message again: a retry"
        );
        assert!(matches!(
            claim(&waiting, UserId(2), "b", 1),
            Err(crate::ClientError::IdInUse(1))
        ));
        assert!(matches!(
            claim(&waiting, UserId(3), "a", 1),
            Err(crate::ClientError::IdInUse(1))
        ));
        waiting.lock().unwrap().remove(&1);
        assert!(
            claim(&waiting, UserId(2), "b", 1).unwrap(),
            "answered: free again"
        );
    }

    #[test]
    fn the_final_answer_to_a_parked_head_unparks_its_conversation() {
        let mut o = Outbox::default();
        o.push(UserId(2), "a".into(), 1);
        o.push(UserId(2), "b".into(), 2);
        o.parked.insert(UserId(2));
        assert_eq!(o.answered(2), Some(None), "not the head: still parked");
        assert!(o.parked.contains(&UserId(2)));
        assert_eq!(o.answered(1), Some(None));
        assert!(o.parked.is_empty());
    }
}
