//! Writes the committed seed corpus: `cargo run --example seeds` (from
//! `fuzz/`, or `fuzz/run --seeds`). Every seed is built from the real
//! encoders (`im_proto::encode`, `token::mint`) and the harness's own
//! framing, never typed in as hex, and is replayed by the harness before it
//! is written, so a seed that panics is never committed.
//!
//! Each logical seed (a list of connections, each a list of frames) is
//! written twice: as records for `session` and as raw frames for
//! `inbound`, which also gets the seeds only raw bytes can express
//! (handshakes, impossible lengths).

use std::fs;
use std::path::{Path, PathBuf};

use im_fuzz::{KEEP_OPEN, RAW_HANDSHAKE, SHUTDOWN, SMALL_LIMITS, STALLED_READER, TRICKLE};
use im_fuzz::{ctl, opcode, record};
use im_proto::pb::{self, envelope::Body};
use im_proto::{UserId, msg, token};

const PHASE1: u8 = 0;
const PHASE2: u8 = 1;
const PHASE3: u8 = 2;
const HARDENED: u8 = 3;

/// The first sequence number the fake Redis hands out for a user (the
/// counter starts at the clock in unix ms × 1000).
const FIRST_SEQ: u64 = im_fuzz::NOW_MS * 1000 + 1;

/// One frame of a seed: its record control byte and payload.
type Frame = (u8, Vec<u8>);

fn bin(body: Body) -> Frame {
    (opcode::BINARY, im_proto::encode(body).to_vec())
}

fn close(code: u16, reason: &str) -> Frame {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    (opcode::CLOSE, p)
}

fn ping(p: &[u8]) -> Frame {
    (opcode::PING, p.to_vec())
}

fn login(user: u64) -> Frame {
    bin(msg::login(user))
}

fn tok(user: u64) -> String {
    token::mint(im_fuzz::SECRET, UserId(user), im_fuzz::TOKEN_EXPIRES_S)
}

fn hard_login(user: u64, device: &str, resume: u64) -> Frame {
    bin(Body::Login(pb::Login {
        user_id: 0,
        token: tok(user),
        device_id: device.to_owned(),
        resume_after_seq: resume,
        ..Default::default()
    }))
}

fn send(to: u64, text: &str, id: u64) -> Frame {
    bin(msg::send(to, text, id))
}

fn ack(seq: u64) -> Frame {
    bin(Body::Ack(pb::Ack { seq }))
}

fn heartbeat(nonce: u64, reply: bool) -> Frame {
    bin(Body::Heartbeat(pb::Heartbeat { nonce, reply }))
}

fn bye() -> Frame {
    close(1000, "bye")
}

/// The seeds both `session` and `inbound` get: (name, flags, connections).
fn logical() -> Vec<(&'static str, u8, Vec<Vec<Frame>>)> {
    let big = "x".repeat(2000);
    let mut fragmented_login = Vec::new();
    {
        let (_, payload) = login(1001);
        let (a, b) = payload.split_at(2);
        fragmented_login.push((opcode::BINARY | ctl::MORE, a.to_vec()));
        fragmented_login.push(ping(b"between fragments"));
        fragmented_login.push((opcode::CONTINUATION, b.to_vec()));
        fragmented_login.push(send(1001, "to myself", 1));
        fragmented_login.push(bye());
    }
    vec![
        ("phase1-login-close", PHASE1, vec![vec![login(1001), bye()]]),
        (
            "phase1-login-send-ping-pong",
            PHASE1,
            vec![vec![
                login(1001),
                send(1001, "hi me", 1),
                send(0, "nobody", 2),
                send(1002, "offline", 3),
                ping(b"p"),
                (opcode::PONG, b"unsolicited".to_vec()),
                bye(),
            ]],
        ),
        (
            "phase2-two-users-chat",
            PHASE2,
            vec![
                vec![login(1001), send(1002, "hello 1002", 1)],
                vec![login(1002), send(1001, "hello 1001", 1), bye()],
            ],
        ),
        (
            "phase3-relogin-replaces",
            PHASE3,
            vec![
                vec![login(1001), send(1002, "first", 1)],
                vec![login(1002)],
                vec![login(1001), send(1002, "second", 2), bye()],
            ],
        ),
        (
            "hardened-chat-ack-heartbeat",
            HARDENED,
            vec![
                vec![
                    hard_login(1001, "phone", 0),
                    send(1002, "stored for later", 1),
                    send(1002, "stored for later", 1),
                    heartbeat(1, false),
                    heartbeat(7, true),
                ],
                vec![
                    hard_login(1002, "laptop", 0),
                    ack(FIRST_SEQ),
                    ack(FIRST_SEQ + 100),
                    send(1001, "answer", 1),
                ],
                vec![hard_login(1001, "phone", 0), bye()],
            ],
        ),
        (
            "hardened-bad-resume",
            HARDENED,
            vec![vec![hard_login(1001, "", FIRST_SEQ + 5)]],
        ),
        (
            "hardened-forged-token",
            HARDENED,
            vec![vec![bin(Body::Login(pb::Login {
                user_id: 1001,
                token: tok(1001).replace("v1.1001.", "v1.1002."),
                device_id: "phone".into(),
                resume_after_seq: 0,
                ..Default::default()
            }))]],
        ),
        ("hardened-no-token", HARDENED, vec![vec![login(1001)]]),
        (
            "hardened-shutdown",
            HARDENED | SHUTDOWN,
            vec![
                vec![hard_login(1001, "phone", 0)],
                vec![hard_login(1002, "", 0)],
            ],
        ),
        (
            "phase1-shutdown",
            PHASE1 | SHUTDOWN,
            vec![vec![login(1001)], vec![login(1002)]],
        ),
        (
            "send-before-login",
            PHASE1,
            vec![vec![send(1002, "early", 1)]],
        ),
        ("user-zero", PHASE3, vec![vec![login(0)]]),
        ("second-login", PHASE1, vec![vec![login(1001), login(1002)]]),
        (
            "server-message-from-client",
            PHASE1,
            vec![vec![
                login(1001),
                bin(Body::Deliver(pb::Deliver {
                    from_user_id: 1002,
                    text: "forged".into(),
                    client_msg_id: 1,
                    seq: 1,
                })),
            ]],
        ),
        (
            "error-from-client",
            PHASE2,
            vec![vec![
                login(1001),
                bin(msg::error(pb::ErrorCode::Protocol, "x")),
            ]],
        ),
        ("empty-binary", PHASE1, vec![vec![(opcode::BINARY, vec![])]]),
        (
            "garbage-protobuf",
            PHASE1,
            vec![vec![(opcode::BINARY, vec![0xff, 0xff, 0xff, 0x0f, 0x1a])]],
        ),
        (
            "text-frame",
            PHASE1,
            vec![vec![(opcode::TEXT, b"{\"login\":1001}".to_vec())]],
        ),
        (
            "invalid-utf8-text",
            PHASE1,
            vec![vec![(opcode::TEXT, vec![0xc3, 0x28])]],
        ),
        ("fragmented-login", PHASE1, vec![fragmented_login.clone()]),
        (
            "fragmented-login-trickle",
            PHASE1 | TRICKLE,
            vec![fragmented_login],
        ),
        (
            "unmasked-frame",
            PHASE1,
            vec![vec![(opcode::BINARY | ctl::UNMASKED, msg_bytes(1001))]],
        ),
        (
            "real-mask",
            PHASE1,
            vec![vec![
                (opcode::BINARY | ctl::REAL_MASK, msg_bytes(1001)),
                (opcode::CLOSE | ctl::REAL_MASK, vec![0x03, 0xe8]),
            ]],
        ),
        (
            "rsv1-set",
            PHASE1,
            vec![vec![(opcode::BINARY | ctl::RSV1, msg_bytes(1))]],
        ),
        ("reserved-opcode", PHASE1, vec![vec![(0x3, b"?".to_vec())]]),
        (
            "continuation-without-start",
            PHASE1,
            vec![vec![(opcode::CONTINUATION, msg_bytes(1001))]],
        ),
        (
            "fragmented-ping",
            PHASE1,
            vec![vec![login(1001), (opcode::PING | ctl::MORE, b"p".to_vec())]],
        ),
        (
            "ping-too-long",
            PHASE1,
            vec![vec![login(1001), (opcode::PING, vec![b'p'; 126])]],
        ),
        (
            "close-variants",
            PHASE1,
            vec![
                vec![login(1001), (opcode::CLOSE, vec![0x03])],
                vec![login(1002), (opcode::CLOSE, vec![0x03, 0xe8, 0xc3, 0x28])],
                vec![login(1003), close(999, "bad code")],
                vec![login(1004), (opcode::CLOSE, vec![])],
            ],
        ),
        (
            "keep-open-not-logged-in",
            PHASE1 | KEEP_OPEN,
            vec![vec![ping(b"anyone?")]],
        ),
        (
            "keep-open-phase3-idle",
            PHASE3 | KEEP_OPEN,
            vec![vec![login(1001)], vec![login(1002), send(1001, "hi", 1)]],
        ),
        (
            "keep-open-hardened-idle",
            HARDENED | KEEP_OPEN,
            vec![vec![hard_login(1001, "phone", 0)]],
        ),
        (
            "small-limits-too-large",
            PHASE1 | SMALL_LIMITS,
            vec![vec![login(1001), send(1001, &big, 1)]],
        ),
        (
            "small-limits-fragments-too-large",
            PHASE1 | SMALL_LIMITS,
            vec![vec![
                login(1001),
                (opcode::BINARY | ctl::MORE, vec![0; 700]),
                (opcode::CONTINUATION, vec![0; 700]),
            ]],
        ),
        (
            // 40 sends of 800 bytes to the sender's own inbox: the pump's
            // deliveries fill the 16 KiB stream, then the queue of 4.
            "stalled-reader-slow-consumer",
            HARDENED | SMALL_LIMITS | STALLED_READER,
            vec![
                std::iter::once(hard_login(1001, "phone", 0))
                    .chain((1..=40).map(|i| send(1001, &"s".repeat(800), i)))
                    .collect(),
            ],
        ),
        (
            // Pushes to a reader that never reads: probes and writes time out.
            "stalled-reader-phase2-probe",
            PHASE2 | STALLED_READER | SMALL_LIMITS,
            vec![
                vec![login(1001)],
                std::iter::once(login(1002))
                    .chain((1..=30).map(|i| send(1001, &"p".repeat(800), i)))
                    .collect(),
            ],
        ),
        (
            // As above, but the client never half-closes either: the
            // writer's 10 s timeout or the full queue must end it.
            "stalled-reader-keep-open-hardened",
            HARDENED | SMALL_LIMITS | STALLED_READER | KEEP_OPEN,
            vec![
                std::iter::once(hard_login(1001, "phone", 0))
                    .chain((1..=40).map(|i| send(1001, &"s".repeat(800), i)))
                    .collect(),
            ],
        ),
        (
            "stalled-reader-keep-open-phase2",
            PHASE2 | STALLED_READER | SMALL_LIMITS | KEEP_OPEN,
            vec![
                vec![login(1001)],
                std::iter::once(login(1002))
                    .chain((1..=30).map(|i| send(1001, &"p".repeat(800), i)))
                    .collect(),
            ],
        ),
    ]
}

fn msg_bytes(user: u64) -> Vec<u8> {
    im_proto::encode(msg::login(user)).to_vec()
}

/// Seeds only raw bytes can express (`inbound` only).
fn raw_only() -> Vec<(&'static str, u8, Vec<Vec<u8>>)> {
    let login = im_fuzz::binary(msg::login(1001));
    let huge = {
        // A masked Binary frame claiming 2^63 - 1 bytes.
        let mut f = vec![0x82, 0xff];
        f.extend_from_slice(&(u64::MAX >> 1).to_be_bytes());
        f.extend_from_slice(&[0; 4]);
        f
    };
    let over_limit = {
        // 70 000 bytes announced (above the 64 KiB frame limit), 16 sent.
        let mut f = vec![0x82, 0xff];
        f.extend_from_slice(&70_000u64.to_be_bytes());
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(&[0; 16]);
        f
    };
    let non_minimal_length = {
        // Length 5 in the 16-bit form.
        let mut f = vec![0x82, 0xfe, 0x00, 0x05, 0, 0, 0, 0];
        f.extend_from_slice(&im_proto::encode(msg::login(7)));
        f
    };
    let mut with_handshake = im_fuzz::handshake();
    with_handshake.extend_from_slice(&login);
    let bad_path = String::from_utf8(im_fuzz::handshake())
        .unwrap()
        .replace("GET /ws ", "GET /nope ")
        .into_bytes();
    let no_key = String::from_utf8(im_fuzz::handshake())
        .unwrap()
        .replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "")
        .into_bytes();
    let mut partial = im_fuzz::handshake();
    partial.truncate(30);
    vec![
        (
            "huge-length-header",
            PHASE1,
            vec![[login.clone(), huge].concat()],
        ),
        ("over-limit-length-header", PHASE1, vec![over_limit]),
        ("non-minimal-length", PHASE1, vec![non_minimal_length]),
        (
            "raw-handshake",
            PHASE1 | RAW_HANDSHAKE,
            vec![with_handshake],
        ),
        (
            "raw-handshake-bad-path",
            PHASE1 | RAW_HANDSHAKE,
            vec![bad_path],
        ),
        ("raw-handshake-no-key", PHASE1 | RAW_HANDSHAKE, vec![no_key]),
        (
            "raw-handshake-partial-keep-open",
            PHASE1 | RAW_HANDSHAKE | KEEP_OPEN,
            vec![partial],
        ),
        (
            "truncated-frame",
            PHASE1,
            vec![login[..login.len() - 2].to_vec()],
        ),
    ]
}

/// `proto` seeds: frame payloads and tokens.
fn proto() -> Vec<(&'static str, Vec<u8>)> {
    let bodies: Vec<(&str, Body)> = vec![
        ("login", msg::login(1001)),
        (
            "login-token",
            Body::Login(pb::Login {
                user_id: 0,
                token: tok(1001),
                device_id: "phone".into(),
                resume_after_seq: 5,
                ..Default::default()
            }),
        ),
        (
            "login-ok",
            Body::LoginOk(pb::LoginOk {
                conn_id: 1,
                user_id: 1001,
                heartbeat_interval_ms: 10_000,
                heartbeat_timeout_ms: 25_000,
                inbox_last_seq: 9,
            }),
        ),
        ("send", msg::send(1002, "héllo", 7)),
        ("send-result", msg::accepted(7, 3)),
        (
            "deliver",
            Body::Deliver(pb::Deliver {
                from_user_id: 1001,
                text: "hi".into(),
                client_msg_id: 7,
                seq: 3,
            }),
        ),
        ("ack", Body::Ack(pb::Ack { seq: 3 })),
        (
            "heartbeat",
            Body::Heartbeat(pb::Heartbeat {
                nonce: 1,
                reply: true,
            }),
        ),
        ("error", msg::error(pb::ErrorCode::Limit, "too large")),
    ];
    let mut out: Vec<(&str, Vec<u8>)> = bodies
        .into_iter()
        .map(|(name, body)| (name, im_proto::encode(body).to_vec()))
        .collect();
    out.push(("empty", vec![]));
    out.push(("garbage", vec![0xff, 0xff, 0xff]));
    out.push(("token", tok(1001).into_bytes()));
    out.push(("token-expired", {
        token::mint(im_fuzz::SECRET, UserId(1001), 1).into_bytes()
    }));
    out.push(("token-user-zero", {
        token::mint(im_fuzz::SECRET, UserId(0), im_fuzz::TOKEN_EXPIRES_S).into_bytes()
    }));
    out
}

fn write(dir: &Path, name: &str, bytes: &[u8], replay: fn(&[u8])) {
    if std::env::var("IMSIM_FUZZ_LOG").is_ok() {
        eprintln!("=== {}/{name}", dir.file_name().unwrap().to_string_lossy());
    }
    replay(bytes);
    fs::write(dir.join(name), bytes).unwrap_or_else(|e| panic!("write {name}: {e}"));
}

fn fresh(dir: PathBuf) -> PathBuf {
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn main() {
    im_fuzz::init_logging();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let session = fresh(root.join("session"));
    let inbound = fresh(root.join("inbound"));
    let proto_dir = fresh(root.join("proto"));
    let mut count = 0;
    for (name, flags, conns) in logical() {
        let records: Vec<Vec<u8>> = conns
            .iter()
            .map(|frames| frames.iter().flat_map(|(c, p)| record(*c, p)).collect())
            .collect();
        let frames: Vec<Vec<u8>> = records
            .iter()
            .map(|r| im_fuzz::records_to_frames(r))
            .collect();
        write(
            &session,
            name,
            &im_fuzz::join(flags, &records),
            im_fuzz::run_session,
        );
        write(
            &inbound,
            name,
            &im_fuzz::join(flags, &frames),
            im_fuzz::run_inbound,
        );
        count += 2;
    }
    for (name, flags, conns) in raw_only() {
        write(
            &inbound,
            name,
            &im_fuzz::join(flags, &conns),
            im_fuzz::run_inbound,
        );
        count += 1;
    }
    for (name, bytes) in proto() {
        write(&proto_dir, name, &bytes, im_fuzz::run_proto);
        count += 1;
    }
    println!("wrote {count} seeds under {}", root.display());
}
