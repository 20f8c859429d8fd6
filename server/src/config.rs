//! Server configuration: the profile switches and the limits.
//!
//! Every behaviour that differs between the seed's historical phases is a
//! named switch in [`Switches`], chosen by [`Profile`] in one place
//! ([`Profile::switches`]). The server code reads switches, never profile
//! names, so a phase is a set of decisions, not a copy of the server.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Which server the process behaves as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Profile {
    /// The seed's phase 1: disconnect removes the local map entry only and
    /// never `SREM online_users` (the seed's root cause).
    Phase1,
    /// The seed's phase 2: phase 1 plus a WebSocket Ping written before
    /// every push, removing the user when that write fails.
    Phase2,
    /// The seed's final fix as written: full cleanup by user id (close,
    /// delete, SREM), no probe, removal when a push write fails.
    Phase3,
    /// imsim's design: per-connection identity and leases, heartbeats on
    /// their own timer, a stored inbox with sequence numbers, acks and
    /// resume, cross-node doorbells, signed tokens. See ARCHITECTURE.md.
    Hardened,
}

impl Profile {
    pub const ALL: [Profile; 4] = [
        Profile::Phase1,
        Profile::Phase2,
        Profile::Phase3,
        Profile::Hardened,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Profile::Phase1 => "phase1",
            Profile::Phase2 => "phase2",
            Profile::Phase3 => "phase3",
            Profile::Hardened => "hardened",
        }
    }

    /// The one place where a profile turns into behaviour.
    pub fn switches(self) -> Switches {
        match self {
            Profile::Phase1 => Switches {
                hardened: false,
                full_cleanup: false,
                probe_before_push: false,
                remove_on_push_error: false,
            },
            Profile::Phase2 => Switches {
                hardened: false,
                full_cleanup: false,
                probe_before_push: true,
                remove_on_push_error: false,
            },
            Profile::Phase3 => Switches {
                hardened: false,
                full_cleanup: true,
                probe_before_push: false,
                remove_on_push_error: true,
            },
            Profile::Hardened => Switches {
                hardened: true,
                full_cleanup: false,
                probe_before_push: false,
                remove_on_push_error: false,
            },
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown profile name.
#[derive(Debug, thiserror::Error)]
#[error("unknown server profile {0:?} (expected one of: phase1, phase2, phase3, hardened)")]
pub struct UnknownProfile(pub String);

impl FromStr for Profile {
    type Err = UnknownProfile;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Profile::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownProfile(s.to_owned()))
    }
}

/// The behaviours that tell the seed's phases apart. All of them key the
/// connection by user id, as the seed's `RemoveWebSocketConnection(userID)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switches {
    /// The hardened design replaces the seed's whole connection model
    /// (`hardened.rs`); the seed's switches below are then all off.
    pub hardened: bool,
    /// `RemoveWebSocketConnection(userID)` closes the user's registered
    /// connection, deletes the local entry and does `SREM online_users`.
    /// Off: it deletes the local entry only (phase 1 and 2).
    pub full_cleanup: bool,
    /// Write a WebSocket Ping to the recipient before every push; when that
    /// write fails, remove the user and report the push failed (phase 2).
    pub probe_before_push: bool,
    /// When writing a push fails, remove the recipient (passive detection,
    /// phase 3). Off: the failure is only logged and reported.
    pub remove_on_push_error: bool,
}

/// A historical bug, switched back on: regression scenarios name the bugs
/// they guard, and a test turns each one on and checks the scenario then
/// fails, so every guard is proven to still catch its bug. Off in every
/// profile; only tests and `im-sim run --bug` turn them on. (The phase-2
/// probe is not here: it is the seed switch `probe_before_push`, and
/// `phase2_ping_probe_kills_legacy_clients` reproduces it directly.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bug {
    /// Phase 1: a disconnect leaves presence behind (the seed never did
    /// `SREM online_users`; hardened: the connection's lease is not removed).
    Phase1Cleanup,
    /// Phase 3: cleanup by user id, so a late cleanup of an old connection
    /// also ends the user's newer ones (hardened: drops every lease of the
    /// user and closes all of the user's connections on this node).
    Phase3CleanupByUser,
    /// Seed, every phase: "sent" means handed to a socket, not stored
    /// (hardened: a send whose store failed is still answered ok).
    SentBeforeStored,
    /// Seed: only the read deadline noticed a dead peer (hardened: the
    /// heartbeat timeout never fires).
    NoHeartbeatTimeout,
    /// Seed: a reconnect gets only new messages (hardened: the resume point
    /// is ignored; the new connection starts at the inbox's end).
    NoResume,
    /// Seed: a retried send is a new message (hardened: no dedup).
    NoDedup,
    /// Seed: a newer connection of the same device does not end the old one.
    NoSupersede,
    /// Seed: presence without expiry, so a crashed node's users stay online
    /// forever (hardened: leases are written without an expiry).
    NoLeaseExpiry,
    /// Sequence numbers restart from 0 after Redis loses its data, so a
    /// device's resume point can sit above every new message.
    SeqRestartsFromZero,
    /// Phase 3 could not route between nodes (each node knew only its own
    /// connections; hardened: no doorbell is published, so a recipient on
    /// another node waits for its pump's poll).
    NoDoorbells,
    /// Hardened only (found by the soak in `im-sim bench`): a message's
    /// sequence number is taken in one Redis round trip and the message
    /// inserted in the next, so two sessions storing for one user can land
    /// out of order and a pump that read in between skips the late one.
    SeqTakenBeforeStore,
    /// Hardened: a reply to the client's own request (SendResult,
    /// heartbeat answer, LoginOk, an ack's error) is dropped when the
    /// connection's outbound queue is full, instead of waiting for room
    /// (or closing the connection when none comes).
    RepliesDroppedWhenQueueFull,
    /// Hardened: the inbox keeps a fixed window of messages, trimmed oldest
    /// first whether or not any device has them, so "sent" can be taken
    /// back in silence; there is no backlog limit.
    InboxTrimsUndelivered,
    /// Hardened: dedup knows only (sender, id): a reused id with another
    /// text is answered "sent" and dropped, and id 0 is accepted.
    DedupByIdOnly,
    /// `im-server`: SIGTERM kills the process (no drain, leases left), as
    /// the binary did before it handled the signal.
    SigtermKills,
    /// A connection's read buffer keeps the allocation of the largest
    /// frame it ever read, and its write buffer that of the largest burst
    /// it wrote (tungstenite's behaviour before our patches).
    BuffersKeepLargeFrames,
    /// Hardened: any id is a recipient, and a user's keys never expire, so
    /// sends to made-up ids grow Redis without bound.
    UnknownRecipientsStored,
    /// Hardened: device ids and texts have no limit below the frame size.
    UnlimitedStrings,
    /// Hardened: `+ID`, `000ID` and an uppercase signature are the same
    /// token as the canonical one.
    LenientTokens,
    /// Hardened: a Redis connection loss is noticed only by the next
    /// command (the pub/sub connection stays dead until then), a failed
    /// inbox read waits for the next poll, and a command that fails on an
    /// old connection also discards its replacement.
    SlowRedisRecovery,
    /// Hardened: each login and logout subscribes or unsubscribes the
    /// user's bell itself, deciding before its Redis round trip; a logout
    /// and a login of one user crossing on a node leave it unsubscribed.
    SubscriptionRace,
    /// Hardened: a supersede names only the new connection, and every
    /// other connection of the device is closed, older or newer.
    UnorderedSupersede,
    /// Hardened: a lease refresh is a plain ZADD, so one delayed in a slow
    /// Redis can run after the logout's removal and bring the lease back.
    StaleRefreshResurrects,
    /// Hardened: a connection learns it was superseded only from the
    /// doorbell; when pub/sub loses it, nothing repairs it.
    NoSupersedeRepair,
    /// Hardened: connections are numbered in the order their logins reach
    /// Redis, ignoring the client's connection counter, so a login delayed
    /// in the network supersedes the device's newer connection.
    SupersedeByArrival,
}

impl Bug {
    pub const ALL: [Bug; 25] = [
        Bug::Phase1Cleanup,
        Bug::Phase3CleanupByUser,
        Bug::SentBeforeStored,
        Bug::NoHeartbeatTimeout,
        Bug::NoResume,
        Bug::NoDedup,
        Bug::NoSupersede,
        Bug::NoLeaseExpiry,
        Bug::SeqRestartsFromZero,
        Bug::NoDoorbells,
        Bug::SeqTakenBeforeStore,
        Bug::RepliesDroppedWhenQueueFull,
        Bug::InboxTrimsUndelivered,
        Bug::DedupByIdOnly,
        Bug::SigtermKills,
        Bug::BuffersKeepLargeFrames,
        Bug::UnknownRecipientsStored,
        Bug::UnlimitedStrings,
        Bug::LenientTokens,
        Bug::SlowRedisRecovery,
        Bug::SubscriptionRace,
        Bug::UnorderedSupersede,
        Bug::StaleRefreshResurrects,
        Bug::NoSupersedeRepair,
        Bug::SupersedeByArrival,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Bug::Phase1Cleanup => "phase1_cleanup",
            Bug::Phase3CleanupByUser => "phase3_cleanup_by_user",
            Bug::SentBeforeStored => "sent_before_stored",
            Bug::NoHeartbeatTimeout => "no_heartbeat_timeout",
            Bug::NoResume => "no_resume",
            Bug::NoDedup => "no_dedup",
            Bug::NoSupersede => "no_supersede",
            Bug::NoLeaseExpiry => "no_lease_expiry",
            Bug::SeqRestartsFromZero => "seq_restarts_from_zero",
            Bug::NoDoorbells => "no_doorbells",
            Bug::SeqTakenBeforeStore => "seq_taken_before_store",
            Bug::RepliesDroppedWhenQueueFull => "replies_dropped_when_queue_full",
            Bug::InboxTrimsUndelivered => "inbox_trims_undelivered",
            Bug::DedupByIdOnly => "dedup_by_id_only",
            Bug::SigtermKills => "sigterm_kills",
            Bug::BuffersKeepLargeFrames => "buffers_keep_large_frames",
            Bug::UnknownRecipientsStored => "unknown_recipients_stored",
            Bug::UnlimitedStrings => "unlimited_strings",
            Bug::LenientTokens => "lenient_tokens",
            Bug::SlowRedisRecovery => "slow_redis_recovery",
            Bug::SubscriptionRace => "subscription_race",
            Bug::UnorderedSupersede => "unordered_supersede",
            Bug::StaleRefreshResurrects => "stale_refresh_resurrects",
            Bug::NoSupersedeRepair => "no_supersede_repair",
            Bug::SupersedeByArrival => "supersede_by_arrival",
        }
    }

    /// What the bug does, in one line (for `im-sim bugs`).
    pub fn summary(self) -> &'static str {
        match self {
            Bug::Phase1Cleanup => {
                "a disconnect leaves presence behind (the seed never did SREM online_users)"
            }
            Bug::Phase3CleanupByUser => {
                "cleanup by user id: an old connection's late cleanup ends the user's newer ones"
            }
            Bug::SentBeforeStored => "\"sent\" for a send whose store failed",
            Bug::NoHeartbeatTimeout => "a silent peer is never timed out",
            Bug::NoResume => "a reconnect gets only new messages; what was missed is skipped",
            Bug::NoDedup => "a retried send is stored again",
            Bug::NoSupersede => "a newer connection of a device does not end the older one",
            Bug::NoLeaseExpiry => "leases never expire: a crashed node's users stay online",
            Bug::SeqRestartsFromZero => "sequence numbers restart at 0 after Redis loses its data",
            Bug::NoDoorbells => "no doorbell: a recipient on another node waits for its poll",
            Bug::SeqTakenBeforeStore => {
                "number and insert in two round trips: concurrent stores land out of order"
            }
            Bug::RepliesDroppedWhenQueueFull => {
                "a reply is dropped when the outbound queue is full"
            }
            Bug::InboxTrimsUndelivered => {
                "the inbox trims messages no device has, after they were told sent"
            }
            Bug::DedupByIdOnly => {
                "a reused id with another text is answered sent and dropped; id 0 accepted"
            }
            Bug::SigtermKills => "SIGTERM kills the process: no drain, leases left",
            Bug::BuffersKeepLargeFrames => {
                "a connection keeps buffers the size of its largest frame for good"
            }
            Bug::UnknownRecipientsStored => "any id is a recipient and keys never expire",
            Bug::UnlimitedStrings => "device ids and texts have no limit below the frame size",
            Bug::LenientTokens => "+ID, 000ID and an uppercase signature are the same token",
            Bug::SlowRedisRecovery => "a lost Redis connection is noticed only by the next command",
            Bug::SubscriptionRace => {
                "a logout's UNSUBSCRIBE and a login's SUBSCRIBE cross: the node goes deaf"
            }
            Bug::UnorderedSupersede => {
                "a supersede closes every other connection of the device, newer ones too"
            }
            Bug::StaleRefreshResurrects => {
                "a lease refresh delayed in Redis brings back a released lease"
            }
            Bug::NoSupersedeRepair => "a supersede whose doorbell was lost is never repaired",
            Bug::SupersedeByArrival => {
                "a login delayed in the network supersedes the device's newer connection"
            }
        }
    }

    /// The live test (in `server/tests/it/`) that guards a bug on real
    /// parts (a process signal, allocator memory, keys expiring in a real
    /// Redis); `None` for bugs only scenarios guard. Some bugs have both.
    pub fn live_guard(self) -> Option<&'static str> {
        match self {
            Bug::SigtermKills => Some("signals::sigterm_drains_connections_and_releases_leases"),
            Bug::BuffersKeepLargeFrames => {
                Some("memory::an_idle_connection_stays_small_after_a_large_frame")
            }
            Bug::UnknownRecipientsStored => {
                Some("hostile::sends_to_made_up_recipients_store_nothing")
            }
            Bug::UnlimitedStrings => Some("hostile::a_long_device_id_is_refused"),
            Bug::LenientTokens => Some("hostile::only_the_canonical_token_logs_in"),
            _ => None,
        }
    }
}

impl fmt::Display for Bug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown bug name.
#[derive(Debug, thiserror::Error)]
#[error("unknown bug {0:?} (expected one of: {names})", names = Bug::ALL.map(Bug::name).join(", "))]
pub struct UnknownBug(pub String);

impl FromStr for Bug {
    type Err = UnknownBug;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Bug::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| UnknownBug(s.to_owned()))
    }
}

/// Everything has a limit (TigerBeetle's "put a limit on everything").
/// These hold in every profile.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Concurrent WebSocket connections per node; one more is closed with
    /// 1013 (try again later) right after the handshake.
    pub connections_max: usize,
    /// Largest inbound WebSocket frame payload; larger closes with 1009.
    pub frame_bytes_max: usize,
    /// Largest inbound WebSocket message (all its frames); larger closes
    /// with 1009.
    pub message_bytes_max: usize,
    /// Frames waiting in one connection's outbound queue; a push that finds
    /// it full fails like a failed write.
    pub outbound_queue_max: usize,
    /// tungstenite's read buffer per connection (its 128 KiB default costs
    /// about 140 KB per idle connection). One read takes up to this much,
    /// about 15 chat frames; a larger frame grows the buffer as needed.
    pub read_buffer_bytes: usize,
    /// Time allowed for the WebSocket handshake.
    pub handshake_timeout: Duration,
    /// Time allowed between the handshake and a Login.
    pub login_timeout: Duration,
    /// A connection that sends nothing for this long is closed, the way the
    /// seed's deployment (gorilla read deadline / nginx proxy_read_timeout,
    /// 60 s by default) ended silent connections.
    pub read_idle_timeout: Duration,
    /// Time one socket write may take before it counts as failed (the
    /// seed's gorilla write deadline).
    pub write_timeout: Duration,
    /// Time one Redis command (or connect) may take.
    pub redis_timeout: Duration,
    /// Time connections get to close on shutdown before they are dropped.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_max: 10_000,
            frame_bytes_max: 64 * 1024,
            message_bytes_max: 64 * 1024,
            outbound_queue_max: 256,
            read_buffer_bytes: 1024,
            handshake_timeout: Duration::from_secs(10),
            login_timeout: Duration::from_secs(10),
            read_idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            redis_timeout: Duration::from_millis(500),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// The hardened profile's timers and bounds, with the reasons for the
/// defaults in ARCHITECTURE.md.
#[derive(Clone, Copy, Debug)]
pub struct Hardened {
    /// How often each side sends a Heartbeat, and how often a connection's
    /// presence lease is refreshed.
    pub heartbeat_interval: Duration,
    /// A connection silent this long is closed (4003) and cleaned up: a
    /// half-open connection is detected within this bound.
    pub heartbeat_timeout: Duration,
    /// A presence lease lives this long unless refreshed; a crashed node's
    /// users go offline by themselves within it.
    pub lease_ttl: Duration,
    /// Messages some device of the recipient has acknowledged that the
    /// inbox keeps for the user's other devices (oldest trimmed first).
    pub inbox_history_max: u64,
    /// Messages no device of the recipient has acknowledged yet: one more
    /// is refused as INBOX_FULL (retry later), never trimmed.
    pub inbox_backlog_max: u64,
    /// Inbox messages read per Redis round trip.
    pub inbox_page_len: usize,
    /// How long a (sender, client_msg_id) is remembered for dedup.
    pub dedup_ttl: Duration,
    /// A user's keys (the user record, inbox, counter) expire when the user
    /// neither logs in nor receives a message for this long; a message
    /// waits at most this long for a recipient who never comes back.
    pub retention: Duration,
    /// Acknowledgements are written to Redis once this many have come in
    /// since the last write (and at every heartbeat and at logout).
    pub ack_write_every: u64,
    /// The largest chat text, in bytes.
    pub text_bytes_max: usize,
    /// The longest device id, in bytes.
    pub device_id_bytes_max: usize,
    /// How often each node PINGs Redis on its connection: a connection
    /// that died in silence (a black-holed path never sends FIN) is found
    /// within this plus the command timeout, and redialed with its
    /// subscriptions, rather than at the next command that happens to run.
    pub redis_ping_interval: Duration,
    /// What a send refused for want of Redis asks the client to wait.
    pub retry_after_unavailable: Duration,
    /// What a send refused for a full inbox asks the client to wait.
    pub retry_after_inbox_full: Duration,
}

impl Default for Hardened {
    fn default() -> Self {
        Hardened {
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(25),
            lease_ttl: Duration::from_secs(30),
            inbox_history_max: 1000,
            inbox_backlog_max: 1000,
            inbox_page_len: 100,
            dedup_ttl: Duration::from_secs(24 * 3600),
            retention: Duration::from_secs(30 * 24 * 3600),
            ack_write_every: 32,
            redis_ping_interval: Duration::from_secs(2),
            text_bytes_max: 4096,
            device_id_bytes_max: 64,
            retry_after_unavailable: Duration::from_secs(1),
            retry_after_inbox_full: Duration::from_secs(5),
        }
    }
}

/// Unix time in milliseconds. Injected, so the simulation can give its own.
pub type UnixClock = std::sync::Arc<dyn Fn() -> u64 + Send + Sync>;

/// The wall clock, for production. The only wall-clock read in the server.
pub fn system_clock() -> UnixClock {
    std::sync::Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    })
}

/// What one server node runs with.
#[derive(Clone)]
pub struct Config {
    pub profile: Profile,
    pub limits: Limits,
    pub hardened: Hardened,
    /// Secret for login tokens (hardened; required there).
    pub auth_secret: Option<Vec<u8>>,
    /// Unix time for token expiry and lease scores.
    pub clock: UnixClock,
    /// Prepended to every Redis key (empty by default, so the seed's set is
    /// literally `online_users`).
    pub key_prefix: String,
    /// This node's name in logs (several nodes share one Redis).
    pub node: String,
    /// Historical bugs switched back on (tests only; empty in production).
    pub bugs: std::collections::BTreeSet<Bug>,
}

impl Config {
    pub fn new(profile: Profile) -> Config {
        Config {
            profile,
            limits: Limits::default(),
            hardened: Hardened::default(),
            auth_secret: None,
            clock: system_clock(),
            key_prefix: String::new(),
            node: "node1".to_owned(),
            bugs: Default::default(),
        }
    }

    /// The profile's switches with any re-enabled seed bug applied: the
    /// one place server code reads behaviour from.
    pub fn switches(&self) -> Switches {
        let mut s = self.profile.switches();
        if !s.hardened && self.has(Bug::Phase1Cleanup) {
            s.full_cleanup = false;
        }
        s
    }

    /// Whether a historical bug is switched back on.
    pub fn has(&self, bug: Bug) -> bool {
        self.bugs.contains(&bug)
    }

    /// A key of one user's, with a hash tag so all of a user's keys share
    /// one Redis Cluster slot (and no key names two users).
    pub fn user_key(&self, user: im_proto::UserId, what: &str) -> String {
        format!("{}im:{{u:{}}}:{what}", self.key_prefix, user.0)
    }

    /// The seed's presence set.
    pub fn online_users_key(&self) -> String {
        format!("{}online_users", self.key_prefix)
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("profile", &self.profile)
            .field("limits", &self.limits)
            .field("hardened", &self.hardened)
            .field("auth_secret", &self.auth_secret.as_ref().map(|_| "<set>"))
            .field("key_prefix", &self.key_prefix)
            .field("node", &self.node)
            .field("bugs", &self.bugs)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_names_round_trip() {
        for p in Profile::ALL {
            assert_eq!(p.name().parse::<Profile>().unwrap(), p);
        }
        assert!("phase4".parse::<Profile>().is_err());
        assert_eq!("hardened".parse::<Profile>().unwrap(), Profile::Hardened);
    }

    #[test]
    fn only_phase3_cleans_redis_and_only_phase2_probes() {
        let s: Vec<_> = Profile::ALL.iter().map(|p| p.switches()).collect();
        assert_eq!(s.iter().filter(|s| s.full_cleanup).count(), 1);
        assert_eq!(s.iter().filter(|s| s.hardened).count(), 1);
        assert!(Profile::Phase3.switches().full_cleanup);
        assert!(Profile::Phase2.switches().probe_before_push);
        assert!(!Profile::Phase1.switches().probe_before_push);
        assert!(!Profile::Phase3.switches().probe_before_push);
    }
}
