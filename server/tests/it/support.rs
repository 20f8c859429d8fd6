use std::sync::OnceLock;
use std::time::Duration;

use im_client::{Client, ClientProfile, Event, Options};
use im_proto::UserId;
use im_server::testing::RedisProcess;
use im_server::{Config, Profile, RedisLink, Server};
use redis::IntoConnectionInfo;
use tokio::sync::oneshot;

/// How long any awaited event may take on loopback before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(5);

/// One redis-server for the whole test binary; tests use distinct key
/// prefixes so they never see each other's data. A static is never dropped:
/// the server ends with the test process all the same (see `RedisProcess`).
pub fn redis() -> &'static RedisProcess {
    static REDIS: OnceLock<RedisProcess> = OnceLock::new();
    REDIS.get_or_init(RedisProcess::start)
}

/// A server node on 127.0.0.1:<free port>, stopped on drop.
pub struct Node {
    pub url: String,
    pub server: Server,
    pub key_prefix: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    pub async fn start(profile: Profile, test: &str) -> Node {
        Node::start_with(profile, test, |_| {}).await
    }

    pub async fn start_with(profile: Profile, test: &str, tweak: impl FnOnce(&mut Config)) -> Node {
        let mut config = Config::new(profile);
        config.key_prefix = format!("test:{test}:");
        tweak(&mut config);
        let info = redis().url().into_connection_info().unwrap();
        let link = RedisLink::new(
            im_server::tcp_connector(format!("127.0.0.1:{}", redis().port())),
            info.redis_settings().clone(),
            config.limits.redis_timeout,
        );
        let key_prefix = config.key_prefix.clone();
        let server = Server::new(config, link);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server.clone().run(listener, async {
            let _ = stopped.await;
        }));
        Node {
            url,
            server,
            key_prefix,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn connect(&self, user: u64) -> Client {
        self.connect_as(user, ClientProfile::Compliant).await
    }

    pub async fn connect_as(&self, user: u64, profile: ClientProfile) -> Client {
        let mut options = Options::new(UserId(user), &self.url);
        options.profile = profile;
        Client::connect(options).await.expect("connect and log in")
    }

    /// `SISMEMBER <prefix>online_users user`, straight from Redis.
    pub async fn online(&self, user: u64) -> bool {
        let mut con = redis_conn().await;
        redis::cmd("SISMEMBER")
            .arg(format!("{}online_users", self.key_prefix))
            .arg(user)
            .query_async(&mut con)
            .await
            .unwrap()
    }

    /// Waits until the server has no connections left (after clients
    /// closed), polling its own count; fails after PATIENCE.
    pub async fn wait_connections(&self, n: usize) {
        wait_until(|| async { self.server.connections() == n }).await;
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("server stops")
            .unwrap();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

pub async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis().url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Polls `cond` every 10 ms until it holds; panics after PATIENCE.
pub async fn wait_until<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The next event, or a test failure after PATIENCE.
pub async fn next(client: &mut Client) -> Event {
    tokio::time::timeout(PATIENCE, client.next_event())
        .await
        .expect("an event within the patience window")
        .expect("the client is still running")
}

/// Sends and returns the server's answer (accepted?, reason).
pub async fn send(client: &mut Client, to: u64, text: &str, id: u64) -> (bool, String) {
    client.send(UserId(to), text, id).await.unwrap();
    loop {
        match next(client).await {
            Event::SendResult {
                client_msg_id,
                accepted,
                reason,
                ..
            } if client_msg_id == id => return (accepted, reason),
            Event::Closed(cause) => panic!("closed while waiting for a send result: {cause:?}"),
            _ => {}
        }
    }
}

/// Waits for the next delivery and returns (from, text).
pub async fn delivery(client: &mut Client) -> (u64, String) {
    loop {
        match next(client).await {
            Event::Delivered { from, text, .. } => return (from.0, text),
            Event::Closed(cause) => panic!("closed while waiting for a delivery: {cause:?}"),
            _ => {}
        }
    }
}

/// Sends from `a` to `b` and asserts it is accepted and arrives intact.
pub async fn chat(a: &mut Client, b: &mut Client, text: &str, id: u64) {
    let (accepted, reason) = send(a, b.user().0, text, id).await;
    assert!(
        accepted,
        "{} -> {} {text:?} refused: {reason}",
        a.user(),
        b.user()
    );
    assert_eq!(delivery(b).await, (a.user().0, text.to_owned()));
}

/// Closes cleanly and waits for the close to complete.
pub async fn close(mut client: Client) {
    client.close().await.unwrap();
    loop {
        if let Event::Closed(cause) = next(&mut client).await {
            assert_eq!(cause, im_client::CloseCause::ByUser);
            return;
        }
    }
}
