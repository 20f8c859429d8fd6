//! `im-server`: parses arguments, sets up tracing and metrics, binds, and
//! calls [`im_server::run`]. Everything else lives in the library.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use im_server::{Config, Profile, RedisLink};
use redis::IntoConnectionInfo;

/// The imsim IM WebSocket server (endpoint: ws://ADDR/ws).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Redis URL (redis://host:port/db).
    #[arg(long, default_value = "redis://127.0.0.1:6379/")]
    redis: String,
    /// Behaviour: hardened (imsim's design), or phase1, phase2, phase3 (the
    /// seed's history, bugs included).
    #[arg(long, default_value = "hardened")]
    profile: Profile,
    /// Secret for signed login tokens (required by the hardened profile).
    #[arg(long)]
    auth_secret: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Prefix for every Redis key.
    #[arg(long, default_value = "")]
    key_prefix: String,
    /// This node's name in logs.
    #[arg(long, default_value = "node1")]
    node: String,
    /// Maximum concurrent connections.
    #[arg(long, default_value_t = im_server::Limits::default().connections_max)]
    max_connections: usize,
    /// Close a connection silent for this long (e.g. 60s).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    idle_timeout: Duration,
    /// tungstenite's read buffer per connection, in bytes: memory per idle
    /// connection against bytes per read (4096 costs about 3 KB more per
    /// idle connection; with chat-sized frames `im-client bench` measured
    /// no throughput difference).
    #[arg(
        long,
        value_parser = clap::value_parser!(u64).range(256..=1 << 20),
        default_value_t = im_server::Limits::default().read_buffer_bytes as u64,
    )]
    read_buffer_bytes: u64,
    /// Time connections get to close on SIGTERM or SIGINT before they are
    /// dropped (their leases are released either way).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    drain_timeout: Duration,
    /// Switch a historical bug back on (regression tests only).
    #[arg(long = "bug", hide = true)]
    bugs: Vec<im_server::Bug>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();

    let info = args
        .redis
        .as_str()
        .into_connection_info()
        .with_context(|| format!("bad --redis URL {:?}", args.redis))?;
    let addr = match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        other => anyhow::bail!("only redis:// over TCP is supported, not {other:?}"),
    };
    let mut config = Config::new(args.profile);
    if args.profile.switches().hardened && args.auth_secret.is_none() {
        anyhow::bail!(
            "the hardened profile takes the user id from signed tokens: pass --auth-secret S"
        );
    }
    config.auth_secret = args.auth_secret.map(String::into_bytes);
    config.key_prefix = args.key_prefix;
    config.node = args.node;
    config.limits.connections_max = args.max_connections;
    config.limits.read_idle_timeout = args.idle_timeout;
    config.limits.read_buffer_bytes = args.read_buffer_bytes as usize;
    config.limits.shutdown_grace = args.drain_timeout;
    config.bugs = args.bugs.iter().copied().collect();
    let sigterm_drains = !config.has(im_server::Bug::SigtermKills);
    let redis = RedisLink::new(
        im_server::tcp_connector(addr),
        info.redis_settings().clone(),
        config.limits.redis_timeout,
    );
    if let Some(addr) = args.metrics {
        im_server::metrics::install_prometheus(addr).context("starting the metrics endpoint")?;
        tracing::info!(%addr, "metrics at /metrics");
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "listening on /ws");
    // What systemd, `docker stop` and Kubernetes send (SIGTERM) and Ctrl-C
    // (SIGINT) both drain: every connection is told to reconnect elsewhere
    // (1012 hardened, 1001 the seed's phases), leases are released, and the
    // process exits 0 within the drain timeout plus a Redis round trip.
    // (The `sigterm_kills` bug installs no SIGTERM handler: the default
    // action, death on the spot, as before the binary handled it.)
    let sigterm = if sigterm_drains {
        Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?,
        )
    } else {
        None
    };
    let signal = async move {
        let term = async {
            match sigterm {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
            _ = term => tracing::info!("SIGTERM: draining"),
        }
    };
    im_server::run(listener, redis, config, signal).await;
    tracing::info!("drained; exiting");
    Ok(())
}
