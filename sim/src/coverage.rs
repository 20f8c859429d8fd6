//! Did a run reach the dangerous states? "Sometimes" assertions.
//!
//! An invariant must hold always; these states must merely be reached
//! sometimes, or the runs that pass prove nothing about them. Each is
//! recognised from outside the server, in the history and in the frames
//! the nodes wrote (see [`crate::wire`]), and counted per run. A sweep adds
//! the counts up; the default test run fails when generated runs never
//! reach one of them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use crate::history::{Event, MsgKey};
use crate::scenario::device_host;
use crate::wire::{Frame, WireRecord};
use crate::world::RunResult;

/// A named dangerous state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Sometimes {
    /// A device logged in again while its old connection was still open on
    /// the server (the seed's race: the old one's cleanup is still to come).
    ReconnectWhileOldOpen,
    /// A presence removal for a user ran while a connection of the same
    /// device that logged in earlier was still open: a late cleanup after a
    /// reconnect (the seed's phase-1/3 bug window).
    LateCleanupAfterReconnect,
    /// The server pushed a message into a connection whose path to the
    /// client was cut: a push to a half-open peer.
    PushToHalfOpenPeer,
    /// A heartbeat or Ping went out on a connection its device had already
    /// given up (dropped on its side, reconnecting or gone): a heartbeat in
    /// flight during a reconnect.
    HeartbeatDuringReconnect,
    /// Redis restarted between a message's send and its delivery.
    RedisRestartBetweenSendAndDelivery,
    /// A logged-in connection ended while its node could not reach Redis,
    /// so its cleanup could not run there.
    CleanupWhileCutFromRedis,
    /// A connection was superseded (4001) by a newer one of its device.
    Superseded,
    /// A send was refused because its recipient's backlog was full (the
    /// inbox at its limit: "retry later", never "sent").
    InboxAtLimit,
    /// Redis restarted between a send and its answer.
    SendStraddlingRedisRestart,
    /// A path's traffic was held, then released in order (a delayed close
    /// or FIN arriving late).
    HeldThenReleased,
    /// The server refused a send for good (a recipient who never logged
    /// in, a text over the limit, a reused id for another text).
    SendRefused,
}

impl Sometimes {
    pub const ALL: [Sometimes; 11] = [
        Sometimes::ReconnectWhileOldOpen,
        Sometimes::LateCleanupAfterReconnect,
        Sometimes::PushToHalfOpenPeer,
        Sometimes::HeartbeatDuringReconnect,
        Sometimes::RedisRestartBetweenSendAndDelivery,
        Sometimes::CleanupWhileCutFromRedis,
        Sometimes::Superseded,
        Sometimes::InboxAtLimit,
        Sometimes::SendStraddlingRedisRestart,
        Sometimes::HeldThenReleased,
        Sometimes::SendRefused,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Sometimes::ReconnectWhileOldOpen => "reconnect_while_old_open",
            Sometimes::LateCleanupAfterReconnect => "late_cleanup_after_reconnect",
            Sometimes::PushToHalfOpenPeer => "push_to_half_open_peer",
            Sometimes::HeartbeatDuringReconnect => "heartbeat_during_reconnect",
            Sometimes::RedisRestartBetweenSendAndDelivery => {
                "redis_restart_between_send_and_delivery"
            }
            Sometimes::CleanupWhileCutFromRedis => "cleanup_while_cut_from_redis",
            Sometimes::Superseded => "superseded",
            Sometimes::InboxAtLimit => "inbox_at_limit",
            Sometimes::SendStraddlingRedisRestart => "send_straddling_redis_restart",
            Sometimes::HeldThenReleased => "held_then_released",
            Sometimes::SendRefused => "send_refused",
        }
    }
}

impl fmt::Display for Sometimes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How often each state was reached in one run (absent: never).
pub type Reached = BTreeMap<Sometimes, u32>;

/// One server-side stream's life, from the wire log.
#[derive(Debug, Default)]
struct StreamLife {
    node: u64,
    peer: String,
    /// When the node accepted the stream.
    accepted: Duration,
    login: Option<(Duration, u64, u64)>,
    ended: Option<Duration>,
}

impl StreamLife {
    /// Open at `t`: ended after it, or at that very instant (a supersede
    /// closes the old connection in the millisecond the new login lands:
    /// the old one was open when the login was taken).
    fn open_at(&self, t: Duration) -> bool {
        self.ended.is_none_or(|end| end >= t)
    }
}

/// Counts the dangerous states `run` reached.
pub fn reached(run: &RunResult) -> Reached {
    let mut hits = Reached::new();
    let mut hit = |s: Sometimes| *hits.entry(s).or_insert(0) += 1;
    let streams = lives(&run.wire);

    for (id, s) in &streams {
        let Some((t, _, _)) = s.login else { continue };
        let older_open = streams
            .iter()
            .any(|(other, o)| other < id && o.peer == s.peer && o.login.is_some() && o.open_at(t));
        if older_open {
            hit(Sometimes::ReconnectWhileOldOpen);
        }
    }

    let dropped = dropped_by_client(&run.history.records);
    for r in &run.wire {
        let this = &streams[&r.stream];
        let given_up = || {
            this.login.is_some_and(|(_, _, conn)| {
                dropped
                    .get(&(this.peer.clone(), this.node, conn))
                    .is_some_and(|&at| at <= r.at)
            })
        };
        match r.frame {
            Frame::Deliver { .. } if r.peer_cut => hit(Sometimes::PushToHalfOpenPeer),
            Frame::Heartbeat | Frame::Ping if given_up() => {
                hit(Sometimes::HeartbeatDuringReconnect)
            }
            Frame::Ended if r.redis_cut && this.login.is_some() => {
                hit(Sometimes::CleanupWhileCutFromRedis)
            }
            Frame::Close { code } if code == im_proto::close_code::SUPERSEDED => {
                hit(Sometimes::Superseded)
            }
            _ => {}
        }
    }

    for rec in &run.history.records {
        let Event::PresenceWrite { command } = &rec.event else {
            continue;
        };
        let Some((user, removed)) = presence_removal(command) else {
            continue;
        };
        // A newer connection of a device is open while presence is removed
        // on behalf of an older one of the same device (the seed's SREM
        // names no connection: any older one of the user's counts).
        // The newer one counts from its accept: a removal that lands while
        // its login is under way is late too.
        let late = streams.iter().any(|(newer_id, newer)| {
            let Some((_, u, _)) = newer.login else {
                return false;
            };
            u == user
                && newer.accepted <= rec.at
                && newer.open_at(rec.at)
                && streams.iter().any(|(old_id, old)| {
                    old_id < newer_id
                        && old.peer == newer.peer
                        && old.login.is_some_and(|(_, ou, oconn)| {
                            ou == user
                                && removed.as_ref().is_none_or(|(node, conn, host)| {
                                    (old.node, oconn) == (*node, *conn) && &old.peer == host
                                })
                        })
                })
        });
        if late {
            hit(Sometimes::LateCleanupAfterReconnect);
        }
    }

    let mut asked: BTreeMap<MsgKey, Duration> = BTreeMap::new();
    let mut restarted: Vec<Duration> = Vec::new();
    let mut holds: BTreeSet<String> = BTreeSet::new();
    for rec in &run.history.records {
        match &rec.event {
            Event::Sent {
                key, probe: false, ..
            } => {
                asked.insert(*key, rec.at);
            }
            Event::SendRetry { reason, .. } if reason.contains("inbox is full") => {
                hit(Sometimes::InboxAtLimit)
            }
            Event::SendResult { key, accepted, .. } => {
                if !accepted {
                    hit(Sometimes::SendRefused);
                }
                if let Some(at) = asked.remove(key)
                    && restarted.iter().any(|&r| at <= r && r <= rec.at)
                {
                    hit(Sometimes::SendStraddlingRedisRestart);
                }
            }
            Event::Fault { what } if what.starts_with("redis restarts") => restarted.push(rec.at),
            Event::Fault { what } if what.starts_with("hold ") => {
                holds.insert(
                    what.split(" (")
                        .next()
                        .unwrap_or(what)
                        .replacen("hold ", "", 1),
                );
            }
            Event::Fault { what } if what.starts_with("release ") => {
                let pair = what
                    .split(" (")
                    .next()
                    .unwrap_or(what)
                    .replacen("release ", "", 1);
                if holds.remove(&pair) {
                    hit(Sometimes::HeldThenReleased);
                }
            }
            _ => {}
        }
    }

    let mut sent: BTreeMap<MsgKey, Duration> = BTreeMap::new();
    let mut restarts: Vec<Duration> = Vec::new();
    let mut counted: BTreeSet<MsgKey> = BTreeSet::new();
    for rec in &run.history.records {
        match &rec.event {
            Event::Sent {
                key, probe: false, ..
            } => {
                sent.entry(*key).or_insert(rec.at);
            }
            Event::Fault { what } if what.starts_with("redis restarts") => restarts.push(rec.at),
            Event::Delivered { key, .. } => {
                if let Some(&at) = sent.get(key)
                    && restarts.iter().any(|&r| r >= at && r <= rec.at)
                    && counted.insert(*key)
                {
                    hit(Sometimes::RedisRestartBetweenSendAndDelivery);
                }
            }
            _ => {}
        }
    }
    hits
}

/// When each connection was dropped on its client's side, keyed by the
/// device's host, the node and the server's connection id.
fn dropped_by_client(records: &[crate::history::Record]) -> BTreeMap<(String, u64, u64), Duration> {
    let mut dropped = BTreeMap::new();
    for r in records {
        if let Event::Closed {
            user,
            device,
            node,
            conn,
            ..
        } = &r.event
        {
            dropped
                .entry((device_host(*user, device), *node, *conn))
                .or_insert(r.at);
        }
    }
    dropped
}

fn lives(wire: &[WireRecord]) -> BTreeMap<u64, StreamLife> {
    let mut lives: BTreeMap<u64, StreamLife> = BTreeMap::new();
    for r in wire {
        // The device, whichever of its addresses the stream came from
        // (`user1001@cell` is `user1001` moved to another network).
        let device = r.peer.split('@').next().unwrap_or(&r.peer).to_owned();
        let life = lives.entry(r.stream).or_insert_with(|| StreamLife {
            node: r.node,
            peer: device,
            accepted: r.at,
            ..StreamLife::default()
        });
        match r.frame {
            Frame::LoginOk { user, conn } => life.login = Some((r.at, user, conn)),
            Frame::Ended => life.ended = Some(r.at),
            _ => {}
        }
    }
    lives
}

/// A lease's connection: node, connection id, device host.
type LeaseOwner = (u64, u64, String);

/// A presence write that removes a user's presence: `SREM online_users U`
/// (the seed: no connection named) or `ZREM im:{u:U}:conns MEMBER` (the
/// member names node, incarnation, connection and device).
fn presence_removal(command: &str) -> Option<(u64, Option<LeaseOwner>)> {
    let mut words = command.split_whitespace();
    match words.next()? {
        "SREM" => {
            let _key = words.next()?;
            Some((words.next()?.parse().ok()?, None))
        }
        "ZREM" => {
            let user = words
                .next()?
                .strip_prefix("im:{u:")?
                .strip_suffix("}:conns")?
                .parse()
                .ok()?;
            let mut parts = words.next()?.split('/');
            let node = parts.next()?.strip_prefix("node")?.parse().ok()?;
            let _incarnation = parts.next()?;
            let conn = parts.next()?.parse().ok()?;
            let device = parts.next()?;
            Some((user, Some((node, conn, device_host(user, device)))))
        }
        _ => None,
    }
}

/// `name ×N, ...` for reports; `none` when nothing was reached.
pub fn summary(hits: &Reached) -> String {
    if hits.is_empty() {
        return "none".to_owned();
    }
    hits.iter()
        .map(|(s, n)| format!("{s} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_removals_name_the_user_and_for_leases_the_connection() {
        assert_eq!(
            presence_removal("SREM online_users 1001"),
            Some((1001, None))
        );
        assert_eq!(
            presence_removal("ZREM im:{u:1002}:conns node2/1700000000000/7/tablet"),
            Some((1002, Some((2, 7, "user1002-tablet".to_owned()))))
        );
        assert_eq!(presence_removal("SADD online_users 1001"), None);
        assert_eq!(presence_removal("ZADD im:{u:1}:conns 5 x"), None);
    }
}
