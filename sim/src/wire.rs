//! What the server put on the wire, seen from outside it.
//!
//! The simulation hands each node a listener whose accepted streams are
//! wrapped in a [`ServerTap`]: it parses the WebSocket frames the server
//! writes (server frames are unmasked; a parser of a few lines suffices),
//! decodes the envelopes, and records each with the network's state at
//! that instant (is the path to the peer cut? is the node cut from Redis?).
//! The server is not touched; the coverage counters in
//! [`crate::coverage`] read this log together with the history.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use im_proto::Body;

use crate::history::MsgKey;

/// The network facts a tap stamps on each record; the driver keeps it
/// current as it injects and heals faults.
#[derive(Debug, Default)]
pub struct NetState {
    /// Cut host pairs, each ordered (smaller name first).
    pub partitions: std::collections::BTreeSet<(String, String)>,
    pub redis_down: bool,
}

impl NetState {
    pub fn cut(&self, a: &str, b: &str) -> bool {
        let pair = if a <= b { (a, b) } else { (b, a) };
        self.partitions
            .iter()
            .any(|(x, y)| x.as_str() == pair.0 && y.as_str() == pair.1)
    }
}

/// One server-written frame (or the end of a stream).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// The server accepted the stream.
    Accepted,
    LoginOk {
        user: u64,
        conn: u64,
    },
    /// A push of a message to the stream's logged-in user.
    Deliver {
        user: u64,
        key: MsgKey,
    },
    /// A hardened Heartbeat envelope from the server (not a reply).
    Heartbeat,
    /// Any other envelope (send results, heartbeat replies, errors).
    Other,
    Ping,
    Pong,
    Close {
        code: u16,
    },
    /// The server shut the stream down or dropped it (or its node died).
    Ended,
}

/// A frame, where and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireRecord {
    pub at: Duration,
    pub node: u64,
    /// Unique within a run, in accept order.
    pub stream: u64,
    /// The peer's host name (e.g. `user1001`).
    pub peer: String,
    pub frame: Frame,
    /// The path between the node and the peer was cut when it was written.
    pub peer_cut: bool,
    /// The node could not reach Redis (cut, or Redis down) at that time.
    pub redis_cut: bool,
}

/// The log all taps of a run write to.
#[derive(Clone, Debug, Default)]
pub struct WireLog {
    inner: Arc<Mutex<LogInner>>,
    pub net: Arc<Mutex<NetState>>,
}

#[derive(Debug, Default)]
struct LogInner {
    records: Vec<WireRecord>,
    next_stream: u64,
}

impl WireLog {
    /// Every record, by time, then stream (stable within a stream). A
    /// crash drops a node's streams in an order turmoil does not fix, so
    /// same-instant records of different streams are put in stream order.
    pub fn records(&self) -> Vec<WireRecord> {
        let mut records = self.lock().records.clone();
        records.sort_by_key(|r| (r.at, r.stream));
        records
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wraps a stream a node accepted from `peer`.
    pub fn tap<S>(&self, inner: S, node: u64, peer: String) -> ServerTap<S> {
        let stream = {
            let mut log = self.lock();
            log.next_stream += 1;
            log.next_stream
        };
        let tap = ServerTap {
            inner,
            log: self.clone(),
            node,
            stream,
            peer,
            pending: Vec::new(),
            handshake_done: false,
            broken: false,
            user: 0,
            ended: false,
        };
        tap.record(Frame::Accepted);
        tap
    }
}

/// Largest frame payload the tap keeps to decode (the server's own limit
/// is 64 KiB); a larger one stops parsing of that stream.
const PAYLOAD_MAX: usize = 1 << 20;

/// A server-side stream that records what the server writes to it.
pub struct ServerTap<S> {
    inner: S,
    log: WireLog,
    node: u64,
    stream: u64,
    peer: String,
    /// Written bytes not yet parsed into whole frames.
    pending: Vec<u8>,
    /// The HTTP handshake response is behind us; frames follow.
    handshake_done: bool,
    broken: bool,
    /// The logged-in user (from LoginOk), for deliveries.
    user: u64,
    ended: bool,
}

impl<S> ServerTap<S> {
    fn record(&self, frame: Frame) {
        let (peer_cut, redis_cut) = {
            let net = self.log.net.lock().unwrap_or_else(|e| e.into_inner());
            let node = format!("node{}", self.node);
            (
                net.cut(&node, &self.peer),
                net.redis_down || net.cut(&node, "redis"),
            )
        };
        let at = crate::world::now();
        self.log.lock().records.push(WireRecord {
            at,
            node: self.node,
            stream: self.stream,
            peer: self.peer.clone(),
            frame,
            peer_cut,
            redis_cut,
        });
    }

    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            self.record(Frame::Ended);
        }
    }

    /// Parses every whole frame in `pending`.
    fn parse(&mut self) {
        while !self.broken {
            let Some((header, len)) = frame_len(&self.pending) else {
                return;
            };
            if len > PAYLOAD_MAX {
                self.broken = true;
                return;
            }
            if self.pending.len() < header + len {
                return;
            }
            let opcode = self.pending[0] & 0x0f;
            let masked = self.pending[1] & 0x80 != 0;
            let mut payload = self.pending[header..header + len].to_vec();
            if masked {
                let key = &self.pending[header - 4..header];
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= key[i % 4];
                }
            }
            self.pending.drain(..header + len);
            let frame = match opcode {
                0x2 => match im_proto::decode(&payload) {
                    Ok(Body::LoginOk(ok)) => {
                        self.user = ok.user_id;
                        Frame::LoginOk {
                            user: ok.user_id,
                            conn: ok.conn_id,
                        }
                    }
                    Ok(Body::Deliver(d)) => Frame::Deliver {
                        user: self.user,
                        key: MsgKey {
                            from: d.from_user_id,
                            id: d.client_msg_id,
                        },
                    },
                    Ok(Body::Heartbeat(hb)) if !hb.reply => Frame::Heartbeat,
                    _ => Frame::Other,
                },
                0x8 => Frame::Close {
                    code: payload
                        .get(..2)
                        .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]])),
                },
                0x9 => Frame::Ping,
                0xA => Frame::Pong,
                _ => Frame::Other,
            };
            self.record(frame);
        }
    }
}

/// A frame's header length and payload length, once enough bytes are in.
fn frame_len(buf: &[u8]) -> Option<(usize, usize)> {
    let b1 = *buf.get(1)?;
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    let (ext, len) = match b1 & 0x7f {
        126 => (
            2,
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as u64,
        ),
        127 => (8, u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)),
        n => (0, u64::from(n)),
    };
    let header = 2 + ext + mask;
    (buf.len() >= header).then_some((header, usize::try_from(len).unwrap_or(usize::MAX)))
}

impl<S> Drop for ServerTap<S> {
    fn drop(&mut self) {
        self.end();
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for ServerTap<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for ServerTap<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r
            && n > 0
            && !self.broken
        {
            self.pending.extend_from_slice(&buf[..n]);
            // The handshake response is HTTP, not frames: skip to its end.
            if !self.handshake_done {
                match self.pending.windows(4).position(|w| w == b"\r\n\r\n") {
                    Some(end) => {
                        self.pending.drain(..end + 4);
                        self.handshake_done = true;
                    }
                    None if self.pending.len() > PAYLOAD_MAX => self.broken = true,
                    None => {}
                }
            }
            if self.handshake_done {
                self.parse();
            }
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        if r.is_ready() {
            self.end();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_lengths_cover_all_three_encodings() {
        assert_eq!(frame_len(&[0x82]), None);
        assert_eq!(frame_len(&[0x82, 5]), Some((2, 5)));
        assert_eq!(frame_len(&[0x82, 0x85, 0, 0, 0, 0]), Some((6, 5)));
        assert_eq!(frame_len(&[0x82, 126, 1, 0]), Some((4, 256)));
        assert_eq!(frame_len(&[0x82, 126, 1]), None);
        let mut long = vec![0x82, 127];
        long.extend_from_slice(&70_000u64.to_be_bytes());
        assert_eq!(frame_len(&long), Some((10, 70_000)));
    }
}
