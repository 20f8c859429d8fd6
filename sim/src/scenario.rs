//! The scenario file format: TOML read with serde, one file per story.
//!
//! ```toml
//! # What this reproduces and how (every file opens with a comment).
//! server = "phase1"            # hardened (default) | phase1 | phase2 | phase3
//! client = "compliant"         # default client profile: compliant | legacy
//! seed = 1                     # turmoil's RNG seed (overridable by --seed)
//! nodes = 1                    # server nodes: node1, node2, ...
//! users = { 1002 = "legacy" }  # optional per-user client profile
//! guards = ["phase3_cleanup_by_user"]  # historical bugs this story catches
//!
//! [timeouts]                   # all optional; durations as "250ms", "30s", "2m"
//! idle = "60s"                 # server closes a connection silent this long
//! tick = "1ms"                 # simulation step
//! latency = "5ms"              # maximum one-way network latency (minimum 1ms)
//! connect = "2s"               # client's connect + login deadline
//! settle = "5s"                # quiet time before the final checks
//!
//! [network]
//! tcp_capacity = 4096          # segments in flight per stream
//!
//! [expect]
//! violated = ["no_false_success"]   # exactly these invariants fail
//! closes = [{ user = 1001, code = 4002 }]  # optional: the server closed a
//!                              # connection of that device with that code
//! deliver_within = "2s"        # optional: every delivery of a story message
//!                              # within this long of its send (or of its
//!                              # device's reconnection)
//!
//! [[step]]                     # steps run in order; time moves only by
//! do = "connect"               # `at` (absolute) or `wait` (relative)
//! user = 1001
//! ```
//!
//! Steps (`do = ...`): `connect`, `disconnect` (clean close), `vanish`
//! (silent loss: partition, then the client drops its socket, so its FIN is
//! lost), `power_off` (the device dies for good while cut off: no FIN, no
//! RST, ever; it takes no further steps), `reconnect` (heals a vanish, drops any old socket, connects
//! anew; `connect` takes `token = "uppercase_signature" | "plus_sign" |
//! "leading_zeros"` for a device whose app writes its correctly signed
//! token in a non-canonical form, which the hardened server must refuse), `send` (`count = N` for a burst; `id = N` for an explicit client
//! message id, e.g. a reused one, or 0; `size = N` pads the text with '.'
//! to exactly N bytes), `wait`, `partition`/`heal` (between two hosts),
//! `crash`/`restart` (a server node), `drain` (a node's graceful
//! shutdown: its clients are told to go elsewhere), `redis_stop`/`redis_restart`
//! (`keep_data = true|false`), `redis_slow` (every reply delayed by `delay`),
//! `middlebox` (a NAT that silently drops the user's connection once it is
//! idle longer than `idle`), `stop_reading`/`resume_reading` (a client
//! whose pongs and pushes pile up).
//!
//! Steps that name a user take an optional `device` (default "phone"):
//! each device is its own client with its own connection, so a user may
//! be online on several at once.
//!
//! Host names: `node1`.., `redis`, `user<ID>` for a user's default device
//! (e.g. `user1001`), `user<ID>-<DEVICE>` for another (`user1001-tablet`),
//! and `user<ID>@<VIA>` for a device's other network address: `connect`
//! and `reconnect` take `via = "cell"` to connect from it (Wi-Fi to
//! cellular, a NAT rebinding), so faults on the old path (`hold`,
//! `partition`) leave the new one alone. `hold`/`release` (between two
//! hosts) delay traffic and then deliver it in order, where `partition`
//! drops it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use im_client::ClientProfile;
use im_server::{Bug, Profile};
use serde::Deserialize;
use toml::Spanned;

use crate::invariants::Invariant;

/// A scenario that failed to load: path, line, and what was expected.
#[derive(Debug, thiserror::Error)]
#[error("{path}:{line}:{column}: {message}")]
pub struct ScenarioError {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// A simulated duration written as text ("250ms", "30s", "2m").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "bad duration {text:?}: {e} (expected e.g. \"250ms\", \"30s\", \"2m\")"
            ))
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    server: Option<Spanned<String>>,
    #[serde(default)]
    client: Option<Spanned<String>>,
    #[serde(default)]
    users: BTreeMap<String, Spanned<String>>,
    #[serde(default = "one")]
    seed: u64,
    #[serde(default = "one")]
    nodes: u64,
    #[serde(default)]
    timeouts: Timeouts,
    #[serde(default)]
    network: Network,
    #[serde(default)]
    guards: Vec<Spanned<String>>,
    expect: Expect,
    #[serde(default, rename = "step")]
    steps: Vec<Spanned<Step>>,
}

fn one() -> u64 {
    1
}

/// Timing knobs, all in simulated time.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// The server's read idle timeout (the seed's deployment: 60 s).
    pub idle: Dur,
    /// One simulation step.
    pub tick: Dur,
    /// Maximum one-way network latency.
    pub latency: Dur,
    /// A client's connect + handshake + login deadline.
    pub connect: Dur,
    /// Quiet time after the last step, after healing, and after the
    /// liveness probes.
    pub settle: Dur,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            idle: Dur(Duration::from_secs(60)),
            tick: Dur(Duration::from_millis(1)),
            latency: Dur(Duration::from_millis(5)),
            connect: Dur(Duration::from_secs(2)),
            settle: Dur(Duration::from_secs(2)),
        }
    }
}

/// Network knobs.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    /// turmoil's per-stream window (segments in flight) and listen backlog.
    /// Small values make a stuck reader's pushes back up sooner.
    pub tcp_capacity: usize,
}

impl Default for Network {
    fn default() -> Self {
        Network { tcp_capacity: 4096 }
    }
}

/// What the run must show.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Exactly these invariants are violated; empty means all hold.
    pub violated: Vec<Invariant>,
    /// Connections that must have been closed by the server with a given
    /// close code (at least one connection of the device, each).
    #[serde(default)]
    pub closes: Vec<ExpectClose>,
    /// Every delivery of a story message reaches its device within this
    /// long of being sent, or of the device's (re)connection if it was
    /// offline then. A promptness promise: a message that arrives, but
    /// only at the next poll, breaks it.
    #[serde(default)]
    pub deliver_within: Option<Dur>,
}

/// `{ user = 1001, device = "phone", code = 4002 }` in `[expect] closes`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExpectClose {
    pub user: u64,
    /// The device (default "phone").
    #[serde(default)]
    pub device: Option<String>,
    /// The WebSocket close code the server sent.
    pub code: u16,
}

/// One step of a story, as written.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "do", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    Connect {
        user: u64,
        /// The device (default "phone"); several devices may share a user.
        device: Option<String>,
        #[serde(default = "one")]
        node: u64,
        /// Connect from another network address (e.g. "cell"): the host
        /// `user<ID>@<via>`, its own link to the nodes.
        via: Option<String>,
        /// How the device writes its login token (default canonical): a
        /// device of a buggy app signing another form of the same token.
        token: Option<TokenForm>,
        at: Option<Dur>,
    },
    Disconnect {
        user: u64,
        /// The device (default "phone"); several devices may share a user.
        device: Option<String>,
        at: Option<Dur>,
    },
    Vanish {
        user: u64,
        /// The device (default "phone"); several devices may share a user.
        device: Option<String>,
        at: Option<Dur>,
    },
    PowerOff {
        user: u64,
        /// The device (default "phone"); several devices may share a user.
        device: Option<String>,
        at: Option<Dur>,
    },
    Reconnect {
        user: u64,
        /// The device (default "phone"); several devices may share a user.
        device: Option<String>,
        node: Option<u64>,
        /// Reconnect from another network address (Wi-Fi to cellular, NAT
        /// rebinding): the host `user<ID>@<via>`; omitted: the device's
        /// own address.
        via: Option<String>,
        at: Option<Dur>,
    },
    Send {
        from: u64,
        /// The device (default "phone"); several devices may share a user.
        device: Option<String>,
        to: u64,
        text: Option<String>,
        /// Pads the text with '.' to exactly this many bytes (a long
        /// message, e.g. one over the server's text limit).
        size: Option<usize>,
        /// Sends this many messages at once (a burst), default 1.
        count: Option<u64>,
        /// The client message id to use (default: the user's next one). A
        /// story may reuse an id, or send 0, as a careless client would.
        id: Option<u64>,
        at: Option<Dur>,
    },
    Drain {
        node: u64,
        at: Option<Dur>,
    },
    Wait {
        #[serde(rename = "for")]
        duration: Dur,
    },
    Partition {
        a: String,
        b: String,
        at: Option<Dur>,
    },
    Heal {
        a: String,
        b: String,
        at: Option<Dur>,
    },
    /// Holds the traffic between two hosts: delayed, not dropped, until
    /// `release` delivers it in order.
    Hold {
        a: String,
        b: String,
        at: Option<Dur>,
    },
    Release {
        a: String,
        b: String,
        at: Option<Dur>,
    },
    Crash {
        node: u64,
        at: Option<Dur>,
    },
    Restart {
        node: u64,
        at: Option<Dur>,
    },
    RedisStop {
        at: Option<Dur>,
    },
    RedisRestart {
        keep_data: bool,
        at: Option<Dur>,
    },
    RedisSlow {
        delay: Dur,
        at: Option<Dur>,
    },
    Middlebox {
        user: u64,
        /// The device (default "phone"); several devices may share a user.
        device: Option<String>,
        idle: Dur,
        at: Option<Dur>,
    },
    StopReading {
        user: u64,
        /// The device (default "phone"); several devices may share a user.
        device: Option<String>,
        at: Option<Dur>,
    },
    ResumeReading {
        user: u64,
        /// The device (default "phone"); several devices may share a user.
        device: Option<String>,
        at: Option<Dur>,
    },
}

/// A step with its absolute time resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimedStep {
    pub at: Duration,
    pub action: Action,
}

/// What the driver does (steps with time taken out; `wait` is gone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Connect {
        user: u64,
        device: String,
        node: u64,
        via: Option<String>,
    },
    Disconnect {
        user: u64,
        device: String,
    },
    Vanish {
        user: u64,
        device: String,
    },
    /// The device dies for good while cut off: its host crashes and never
    /// returns, so nothing ever answers the server's writes (not even RST).
    PowerOff {
        user: u64,
        device: String,
    },
    Reconnect {
        user: u64,
        device: String,
        node: Option<u64>,
        via: Option<String>,
    },
    Send {
        from: u64,
        device: String,
        to: u64,
        text: Option<String>,
        count: u64,
        /// An explicit client message id (count is then 1).
        id: Option<u64>,
    },
    Drain {
        node: u64,
    },
    Partition {
        a: String,
        b: String,
    },
    Heal {
        a: String,
        b: String,
    },
    Hold {
        a: String,
        b: String,
    },
    Release {
        a: String,
        b: String,
    },
    Crash {
        node: u64,
    },
    Restart {
        node: u64,
    },
    RedisStop,
    RedisRestart {
        keep_data: bool,
    },
    RedisSlow {
        delay: Duration,
    },
    Middlebox {
        user: u64,
        device: String,
        idle: Duration,
    },
    StopReading {
        user: u64,
        device: String,
    },
    ResumeReading {
        user: u64,
        device: String,
    },
}

/// How a device writes its signed login token (`im_proto::token`). The
/// hardened server accepts only the canonical form, so every other form
/// names the same user and is refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenForm {
    #[default]
    Canonical,
    /// The signature in uppercase hex.
    UppercaseSignature,
    /// The user id written `+ID`, signed as written.
    PlusSign,
    /// The user id written with leading zeros, signed as written.
    LeadingZeros,
}

impl TokenForm {
    pub fn name(self) -> &'static str {
        match self {
            TokenForm::Canonical => "canonical",
            TokenForm::UppercaseSignature => "uppercase_signature",
            TokenForm::PlusSign => "plus_sign",
            TokenForm::LeadingZeros => "leading_zeros",
        }
    }

    /// A token for `user` until `expires_unix_s`, signed with `secret`,
    /// written in this form.
    pub fn mint(self, secret: &[u8], user: u64, expires_unix_s: u64) -> String {
        let canonical = im_proto::token::mint(secret, im_proto::UserId(user), expires_unix_s);
        let signed = |id: String| {
            // Signed as written: the signature covers the odd payload.
            let payload = format!("v1.{id}.{expires_unix_s}");
            im_proto::token::sign_payload(secret, &payload)
        };
        match self {
            TokenForm::Canonical => canonical,
            TokenForm::UppercaseSignature => {
                let (payload, sig) = canonical.rsplit_once('.').expect("a minted token");
                format!("{payload}.{}", sig.to_uppercase())
            }
            TokenForm::PlusSign => signed(format!("+{user}")),
            TokenForm::LeadingZeros => signed(format!("000{user}")),
        }
    }
}

/// A loaded, validated scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    pub name: String,
    pub server: Profile,
    pub clients: BTreeMap<u64, ClientProfile>,
    /// Every (user, device) the story connects, in order.
    pub devices: Vec<(u64, String)>,
    pub seed: u64,
    pub nodes: u64,
    pub timeouts: Timeouts,
    pub network: Network,
    /// Historical bugs this story catches: switched back on (`--bug`), each
    /// must make the run fail (a test proves it for every file).
    pub guards: Vec<Bug>,
    pub expect: Expect,
    pub steps: Vec<TimedStep>,
    /// The story's time after its last step and every wait after it.
    pub trailing_end: Duration,
    /// Other network addresses each device connects from (`via`).
    pub addresses: BTreeMap<(u64, String), std::collections::BTreeSet<String>>,
    /// Devices that write their login token in a non-canonical form.
    pub tokens: BTreeMap<(u64, String), TokenForm>,
}

impl Scenario {
    /// Every user the scenario names, in order.
    pub fn users(&self) -> Vec<u64> {
        self.clients.keys().copied().collect()
    }

    /// When the story ends: its last step, or later if waits follow it (a
    /// story that ends with `wait` runs that long before the final checks).
    pub fn story_end(&self) -> Duration {
        let last = self.steps.last().map(|s| s.at).unwrap_or_default();
        last.max(self.trailing_end)
    }

    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
            path: path.to_owned(),
            line: 0,
            column: 0,
            message: format!("cannot read: {e}"),
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Scenario::parse(&name, &text).map_err(|(span, message)| {
            let (line, column) = line_col(&text, span.start);
            ScenarioError {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        })
    }

    /// Parses and validates; an error carries the byte span it is about.
    pub fn parse(name: &str, text: &str) -> Result<Scenario, (std::ops::Range<usize>, String)> {
        let file: File =
            toml::from_str(text).map_err(|e| (e.span().unwrap_or(0..0), e.message().to_owned()))?;
        let server = match &file.server {
            Some(s) => s
                .get_ref()
                .parse::<Profile>()
                .map_err(|e| (s.span(), e.to_string()))?,
            None => Profile::Hardened,
        };
        let default_client = match &file.client {
            Some(c) => c
                .get_ref()
                .parse::<ClientProfile>()
                .map_err(|e| (c.span(), e.to_string()))?,
            None => ClientProfile::Compliant,
        };
        if file.nodes == 0 || file.nodes > 8 {
            return Err((0..0, format!("nodes = {} (expected 1 to 8)", file.nodes)));
        }
        let t = file.timeouts;
        if t.tick.0.is_zero() || t.latency.0 < Duration::from_millis(1) {
            return Err((
                0..0,
                "timeouts.tick must be > 0 and timeouts.latency >= 1ms".into(),
            ));
        }

        // Every network address a device connects from besides its own
        // (`via`), known before the steps so faults may name them anywhere.
        let mut addresses = BTreeMap::<(u64, String), std::collections::BTreeSet<String>>::new();
        let mut tokens = BTreeMap::<(u64, String), TokenForm>::new();
        for spanned in &file.steps {
            if let Step::Connect {
                user,
                device,
                token: Some(form),
                ..
            } = spanned.get_ref()
            {
                let device = device.clone().unwrap_or_else(|| DEFAULT_DEVICE.to_owned());
                let dev = (*user, device);
                match tokens.get(&dev) {
                    Some(other) if other != form => {
                        return Err((
                            spanned.span(),
                            format!(
                                "token = {:?}: this device already writes its token as {:?}",
                                form.name(),
                                other.name()
                            ),
                        ));
                    }
                    _ => {}
                }
                if *form != TokenForm::Canonical {
                    tokens.insert(dev, *form);
                }
            }
        }
        for spanned in &file.steps {
            let (user, device, via) = match spanned.get_ref() {
                Step::Connect {
                    user, device, via, ..
                }
                | Step::Reconnect {
                    user, device, via, ..
                } => (*user, device.clone(), via.clone()),
                _ => continue,
            };
            let Some(via) = via else { continue };
            if via.is_empty() || !via.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err((
                    spanned.span(),
                    format!("via = {via:?}: use letters and digits only"),
                ));
            }
            let device = device.unwrap_or_else(|| DEFAULT_DEVICE.to_owned());
            addresses.entry((user, device)).or_default().insert(via);
        }
        let mut clients = BTreeMap::new();
        let mut steps = Vec::new();
        let mut now = Duration::ZERO;
        let mut connected = BTreeMap::<(u64, String), bool>::new();
        let mut off = std::collections::BTreeSet::<(u64, String)>::new();
        for spanned in &file.steps {
            let span = spanned.span();
            let err = |m: String| (span.clone(), m);
            let step = spanned.get_ref().clone();
            let at = match &step {
                Step::Wait { duration } => {
                    now += duration.0;
                    continue;
                }
                Step::Connect { at, .. }
                | Step::Disconnect { at, .. }
                | Step::Vanish { at, .. }
                | Step::PowerOff { at, .. }
                | Step::Reconnect { at, .. }
                | Step::Send { at, .. }
                | Step::Drain { at, .. }
                | Step::Partition { at, .. }
                | Step::Heal { at, .. }
                | Step::Hold { at, .. }
                | Step::Release { at, .. }
                | Step::Crash { at, .. }
                | Step::Restart { at, .. }
                | Step::RedisStop { at }
                | Step::RedisRestart { at, .. }
                | Step::RedisSlow { at, .. }
                | Step::Middlebox { at, .. }
                | Step::StopReading { at, .. }
                | Step::ResumeReading { at, .. } => *at,
            };
            if let Some(Dur(at)) = at {
                if at < now {
                    return Err(err(format!(
                        "at = {} is before the previous step ({}); steps run in order",
                        humantime::format_duration(at),
                        humantime::format_duration(now)
                    )));
                }
                now = at;
            }
            let node_ok = |node: u64| {
                if (1..=file.nodes).contains(&node) {
                    Ok(())
                } else {
                    Err(err(format!(
                        "node {node} does not exist (nodes = {})",
                        file.nodes
                    )))
                }
            };
            let known = |dev: &(u64, String), what: &str| {
                if off.contains(dev) {
                    Err(err(format!(
                        "user {} (device {:?}) was powered off; it takes no `{what}` step after that",
                        dev.0, dev.1
                    )))
                } else if connected.contains_key(dev) {
                    Ok(())
                } else {
                    Err(err(format!(
                        "user {} (device {:?}) never connected before this `{what}` step",
                        dev.0, dev.1
                    )))
                }
            };
            let dev = |user: u64, device: Option<String>| {
                (user, device.unwrap_or_else(|| DEFAULT_DEVICE.to_owned()))
            };
            let action = match step {
                Step::Wait { .. } => unreachable!("handled above"),
                Step::Connect {
                    user,
                    device,
                    node,
                    via,
                    ..
                } => {
                    if user == 0 {
                        return Err(err("user 0 is not a user".into()));
                    }
                    let d = dev(user, device);
                    if d.1.is_empty() || !d.1.chars().all(|c| c.is_ascii_alphanumeric()) {
                        return Err(err(format!(
                            "device {:?}: use letters and digits only",
                            d.1
                        )));
                    }
                    node_ok(node)?;
                    if off.contains(&d) {
                        return Err(err(format!(
                            "user {user} (device {:?}) was powered off; it takes no `connect` step after that",
                            d.1
                        )));
                    }
                    if connected.get(&d) == Some(&true) {
                        return Err(err(format!(
                            "user {user} (device {:?}) is already connected; use `reconnect`",
                            d.1
                        )));
                    }
                    connected.insert(d.clone(), true);
                    clients.entry(user).or_insert(default_client);
                    Action::Connect {
                        user,
                        device: d.1,
                        node,
                        via,
                    }
                }
                Step::Disconnect { user, device, .. } => {
                    let d = dev(user, device);
                    known(&d, "disconnect")?;
                    connected.insert(d.clone(), false);
                    Action::Disconnect { user, device: d.1 }
                }
                Step::Vanish { user, device, .. } => {
                    let d = dev(user, device);
                    known(&d, "vanish")?;
                    connected.insert(d.clone(), false);
                    Action::Vanish { user, device: d.1 }
                }
                Step::PowerOff { user, device, .. } => {
                    let d = dev(user, device);
                    known(&d, "power_off")?;
                    connected.insert(d.clone(), false);
                    off.insert(d.clone());
                    Action::PowerOff { user, device: d.1 }
                }
                Step::Reconnect {
                    user,
                    device,
                    node,
                    via,
                    ..
                } => {
                    let d = dev(user, device);
                    known(&d, "reconnect")?;
                    if let Some(n) = node {
                        node_ok(n)?;
                    }
                    connected.insert(d.clone(), true);
                    Action::Reconnect {
                        user,
                        device: d.1,
                        node,
                        via,
                    }
                }
                Step::Send {
                    from,
                    device,
                    to,
                    text,
                    size,
                    count,
                    id,
                    ..
                } => {
                    let d = dev(from, device);
                    known(&d, "send")?;
                    let text = match size {
                        None => text,
                        Some(size) if size > 1 << 20 => {
                            return Err(err(format!("size = {size} (at most 1048576)")));
                        }
                        Some(size) => {
                            let head = text.unwrap_or_default();
                            if head.len() > size {
                                return Err(err(format!(
                                    "size = {size} is shorter than the text ({} bytes)",
                                    head.len()
                                )));
                            }
                            Some(crate::generate::padded(&head, size))
                        }
                    };
                    let count = count.unwrap_or(1);
                    if !(1..=100_000).contains(&count) {
                        return Err(err(format!("count = {count} (expected 1 to 100000)")));
                    }
                    if id.is_some() && count != 1 {
                        return Err(err("`id` names one message: it takes no `count`".into()));
                    }
                    Action::Send {
                        from,
                        device: d.1,
                        to,
                        text,
                        count,
                        id,
                    }
                }
                Step::Partition { a, b, .. } => {
                    host_ok(&a, file.nodes, &connected, &addresses).map_err(err)?;
                    host_ok(&b, file.nodes, &connected, &addresses).map_err(err)?;
                    Action::Partition { a, b }
                }
                Step::Heal { a, b, .. } => {
                    host_ok(&a, file.nodes, &connected, &addresses).map_err(err)?;
                    host_ok(&b, file.nodes, &connected, &addresses).map_err(err)?;
                    Action::Heal { a, b }
                }
                Step::Hold { a, b, .. } => {
                    host_ok(&a, file.nodes, &connected, &addresses).map_err(err)?;
                    host_ok(&b, file.nodes, &connected, &addresses).map_err(err)?;
                    Action::Hold { a, b }
                }
                Step::Release { a, b, .. } => {
                    host_ok(&a, file.nodes, &connected, &addresses).map_err(err)?;
                    host_ok(&b, file.nodes, &connected, &addresses).map_err(err)?;
                    Action::Release { a, b }
                }
                Step::Drain { node, .. } => {
                    node_ok(node)?;
                    Action::Drain { node }
                }
                Step::Crash { node, .. } => {
                    node_ok(node)?;
                    Action::Crash { node }
                }
                Step::Restart { node, .. } => {
                    node_ok(node)?;
                    Action::Restart { node }
                }
                Step::RedisStop { .. } => Action::RedisStop,
                Step::RedisRestart { keep_data, .. } => Action::RedisRestart { keep_data },
                Step::RedisSlow { delay, .. } => Action::RedisSlow { delay: delay.0 },
                Step::Middlebox {
                    user, device, idle, ..
                } => {
                    let d = dev(user, device);
                    known(&d, "middlebox")?;
                    Action::Middlebox {
                        user,
                        device: d.1,
                        idle: idle.0,
                    }
                }
                Step::StopReading { user, device, .. } => {
                    let d = dev(user, device);
                    known(&d, "stop_reading")?;
                    Action::StopReading { user, device: d.1 }
                }
                Step::ResumeReading { user, device, .. } => {
                    let d = dev(user, device);
                    known(&d, "resume_reading")?;
                    Action::ResumeReading { user, device: d.1 }
                }
            };
            steps.push(TimedStep { at: now, action });
        }
        for (user, profile) in &file.users {
            let id: u64 = user
                .parse()
                .map_err(|_| (profile.span(), format!("users: {user:?} is not a user id")))?;
            let p = profile
                .get_ref()
                .parse::<ClientProfile>()
                .map_err(|e| (profile.span(), e.to_string()))?;
            if !clients.contains_key(&id) {
                return Err((profile.span(), format!("users: user {id} never connects")));
            }
            clients.insert(id, p);
        }
        for c in &file.expect.closes {
            let device = c.device.as_deref().unwrap_or(DEFAULT_DEVICE);
            if !connected.contains_key(&(c.user, device.to_owned())) {
                return Err((
                    0..0,
                    format!(
                        "expect.closes: user {} (device {device:?}) never connects",
                        c.user
                    ),
                ));
            }
        }
        let mut guards = Vec::new();
        for g in &file.guards {
            let bug = g
                .get_ref()
                .parse::<Bug>()
                .map_err(|e| (g.span(), e.to_string()))?;
            if guards.contains(&bug) {
                return Err((g.span(), format!("guards: {bug} named twice")));
            }
            guards.push(bug);
        }
        Ok(Scenario {
            name: name.to_owned(),
            server,
            clients,
            devices: connected.into_keys().collect(),
            seed: file.seed,
            nodes: file.nodes,
            timeouts: t,
            network: file.network,
            guards,
            expect: file.expect,
            steps,
            trailing_end: now,
            addresses,
            tokens,
        })
    }
}

/// Checks a host name against the world: `node<N>`, `redis`, a device's
/// host (see [`device_host`]), or one of its other addresses
/// (`user<ID>@<via>`, see [`address_host`]).
fn host_ok(
    host: &str,
    nodes: u64,
    devices: &BTreeMap<(u64, String), bool>,
    addresses: &BTreeMap<(u64, String), std::collections::BTreeSet<String>>,
) -> Result<(), String> {
    let ok = host == "redis"
        || host
            .strip_prefix("node")
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| (1..=nodes).contains(&n))
        || devices.keys().any(|(u, d)| device_host(*u, d) == host)
        || addresses
            .iter()
            .any(|((u, d), vias)| vias.iter().any(|via| address_host(*u, d, via) == host));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "unknown host {host:?} (expected redis, node1..node{nodes}, or a connected device: user<ID> or user<ID>-<DEVICE>)"
        ))
    }
}

/// The device every user has unless a step names another.
pub const DEFAULT_DEVICE: &str = "phone";

/// The turmoil host of a user's device: `user1001` for the default device,
/// `user1001-tablet` for another.
pub fn device_host(user: u64, device: &str) -> String {
    if device == DEFAULT_DEVICE {
        format!("user{user}")
    } else {
        format!("user{user}-{device}")
    }
}

/// The host of a device's other network address: `user1001@cell`,
/// `user1001-tablet@wifi`. A forwarder runs there: the device's traffic to
/// the nodes goes through it, so the nodes see that address.
pub fn address_host(user: u64, device: &str, via: &str) -> String {
    format!("{}@{via}", device_host(user, device))
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}
