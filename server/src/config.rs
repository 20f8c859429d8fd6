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
}

impl Profile {
    pub const ALL: [Profile; 3] = [Profile::Phase1, Profile::Phase2, Profile::Phase3];

    pub fn name(self) -> &'static str {
        match self {
            Profile::Phase1 => "phase1",
            Profile::Phase2 => "phase2",
            Profile::Phase3 => "phase3",
        }
    }

    /// The one place where a profile turns into behaviour.
    pub fn switches(self) -> Switches {
        match self {
            Profile::Phase1 => Switches {
                full_cleanup: false,
                probe_before_push: false,
                remove_on_push_error: false,
            },
            Profile::Phase2 => Switches {
                full_cleanup: false,
                probe_before_push: true,
                remove_on_push_error: false,
            },
            Profile::Phase3 => Switches {
                full_cleanup: true,
                probe_before_push: false,
                remove_on_push_error: true,
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
#[error("unknown server profile {0:?} (expected one of: phase1, phase2, phase3)")]
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
    /// about 140 KB per idle connection).
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
            read_buffer_bytes: 4 * 1024,
            handshake_timeout: Duration::from_secs(10),
            login_timeout: Duration::from_secs(10),
            read_idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            redis_timeout: Duration::from_millis(500),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// What one server node runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub profile: Profile,
    pub limits: Limits,
    /// Prepended to every Redis key (empty by default, so the seed's set is
    /// literally `online_users`).
    pub key_prefix: String,
    /// This node's name in logs (several nodes share one Redis).
    pub node: String,
}

impl Config {
    pub fn new(profile: Profile) -> Config {
        Config {
            profile,
            limits: Limits::default(),
            key_prefix: String::new(),
            node: "node1".to_owned(),
        }
    }

    /// The seed's presence set.
    pub fn online_users_key(&self) -> String {
        format!("{}online_users", self.key_prefix)
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
    }

    #[test]
    fn only_phase3_cleans_redis_and_only_phase2_probes() {
        let s: Vec<_> = Profile::ALL.iter().map(|p| p.switches()).collect();
        assert_eq!(s.iter().filter(|s| s.full_cleanup).count(), 1);
        assert!(Profile::Phase3.switches().full_cleanup);
        assert!(Profile::Phase2.switches().probe_before_push);
        assert!(!Profile::Phase1.switches().probe_before_push);
        assert!(!Profile::Phase3.switches().probe_before_push);
    }
}
