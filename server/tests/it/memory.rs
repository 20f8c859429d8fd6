//! Memory per idle connection after a large frame: the regression test for
//! tungstenite's read and write buffers, which grew to the largest frame a
//! connection had read (the read buffer) or written (the write buffer, also
//! to the largest batch written between two flushes) and kept that
//! allocation for the connection's life: about 61 KB per connection after
//! one 60 KiB frame, either way. Fixed by the vendored patches (see
//! `server/vendor/PATCHES.md`); `Bug::BuffersKeepLargeFrames` switches both
//! fixes off.
//!
//! How: this process's RSS, read in a child process (this test binary run
//! again with only [`child`] selected), so no other test's allocations land
//! in the figures and the heap is fresh. Each child measures one server in
//! one [`Direction`]. After a first connection (which also sends the
//! outbound texts) and one more, neither counted, it opens [`CONNS`]
//! connections that each log in and then send one small text (inbound) or
//! are sent one by the first connection and read it (outbound), reads its
//! RSS, then as many more with a 60 KiB text each, and reads its RSS again.
//! Every connection stays open, so memory freed by one cannot hide what
//! another keeps; the large frames go one connection at a time, so a
//! frame's payload is freed before the next arrives and only what stays
//! behind accumulates. A kept buffer shows as about 61 KB more per
//! connection in the second set; a released one as nothing more.
//!
//! The clients write their frames straight to the socket: a tungstenite
//! client keeps its write buffer at the largest frame it wrote, which would
//! add 60 KiB per connection on the client side of the same process. RSS
//! counts pages, so the figures assume transparent huge pages are not
//! `always` (`/sys/kernel/mm/transparent_hugepage/enabled`; `madvise` on
//! the machines this runs on): a heap that grew 2 MiB at a time would add
//! 10 KB per connection here.
//!
//! Each test also proves the measurement catches the bug it guards:
//! [`an_idle_connection_stays_small_after_a_large_frame`] measures im-server
//! in both directions once as configured and once with
//! `Bug::BuffersKeepLargeFrames` switched on, whose figures must fail the
//! check; [`the_measurement_sees_a_read_buffer_kept_by_tungstenite`] runs
//! the inbound measurement on a bare tokio-tungstenite server configured
//! like ours but with `release_large_read_buffer(false)` (tungstenite's old
//! behaviour), apart from anything im-server does.

use std::fmt;
use std::process::Command;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use im_proto::{Body, msg, pb};
use im_server::{Bug, Limits, Profile};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::support::{Node, PATIENCE, redis};

/// Connections in each set. A kept 60 KiB buffer then shows as 12 MB, a
/// page of RSS as 20 bytes per connection, and both ends of both sets take
/// 4 * 200 descriptors, within the usual limit of 1024.
const CONNS: u64 = 200;
/// The large frame's text, below the server's 64 KiB frame limit.
const LARGE_TEXT_BYTES: usize = 60 * 1024;
/// The other set's text, a usual chat message. Not much smaller: the
/// transient allocations of a 100-byte delivery pack differently, and left
/// each outbound connection about 3.5 KB larger than a 300 to 1000-byte or
/// a large one, which would hide that much of a kept buffer.
const SMALL_TEXT_BYTES: usize = 500;
/// Largest extra growth per connection allowed after a large frame.
const RELEASED_MAX_BYTES: f64 = 2048.0;
/// Smallest extra growth per connection that shows a kept buffer.
const KEPT_MIN_BYTES: f64 = 32.0 * 1024.0;

/// Set in the child's environment: which server it measures, and how.
const CHILD_ENV: &str = "IMSIM_MEMORY_CHILD";
/// Starts the child's one line of results on its stdout.
const RESULT_MARK: &str = "imsim-memory-result";

#[test]
fn an_idle_connection_stays_small_after_a_large_frame() {
    for direction in [Direction::Inbound, Direction::Outbound] {
        let growth = measure_in_child(Target::Server, direction);
        assert!(growth.extra() < RELEASED_MAX_BYTES, "{growth}");
        // The same measurement fails when Bug::BuffersKeepLargeFrames
        // brings tungstenite's old buffers back.
        let growth = measure_in_child(Target::ServerKeepingBuffers, direction);
        assert!(
            growth.extra() > KEPT_MIN_BYTES,
            "the measurement misses the buffers kept by Bug::BuffersKeepLargeFrames: {growth}"
        );
    }
}

#[test]
fn the_measurement_sees_a_read_buffer_kept_by_tungstenite() {
    let growth = measure_in_child(Target::BareKeepingBuffer, Direction::Inbound);
    assert!(growth.extra() > KEPT_MIN_BYTES, "{growth}");
}

/// The measurement itself, run by the tests above in a process of its own.
#[tokio::test]
#[ignore = "run by the memory tests in a child process"]
async fn child() {
    let spec = std::env::var(CHILD_ENV).unwrap_or_default();
    let Some((target, direction)) = from_spec(&spec) else {
        panic!("{CHILD_ENV}={spec:?} names no measurement");
    };
    let (small_bytes, large_bytes) = match target {
        Target::Server | Target::ServerKeepingBuffers => {
            let test = format!("memory-{spec}");
            let node = Node::start_with(Profile::Phase3, &test, |c| {
                if let Target::ServerKeepingBuffers = target {
                    c.bugs.insert(Bug::BuffersKeepLargeFrames);
                }
            })
            .await;
            let growth = measure(&node.url, direction).await;
            node.stop().await;
            growth
        }
        Target::BareKeepingBuffer => {
            assert!(
                matches!(direction, Direction::Inbound),
                "the bare server delivers nothing"
            );
            measure(&bare_server(false).await, direction).await
        }
    };
    println!("{RESULT_MARK} {small_bytes} {large_bytes}");
}

#[derive(Clone, Copy, Debug)]
enum Target {
    /// im-server (phase 3: no tokens, same WebSocket configuration).
    Server,
    /// im-server with `Bug::BuffersKeepLargeFrames`.
    ServerKeepingBuffers,
    /// A bare tokio-tungstenite server with tungstenite's old read buffer.
    BareKeepingBuffer,
}

impl Target {
    const ALL: [Target; 3] = [
        Target::Server,
        Target::ServerKeepingBuffers,
        Target::BareKeepingBuffer,
    ];

    fn name(self) -> &'static str {
        match self {
            Target::Server => "server",
            Target::ServerKeepingBuffers => "server-keeping-buffers",
            Target::BareKeepingBuffer => "bare-keeping-buffer",
        }
    }
}

/// Which way the texts go.
#[derive(Clone, Copy, Debug)]
enum Direction {
    /// Each measured connection sends its text: the server's read buffer.
    Inbound,
    /// Each measured connection is sent its text by the server: the
    /// server's write buffer.
    Outbound,
}

impl Direction {
    const ALL: [Direction; 2] = [Direction::Inbound, Direction::Outbound];

    fn name(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// The child's [`CHILD_ENV`] value for a measurement.
fn spec(target: Target, direction: Direction) -> String {
    format!("{}-{}", target.name(), direction.name())
}

fn from_spec(value: &str) -> Option<(Target, Direction)> {
    Target::ALL
        .into_iter()
        .flat_map(|t| Direction::ALL.map(|d| (t, d)))
        .find(|&(t, d)| spec(t, d) == value)
}

/// RSS growth per connection, in bytes.
#[derive(Debug)]
struct Growth {
    target: Target,
    direction: Direction,
    /// For a connection whose text was small.
    small_bytes: f64,
    /// For a connection whose text was large.
    large_bytes: f64,
}

impl Growth {
    /// What the large frame left behind, per connection.
    fn extra(&self) -> f64 {
        self.large_bytes - self.small_bytes
    }
}

impl fmt::Display for Growth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match self.direction {
            Direction::Inbound => "sent",
            Direction::Outbound => "was sent",
        };
        write!(
            f,
            "{:?}, {}: RSS per open connection (client and server side, {CONNS} each): \
             {:.0} B after it {how} a {SMALL_TEXT_BYTES}-byte text, {:.0} B after it {how} \
             a {LARGE_TEXT_BYTES}-byte text ({:+.0} B)",
            self.target,
            self.direction.name(),
            self.small_bytes,
            self.large_bytes,
            self.extra()
        )
    }
}

/// Runs [`child`] for `target` and `direction` in a new process and reads
/// its result.
fn measure_in_child(target: Target, direction: Direction) -> Growth {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut command = Command::new(exe);
    command
        .args(["memory::child", "--exact", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_ENV, spec(target, direction));
    if let Target::Server | Target::ServerKeepingBuffers = target {
        // This binary's redis-server, rather than one more.
        command.env("REDIS_URL", redis().url());
    }
    let output = command.output().expect("run the child test process");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the child failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let line = stdout
        .lines()
        .find_map(|l| Some(l.split_once(RESULT_MARK)?.1))
        .unwrap_or_else(|| panic!("no result from the child:\n{stdout}\n{stderr}"));
    let figures: Vec<f64> = line
        .split_whitespace()
        .map(|v| v.parse().expect("a number"))
        .collect();
    let growth = Growth {
        target,
        direction,
        small_bytes: figures[0],
        large_bytes: figures[1],
    };
    println!("{growth}");
    growth
}

/// Opens the two sets of connections to `url`; returns the RSS growth per
/// connection of each (small, large). Every connection stays open until
/// this returns.
async fn measure(url: &str, direction: Direction) -> (f64, f64) {
    // Not counted: the first connections (with the Redis link, the
    // runtime's own, the first delivery's).
    let mut sender = login(url, 1).await;
    let mut open = vec![open_one(url, 2, direction, &mut sender, SMALL_TEXT_BYTES).await];
    let before = settled_rss().await;
    for user in 3..3 + CONNS {
        open.push(open_one(url, user, direction, &mut sender, SMALL_TEXT_BYTES).await);
    }
    let with_small = settled_rss().await;
    for user in 3 + CONNS..3 + 2 * CONNS {
        open.push(open_one(url, user, direction, &mut sender, LARGE_TEXT_BYTES).await);
    }
    let with_large = settled_rss().await;
    drop(open);
    (
        (with_small - before) / CONNS as f64,
        (with_large - with_small) / CONNS as f64,
    )
}

type Ws = WebSocketStream<TcpStream>;

/// A connection of `user` that sent one text of `text_bytes` (inbound: to
/// user 0, which the server refuses: it still reads the whole frame) or
/// read one that `sender` sent it (outbound).
async fn open_one(
    url: &str,
    user: u64,
    direction: Direction,
    sender: &mut Ws,
    text_bytes: usize,
) -> Ws {
    let mut ws = login(url, user).await;
    let text = "x".repeat(text_bytes);
    match direction {
        Direction::Inbound => {
            write_frame(&mut ws, msg::send(0, text, 1)).await;
            answer(&mut ws).await;
        }
        Direction::Outbound => {
            write_frame(sender, msg::send(user, text, user)).await;
            match answer(sender).await {
                Body::SendResult(r) if r.status == pb::SendStatus::Accepted as i32 => {}
                other => panic!("the text to {user} was not accepted: {other:?}"),
            }
            match answer(&mut ws).await {
                Body::Deliver(d) if d.text.len() == text_bytes => {}
                other => panic!("expected a {text_bytes}-byte delivery, got {other:?}"),
            }
        }
    }
    ws
}

/// A connection that logged in as `user`.
async fn login(url: &str, user: u64) -> Ws {
    let addr = url.trim_start_matches("ws://").trim_end_matches("/ws");
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let config = WebSocketConfig::default().read_buffer_size(256);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config))
        .await
        .expect("websocket handshake");
    write_frame(&mut ws, msg::login(user)).await;
    answer(&mut ws).await;
    ws
}

/// Writes one masked binary frame straight to the socket, past
/// tungstenite's write buffer. The mask key is zero, which leaves the
/// payload as it is.
async fn write_frame(ws: &mut Ws, body: Body) {
    let payload = im_proto::encode(body);
    let mut frame = vec![0x82];
    match u16::try_from(payload.len()) {
        Ok(len) if len < 126 => frame.push(0x80 | len as u8),
        Ok(len) => {
            frame.push(0x80 | 126);
            frame.extend(len.to_be_bytes());
        }
        Err(_) => panic!("a {}-byte frame is above any limit here", payload.len()),
    }
    frame.extend([0; 4]);
    frame.extend_from_slice(&payload);
    ws.get_mut().write_all(&frame).await.expect("write a frame");
}

/// Waits for the server's next frame and decodes it.
async fn answer(ws: &mut Ws) -> Body {
    match tokio::time::timeout(PATIENCE, ws.next()).await {
        Ok(Some(Ok(Message::Binary(payload)))) => {
            im_proto::decode(&payload).expect("a frame the server sent decodes")
        }
        other => panic!("expected a binary answer, got {other:?}"),
    }
}

/// This process's RSS in bytes, once the server has finished its work.
async fn settled_rss() -> f64 {
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a VmRSS line in kB");
    (kib * 1024) as f64
}

/// A bare tokio-tungstenite server with im-server's read buffer and frame
/// limits that answers every binary frame; returns its URL.
async fn bare_server(release_large_read_buffer: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/ws", listener.local_addr().expect("local address"));
    let limits = Limits::default();
    let config = WebSocketConfig::default()
        .read_buffer_size(limits.read_buffer_bytes)
        .max_frame_size(Some(limits.frame_bytes_max))
        .max_message_size(Some(limits.message_bytes_max))
        .release_large_read_buffer(release_large_read_buffer);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) =
                    tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await
                else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    let answer = Message::Binary(im_proto::encode(msg::accepted(0, 0)));
                    if message.is_binary() && ws.send(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}
