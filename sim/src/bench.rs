//! `im-sim bench`: how fast the simulation runs, and how it compares with
//! the real thing.
//!
//! Three figures, each from release builds (debug figures mean nothing):
//!
//! 1. `sim_speedup`: simulated seconds per wall second on a heartbeat soak
//!    ([`soak_scenario`]): `users` hardened users (one device each, spread
//!    over 2 nodes) chat for `minutes` simulated minutes; each sends to a
//!    random other user every 2-6 s, and every ~30 s a few users vanish,
//!    disconnect or drop their connection and come back seconds later. The
//!    schedule follows from the seed. It is played by [`run_scenario`] like
//!    any scenario file, so the run is also judged: its invariants are
//!    printed, and a violated one is reported loudly (the figures are still
//!    printed). Simulated seconds are the whole run's (story, then the
//!    runner's settle, heal and liveness phases); wall seconds are
//!    `run_scenario`'s, checkers included.
//! 2. `sim_msgs_per_s`: chat messages delivered in that same soak per wall
//!    second: every `Delivered` event of its history, the story's messages
//!    and the liveness phase's probes (one from each user to every other,
//!    a burst of `users * (users - 1)` at the end) alike; both counts are
//!    reported separately too.
//! 3. `sim_vs_live_speedup`: one short reconnect story, played live and in
//!    the simulation: 1001 and 1002 connect; 1001 sends; 1002 drops its
//!    connection (`Resilient::reconnect`: abort and redial) and, while it
//!    is away, 1001 sends again; 1002 reconnects, resumes and gets what it
//!    missed; 1002 sends back, 1001 sends once more. Live
//!    ([`live_reconnect`]): the real `im_server::Server` (hardened,
//!    production timeouts from `Config::new`) on a tokio `TcpListener` at
//!    127.0.0.1:0 over a real Redis (a unique key prefix per run, its keys
//!    deleted afterwards), the real resilient clients over TCP; wall time
//!    from starting the server to the last delivery, so it is dominated by
//!    real waits (the client's 100 ms reconnect backoff, round trips).
//!    Simulated ([`reconnect_scenario`]): the same steps as a scenario
//!    (the drop is the `reconnect` step, which calls the same
//!    `Resilient::reconnect`), wall time of the whole `run_scenario`
//!    (building the world, the story, the runner's settle/heal/liveness
//!    phases and the checkers), so it is dominated by CPU. The ratio is
//!    median live wall / median simulated wall.
//!
//! Where the time goes: turmoil 0.7 does work per tick, not per event. Each
//! step ticks every host's tokio runtime (even idle ones) and, for each
//! host, scans every link of its full mesh (`hosts * (hosts - 1) / 2`
//! links) for deliverable messages: O(hosts^3) per tick, which dominates
//! at 100 users. A coarser soak tick (`--tick 10ms`) divides the number of
//! ticks, but stretches every network hop to a tick.
//!
//! This module reads the wall clock: it measures the simulation from
//! outside and never feeds wall time into a run.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use im_client::ClientProfile;
use im_client::resilient::{Resilience, Resilient, ResilientEvent, tcp_dial};
use im_proto::UserId;
use im_server::{Config, Profile, RedisLink, Server};
use serde_json::json;

use crate::generate::FIRST_USER;
use crate::generate::story_end;
use crate::history::Event;
use crate::invariants::Verdict;
use crate::scenario::{
    Action, DEFAULT_DEVICE, Dur, Expect, Network, Scenario, TimedStep, Timeouts,
};
use crate::{RunOptions, run_scenario};

/// Server nodes in the soak.
pub const SOAK_NODES: u64 = 2;
/// Bounds on the soak's size, so a typo cannot ask for a week.
pub const USERS_MAX: usize = 2_000;
pub const MINUTES_MAX: u64 = 24 * 60;

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Users in the soak (at least 2).
    pub users: usize,
    /// Simulated minutes of the soak's story.
    pub minutes: u64,
    /// Seed of the soak's schedule and of both simulated runs.
    pub seed: u64,
    /// The soak's simulation step (`timeouts.tick`; scenario files
    /// default to 1 ms). The reconnect story always uses 1 ms.
    pub tick: Duration,
    /// Repetitions of the reconnect story, live and simulated (median).
    pub reps: usize,
    /// Redis for the live run (`redis://host:port/`); `None` skips it.
    pub redis: Option<String>,
    /// Smoke sizes (CI: does the bench work, not how fast).
    pub smoke: bool,
    /// Writes the soak as a scenario file here (replay: `im-sim run FILE`).
    pub save_soak: Option<std::path::PathBuf>,
}

impl BenchOptions {
    /// Full size: 100 users, 10 minutes, 5 repetitions; smoke: 10 users,
    /// 1 minute, 1 repetition.
    pub fn new(smoke: bool) -> BenchOptions {
        BenchOptions {
            users: if smoke { 10 } else { 100 },
            minutes: if smoke { 1 } else { 10 },
            seed: 1,
            tick: Duration::from_millis(1),
            reps: if smoke { 1 } else { 5 },
            redis: None,
            smoke,
            save_soak: None,
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !(2..=USERS_MAX).contains(&self.users) {
            bail!("--users {} (expected 2 to {USERS_MAX})", self.users);
        }
        if !(1..=MINUTES_MAX).contains(&self.minutes) {
            bail!("--minutes {} (expected 1 to {MINUTES_MAX})", self.minutes);
        }
        if self.tick.is_zero() || self.tick > Duration::from_secs(1) {
            bail!("--tick must be more than 0 and at most 1s");
        }
        if !(1..=100).contains(&self.reps) {
            bail!("--reps {} (expected 1 to 100)", self.reps);
        }
        Ok(())
    }
}

/// A small deterministic generator (SplitMix64): the soak's schedule
/// follows from the seed alone.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5EED_B5EA_C0DE_0001)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// How a churning user leaves.
#[derive(Clone, Copy, Debug)]
enum Leave {
    /// Silent loss (partition, socket dropped), back with `reconnect`.
    Vanish,
    /// Clean close, back with `reconnect`.
    Disconnect,
    /// The app drops its connection and redials at once (`reconnect` on a
    /// connected device).
    Drop,
}

/// The heartbeat soak as a scenario: `users` hardened users on 2 nodes for
/// `minutes` simulated minutes, chatting every 2-6 s each, with churn
/// every ~30 s. Everything follows from `seed`.
pub fn soak_scenario(users: usize, minutes: u64, seed: u64, tick: Duration) -> Scenario {
    let mut rng = Rng::new(seed);
    let user = |i: usize| FIRST_USER + i as u64;
    let story_end = Duration::from_secs(minutes * 60);
    // (at, order of creation, action): sorted by time, creation breaks ties.
    let mut events: Vec<(Duration, usize, Action)> = Vec::new();
    let push = |events: &mut Vec<(Duration, usize, Action)>, at: Duration, action: Action| {
        let n = events.len();
        events.push((at, n, action));
    };
    let mut clients = BTreeMap::new();
    let mut devices = Vec::new();
    for i in 0..users {
        clients.insert(user(i), ClientProfile::Compliant);
        devices.push((user(i), DEFAULT_DEVICE.to_owned()));
        // Logins spread over the first second.
        let at = Duration::from_millis((i as u64 * 1000) / users as u64);
        push(
            &mut events,
            at,
            Action::Connect {
                user: user(i),
                device: DEFAULT_DEVICE.into(),
                node: 1 + (i as u64 % SOAK_NODES),
                via: None,
            },
        );
    }
    // Churn: every ~30 s, ~3% of the users (at least one) leave and come
    // back 2-15 s later; all are back well before the story ends. A user
    // sends nothing while away (nor for a second after its return).
    let mut away: Vec<Vec<(Duration, Duration)>> = vec![Vec::new(); users];
    let per_round = (users * 3 / 100).max(1);
    let mut t = Duration::from_millis(rng.range(25_000, 35_000));
    while t + Duration::from_secs(20) < story_end {
        let mut chosen = BTreeSet::new();
        for _ in 0..per_round {
            let i = rng.range(0, users as u64) as usize;
            if !chosen.insert(i) {
                continue;
            }
            let kind = match rng.range(0, 4) {
                0 | 1 => Leave::Vanish,
                2 => Leave::Disconnect,
                _ => Leave::Drop,
            };
            let dev = DEFAULT_DEVICE.to_owned();
            match kind {
                Leave::Vanish | Leave::Disconnect => {
                    let back = t + Duration::from_millis(rng.range(2_000, 15_000));
                    let leave = if matches!(kind, Leave::Vanish) {
                        Action::Vanish {
                            user: user(i),
                            device: dev.clone(),
                        }
                    } else {
                        Action::Disconnect {
                            user: user(i),
                            device: dev.clone(),
                        }
                    };
                    push(&mut events, t, leave);
                    push(
                        &mut events,
                        back,
                        Action::Reconnect {
                            user: user(i),
                            device: dev,
                            node: None,
                            via: None,
                        },
                    );
                    away[i].push((t, back + Duration::from_secs(1)));
                }
                Leave::Drop => {
                    push(
                        &mut events,
                        t,
                        Action::Reconnect {
                            user: user(i),
                            device: dev,
                            node: None,
                            via: None,
                        },
                    );
                    away[i].push((t, t + Duration::from_secs(1)));
                }
            }
        }
        t += Duration::from_millis(rng.range(25_000, 35_000));
    }
    // Chat: each user sends to a random other user every 2-6 s, from 2 s on.
    for (i, gone) in away.iter().enumerate() {
        let mut t = Duration::from_millis(rng.range(2_000, 6_000));
        while t < story_end {
            let to = {
                let j = rng.range(0, users as u64 - 1) as usize;
                if j >= i { j + 1 } else { j }
            };
            if !gone.iter().any(|&(a, b)| a <= t && t <= b) {
                push(
                    &mut events,
                    t,
                    Action::Send {
                        from: user(i),
                        device: DEFAULT_DEVICE.into(),
                        to: user(to),
                        text: None,
                        count: 1,
                        id: None,
                    },
                );
            }
            t += Duration::from_millis(rng.range(2_000, 6_000));
        }
    }
    events.sort_by_key(|(at, n, _)| (*at, *n));
    let steps: Vec<TimedStep> = events
        .into_iter()
        .map(|(at, _, action)| TimedStep { at, action })
        .collect();
    Scenario {
        name: format!("bench_soak_{users}u_{minutes}m"),
        server: Profile::Hardened,
        clients,
        devices,
        seed,
        nodes: SOAK_NODES,
        timeouts: Timeouts {
            tick: Dur(tick),
            // Enough for the liveness probes' burst (users x (users - 1)
            // messages; each hop takes at least a tick).
            settle: Dur(Duration::from_secs(5).max(tick * 1000)),
            ..Timeouts::default()
        },
        network: Network::default(),
        guards: Vec::new(),
        expect: Expect {
            violated: Vec::new(),
            ..Expect::default()
        },
        trailing_end: crate::generate::story_end(&steps),
        addresses: Default::default(),
        tokens: Default::default(),
        steps,
    }
}

/// The reconnect story's two users.
const ALICE: u64 = 1001;
const BOB: u64 = 1002;
/// The reconnect story's messages: (from, to, text), in order; the second
/// is sent while Bob is away.
const STORY: [(u64, u64, &str); 4] = [
    (ALICE, BOB, "one"),
    (ALICE, BOB, "two"),
    (BOB, ALICE, "three"),
    (ALICE, BOB, "four"),
];

/// The reconnect story as a scenario (one node): the steps [`live_reconnect`]
/// takes, at simulated times just long enough for each to finish (the live
/// run waits for events instead; here a login takes about 20 ms and Bob's
/// redial waits the client's 100 ms backoff, so "three", sent at 170 ms,
/// goes out on his new connection or waits in his client until it is up).
pub fn reconnect_scenario(seed: u64) -> Scenario {
    let ms = Duration::from_millis;
    let dev = || DEFAULT_DEVICE.to_owned();
    let send = |at: u64, (from, to, text): (u64, u64, &str)| TimedStep {
        at: ms(at),
        action: Action::Send {
            from,
            device: dev(),
            to,
            text: Some(text.to_owned()),
            count: 1,
            id: None,
        },
    };
    let steps = vec![
        TimedStep {
            at: ms(0),
            action: Action::Connect {
                user: ALICE,
                device: dev(),
                node: 1,
                via: None,
            },
        },
        TimedStep {
            at: ms(0),
            action: Action::Connect {
                user: BOB,
                device: dev(),
                node: 1,
                via: None,
            },
        },
        send(25, STORY[0]),
        // Bob's app drops its connection and redials (after the client's
        // 100 ms backoff); Alice's next message arrives while he is away.
        TimedStep {
            at: ms(40),
            action: Action::Reconnect {
                user: BOB,
                device: dev(),
                node: None,
                via: None,
            },
        },
        send(41, STORY[1]),
        send(170, STORY[2]),
        send(180, STORY[3]),
    ];
    Scenario {
        name: "bench_reconnect".into(),
        server: Profile::Hardened,
        clients: [
            (ALICE, ClientProfile::Compliant),
            (BOB, ClientProfile::Compliant),
        ]
        .into(),
        devices: vec![(ALICE, dev()), (BOB, dev())],
        seed,
        nodes: 1,
        // The default tick (1 ms): the story's times assume round trips
        // of a few ms; `--tick` changes the soak only.
        timeouts: Timeouts {
            settle: Dur(Duration::from_millis(100)),
            ..Timeouts::default()
        },
        network: Network::default(),
        guards: Vec::new(),
        expect: Expect {
            violated: Vec::new(),
            ..Expect::default()
        },
        trailing_end: story_end(&steps),
        addresses: Default::default(),
        tokens: Default::default(),
        steps,
    }
}

/// The soak's figures.
#[derive(Clone, Debug)]
pub struct SoakFigures {
    pub users: usize,
    pub minutes: u64,
    /// Simulated time of the whole run (story, settle, heal, liveness).
    pub simulated: Duration,
    /// Wall time of `run_scenario`.
    pub wall: Duration,
    /// Story steps (connects, sends, churn).
    pub steps: usize,
    /// Story messages handed to a connection.
    pub sent: usize,
    /// Every `Delivered` event (story and liveness probes).
    pub delivered: usize,
    /// Of which the story's messages.
    pub delivered_story: usize,
    /// Of which the liveness probes.
    pub delivered_probes: usize,
    /// Connections that logged in (initial and after churn).
    pub connects: usize,
    /// Simulated time from the liveness probes to the last one's delivery.
    pub probes_took: Option<Duration>,
    /// The runner's quiet time after the story, healing and the probes.
    pub settle: Duration,
    pub verdicts: Vec<Verdict>,
}

impl SoakFigures {
    pub fn speedup(&self) -> f64 {
        self.simulated.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }

    pub fn msgs_per_s(&self) -> f64 {
        self.delivered as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// Names of the violated invariants.
    pub fn violations(&self) -> Vec<&'static str> {
        self.verdicts
            .iter()
            .filter(|v| !v.holds())
            .map(|v| v.invariant.name())
            .collect()
    }
}

/// Plays the soak and measures it.
pub fn run_soak(options: &BenchOptions) -> anyhow::Result<SoakFigures> {
    let scenario = soak_scenario(options.users, options.minutes, options.seed, options.tick);
    if let Some(path) = &options.save_soak {
        let comment = format!(
            "The heartbeat soak of `im-sim bench --users {} --minutes {} --seed {} --tick {:?}`.",
            options.users, options.minutes, options.seed, options.tick,
        );
        crate::generate::write_scenario(path, &scenario, &comment)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let wall = Instant::now();
    let outcome = run_scenario(&scenario, RunOptions::default())
        .with_context(|| format!("the soak ({}) could not run", scenario.name))?;
    let wall = wall.elapsed();
    let mut probes = BTreeSet::new();
    let (mut sent, mut delivered, mut delivered_probes, mut connects) = (0, 0, 0, 0);
    let mut liveness_at = None;
    for r in &outcome.run.history.records {
        match &r.event {
            Event::Sent { key, probe, .. } => {
                if *probe {
                    probes.insert(*key);
                } else {
                    sent += 1;
                }
            }
            Event::Connected { .. } => connects += 1,
            Event::Phase { name } if name == "liveness" => liveness_at = Some(r.at),
            _ => {}
        }
    }
    let mut last_probe = None;
    for r in &outcome.run.history.records {
        if let Event::Delivered { key, .. } = &r.event {
            delivered += 1;
            if probes.contains(key) {
                delivered_probes += 1;
                last_probe = Some(r.at);
            }
        }
    }
    Ok(SoakFigures {
        users: options.users,
        minutes: options.minutes,
        simulated: outcome.run.elapsed,
        wall,
        steps: scenario.steps.len(),
        sent,
        delivered,
        delivered_story: delivered - delivered_probes,
        delivered_probes,
        connects,
        probes_took: last_probe
            .zip(liveness_at)
            .map(|(last, start)| last.saturating_sub(start)),
        settle: scenario.timeouts.settle.0,
        verdicts: outcome.verdicts,
    })
}

/// One simulated play of the reconnect story.
#[derive(Clone, Debug)]
pub struct SimReconnect {
    pub wall: Duration,
    /// Simulated time of the whole run.
    pub simulated: Duration,
    /// Simulated time of the story's last delivery.
    pub last_delivery: Option<Duration>,
    /// Every story message arrived, the missed one on a new connection,
    /// and every invariant held.
    pub ok: bool,
    pub problems: Vec<String>,
}

/// Plays [`reconnect_scenario`] once.
pub fn sim_reconnect(seed: u64) -> anyhow::Result<SimReconnect> {
    let scenario = reconnect_scenario(seed);
    let wall = Instant::now();
    let outcome = run_scenario(&scenario, RunOptions::default())
        .context("the simulated reconnect story could not run")?;
    let wall = wall.elapsed();
    let mut problems: Vec<String> = outcome
        .verdicts
        .iter()
        .filter(|v| !v.holds())
        .map(|v| format!("{} violated: {}", v.invariant, v.problems.join("; ")))
        .collect();
    // Which connection each story message arrived on, and when.
    let mut arrived = BTreeMap::<&str, (u64, Duration)>::new();
    for r in &outcome.run.history.records {
        if let Event::Delivered { text, conn, .. } = &r.event
            && let Some((_, _, t)) = STORY.iter().find(|(_, _, t)| t == text)
        {
            arrived.entry(t).or_insert((*conn, r.at));
        }
    }
    for (_, _, text) in STORY {
        if !arrived.contains_key(text) {
            problems.push(format!("{text:?} never arrived"));
        }
    }
    if let (Some(one), Some(two)) = (arrived.get("one"), arrived.get("two"))
        && one.0 == two.0
    {
        problems.push("\"two\" arrived on the connection Bob dropped".into());
    }
    Ok(SimReconnect {
        wall,
        simulated: outcome.run.elapsed,
        last_delivery: arrived.get("four").map(|a| a.1),
        ok: problems.is_empty(),
        problems,
    })
}

/// One live play of the reconnect story.
#[derive(Clone, Debug)]
pub struct LiveReconnect {
    /// From starting the server to the last delivery.
    pub wall: Duration,
    /// Redis keys the run left and the bench deleted.
    pub keys_deleted: usize,
}

/// How long the live story may wait for any one event.
const LIVE_STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// The live server's token secret.
const LIVE_SECRET: &[u8] = b"imsim-bench-live-secret";

/// Plays the reconnect story live `reps` times on a current-thread tokio
/// runtime against the Redis at `redis_url`.
pub fn live_reconnect(redis_url: &str, reps: usize) -> anyhow::Result<Vec<LiveReconnect>> {
    use redis::IntoConnectionInfo;
    let info = redis_url
        .into_connection_info()
        .with_context(|| format!("bad --redis URL {redis_url:?}"))?;
    let addr = match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        other => bail!("only redis:// over TCP is supported, not {other:?}"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the live run's tokio runtime")?;
    rt.block_on(async {
        let mut runs = Vec::new();
        for rep in 0..reps {
            let prefix = format!(
                "imsim-bench:{}-{}-{rep}:",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            );
            let link = || {
                RedisLink::new(
                    im_server::tcp_connector(addr.clone()),
                    info.redis_settings().clone(),
                    Duration::from_secs(2),
                )
            };
            // Is Redis there at all? (Fails fast, before a server starts.)
            let admin = link();
            admin
                .query::<String>(&redis::cmd("PING"))
                .await
                .with_context(|| {
                    format!("Redis at {addr} does not answer (use --no-live to skip the live part)")
                })?;
            let played = live_once(&addr, info.redis_settings().clone(), &prefix).await;
            let keys_deleted = delete_keys(&admin, &prefix)
                .await
                .with_context(|| format!("deleting the live run's keys {prefix}*"))?;
            let wall = played?;
            runs.push(LiveReconnect { wall, keys_deleted });
        }
        Ok(runs)
    })
}

/// Starts a server, plays the story, stops everything; the story's wall time.
async fn live_once(
    redis_addr: &str,
    settings: redis::RedisConnectionInfo,
    prefix: &str,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut config = Config::new(Profile::Hardened);
    config.auth_secret = Some(LIVE_SECRET.to_vec());
    config.key_prefix = prefix.to_owned();
    config.node = "bench".into();
    let redis = RedisLink::new(
        im_server::tcp_connector(redis_addr.to_owned()),
        settings,
        config.limits.redis_timeout,
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("binding 127.0.0.1:0")?;
    let url = format!("ws://{}/ws", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(Server::new(config, redis).run(listener, async {
        let _ = stopped.await;
    }));
    let story = async {
        let mut alice = start_live_client(ALICE, &url)?;
        let mut bob = start_live_client(BOB, &url)?;
        wait(&mut alice, "Alice connected", |e| {
            matches!(e, ResilientEvent::Connected { .. }).then_some(())
        })
        .await?;
        let first_conn = wait(&mut bob, "Bob connected", |e| match e {
            ResilientEvent::Connected { conn_id } => Some(*conn_id),
            _ => None,
        })
        .await?;
        // Message ids per sender, as the server dedups by (sender, id).
        let (mut alice_ids, mut bob_ids) = (0, 0);
        let one = send_live(&alice, &mut alice_ids, STORY[0]).await?;
        wait_delivered(&mut bob, ALICE, one).await?;
        // Bob's app drops its connection; Alice sends while he is away.
        bob.reconnect()
            .await
            .map_err(|e| anyhow!("Bob cannot drop: {e}"))?;
        wait(&mut bob, "Bob's connection dropped", |e| {
            matches!(e, ResilientEvent::Disconnected { .. }).then_some(())
        })
        .await?;
        let two = send_live(&alice, &mut alice_ids, STORY[1]).await?;
        wait(&mut alice, "\"two\" stored", |e| match e {
            ResilientEvent::Event(im_client::Event::SendResult {
                client_msg_id,
                accepted,
                reason,
                ..
            }) if *client_msg_id == two => Some(if *accepted {
                Ok(())
            } else {
                Err(anyhow!("\"two\" refused: {reason}"))
            }),
            _ => None,
        })
        .await??;
        let second_conn = wait(&mut bob, "Bob reconnected", |e| match e {
            ResilientEvent::Connected { conn_id } => Some(*conn_id),
            _ => None,
        })
        .await?;
        if second_conn == first_conn {
            bail!("Bob's reconnect reused connection {first_conn}");
        }
        wait_delivered(&mut bob, ALICE, two).await?;
        let three = send_live(&bob, &mut bob_ids, STORY[2]).await?;
        wait_delivered(&mut alice, BOB, three).await?;
        let four = send_live(&alice, &mut alice_ids, STORY[3]).await?;
        wait_delivered(&mut bob, ALICE, four).await?;
        let wall = started.elapsed();
        for (name, mut c) in [("Alice", alice), ("Bob", bob)] {
            let _ = c.close().await;
            wait(&mut c, &format!("{name} stopped"), |e| {
                matches!(e, ResilientEvent::Stopped(_)).then_some(())
            })
            .await?;
        }
        Ok(wall)
    };
    let result = story.await;
    let _ = stop.send(());
    // Draining takes at most the server's shutdown grace (5 s).
    match tokio::time::timeout(Duration::from_secs(15), server).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("the live server panicked: {e}"),
        Err(_) => bail!("the live server did not stop within 15 s"),
    }
    result
}

/// Sends one story message with the sender's next id; returns the id.
async fn send_live(
    client: &Resilient,
    next_id: &mut u64,
    (from, to, text): (u64, u64, &str),
) -> anyhow::Result<u64> {
    *next_id += 1;
    client
        .send(UserId(to), text, *next_id)
        .await
        .map_err(|e| anyhow!("{from} cannot send {text:?}: {e}"))?;
    Ok(*next_id)
}

fn start_live_client(user: u64, url: &str) -> anyhow::Result<Resilient> {
    let mut options = im_client::Options::new(UserId(user), url);
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    options.token = im_proto::token::mint(LIVE_SECRET, UserId(user), expires);
    let dial = tcp_dial(url).map_err(|e| anyhow!("bad url {url}: {e}"))?;
    Ok(Resilient::start(dial, options, Resilience::default()))
}

/// Reads `client`'s events until `pick` takes one.
async fn wait<T>(
    client: &mut Resilient,
    what: &str,
    mut pick: impl FnMut(&ResilientEvent) -> Option<T>,
) -> anyhow::Result<T> {
    let found = async {
        while let Some(e) = client.next_event().await {
            if let Some(t) = pick(&e) {
                return Ok(t);
            }
            if let ResilientEvent::Stopped(cause) = e {
                bail!("client stopped ({cause:?}) while waiting for {what}");
            }
        }
        bail!("client ended while waiting for {what}")
    };
    tokio::time::timeout(LIVE_STEP_TIMEOUT, found)
        .await
        .map_err(|_| anyhow!("timed out after {LIVE_STEP_TIMEOUT:?} waiting for {what}"))?
}

async fn wait_delivered(client: &mut Resilient, from: u64, id: u64) -> anyhow::Result<()> {
    wait(client, &format!("message {from}#{id}"), |e| match e {
        ResilientEvent::Event(im_client::Event::Delivered {
            from: f,
            client_msg_id,
            ..
        }) if f.0 == from && *client_msg_id == id => Some(()),
        _ => None,
    })
    .await
}

/// Deletes every key under `prefix` (SCAN, not KEYS: the Redis may be
/// shared); returns how many.
async fn delete_keys(link: &RedisLink, prefix: &str) -> anyhow::Result<usize> {
    let mut cursor = 0u64;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = link
            .query(
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{prefix}*"))
                    .arg("COUNT")
                    .arg(1000),
            )
            .await?;
        if !keys.is_empty() {
            let n: usize = link.query(redis::cmd("DEL").arg(&keys)).await?;
            deleted += n;
        }
        cursor = next;
        if cursor == 0 {
            return Ok(deleted);
        }
    }
}

/// Everything one bench measured.
#[derive(Debug)]
pub struct BenchReport {
    pub options: BenchOptions,
    pub soak: anyhow::Result<SoakFigures>,
    pub sim: anyhow::Result<Vec<SimReconnect>>,
    /// `None`: skipped (`--no-live`).
    pub live: Option<anyhow::Result<Vec<LiveReconnect>>>,
}

fn median(mut v: Vec<Duration>) -> Option<Duration> {
    v.sort();
    v.get(v.len() / 2).copied()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl BenchReport {
    fn sim_median(&self) -> Option<Duration> {
        self.sim
            .as_ref()
            .ok()
            .and_then(|runs| median(runs.iter().map(|r| r.wall).collect()))
    }

    fn live_median(&self) -> Option<Duration> {
        match &self.live {
            Some(Ok(runs)) => median(runs.iter().map(|r| r.wall).collect()),
            _ => None,
        }
    }

    pub fn sim_vs_live_speedup(&self) -> Option<f64> {
        let (live, sim) = (self.live_median()?, self.sim_median()?);
        Some(live.as_secs_f64() / sim.as_secs_f64().max(1e-9))
    }

    /// Whether everything ran and held (the soak's invariants, the
    /// simulated story's checks, the live run if asked for).
    pub fn ok(&self) -> bool {
        let soak = self.soak.as_ref().is_ok_and(|s| s.violations().is_empty());
        let sim = self
            .sim
            .as_ref()
            .is_ok_and(|runs| runs.iter().all(|r| r.ok));
        let live = !matches!(self.live, Some(Err(_)));
        soak && sim && live
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let o = &self.options;
        let mut s = String::new();
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        line(format!(
            "im-sim bench{}: seed {}, tick {:?}",
            if o.smoke { " (smoke sizes)" } else { "" },
            o.seed,
            o.tick
        ));
        match &self.soak {
            Ok(f) => {
                line(format!(
                    "soak: {} users on {SOAK_NODES} nodes, {} min story, {} steps: {:.1} s simulated in {:.2} s wall",
                    f.users,
                    f.minutes,
                    f.steps,
                    f.simulated.as_secs_f64(),
                    f.wall.as_secs_f64()
                ));
                line(format!(
                    "  sim_speedup    {:.1}x real time (simulated s / wall s)",
                    f.speedup()
                ));
                line(format!(
                    "  liveness probes: {} delivered within {} of the probes (settle {:?})",
                    f.delivered_probes,
                    f.probes_took
                        .map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64())),
                    f.settle
                ));
                line(format!(
                    "  sim_msgs_per_s {:.0} delivered per wall second ({} delivered: {} story messages of {} sent, {} liveness probes; {} logins)",
                    f.msgs_per_s(),
                    f.delivered,
                    f.delivered_story,
                    f.sent,
                    f.delivered_probes,
                    f.connects
                ));
                for v in &f.verdicts {
                    if v.holds() {
                        line(format!("  invariant {:<17} holds", v.invariant.name()));
                    } else {
                        line(format!(
                            "  invariant {:<17} VIOLATED ({} problems)",
                            v.invariant.name(),
                            v.problems.len()
                        ));
                        for p in v.problems.iter().take(10) {
                            line(format!("    - {p}"));
                        }
                    }
                }
                let violated = f.violations();
                if !violated.is_empty() {
                    line(format!(
                        "!!! THE SOAK FAILED: violated {} (replay: im-sim bench --users {} --minutes {} --seed {} --tick {:?} --no-live --save-soak FILE, then im-sim run FILE)",
                        violated.join(", "),
                        f.users,
                        f.minutes,
                        o.seed,
                        o.tick
                    ));
                }
            }
            Err(e) => line(format!("!!! THE SOAK DID NOT RUN: {e:#}")),
        }
        line(
            "reconnect story (connect, send, drop + redial, send while away, resume, chat):".into(),
        );
        match &self.sim {
            Ok(runs) => {
                let walls: Vec<String> =
                    runs.iter().map(|r| format!("{:.2}", ms(r.wall))).collect();
                let last = runs.first().and_then(|r| r.last_delivery);
                line(format!(
                    "  simulated: median {:.2} ms wall over {} runs [{}] ms; {:.2} s simulated per run, last message at {}",
                    self.sim_median().map_or(0.0, ms),
                    runs.len(),
                    walls.join(", "),
                    runs.first().map_or(0.0, |r| r.simulated.as_secs_f64()),
                    last.map_or("never".into(), |d| format!("{:.0} ms simulated", ms(d)))
                ));
                for r in runs.iter().filter(|r| !r.ok) {
                    line(format!(
                        "!!! THE SIMULATED STORY FAILED: {}",
                        r.problems.join("; ")
                    ));
                }
            }
            Err(e) => line(format!("!!! THE SIMULATED STORY DID NOT RUN: {e:#}")),
        }
        match &self.live {
            None => line("  live: skipped (--no-live)".into()),
            Some(Ok(runs)) => {
                let walls: Vec<String> =
                    runs.iter().map(|r| format!("{:.2}", ms(r.wall))).collect();
                let keys: usize = runs.iter().map(|r| r.keys_deleted).sum();
                line(format!(
                    "  live:      median {:.2} ms wall over {} runs [{}] ms (real sockets and Redis; {keys} keys deleted afterwards)",
                    self.live_median().map_or(0.0, ms),
                    runs.len(),
                    walls.join(", ")
                ));
            }
            Some(Err(e)) => line(format!("!!! THE LIVE RUN FAILED: {e:#}")),
        }
        match self.sim_vs_live_speedup() {
            Some(x) => line(format!(
                "  sim_vs_live_speedup {x:.1}x (live wall / simulated wall; live waits on backoff and round trips, the simulation on CPU)"
            )),
            None => line("  sim_vs_live_speedup n/a".into()),
        }
        s
    }

    /// The machine-readable figures (one JSON object).
    pub fn json(&self) -> serde_json::Value {
        let o = &self.options;
        let soak = self.soak.as_ref().ok();
        let sim = self.sim.as_ref().ok();
        let live = match &self.live {
            Some(Ok(runs)) => Some(runs),
            _ => None,
        };
        json!({
            "sim_speedup": soak.map(SoakFigures::speedup),
            "sim_msgs_per_s": soak.map(SoakFigures::msgs_per_s),
            "sim_vs_live_speedup": self.sim_vs_live_speedup(),
            "users": o.users,
            "minutes": o.minutes,
            "seed": o.seed,
            "tick_ms": ms(o.tick),
            "smoke": o.smoke,
            "reps": o.reps,
            "simulated_s": soak.map(|s| s.simulated.as_secs_f64()),
            "wall_s": soak.map(|s| s.wall.as_secs_f64()),
            "steps": soak.map(|s| s.steps),
            "sent": soak.map(|s| s.sent),
            "delivered": soak.map(|s| s.delivered),
            "delivered_story": soak.map(|s| s.delivered_story),
            "delivered_probes": soak.map(|s| s.delivered_probes),
            "logins": soak.map(|s| s.connects),
            "soak_violations": soak.map(SoakFigures::violations),
            "soak_error": self.soak.as_ref().err().map(|e| format!("{e:#}")),
            "sim_ms": self.sim_median().map(ms),
            "sim_runs_ms": sim.map(|runs| runs.iter().map(|r| ms(r.wall)).collect::<Vec<_>>()),
            "sim_story_ok": sim.map(|runs| runs.iter().all(|r| r.ok)),
            "sim_story_simulated_s": sim.and_then(|runs| runs.first()).map(|r| r.simulated.as_secs_f64()),
            "live_ms": self.live_median().map(ms),
            "live_runs_ms": live.map(|runs| runs.iter().map(|r| ms(r.wall)).collect::<Vec<_>>()),
            "live_skipped": self.live.is_none(),
            "live_error": match &self.live {
                Some(Err(e)) => Some(format!("{e:#}")),
                _ => None,
            },
            "ok": self.ok(),
        })
    }
}

/// Runs the whole bench: the soak, the simulated reconnect story, and
/// (with `options.redis`) the live one.
pub fn run(options: &BenchOptions) -> anyhow::Result<BenchReport> {
    options.validate()?;
    let soak = run_soak(options);
    let sim = (0..options.reps)
        .map(|_| sim_reconnect(options.seed))
        .collect::<anyhow::Result<Vec<_>>>();
    let live = options
        .redis
        .as_deref()
        .map(|url| live_reconnect(url, options.reps));
    Ok(BenchReport {
        options: options.clone(),
        soak,
        sim,
        live,
    })
}
