//! `im-client`: a chat client for the terminal or a script.
//!
//! Reads lines `TO_USER_ID TEXT` from stdin and sends each; prints every
//! received message as `FROM_USER_ID TEXT` on stdout. When stdin is not a
//! terminal it exits 0 once stdin has closed and `--linger` has passed.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use im_client::{Client, ClientProfile, CloseCause, Event, Options};
use im_proto::UserId;
use tokio::io::AsyncBufReadExt;

/// The imsim chat client.
#[derive(Debug, Parser)]
#[command(version, about)]
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
    /// How long to keep receiving after stdin closes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    linger: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    let interactive = std::io::stdin().is_terminal();
    let mut options = Options::new(UserId(args.user), &args.url);
    options.profile = args.profile;
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

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut next_id = 1u64;
    let mut close_requested = false;
    let linger = tokio::time::sleep(Duration::MAX);
    tokio::pin!(linger);
    loop {
        tokio::select! {
            biased;
            event = client.next_event() => match event {
                Some(Event::Delivered { from, text, .. }) => println!("{from} {text}"),
                Some(Event::SendResult { accepted: false, client_msg_id, reason }) => {
                    eprintln!("message {client_msg_id} not sent: {reason}");
                }
                Some(Event::SendResult { .. }) => {}
                Some(Event::ServerError { code, detail }) => eprintln!("server error {code}: {detail}"),
                Some(Event::Closed(CloseCause::ByUser)) | None => return Ok(()),
                Some(Event::Closed(cause)) => anyhow::bail!("connection closed: {cause:?}"),
            },
            line = lines.next_line(), if stdin_open => match line.context("reading stdin")? {
                Some(line) => {
                    let line = line.trim();
                    if line.is_empty() {
                        continue;
                    }
                    match parse_line(line) {
                        Some((to, text)) => {
                            client.send(to, text, next_id).await?;
                            next_id += 1;
                        }
                        None => eprintln!("expected `TO_USER_ID TEXT`, got {line:?}"),
                    }
                }
                None => {
                    stdin_open = false;
                    linger.as_mut().reset(tokio::time::Instant::now() + args.linger);
                }
            },
            _ = &mut linger, if !close_requested => {
                close_requested = true;
                client.close().await?;
                // Keep printing until the close completes.
            }
        }
    }
}

fn parse_line(line: &str) -> Option<(UserId, &str)> {
    let (to, text) = line.split_once(char::is_whitespace)?;
    Some((to.parse().ok()?, text.trim_start()))
}
