//! Checkers: each reads the recorded [`History`] and Redis's final state,
//! never the server's internals, and returns a [`Verdict`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::history::{Event, History, MsgKey};
use crate::world::RunResult;

/// The properties every run is judged by.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Invariant {
    /// Every delivered message was sent, to that recipient (nobody sees a
    /// message but its recipient); none arrives twice on a device, nor is
    /// stored twice in an inbox; messages
    /// between one pair arrive in the order sent; nothing arrives on a
    /// connection its device has superseded.
    Delivery,
    /// No sender is told "sent" for a message that never arrived (or, for
    /// a recipient left offline, is not waiting in its stored inbox).
    NoFalseSuccess,
    /// At quiescence, the users online in Redis are exactly the users with
    /// a live connection.
    Presence,
    /// After faults heal, every pair of users the story leaves online can
    /// talk both ways (the seed's own criterion).
    Liveness,
    /// The hardened server refuses what it promises to refuse, and stores
    /// none of it: a send to a user who never logged in, a text over the
    /// text limit, a client message id of 0, a login token not in
    /// canonical form. (The seed's phases promise no refusals.)
    Refusals,
    /// Hardened: in calm weather, nothing waits. A send from a connected
    /// device is answered within [`PROMPT`], and an accepted message
    /// reaches every device of its recipient connected all along within
    /// [`PROMPT`] (or while others keep arriving there, each within
    /// [`PROMPT`] of the last): a doorbell, a reply or a subscription
    /// lost in calm weather shows as a wait for the next poll (10 s) or
    /// the client's resend (15 s). Calm: no fault for [`CALM_AFTER`]
    /// before, and none in effect on the path (the two devices, their
    /// nodes, Redis) until the promise is due; the client waiting on the
    /// server's "retry later" exempts the wait.
    Promptness,
}

/// How long a calm send may wait for its answer, and a calm delivery for
/// its device (see [`Invariant::Promptness`]).
pub const PROMPT: Duration = Duration::from_secs(3);

/// How long after any fault the weather counts as calm again.
pub const CALM_AFTER: Duration = Duration::from_secs(1);

impl Invariant {
    pub const ALL: [Invariant; 6] = [
        Invariant::Delivery,
        Invariant::NoFalseSuccess,
        Invariant::Presence,
        Invariant::Liveness,
        Invariant::Refusals,
        Invariant::Promptness,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Invariant::Delivery => "delivery",
            Invariant::NoFalseSuccess => "no_false_success",
            Invariant::Presence => "presence",
            Invariant::Liveness => "liveness",
            Invariant::Refusals => "refusals",
            Invariant::Promptness => "promptness",
        }
    }
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One invariant's result, with the evidence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub invariant: Invariant,
    pub problems: Vec<String>,
    /// What the invariant exempted, and why (shown, never hidden).
    pub notes: Vec<String>,
}

impl Verdict {
    pub fn holds(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One message as the history tells it: the story (or a probe) sent it,
/// the server answered, devices received it.
///
/// A message is named by its key (sender, client message id) and its text:
/// a story may reuse an id for another text (a careless client), and that
/// is another message, which the server must refuse rather than confuse
/// with the first.
#[derive(Clone, Debug, Default)]
pub struct MessageFate {
    pub key: Option<MsgKey>,
    /// The sender's device.
    pub device: String,
    pub to: u64,
    pub text: String,
    pub probe: bool,
    pub sent_at: Option<Duration>,
    /// Its place among the messages its sending device sent (from 0).
    pub order: usize,
    /// Could not be handed to a connection at all.
    pub send_failed: Option<String>,
    /// The server's final answer: Some(true) accepted, Some(false) refused.
    pub accepted: Option<bool>,
    pub reason: String,
    /// Temporary refusals before the answer ("retry later").
    pub retries: usize,
    /// When the (first) answer came.
    pub answered_at: Option<Duration>,
    /// When, and on which of the recipient's devices, it arrived.
    pub deliveries: Vec<(Duration, String)>,
}

impl MessageFate {
    /// Devices that got it more than once.
    pub fn duplicated(&self) -> Vec<&str> {
        let mut seen = BTreeSet::new();
        let mut twice = BTreeSet::new();
        for (_, d) in &self.deliveries {
            if !seen.insert(d.as_str()) {
                twice.insert(d.as_str());
            }
        }
        twice.into_iter().collect()
    }

    /// Whether every device in `required` got it (at least one, if none is required).
    pub fn reached(&self, required: &[&str]) -> bool {
        if required.is_empty() {
            !self.deliveries.is_empty()
        } else {
            required
                .iter()
                .all(|r| self.deliveries.iter().any(|(_, d)| d == r))
        }
    }
}

/// A message's name in [`fates`]: its key and its text.
pub type MsgId = (MsgKey, String);

/// Every message the story or the probes sent, by key then text.
///
/// Answers are matched to sends by key, first unanswered send first (a
/// client has one send per id in flight); deliveries by key and text.
pub fn fates(history: &History) -> BTreeMap<MsgId, MessageFate> {
    let mut fates = BTreeMap::<MsgId, MessageFate>::new();
    // Per key, the sends still waiting for an answer, oldest first.
    let mut unanswered = BTreeMap::<MsgKey, VecDeque<MsgId>>::new();
    let mut sent_by = BTreeMap::<(u64, String), usize>::new();
    // (recipient, key) -> inserts Redis executed not yet matched to an
    // acceptance.
    let mut stores = BTreeMap::<(u64, MsgKey), usize>::new();
    for r in &history.records {
        match &r.event {
            Event::Sent {
                key,
                device,
                to,
                text,
                probe,
            } => {
                let id = (*key, text.clone());
                let f = fates.entry(id.clone()).or_default();
                if f.sent_at.is_some() {
                    // The same message again (same id, same text): a retry
                    // by the application; the server must treat it as one.
                    unanswered.entry(*key).or_default().push_back(id);
                    continue;
                }
                let n = sent_by.entry((key.from, device.clone())).or_default();
                f.order = *n;
                *n += 1;
                f.key = Some(*key);
                f.device = device.clone();
                f.to = *to;
                f.text = text.clone();
                f.probe = *probe;
                f.sent_at = Some(r.at);
                unanswered.entry(*key).or_default().push_back(id);
            }
            Event::SendFailed {
                key,
                to,
                text,
                reason,
                probe,
            } => {
                let f = fates.entry((*key, text.clone())).or_default();
                f.key = Some(*key);
                f.to = *to;
                f.text = text.clone();
                f.probe = *probe;
                f.sent_at.get_or_insert(r.at);
                f.send_failed = Some(reason.clone());
            }
            Event::SendRetry { key, .. } => {
                if let Some(id) = unanswered.get(key).and_then(|q| q.front())
                    && let Some(f) = fates.get_mut(id)
                {
                    f.retries += 1;
                }
            }
            Event::Stored { to, key } => *stores.entry((*to, *key)).or_default() += 1,
            Event::SendResult {
                key,
                accepted,
                reason,
            } => {
                let Some(queue) = unanswered.get_mut(key) else {
                    continue;
                };
                // A client that reused an id (for another text, to another
                // recipient) may have had its first send die unanswered
                // with its connection: an acceptance belongs to the oldest
                // send whose recipient's inbox got that key and has not
                // been claimed (the store Redis executed), else the oldest.
                let pick = if *accepted {
                    queue
                        .iter()
                        .position(|id| {
                            fates
                                .get(id)
                                .is_some_and(|f| stores.get(&(f.to, *key)).is_some_and(|&n| n > 0))
                        })
                        .unwrap_or(0)
                } else {
                    0
                };
                let Some(id) = queue.remove(pick) else {
                    continue;
                };
                if *accepted
                    && let Some(f) = fates.get(&id)
                    && let Some(n) = stores.get_mut(&(f.to, *key))
                {
                    *n = n.saturating_sub(1);
                }
                let f = fates.entry(id).or_default();
                f.answered_at.get_or_insert(r.at);
                // A message sent twice keeps its first acceptance.
                if f.accepted != Some(true) {
                    f.accepted = Some(*accepted);
                    f.reason = reason.clone();
                }
            }
            Event::Delivered {
                key, device, text, ..
            } => {
                let f = fates.entry((*key, text.clone())).or_default();
                f.key.get_or_insert(*key);
                f.deliveries.push((r.at, device.clone()));
            }
            _ => {}
        }
    }
    fates
}

/// What the promise says about one message, as the checkers see it and as
/// the report's message table shows it (one judgement, two readers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// Reached every device it had to (or one, when none had to).
    Delivered,
    /// Its recipient is left offline and it waits in the stored inbox.
    Waiting,
    /// Refused by the server (not "sent"; no promise).
    Refused,
    /// Never handed to a connection.
    NotSent,
    /// No answer and no delivery (the sender gave up, or the run ended).
    Unanswered,
    /// Told "sent", then lost with Redis's data (an empty restart):
    /// exempt, the fault model assumes a durable store.
    LostWithRedis,
    /// Told "sent", not delivered where it had to be: a violation.
    Missing { devices: Vec<String> },
}

/// Judges one message against `no_false_success`.
pub fn judge(run: &RunResult, lost: &BTreeSet<MsgKey>, f: &MessageFate) -> Judgement {
    let required = promised_devices(run, f);
    if f.send_failed.is_some() {
        return Judgement::NotSent;
    }
    if f.reached(&required) {
        return Judgement::Delivered;
    }
    match f.accepted {
        Some(false) => Judgement::Refused,
        None => Judgement::Unanswered,
        Some(true) => {
            let key = f.key.unwrap_or(MsgKey { from: 0, id: 0 });
            if required.is_empty() && run.stored.contains(&(f.to, key)) {
                Judgement::Waiting
            } else if lost.contains(&key) {
                Judgement::LostWithRedis
            } else {
                let devices = if required.is_empty() {
                    vec!["any device".to_owned()]
                } else {
                    required
                        .iter()
                        .filter(|d| !f.deliveries.iter().any(|(_, got)| got == *d))
                        .map(|d| d.to_string())
                        .collect()
                };
                Judgement::Missing { devices }
            }
        }
    }
}

/// Runs every checker.
pub fn check(run: &RunResult) -> Vec<Verdict> {
    vec![
        delivery(&run.history, &run.stored_twice),
        no_false_success(run),
        presence(run),
        liveness(run),
        refusals(run),
        promptness(run),
    ]
}

fn delivery(history: &History, stored_twice: &BTreeSet<(u64, MsgKey)>) -> Verdict {
    // Stored twice is delivered twice to any device that resumes from
    // before both copies (client-side dedup only hides it from some).
    let mut problems: Vec<String> = stored_twice
        .iter()
        .map(|(to, k)| format!("{k} stored twice in {to}'s inbox"))
        .collect();
    let fates = fates(history);
    // When each message first reached each device, and when Redis
    // restarted empty: a message delivered before such a restart and again
    // after it (its sender's retry met no dedup record) is a loss of the
    // store, exempt like the messages it lost, and noted.
    let mut first_delivery = BTreeMap::<(MsgKey, String, u64, String), Duration>::new();
    let mut empty_restarts: Vec<Duration> = Vec::new();
    let mut notes = Vec::new();
    // Per (sending device, recipient device): the place of the last
    // message it received from that device. Order is promised per sending
    // device: two devices of one user sending at once have no order.
    let mut last = BTreeMap::<(u64, String, u64, String), (usize, MsgKey)>::new();
    // The newest connection of each device: a delivery on an older one
    // went to a superseded connection.
    let mut newest = BTreeMap::<(u64, String), (u64, u64)>::new();
    for r in &history.records {
        let (now, e) = (r.at, &r.event);
        if let Event::Fault { what } = e
            && what == "redis restarts empty"
        {
            empty_restarts.push(now);
        }
        if let Event::Connected {
            user,
            device,
            node,
            conn,
        } = e
        {
            newest.insert((*user, device.clone()), (*node, *conn));
        }
        let Event::Delivered {
            to,
            device,
            node,
            conn,
            key,
            text,
        } = e
        else {
            continue;
        };
        if newest
            .get(&(*to, device.clone()))
            .is_some_and(|n| *n != (*node, *conn))
        {
            problems.push(format!(
                "{key} delivered to {to} ({device}) on superseded connection {conn}"
            ));
        }
        let Some(f) = fates
            .get(&(*key, text.clone()))
            .filter(|f| f.sent_at.is_some())
        else {
            problems.push(format!("{key} {text:?} delivered to {to} but never sent"));
            continue;
        };
        if f.to != *to {
            problems.push(format!("{key} for {} delivered to {to}", f.to));
            continue;
        }
        if let Some(first) = first_delivery.get(&(*key, text.clone(), *to, device.clone())) {
            if empty_restarts.iter().any(|r| *first <= *r) {
                notes.push(format!(
                    "{key} delivered to {to} ({device}) again after Redis restarted empty (its dedup record was lost with the data; the fault model assumes a durable store)"
                ));
            } else {
                problems.push(format!("{key} delivered to {to} ({device}) more than once"));
            }
        } else {
            first_delivery.insert((*key, text.clone(), *to, device.clone()), now);
        }
        let pair = (key.from, f.device.clone(), *to, device.clone());
        if let Some((before, prev)) = last.get(&pair)
            && f.order < *before
        {
            problems.push(format!(
                "{key} delivered to {to} ({device}) after {prev}, which its device sent later (out of order)"
            ));
        }
        let entry = last.entry(pair).or_insert((f.order, *key));
        if f.order > entry.0 {
            *entry = (f.order, *key);
        }
    }
    Verdict {
        invariant: Invariant::Delivery,
        problems,
        notes,
    }
}

/// The devices of `user` the story leaves online.
fn required_devices(run: &RunResult, user: u64) -> Vec<&str> {
    run.intended_online
        .iter()
        .filter(|(u, _)| *u == user)
        .map(|(_, d)| d.as_str())
        .collect()
}

/// The devices a message told "sent" must reach (the promise, per
/// profile): every device of its recipient that the story leaves online;
/// without an inbox (the seed's phases), only those of them that were
/// connected when it was sent, since a device that logs in later cannot
/// receive what was pushed before it existed. None: it must reach some
/// device, or wait in the stored inbox.
pub fn promised_devices<'a>(run: &'a RunResult, f: &MessageFate) -> Vec<&'a str> {
    let mut devices = required_devices(run, f.to);
    if !run.inbox
        && let Some(sent) = f.sent_at
    {
        let live = live_devices_at(&run.history, sent);
        devices.retain(|d| live.contains(&(f.to, d.to_string())));
    }
    if run.inbox {
        devices.retain(|d| !trimmed_before_login(run, f, d));
    }
    devices
}

/// Hardened: whether `device` may find `f` trimmed when it logs in. The
/// inbox keeps the `inbox_history_max` newest messages some device has
/// acknowledged; so a message another device already had, followed by at
/// least that many newer ones, is gone for a device that logs in only
/// then (its LoginOk says so: `inbox_first_seq` above its resume point).
fn trimmed_before_login(run: &RunResult, f: &MessageFate, device: &str) -> bool {
    let Some(key) = f.key else {
        return false;
    };
    let history = &run.history;
    let Some(stored_at) = history.records.iter().find_map(|r| match &r.event {
        Event::Stored { to, key: k } if *to == f.to && *k == key => Some(r.at),
        _ => None,
    }) else {
        return false;
    };
    if live_devices_at(history, stored_at).contains(&(f.to, device.to_owned())) {
        return false;
    }
    let Some(login) = history.records.iter().find_map(|r| match &r.event {
        Event::Connected {
            user, device: d, ..
        } if r.at > stored_at && *user == f.to && d == device => Some(r.at),
        _ => None,
    }) else {
        return false;
    };
    let had = f
        .deliveries
        .iter()
        .any(|(at, d)| *at <= login && d != device);
    let newer = history
        .records
        .iter()
        .filter(|r| r.at > stored_at && r.at <= login)
        .filter(|r| matches!(&r.event, Event::Stored { to, .. } if *to == f.to))
        .count();
    had && newer as u64 >= im_server::config::Hardened::default().inbox_history_max
}

/// Devices with an open connection at `at`, as their clients saw it.
fn live_devices_at(history: &History, at: Duration) -> BTreeSet<(u64, String)> {
    connections(history)
        .into_iter()
        .filter(|(_, list)| {
            list.iter()
                .any(|&(opened, closed, _)| opened <= at && closed.is_none_or(|c| c > at))
        })
        .map(|(dev, _)| dev)
        .collect()
}

/// Messages a data-losing Redis restart took: accepted, and last stored
/// (by Redis's own clock: the insert it executed, not when the sender
/// heard "sent") before an empty restart. A device that had not received
/// one by then cannot receive it afterwards; those that had, had.
/// Our store is Redis; a Redis that keeps nothing on disk and restarts
/// loses them, which no server design can undo. The fault model therefore
/// assumes a durable store (Redis with AOF or a replica); these are exempt
/// from `no_false_success` and listed in its notes. (Without an inbox, the
/// seed's phases, "stored" is when the sender heard "sent".)
pub fn lost_with_redis(history: &History) -> BTreeSet<MsgKey> {
    let mut last_stored = BTreeMap::<MsgKey, Duration>::new();
    let mut stored_when_accepted = BTreeMap::<MsgKey, Duration>::new();
    let mut restarts = Vec::new();
    for r in &history.records {
        match &r.event {
            Event::Stored { key, .. } => {
                last_stored.insert(*key, r.at);
            }
            Event::SendResult {
                key,
                accepted: true,
                ..
            } => {
                let at = last_stored.get(key).copied().unwrap_or(r.at);
                stored_when_accepted.entry(*key).or_insert(at);
            }
            Event::Fault { what } if what == "redis restarts empty" => restarts.push(r.at),
            _ => {}
        }
    }
    // Delivered or not before the restart: a device that had not got it
    // by then (one that logs in later, say) cannot get it afterwards.
    stored_when_accepted
        .into_iter()
        .filter(|(_, stored)| restarts.iter().any(|restart| stored < restart))
        .map(|(key, _)| key)
        .collect()
}

fn no_false_success(run: &RunResult) -> Verdict {
    // "Sent" must mean it arrives: on every device of the recipient that
    // the story leaves online. For a recipient the story leaves offline it
    // must have arrived somewhere, or still wait in its stored inbox (the
    // hardened profile's "sent" is "stored").
    let lost = lost_with_redis(&run.history);
    let mut notes = Vec::new();
    let mut problems = Vec::new();
    for ((k, _), f) in fates(&run.history) {
        if f.probe {
            continue;
        }
        match judge(run, &lost, &f) {
            Judgement::LostWithRedis => notes.push(format!(
                "{k} to {} told sent, then lost with Redis's data (an empty restart; the store must be durable)",
                f.to
            )),
            Judgement::Missing { devices } => {
                let whom = if devices.len() == 1 && devices[0] == "any device" {
                    String::new()
                } else {
                    format!(" to {}", devices.join(", "))
                };
                problems.push(format!("{k} to {} told sent, never delivered{whom}", f.to))
            }
            _ => {}
        }
    }
    Verdict {
        invariant: Invariant::NoFalseSuccess,
        problems,
        notes,
    }
}

/// Devices whose latest connection is still open, as their clients see it.
pub fn live_devices(history: &History) -> BTreeSet<(u64, String)> {
    let mut live = BTreeMap::<(u64, String), (u64, u64)>::new();
    for e in history.events() {
        match e {
            Event::Connected {
                user,
                device,
                node,
                conn,
            } => {
                live.insert((*user, device.clone()), (*node, *conn));
            }
            Event::Closed {
                user,
                device,
                node,
                conn,
                ..
            } => {
                let dev = (*user, device.clone());
                if live.get(&dev) == Some(&(*node, *conn)) {
                    live.remove(&dev);
                }
            }
            _ => {}
        }
    }
    live.into_keys().collect()
}

/// Users with at least one live device.
pub fn live_users(history: &History) -> BTreeSet<u64> {
    live_devices(history).into_iter().map(|(u, _)| u).collect()
}

fn presence(run: &RunResult) -> Verdict {
    let mut problems = Vec::new();
    match &run.redis_online {
        None => problems.push("Redis was down at quiescence; presence unknown".into()),
        Some(online) => {
            let live = live_users(&run.history);
            for u in online.difference(&live) {
                problems.push(format!("{u} online in Redis without a live connection"));
            }
            for u in live.difference(online) {
                problems.push(format!("{u} has a live connection but is offline in Redis"));
            }
        }
    }
    if run.inbox {
        problems.extend(resurrected_leases(&run.history));
        problems.extend(lingering_superseded(run));
        // A node listens to a user's doorbell while the user has a
        // connection there: one that stays subscribed after the user left
        // grows its subscriptions with every user it ever served. (Not
        // judged after a node was cut from Redis: the node's old pub/sub
        // connection may live on, half-open, in Redis with what it was
        // subscribed to, until Redis's keepalive ends it, as a real Redis
        // would keep it.)
        let cut_from_redis = run.history.events().any(|e| {
            matches!(e, Event::Disturbed { links, .. }
                if links.iter().any(|(a, b)| a == "redis" || b == "redis"))
        });
        if let Some(heard) = run.bells_heard.as_ref().filter(|_| !cut_from_redis) {
            let live = live_users(&run.history);
            for u in heard.difference(&live) {
                problems.push(format!(
                    "a node still listens to the doorbell of {u}, who has no live connection"
                ));
            }
        }
    }
    Verdict {
        invariant: Invariant::Presence,
        problems,
        notes: Vec::new(),
    }
}

/// Hardened: a connection's lease, once released, never comes back (a
/// late write of a refresh would show a user online who left: for as long
/// as a lease, or, repeated, for good). Seen in Redis's own command log:
/// a lease member added again after its removal.
fn resurrected_leases(history: &History) -> Vec<String> {
    let mut released = BTreeMap::<(String, String), Duration>::new();
    let mut problems = Vec::new();
    for r in &history.records {
        let Event::PresenceWrite { command } = &r.event else {
            continue;
        };
        let words: Vec<&str> = command.split(' ').collect();
        match words.as_slice() {
            [zrem, key, members @ ..]
                if zrem.eq_ignore_ascii_case("ZREM") && key.ends_with(":conns") =>
            {
                for m in members {
                    released
                        .entry((key.to_string(), m.to_string()))
                        .or_insert(r.at);
                }
            }
            [zadd, key, rest @ ..]
                if zadd.eq_ignore_ascii_case("ZADD") && key.ends_with(":conns") =>
            {
                // ZADD key [options] score member [score member ...]
                let pairs: Vec<&str> = rest
                    .iter()
                    .copied()
                    .skip_while(|w| w.parse::<f64>().is_err())
                    .collect();
                for m in pairs.chunks(2).filter_map(|c| c.get(1)) {
                    if let Some(at) = released.get(&(key.to_string(), m.to_string())) {
                        problems.push(format!(
                            "lease {m} in {key} released at {} written again at {}",
                            crate::history::fmt_time(*at),
                            crate::history::fmt_time(r.at)
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    problems
}

/// The device a peer host name stands for: `user1001` (the default
/// device), `user1001-laptop`, either behind another address (`@cell`).
fn device_of_host(host: &str) -> Option<(u64, String)> {
    let own = host.split('@').next()?;
    let rest = own.strip_prefix("user")?;
    match rest.split_once('-') {
        Some((u, d)) => Some((u.parse().ok()?, d.to_owned())),
        None => Some((
            rest.parse().ok()?,
            crate::scenario::DEFAULT_DEVICE.to_owned(),
        )),
    }
}

/// Hardened: a connection its device has replaced goes, at once if the
/// news reaches its node (a doorbell: within [`PROMPT`] of a newer login
/// in calm weather), else at its next lease refresh: within a heartbeat
/// interval and [`PROMPT`] of the first calm moment after the newer
/// login, on the wire (the server's close frame, or the
/// stream's end, seen by the tap). A replaced connection that lingers
/// holds its user's presence after a logout, and gets its messages.
fn lingering_superseded(run: &RunResult) -> Vec<String> {
    use crate::wire::Frame;
    let bound = im_server::config::Hardened::default().heartbeat_interval + PROMPT;
    let weather = Weather::of(&run.history);
    let end = run
        .history
        .records
        .iter()
        .find(|r| matches!(&r.event, Event::Phase { name } if name == "heal"))
        .map_or(run.elapsed, |r| r.at);
    // Per stream: (device, node, logged in at, closed at).
    let mut streams = BTreeMap::<u64, ((u64, String), u64, Duration, Option<Duration>)>::new();
    for w in &run.wire {
        match &w.frame {
            Frame::LoginOk { .. } => {
                if let Some(dev) = device_of_host(&w.peer) {
                    streams.entry(w.stream).or_insert((dev, w.node, w.at, None));
                }
            }
            Frame::Close { .. } | Frame::Ended => {
                if let Some(s) = streams.get_mut(&w.stream) {
                    s.3.get_or_insert(w.at);
                }
            }
            _ => {}
        }
    }
    let mut problems = Vec::new();
    for (old_stream, (dev, old_node, old_at, old_closed)) in &streams {
        // The first newer login of the same device, on any node.
        let Some((new_node, new_at)) = streams
            .values()
            .filter(|(d, _, at, _)| d == dev && at > old_at)
            .map(|(_, n, at, _)| (*n, *at))
            .min_by_key(|&(_, at)| at)
        else {
            continue;
        };
        let path = |h: &str| {
            h == "redis" || h == format!("node{old_node}") || h == format!("node{new_node}")
        };
        // The first calm stretch of `bound` from the newer login on.
        // News of the newer login reaches the old node at once in calm
        // weather; else the old connection learns it at its next lease
        // refresh in the first calm stretch after.
        let due = if weather.calm(&path, new_at, new_at + PROMPT) {
            new_at + PROMPT
        } else {
            let starts = weather
                .changes()
                .map(|t| t + CALM_AFTER + Duration::from_millis(1))
                .filter(|&t| t > new_at);
            let Some(from) = starts
                .take_while(|&t| t + bound <= end)
                .find(|&t| weather.calm(&path, t, t + bound))
            else {
                continue;
            };
            from + bound
        };
        if due > end {
            continue;
        }
        // A Redis that restarts empty forgets the newer generation, and
        // the older connection cannot learn it was replaced (the fault
        // model assumes a durable store): it goes at its heartbeat timeout.
        let forgotten = run.history.records.iter().any(|r| {
            r.at >= new_at
                && r.at <= due
                && matches!(&r.event, Event::Fault { what } if what == "redis restarts empty")
        });
        if !forgotten && old_closed.is_none_or(|c| c > due) {
            problems.push(format!(
                "{} ({}): node{old_node}'s stream {old_stream}, replaced at {}, still open at {} in calm weather",
                dev.0,
                dev.1,
                crate::history::fmt_time(new_at),
                crate::history::fmt_time(due)
            ));
        }
    }
    problems
}

/// The hardened server's refusals: a recipient the server cannot know (no
/// user of the story, so it never logged in and has no key in Redis) and a
/// text over `Hardened::text_bytes_max` are answered "refused", never
/// "sent", and never reach an inbox; a login token not in canonical form
/// never logs in.
fn refusals(run: &RunResult) -> Verdict {
    let mut problems = Vec::new();
    if !run.inbox {
        return Verdict {
            invariant: Invariant::Refusals,
            problems,
            notes: vec!["the seed's phases promise no refusals".to_owned()],
        };
    }
    let text_max = im_server::config::Hardened::default().text_bytes_max;
    for ((k, _), f) in fates(&run.history) {
        if f.accepted != Some(true) {
            continue;
        }
        if !run.users.contains(&f.to) {
            problems.push(format!(
                "{k} to {}, a user who never logged in, told sent",
                f.to
            ));
        }
        if k.id == 0 {
            problems.push(format!(
                "{k} to {}: client message id 0 (not an id) told sent",
                f.to
            ));
        }
        if f.text.len() > text_max {
            problems.push(format!(
                "{k} to {}: a text of {} bytes (over the {text_max}-byte limit) told sent",
                f.to,
                f.text.len()
            ));
        }
    }
    for e in run.history.events() {
        if let Event::Connected {
            user, device, conn, ..
        } = e
            && run.odd_tokens.contains(&(*user, device.clone()))
        {
            problems.push(format!(
                "{user} ({device}) logged in (conn {conn}) with a token not in canonical form"
            ));
        }
    }
    for (to, key) in &run.stored {
        if !run.users.contains(to) {
            problems.push(format!(
                "{key} stored in the inbox of {to}, a user who never logged in"
            ));
        }
    }
    Verdict {
        invariant: Invariant::Refusals,
        problems,
        notes: Vec::new(),
    }
}

fn liveness(run: &RunResult) -> Verdict {
    let mut problems = Vec::new();
    let live = live_devices(&run.history);
    for (u, d) in run.intended_online.difference(&live) {
        problems.push(format!("{u} ({d}) should be online but has no connection"));
    }
    for ((k, _), f) in fates(&run.history).into_iter().filter(|(_, f)| f.probe) {
        let required = required_devices(run, f.to);
        let outcome = match (&f.send_failed, f.accepted, f.reached(&required)) {
            (Some(why), _, _) => Some(format!("could not send: {why}")),
            (None, _, true) => None,
            (None, None, false) => Some("no answer, not delivered".into()),
            (None, Some(false), false) => Some(format!("refused: {}", f.reason)),
            (None, Some(true), false) => Some("told sent, never delivered".into()),
        };
        if let Some(outcome) = outcome {
            problems.push(format!("{} -> {}: {outcome}", k.from, f.to));
        }
    }
    Verdict {
        invariant: Invariant::Liveness,
        problems,
        notes: Vec::new(),
    }
}

/// The scenario's own expectations beyond the invariants (`[expect]
/// closes` and `deliver_within`); each failure says what was missed.
///
/// A close counts when a node wrote a close frame with that code on a
/// connection of the device (seen by the wire tap, whether or not the
/// client could still read it), or the client saw one.
pub fn expectations(expect: &crate::scenario::Expect, run: &RunResult) -> Vec<String> {
    let history = &run.history;
    let mut failures = Vec::new();
    for c in &expect.closes {
        let device = c
            .device
            .as_deref()
            .unwrap_or(crate::scenario::DEFAULT_DEVICE);
        let host = crate::scenario::device_host(c.user, device);
        let seen_by_client = history.events().any(|e| {
            matches!(e, Event::Closed { user, device: d, code: Some(code), .. }
                if *user == c.user && d == device && *code == c.code)
        });
        let written = run.wire.iter().any(|w| {
            w.peer == host
                && matches!(w.frame, crate::wire::Frame::Close { code } if code == c.code)
        });
        if !seen_by_client && !written {
            failures.push(format!(
                "no connection of {} ({device}) was closed by the server with {}",
                c.user, c.code
            ));
        }
    }
    if let Some(bound) = expect.deliver_within {
        let fates = fates(history);
        let mut connected_at = BTreeMap::<(u64, String), Duration>::new();
        for r in &history.records {
            match &r.event {
                Event::Connected { user, device, .. } => {
                    connected_at.insert((*user, device.clone()), r.at);
                }
                Event::Delivered {
                    to,
                    device,
                    key,
                    text,
                    ..
                } => {
                    let Some(f) = fates.get(&(*key, text.clone())) else {
                        continue;
                    };
                    let (Some(sent), false) = (f.sent_at, f.probe) else {
                        continue;
                    };
                    let since = connected_at
                        .get(&(*to, device.clone()))
                        .map_or(sent, |c| sent.max(*c));
                    let took = r.at.saturating_sub(since);
                    if took > bound.0 {
                        failures.push(format!(
                            "{key} reached {to} ({device}) {} after it could have (bound {})",
                            crate::history::fmt_time(took),
                            humantime::format_duration(bound.0)
                        ));
                    }
                }
                _ => {}
            }
        }
    }
    failures
}

/// The faults in effect over a run, as the driver recorded them
/// ([`Event::Disturbed`]): what [`Invariant::Promptness`] calls weather.
/// An instant fault (Redis or a node restarting) is a state that lasts no
/// time; like every state, it disturbs what it touches until
/// [`CALM_AFTER`] after it ends.
struct Weather {
    /// Each state from its moment on, in time order.
    states: Vec<WeatherState>,
}

/// (since, links cut or held, hosts disturbed).
type WeatherState = (Duration, Vec<(String, String)>, Vec<String>);

/// A device's connections as its client saw them: (opened, closed, node).
type Connections = BTreeMap<(u64, String), Vec<(Duration, Option<Duration>, u64)>>;

impl Weather {
    fn of(history: &History) -> Weather {
        let states = history
            .records
            .iter()
            .filter_map(|r| match &r.event {
                Event::Disturbed { links, hosts } => Some((r.at, links.clone(), hosts.clone())),
                _ => None,
            })
            .collect();
        Weather { states }
    }

    /// The moments the weather changed.
    fn changes(&self) -> impl Iterator<Item = Duration> + '_ {
        self.states.iter().map(|(at, ..)| *at)
    }

    /// Whether `[from, to]` is calm for a path through `path`: no state in
    /// effect from [`CALM_AFTER`] before `from` until `to` touches the
    /// path (a link with both ends on it, or a host on it).
    fn calm(&self, path: &dyn Fn(&str) -> bool, from: Duration, to: Duration) -> bool {
        let since = from.saturating_sub(CALM_AFTER);
        self.states
            .iter()
            .enumerate()
            .all(|(i, (at, links, hosts))| {
                let until = self.states.get(i + 1).map_or(Duration::MAX, |s| s.0);
                // Not in effect during [since, to]: no matter.
                if until < since || *at > to {
                    return true;
                }
                !links.iter().any(|(a, b)| path(a) && path(b)) && !hosts.iter().any(|h| path(h))
            })
    }
}

/// Each device's connections as its client saw them: (opened, closed, node).
fn connections(history: &History) -> Connections {
    let mut out = Connections::new();
    let mut open = BTreeMap::<(u64, u64), ((u64, String), usize)>::new();
    for r in &history.records {
        match &r.event {
            Event::Connected {
                user,
                device,
                node,
                conn,
            } => {
                let list = out.entry((*user, device.clone())).or_default();
                // A new connection of the device ends its view of the last.
                if let Some(last) = list.last_mut()
                    && last.1.is_none()
                {
                    last.1 = Some(r.at);
                }
                list.push((r.at, None, *node));
                open.insert((*node, *conn), ((*user, device.clone()), list.len() - 1));
            }
            Event::Closed { node, conn, .. } => {
                if let Some((dev, i)) = open.remove(&(*node, *conn))
                    && let Some(c) = out.get_mut(&dev).and_then(|l| l.get_mut(i))
                {
                    c.1.get_or_insert(r.at);
                }
            }
            _ => {}
        }
    }
    out
}

/// The node of the connection `dev` had open from before `from` until
/// after `to`, if it had one.
fn connected_throughout(
    conns: &Connections,
    dev: &(u64, String),
    from: Duration,
    to: Duration,
) -> Option<u64> {
    conns.get(dev)?.iter().find_map(|&(opened, closed, node)| {
        (opened <= from && closed.is_none_or(|c| c > to)).then_some(node)
    })
}

/// Where a wait began that outlasted [`PROMPT`]: walking from `start`
/// through the moments of `progress` (other answers, other deliveries),
/// the first gap longer than [`PROMPT`] before `done` (the awaited event,
/// if it came). None: it came in time, or progress never stalled.
fn stall(start: Duration, done: Option<Duration>, progress: &[Duration]) -> Option<Duration> {
    let mut last = start;
    for &t in progress.iter().filter(|&&t| t > start) {
        if done.is_some_and(|d| t >= d) {
            break;
        }
        if t - last > PROMPT {
            return Some(last);
        }
        last = t;
    }
    match done {
        Some(d) if d - last <= PROMPT => None,
        _ => Some(last),
    }
}

/// Whether `host` is on the path of device (`user`, `device`): its own
/// host, or one of its other addresses.
fn device_on_path(host: &str, user: u64, device: &str) -> bool {
    let own = crate::scenario::device_host(user, device);
    host == own
        || host
            .strip_prefix(own.as_str())
            .is_some_and(|rest| rest.starts_with('@'))
}

/// [`Invariant::Promptness`]: judged only for the story's messages, until
/// the story's end (then the driver heals every fault at once).
fn promptness(run: &RunResult) -> Verdict {
    let mut problems = Vec::new();
    if !run.inbox {
        return Verdict {
            invariant: Invariant::Promptness,
            problems,
            notes: vec!["the seed's phases promise no delivery time".to_owned()],
        };
    }
    let history = &run.history;
    let weather = Weather::of(history);
    let conns = connections(history);
    let end = history
        .records
        .iter()
        .find(|r| matches!(&r.event, Event::Phase { name } if name == "heal"))
        .map_or(run.elapsed, |r| r.at);
    // Per sending user: every answer, and every "retry later".
    let mut answers = BTreeMap::<u64, Vec<Duration>>::new();
    let mut retries = BTreeMap::<u64, Vec<Duration>>::new();
    // Per receiving device: every delivery.
    let mut arrivals = BTreeMap::<(u64, String), Vec<Duration>>::new();
    for r in &history.records {
        match &r.event {
            Event::SendResult { key, .. } => answers.entry(key.from).or_default().push(r.at),
            Event::SendRetry { key, .. } => retries.entry(key.from).or_default().push(r.at),
            Event::Delivered { to, device, .. } => arrivals
                .entry((*to, device.clone()))
                .or_default()
                .push(r.at),
            _ => {}
        }
    }
    let none = Vec::new();
    for ((k, _), f) in fates(history) {
        let (Some(sent), false, None) = (f.sent_at, f.probe, &f.send_failed) else {
            continue;
        };
        let from = (k.from, f.device.clone());
        let Some(from_node) = connected_throughout(&conns, &from, sent, sent) else {
            continue;
        };
        // A client told "retry later" holds its sends to that recipient
        // until then (at most `retry_after_inbox_full`, 5 s).
        let hardened = im_server::config::Hardened::default();
        let retry_wait = hardened
            .retry_after_inbox_full
            .max(hardened.retry_after_unavailable);
        let waited_for_retry = |a: Duration, b: Duration| {
            retries
                .get(&k.from)
                .is_some_and(|t| t.iter().any(|&t| t + retry_wait >= a && t <= b))
        };
        // The answer.
        let sender_path = |h: &str| {
            h == "redis" || h == format!("node{from_node}") || device_on_path(h, from.0, &from.1)
        };
        if let Some(s) = stall(sent, f.answered_at, answers.get(&k.from).unwrap_or(&none)) {
            let due = s + PROMPT;
            if due <= end
                && connected_throughout(&conns, &from, sent, due) == Some(from_node)
                && weather.calm(&sender_path, sent, due)
                && !waited_for_retry(sent, due)
            {
                problems.push(format!(
                    "{k} from {} ({}) sent at {}: no answer by {} in calm weather",
                    from.0,
                    from.1,
                    crate::history::fmt_time(sent),
                    crate::history::fmt_time(due)
                ));
            }
        }
        // The deliveries.
        let (Some(true), Some(accepted)) = (f.accepted, f.answered_at) else {
            continue;
        };
        let devices: Vec<&(u64, String)> = conns.keys().filter(|(u, _)| *u == f.to).collect();
        for dev in devices {
            let Some(node) = connected_throughout(&conns, dev, accepted, accepted) else {
                continue;
            };
            let path = |h: &str| {
                sender_path(h) || h == format!("node{node}") || device_on_path(h, dev.0, &dev.1)
            };
            // (It may arrive before its sender hears "sent".)
            let arrived = f
                .deliveries
                .iter()
                .find(|(t, d)| *t >= sent && d == &dev.1)
                .map(|(t, _)| (*t).max(accepted));
            let Some(s) = stall(accepted, arrived, arrivals.get(dev).unwrap_or(&none)) else {
                continue;
            };
            let due = s + PROMPT;
            if due <= end
                && connected_throughout(&conns, dev, accepted, due) == Some(node)
                && weather.calm(&path, accepted, due)
            {
                problems.push(format!(
                    "{k} to {} ({}), told sent at {}: not there by {} in calm weather",
                    dev.0,
                    dev.1,
                    crate::history::fmt_time(accepted),
                    crate::history::fmt_time(due)
                ));
            }
        }
    }
    Verdict {
        invariant: Invariant::Promptness,
        problems,
        notes: Vec::new(),
    }
}
