//! The recorded events of one run, in simulated time.
//!
//! Everything a checker may use is here: what clients did and saw, what
//! the simulated Redis executed, and which faults the driver injected.
//! Checkers never look inside the server.

use std::fmt;
use std::time::Duration;

/// A message, named end to end: the sender and its client-chosen id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MsgKey {
    pub from: u64,
    pub id: u64,
}

impl fmt::Display for MsgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.from, self.id)
    }
}

/// One thing that happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A client connected and logged in (`conn` is the server's id).
    Connected {
        user: u64,
        device: String,
        node: u64,
        conn: u64,
    },
    /// A client could not connect or log in.
    ConnectFailed {
        user: u64,
        device: String,
        node: u64,
        error: String,
    },
    /// A client's connection ended, as the client saw it; `code` is the
    /// server's close code when the server closed it with a close frame.
    Closed {
        user: u64,
        device: String,
        /// The node the connection was on: `conn` numbers are per node.
        node: u64,
        conn: u64,
        cause: String,
        code: Option<u16>,
    },
    /// A client handed a message to its connection (`probe`: sent by the
    /// liveness phase, not by the story); `device` is the sender's device.
    Sent {
        key: MsgKey,
        device: String,
        to: u64,
        text: String,
        probe: bool,
    },
    /// A client could not even hand a message over (not connected).
    SendFailed {
        key: MsgKey,
        to: u64,
        text: String,
        reason: String,
        probe: bool,
    },
    /// The server's answer to a sender.
    SendResult {
        key: MsgKey,
        accepted: bool,
        reason: String,
    },
    /// The server refused a send for now; the client sends it again later.
    SendRetry { key: MsgKey, reason: String },
    /// A recipient's client received a message.
    Delivered {
        to: u64,
        device: String,
        /// The node of the connection it arrived on (`conn` is per node).
        node: u64,
        conn: u64,
        key: MsgKey,
        text: String,
    },
    /// The server sent an Error envelope to a client.
    ServerError {
        user: u64,
        device: String,
        code: i32,
        detail: String,
    },
    /// The simulated Redis executed a write to presence.
    PresenceWrite { command: String },
    /// The simulated Redis inserted a message into `to`'s inbox (the
    /// store script's ZADD, seen in its command log).
    Stored { to: u64, key: MsgKey },
    /// The driver injected (or healed) a fault.
    Fault { what: String },
    /// The faults in effect changed (recorded by the driver after each
    /// step): links cut or held, and hosts down, drained, slow (Redis) or
    /// not reading (a device). Empty lists: nothing is disturbed.
    Disturbed {
        links: Vec<(String, String)>,
        hosts: Vec<String>,
    },
    /// A phase of the run began (story, heal, liveness, end).
    Phase { name: String },
}

/// An event with its simulated time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub at: Duration,
    pub event: Event,
}

/// The whole run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    pub records: Vec<Record>,
}

impl History {
    pub fn push(&mut self, at: Duration, event: Event) {
        self.records.push(Record { at, event });
    }

    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.records.iter().map(|r| &r.event)
    }
}

/// `12.345s`: simulated milliseconds, fixed width for tables.
pub fn fmt_time(at: Duration) -> String {
    format!("{}.{:03}s", at.as_secs(), at.subsec_millis())
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Connected {
                user,
                device,
                node,
                conn,
            } => write!(
                f,
                "{} connected to node{node} (conn {conn})",
                who(*user, device)
            ),
            Event::ConnectFailed {
                user,
                device,
                node,
                error,
            } => write!(
                f,
                "{} could not connect to node{node}: {error}",
                who(*user, device)
            ),
            Event::Closed {
                user,
                device,
                conn,
                cause,
                ..
            } => write!(f, "{} conn {conn} closed: {cause}", who(*user, device)),
            Event::Sent {
                key,
                device,
                to,
                text,
                probe,
            } => {
                let p = if *probe { " (probe)" } else { "" };
                write!(
                    f,
                    "{} sends {key} to {to}: {text:?}{p}",
                    who(key.from, device)
                )
            }
            Event::SendRetry { key, reason } => {
                write!(f, "user{} told to retry {key} later: {reason}", key.from)
            }
            Event::SendFailed {
                key, to, reason, ..
            } => write!(f, "user{} cannot send {key} to {to}: {reason}", key.from),
            Event::SendResult {
                key,
                accepted: true,
                ..
            } => write!(f, "user{} told {key} sent", key.from),
            Event::SendResult {
                key,
                accepted: false,
                reason,
            } => write!(f, "user{} told {key} refused: {reason}", key.from),
            Event::Delivered {
                to,
                device,
                conn,
                key,
                text,
                ..
            } => write!(
                f,
                "{} (conn {conn}) received {key}: {text:?}",
                who(*to, device)
            ),
            Event::ServerError {
                user,
                device,
                code,
                detail,
            } => write!(
                f,
                "{} got server error {code}: {detail}",
                who(*user, device)
            ),
            Event::PresenceWrite { command } => write!(f, "redis: {command}"),
            Event::Stored { to, key } => write!(f, "redis: {key} stored in {to}'s inbox"),
            Event::Fault { what } => write!(f, "fault: {what}"),
            Event::Disturbed { links, hosts } => {
                let links: Vec<String> =
                    links.iter().map(|(a, b)| format!("{a} <-> {b}")).collect();
                write!(
                    f,
                    "in effect: links [{}], hosts [{}]",
                    links.join(", "),
                    hosts.join(", ")
                )
            }
            Event::Phase { name } => write!(f, "-- {name} --"),
        }
    }
}

/// `user1001` for a user's default device, `user1001/tablet` otherwise.
fn who(user: u64, device: &str) -> String {
    if device == crate::scenario::DEFAULT_DEVICE {
        format!("user{user}")
    } else {
        format!("user{user}/{device}")
    }
}
