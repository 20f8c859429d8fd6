//! What the seed's operators watched, as Prometheus metrics through the
//! `metrics` facade. Without an installed recorder (tests, the simulation)
//! every call is a no-op, so nothing here is process-global state that a
//! restarted simulated host could trip over.

use std::net::SocketAddr;

/// Live WebSocket connections on this node.
pub const CONNECTIONS_LIVE: &str = "im_connections_live";
/// Pushes by outcome (`result` = delivered, failed, offline, forwarded).
pub const PUSHES: &str = "im_pushes_total";
/// Presence writes by operation and outcome.
pub const PRESENCE_WRITES: &str = "im_presence_writes_total";
/// Hardened sends by what the store did (`result` = stored, retry,
/// id_reused, unknown_recipient, inbox_full).
pub const SENDS: &str = "im_sends_total";
/// Bytes of envelopes stored in inboxes (hardened): what the messages
/// themselves add to Redis, before its per-key overhead.
pub const STORED_BYTES: &str = "im_inbox_stored_bytes_total";
/// Dedup records written (hardened): each lives `dedup_ttl` (24 h) in
/// Redis, about 228 bytes (ARCHITECTURE.md, "Redis memory per message").
pub const DEDUP_RECORDS: &str = "im_dedup_records_total";
/// Resident memory of the process, in bytes.
pub const MEMORY: &str = "process_resident_memory_bytes";

pub fn connection_opened() {
    metrics::gauge!(CONNECTIONS_LIVE).increment(1.0);
}

pub fn connection_closed() {
    metrics::gauge!(CONNECTIONS_LIVE).decrement(1.0);
}

pub fn push(result: &'static str) {
    metrics::counter!(PUSHES, "result" => result).increment(1);
}

pub fn presence_write(op: &'static str, ok: bool) {
    let outcome = if ok { "ok" } else { "error" };
    metrics::counter!(PRESENCE_WRITES, "op" => op, "outcome" => outcome).increment(1);
}

/// The store script's status (see `scripts::STORE`).
pub fn store(status: u8) {
    let result = match status {
        1 => "stored",
        0 => "retry",
        2 => "id_reused",
        3 => "unknown_recipient",
        _ => "inbox_full",
    };
    metrics::counter!(SENDS, "result" => result).increment(1);
    if status == 1 {
        metrics::counter!(DEDUP_RECORDS).increment(1);
    }
}

pub fn stored_bytes(n: usize) {
    metrics::counter!(STORED_BYTES).increment(n as u64);
}

/// Serves `/metrics` on `addr` and samples process memory every 5 s.
/// Call once per process (the binary does); must run inside tokio.
pub fn install_prometheus(addr: SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()?;
    metrics::describe_gauge!(CONNECTIONS_LIVE, "live WebSocket connections on this node");
    metrics::describe_counter!(PUSHES, "pushes to recipients, by result");
    metrics::describe_counter!(PRESENCE_WRITES, "writes to presence in Redis");
    metrics::describe_counter!(SENDS, "hardened sends, by what the store did");
    metrics::describe_counter!(
        DEDUP_RECORDS,
        "dedup records written; each lives 24 h in Redis, about 228 bytes"
    );
    metrics::describe_counter!(
        STORED_BYTES,
        metrics::Unit::Bytes,
        "envelope bytes stored in inboxes"
    );
    metrics::describe_gauge!(MEMORY, metrics::Unit::Bytes, "resident set size");
    tokio::spawn(async {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            if let Some(bytes) = resident_bytes() {
                metrics::gauge!(MEMORY).set(bytes as f64);
            }
        }
    });
    Ok(())
}

/// Resident set size from `/proc/self/statm` (Linux); `None` elsewhere.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
