//! The fuzz harness for imsim's server: what the targets in
//! `fuzz_targets/` run, and what `examples/seeds.rs` writes seeds for.
//!
//! Each input runs on a fresh current-thread tokio runtime with a paused
//! clock (so timeouts fire as soon as everything waits, and a run is
//! deterministic), a fresh [`Server`] node built from production defaults,
//! and a fresh [`FakeRedis`](fake_redis::FakeRedis) behind its Redis
//! connector. Each client connection is an in-memory `tokio::io::duplex`
//! stream served by the server's real per-connection code
//! ([`im_server::fuzzing::serve`]): WebSocket handshake, tungstenite frame
//! parsing, protobuf decoding, login, sends, acks, heartbeats, cleanup.
//!
//! What counts as a failure: a panic anywhere (libfuzzer-sys aborts on a
//! panic in any thread, spawned tasks included), an allocation above the
//! limit ([`alloc`]), and a connection that has not ended
//! [`LIVENESS`] of simulated time after its client stopped sending.
//!
//! # Input format (targets `inbound` and `session`)
//!
//! `[flags] conn0 [SEPARATOR conn1 [SEPARATOR conn2 [SEPARATOR conn3]]]`
//!
//! - `flags` bits: 0-1 profile (phase1, phase2, phase3, hardened),
//!   [`RAW_HANDSHAKE`], [`KEEP_OPEN`], [`TRICKLE`], [`SHUTDOWN`],
//!   [`SMALL_LIMITS`], [`STALLED_READER`].
//! - `inbound`: each connection's bytes are what its client writes after
//!   the fixed HTTP upgrade request ([`handshake`]): raw WebSocket frames
//!   (a client's frames must be masked; a zero mask key leaves the payload
//!   as it is, which the seeds use so mutations act on protobuf bytes).
//! - `session`: each connection's bytes are records
//!   `[ctl][len: u16 BE][payload]` that the harness turns into frames
//!   ([`records_to_frames`]), so lengths always agree and the fuzzer works
//!   on message content and sequencing.
//!
//! Connection `i` starts writing at `i` seconds (simulated); every client
//! half-closes (or, with [`SHUTDOWN`], the node shuts down) at `n + 1`
//! seconds, so earlier connections are still open when later ones send to
//! them.

pub mod alloc;
pub mod fake_redis;

use std::sync::Arc;
use std::time::Duration;

use im_proto::pb;
use im_server::{Config, Profile, RedisLink, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::Instant;

/// The auth secret every fuzzed node uses (hardened logins need a token
/// signed with it; the seeds carry valid ones).
pub const SECRET: &[u8] = b"imsim-fuzz-secret";
/// The fuzzed node's wall clock (unix ms), fixed so tokens stay valid.
pub const NOW_MS: u64 = 1_700_000_000_000;
/// Expiry of the seeds' tokens (unix s), well after [`NOW_MS`].
pub const TOKEN_EXPIRES_S: u64 = 1_800_000_000;

/// Separates connections in an input.
pub const SEPARATOR: &[u8] = b"<<next-connection>>";
/// At most this many connections per input (more are ignored).
pub const CONNECTIONS_MAX: usize = 4;

/// Flag: the input carries its own HTTP upgrade request (the handshake is
/// fuzzed too); otherwise [`handshake`] is written first.
pub const RAW_HANDSHAKE: u8 = 1 << 2;
/// Flag: clients never half-close; the server's own timeouts must end
/// every connection (login, idle, heartbeat, write).
pub const KEEP_OPEN: u8 = 1 << 3;
/// Flag: clients write a few bytes at a time, yielding in between, so the
/// server's parsers see every split of a frame.
pub const TRICKLE: u8 = 1 << 4;
/// Flag: the node shuts down (1001/1012 to every connection) once every
/// client has written its input.
pub const SHUTDOWN: u8 = 1 << 5;
/// Flag: tiny limits (frames and messages 1 KiB, outbound queue 4), so
/// the limit paths are reachable with small inputs.
pub const SMALL_LIMITS: u8 = 1 << 6;
/// Flag: clients never read, so the server's writes back up (write
/// timeouts, full outbound queues, slow consumers).
pub const STALLED_READER: u8 = 1 << 7;

/// Every connection must have ended this long (simulated) after its
/// client stopped sending; the longest legitimate wait is the 60 s read
/// idle timeout plus a 10 s write timeout.
pub const LIVENESS: Duration = Duration::from_secs(600);

/// Capacity of each in-memory client stream, per direction.
const DUPLEX_BYTES: usize = 16 * 1024;

/// What one input asks for.
#[derive(Clone, Debug)]
pub struct Case {
    pub flags: u8,
    /// Bytes each client writes (after the handshake, unless
    /// [`RAW_HANDSHAKE`]).
    pub connections: Vec<Vec<u8>>,
}

impl Case {
    pub fn profile(&self) -> Profile {
        Profile::ALL[usize::from(self.flags & 3)]
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// Splits an input into its flags and connections.
pub fn split(data: &[u8]) -> Option<(u8, Vec<&[u8]>)> {
    let (&flags, mut rest) = data.split_first()?;
    let mut conns = Vec::new();
    while conns.len() + 1 < CONNECTIONS_MAX {
        match find(rest, SEPARATOR) {
            Some(at) => {
                conns.push(&rest[..at]);
                rest = &rest[at + SEPARATOR.len()..];
            }
            None => break,
        }
    }
    conns.push(rest);
    Some((flags, conns))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Joins flags and connections into an input (the inverse of [`split`]).
pub fn join(flags: u8, connections: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![flags];
    for (i, c) in connections.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(SEPARATOR);
        }
        out.extend_from_slice(c);
    }
    out
}

/// Target `inbound`: raw client bytes.
pub fn run_inbound(data: &[u8]) {
    let Some((flags, conns)) = split(data) else {
        return;
    };
    run(&Case {
        flags,
        connections: conns.into_iter().map(<[u8]>::to_vec).collect(),
    });
}

/// Target `session`: records that the harness frames.
pub fn run_session(data: &[u8]) {
    let Some((flags, conns)) = split(data) else {
        return;
    };
    run(&Case {
        flags,
        connections: conns.into_iter().map(records_to_frames).collect(),
    });
}

/// The fixed HTTP upgrade request to `/ws` written before each
/// connection's bytes (unless [`RAW_HANDSHAKE`]).
pub fn handshake() -> Vec<u8> {
    b"GET /ws HTTP/1.1\r\n\
      Host: node\r\n\
      Connection: Upgrade\r\n\
      Upgrade: websocket\r\n\
      Sec-WebSocket-Version: 13\r\n\
      Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
      \r\n"
        .to_vec()
}

/// WebSocket opcodes.
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// One client-to-server frame, as RFC 6455 lays it out. `mask: None`
/// sends it unmasked (a protocol violation from a client).
pub fn frame(fin: bool, rsv1: bool, op: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | (u8::from(rsv1) << 6) | (op & 0x0f)];
    let masked = u8::from(mask.is_some()) << 7;
    match payload.len() {
        n @ 0..=125 => out.push(masked | n as u8),
        n @ 126..=0xffff => {
            out.push(masked | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(masked | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A complete, final, masked (zero key) Binary frame holding `body`.
pub fn binary(body: pb::envelope::Body) -> Vec<u8> {
    frame(
        true,
        false,
        opcode::BINARY,
        Some([0; 4]),
        &im_proto::encode(body),
    )
}

/// Record control byte: low nibble is the opcode (any, reserved ones
/// too); these bits alter the frame.
pub mod ctl {
    /// Not the final frame of its message (FIN clear).
    pub const MORE: u8 = 1 << 4;
    /// Masked with a non-zero key (the payload is still given in clear).
    pub const REAL_MASK: u8 = 1 << 5;
    /// Not masked at all (a protocol violation from a client).
    pub const UNMASKED: u8 = 1 << 6;
    /// RSV1 set (no extension was negotiated: a protocol violation).
    pub const RSV1: u8 = 1 << 7;
}

/// Turns `[ctl][len: u16 BE][payload]` records into frames; a record
/// whose payload runs past the end takes what is left.
pub fn records_to_frames(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some((&c, rest)) = data.split_first() {
        let (len, rest) = match rest {
            [hi, lo, rest @ ..] => (usize::from(u16::from_be_bytes([*hi, *lo])), rest),
            _ => (0, &[][..]),
        };
        let (payload, rest) = rest.split_at(len.min(rest.len()));
        let mask = if c & ctl::UNMASKED != 0 {
            None
        } else if c & ctl::REAL_MASK != 0 {
            Some([0x37, 0xfa, 0x21, 0x3d])
        } else {
            Some([0; 4])
        };
        out.extend(frame(
            c & ctl::MORE == 0,
            c & ctl::RSV1 != 0,
            c & 0x0f,
            mask,
            payload,
        ));
        data = rest;
    }
    out
}

/// One record for the `session` target.
pub fn record(c: u8, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(payload.len()).expect("a record payload fits in u16");
    let mut out = vec![c];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Runs one case to its end; panics if a connection outlives [`LIVENESS`].
pub fn run(case: &Case) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    rt.block_on(drive(case));
}

fn config(case: &Case) -> Config {
    let mut config = Config::new(case.profile());
    config.auth_secret = Some(SECRET.to_vec());
    config.clock = Arc::new(|| NOW_MS);
    config.node = "fuzz".to_owned();
    if case.has(SMALL_LIMITS) {
        config.limits.frame_bytes_max = 1024;
        config.limits.message_bytes_max = 1024;
        config.limits.outbound_queue_max = 4;
        config.limits.read_buffer_bytes = 256;
    }
    config
}

async fn drive(case: &Case) {
    let fake = fake_redis::FakeRedis::default();
    let config = config(case);
    let link = RedisLink::new(
        fake.connector(),
        Default::default(),
        config.limits.redis_timeout,
    );
    let server = Server::new(config, link);
    let background = im_server::fuzzing::background(&server).map(tokio::spawn);

    let t0 = Instant::now();
    let n = case.connections.len() as u64;
    let release = t0 + Duration::from_secs(n + 1);
    let mut sessions = Vec::new();
    let mut clients = Vec::new();
    for (i, input) in case.connections.iter().enumerate() {
        let (client, server_side) = tokio::io::duplex(DUPLEX_BYTES);
        let node = server.clone();
        sessions.push(tokio::spawn(async move {
            im_server::fuzzing::serve(&node, server_side, &format!("client{i}")).await
        }));
        let (request, frames) = if case.has(RAW_HANDSHAKE) {
            split_request(input)
        } else {
            (handshake(), input.clone())
        };
        let start = t0 + Duration::from_secs(i as u64);
        clients.push(tokio::spawn(client_side(
            client,
            [request, frames],
            start,
            release,
            case.flags,
        )));
    }
    let shutdown = case.has(SHUTDOWN).then(|| {
        let node = server.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(release).await;
            im_server::fuzzing::shutdown(&node);
        })
    });

    let all_ended = async {
        for session in sessions {
            if let Err(e) = session.await
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    };
    if tokio::time::timeout_at(release + LIVENESS, all_ended)
        .await
        .is_err()
    {
        panic!(
            "a connection was still open {LIVENESS:?} (simulated) after its client stopped \
             sending ({} connections, {:?}, flags {:#04x})",
            case.connections.len(),
            case.profile(),
            case.flags
        );
    }
    for task in clients.into_iter().chain(shutdown).chain(background) {
        task.abort();
    }
}

/// Splits a raw input after its HTTP request (the first blank line); all
/// of it is the request when there is none.
fn split_request(input: &[u8]) -> (Vec<u8>, Vec<u8>) {
    match find(input, b"\r\n\r\n") {
        Some(at) => (input[..at + 4].to_vec(), input[at + 4..].to_vec()),
        None => (input.to_vec(), Vec::new()),
    }
}

/// One client: from `start` on writes its HTTP request, waits for the
/// server to answer it (as a real client does: tungstenite refuses bytes
/// that arrive with the request), writes its frames, then half-closes at
/// `release` (unless [`KEEP_OPEN`]); reads and discards whatever the
/// server sends (unless [`STALLED_READER`]) until the server hangs up.
async fn client_side(
    stream: DuplexStream,
    [request, frames]: [Vec<u8>; 2],
    start: Instant,
    release: Instant,
    flags: u8,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = async move {
        tokio::time::sleep_until(start).await;
        'write: for (n, bytes) in [request, frames].into_iter().enumerate() {
            if n > 0 {
                // With the clock paused this wakes once the server is idle,
                // i.e. after it has answered the request.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if flags & TRICKLE != 0 {
                let mut rest = &bytes[..];
                for i in 0.. {
                    if rest.is_empty() {
                        break;
                    }
                    let (piece, tail) = rest.split_at(rest.len().min(1 + i % 7));
                    if wr.write_all(piece).await.is_err() {
                        break 'write;
                    }
                    rest = tail;
                    tokio::task::yield_now().await;
                }
            } else if wr.write_all(&bytes).await.is_err() {
                break;
            }
        }
        tokio::time::sleep_until(release).await;
        if flags & KEEP_OPEN == 0 {
            let _ = wr.shutdown().await;
        }
        // Hold the write half (and so the stream) until the server hangs up.
        std::future::pending::<()>().await;
    };
    let reader = async move {
        if flags & STALLED_READER != 0 {
            return std::future::pending::<()>().await;
        }
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = rd.read(&mut buf).await
            && n > 0
        {}
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
    }
}

/// Target `proto`: the protobuf decode every Binary frame goes through,
/// and the login token check, with their own consistency checks.
pub fn run_proto(data: &[u8]) {
    use prost::Message as _;
    let now_s = NOW_MS / 1000;
    match im_proto::decode(data) {
        Ok(body) => {
            // Re-encoding is canonical, and decodes to the same body.
            let envelope = pb::Envelope {
                body: Some(body.clone()),
            };
            let bytes = im_proto::encode(body.clone());
            assert_eq!(bytes.len(), envelope.encoded_len());
            assert_eq!(im_proto::decode(&bytes).ok(), Some(body.clone()));
            if let pb::envelope::Body::Login(login) = &body {
                check_token(&login.token, now_s);
            }
        }
        Err(im_proto::DecodeError::NoBody) => {
            assert!(pb::Envelope::decode(data).is_ok_and(|e| e.body.is_none()));
        }
        Err(im_proto::DecodeError::Protobuf(_)) => {}
    }
    if let Ok(token) = std::str::from_utf8(data) {
        check_token(token, now_s);
    }
}

fn check_token(token: &str, now_s: u64) {
    if let Ok(user) = im_proto::token::verify(SECRET, token, now_s) {
        // Only the secret's holder can make a token that verifies: the
        // fuzzer has it only from the seeds, so the names must match.
        assert_ne!(user.0, 0, "a verified token names user 0");
        let (payload, _) = token.rsplit_once('.').expect("a verified token has a dot");
        let expires: u64 = payload
            .rsplit('.')
            .next()
            .and_then(|e| e.parse().ok())
            .expect("a verified token has an expiry");
        assert!(expires > now_s);
        assert_eq!(
            im_proto::token::verify(SECRET, token, expires),
            Err(im_proto::token::TokenError::Expired {
                expired_at: expires,
                now: expires
            })
        );
    }
}

/// Installs a `tracing` subscriber when `IMSIM_FUZZ_LOG` is set (e.g.
/// `IMSIM_FUZZ_LOG=debug` when reproducing one input); a no-op otherwise.
pub fn init_logging() {
    if let Ok(filter) = std::env::var("IMSIM_FUZZ_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}
