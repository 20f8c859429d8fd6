//! `im-client`: a chat client for the terminal or a script, and a load
//! generator (`im-client bench`).
//!
//! Reads lines `TO_USER_ID TEXT` from stdin and sends each; prints every
//! received message as `FROM_USER_ID TEXT` on stdout. When stdin is not a
//! terminal it closes once stdin has closed and `--linger` has passed.
//!
//! Exit statuses (what a script can rely on):
//! - 0: stdin ended and the session closed cleanly.
//! - 1: an error: the server could not be reached, the login was refused,
//!   the connection broke off (one line on stderr says which).
//! - 2: bad arguments.
//! - 3: the server ended the session normally before stdin did (idle
//!   timeout 1001, drain 1012 for a client that does not reconnect,
//!   superseded 4001 by a newer login of the same device): one line
//!   `closed by the server: CODE REASON` on stderr.
//!
//! `im-client bench` measures a server (see `im_client::bench`): a human
//! summary, then one JSON object as the last line of stdout.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use im_client::bench::BenchOptions;
use im_client::{Client, ClientProfile, CloseCause, Event, Options};
use im_proto::UserId;
use tokio::io::AsyncBufReadExt;

/// The imsim chat client.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    chat: Option<Args>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measures a server: throughput, send->deliver latency and idle memory
    /// per connection, each next to a bare WebSocket relay's. Prints a
    /// summary, then one JSON object as the last line.
    Bench(BenchArgs),
}

/// Chat: log in as one user and send and receive lines.
#[derive(Debug, clap::Args)]
struct Args {
    /// Server endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// The user to log in as (e.g. 1001).
    #[arg(long)]
    user: u64,
    /// compliant (handles Ping/Pong) or legacy (the seed's phase-1/2 client).
    #[arg(long, default_value = "compliant")]
    profile: ClientProfile,
    /// Hardened servers: mint a login token for --user with this secret
    /// (a development convenience; production clients get tokens elsewhere).
    #[arg(long, conflicts_with = "token")]
    auth_secret: Option<String>,
    /// Hardened servers: a login token.
    #[arg(long)]
    token: Option<String>,
    /// Hardened servers: this device's id.
    #[arg(long, default_value = "cli")]
    device: String,
    /// How long to keep receiving after stdin closes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    linger: Duration,
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// The server under test (loopback only for the idle part).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// Hardened servers: mint login tokens with this secret.
    #[arg(long)]
    auth_secret: Option<String>,
    /// Sender->receiver pairs of distinct users.
    #[arg(long)]
    pairs: usize,
    /// How long each load phase sends (e.g. 10s).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Total messages per second, paced; without it, as fast as the window
    /// allows.
    #[arg(long)]
    rate: Option<f64>,
    /// Messages one sender may have in flight.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Idle connections for the memory measurement (0 skips it).
    #[arg(long, default_value_t = 5_000)]
    idle_conns: usize,
    /// The server's process id, to read its RSS; without it the idle part
    /// is skipped.
    #[arg(long)]
    server_pid: Option<u32>,
}

impl BenchArgs {
    fn into_options(self) -> BenchOptions {
        BenchOptions {
            auth_secret: self.auth_secret,
            pairs: self.pairs,
            duration: self.duration,
            rate: self.rate,
            window: self.window,
            idle_conns: self.idle_conns,
            server_pid: self.server_pid,
            ..BenchOptions::new(self.url)
        }
    }
}

/// Exit status: the server ended the session normally (see the module docs).
const CLOSED_BY_SERVER: u8 = 3;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    // The bench reports its progress on stderr; chat stays quiet.
    let default_filter = match cli.command {
        Some(Command::Bench(_)) => "warn,im_client::bench=info",
        None => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .init();
    match (cli.command, cli.chat) {
        (Some(Command::Bench(args)), _) => bench(args).await.map(|()| ExitCode::SUCCESS),
        (None, Some(args)) => chat(args).await,
        // clap requires --user without a subcommand; this is for safety.
        (None, None) => anyhow::bail!("nothing to do: pass --user ID, or a subcommand"),
    }
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let report = im_client::bench::run(args.into_options()).await?;
    print!("{report}");
    println!("{}", report.to_json());
    Ok(())
}

/// Says how the server ended the session, in one line; the exit status.
fn closed_by_server(code: u16, reason: &str) -> ExitCode {
    eprintln!("closed by the server: {code} {reason}");
    ExitCode::from(CLOSED_BY_SERVER)
}

async fn chat(args: Args) -> anyhow::Result<ExitCode> {
    let interactive = std::io::stdin().is_terminal();
    let mut options = Options::new(UserId(args.user), &args.url);
    options.profile = args.profile;
    let token = match (&args.token, &args.auth_secret) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(secret)) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            Some(im_proto::token::mint(
                secret.as_bytes(),
                UserId(args.user),
                now + 24 * 3600,
            ))
        }
        (None, None) => None,
    };
    if let Some(token) = token {
        options.token = token;
        options.device = args.device.clone();
        // This run's connections outrank every earlier run's of the device.
        options.connection_seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64
            * 1000;
        return hardened(args, options, interactive).await;
    }
    let mut client = Client::connect(options)
        .await
        .with_context(|| format!("connecting to {} as {}", args.url, args.user))?;
    if interactive {
        eprintln!(
            "logged in as {} (connection {}). Type `TO_USER_ID TEXT` to send, Ctrl-D to quit.",
            args.user,
            client.conn_id()
        );
    }

    let mut input = Input::new(args.linger);
    loop {
        tokio::select! {
            biased;
            event = client.next_event() => match event {
                Some(Event::Delivered { from, text, .. }) => println!("{from} {text}"),
                Some(Event::SendResult { accepted: false, client_msg_id, reason, .. }) => {
                    eprintln!("message {client_msg_id} not sent: {reason}");
                }
                Some(Event::SendResult { .. }) => {}
                Some(Event::ServerError { code, detail }) => eprintln!("server error {code}: {detail}"),
                Some(Event::Closed(CloseCause::ByUser)) | None => return Ok(ExitCode::SUCCESS),
                Some(Event::Closed(CloseCause::ByServer { code, reason })) => {
                    return Ok(closed_by_server(code, &reason));
                }
                Some(Event::Closed(cause)) => anyhow::bail!("connection closed: {cause:?}"),
            },
            // After Close, keep printing until the close completes.
            input = input.next() => match input? {
                Typed::Send { to, text, id } => client.send(to, &text, id).await?,
                Typed::Close => client.close().await?,
            },
        }
    }
}

/// What the user typed, as commands: stdin lines, then (once stdin has
/// closed and `--linger` has passed) one Close.
enum Typed {
    Send { to: UserId, text: String, id: u64 },
    Close,
}

/// Reads `TO_USER_ID TEXT` lines from stdin for either chat loop.
struct Input {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::io::Stdin>>,
    stdin_open: bool,
    close_sent: bool,
    next_id: u64,
    linger: Duration,
    close_at: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Input {
    fn new(linger: Duration) -> Input {
        // Message ids must not repeat across runs (the hardened server
        // refuses an id reused for another message): start from the clock.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        Input {
            lines: tokio::io::BufReader::new(tokio::io::stdin()).lines(),
            stdin_open: true,
            close_sent: false,
            next_id: now_ms.saturating_mul(1000).max(1),
            linger,
            close_at: Box::pin(tokio::time::sleep(Duration::MAX)),
        }
    }

    /// The next command; pends forever once Close was given.
    async fn next(&mut self) -> anyhow::Result<Typed> {
        if self.close_sent {
            return std::future::pending().await;
        }
        loop {
            tokio::select! {
                line = self.lines.next_line(), if self.stdin_open => match line.context("reading stdin")? {
                    Some(line) => match parse_line(line.trim()) {
                        Some((to, text)) => {
                            let id = self.next_id;
                            self.next_id += 1;
                            return Ok(Typed::Send { to, text: text.to_owned(), id });
                        }
                        None if line.trim().is_empty() => {}
                        None => eprintln!("expected `TO_USER_ID TEXT`, got {:?}", line.trim()),
                    },
                    None => {
                        self.stdin_open = false;
                        self.close_at.as_mut().reset(tokio::time::Instant::now() + self.linger);
                    }
                },
                _ = &mut self.close_at, if !self.close_sent => {
                    self.close_sent = true;
                    return Ok(Typed::Close);
                }
            }
        }
    }
}

fn parse_line(line: &str) -> Option<(UserId, &str)> {
    let (to, text) = line.split_once(char::is_whitespace)?;
    Some((to.parse().ok()?, text.trim_start()))
}

/// The same chat loop over the resilient client (hardened servers):
/// reconnects, resumes, retries, and reports refusals.
async fn hardened(args: Args, options: Options, interactive: bool) -> anyhow::Result<ExitCode> {
    use im_client::resilient::{Resilience, Resilient, ResilientEvent, tcp_dial};
    let dial = tcp_dial(&args.url)?;
    let mut client = Resilient::start(dial, options, Resilience::default());
    // Wait for the first login, so a refused token fails loudly.
    loop {
        match client.next_event().await {
            Some(ResilientEvent::Connected { conn_id }) => {
                if interactive {
                    eprintln!(
                        "logged in as {} (connection {conn_id}). Type `TO_USER_ID TEXT`, Ctrl-D to quit.",
                        args.user
                    );
                }
                break;
            }
            Some(ResilientEvent::ConnectFailed { error }) => {
                anyhow::bail!("cannot log in: {error}")
            }
            Some(ResilientEvent::Stopped(CloseCause::ByServer { code, reason }))
            | Some(ResilientEvent::Disconnected {
                cause: CloseCause::ByServer { code, reason },
                ..
            }) => return Ok(closed_by_server(code, &reason)),
            Some(ResilientEvent::Stopped(cause))
            | Some(ResilientEvent::Disconnected { cause, .. }) => {
                anyhow::bail!("connection closed: {cause:?}")
            }
            Some(ResilientEvent::Event(_) | ResilientEvent::Retrying { .. }) => {}
            None => anyhow::bail!("client stopped"),
        }
    }
    let mut input = Input::new(args.linger);
    let mut closing = false;
    loop {
        tokio::select! {
            biased;
            event = client.next_event() => match event {
                Some(ResilientEvent::Event(Event::Delivered { from, text, .. })) => println!("{from} {text}"),
                Some(ResilientEvent::Event(Event::SendResult { accepted: false, client_msg_id, reason, .. })) => {
                    eprintln!("message {client_msg_id} not sent: {reason}");
                }
                Some(ResilientEvent::Retrying { client_msg_id, reason, after }) => {
                    eprintln!("message {client_msg_id} waiting: {reason}; retrying in {}", humantime::format_duration(after));
                }
                Some(ResilientEvent::Event(Event::ServerError { code, detail })) => eprintln!("server error {code}: {detail}"),
                Some(ResilientEvent::Disconnected { cause, .. }) if !closing => eprintln!("disconnected ({cause:?}); reconnecting"),
                Some(ResilientEvent::Stopped(CloseCause::ByUser)) | None => return Ok(ExitCode::SUCCESS),
                Some(ResilientEvent::Stopped(CloseCause::ByServer { code, reason })) => {
                    return Ok(closed_by_server(code, &reason));
                }
                Some(ResilientEvent::Stopped(cause)) => anyhow::bail!("connection closed: {cause:?}"),
                Some(_) => {}
            },
            input = input.next() => match input? {
                Typed::Send { to, text, id } => client.send(to, &text, id).await?,
                Typed::Close => {
                    closing = true;
                    client.close().await?;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_usage_still_parses() {
        let cli =
            Cli::try_parse_from(["im-client", "--user", "1001", "--auth-secret", "s"]).unwrap();
        assert!(cli.command.is_none());
        let chat = cli.chat.unwrap();
        assert_eq!(chat.user, 1001);
        assert_eq!(chat.auth_secret.as_deref(), Some("s"));
        assert!(
            Cli::try_parse_from(["im-client"]).is_err(),
            "--user is required"
        );
    }

    #[test]
    fn bench_parses_as_a_subcommand() {
        let cli = Cli::try_parse_from([
            "im-client",
            "bench",
            "--url",
            "ws://127.0.0.1:9/ws",
            "--pairs",
            "4",
            "--duration",
            "10s",
            "--rate",
            "500",
            "--server-pid",
            "42",
        ])
        .unwrap();
        let Some(Command::Bench(args)) = cli.command else {
            panic!("expected bench");
        };
        let opts = args.into_options();
        assert_eq!(opts.pairs, 4);
        assert_eq!(opts.duration, Duration::from_secs(10));
        assert_eq!(opts.rate, Some(500.0));
        assert_eq!(opts.server_pid, Some(42));
        assert_eq!(opts.idle_conns, 5_000);
        assert!(opts.validate().is_ok());
        assert!(
            Cli::try_parse_from(["im-client", "--user", "1", "bench", "--pairs", "1"]).is_err(),
            "chat flags and bench do not mix"
        );
    }
}
