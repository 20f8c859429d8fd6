//! Generated runs: proptest strategies that produce whole scenarios, in the
//! same types the scenario files use, and the way back to a file.
//!
//! A run is two or three users on one to three nodes, all connected at
//! the start, then a list of [`Op`]s: sends and bursts, disconnects,
//! vanishes, power-offs, reconnects (to any node, or from another network
//! address), a second device logging in mid-story, careless client message
//! ids (0, or reused), stalled readers, held-then-released paths, node
//! crashes, restarts and drains, nodes cut from Redis, Redis restarts with
//! or without its data, and a slow Redis. Some ops aim at a dangerous
//! window directly (a send to a peer that just vanished, a leave while
//! the node is cut from Redis, a close held while the device comes back
//! from elsewhere, a send straddling a Redis restart, a flood past the
//! inbox backlog to a reader that is away, an id reused for another text,
//! a reader stalled while it sends, a device that comes back and leaves at
//! once, a send just after Redis restarts, a login and a logout crossing
//! on a slow Redis, a slow login given up for another node, a login held
//! in the network, a supersede whose doorbell cannot reach the old node,
//! a lease refresh stalled past the command timeout as the user leaves).
//! A quarter of the plans run on a narrow network window (a slow mobile
//! link). Waits are biased toward the
//! dangerous windows: right after another event (a few ms), around the
//! heartbeat interval (10 s), the heartbeat timeout (25 s) and the phase
//! profiles' read idle timeout (set to 10 s here). [`compile`] turns the ops into a valid
//! [`Scenario`], skipping ops that make no sense in the state reached
//! (reconnecting a connected user, restarting a running node), so every
//! generated and every shrunk value is a runnable story.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use im_client::ClientProfile;
use im_server::Profile;
use proptest::prelude::*;

use crate::scenario::{
    Action, DEFAULT_DEVICE, Dur, Expect, Network, Scenario, TimedStep, Timeouts, TokenForm,
};

/// Users of generated runs: 1001, 1002, ...
pub const FIRST_USER: u64 = 1001;

/// The other network address a generated user may reconnect from.
pub const OTHER_ADDRESS: &str = "cell";

/// The device a generated user may log in on mid-story.
pub const SECOND_DEVICE: &str = "laptop";

/// One thing that happens in a generated run (users and nodes by index).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Wait {
        ms: u64,
    },
    Send {
        from: usize,
        to: usize,
    },
    Disconnect {
        user: usize,
    },
    Vanish {
        user: usize,
    },
    PowerOff {
        user: usize,
    },
    Reconnect {
        user: usize,
        node: u64,
    },
    PartitionRedis {
        node: u64,
    },
    HealRedis {
        node: u64,
    },
    Crash {
        node: u64,
    },
    Restart {
        node: u64,
    },
    RedisRestart {
        keep_data: bool,
    },
    /// Every Redis reply delayed this long (0: normal again).
    RedisSlow {
        ms: u64,
    },
    /// A burst of `count` messages at once.
    Burst {
        from: usize,
        to: usize,
        count: u64,
    },
    StopReading {
        user: usize,
    },
    ResumeReading {
        user: usize,
    },
    /// The path between `user` and its node holds its traffic (delayed,
    /// not dropped) until released.
    Hold {
        user: usize,
    },
    Release {
        user: usize,
    },
    /// A node drains (SIGTERM): its clients are told to go elsewhere.
    Drain {
        node: u64,
    },
    /// A careless client: `from` sends with an explicit client message id
    /// (0, or a small one its counter may have used for another text).
    SendWithId {
        from: usize,
        to: usize,
        id: u64,
        /// Which of the texts this careless client sends with `id`.
        variant: u8,
    },

    /// `user` logs in on a second device mid-story.
    SecondDevice {
        user: usize,
        node: u64,
    },
    /// A dangerous window, aimed at: `user` vanishes and, `ms` later,
    /// `from` sends to it (a push to a half-open peer).
    SendToVanished {
        user: usize,
        from: usize,
        ms: u64,
    },
    /// A dangerous window, aimed at: the node `user` is on is cut from
    /// Redis and, `ms` later, `user` leaves (a cleanup that cannot reach
    /// Redis).
    LeaveWhileCut {
        user: usize,
        ms: u64,
    },
    /// Cuts the node `user` is on from Redis.
    PartitionRedisUnder {
        user: usize,
    },
    /// `user` reconnects to its node from its other network address
    /// ([`OTHER_ADDRESS`]).
    ReconnectElsewhere {
        user: usize,
    },
    /// A dangerous window, aimed at: the path of `user` holds its traffic,
    /// `user` leaves and comes back from another address (the held path
    /// would hold its new connection too), and `ms` later the held traffic
    /// (the old close) is delivered: a late cleanup after a reconnect.
    HoldThenRelease {
        user: usize,
        ms: u64,
    },
    /// A dangerous window, aimed at: `from` sends to `to`, and `ms` later
    /// Redis restarts (with its data or not) before the answer.
    SendAcrossRestart {
        from: usize,
        to: usize,
        ms: u64,
        keep_data: bool,
    },
    /// A dangerous window, aimed at: `to` leaves and `from` sends it more
    /// than the inbox backlog holds.
    FloodAwayReader {
        from: usize,
        to: usize,
    },
    /// `user` logs in on [`ODD_TOKEN_DEVICE`] with its token written in
    /// another form (a buggy app): the hardened server must refuse it.
    OddLogin {
        user: usize,
        node: u64,
        form: TokenForm,
    },
    /// `from` sends to [`STRANGER`], a user who never logs in (a typo, a
    /// deleted account, a scraper): the hardened server must refuse it.
    SendToStranger {
        from: usize,
    },
    /// `from` sends `to` a text of `bytes` bytes, around the hardened text
    /// limit: at most the limit is stored, above it refused.
    SendLong {
        from: usize,
        to: usize,
        bytes: usize,
    },
    /// `user` logs in on its second device on the node it is on.
    SecondDeviceHere {
        user: usize,
    },
    /// A dangerous window, aimed at: `from` reuses client message id `id`
    /// for another text `ms` after using it (a restarted counter).
    ReuseId {
        from: usize,
        to: usize,
        id: u64,
        ms: u64,
    },
    /// A dangerous window, aimed at: `user` stops reading while `from`
    /// floods it past the network window and its outbound queue, sends
    /// during the stall (its answer must wait for room, not vanish), reads
    /// again, and sends more.
    StallFloodReply {
        user: usize,
        from: usize,
    },
    /// A dangerous window, aimed at: `user`'s network drops, it comes back
    /// (to `node`) `gap_ms` later and logs out `stay_ms` after that; the
    /// half-open old connection must not keep it online.
    ComeBackAndLeave {
        user: usize,
        node: u64,
        gap_ms: u64,
        stay_ms: u64,
    },
    /// A dangerous window, aimed at: Redis restarts with its data and,
    /// `ms` later, with no fault left, `from` sends to `to` (a node must
    /// hear its doorbells again without waiting for its own next command).
    SendAfterRestart {
        from: usize,
        to: usize,
        ms: u64,
    },
    /// A dangerous window, aimed at: with Redis slow, `user` logs in on
    /// its second device where its phone is, and the phone logs out `ms`
    /// later (their subscription changes cross); then, calm again, `from`
    /// sends to `user`.
    LoginLogoutCross {
        user: usize,
        from: usize,
        ms: u64,
    },
    /// A dangerous window, aimed at: with Redis slow, `user`'s second
    /// device starts a login on node `a` and gives up on it `ms` later for
    /// the node its phone is on (which hears the user's doorbell): a stale
    /// supersede from `a` must not close the newer connection.
    AbandonSlowLogin {
        user: usize,
        a: u64,
        ms: u64,
    },
    /// A dangerous window, aimed at: `user`'s second device starts its
    /// first login, its path starts holding traffic `ms` later with the
    /// login on its way, the app gives up and connects from its other
    /// address; `release_ms` later the stale login arrives (it must not
    /// take over from the newer connection).
    HeldLogin {
        user: usize,
        ms: u64,
        release_ms: u64,
    },
    /// Heals every node's cut from Redis.
    HealRedisEverywhere,
    /// A dangerous window, aimed at: `user`'s node is cut from Redis when
    /// `user` vanishes and comes back on `node`; the supersede's doorbell
    /// cannot reach the old node, and the cut heals `ms` later (the old
    /// connection must still go, at its next lease refresh).
    LostSupersede {
        user: usize,
        node: u64,
        ms: u64,
    },
    /// A dangerous window, aimed at: just before `user`'s heartbeat, Redis
    /// slows past the command timeout while `from` sends to `user`; then
    /// Redis is fast again and `user` logs out (a late lease refresh must
    /// not bring its lease back).
    LeaveAsRefreshStalls {
        user: usize,
        from: usize,
    },
}

/// The device that writes its login token in a non-canonical form.
pub const ODD_TOKEN_DEVICE: &str = "tablet";

/// The recipient no generated user is: it never logs in.
pub const STRANGER: u64 = 9_999;

/// A text of exactly `bytes` bytes, saying its own size.
pub fn long_text(bytes: usize) -> String {
    let head = format!("{bytes} bytes ");
    padded(&head[..head.len().min(bytes)], bytes)
}

/// `head` padded with '.' to exactly `bytes` bytes (`head` fits).
pub fn padded(head: &str, bytes: usize) -> String {
    let mut text = head.to_owned();
    text.extend(std::iter::repeat_n('.', bytes.saturating_sub(head.len())));
    text
}

impl Op {
    /// The plain ops a dangerous-window op stands for (itself otherwise).
    fn expand(&self) -> Vec<Op> {
        match *self {
            Op::SendToVanished { user, from, ms } => vec![
                Op::Vanish { user },
                Op::Wait { ms },
                Op::Send { from, to: user },
            ],
            Op::LeaveWhileCut { user, ms } => vec![
                Op::PartitionRedisUnder { user },
                Op::Wait { ms },
                Op::Disconnect { user },
            ],
            Op::HoldThenRelease { user, ms } => vec![
                Op::Hold { user },
                Op::Disconnect { user },
                Op::Wait { ms: 5 },
                Op::ReconnectElsewhere { user },
                Op::Wait { ms },
                Op::Release { user },
            ],
            Op::SendAcrossRestart {
                from,
                to,
                ms,
                keep_data,
            } => vec![
                Op::Send { from, to },
                Op::Wait { ms },
                Op::RedisRestart { keep_data },
            ],
            Op::FloodAwayReader { from, to } => vec![
                Op::Disconnect { user: to },
                Op::Burst {
                    from,
                    to,
                    count: FLOOD_COUNT,
                },
            ],
            Op::ReuseId { from, to, id, ms } => vec![
                Op::SendWithId {
                    from,
                    to,
                    id,
                    variant: 0,
                },
                Op::Wait { ms },
                Op::SendWithId {
                    from,
                    to,
                    id,
                    variant: 1,
                },
            ],
            Op::StallFloodReply { user, from } => vec![
                Op::StopReading { user },
                Op::Burst {
                    from,
                    to: user,
                    count: STALL_FLOOD,
                },
                Op::Wait { ms: 2_000 },
                Op::Send {
                    from: user,
                    to: from,
                },
                Op::Wait { ms: 3_000 },
                Op::ResumeReading { user },
                Op::Wait { ms: 1_500 },
                Op::Burst {
                    from: user,
                    to: from,
                    count: 3,
                },
            ],
            Op::ComeBackAndLeave {
                user,
                node,
                gap_ms,
                stay_ms,
            } => vec![
                Op::Vanish { user },
                Op::Wait { ms: gap_ms },
                Op::Reconnect { user, node },
                Op::Wait { ms: stay_ms },
                Op::Disconnect { user },
            ],
            Op::LostSupersede { user, node, ms } => vec![
                Op::PartitionRedisUnder { user },
                Op::Vanish { user },
                Op::Wait { ms: 100 },
                Op::Reconnect { user, node },
                Op::Wait { ms },
                Op::HealRedisEverywhere,
            ],
            Op::SendAfterRestart { from, to, ms } => vec![
                Op::RedisRestart { keep_data: true },
                Op::Wait { ms },
                Op::Send { from, to },
            ],
            Op::LoginLogoutCross { user, from, ms } => vec![
                Op::RedisSlow { ms: 200 },
                Op::SecondDeviceHere { user },
                Op::Wait { ms },
                Op::Disconnect { user },
                Op::Wait { ms: 2_000 },
                Op::RedisSlow { ms: 0 },
                Op::Wait { ms: 1_500 },
                Op::Send { from, to: user },
            ],

            ref other => vec![other.clone()],
        }
    }
}

/// Time for the first logins before a generated story's ops begin.
const LOGIN_SETTLE: Duration = Duration::from_millis(200);

/// A flood's size: a little more than the inbox backlog (1,000).
const FLOOD_COUNT: u64 = 1_050;

/// A flood at a stalled reader: past a narrow network window (64
/// segments) and the server's outbound queue (256 frames).
const STALL_FLOOD: u64 = 400;

/// The network window of a plan with a narrow one (a slow mobile link).
const NARROW_WINDOW: usize = 64;

/// A whole generated run before it becomes a scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub seed: u64,
    pub users: usize,
    pub nodes: u64,
    /// A narrow network window ([`NARROW_WINDOW`] segments, a slow mobile
    /// link): a stalled reader backs up into the server's queue sooner.
    pub narrow: bool,
    pub ops: Vec<Op>,
}

fn wait_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0..40u64,
        2 => 40..2_000u64,
        2 => 9_500..10_500u64,
        1 => 24_000..26_000u64,
    ]
}

/// Text sizes at and around the hardened limit, and well over it.
fn text_bytes() -> impl Strategy<Value = usize> {
    let max = im_server::config::Hardened::default().text_bytes_max;
    prop_oneof![
        3 => (max - 1)..=(max + 1),
        1 => (max + 2)..=(max * 4),
    ]
}

fn op(users: usize, nodes: u64) -> impl Strategy<Value = Op> {
    let user = 0..users;
    let node = 1..=nodes;
    // The newer faults (a slow Redis, bursts, stalled readers) weigh
    // half as much as the older ones, so that the older dangerous states
    // (a push to a half-open peer above all) stay as reachable as before.
    prop_oneof![
        8 => wait_ms().prop_map(|ms| Op::Wait { ms }),
        12 => (user.clone(), user.clone()).prop_map(|(from, to)| Op::Send { from, to }),
        2 => user.clone().prop_map(|user| Op::Disconnect { user }),
        5 => user.clone().prop_map(|user| Op::Vanish { user }),
        2 => user.clone().prop_map(|user| Op::PowerOff { user }),
        6 => (user.clone(), node.clone()).prop_map(|(user, node)| Op::Reconnect { user, node }),
        2 => node.clone().prop_map(|node| Op::PartitionRedis { node }),
        2 => node.clone().prop_map(|node| Op::HealRedis { node }),
        2 => node.clone().prop_map(|node| Op::Crash { node }),
        2 => node.clone().prop_map(|node| Op::Restart { node }),
        2 => any::<bool>().prop_map(|keep_data| Op::RedisRestart { keep_data }),
        1 => prop_oneof![Just(0u64), 20..480u64].prop_map(|ms| Op::RedisSlow { ms }),
        1 => (user.clone(), user.clone(), 20..400u64)
            .prop_map(|(from, to, count)| Op::Burst { from, to, count }),
        1 => user.clone().prop_map(|user| Op::StopReading { user }),
        1 => user.clone().prop_map(|user| Op::ResumeReading { user }),
        2 => (user.clone(), user.clone(), 0..40u64)
            .prop_map(|(user, from, ms)| Op::SendToVanished { user, from, ms }),
        1 => user.clone().prop_map(|user| Op::Hold { user }),
        1 => user.clone().prop_map(|user| Op::Release { user }),
        1 => node.clone().prop_map(|node| Op::Drain { node }),
        1 => (user.clone(), user.clone(), 0..4u64, 0..2u8)
            .prop_map(|(from, to, id, variant)| Op::SendWithId { from, to, id, variant }),
        1 => (user.clone(), user.clone(), 0..4u64, 0..300u64)
            .prop_map(|(from, to, id, ms)| Op::ReuseId { from, to, id, ms }),
        1 => (user.clone(), user.clone()).prop_map(|(user, from)| Op::StallFloodReply { user, from }),
        2 => (user.clone(), node.clone(), 0..2_000u64, 0..3_000u64).prop_map(
            |(user, node, gap_ms, stay_ms)| Op::ComeBackAndLeave { user, node, gap_ms, stay_ms }
        ),
        1 => (user.clone(), user.clone(), 1_000..4_000u64)
            .prop_map(|(from, to, ms)| Op::SendAfterRestart { from, to, ms }),
        1 => (user.clone(), user.clone(), 10..150u64)
            .prop_map(|(user, from, ms)| Op::LoginLogoutCross { user, from, ms }),
        1 => (user.clone(), node.clone(), 100..450u64)
            .prop_map(|(user, a, ms)| Op::AbandonSlowLogin { user, a, ms }),
        1 => (user.clone(), 0..10u64, 200..1_500u64)
            .prop_map(|(user, ms, release_ms)| Op::HeldLogin { user, ms, release_ms }),
        1 => (user.clone(), user.clone()).prop_map(|(user, from)| Op::LeaveAsRefreshStalls { user, from }),
        1 => (user.clone(), node.clone(), 500..4_000u64)
            .prop_map(|(user, node, ms)| Op::LostSupersede { user, node, ms }),
        1 => (user.clone(), node.clone()).prop_map(|(user, node)| Op::SecondDevice { user, node }),
        2 => (user.clone(), 0..1_500u64).prop_map(|(user, ms)| Op::HoldThenRelease { user, ms }),
        2 => (user.clone(), user.clone(), 0..20u64, any::<bool>()).prop_map(
            |(from, to, ms, keep_data)| Op::SendAcrossRestart { from, to, ms, keep_data }
        ),
        2 => (user.clone(), user.clone()).prop_map(|(from, to)| Op::FloodAwayReader { from, to }),
        2 => (user.clone(), 0..40u64).prop_map(|(user, ms)| Op::LeaveWhileCut { user, ms }),
        1 => user.clone().prop_map(|from| Op::SendToStranger { from }),
        1 => (user.clone(), node.clone(), prop_oneof![
            Just(TokenForm::UppercaseSignature),
            Just(TokenForm::PlusSign),
            Just(TokenForm::LeadingZeros),
        ])
            .prop_map(|(user, node, form)| Op::OddLogin { user, node, form }),
        1 => (user.clone(), user, text_bytes()).prop_map(|(from, to, bytes)| Op::SendLong { from, to, bytes }),
    ]
}

/// Plans of 2-3 users on 1-3 nodes with up to `ops_max` ops.
pub fn plans(ops_max: usize) -> impl Strategy<Value = Plan> {
    (
        0..1_000u64,
        2..=3usize,
        1..=3u64,
        proptest::bool::weighted(0.25),
    )
        .prop_flat_map(move |(seed, users, nodes, narrow)| {
            proptest::collection::vec(op(users, nodes), 1..=ops_max).prop_map(move |ops| Plan {
                seed,
                users,
                nodes,
                narrow,
                ops,
            })
        })
}

/// Turns a plan into a runnable scenario for `profile`; ops that do not
/// fit the state reached are skipped.
pub fn compile(name: &str, profile: Profile, plan: &Plan) -> Scenario {
    let user_id = |i: usize| FIRST_USER + i as u64;
    let mut steps = Vec::new();
    let mut now = Duration::ZERO;
    let mut connected = vec![true; plan.users];
    let mut off = vec![false; plan.users];
    let mut crashed = vec![false; plan.nodes as usize + 1];
    let mut cut_from_redis = vec![false; plan.nodes as usize + 1];
    let mut clients = BTreeMap::new();
    let mut devices = Vec::new();
    // The node each user last connected to.
    let mut home: Vec<u64> = (0..plan.users)
        .map(|i| 1 + (i as u64 % plan.nodes))
        .collect();
    // The node whose path to each user holds its traffic, if one does.
    let mut held: Vec<Option<u64>> = vec![None; plan.users];
    let mut second = vec![false; plan.users];
    // When each user's phone last logged in (its heartbeats follow).
    let mut logged_in = vec![Duration::ZERO; plan.users];
    // Whether a user's held path is its other address's (it reconnected
    // from there); holds name the device's own path.
    let mut elsewhere = vec![false; plan.users];
    let mut addresses: BTreeMap<(u64, String), std::collections::BTreeSet<String>> =
        BTreeMap::new();
    let mut tokens = BTreeMap::new();
    for (i, &node) in home.iter().enumerate() {
        clients.insert(user_id(i), ClientProfile::Compliant);
        devices.push((user_id(i), DEFAULT_DEVICE.to_owned()));
        steps.push(TimedStep {
            at: now,
            action: Action::Connect {
                user: user_id(i),
                device: DEFAULT_DEVICE.into(),
                node,
                via: None,
            },
        });
    }
    // The story proper starts once everyone is logged in: a fault aimed at
    // a connection (a vanish, a held path) needs one to be there.
    now += LOGIN_SETTLE;
    // Presence converges within a lease (30 s): a cleanup that could not
    // reach Redis (crash, cut from Redis, Redis restarting) is undone by
    // expiry, so such runs settle longer than a lease before judging.
    let mut lease_wait = false;
    for op in plan.ops.iter().flat_map(Op::expand) {
        let action = match op {
            Op::Wait { ms } => {
                now += Duration::from_millis(ms);
                continue;
            }
            Op::Send { from, to } if connected[from] && from != to => Action::Send {
                from: user_id(from),
                device: DEFAULT_DEVICE.into(),
                to: user_id(to),
                text: None,
                count: 1,
                id: None,
            },
            Op::Disconnect { user } if connected[user] => {
                connected[user] = false;
                Action::Disconnect {
                    user: user_id(user),
                    device: DEFAULT_DEVICE.into(),
                }
            }
            Op::Vanish { user } if connected[user] => {
                connected[user] = false;
                Action::Vanish {
                    user: user_id(user),
                    device: DEFAULT_DEVICE.into(),
                }
            }
            Op::PowerOff { user } if connected[user] => {
                connected[user] = false;
                off[user] = true;
                lease_wait = true;
                Action::PowerOff {
                    user: user_id(user),
                    device: DEFAULT_DEVICE.into(),
                }
            }
            Op::ReconnectElsewhere { user } => {
                let node = home[user];
                if connected[user] || off[user] || crashed[node as usize] {
                    continue;
                }
                connected[user] = true;
                logged_in[user] = now;
                elsewhere[user] = true;
                addresses
                    .entry((user_id(user), DEFAULT_DEVICE.to_owned()))
                    .or_default()
                    .insert(OTHER_ADDRESS.to_owned());
                Action::Reconnect {
                    user: user_id(user),
                    device: DEFAULT_DEVICE.into(),
                    node: Some(node),
                    via: Some(OTHER_ADDRESS.into()),
                }
            }
            Op::Reconnect { user, node }
                if !connected[user] && !off[user] && !crashed[node as usize] =>
            {
                connected[user] = true;
                logged_in[user] = now;
                home[user] = node;
                elsewhere[user] = false;
                Action::Reconnect {
                    user: user_id(user),
                    device: DEFAULT_DEVICE.into(),
                    node: Some(node),
                    via: None,
                }
            }
            Op::PartitionRedisUnder { user } if !cut_from_redis[home[user] as usize] => {
                let node = home[user];
                cut_from_redis[node as usize] = true;
                lease_wait = true;
                Action::Partition {
                    a: format!("node{node}"),
                    b: "redis".into(),
                }
            }
            Op::PartitionRedis { node } if !cut_from_redis[node as usize] => {
                cut_from_redis[node as usize] = true;
                lease_wait = true;
                Action::Partition {
                    a: format!("node{node}"),
                    b: "redis".into(),
                }
            }
            Op::HealRedisEverywhere => {
                // One step per cut node, all at this moment.
                let cut: Vec<u64> = (1..=plan.nodes)
                    .filter(|&n| cut_from_redis[n as usize])
                    .collect();
                let Some((&last, rest)) = cut.split_last() else {
                    continue;
                };
                for &n in rest {
                    cut_from_redis[n as usize] = false;
                    steps.push(TimedStep {
                        at: now,
                        action: Action::Heal {
                            a: format!("node{n}"),
                            b: "redis".into(),
                        },
                    });
                }
                cut_from_redis[last as usize] = false;
                Action::Heal {
                    a: format!("node{last}"),
                    b: "redis".into(),
                }
            }
            Op::HealRedis { node } if cut_from_redis[node as usize] => {
                cut_from_redis[node as usize] = false;
                Action::Heal {
                    a: format!("node{node}"),
                    b: "redis".into(),
                }
            }
            Op::Crash { node } if !crashed[node as usize] => {
                crashed[node as usize] = true;
                lease_wait = true;
                Action::Crash { node }
            }
            Op::Restart { node } if crashed[node as usize] => {
                crashed[node as usize] = false;
                Action::Restart { node }
            }
            Op::RedisRestart { keep_data } => {
                lease_wait = true;
                Action::RedisRestart { keep_data }
            }
            Op::RedisSlow { ms } => {
                // Replies slower than the command timeout fail like a cut.
                lease_wait |= ms >= 450;
                Action::RedisSlow {
                    delay: Duration::from_millis(ms),
                }
            }
            Op::Burst { from, to, count } if connected[from] && from != to => Action::Send {
                from: user_id(from),
                device: DEFAULT_DEVICE.into(),
                to: user_id(to),
                text: None,
                count,
                id: None,
            },
            Op::StopReading { user } if connected[user] => Action::StopReading {
                user: user_id(user),
                device: DEFAULT_DEVICE.into(),
            },
            Op::ResumeReading { user } if connected[user] => Action::ResumeReading {
                user: user_id(user),
                device: DEFAULT_DEVICE.into(),
            },
            Op::Hold { user } if held[user].is_none() && !elsewhere[user] => {
                held[user] = Some(home[user]);
                Action::Hold {
                    a: crate::scenario::device_host(user_id(user), DEFAULT_DEVICE),
                    b: format!("node{}", home[user]),
                }
            }
            Op::Release { user } if held[user].is_some() => {
                let node = held[user].take().unwrap_or(1);
                Action::Release {
                    a: crate::scenario::device_host(user_id(user), DEFAULT_DEVICE),
                    b: format!("node{node}"),
                }
            }
            Op::Drain { node } if !crashed[node as usize] => {
                // Down until restarted, like a crashed node.
                crashed[node as usize] = true;
                Action::Drain { node }
            }
            Op::SendWithId {
                from,
                to,
                id,
                variant,
            } if connected[from] && from != to => Action::Send {
                from: user_id(from),
                device: DEFAULT_DEVICE.into(),
                to: user_id(to),
                text: Some(format!(
                    "careless {id}{}",
                    ["", " again"][usize::from(variant) % 2]
                )),
                count: 1,
                id: Some(id),
            },
            Op::OddLogin { user, node, form }
                if !tokens.contains_key(&(user_id(user), ODD_TOKEN_DEVICE.to_owned()))
                    && !crashed[node as usize] =>
            {
                let dev = (user_id(user), ODD_TOKEN_DEVICE.to_owned());
                tokens.insert(dev.clone(), form);
                devices.push(dev);
                Action::Connect {
                    user: user_id(user),
                    device: ODD_TOKEN_DEVICE.into(),
                    node,
                    via: None,
                }
            }
            Op::SendToStranger { from } if connected[from] => Action::Send {
                from: user_id(from),
                device: DEFAULT_DEVICE.into(),
                to: STRANGER,
                text: Some("to a stranger".into()),
                count: 1,
                id: None,
            },
            Op::SendLong { from, to, bytes } if connected[from] && from != to => Action::Send {
                from: user_id(from),
                device: DEFAULT_DEVICE.into(),
                to: user_id(to),
                text: Some(long_text(bytes)),
                count: 1,
                id: None,
            },
            Op::SecondDeviceHere { user } if !second[user] && !crashed[home[user] as usize] => {
                second[user] = true;
                devices.push((user_id(user), SECOND_DEVICE.to_owned()));
                Action::Connect {
                    user: user_id(user),
                    device: SECOND_DEVICE.into(),
                    node: home[user],
                    via: None,
                }
            }
            Op::AbandonSlowLogin { user, a, ms }
                if !second[user] && !crashed[a as usize] && !crashed[home[user] as usize] =>
            {
                second[user] = true;
                lease_wait = true;
                devices.push((user_id(user), SECOND_DEVICE.to_owned()));
                let slow = |ms: u64| Action::RedisSlow {
                    delay: Duration::from_millis(ms),
                };
                steps.push(TimedStep {
                    at: now,
                    action: slow(450),
                });
                steps.push(TimedStep {
                    at: now,
                    action: Action::Connect {
                        user: user_id(user),
                        device: SECOND_DEVICE.into(),
                        node: a,
                        via: None,
                    },
                });
                now += Duration::from_millis(ms);
                steps.push(TimedStep {
                    at: now,
                    action: Action::Reconnect {
                        user: user_id(user),
                        device: SECOND_DEVICE.into(),
                        node: Some(home[user]),
                        via: None,
                    },
                });
                now += Duration::from_millis(4_000);
                slow(0)
            }
            Op::HeldLogin {
                user,
                ms,
                release_ms,
            } if !second[user] && !crashed[home[user] as usize] => {
                second[user] = true;
                let node = home[user];
                let dev = (user_id(user), SECOND_DEVICE.to_owned());
                devices.push(dev.clone());
                addresses
                    .entry(dev)
                    .or_default()
                    .insert(OTHER_ADDRESS.to_owned());
                let host = crate::scenario::device_host(user_id(user), SECOND_DEVICE);
                let mut push = |at: Duration, action: Action| steps.push(TimedStep { at, action });
                push(
                    now,
                    Action::Connect {
                        user: user_id(user),
                        device: SECOND_DEVICE.into(),
                        node,
                        via: None,
                    },
                );
                now += Duration::from_millis(ms);
                push(
                    now,
                    Action::Hold {
                        a: host.clone(),
                        b: format!("node{node}"),
                    },
                );
                push(
                    now,
                    Action::Disconnect {
                        user: user_id(user),
                        device: SECOND_DEVICE.into(),
                    },
                );
                now += Duration::from_millis(5);
                push(
                    now,
                    Action::Reconnect {
                        user: user_id(user),
                        device: SECOND_DEVICE.into(),
                        node: Some(node),
                        via: Some(OTHER_ADDRESS.into()),
                    },
                );
                now += Duration::from_millis(release_ms);
                Action::Release {
                    a: host,
                    b: format!("node{node}"),
                }
            }
            Op::LeaveAsRefreshStalls { user, from }
                if connected[user] && connected[from] && user != from =>
            {
                // Just before the phone's next heartbeat (every 10 s from
                // its login), as near as the plan can tell.
                let beat = Duration::from_secs(10);
                let since = now.saturating_sub(logged_in[user]);
                let next =
                    logged_in[user] + beat * (since.as_millis() / beat.as_millis() + 1) as u32;
                now = next.saturating_sub(Duration::from_millis(100)).max(now);
                lease_wait = true;
                let to = user_id(user);
                let dev = DEFAULT_DEVICE.to_owned();
                steps.push(TimedStep {
                    at: now,
                    action: Action::RedisSlow {
                        delay: Duration::from_millis(600),
                    },
                });
                now += Duration::from_millis(50);
                steps.push(TimedStep {
                    at: now,
                    action: Action::Send {
                        from: user_id(from),
                        device: dev.clone(),
                        to,
                        text: None,
                        count: 1,
                        id: None,
                    },
                });
                now += Duration::from_millis(650);
                steps.push(TimedStep {
                    at: now,
                    action: Action::RedisSlow {
                        delay: Duration::ZERO,
                    },
                });
                connected[user] = false;
                Action::Disconnect {
                    user: to,
                    device: dev,
                }
            }
            Op::SecondDevice { user, node } if !second[user] && !crashed[node as usize] => {
                second[user] = true;
                devices.push((user_id(user), SECOND_DEVICE.to_owned()));
                Action::Connect {
                    user: user_id(user),
                    device: SECOND_DEVICE.into(),
                    node,
                    via: None,
                }
            }
            _ => continue,
        };
        steps.push(TimedStep { at: now, action });
    }
    // As the file format lists them (sorted), so a run reads back the same.
    devices.sort();
    let settle = if lease_wait { 35 } else { 8 };
    Scenario {
        name: name.to_owned(),
        server: profile,
        clients,
        devices,
        seed: plan.seed,
        nodes: plan.nodes,
        timeouts: Timeouts {
            idle: Dur(Duration::from_secs(10)),
            settle: Dur(Duration::from_secs(settle)),
            ..Timeouts::default()
        },
        network: if plan.narrow {
            Network {
                tcp_capacity: NARROW_WINDOW,
            }
        } else {
            Network::default()
        },
        guards: Vec::new(),
        expect: Expect {
            violated: Vec::new(),
            ..Expect::default()
        },
        trailing_end: story_end(&steps),
        addresses,
        tokens,
        steps,
    }
}

/// `, via = "X"` for an address, nothing for the device's own.
fn via_of(via: &Option<String>) -> String {
    via.as_ref()
        .map(|v| format!(", via = {v:?}"))
        .unwrap_or_default()
}

/// When a story of `steps` with no wait after its last step ends.
pub fn story_end(steps: &[TimedStep]) -> Duration {
    steps.last().map_or(Duration::ZERO, |s| s.at)
}

/// Writes a scenario in the file format, with `comment` as its opening
/// comment; `Scenario::parse` reads it back to the same scenario.
pub fn to_toml(s: &Scenario, comment: &str) -> String {
    let mut out = String::new();
    for line in comment.lines() {
        let _ = writeln!(out, "# {line}");
    }
    let _ = writeln!(out, "server = \"{}\"", s.server);
    let _ = writeln!(out, "seed = {}", s.seed);
    let _ = writeln!(out, "nodes = {}", s.nodes);
    let profiles: Vec<String> = s
        .clients
        .iter()
        .filter(|(_, p)| **p != ClientProfile::Compliant)
        .map(|(u, p)| format!("{u} = \"{p}\""))
        .collect();
    if !profiles.is_empty() {
        let _ = writeln!(out, "users = {{ {} }}", profiles.join(", "));
    }
    if !s.guards.is_empty() {
        let guards: Vec<String> = s.guards.iter().map(|b| format!("\"{b}\"")).collect();
        let _ = writeln!(out, "guards = [{}]", guards.join(", "));
    }
    let _ = writeln!(out, "\nstep = [");
    for step in &s.steps {
        let at = format!("at = \"{}ms\"", step.at.as_millis());
        let dev = |d: &str| {
            if d == DEFAULT_DEVICE {
                String::new()
            } else {
                format!(", device = \"{d}\"")
            }
        };
        let body = match &step.action {
            Action::Connect {
                user,
                device,
                node,
                via,
            } => format!(
                "do = \"connect\", user = {user}{}, node = {node}{}{}",
                dev(device),
                via_of(via),
                s.tokens
                    .get(&(*user, device.clone()))
                    .map(|t| format!(", token = \"{}\"", t.name()))
                    .unwrap_or_default()
            ),
            Action::Disconnect { user, device } => {
                format!("do = \"disconnect\", user = {user}{}", dev(device))
            }
            Action::Vanish { user, device } => {
                format!("do = \"vanish\", user = {user}{}", dev(device))
            }
            Action::PowerOff { user, device } => {
                format!("do = \"power_off\", user = {user}{}", dev(device))
            }
            Action::Reconnect {
                user,
                device,
                node,
                via,
            } => {
                let node = node.map(|n| format!(", node = {n}")).unwrap_or_default();
                format!(
                    "do = \"reconnect\", user = {user}{}{node}{}",
                    dev(device),
                    via_of(via)
                )
            }
            Action::Send {
                from,
                device,
                to,
                text,
                count,
                id,
            } => {
                let text = text
                    .as_ref()
                    .map(|t| format!(", text = {t:?}"))
                    .unwrap_or_default();
                let count = if *count > 1 {
                    format!(", count = {count}")
                } else {
                    String::new()
                };
                let id = id.map(|id| format!(", id = {id}")).unwrap_or_default();
                format!(
                    "do = \"send\", from = {from}{}, to = {to}{text}{count}{id}",
                    dev(device)
                )
            }
            Action::Drain { node } => format!("do = \"drain\", node = {node}"),
            Action::Partition { a, b } => format!("do = \"partition\", a = \"{a}\", b = \"{b}\""),
            Action::Heal { a, b } => format!("do = \"heal\", a = \"{a}\", b = \"{b}\""),
            Action::Hold { a, b } => format!("do = \"hold\", a = \"{a}\", b = \"{b}\""),
            Action::Release { a, b } => format!("do = \"release\", a = \"{a}\", b = \"{b}\""),
            Action::Crash { node } => format!("do = \"crash\", node = {node}"),
            Action::Restart { node } => format!("do = \"restart\", node = {node}"),
            Action::RedisStop => "do = \"redis_stop\"".to_owned(),
            Action::RedisRestart { keep_data } => {
                format!("do = \"redis_restart\", keep_data = {keep_data}")
            }
            Action::RedisSlow { delay } => {
                format!("do = \"redis_slow\", delay = \"{}ms\"", delay.as_millis())
            }
            Action::Middlebox { user, device, idle } => {
                format!(
                    "do = \"middlebox\", user = {user}{}, idle = \"{}ms\"",
                    dev(device),
                    idle.as_millis()
                )
            }
            Action::StopReading { user, device } => {
                format!("do = \"stop_reading\", user = {user}{}", dev(device))
            }
            Action::ResumeReading { user, device } => {
                format!("do = \"resume_reading\", user = {user}{}", dev(device))
            }
        };
        let _ = writeln!(out, "  {{ {body}, {at} }},");
    }
    let last = story_end(&s.steps);
    if s.trailing_end > last {
        let _ = writeln!(
            out,
            "  {{ do = \"wait\", for = \"{}ms\" }},",
            (s.trailing_end - last).as_millis()
        );
    }
    let _ = writeln!(out, "]");
    let t = &s.timeouts;
    let _ = writeln!(out, "\n[timeouts]");
    for (k, d) in [
        ("idle", t.idle),
        ("tick", t.tick),
        ("latency", t.latency),
        ("connect", t.connect),
        ("settle", t.settle),
    ] {
        let _ = writeln!(out, "{k} = \"{}ms\"", d.0.as_millis());
    }
    let _ = writeln!(
        out,
        "\n[network]\ntcp_capacity = {}",
        s.network.tcp_capacity
    );
    let violated: Vec<String> = s
        .expect
        .violated
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect();
    let _ = writeln!(out, "\n[expect]\nviolated = [{}]", violated.join(", "));
    if !s.expect.closes.is_empty() {
        let closes: Vec<String> = s
            .expect
            .closes
            .iter()
            .map(|c| {
                let device = c
                    .device
                    .as_ref()
                    .map(|d| format!(", device = {d:?}"))
                    .unwrap_or_default();
                format!("{{ user = {}{device}, code = {} }}", c.user, c.code)
            })
            .collect();
        let _ = writeln!(out, "closes = [{}]", closes.join(", "));
    }
    if let Some(d) = s.expect.deliver_within {
        let _ = writeln!(out, "deliver_within = \"{}ms\"", d.0.as_millis());
    }
    out
}

/// Writes `s` to `path` (creating its directory), opening with `comment`
/// and the command that replays it.
pub fn write_scenario(path: &std::path::Path, s: &Scenario, comment: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let comment = format!("{comment}\nReplay: im-sim run {}", path.display());
    std::fs::write(path, to_toml(s, &comment))
}

/// A failing generated run, shrunk.
#[derive(Debug)]
pub struct Found {
    pub scenario: Scenario,
    pub violated: Vec<crate::Invariant>,
    pub report: String,
}

/// Runs `cases` generated scenarios against `profile`, all drawn from
/// `seed`; returns the first failure, shrunk to a minimal schedule. The
/// search is deterministic: shrinking is bounded by iterations, never by
/// wall time.
pub fn fuzz(
    profile: Profile,
    cases: u32,
    seed: u64,
    ops_max: usize,
    shrink_iters: u32,
) -> Result<Option<Found>, String> {
    use proptest::test_runner::{
        Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner,
    };
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: shrink_iters,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
    let check = |plan: &Plan| -> Result<crate::Outcome, String> {
        let scenario = compile("generated", profile, plan);
        crate::run_scenario(&scenario, crate::RunOptions::default()).map_err(|e| e.to_string())
    };
    let result = runner.run(&plans(ops_max), |plan| {
        let outcome = check(&plan).map_err(TestCaseError::fail)?;
        let violated = outcome.violated();
        if violated.is_empty() {
            Ok(())
        } else {
            let names: Vec<&str> = violated.iter().map(|i| i.name()).collect();
            Err(TestCaseError::fail(names.join(", ")))
        }
    });
    match result {
        Ok(()) => Ok(None),
        Err(TestError::Fail(_, plan)) => {
            let outcome = check(&plan)?;
            Ok(Some(Found {
                violated: outcome.violated().into_iter().collect(),
                report: outcome.report(),
                scenario: outcome.scenario,
            }))
        }
        Err(TestError::Abort(why)) => Err(why.to_string()),
    }
}

/// The plan a sweep plays for `seed`: drawn from [`plans`] with a
/// generator seeded by `seed` alone, and played with turmoil seed `seed`.
pub fn plan_for_seed(seed: u64, ops_max: usize) -> Plan {
    sample(plans(ops_max), seed)
}

/// Calm plans: users who stay connected and talk (sends, bursts, for
/// hardened a second device logging in), on one node for the seed's
/// phases (which cannot route between nodes), on one to three for
/// hardened; no fault of any kind. Nothing in such a story can break a
/// promise of the profile, so any violation a checker reports is a false
/// alarm (or a bug the calm itself exposes): `im-sim sweep --calm` checks
/// the checkers.
pub fn calm_plans(ops_max: usize, profile: Profile) -> impl Strategy<Value = Plan> {
    let nodes_max: u64 = if profile.switches().hardened { 3 } else { 1 };
    let hardened = profile.switches().hardened;
    (0..1_000u64, 2..=3usize, 1..=nodes_max).prop_flat_map(move |(seed, users, nodes)| {
        let user = 0..users;
        let op = prop_oneof![
            4 => wait_ms().prop_map(|ms| Op::Wait { ms }),
            6 => (user.clone(), user.clone()).prop_map(|(from, to)| Op::Send { from, to }),
            1 => (user.clone(), user.clone(), 20..400u64)
                .prop_map(|(from, to, count)| Op::Burst { from, to, count }),
            if hardened { 1 } else { 0 } => (user.clone(), 1..=nodes)
                .prop_map(|(user, node)| Op::SecondDevice { user, node }),
        ];
        proptest::collection::vec(op, 1..=ops_max).prop_map(move |ops| Plan {
            seed,
            users,
            nodes,
            narrow: false,
            ops,
        })
    })
}

/// The calm plan of `seed` (see [`calm_plans`]).
pub fn calm_plan_for_seed(seed: u64, ops_max: usize, profile: Profile) -> Plan {
    sample(calm_plans(ops_max, profile), seed)
}

/// One value of `strategy`, fixed by `seed`.
fn sample(strategy: impl Strategy<Value = Plan>, seed: u64) -> Plan {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(b"im-sweep");
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    let mut plan = strategy
        .new_tree(&mut runner)
        .expect("the plan strategy has no filters, so it always generates")
        .current();
    plan.seed = seed;
    plan
}
