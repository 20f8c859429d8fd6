//! The real `redis` crate against the Redis model: inside turmoil (commands,
//! pipelines, simulated expiry, RESP2 and RESP3 pub/sub, a slow Redis, a
//! restart without data, a subscriber overflowing its queue), and over an
//! in-memory duplex stream for the connection layer's protocol edges.

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use im_sim::redis_model::{Limits, SharedRedis, serve_connection, serve_turmoil};
use redis::aio::{MultiplexedConnection, PubSub};
use redis::{AsyncCommands, AsyncConnectionConfig, PushInfo, PushKind, RedisConnectionInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

fn sim() -> turmoil::Sim<'static> {
    turmoil::Builder::new()
        .rng_seed(1)
        .epoch(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        .simulation_duration(Duration::from_secs(60))
        .build()
}

fn sim_clock() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// A host "redis" serving `shared` on 6379; its state survives bounces.
fn redis_host(sim: &mut turmoil::Sim<'static>, shared: &SharedRedis) {
    let shared = shared.clone();
    sim.host("redis", move || {
        serve_turmoil(shared.clone(), 6379, Default::default())
    });
}

fn info() -> RedisConnectionInfo {
    RedisConnectionInfo::default().set_skip_set_lib_name()
}

async fn connect(
    config: AsyncConnectionConfig,
    info: &RedisConnectionInfo,
) -> MultiplexedConnection {
    let tcp = turmoil::net::TcpStream::connect(("redis", 6379))
        .await
        .expect("connect to redis host");
    let (con, driver) = MultiplexedConnection::new_with_config(info, tcp, config)
        .await
        .expect("redis handshake");
    tokio::spawn(driver);
    con
}

#[test]
fn commands_pipeline_and_simulated_expiry() -> turmoil::Result {
    let mut sim = sim();
    let shared = SharedRedis::new(sim_clock);
    redis_host(&mut sim, &shared);
    sim.client("app", async {
        let mut con = connect(AsyncConnectionConfig::new(), &info()).await;
        let added: i64 = con.sadd("presence:online", "alice").await?;
        assert_eq!(added, 1);
        let is: bool = con.sismember("presence:online", "alice").await?;
        assert!(is);
        let removed: i64 = con.srem("presence:online", "alice").await?;
        assert_eq!(removed, 1);

        let (n, is, members): (i64, bool, Vec<String>) = redis::pipe()
            .sadd("presence:online", "bob")
            .sismember("presence:online", "bob")
            .smembers("presence:online")
            .query_async(&mut con)
            .await?;
        assert_eq!((n, is, members), (1, true, vec!["bob".to_string()]));

        let _: () = redis::cmd("SET")
            .arg("lease")
            .arg("node-1")
            .arg("PX")
            .arg(1000)
            .query_async(&mut con)
            .await?;
        // turmoil's links take 0-100 ms each way, hence the margins.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let v: Option<String> = con.get("lease").await?;
        assert_eq!(v.as_deref(), Some("node-1"), "alive before its deadline");
        let pttl: i64 = con.pttl("lease").await?;
        assert!((1..=500).contains(&pttl), "pttl {pttl}");
        tokio::time::sleep(Duration::from_millis(600)).await;
        let v: Option<String> = con.get("lease").await?;
        assert_eq!(v, None, "expired in simulated time");
        let ttl: i64 = con.ttl("lease").await?;
        assert_eq!(ttl, -2);
        Ok(())
    });
    sim.run()?;
    assert_eq!(
        shared.smembers(b"presence:online"),
        vec![Bytes::from("bob")]
    );
    assert!(shared.command_log_stats().executed >= 10);
    let log = shared.command_log();
    assert_eq!(log[0].args[0], Bytes::from("SADD"));
    assert!(
        log.windows(2).all(|w| w[0].at <= w[1].at),
        "log in time order"
    );
    Ok(())
}

#[test]
fn resp3_push_pubsub_on_a_multiplexed_connection() -> turmoil::Result {
    let mut sim = sim();
    let shared = SharedRedis::new(sim_clock);
    redis_host(&mut sim, &shared);
    sim.client("app", async {
        let (tx, mut rx) = mpsc::unbounded_channel::<PushInfo>();
        let info3 = info().set_protocol(redis::ProtocolVersion::RESP3);
        let mut sub = connect(AsyncConnectionConfig::new().set_push_sender(tx), &info3).await;
        sub.subscribe("presence").await?;
        let mut publisher = connect(AsyncConnectionConfig::new(), &info()).await;
        let receivers: i64 = publisher.publish("presence", "alice:online").await?;
        assert_eq!(receivers, 1);
        let push = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                let push = rx.recv().await.expect("push channel open");
                if push.kind == PushKind::Message {
                    return push;
                }
            }
        })
        .await?;
        assert_eq!(
            push.data,
            vec![
                redis::Value::BulkString(b"presence".to_vec()),
                redis::Value::BulkString(b"alice:online".to_vec()),
            ]
        );
        // A RESP3 connection keeps serving commands while subscribed.
        let n: i64 = sub.sadd("s", "m").await?;
        assert_eq!(n, 1);
        sub.unsubscribe("presence").await?;
        let receivers: i64 = publisher.publish("presence", "x").await?;
        assert_eq!(receivers, 0);
        Ok(())
    });
    sim.run()
}

#[test]
fn resp2_pubsub_connection() -> turmoil::Result {
    let mut sim = sim();
    let shared = SharedRedis::new(sim_clock);
    redis_host(&mut sim, &shared);
    sim.client("app", async {
        let tcp = turmoil::net::TcpStream::connect(("redis", 6379)).await?;
        let mut pubsub = PubSub::new(&info(), tcp).await?;
        pubsub.subscribe("room").await?;
        let mut publisher = connect(AsyncConnectionConfig::new(), &info()).await;
        let receivers: i64 = publisher.publish("room", "hello").await?;
        assert_eq!(receivers, 1);
        let mut messages = pubsub.on_message();
        let msg = tokio::time::timeout(Duration::from_secs(1), messages.next())
            .await?
            .expect("a message");
        assert_eq!(msg.get_channel_name(), "room");
        assert_eq!(msg.get_payload::<String>()?, "hello");
        Ok(())
    });
    sim.run()
}

#[test]
fn a_slow_redis_times_out_the_client_until_it_recovers() -> turmoil::Result {
    let mut sim = sim();
    let shared = SharedRedis::new(sim_clock);
    redis_host(&mut sim, &shared);
    let knob = shared.clone();
    sim.client("app", async move {
        let mut con = connect(AsyncConnectionConfig::new(), &info()).await;
        knob.set_delay(Duration::from_millis(300));
        let started = tokio::time::Instant::now();
        let _: () = con.set("k", "v").await?;
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "reply delayed"
        );
        knob.set_delay(Duration::from_millis(800));
        let err = con.get::<_, Option<String>>("k").await.unwrap_err();
        assert!(err.is_timeout(), "500 ms response timeout: {err:?}");
        knob.set_delay(Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let v: Option<String> = con.get("k").await?;
        assert_eq!(v.as_deref(), Some("v"));
        Ok(())
    });
    sim.run()
}

#[test]
fn a_restart_without_data_loses_every_key() -> turmoil::Result {
    let mut sim = sim();
    let shared = SharedRedis::new(sim_clock);
    redis_host(&mut sim, &shared);
    sim.client("before", async {
        let mut con = connect(AsyncConnectionConfig::new(), &info()).await;
        let _: () = con.set("k", "v").await?;
        Ok(())
    });
    sim.run()?;
    assert_eq!(shared.get(b"k"), Some(Bytes::from("v")));
    sim.crash("redis");
    shared.flush_data();
    sim.bounce("redis");
    sim.client("after", async {
        let mut con = connect(AsyncConnectionConfig::new(), &info()).await;
        let v: Option<String> = con.get("k").await?;
        assert_eq!(v, None);
        Ok(())
    });
    sim.run()?;
    assert!(shared.keys().is_empty());
    Ok(())
}

#[test]
fn killed_clients_see_their_connection_close() -> turmoil::Result {
    let mut sim = sim();
    let shared = SharedRedis::new(sim_clock);
    redis_host(&mut sim, &shared);
    let knob = shared.clone();
    sim.client("app", async move {
        let mut con = connect(AsyncConnectionConfig::new(), &info()).await;
        let _: () = con.set("k", "v").await?;
        assert_eq!(knob.connected_clients(), 1);
        knob.kill_all_clients();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(knob.connected_clients(), 0);
        assert!(con.get::<_, Option<String>>("k").await.is_err());
        let mut again = connect(AsyncConnectionConfig::new(), &info()).await;
        let v: Option<String> = again.get("k").await?;
        assert_eq!(v.as_deref(), Some("v"), "data survives, connections do not");
        Ok(())
    });
    sim.run()
}

#[test]
fn a_subscriber_that_overflows_its_queue_is_disconnected() -> turmoil::Result {
    let mut sim = sim();
    let limits = Limits {
        push_queue_len_max: 4,
        ..Limits::default()
    };
    let shared = SharedRedis::with_limits(sim_clock, limits);
    redis_host(&mut sim, &shared);
    let observer = shared.clone();
    sim.client("app", async move {
        // A raw RESP2 subscriber that reads its confirmation, then stalls.
        let mut sub = turmoil::net::TcpStream::connect(("redis", 6379)).await?;
        sub.write_all(b"*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nch\r\n")
            .await?;
        let mut confirmation = [0u8; 31];
        sub.read_exact(&mut confirmation).await?;
        assert_eq!(
            &confirmation,
            b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
        );

        // Ten pipelined PUBLISHes run back to back on the model, before the
        // subscriber's connection task can drain anything.
        let mut publisher = connect(AsyncConnectionConfig::new(), &info()).await;
        let mut pipe = redis::pipe();
        for i in 0..10 {
            pipe.publish("ch", i);
        }
        let receivers: Vec<i64> = pipe.query_async(&mut publisher).await?;
        assert_eq!(receivers, [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]);
        assert_eq!(observer.push_overflows(), 1);

        // The subscriber sees its connection closed, not the messages.
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(1), sub.read_to_end(&mut rest)).await??;
        Ok(())
    });
    sim.run()
}

/// Sends raw bytes to a model connection over an in-memory stream; returns
/// everything it answers until it closes.
async fn raw_exchange(limits: Limits, request: &[u8]) -> Vec<u8> {
    let shared = SharedRedis::with_limits(|| Duration::ZERO, limits);
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let served = tokio::spawn(serve_connection(server, shared));
    client.write_all(request).await.expect("write request");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut reply))
        .await
        .expect("the model closes the connection")
        .expect("read reply");
    served.await.expect("connection task");
    reply
}

#[tokio::test]
async fn quit_answers_then_closes() {
    let reply = raw_exchange(
        Limits::default(),
        b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nQUIT\r\n",
    )
    .await;
    assert_eq!(reply, b"+PONG\r\n+OK\r\n");
}

#[tokio::test]
async fn malformed_resp_is_a_protocol_error_and_closes() {
    let reply = raw_exchange(Limits::default(), b"*1\r\n$4\r\nPING\r\n*1\r\n:12\r\n").await;
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("+PONG\r\n-ERR Protocol error"), "{text}");
}

#[tokio::test]
async fn an_oversized_request_is_refused_and_closes() {
    let limits = Limits {
        request_bytes_max: 1024,
        ..Limits::default()
    };
    let mut request = b"*2\r\n$4\r\nECHO\r\n$4096\r\n".to_vec();
    request.extend(std::iter::repeat_n(b'x', 2048));
    let reply = raw_exchange(limits, &request).await;
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.starts_with("-ERR Protocol error: request larger than 1024 bytes"),
        "{text}"
    );
}
