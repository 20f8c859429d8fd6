//! imsim's IM client library.
//!
//! [`Client::connect_over`] takes an already-connected byte stream (a
//! tokio `TcpStream`, or a turmoil stream in the simulation), does the
//! WebSocket handshake and the login, and spawns one task that owns the
//! socket. The application talks to that task through [`Client`]:
//! commands in (send, close, abort, pause reading), [`Event`]s out, both
//! over bounded channels.
//!
//! Two behaviours, chosen by [`ClientProfile`]:
//! - `Compliant`: answers Ping with Pong and flushes it at once
//!   (tokio-tungstenite queues the Pong until the next read or write),
//!   ignores Pong, decodes only Binary frames as business messages.
//! - `Legacy`: the seed's phase-1/2 client, which read every frame as a
//!   business message. See [`ClientProfile::Legacy`] for what it does when
//!   it meets a Ping, and why that is the seed's phase-2 failure.
//!
//! [`mod@bench`] is `im-client bench`, a load generator built on [`Client`].

#[cfg(feature = "bench")]
pub mod bench;
pub mod resilient;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use im_proto::pb::{self, SendStatus};
use im_proto::{Body, ConnId, UserId, msg};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// How the client treats frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClientProfile {
    /// Handles control frames as WebSocket requires (the seed's phase-3 client).
    #[default]
    Compliant,
    /// The seed's phase-1/2 client: it reads every frame, control frames
    /// included, as a business message, and treats a frame that is not a
    /// business message as a corrupt stream: it closes the connection with
    /// 1002 (protocol error).
    ///
    /// A Ping's payload is empty, and an empty payload decodes as an
    /// Envelope with no body, which is no business message; so the first
    /// Ping the phase-2 server writes before a push makes this client hang
    /// up, the push behind it is never read, and the server's next probe
    /// to that user fails. That is the mechanism the post-mortem names
    /// ("the client had no ping/pong handling and read every frame as a
    /// business message"; "control frames interfered with business
    /// frames"), and it ends both directions of the conversation.
    Legacy,
}

impl ClientProfile {
    pub fn name(self) -> &'static str {
        match self {
            ClientProfile::Compliant => "compliant",
            ClientProfile::Legacy => "legacy",
        }
    }
}

impl fmt::Display for ClientProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ClientProfile {
    type Err = ClientError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "compliant" => Ok(ClientProfile::Compliant),
            "legacy" => Ok(ClientProfile::Legacy),
            other => Err(ClientError::UnknownProfile(other.to_owned())),
        }
    }
}

/// What can go wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("unknown client profile {0:?} (expected compliant or legacy)")]
    UnknownProfile(String),
    #[error("bad url {0:?}: {1}")]
    BadUrl(String, String),
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("websocket: {0}")]
    WebSocket(#[from] WsError),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("login refused: {0}")]
    LoginRefused(String),
    #[error("connection closed")]
    Closed,
    /// The resilient client still waits for the answer to another message
    /// with this client message id (another text or recipient): answers
    /// name only the id, so the two could not be told apart.
    #[error("client message id {0} is in use by a send still waiting for its answer")]
    IdInUse(u64),
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct Options {
    pub user: UserId,
    pub profile: ClientProfile,
    /// Used for the handshake's request line and Host header only.
    pub url: String,
    /// Time allowed for the WebSocket handshake plus the login answer.
    pub login_timeout: Duration,
    /// Events the application has not read yet; when full, the connection
    /// task stops reading the socket until there is room (backpressure).
    pub events_max: usize,
    /// Commands queued for the connection task.
    pub commands_max: usize,
    /// Largest inbound frame and message.
    pub frame_bytes_max: usize,
    /// Hardened: a signed login token (`im_proto::token`).
    pub token: String,
    /// Hardened: this device's stable id (a newer connection of the same
    /// device supersedes the older one).
    pub device: String,
    /// Hardened: the highest inbox sequence this device already has.
    pub resume_after_seq: u64,
    /// Hardened: this connection's place among the device's connections
    /// (`Login.connection_seq`): higher for every new attempt, across app
    /// restarts too (start it from the clock). 0: the server numbers
    /// connections in the order their logins arrive. The resilient client
    /// counts up from it, one per attempt.
    pub connection_seq: u64,
    /// A clean close waits this long for the server's close reply, then
    /// drops the socket and reports the close done anyway (a dead path
    /// never answers).
    pub close_timeout: Duration,
}

impl Options {
    pub fn new(user: UserId, url: impl Into<String>) -> Options {
        Options {
            user,
            profile: ClientProfile::Compliant,
            url: url.into(),
            login_timeout: Duration::from_secs(10),
            events_max: 1024,
            commands_max: 256,
            frame_bytes_max: 64 * 1024,
            token: String::new(),
            device: String::new(),
            resume_after_seq: 0,
            connection_seq: 0,
            close_timeout: Duration::from_secs(5),
        }
    }
}

/// Why the connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseCause {
    /// The application asked for a clean close, and it completed.
    ByUser,
    /// The server sent a close frame.
    ByServer { code: u16, reason: String },
    /// The stream ended or failed without a close handshake.
    Lost(String),
    /// The legacy client met a frame it could not take as a business
    /// message and hung up with 1002.
    Confused(String),
    /// The application dropped the socket without a close frame.
    Aborted,
}

/// Something that happened on the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A chat message for this user.
    Delivered {
        from: UserId,
        text: String,
        client_msg_id: u64,
        seq: u64,
    },
    /// The server's answer to one of our sends.
    SendResult {
        client_msg_id: u64,
        accepted: bool,
        reason: String,
        /// Why it was refused (`pb::ErrorCode` as i32; 0 when accepted).
        code: i32,
        /// Set when the refusal is temporary: send the same message, with
        /// the same id, again after this long.
        retry_after: Option<Duration>,
    },
    /// The server refused something we sent.
    ServerError { code: i32, detail: String },
    /// The connection is over; always the last event.
    Closed(CloseCause),
}

enum Command {
    Send(Body),
    Close,
    Abort,
    PauseReading(bool),
}

/// A logged-in connection.
pub struct Client {
    user: UserId,
    conn_id: ConnId,
    inbox_last_seq: u64,
    commands: mpsc::Sender<Command>,
    events: mpsc::Receiver<Event>,
}

impl Client {
    /// Dials `url` (`ws://host:port/ws`) over real TCP and logs in.
    pub async fn connect(options: Options) -> Result<Client, ClientError> {
        let addr = host_port(&options.url)?;
        let stream =
            tokio::time::timeout(options.login_timeout, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| ClientError::Timeout("the TCP connection"))??;
        stream.set_nodelay(true)?;
        Client::connect_over(stream, options).await
    }

    /// Does the handshake and login over an already-connected stream, then
    /// spawns the connection task (on the current tokio runtime).
    pub async fn connect_over<S>(stream: S, options: Options) -> Result<Client, ClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let deadline = options.login_timeout;
        tokio::time::timeout(deadline, Client::login(stream, options))
            .await
            .map_err(|_| ClientError::Timeout("the login answer"))?
    }

    async fn login<S>(stream: S, options: Options) -> Result<Client, ClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let config = WebSocketConfig::default()
            .read_buffer_size(4 * 1024)
            .write_buffer_size(0)
            .max_frame_size(Some(options.frame_bytes_max))
            .max_message_size(Some(options.frame_bytes_max));
        let (mut ws, _response) =
            tokio_tungstenite::client_async_with_config(options.url.as_str(), stream, Some(config))
                .await?;
        let login = Body::Login(pb::Login {
            user_id: options.user.0,
            token: options.token.clone(),
            device_id: options.device.clone(),
            resume_after_seq: options.resume_after_seq,
            connection_seq: options.connection_seq,
        });
        ws.send(Message::Binary(im_proto::encode(login))).await?;
        let ok = loop {
            match ws.next().await {
                None => return Err(ClientError::Closed),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Binary(payload))) => match im_proto::decode(&payload) {
                    Ok(Body::LoginOk(ok)) => break ok,
                    Ok(Body::Error(e)) => return Err(ClientError::LoginRefused(e.detail)),
                    Ok(other) => {
                        tracing::debug!(?other, "ignoring a message before the login answer")
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "undecodable frame before the login answer")
                    }
                },
                Some(Ok(Message::Close(frame))) => {
                    let why = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                    return Err(ClientError::LoginRefused(why));
                }
                Some(Ok(_)) => {}
            }
        };
        let (commands, command_rx) = mpsc::channel(options.commands_max);
        let (event_tx, events) = mpsc::channel(options.events_max);
        // A server that agreed on a heartbeat expects answers and acks.
        let heartbeat = (ok.heartbeat_timeout_ms > 0)
            .then(|| Duration::from_millis(ok.heartbeat_timeout_ms.into()));
        tokio::spawn(connection_task(
            ws,
            options.profile,
            heartbeat,
            options.close_timeout,
            command_rx,
            event_tx,
        ));
        Ok(Client {
            user: UserId(ok.user_id),
            conn_id: ConnId(ok.conn_id),
            inbox_last_seq: ok.inbox_last_seq,
            commands,
            events,
        })
    }

    pub fn user(&self) -> UserId {
        self.user
    }

    /// The server's id for this connection.
    pub fn conn_id(&self) -> ConnId {
        self.conn_id
    }

    /// Hardened: the inbox's last sequence number at login.
    pub fn inbox_last_seq(&self) -> u64 {
        self.inbox_last_seq
    }

    /// A handle that sends while another part of the caller reads events
    /// (see [`ClientSender`]).
    pub fn sender(&self) -> ClientSender {
        ClientSender {
            commands: self.commands.clone(),
        }
    }

    /// Sends a chat message; the answer arrives as [`Event::SendResult`].
    pub async fn send(
        &self,
        to: UserId,
        text: &str,
        client_msg_id: u64,
    ) -> Result<(), ClientError> {
        self.command(Command::Send(msg::send(to.0, text, client_msg_id)))
            .await
    }

    /// Starts a clean close; [`Event::Closed`] follows.
    pub async fn close(&self) -> Result<(), ClientError> {
        self.command(Command::Close).await
    }

    /// Drops the socket at once, without a close frame (a killed process).
    pub async fn abort(&self) -> Result<(), ClientError> {
        self.command(Command::Abort).await
    }

    /// Stops (or resumes) reading the socket: a stuck client whose pongs
    /// and pushes pile up in the network.
    pub async fn pause_reading(&self, paused: bool) -> Result<(), ClientError> {
        self.command(Command::PauseReading(paused)).await
    }

    /// The next event; `None` after [`Event::Closed`] was taken.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// An event if one is ready.
    pub fn try_next_event(&mut self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    async fn command(&self, cmd: Command) -> Result<(), ClientError> {
        self.commands
            .send(cmd)
            .await
            .map_err(|_| ClientError::Closed)
    }
}

/// Sends on a [`Client`]'s connection from elsewhere than where its events
/// are read. Backpressure: a send waits while `commands_max` commands are
/// queued; the connection task works them off as fast as the socket takes
/// them, but it stops reading the socket while `events_max` events wait
/// unread, and a server whose answers are unread stops reading too. So a
/// caller that sends more than a few hundred messages must read events
/// meanwhile: select between [`ClientSender::send`] and
/// [`Client::next_event`] in one task, or use two tasks. Sending alone
/// never fails for want of reading; it waits.
#[derive(Clone, Debug)]
pub struct ClientSender {
    commands: mpsc::Sender<Command>,
}

impl ClientSender {
    /// As [`Client::send`].
    pub async fn send(
        &self,
        to: UserId,
        text: &str,
        client_msg_id: u64,
    ) -> Result<(), ClientError> {
        self.command(Command::Send(msg::send(to.0, text, client_msg_id)))
            .await
    }

    /// As [`Client::close`].
    pub async fn close(&self) -> Result<(), ClientError> {
        self.command(Command::Close).await
    }

    async fn command(&self, cmd: Command) -> Result<(), ClientError> {
        self.commands
            .send(cmd)
            .await
            .map_err(|_| ClientError::Closed)
    }
}

/// `ws://host:port/path` → `host:port`.
pub(crate) fn host_port(url: &str) -> Result<String, ClientError> {
    let uri: tokio_tungstenite::tungstenite::http::Uri =
        url.parse()
            .map_err(|e: tokio_tungstenite::tungstenite::http::uri::InvalidUri| {
                ClientError::BadUrl(url.to_owned(), e.to_string())
            })?;
    if uri.scheme_str() != Some("ws") {
        return Err(ClientError::BadUrl(
            url.to_owned(),
            "only ws:// is supported".into(),
        ));
    }
    let host = uri
        .host()
        .ok_or_else(|| ClientError::BadUrl(url.to_owned(), "no host".into()))?;
    Ok(format!("{host}:{}", uri.port_u16().unwrap_or(80)))
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86400 * 365)
}

/// Hardened: answer the server's heartbeats, acknowledge deliveries.
async fn hardened_reply<S>(ws: &mut WebSocketStream<S>, inbound: &Inbound) -> Result<(), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let answer = match inbound {
        Inbound::Heartbeat(hb) if !hb.reply => Body::Heartbeat(pb::Heartbeat {
            nonce: hb.nonce,
            reply: true,
        }),
        Inbound::Event(Event::Delivered { seq, .. }) if *seq > 0 => {
            Body::Ack(pb::Ack { seq: *seq })
        }
        _ => return Ok(()),
    };
    ws.send(Message::Binary(im_proto::encode(answer))).await
}

/// What one inbound frame means to the application.
enum Inbound {
    Event(Event),
    Heartbeat(pb::Heartbeat),
    Nothing,
    End(CloseCause),
}

async fn connection_task<S>(
    mut ws: WebSocketStream<S>,
    profile: ClientProfile,
    heartbeat_timeout: Option<Duration>,
    close_timeout: Duration,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut paused = false;
    let mut closing = false;
    // A clean close ends by this time whether or not the server answers.
    let close_by = tokio::time::sleep(Duration::MAX);
    tokio::pin!(close_by);
    // Hardened: silence from the server past the agreed timeout means the
    // path is dead (half-open); give up on this connection.
    let silence = heartbeat_timeout.unwrap_or(Duration::MAX);
    let mut last_heard = tokio::time::Instant::now();
    let cause = loop {
        let deadline = last_heard.checked_add(silence).unwrap_or_else(far_future);
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(deadline), if heartbeat_timeout.is_some() && !closing => {
                break CloseCause::Lost("heartbeat timeout: the server went silent".into());
            }
            _ = &mut close_by, if closing => {
                tracing::debug!("no close reply within the close timeout; dropping the socket");
                break CloseCause::ByUser;
            }
            cmd = commands.recv(), if !closing => match cmd {
                Some(Command::Send(body)) => {
                    if let Err(e) = ws.send(Message::Binary(im_proto::encode(body))).await {
                        break CloseCause::Lost(e.to_string());
                    }
                }
                Some(Command::Close) | None => {
                    closing = true;
                    paused = false;
                    close_by.as_mut().reset(tokio::time::Instant::now() + close_timeout);
                    // Bounded too: over a dead path the close frame's own
                    // write may never complete.
                    let _ = tokio::time::timeout(close_timeout, ws.close(None)).await;
                }
                Some(Command::Abort) => break CloseCause::Aborted,
                Some(Command::PauseReading(p)) => paused = p,
            },
            frame = ws.next(), if !paused => {
                last_heard = tokio::time::Instant::now();
                let inbound = match frame {
                    None if closing => Inbound::End(CloseCause::ByUser),
                    None => Inbound::End(CloseCause::Lost("stream ended".into())),
                    Some(Err(WsError::ConnectionClosed)) if closing => Inbound::End(CloseCause::ByUser),
                    Some(Err(e)) => Inbound::End(CloseCause::Lost(e.to_string())),
                    Some(Ok(message)) => match profile {
                        ClientProfile::Compliant => compliant(&mut ws, message, closing).await,
                        ClientProfile::Legacy => legacy(&mut ws, message, closing).await,
                    },
                };
                if heartbeat_timeout.is_some()
                    && let Err(e) = hardened_reply(&mut ws, &inbound).await
                {
                    break CloseCause::Lost(e.to_string());
                }
                match inbound {
                    Inbound::Heartbeat(_) => {}
                    Inbound::Event(event) => {
                        if events.send(event).await.is_err() {
                            // The application dropped the client: hang up.
                            let _ = ws.close(None).await;
                            return;
                        }
                    }
                    Inbound::Nothing => {}
                    Inbound::End(cause) => break cause,
                }
            }
        }
    };
    tracing::debug!(?cause, "connection over");
    drop(ws);
    let _ = events.send(Event::Closed(cause)).await;
}

async fn compliant<S>(ws: &mut WebSocketStream<S>, message: Message, closing: bool) -> Inbound
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match message {
        Message::Binary(payload) => match im_proto::decode(&payload) {
            Ok(body) => business(body),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an undecodable frame");
                Inbound::Nothing
            }
        },
        Message::Ping(_) => {
            // tungstenite queued the Pong; push it out now rather than at
            // the next read or write, which may never come.
            match ws.flush().await {
                Ok(()) => Inbound::Nothing,
                Err(e) => Inbound::End(CloseCause::Lost(e.to_string())),
            }
        }
        Message::Close(frame) => close_cause(frame, closing),
        Message::Pong(_) | Message::Text(_) | Message::Frame(_) => Inbound::Nothing,
    }
}

async fn legacy<S>(ws: &mut WebSocketStream<S>, message: Message, closing: bool) -> Inbound
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Message::Close(frame) = message {
        return close_cause(frame, closing);
    }
    // Every frame is a business message to this client.
    let payload = message.into_data();
    match im_proto::decode(&payload) {
        Ok(body) => business(body),
        Err(e) => {
            let why = format!("not a business message: {e}");
            tracing::warn!(%why, "legacy client hangs up");
            let frame = CloseFrame {
                code: CloseCode::Protocol,
                reason: "unexpected message".into(),
            };
            let _ = ws.close(Some(frame)).await;
            Inbound::End(CloseCause::Confused(why))
        }
    }
}

fn close_cause(frame: Option<CloseFrame>, closing: bool) -> Inbound {
    if closing {
        // Our own close being answered; the stream ends next.
        return Inbound::Nothing;
    }
    let (code, reason) = frame
        .map(|f| (u16::from(f.code), f.reason.to_string()))
        .unwrap_or((1005, String::new()));
    Inbound::End(CloseCause::ByServer { code, reason })
}

fn business(body: Body) -> Inbound {
    match body {
        Body::Deliver(d) => Inbound::Event(Event::Delivered {
            from: UserId(d.from_user_id),
            text: d.text,
            client_msg_id: d.client_msg_id,
            seq: d.seq,
        }),
        Body::SendResult(r) => Inbound::Event(Event::SendResult {
            client_msg_id: r.client_msg_id,
            accepted: r.status == SendStatus::Accepted as i32,
            reason: r.reason,
            code: r.code,
            retry_after: (r.retry_after_ms > 0)
                .then(|| Duration::from_millis(r.retry_after_ms.into())),
        }),
        Body::Error(pb::Error { code, detail }) => {
            Inbound::Event(Event::ServerError { code, detail })
        }
        Body::Heartbeat(hb) => Inbound::Heartbeat(hb),
        Body::LoginOk(_) | Body::Ack(_) | Body::Login(_) | Body::Send(_) => Inbound::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_reads_ws_urls() {
        assert_eq!(
            host_port("ws://127.0.0.1:8080/ws").unwrap(),
            "127.0.0.1:8080"
        );
        assert_eq!(host_port("ws://server/ws").unwrap(), "server:80");
        assert!(host_port("http://x/ws").is_err());
        assert!(host_port("not a url").is_err());
    }

    #[test]
    fn profiles_parse_by_name() {
        assert_eq!(
            "legacy".parse::<ClientProfile>().unwrap(),
            ClientProfile::Legacy
        );
        assert_eq!(
            "compliant".parse::<ClientProfile>().unwrap(),
            ClientProfile::Compliant
        );
        assert!("modern".parse::<ClientProfile>().is_err());
    }
}
