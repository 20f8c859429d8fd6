//! One connection: WebSocket handshake, login, the read loop, and a single
//! writer task that owns the socket's write half (no concurrent writes).
//!
//! The read loop is the connection's life: when it ends, for whatever
//! cause, the profile's disconnect cleanup runs once.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use im_proto::pb::{self, ErrorCode};
use im_proto::{Body, ConnId, DecodeError, UserId, msg};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::Instrument;

use crate::config::Bug;
use crate::listener::Stream;
use crate::registry::{CloseSignal, Closing, ConnHandle, Queued, WriteError};
use crate::{Shared, metrics};

/// Why a connection ended, for logs and the simulation's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndCause {
    ClientClosed,
    ConnectionLost(String),
    IdleTimeout,
    /// A socket write failed, or made no progress for the write timeout
    /// (a peer that reads nothing: no frame, not even a close frame, can
    /// reach it, so the socket is dropped).
    WriteFailed(WriteError),
    /// A reply to the client's own request found no room in the outbound
    /// queue for the write timeout: closed with 4002.
    SlowConsumer,
    Kicked,
    Shutdown,
    Refused(CloseCode, String),
}

/// Serves one accepted stream until it closes.
pub(crate) async fn serve<S: Stream>(shared: Arc<Shared>, stream: S, peer: String) {
    let limits = shared.config.limits;
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(limits.read_buffer_bytes)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        // tungstenite panics unless this exceeds write_buffer_size (found
        // by the fuzzer, whose server has 1 KiB frames).
        .max_write_buffer_size(
            WRITE_BUFFER_BYTES + limits.frame_bytes_max.max(limits.message_bytes_max) * 4,
        )
        .max_frame_size(Some(limits.frame_bytes_max))
        .max_message_size(Some(limits.message_bytes_max))
        // Our tungstenite patch (server/vendor/PATCHES.md): a large frame's
        // allocation leaves with the frame instead of staying as the read
        // buffer, so an idle connection stays small whatever it read.
        .release_large_read_buffer(!shared.config.has(Bug::BuffersKeepLargeFrames))
        .release_large_write_buffer(!shared.config.has(Bug::BuffersKeepLargeFrames));
    let handshake =
        tokio_tungstenite::accept_hdr_async_with_config(stream, check_path, Some(ws_config));
    // Boxed here and below: a future's size is that of its largest await,
    // and each connection's task holds its future for the connection's
    // life; boxing the occasional large steps (handshake, a frame's
    // handling, heartbeat, cleanup) keeps an idle connection's task small.
    let ws = match tokio::time::timeout(limits.handshake_timeout, Box::pin(handshake)).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "websocket handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "websocket handshake timed out");
            return;
        }
    };
    let Ok(_permit) = shared.connection_slots.clone().try_acquire_owned() else {
        tracing::warn!(%peer, max = limits.connections_max, "connection limit reached");
        let mut ws = ws;
        let detail = "connection limit reached; try again later";
        let refuse = async {
            ws.feed(frame(msg::error(ErrorCode::Limit, detail))).await?;
            ws.close(Some(close_frame(CloseCode::Again, detail))).await
        };
        let _ = tokio::time::timeout(limits.write_timeout, refuse).await;
        return;
    };
    let conn_id = ConnId(
        shared
            .next_conn_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    );
    let span = tracing::info_span!("conn", node = %shared.config.node, conn_id = conn_id.0, user_id = tracing::field::Empty);
    metrics::connection_opened();
    Session::run(shared, ws, conn_id, peer)
        .instrument(span)
        .await;
    metrics::connection_closed();
}

/// Rejects handshakes for any path but `/ws`.
#[allow(clippy::result_large_err)] // the signature is tungstenite's Callback
fn check_path(req: &Request, resp: Response) -> Result<Response, ErrorResponse> {
    if req.uri().path() == im_proto::WS_PATH {
        Ok(resp)
    } else {
        let mut err = ErrorResponse::new(Some(format!("no endpoint at {}", req.uri().path())));
        *err.status_mut() = StatusCode::NOT_FOUND;
        Err(err)
    }
}

fn close_frame(code: CloseCode, reason: &str) -> CloseFrame {
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

struct Session {
    shared: Arc<Shared>,
    conn_id: ConnId,
    handle: ConnHandle,
    user: Option<UserId>,
    /// Set once a hardened login succeeded.
    attached: Option<crate::hardened::Attached>,
}

/// What the read loop decided after one frame.
enum Step {
    Continue,
    End(EndCause),
}

impl Session {
    async fn run<S: Stream>(
        shared: Arc<Shared>,
        ws: WebSocketStream<S>,
        conn_id: ConnId,
        peer: String,
    ) {
        let limits = shared.config.limits;
        let (sink, mut stream) = ws.split();
        let (out_tx, out_rx) = mpsc::channel(limits.outbound_queue_max);
        let closing = Arc::new(CloseSignal::default());
        let mut writer = tokio::spawn(
            writer(sink, out_rx, closing.clone(), limits.write_timeout).in_current_span(),
        );
        let handle = ConnHandle::new(
            conn_id,
            UserId(0),
            out_tx,
            closing.clone(),
            limits.write_timeout,
        );
        let mut session = Session {
            shared: shared.clone(),
            conn_id,
            handle,
            user: None,
            attached: None,
        };
        tracing::info!(%peer, "connection opened");

        let mut shutdown = shared.shutdown.clone();
        let hardened = shared.config.switches().hardened;
        let h = shared.config.hardened;
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + h.heartbeat_interval,
            h.heartbeat_interval,
        );
        // When the client was last heard from. The read deadline counts from
        // it, not from the loop's last turn: the heartbeat tick below also
        // turns the loop, and must not push the deadline out (it did: a
        // peer that died in silence was never timed out).
        let mut heard = tokio::time::Instant::now();
        let cause = loop {
            let idle = match (session.user.is_some(), hardened) {
                (false, _) => limits.login_timeout,
                (true, false) => limits.read_idle_timeout,
                (true, true) if shared.config.has(Bug::NoHeartbeatTimeout) => NO_TIMEOUT,
                (true, true) => h.heartbeat_timeout,
            };
            let frame = tokio::select! {
                biased;
                _ = closing.requested() => break EndCause::Kicked,
                _ = shutdown.changed() => {
                    let frame = if hardened {
                        close_frame(CloseCode::Restart, "node draining; reconnect")
                    } else {
                        close_frame(CloseCode::Away, "server shutting down")
                    };
                    session.handle.close(Closing::Frame(frame));
                    break EndCause::Shutdown;
                }
                failed = &mut writer => {
                    let error = failed.ok().flatten().unwrap_or(WriteError::Closed);
                    if error == WriteError::Timeout {
                        tracing::warn!("slow consumer: the peer read nothing for the write timeout; dropping the connection");
                    }
                    break EndCause::WriteFailed(error);
                }
                _ = heartbeat.tick(), if session.attached.is_some() => {
                    Box::pin(session.heartbeat()).await;
                    continue;
                }
                frame = tokio::time::timeout_at(heard + idle, stream.next()) => frame,
            };
            if let Ok(Some(_)) = &frame {
                heard = tokio::time::Instant::now();
            }
            let step = match frame {
                Err(_) if session.user.is_none() => session.refuse(
                    CloseCode::Policy,
                    ErrorCode::NotLoggedIn,
                    "no login within the login timeout",
                ),
                Err(_) => {
                    let frame = if hardened {
                        crate::hardened::close(
                            im_proto::close_code::HEARTBEAT_TIMEOUT,
                            "heartbeat timeout",
                        )
                    } else {
                        Closing::Frame(close_frame(CloseCode::Away, "idle timeout"))
                    };
                    session.handle.close(frame);
                    Step::End(EndCause::IdleTimeout)
                }
                Ok(None) => Step::End(EndCause::ConnectionLost("stream ended".into())),
                Ok(Some(Ok(message))) => Box::pin(session.on_message(message)).await,
                Ok(Some(Err(e))) => session.on_read_error(e),
            };
            if let Step::End(cause) = step {
                break cause;
            }
        };
        tracing::info!(?cause, "connection ended");
        // Make sure the writer ends (it flushes a queued close frame first).
        session.handle.close(Closing::Drop);
        // Hardened: presence first (a drain must release every lease within
        // its grace period, however slowly the socket takes its close).
        if let Some(attached) = session.attached.take()
            && let Some(node) = &session.shared.hardened
        {
            Box::pin(crate::hardened::logout(
                &session.shared,
                node,
                session.conn_id,
                attached,
            ))
            .await;
        }
        // A JoinHandle must not be polled again once it has completed (the
        // loop above may have seen it end).
        if !writer.is_finished()
            && tokio::time::timeout(limits.write_timeout, &mut writer)
                .await
                .is_err()
        {
            writer.abort();
        }
        if !hardened && let Some(user) = session.user {
            Box::pin(session.shared.remove_websocket_connection(user)).await;
        }
    }

    async fn on_message(&mut self, message: Message) -> Step {
        match message {
            Message::Binary(payload) => match im_proto::decode(&payload) {
                Ok(body) => self.on_body(body).await,
                Err(DecodeError::Protobuf(e)) => self.refuse(
                    CloseCode::Invalid,
                    ErrorCode::Protocol,
                    &format!("undecodable protobuf: {e}"),
                ),
                Err(DecodeError::NoBody) => self.refuse(
                    CloseCode::Protocol,
                    ErrorCode::Protocol,
                    "envelope has no body",
                ),
            },
            Message::Text(_) => self.refuse(
                CloseCode::Unsupported,
                ErrorCode::Protocol,
                "text frames are not supported; send binary protobuf",
            ),
            // tungstenite answers Pings by itself; Pongs need nothing.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Step::Continue,
            // A close frame with a code a peer may not send was already
            // answered by tungstenite with 1002; a closing peer can take no
            // Error envelope.
            Message::Close(_) => Step::End(EndCause::ClientClosed),
        }
    }

    fn on_read_error(&mut self, e: WsError) -> Step {
        match e {
            WsError::Capacity(e) => self.refuse(
                CloseCode::Size,
                ErrorCode::Limit,
                &format!("too large: {e}"),
            ),
            // A peer that went away without a close handshake (a killed
            // app, a reset connection) is the end of a connection, not
            // hostile input: nothing can be written to it any more.
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Step::End(
                EndCause::ConnectionLost("reset without a closing handshake".into()),
            ),
            WsError::Protocol(e) => self.refuse(
                CloseCode::Protocol,
                ErrorCode::Protocol,
                &format!("protocol: {e}"),
            ),
            WsError::Utf8(e) => self.refuse(
                CloseCode::Invalid,
                ErrorCode::Protocol,
                &format!("utf-8: {e}"),
            ),
            e => Step::End(EndCause::ConnectionLost(e.to_string())),
        }
    }

    /// Tells the client why, then closes with `code`.
    fn refuse(&mut self, code: CloseCode, error: ErrorCode, detail: &str) -> Step {
        tracing::warn!(?code, detail, "refusing client input");
        let _ = self.handle.write_nowait(frame(msg::error(error, detail)));
        self.handle.close(Closing::Frame(close_frame(code, detail)));
        Step::End(EndCause::Refused(code, detail.to_owned()))
    }

    /// Queues the answer to one of the client's requests. An answer is
    /// never dropped: it waits for room in the outbound queue for up to the
    /// write timeout, and when none comes the connection is closed as a
    /// slow consumer (4002); the client resumes and resends, and dedup
    /// makes the resend safe.
    async fn reply(&mut self, body: Body) -> Step {
        if self.shared.config.has(Bug::RepliesDroppedWhenQueueFull) {
            if let Err(e) = self.handle.write_nowait(frame(body)) {
                tracing::warn!(error = %e, "could not queue a reply; dropped");
            }
            return Step::Continue;
        }
        match Box::pin(self.handle.write_when_room(frame(body))).await {
            Ok(()) => Step::Continue,
            Err(WriteError::QueueFull) => {
                tracing::warn!(
                    "slow consumer: no room for a reply within the write timeout; closing"
                );
                self.handle.close(crate::hardened::close(
                    im_proto::close_code::SLOW_CONSUMER,
                    "slow consumer: no room for a reply",
                ));
                Step::End(EndCause::SlowConsumer)
            }
            // Closing anyway: the loop sees why at its next turn.
            Err(_) => Step::Continue,
        }
    }

    async fn on_body(&mut self, body: Body) -> Step {
        match (self.user, body) {
            (None, Body::Login(login)) => self.login(login).await,
            (Some(_), Body::Login(_)) => {
                self.refuse(CloseCode::Policy, ErrorCode::Protocol, "already logged in")
            }
            (None, _) => self.refuse(CloseCode::Policy, ErrorCode::NotLoggedIn, "log in first"),
            (Some(from), Body::Send(send)) => {
                let answer = self.send(from, send).await;
                self.reply(answer).await
            }
            (Some(_), Body::Ack(ack)) => self.ack(ack).await,
            (Some(_), Body::Heartbeat(hb)) => {
                // The seed's system had no heartbeats; hardened answers them.
                if self.attached.is_some() && !hb.reply {
                    let answer = Body::Heartbeat(pb::Heartbeat {
                        nonce: hb.nonce,
                        reply: true,
                    });
                    return self.reply(answer).await;
                }
                Step::Continue
            }
            (
                Some(_),
                Body::LoginOk(_) | Body::SendResult(_) | Body::Deliver(_) | Body::Error(_),
            ) => self.refuse(
                CloseCode::Protocol,
                ErrorCode::Protocol,
                "server-to-client message sent by a client",
            ),
        }
    }

    async fn login(&mut self, login: pb::Login) -> Step {
        if let Some(node) = self.shared.hardened.clone() {
            return match crate::hardened::login(
                &self.shared,
                &node,
                self.conn_id,
                &self.handle,
                login,
            )
            .await
            {
                Ok((attached, ok)) => {
                    tracing::Span::current().record("user_id", attached.user.0);
                    self.user = Some(attached.user);
                    self.handle = self.handle.clone().for_user(attached.user);
                    self.attached = Some(attached);
                    self.reply(Body::LoginOk(ok)).await
                }
                Err((error, close, detail)) => self.refuse(close, error, &detail),
            };
        }
        if login.user_id == 0 {
            return self.refuse(
                CloseCode::Policy,
                ErrorCode::Unauthorized,
                "user id 0 is not a user",
            );
        }
        let user = UserId(login.user_id);
        tracing::Span::current().record("user_id", user.0);
        self.user = Some(user);
        self.handle = self.handle.clone().for_user(user);
        self.shared
            .add_websocket_connection(self.handle.clone())
            .await;
        let ok = Body::LoginOk(pb::LoginOk {
            conn_id: self.conn_id.0,
            user_id: user.0,
            ..Default::default()
        });
        self.reply(ok).await
    }

    /// Handles one Send; returns the answer for the sender.
    async fn send(&mut self, from: UserId, send: pb::Send) -> Body {
        let id = send.client_msg_id;
        if send.to_user_id == 0 {
            return msg::rejected(id, ErrorCode::UnknownRecipient, "unknown recipient 0");
        }
        if let Some(node) = self.shared.hardened.clone() {
            return self.store(&node, from, send).await;
        }
        let deliver = Body::Deliver(pb::Deliver {
            from_user_id: from.0,
            text: send.text,
            client_msg_id: id,
            seq: 0,
        });
        match self
            .shared
            .push(UserId(send.to_user_id), frame(deliver))
            .await
        {
            Ok(()) => msg::accepted(id, 0),
            Err((code, reason)) => msg::rejected(id, code, reason),
        }
    }

    /// Hardened: "sent" is "stored"; anything else is a refusal that says
    /// whether to retry.
    async fn store(&mut self, node: &crate::hardened::Node, from: UserId, send: pb::Send) -> Body {
        use crate::hardened::Refused;
        let cfg = &self.shared.config;
        let h = cfg.hardened;
        let id = send.client_msg_id;
        if id == 0 && !cfg.has(Bug::DedupByIdOnly) {
            return msg::rejected(id, ErrorCode::Protocol, "client_msg_id 0 is not an id");
        }
        if send.text.len() > h.text_bytes_max && !cfg.has(Bug::UnlimitedStrings) {
            let reason = format!(
                "text of {} bytes is over the limit of {}",
                send.text.len(),
                h.text_bytes_max
            );
            return msg::rejected(id, ErrorCode::Limit, reason);
        }
        let device = self.attached.as_ref().map_or("", |a| a.device.as_str());
        match crate::hardened::store(&self.shared, node, from, device, &send).await {
            Ok(seq) => msg::accepted(id, seq),
            Err(Refused::Unavailable(_)) if cfg.has(Bug::SentBeforeStored) => msg::accepted(id, 0),
            Err(e @ Refused::Unavailable(_)) => msg::retry_later(
                id,
                ErrorCode::Unavailable,
                e.to_string(),
                h.retry_after_unavailable,
            ),
            Err(e @ Refused::InboxFull(_)) => msg::retry_later(
                id,
                ErrorCode::InboxFull,
                e.to_string(),
                h.retry_after_inbox_full,
            ),
            Err(e @ Refused::UnknownRecipient(_)) => {
                msg::rejected(id, ErrorCode::UnknownRecipient, e.to_string())
            }
            Err(e @ Refused::IdReused { .. }) => {
                msg::rejected(id, ErrorCode::DuplicateId, e.to_string())
            }
        }
    }

    /// Hardened: an acknowledgement must name something already pushed;
    /// the highest one is written to Redis now and then.
    async fn ack(&mut self, ack: pb::Ack) -> Step {
        let Some(attached) = &mut self.attached else {
            return Step::Continue;
        };
        let pushed = attached.pushed.load(std::sync::atomic::Ordering::Relaxed);
        if ack.seq > pushed {
            let detail = format!("ack for seq {} but only {pushed} was sent", ack.seq);
            tracing::warn!(detail, "bogus ack");
            return self.reply(msg::error(ErrorCode::BadSequence, detail)).await;
        }
        if let Err(e) = crate::hardened::ack(&self.shared, attached, ack.seq).await {
            tracing::debug!(error = %e, "acknowledgements not written; the next ones retry");
        }
        Step::Continue
    }

    /// Hardened: a heartbeat to the client, the acknowledgements so far, and
    /// a lease refresh (which may find this connection superseded).
    async fn heartbeat(&mut self) {
        let Some(attached) = &mut self.attached else {
            return;
        };
        attached.heartbeat_nonce += 1;
        let beat = Body::Heartbeat(pb::Heartbeat {
            nonce: attached.heartbeat_nonce,
            reply: false,
        });
        // Our own beat, not an answer: with the queue full the client is
        // hearing from us anyway.
        let _ = self.handle.write_nowait(frame(beat));
        if let Err(e) = crate::hardened::flush_acks(&self.shared, attached).await {
            tracing::debug!(error = %e, "acknowledgements not written; retried at the next beat");
        }
        let refreshed = crate::hardened::refresh_lease(
            &self.shared,
            attached.user,
            &attached.key,
            &attached.device,
            attached.generation,
        )
        .await;
        match refreshed {
            Ok(crate::hardened::Lease::Written) => {}
            Ok(crate::hardened::Lease::Superseded) => {
                tracing::info!("a newer connection of this device exists; closing as superseded");
                self.handle.close(crate::hardened::close(
                    im_proto::close_code::SUPERSEDED,
                    "superseded by a newer connection",
                ));
            }
            Ok(crate::hardened::Lease::Released) => {
                tracing::error!(key = attached.key, "lease found released while in use")
            }
            Err(e) => tracing::warn!(error = %e, "lease refresh failed"),
        }
    }
}

/// [`Bug::NoHeartbeatTimeout`]'s read timeout: about a year.
const NO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// A Binary frame holding one envelope.
pub(crate) fn frame(body: Body) -> Message {
    Message::Binary(im_proto::encode(body))
}

/// Frames written between two flushes at most: whatever is already queued
/// goes out in one socket write (a burst of deliveries costs one syscall,
/// not one each), bounded so one flush never holds more than this many.
const WRITE_BATCH_MAX: usize = 64;

/// tungstenite writes to the socket once this much is buffered; the writer
/// flushes at the end of every batch anyway, so this only bounds one
/// write. (0 would write each frame with its own syscall.)
const WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// The only task that writes to the socket.
/// Ends with the error that ended it, or `None` after a requested close.
async fn writer<S: Stream>(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    mut queue: mpsc::Receiver<Queued>,
    closing: Arc<CloseSignal>,
    write_timeout: std::time::Duration,
) -> Option<WriteError> {
    let mut batch: Vec<Message> = Vec::new();
    let mut dones = Vec::new();
    loop {
        tokio::select! {
            biased;
            Some(first) = queue.recv() => {
                let mut next = Some(first);
                while let Some(out) = next {
                    batch.push(out.msg);
                    dones.extend(out.done);
                    next = if batch.len() < WRITE_BATCH_MAX { queue.try_recv().ok() } else { None };
                }
                let write = async {
                    for msg in batch.drain(..) {
                        sink.feed(msg).await?;
                    }
                    sink.flush().await
                };
                // Boxed: only alive while writing (see `serve`).
                let result = match Box::pin(tokio::time::timeout(write_timeout, write)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "socket write failed");
                        Err(WriteError::Socket)
                    }
                    Err(_) => Err(WriteError::Timeout),
                };
                batch.clear();
                for done in dones.drain(..) {
                    let _ = done.send(result);
                }
                if let Err(e) = result {
                    return Some(e);
                }
            }
            how = closing.requested() => {
                let _ = Box::pin(tokio::time::timeout(write_timeout, async {
                    match how {
                        Closing::Frame(f) => sink.send(Message::Close(Some(f))).await,
                        // Only what tungstenite queued by itself (the reply
                        // to a client's close frame, a pong) goes out.
                        _ => sink.flush().await,
                    }
                }))
                .await;
                return None;
            }
        }
    }
}
