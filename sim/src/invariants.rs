//! Checkers: each reads the recorded [`History`] and Redis's final state,
//! never the server's internals, and returns a [`Verdict`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

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
}

impl Invariant {
    pub const ALL: [Invariant; 4] = [
        Invariant::Delivery,
        Invariant::NoFalseSuccess,
        Invariant::Presence,
        Invariant::Liveness,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Invariant::Delivery => "delivery",
            Invariant::NoFalseSuccess => "no_false_success",
            Invariant::Presence => "presence",
            Invariant::Liveness => "liveness",
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

/// What the history says about each message.
#[derive(Clone, Debug, Default)]
pub struct MessageFate {
    pub key: Option<MsgKey>,
    pub to: u64,
    pub text: String,
    pub probe: bool,
    pub sent_at: Option<std::time::Duration>,
    /// Could not be handed to a connection at all.
    pub send_failed: Option<String>,
    /// The server's answer: Some(true) accepted, Some(false) refused.
    pub accepted: Option<bool>,
    pub reason: String,
    /// When, and on which of the recipient's devices, it arrived.
    pub deliveries: Vec<(std::time::Duration, String)>,
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

/// Every message the story or the probes sent, in key order.
pub fn fates(history: &History) -> BTreeMap<MsgKey, MessageFate> {
    let mut fates = BTreeMap::<MsgKey, MessageFate>::new();
    for r in &history.records {
        match &r.event {
            Event::Sent {
                key,
                to,
                text,
                probe,
            } => {
                let f = fates.entry(*key).or_default();
                f.key = Some(*key);
                f.to = *to;
                f.text = text.clone();
                f.probe = *probe;
                f.sent_at = Some(r.at);
            }
            Event::SendFailed {
                key,
                to,
                text,
                reason,
                probe,
            } => {
                let f = fates.entry(*key).or_default();
                f.key = Some(*key);
                f.to = *to;
                f.text = text.clone();
                f.probe = *probe;
                f.sent_at.get_or_insert(r.at);
                f.send_failed = Some(reason.clone());
            }
            Event::SendResult {
                key,
                accepted,
                reason,
            } => {
                let f = fates.entry(*key).or_default();
                f.accepted = Some(*accepted);
                f.reason = reason.clone();
            }
            Event::Delivered { key, device, .. } => {
                fates
                    .entry(*key)
                    .or_default()
                    .deliveries
                    .push((r.at, device.clone()));
            }
            _ => {}
        }
    }
    fates
}

/// Runs every checker.
pub fn check(run: &RunResult) -> Vec<Verdict> {
    vec![
        delivery(&run.history, &run.stored_twice),
        no_false_success(run),
        presence(run),
        liveness(run),
    ]
}

fn delivery(history: &History, stored_twice: &BTreeSet<(u64, MsgKey)>) -> Verdict {
    // Stored twice is delivered twice to any device that resumes from
    // before both copies (client-side dedup only hides it from some).
    let mut problems: Vec<String> = stored_twice
        .iter()
        .map(|(to, k)| format!("{k} stored twice in {to}'s inbox"))
        .collect();
    let sent: BTreeMap<MsgKey, u64> = history
        .events()
        .filter_map(|e| match e {
            Event::Sent { key, to, .. } => Some((*key, *to)),
            _ => None,
        })
        .collect();
    let mut seen = BTreeSet::new();
    let mut last_per_pair = BTreeMap::<(u64, u64, String), u64>::new();
    // The newest connection of each device: a delivery on an older one
    // went to a superseded connection.
    let mut newest = BTreeMap::<(u64, String), u64>::new();
    for e in history.events() {
        if let Event::Connected {
            user, device, conn, ..
        } = e
        {
            newest.insert((*user, device.clone()), *conn);
        }
        if let Event::Delivered {
            to,
            device,
            conn,
            key,
            ..
        } = e
            && newest
                .get(&(*to, device.clone()))
                .is_some_and(|n| n != conn)
        {
            problems.push(format!(
                "{key} delivered to {to} ({device}) on superseded connection {conn}"
            ));
        }
        let Event::Delivered {
            to, key, device, ..
        } = e
        else {
            continue;
        };
        match sent.get(key) {
            None => problems.push(format!("{key} delivered to {to} but never sent")),
            Some(dest) if dest != to => {
                problems.push(format!("{key} for {dest} delivered to {to}"))
            }
            Some(_) => {}
        }
        if !seen.insert((*key, *to, device.clone())) {
            problems.push(format!("{key} delivered to {to} ({device}) more than once"));
        }
        let last = last_per_pair
            .entry((key.from, *to, device.clone()))
            .or_insert(0);
        if key.id < *last {
            problems.push(format!(
                "{key} delivered to {to} after #{} (out of order)",
                *last
            ));
        }
        *last = (*last).max(key.id);
    }
    Verdict {
        invariant: Invariant::Delivery,
        problems,
        notes: Vec::new(),
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

/// Messages a data-losing Redis restart took: accepted before it and not
/// delivered anywhere by then. Our store is Redis; a Redis that keeps
/// nothing on disk and restarts loses them, which no server design can
/// undo. The fault model therefore assumes a durable store (Redis with
/// AOF or a replica); these are exempt from `no_false_success` and listed
/// in its notes.
fn lost_with_redis(history: &History) -> BTreeSet<MsgKey> {
    let mut accepted = BTreeSet::new();
    let mut delivered = BTreeSet::new();
    let mut lost = BTreeSet::new();
    for e in history.events() {
        match e {
            Event::SendResult {
                key,
                accepted: true,
                ..
            } => {
                accepted.insert(*key);
            }
            Event::Delivered { key, .. } => {
                delivered.insert(*key);
            }
            Event::Fault { what } if what == "redis restarts empty" => {
                lost.extend(accepted.difference(&delivered).copied());
            }
            _ => {}
        }
    }
    lost
}

fn no_false_success(run: &RunResult) -> Verdict {
    // "Sent" must mean it arrives: on every device of the recipient that
    // the story leaves online. For a recipient the story leaves offline it
    // must have arrived somewhere, or still wait in its stored inbox (the
    // hardened profile's "sent" is "stored").
    let lost = lost_with_redis(&run.history);
    let mut notes = Vec::new();
    let problems = fates(&run.history)
        .into_iter()
        .filter(|(k, f)| {
            let required = required_devices(run, f.to);
            let waiting = required.is_empty() && run.stored.contains(&(f.to, *k));
            !f.probe && f.accepted == Some(true) && !f.reached(&required) && !waiting
        })
        .filter(|(k, f)| {
            let exempt = lost.contains(k);
            if exempt {
                notes.push(format!(
                    "{k} to {} told sent, then lost with Redis's data (an empty restart; the store must be durable)",
                    f.to
                ));
            }
            !exempt
        })
        .map(|(k, f)| format!("{k} to {} told sent, never delivered", f.to))
        .collect();
    Verdict {
        invariant: Invariant::NoFalseSuccess,
        problems,
        notes,
    }
}

/// Devices whose latest connection is still open, as their clients see it.
pub fn live_devices(history: &History) -> BTreeSet<(u64, String)> {
    let mut live = BTreeMap::<(u64, String), u64>::new();
    for e in history.events() {
        match e {
            Event::Connected {
                user, device, conn, ..
            } => {
                live.insert((*user, device.clone()), *conn);
            }
            Event::Closed {
                user, device, conn, ..
            } => {
                let dev = (*user, device.clone());
                if live.get(&dev) == Some(conn) {
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
    Verdict {
        invariant: Invariant::Presence,
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
    for (k, f) in fates(&run.history).into_iter().filter(|(_, f)| f.probe) {
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
