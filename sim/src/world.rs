//! The simulated world of one run, and the driver that plays a scenario in it.
//!
//! Hosts: `redis` (the RESP model in [`crate::redis_model`]), `node1..N`
//! (the real `im-server` over a turmoil listener), and `user<ID>` (an
//! agent driving the real `im-client` library over a turmoil stream). The
//! driver steps the simulation, applies each scenario step at its time,
//! then heals every fault, lets the system settle, reads presence from
//! Redis and probes liveness. Everything it observes goes to a
//! [`History`].

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use im_client::resilient::{Dial, Resilience, Resilient, ResilientEvent};
use im_client::{Client, ClientProfile, Event as ClientEvent, Options};
use im_proto::UserId;
use im_server::listener::BoxStream;
use im_server::{Bug, Config, Connector, Listener, Profile, RedisLink, Server};
use tokio::sync::Notify;

use crate::crash::{Graveyard, Ordered};
use crate::history::{Event, History, MsgKey};
use crate::redis_model::{self, SharedRedis};
use crate::scenario::{Action, Scenario, device_host};
use crate::wire::{NetState, ServerTap, WireLog, WireRecord};

/// A user's device: (user id, device name).
pub type Dev = (u64, String);

/// The port every server node listens on.
pub const WS_PORT: u16 = 8080;
/// The simulated Redis's port.
pub const REDIS_PORT: u16 = 6379;

/// Why a run could not complete (as opposed to an invariant failing).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("simulation failed at {at:?}: {message}")]
    Turmoil { at: Duration, message: String },
}

/// Everything a run produced.
#[derive(Debug)]
pub struct RunResult {
    pub history: History,
    /// `online_users` in Redis at quiescence; `None` if Redis was down.
    pub redis_online: Option<BTreeSet<u64>>,
    /// Users the story leaves online (their last step connects).
    pub intended_online: BTreeSet<Dev>,
    /// (recipient, message) stored in an inbox at quiescence (hardened).
    pub stored: BTreeSet<(u64, MsgKey)>,
    /// (recipient, message) stored more than once in one inbox.
    pub stored_twice: BTreeSet<(u64, MsgKey)>,
    /// How long the run lasted in simulated time.
    pub elapsed: Duration,
    /// Every frame the nodes wrote, seen at their sockets.
    pub wire: Vec<WireRecord>,
    /// Whether the server keeps an inbox (hardened): a device that logs in
    /// after a message was sent still receives it. The seed's phases push
    /// only to connections that exist when the message is sent.
    pub inbox: bool,
    /// Every user the story names (the only users who can ever log in).
    pub users: BTreeSet<u64>,
    /// Devices whose login token is not in canonical form (the hardened
    /// server must refuse them).
    pub odd_tokens: BTreeSet<Dev>,
    /// Users whose doorbell some node listened to at quiescence
    /// (hardened; `None` if Redis was down, or for the seed's phases).
    pub bells_heard: Option<BTreeSet<u64>>,
}

/// The faults in effect: links cut or held, hosts disturbed.
type Weather = (Vec<(String, String)>, Vec<String>);

/// A turmoil listener behind the server's transport seam; each accepted
/// stream is tapped (see [`crate::wire`]).
struct TurmoilListener {
    inner: turmoil::net::TcpListener,
    node: u64,
    wire: WireLog,
    yard: Graveyard,
}

impl Listener for TurmoilListener {
    type Stream = ServerTap<Ordered<turmoil::net::TcpStream>>;
    async fn accept(&mut self) -> io::Result<(Self::Stream, SocketAddr)> {
        let (stream, peer) = self.inner.accept().await?;
        let host = turmoil::reverse_lookup(peer.ip()).unwrap_or_else(|| peer.ip().to_string());
        Ok((self.wire.tap(self.yard.wrap(stream), self.node, host), peer))
    }
}

fn turmoil_redis_connector(yard: Graveyard) -> Connector {
    Arc::new(move || {
        let yard = yard.clone();
        Box::pin(async move {
            let stream = turmoil::net::TcpStream::connect(("redis", REDIS_PORT)).await?;
            Ok(Box::new(yard.wrap(stream)) as BoxStream)
        })
    })
}

/// A forwarder listens on this port plus the node's number.
pub const FORWARD_PORT_BASE: u16 = 9000;

/// Opens a stream to `node`: directly, or through the forwarder host
/// `path` (a device's other network address), which the node then sees as
/// the peer.
async fn dial(path: Option<String>, node: u64) -> io::Result<turmoil::net::TcpStream> {
    match path {
        Some(host) => {
            turmoil::net::TcpStream::connect((host.as_str(), FORWARD_PORT_BASE + node as u16)).await
        }
        None => turmoil::net::TcpStream::connect((format!("node{node}").as_str(), WS_PORT)).await,
    }
}

/// Dials `node` from the device's current address.
async fn dial_node(ctx: &AgentCtx, node: u64) -> io::Result<turmoil::net::TcpStream> {
    let path = ctx
        .via
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .map(|v| crate::scenario::address_host(ctx.user, &ctx.device, &v));
    dial(path, node).await
}

/// A device's other network address: forwards each connection on port
/// `FORWARD_PORT_BASE + n` to node `n`, so the nodes see this host as the
/// peer and faults on this host's links touch only what goes through it.
async fn forwarder(nodes: u64, yard: Graveyard) -> turmoil::Result {
    // First, so dropped last in a crash (see `crash`).
    let _guard = yard.guard();
    for n in 1..=nodes {
        let listener =
            turmoil::net::TcpListener::bind(("0.0.0.0", FORWARD_PORT_BASE + n as u16)).await?;
        let yard = yard.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let yard = yard.clone();
                tokio::spawn(async move {
                    let target = turmoil::net::TcpStream::connect((format!("node{n}"), WS_PORT));
                    if let Ok(outbound) = target.await {
                        let (mut a, mut b) = (yard.wrap(inbound), yard.wrap(outbound));
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                });
            }
        });
    }
    std::future::pending::<()>().await;
    Ok(())
}

/// The secret the simulated nodes sign and check login tokens with.
pub const AUTH_SECRET: &[u8] = b"imsim-simulation-secret";

/// Unix time in the simulation (the pinned epoch plus simulated time).
pub fn unix_ms() -> u64 {
    turmoil::since_epoch()
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Simulated time since the run began, as seen from inside a host.
pub fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// A command from the driver to a user's agent.
#[derive(Clone, Debug)]
enum Cmd {
    Connect {
        node: u64,
        /// The device's other network address to connect from, if any.
        via: Option<String>,
    },
    Close,
    Abort,
    Send {
        key: MsgKey,
        to: u64,
        text: String,
        probe: bool,
    },
    PauseReading(bool),
}

/// The driver's mailbox to one agent. Commands are few and come from the
/// scenario, so a plain queue suffices; the agent wakes on `notify`.
#[derive(Default)]
struct Mailbox {
    queue: RefCell<VecDeque<Cmd>>,
    notify: Notify,
}

impl Mailbox {
    fn post(&self, cmd: Cmd) {
        self.queue.borrow_mut().push_back(cmd);
        self.notify.notify_one();
    }
}

/// Bytes moved on a user's current connection, seen at the client end;
/// the middlebox fault reads the time of the last one.
#[derive(Default)]
struct Activity {
    last_ms: AtomicU64,
}

/// A stream that stamps its activity (for the idle-dropping middlebox).
struct Tapped<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tapped<S> {
    fn touch(&self) {
        self.activity
            .last_ms
            .store(now().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Tapped<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tapped<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What an agent needs; shared between the driver and the host closure.
struct AgentCtx {
    user: u64,
    device: String,
    profile: ClientProfile,
    /// The node the user's device dials (hardened clients redial it).
    home: Arc<AtomicU64>,
    /// The device's other network address it connects from, if any
    /// (`via`: the forwarder host `user<ID>@<via>`).
    via: Arc<Mutex<Option<String>>>,
    /// How many nodes there are (hardened clients fall back to others).
    nodes: u64,
    /// The node the latest successful dial reached.
    reached: Arc<AtomicU64>,
    connect_timeout: Duration,
    mailbox: Mailbox,
    activity: Arc<Activity>,
    history: Rc<RefCell<History>>,
    /// The device host's streams, for a power-off (see `crash`).
    yard: Graveyard,
    /// The highest inbox sequence this device received: an app keeps it
    /// across restarts, so a new client session resumes after it.
    last_seq: std::cell::Cell<u64>,
    /// The node of the seed-style client's current connection (its
    /// `conn` numbers are that node's).
    client_node: std::cell::Cell<u64>,
    /// How the device writes its login token.
    token: crate::scenario::TokenForm,
}

impl AgentCtx {
    fn record(&self, event: Event) {
        self.history.borrow_mut().push(now(), event);
    }

    /// The client saw connection `conn` (of `node`) end.
    fn closed(&self, node: u64, conn: u64, cause: &im_client::CloseCause) -> Event {
        let code = match cause {
            im_client::CloseCause::ByServer { code, .. } => Some(*code),
            _ => None,
        };
        Event::Closed {
            user: self.user,
            device: self.device.clone(),
            node,
            conn,
            cause: format!("{cause:?}"),
            code,
        }
    }

    /// The app ended connection `conn` (of `node`) itself.
    fn closed_as(&self, node: u64, conn: u64, why: &str) -> Event {
        Event::Closed {
            user: self.user,
            device: self.device.clone(),
            node,
            conn,
            cause: why.into(),
            code: None,
        }
    }
}

/// A user's device: runs the real client library as the driver commands.
///
/// Commands run in the order the driver posted them. Those that need room
/// in the client's bounded command queue (a send, a close) are raced with
/// reading the client's events, so a burst of any size never deadlocks:
/// the client library waits for its caller to read (see
/// `im_client::ClientSender`), and this agent always does.
async fn agent(ctx: Rc<AgentCtx>) -> turmoil::Result {
    // First, so dropped last in a power-off (see `crash`).
    let _guard = ctx.yard.guard();
    let mut client: Option<Client> = None;
    let mut pending: VecDeque<Cmd> = VecDeque::new();
    loop {
        // Reading or not is the app's, not its send queue's: a pause or
        // resume acts at once, even behind sends that wait for room.
        let drained: Vec<Cmd> = ctx.mailbox.queue.borrow_mut().drain(..).collect();
        for cmd in drained {
            match cmd {
                Cmd::PauseReading(p) => {
                    if let Some(c) = &client {
                        let _ = c.pause_reading(p).await;
                    }
                }
                other => pending.push_back(other),
            }
        }
        match pending.front() {
            Some(Cmd::Connect { .. } | Cmd::Abort | Cmd::PauseReading(_)) => {
                let cmd = pending.pop_front().expect("a front");
                agent_command(&ctx, &mut client, cmd).await;
                continue;
            }
            Some(Cmd::Send { .. } | Cmd::Close) if client.is_none() => {
                let cmd = pending.pop_front().expect("a front");
                if let Cmd::Send {
                    key,
                    to,
                    text,
                    probe,
                } = cmd
                {
                    ctx.record(Event::SendFailed {
                        key,
                        to,
                        text,
                        reason: "not connected".into(),
                        probe,
                    });
                }
                continue;
            }
            _ => {}
        }
        let sender = client.as_ref().map(Client::sender);
        let head = pending.front();
        tokio::select! {
            biased;
            _ = ctx.mailbox.notify.notified() => {}
            done = async {
                let sender = sender.as_ref().expect("connected");
                match head.expect("a command") {
                    Cmd::Send { key, to, text, .. } => sender.send(UserId(*to), text, key.id).await,
                    _ => sender.close().await,
                }
            }, if head.is_some() && sender.is_some() => {
                let cmd = pending.pop_front().expect("a front");
                if let Cmd::Send { key, to, text, probe } = cmd {
                    match done {
                        Ok(()) => ctx.record(Event::Sent { key, device: ctx.device.clone(), to, text, probe }),
                        Err(e) => ctx.record(Event::SendFailed { key, to, text, reason: e.to_string(), probe }),
                    }
                }
            }
            event = next_event(&mut client) => {
                let conn = client.as_ref().map_or(0, |c| c.conn_id().0);
                match event {
                    Some(ClientEvent::Delivered { from, text, client_msg_id, .. }) => ctx.record(Event::Delivered {
                        to: ctx.user, device: ctx.device.clone(),
                        node: ctx.client_node.get(),
                        conn,
                        key: MsgKey { from: from.0, id: client_msg_id },
                        text,
                    }),
                    Some(ClientEvent::SendResult { client_msg_id, accepted, reason, .. }) => ctx.record(Event::SendResult {
                        key: MsgKey { from: ctx.user, id: client_msg_id },
                        accepted,
                        reason,
                    }),
                    Some(ClientEvent::ServerError { code, detail }) => ctx.record(Event::ServerError { user: ctx.user, device: ctx.device.clone(), code, detail }),
                    Some(ClientEvent::Closed(cause)) => {
                        ctx.record(ctx.closed(ctx.client_node.get(), conn, &cause));
                        client = None;
                    }
                    None => client = None,
                }
            }
        }
    }
}

async fn next_event(client: &mut Option<Client>) -> Option<ClientEvent> {
    match client {
        Some(c) => c.next_event().await,
        None => std::future::pending().await,
    }
}

/// The commands that need no room in the client's queue (or no client).
async fn agent_command(ctx: &AgentCtx, client: &mut Option<Client>, cmd: Cmd) {
    match cmd {
        Cmd::Connect { node, via } => {
            *ctx.via.lock().unwrap_or_else(|e| e.into_inner()) = via;
            if let Some(old) = client.take() {
                // A reconnecting app abandons its old socket (FIN, no close frame).
                let _ = old.abort().await;
                ctx.record(ctx.closed_as(
                    ctx.client_node.get(),
                    old.conn_id().0,
                    "abandoned for a new connection",
                ));
            }
            let host = format!("node{node}");
            let mut options = Options::new(UserId(ctx.user), format!("ws://{host}:{WS_PORT}/ws"));
            options.profile = ctx.profile;
            options.login_timeout = ctx.connect_timeout;
            let activity = ctx.activity.clone();
            let attempt = async {
                let tcp = dial_node(ctx, node).await?;
                let stream = Tapped {
                    inner: ctx.yard.wrap(tcp),
                    activity,
                };
                Client::connect_over(stream, options)
                    .await
                    .map_err(io::Error::other)
            };
            match tokio::time::timeout(ctx.connect_timeout, attempt).await {
                Ok(Ok(c)) => {
                    ctx.activity
                        .last_ms
                        .store(now().as_millis() as u64, Ordering::Relaxed);
                    ctx.client_node.set(node);
                    ctx.record(Event::Connected {
                        user: ctx.user,
                        device: ctx.device.clone(),
                        node,
                        conn: c.conn_id().0,
                    });
                    *client = Some(c);
                }
                Ok(Err(e)) => ctx.record(Event::ConnectFailed {
                    user: ctx.user,
                    device: ctx.device.clone(),
                    node,
                    error: e.to_string(),
                }),
                Err(_) => ctx.record(Event::ConnectFailed {
                    user: ctx.user,
                    device: ctx.device.clone(),
                    node,
                    error: "timed out".into(),
                }),
            }
        }
        Cmd::Abort => {
            if let Some(c) = client.take() {
                let _ = c.abort().await;
                ctx.record(ctx.closed_as(ctx.client_node.get(), c.conn_id().0, "vanished"));
            }
        }
        Cmd::PauseReading(paused) => {
            if let Some(c) = client {
                let _ = c.pause_reading(paused).await;
            }
        }
        Cmd::Send { .. } | Cmd::Close => unreachable!("raced with events in `agent`"),
    }
}

/// A user's device running the resilient (hardened) client: it keeps
/// itself connected; the driver only says where and when to start, stop or
/// redial. A vanish cuts the network, then the app drops its socket (the
/// FIN is lost: the server keeps a half-open connection) and redials by
/// itself until the network is back. A middlebox drop is silent to both
/// ends: the app notices by heartbeat timeout.
///
/// As in [`agent`], commands run in order, and sends are raced with
/// reading the client's events, so a burst of any size gets through.
async fn hardened_agent(ctx: Rc<AgentCtx>) -> turmoil::Result {
    // First, so dropped last in a power-off (see `crash`).
    let _guard = ctx.yard.guard();
    let mut client: Option<Resilient> = None;
    // The current connection: (node, the node's connection id).
    let mut conn = (0u64, 0u64);
    // Closed by the story; its Stopped event may still be on the way.
    let mut closed = false;
    // A closed client still finishing its close while a new one runs, and
    // the connection it had.
    let mut retiring: Option<(Resilient, (u64, u64))> = None;
    let mut pending: VecDeque<Cmd> = VecDeque::new();
    loop {
        // Reading or not is the app's, not its send queue's: a pause or
        // resume acts at once (the client takes controls even while its
        // outbox is full and sends wait).
        let drained: Vec<Cmd> = ctx.mailbox.queue.borrow_mut().drain(..).collect();
        for cmd in drained {
            match cmd {
                Cmd::PauseReading(p) => {
                    if let Some(c) = &client
                        && !closed
                    {
                        let _ = c.pause_reading(p).await;
                    }
                }
                other => pending.push_back(other),
            }
        }
        match pending.front() {
            Some(Cmd::Connect { .. }) => {
                let Some(Cmd::Connect { node, via }) = pending.pop_front() else {
                    unreachable!("matched above");
                };
                ctx.home.store(node, Ordering::Relaxed);
                *ctx.via.lock().unwrap_or_else(|e| e.into_inner()) = via;
                match client.take() {
                    Some(c) if !closed => {
                        let _ = c.reconnect().await;
                        client = Some(c);
                    }
                    Some(old) => {
                        // A connect right after a disconnect: a new client
                        // starts at once (a closed one does not reconnect)
                        // while the old one finishes closing beside it, as
                        // an app that reopens does: the old close may
                        // still be on its way when the new login lands.
                        retiring = Some((old, conn));
                        closed = false;
                        client = Some(start_resilient(&ctx));
                    }
                    None => client = Some(start_resilient(&ctx)),
                }
                continue;
            }
            Some(Cmd::Send { .. }) if client.is_none() => {
                let Some(Cmd::Send {
                    key,
                    to,
                    text,
                    probe,
                }) = pending.pop_front()
                else {
                    unreachable!("matched above");
                };
                ctx.record(Event::SendFailed {
                    key,
                    to,
                    text,
                    reason: "not started".into(),
                    probe,
                });
                continue;
            }
            Some(Cmd::Close | Cmd::Abort | Cmd::PauseReading(_)) if client.is_none() || closed => {
                pending.pop_front();
                continue;
            }
            _ => {}
        }
        let sender = client.as_ref().map(Resilient::sender);
        let head = pending.front();
        let event = tokio::select! {
            biased;
            _ = ctx.mailbox.notify.notified() => continue,
            done = async {
                let sender = sender.as_ref().expect("started");
                match head.expect("a command") {
                    Cmd::Send { key, to, text, .. } => sender.send(UserId(*to), text, key.id).await,
                    Cmd::Close => sender.close().await,
                    // The app drops its socket while the network is cut (its
                    // FIN is lost, so the server holds a half-open
                    // connection) and, being resilient, redials at once.
                    Cmd::Abort => sender.reconnect().await,
                    Cmd::PauseReading(p) => sender.pause_reading(*p).await,
                    Cmd::Connect { .. } => unreachable!("handled above"),
                }
            }, if head.is_some() && sender.is_some() => {
                match pending.pop_front().expect("a front") {
                    Cmd::Send { key, to, text, probe } => match done {
                        Ok(()) => ctx.record(Event::Sent { key, device: ctx.device.clone(), to, text, probe }),
                        Err(e) => ctx.record(Event::SendFailed { key, to, text, reason: e.to_string(), probe }),
                    },
                    Cmd::Close => closed = true,
                    _ => {}
                }
                continue;
            }
            event = async {
                match &mut retiring {
                    Some((c, _)) => c.next_event().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some((_, old_conn)) = &mut retiring
                    && record_resilient(&ctx, old_conn, event)
                {
                    retiring = None;
                }
                continue;
            }
            event = async {
                match &mut client {
                    Some(c) => c.next_event().await,
                    None => std::future::pending().await,
                }
            } => event,
        };
        if record_resilient(&ctx, &mut conn, event) {
            client = None;
            closed = false;
        }
    }
}

/// Records one event of a hardened device's client; true once it stopped.
fn record_resilient(ctx: &AgentCtx, conn: &mut (u64, u64), event: Option<ResilientEvent>) -> bool {
    let node = ctx.home.load(Ordering::Relaxed);
    match event {
        Some(ResilientEvent::Connected { conn_id }) => {
            *conn = (ctx.reached.load(Ordering::Relaxed), conn_id);
            ctx.record(Event::Connected {
                user: ctx.user,
                device: ctx.device.clone(),
                node: conn.0,
                conn: conn.1,
            });
        }
        Some(ResilientEvent::Disconnected { conn_id, cause }) => {
            ctx.record(ctx.closed(conn.0, conn_id, &cause))
        }
        Some(ResilientEvent::ConnectFailed { error }) => ctx.record(Event::ConnectFailed {
            user: ctx.user,
            device: ctx.device.clone(),
            node,
            error,
        }),
        Some(ResilientEvent::Retrying {
            client_msg_id,
            reason,
            ..
        }) => ctx.record(Event::SendRetry {
            key: MsgKey {
                from: ctx.user,
                id: client_msg_id,
            },
            reason,
        }),
        Some(ResilientEvent::Event(ClientEvent::Delivered {
            from,
            text,
            client_msg_id,
            seq,
        })) => {
            ctx.last_seq.set(ctx.last_seq.get().max(seq));
            ctx.record(Event::Delivered {
                to: ctx.user,
                device: ctx.device.clone(),
                node: conn.0,
                conn: conn.1,
                key: MsgKey {
                    from: from.0,
                    id: client_msg_id,
                },
                text,
            });
        }
        Some(ResilientEvent::Event(ClientEvent::SendResult {
            client_msg_id,
            accepted,
            reason,
            ..
        })) => ctx.record(Event::SendResult {
            key: MsgKey {
                from: ctx.user,
                id: client_msg_id,
            },
            accepted,
            reason,
        }),
        Some(ResilientEvent::Event(ClientEvent::ServerError { code, detail })) => {
            ctx.record(Event::ServerError {
                user: ctx.user,
                device: ctx.device.clone(),
                code,
                detail,
            })
        }
        Some(ResilientEvent::Event(ClientEvent::Closed(_))) => {}
        Some(ResilientEvent::Stopped(_)) | None => return true,
    }
    false
}

fn start_resilient(ctx: &AgentCtx) -> Resilient {
    let home = ctx.home.clone();
    let (user, device, via) = (ctx.user, ctx.device.clone(), ctx.via.clone());
    let activity = ctx.activity.clone();
    let nodes = ctx.nodes;
    let reached = ctx.reached.clone();
    let yard = ctx.yard.clone();
    // Like a load balancer: the device's home node first, then the others.
    let dial: Dial = Arc::new(move || {
        let first = home.load(Ordering::Relaxed);
        let path = via
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .map(|v| crate::scenario::address_host(user, &device, &v));
        let activity = activity.clone();
        let reached = reached.clone();
        let yard = yard.clone();
        Box::pin(async move {
            let order = std::iter::once(first).chain((1..=nodes).filter(move |&n| n != first));
            let mut last_error = io::Error::other("no nodes");
            for node in order {
                let connect = dial(path.clone(), node);
                // A crashed host swallows SYNs: give each node a second.
                match tokio::time::timeout(Duration::from_secs(1), connect)
                    .await
                    .unwrap_or_else(|_| {
                        Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
                    }) {
                    Ok(tcp) => {
                        reached.store(node, Ordering::Relaxed);
                        activity
                            .last_ms
                            .store(now().as_millis() as u64, Ordering::Relaxed);
                        let stream = Tapped {
                            inner: yard.wrap(tcp),
                            activity,
                        };
                        return Ok(Box::new(stream) as Box<dyn im_client::resilient::Stream>);
                    }
                    Err(e) => last_error = e,
                }
            }
            Err(last_error)
        })
    });
    let user = UserId(ctx.user);
    let mut options = Options::new(user, "ws://imsim/ws");
    // The user's frame handling: the seed's legacy client reads every frame
    // as a business message, under the resilient logic too.
    options.profile = ctx.profile;
    options.token = ctx
        .token
        .mint(AUTH_SECRET, user.0, unix_ms() / 1000 + 86_400);
    options.device = ctx.device.clone();
    options.login_timeout = ctx.connect_timeout;
    options.resume_after_seq = ctx.last_seq.get();
    // As an app would: this client's connections outrank every earlier
    // client's of the device (the simulated clock, ms x 1000).
    options.connection_seq = unix_ms() * 1000;
    Resilient::start(dial, options, Resilience::default())
}

/// Plays `scenario` with `seed` against `profile`; returns what happened.
pub fn run(
    scenario: &Scenario,
    seed: u64,
    profile: Profile,
    bugs: &BTreeSet<Bug>,
) -> Result<RunResult, SimError> {
    let t = scenario.timeouts;
    let settle = t.settle.0;
    // Story, settle, heal + settle, liveness + settle, plus margin.
    let total = scenario.story_end() + settle * 3 + t.connect.0 * 2 + Duration::from_secs(10);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        .simulation_duration(total)
        .tick_duration(t.tick.0)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(t.latency.0)
        .tcp_capacity(scenario.network.tcp_capacity)
        .build();

    let history = Rc::new(RefCell::new(History::default()));
    let redis = SharedRedis::new(now);
    let mut yards = BTreeMap::new();
    {
        let redis = redis.clone();
        let yard = Graveyard::default();
        yards.insert("redis".to_owned(), yard.clone());
        sim.host("redis", move || {
            redis_model::serve_turmoil(redis.clone(), REDIS_PORT, yard.clone())
        });
    }
    let wire = WireLog::default();
    let mut drains = BTreeMap::new();
    for n in 1..=scenario.nodes {
        let mut config = Config::new(profile);
        config.node = format!("node{n}");
        config.limits.read_idle_timeout = t.idle.0;
        config.auth_secret = Some(AUTH_SECRET.to_vec());
        config.clock = Arc::new(unix_ms);
        config.bugs = bugs.clone();
        // A drain is asked of the node's current incarnation only: a
        // restart withdraws it, so the new process does not drain at once
        // (a Notify would keep the unconsumed permit of a drain and a
        // restart in one millisecond).
        let (drain, _) = tokio::sync::watch::channel(false);
        let drain = Arc::new(drain);
        drains.insert(n, drain.clone());
        let wire = wire.clone();
        let yard = Graveyard::default();
        yards.insert(format!("node{n}"), yard.clone());
        sim.host(format!("node{n}"), move || {
            let config = config.clone();
            let drain = drain.clone();
            let wire = wire.clone();
            let yard = yard.clone();
            async move {
                // First, so dropped last in a crash (see `crash`).
                let _guard = yard.guard();
                let listener = turmoil::net::TcpListener::bind(("0.0.0.0", WS_PORT)).await?;
                let redis = RedisLink::new(
                    turmoil_redis_connector(yard.clone()),
                    Default::default(),
                    config.limits.redis_timeout,
                );
                Server::new(config, redis)
                    .run(
                        TurmoilListener {
                            inner: listener,
                            node: n,
                            wire,
                            yard,
                        },
                        async move {
                            let _ = drain.subscribe().wait_for(|asked| *asked).await;
                        },
                    )
                    .await;
                // Drained: the process stays down until the scenario
                // restarts the node (a returning host would be rerun).
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    }
    let mut agents = BTreeMap::new();
    for (user, device) in &scenario.devices {
        let (user, client_profile) = (*user, scenario.clients[user]);
        let ctx = Rc::new(AgentCtx {
            user,
            device: device.clone(),
            profile: client_profile,
            home: Arc::new(AtomicU64::new(1)),
            via: Arc::new(Mutex::new(None)),
            nodes: scenario.nodes,
            reached: Arc::new(AtomicU64::new(0)),
            connect_timeout: t.connect.0,
            mailbox: Mailbox::default(),
            activity: Arc::new(Activity::default()),
            history: history.clone(),
            last_seq: std::cell::Cell::new(0),
            client_node: std::cell::Cell::new(0),
            token: scenario
                .tokens
                .get(&(user, device.clone()))
                .copied()
                .unwrap_or_default(),
            yard: Graveyard::default(),
        });
        agents.insert((user, device.clone()), ctx.clone());
        let host = device_host(user, device);
        yards.insert(host.clone(), ctx.yard.clone());
        if profile.switches().hardened {
            sim.host(host, move || hardened_agent(ctx.clone()));
        } else {
            sim.host(host, move || agent(ctx.clone()));
        }
    }
    // Each other network address a device connects from: a forwarder host.
    for ((user, device), vias) in &scenario.addresses {
        for via in vias {
            let host = crate::scenario::address_host(*user, device, via);
            let yard = Graveyard::default();
            yards.insert(host.clone(), yard.clone());
            let nodes = scenario.nodes;
            sim.host(host, move || forwarder(nodes, yard.clone()));
        }
    }

    let mut driver = Driver {
        sim,
        history: history.clone(),
        redis: redis.clone(),
        agents,
        home: BTreeMap::new(),
        via: BTreeMap::new(),
        holds: BTreeSet::new(),
        next_id: BTreeMap::new(),
        partitions: BTreeSet::new(),
        crashed: BTreeSet::new(),
        drained: BTreeSet::new(),
        redis_down: false,
        redis_slow: false,
        paused: BTreeSet::new(),
        weather: None,
        blips: BTreeSet::new(),
        middleboxes: BTreeMap::new(),
        drains,
        net: wire.net.clone(),
        yards,
    };
    driver.phase("story");
    for step in &scenario.steps {
        driver.advance_to(step.at)?;
        driver.apply(&step.action);
        driver.note_weather();
    }
    driver.advance_to(scenario.story_end())?;
    let end_of_story = driver.sim.elapsed() + settle;
    driver.advance_to(end_of_story)?;

    driver.phase("heal");
    driver.heal_all();
    driver.note_weather();
    driver.advance_to(end_of_story + settle)?;

    let intended_online = intended_online(scenario, profile);
    driver.phase("quiescence");
    let redis_online = if driver.redis_down {
        None
    } else if profile.switches().hardened {
        let now_ms = 1_700_000_000_000 + driver.sim.elapsed().as_millis() as u64;
        Some(lease_holders(&redis, now_ms))
    } else {
        Some(
            redis
                .smembers(b"online_users")
                .iter()
                .filter_map(|m| std::str::from_utf8(m).ok()?.parse().ok())
                .collect(),
        )
    };

    let bells_heard = (!driver.redis_down && profile.switches().hardened).then(|| {
        redis
            .subscribed_channels()
            .iter()
            .filter_map(|c| {
                std::str::from_utf8(c)
                    .ok()?
                    .strip_prefix("im:{u:")?
                    .strip_suffix("}:bell")?
                    .parse()
                    .ok()
            })
            .collect()
    });

    driver.phase("liveness");
    // From one device of each user that should be online, to every other
    // such user (the checker wants it on each of the recipient's devices).
    let mut senders = BTreeMap::new();
    for dev in &intended_online {
        senders.entry(dev.0).or_insert_with(|| dev.clone());
    }
    for a in senders.values() {
        for &b in senders.keys() {
            if a.0 != b {
                let text = format!("probe {}->{b}", a.0);
                driver.send(a, b, Some(text), true, None);
            }
        }
    }
    driver.advance_to(end_of_story + settle * 2)?;
    driver.phase("end");
    // The inboxes at the very end: a sender's client may still have been
    // resending (and been told "sent") after quiescence.
    let (stored, stored_twice) = if driver.redis_down {
        Default::default()
    } else {
        stored_messages(&redis)
    };
    let elapsed = driver.sim.elapsed();
    // Taken before the hosts are dropped: their streams' ends would be
    // stamped outside simulated time.
    let wire = wire.records();
    drop(driver);

    let mut history = Rc::try_unwrap(history)
        .map(RefCell::into_inner)
        .unwrap_or_else(|rc| rc.borrow().clone());
    merge_presence_writes(&mut history, &redis);
    Ok(RunResult {
        inbox: profile.switches().hardened,
        users: scenario.users().into_iter().collect(),
        odd_tokens: scenario.tokens.keys().cloned().collect(),
        bells_heard,
        history,
        redis_online,
        intended_online,
        stored,
        stored_twice,
        elapsed,
        wire,
    })
}

/// Users holding at least one unexpired presence lease (hardened schema:
/// `im:{u:ID}:conns`, members scored by expiry in unix ms).
fn lease_holders(redis: &SharedRedis, now_ms: u64) -> BTreeSet<u64> {
    let mut online = BTreeSet::new();
    for (key, snap) in redis.snapshot() {
        let Ok(key) = std::str::from_utf8(&key) else {
            continue;
        };
        let Some(user) = key
            .strip_prefix("im:{u:")
            .and_then(|k| k.strip_suffix("}:conns"))
            .and_then(|id| id.parse::<u64>().ok())
        else {
            continue;
        };
        if let redis_model::Value::ZSet(members) = snap.value
            && members.iter().any(|(_, expires)| *expires > now_ms as f64)
        {
            online.insert(user);
        }
    }
    online
}

/// Messages waiting in inboxes (hardened schema: `im:{u:ID}:inbox`, each
/// member read by `im_server::inbox::entry`); and those stored more than once.
type Stored = BTreeSet<(u64, MsgKey)>;
fn stored_messages(redis: &SharedRedis) -> (Stored, Stored) {
    let mut stored = BTreeSet::new();
    let mut twice = BTreeSet::new();
    for (key, snap) in redis.snapshot() {
        let Some(user) = std::str::from_utf8(&key)
            .ok()
            .and_then(|k| k.strip_prefix("im:{u:"))
            .and_then(|k| k.strip_suffix("}:inbox"))
            .and_then(|id| id.parse::<u64>().ok())
        else {
            continue;
        };
        if let redis_model::Value::ZSet(members) = snap.value {
            for (bytes, _) in members {
                if let Ok(d) = im_server::inbox::entry(&bytes) {
                    let entry = (
                        user,
                        MsgKey {
                            from: d.from_user_id,
                            id: d.client_msg_id,
                        },
                    );
                    if !stored.insert(entry) {
                        twice.insert(entry);
                    }
                }
            }
        }
    }
    (stored, twice)
}

/// Devices whose last story step leaves them connected (a device whose
/// token the hardened server must refuse is never expected online).
fn intended_online(scenario: &Scenario, profile: Profile) -> BTreeSet<Dev> {
    let mut online = BTreeMap::new();
    for step in &scenario.steps {
        match &step.action {
            Action::Connect { user, device, .. } | Action::Reconnect { user, device, .. } => {
                online.insert((*user, device.clone()), true);
            }
            Action::Disconnect { user, device }
            | Action::Vanish { user, device }
            | Action::PowerOff { user, device } => {
                online.insert((*user, device.clone()), false);
            }
            _ => {}
        }
    }
    online
        .into_iter()
        .filter(|(d, on)| *on && !(profile.switches().hardened && scenario.tokens.contains_key(d)))
        .map(|(d, _)| d)
        .collect()
}

/// Adds the presence writes Redis executed (SADD/SREM, lease ZADD/ZREM)
/// and the messages it inserted into inboxes to the history, in time
/// order after events of the same instant.
fn merge_presence_writes(history: &mut History, redis: &SharedRedis) {
    for cmd in redis.command_log() {
        let Some(name) = cmd.args.first() else {
            continue;
        };
        let name = String::from_utf8_lossy(name).to_ascii_uppercase();
        if name == "ZADD"
            && !cmd.failed
            && let (Some(key), Some(member)) = (cmd.args.get(1), cmd.args.get(3))
            && let Some(to) = std::str::from_utf8(key)
                .ok()
                .and_then(|k| k.strip_prefix("im:{u:"))
                .and_then(|k| k.strip_suffix("}:inbox"))
                .and_then(|id| id.parse::<u64>().ok())
            && let Ok(d) = im_server::inbox::entry(member)
        {
            let key = MsgKey {
                from: d.from_user_id,
                id: d.client_msg_id,
            };
            history.push(cmd.at, Event::Stored { to, key });
            continue;
        }
        let lease = matches!(name.as_str(), "ZADD" | "ZREM")
            && cmd.args.get(1).is_some_and(|k| k.ends_with(b":conns"));
        if !(matches!(name.as_str(), "SADD" | "SREM") || lease) || cmd.failed {
            continue;
        }
        let text = cmd
            .args
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        history.push(cmd.at, Event::PresenceWrite { command: text });
    }
    // Stable: same-instant events keep their recorded order.
    history.records.sort_by_key(|r| r.at);
}

struct Driver<'a> {
    sim: turmoil::Sim<'a>,
    /// Each host's streams, buried in order when it crashes.
    yards: BTreeMap<String, Graveyard>,
    history: Rc<RefCell<History>>,
    redis: SharedRedis,
    agents: BTreeMap<Dev, Rc<AgentCtx>>,
    /// The node each device last connected to.
    home: BTreeMap<Dev, u64>,
    /// The other network address each device last connected from, if any.
    via: BTreeMap<Dev, Option<String>>,
    /// Held host pairs (released when faults heal).
    holds: BTreeSet<(String, String)>,
    next_id: BTreeMap<u64, u64>,
    partitions: BTreeSet<(String, String)>,
    crashed: BTreeSet<u64>,
    /// Drained nodes (down until restarted).
    drained: BTreeSet<u64>,
    redis_down: bool,
    /// Whether Redis's replies are delayed (a slow Redis).
    redis_slow: bool,
    /// Devices told to stop reading their socket.
    paused: BTreeSet<Dev>,
    /// The faults in effect as last recorded ([`Event::Disturbed`]).
    weather: Option<Weather>,
    /// Hosts an instant fault touched since the weather was last recorded
    /// (Redis or a node restarting): recorded as a state that lasts no
    /// time.
    blips: BTreeSet<String>,
    /// device -> idle time after which the middlebox drops its connection.
    middleboxes: BTreeMap<Dev, Duration>,
    /// Per node: whether its current incarnation is asked to drain (the
    /// server's shutdown future waits for it).
    drains: BTreeMap<u64, Arc<tokio::sync::watch::Sender<bool>>>,
    /// The network facts the wire taps stamp on their records.
    net: Arc<Mutex<NetState>>,
}

impl Driver<'_> {
    /// Crashes `host`, dropping its streams in a deterministic order (see
    /// [`crate::crash`]).
    /// Starts a node's process again: a new incarnation, not asked to
    /// drain. A process still running (drained, or draining: a drain and a
    /// restart in one millisecond) is killed first, its streams torn down
    /// in a fixed order (`crash_host`); a bare bounce would drop them in
    /// the order of the server's own maps.
    fn restart_node(&mut self, node: u64) {
        self.fault(format!("restart node{node}"));
        self.blips.insert(format!("node{node}"));
        if let Some(drain) = self.drains.get(&node) {
            drain.send_replace(false);
        }
        let host = format!("node{node}");
        if !self.crashed.contains(&node) {
            self.crash_host(&host);
        }
        self.sim.bounce(host.as_str());
        self.crashed.remove(&node);
        self.drained.remove(&node);
    }

    fn crash_host(&mut self, host: &str) {
        let yard = self.yards.get(host).cloned().unwrap_or_default();
        yard.crash(|| self.sim.crash(host));
    }

    fn record(&self, event: Event) {
        let at = self.sim.elapsed();
        self.history.borrow_mut().push(at, event);
    }

    fn phase(&self, name: &str) {
        self.record(Event::Phase { name: name.into() });
    }

    fn fault(&self, what: String) {
        self.record(Event::Fault { what });
    }

    /// Records the faults in effect when they changed: links cut or held,
    /// and hosts down, drained, slow (Redis) or not reading (a device), so
    /// that a checker can tell a calm stretch from a disturbed one.
    fn note_weather(&mut self) {
        let links: Vec<(String, String)> = self.partitions.union(&self.holds).cloned().collect();
        let mut hosts: BTreeSet<String> = self
            .crashed
            .union(&self.drained)
            .map(|n| format!("node{n}"))
            .collect();
        if self.redis_down || self.redis_slow {
            hosts.insert("redis".into());
        }
        hosts.extend(self.paused.iter().map(|(u, d)| device_host(*u, d)));
        let blips = std::mem::take(&mut self.blips);
        if !blips.is_subset(&hosts) {
            let with: BTreeSet<String> = hosts.union(&blips).cloned().collect();
            self.record(Event::Disturbed {
                links: links.clone(),
                hosts: with.into_iter().collect(),
            });
            self.weather = None;
        }
        let now = (links, hosts.into_iter().collect::<Vec<_>>());
        if self.weather.as_ref() != Some(&now) {
            self.record(Event::Disturbed {
                links: now.0.clone(),
                hosts: now.1.clone(),
            });
            self.weather = Some(now);
        }
    }

    fn advance_to(&mut self, t: Duration) -> Result<(), SimError> {
        while self.sim.elapsed() < t {
            self.sim.step().map_err(|e| SimError::Turmoil {
                at: self.sim.elapsed(),
                message: e.to_string(),
            })?;
            self.check_middleboxes();
        }
        Ok(())
    }

    fn check_middleboxes(&mut self) {
        if self.middleboxes.is_empty() {
            return;
        }
        let now = self.sim.elapsed();
        let due: Vec<(Dev, u64)> = self
            .middleboxes
            .iter()
            .filter_map(|(dev, &idle)| {
                let last = Duration::from_millis(
                    self.agents[dev].activity.last_ms.load(Ordering::Relaxed),
                );
                (now.saturating_sub(last) > idle)
                    .then(|| (dev.clone(), self.home.get(dev).copied().unwrap_or(1)))
            })
            .collect();
        for (dev, node) in due {
            self.middleboxes.remove(&dev);
            let host = self.path_host(&dev);
            self.fault(format!(
                "middlebox drops idle connection {host} <-> node{node}"
            ));
            self.partition(host, format!("node{node}"));
            self.note_weather();
        }
    }

    /// The host a device's traffic leaves from: its own, or the forwarder
    /// of the address it connected from.
    fn path_host(&self, dev: &Dev) -> String {
        match self.via.get(dev).cloned().flatten() {
            Some(via) => crate::scenario::address_host(dev.0, &dev.1, &via),
            None => device_host(dev.0, &dev.1),
        }
    }

    fn partition(&mut self, a: String, b: String) {
        self.sim.partition(a.as_str(), b.as_str());
        self.partitions.insert(ordered(a, b));
        self.sync_net();
    }

    fn repair(&mut self, a: String, b: String) {
        self.sim.repair(a.as_str(), b.as_str());
        self.partitions.remove(&ordered(a, b));
        self.sync_net();
    }

    /// Publishes the fault state to the wire taps.
    fn sync_net(&self) {
        let mut net = self.net.lock().unwrap_or_else(|e| e.into_inner());
        net.partitions = self.partitions.clone();
        net.redis_down = self.redis_down;
    }

    fn send(&mut self, from: &Dev, to: u64, text: Option<String>, probe: bool, id: Option<u64>) {
        // Ids are per user, across its devices, as the server dedups by
        // (user, id); a story may name one (reused, or 0).
        let next = self.next_id.entry(from.0).or_insert(0);
        let id = match id {
            // The story's own ids are the user's too: later automatic ids
            // (and the liveness probes) come after them, as a client's
            // counter would.
            Some(id) => {
                *next = (*next).max(id);
                id
            }
            None => {
                *next += 1;
                *next
            }
        };
        let key = MsgKey { from: from.0, id };
        let text = text.unwrap_or_else(|| format!("m{}", key.id));
        self.agents[from].mailbox.post(Cmd::Send {
            key,
            to,
            text,
            probe,
        });
    }

    fn apply(&mut self, action: &Action) {
        match action {
            Action::Connect {
                user,
                device,
                node,
                via,
            } => {
                let dev = (*user, device.clone());
                self.home.insert(dev.clone(), *node);
                self.via.insert(dev.clone(), via.clone());
                self.agents[&dev].mailbox.post(Cmd::Connect {
                    node: *node,
                    via: via.clone(),
                });
            }
            Action::Disconnect { user, device } => self.agents[&(*user, device.clone())]
                .mailbox
                .post(Cmd::Close),
            Action::Vanish { user, device } => {
                let dev = (*user, device.clone());
                let node = self.home[&dev];
                let host = self.path_host(&dev);
                self.fault(format!(
                    "{host} vanishes (partitioned from node{node}, then its socket is dropped)"
                ));
                self.partition(host, format!("node{node}"));
                self.agents[&dev].mailbox.post(Cmd::Abort);
            }
            Action::PowerOff { user, device } => {
                let dev = (*user, device.clone());
                let node = self.home[&dev];
                let host = device_host(*user, device);
                let path = self.path_host(&dev);
                self.fault(format!(
                    "{host} powers off (partitioned from node{node}, then its host dies for good)"
                ));
                self.partition(path, format!("node{node}"));
                self.crash_host(&host);
                // Its client dies with it: the device's connection is gone
                // as far as the device is concerned.
                let last_conn = self
                    .history
                    .borrow()
                    .events()
                    .fold(None, |last, e| match e {
                        Event::Connected {
                            user: u,
                            device: d,
                            node,
                            conn,
                        } if *u == dev.0 && *d == dev.1 => Some((*node, *conn)),
                        _ => last,
                    });
                if let Some((node, conn)) = last_conn {
                    self.record(Event::Closed {
                        user: *user,
                        device: device.clone(),
                        node,
                        conn,
                        cause: "powered off".into(),
                        code: None,
                    });
                }
            }
            Action::Reconnect {
                user,
                device,
                node,
                via,
            } => {
                let dev = (*user, device.clone());
                let old = self.home[&dev];
                let node = node.unwrap_or(old);
                self.via.insert(dev.clone(), via.clone());
                // The path it reconnects on works again; any other path
                // stays as it is (the old connection there stays
                // half-open, or its traffic held).
                let pair = ordered(self.path_host(&dev), format!("node{node}"));
                if self.partitions.contains(&pair) {
                    self.fault(format!("heal {} <-> {} (user reconnects)", pair.0, pair.1));
                    self.repair(pair.0, pair.1);
                }
                self.home.insert(dev.clone(), node);
                self.agents[&dev].mailbox.post(Cmd::Connect {
                    node,
                    via: via.clone(),
                });
            }
            Action::Send {
                from,
                device,
                to,
                text,
                count,
                id,
            } => {
                let dev = (*from, device.clone());
                for _ in 0..*count {
                    self.send(&dev, *to, text.clone(), false, *id);
                }
            }
            Action::Drain { node } => {
                self.fault(format!("drain node{node}"));
                self.drained.insert(*node);
                if let Some(stop) = self.drains.get(node) {
                    stop.send_replace(true);
                }
            }
            Action::Partition { a, b } => {
                self.fault(format!("partition {a} <-> {b}"));
                self.partition(a.clone(), b.clone());
            }
            Action::Heal { a, b } => {
                self.fault(format!("heal {a} <-> {b}"));
                self.repair(a.clone(), b.clone());
            }
            Action::Hold { a, b } => {
                self.fault(format!("hold {a} <-> {b} (traffic delayed until released)"));
                self.sim.hold(a.as_str(), b.as_str());
                self.holds.insert(ordered(a.clone(), b.clone()));
            }
            Action::Release { a, b } => {
                self.fault(format!("release {a} <-> {b} (held traffic delivered)"));
                self.sim.release(a.as_str(), b.as_str());
                self.holds.remove(&ordered(a.clone(), b.clone()));
            }
            Action::Crash { node } => {
                self.fault(format!("crash node{node}"));
                self.crash_host(&format!("node{node}"));
                self.crashed.insert(*node);
            }
            Action::Restart { node } => self.restart_node(*node),
            Action::RedisStop => {
                self.fault("redis stops".into());
                self.crash_host("redis");
                self.redis.lose_script_cache();
                self.redis_down = true;
                self.sync_net();
            }
            Action::RedisRestart { keep_data } => {
                self.fault(format!(
                    "redis restarts {}",
                    if *keep_data { "with its data" } else { "empty" }
                ));
                if !self.redis_down {
                    self.crash_host("redis");
                }
                self.blips.insert("redis".into());
                self.redis.lose_script_cache();
                if !keep_data {
                    self.redis.flush_data();
                }
                self.sim.bounce("redis");
                self.redis_down = false;
                self.sync_net();
            }
            Action::RedisSlow { delay } => {
                self.fault(format!(
                    "redis slows: every reply delayed {}",
                    humantime::format_duration(*delay)
                ));
                self.redis.set_delay(*delay);
                self.redis_slow = !delay.is_zero();
            }
            Action::Middlebox { user, device, idle } => {
                let host = device_host(*user, device);
                self.fault(format!(
                    "middlebox on {host}: drops the connection after {} idle",
                    humantime::format_duration(*idle)
                ));
                self.middleboxes.insert((*user, device.clone()), *idle);
            }
            Action::StopReading { user, device } => {
                self.fault(format!("{} stops reading", device_host(*user, device)));
                self.paused.insert((*user, device.clone()));
                self.agents[&(*user, device.clone())]
                    .mailbox
                    .post(Cmd::PauseReading(true));
            }
            Action::ResumeReading { user, device } => {
                self.fault(format!("{} resumes reading", device_host(*user, device)));
                self.paused.remove(&(*user, device.clone()));
                self.agents[&(*user, device.clone())]
                    .mailbox
                    .post(Cmd::PauseReading(false));
            }
        }
    }

    /// Faults end: partitions repaired, crashed nodes and Redis restarted
    /// (Redis keeps its data), stuck readers resume, middleboxes removed.
    fn heal_all(&mut self) {
        for (a, b) in std::mem::take(&mut self.holds) {
            self.fault(format!("release {a} <-> {b}"));
            self.sim.release(a.as_str(), b.as_str());
        }
        for (a, b) in std::mem::take(&mut self.partitions) {
            self.fault(format!("heal {a} <-> {b}"));
            self.sim.repair(a.as_str(), b.as_str());
        }
        let down: BTreeSet<u64> = self.crashed.union(&self.drained).copied().collect();
        for node in down {
            self.restart_node(node);
        }
        if self.redis_down {
            self.fault("redis restarts with its data".into());
            self.blips.insert("redis".into());
            self.sim.bounce("redis");
            self.redis_down = false;
        }
        self.sync_net();
        self.middleboxes.clear();
        self.redis.set_delay(Duration::ZERO);
        self.redis_slow = false;
        self.paused.clear();
        for agent in self.agents.values() {
            agent.mailbox.post(Cmd::PauseReading(false));
        }
    }
}

fn ordered(a: String, b: String) -> (String, String) {
    if a <= b { (a, b) } else { (b, a) }
}
