//! Each connection's pump: pushes everything in its user's inbox after its
//! cursor, whenever woken, and at least every heartbeat interval.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use im_proto::{UserId, close_code};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use crate::Shared;
use crate::config::Bug;
use crate::inbox;
use crate::registry::{ConnHandle, WriteError};

use super::close;

/// How a connection's pump learns there is something to push.
#[derive(Default)]
pub(crate) struct Wake {
    notify: Notify,
    /// Messages stored on this node for this user, with their frames: the
    /// pump pushes one without reading Redis when it continues its cursor
    /// (sequence numbers of a user are consecutive: the store script
    /// numbers only what it inserts). Bounded by [`HANDED_MAX`].
    handed: Mutex<VecDeque<(u64, bytes::Bytes)>>,
    /// The inbox may hold something no hand-off carries (a doorbell from
    /// another node, a resubscribe, a hand-off dropped): read Redis.
    read: AtomicBool,
}

/// Hand-offs waiting per connection; more are dropped (and the pump reads
/// Redis instead).
const HANDED_MAX: usize = 64;

/// The first wait after a failed inbox read; it doubles up to the
/// heartbeat interval while Redis stays away.
const RETRY_MIN: Duration = Duration::from_millis(100);

impl Wake {
    fn handed(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, bytes::Bytes)>> {
        self.handed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Something may be in the inbox: the pump reads Redis.
    pub(crate) fn ring(&self) {
        self.read.store(true, Ordering::Relaxed);
        self.notify.notify_one();
    }

    /// `frame` was stored at `seq`.
    pub(crate) fn hand(&self, seq: u64, frame: &bytes::Bytes) {
        {
            let mut handed = self.handed();
            if handed.len() < HANDED_MAX {
                handed.push_back((seq, frame.clone()));
            } else {
                self.read.store(true, Ordering::Relaxed);
            }
        }
        self.notify.notify_one();
    }
}

/// Pushes a connection everything in its user's inbox after its cursor,
/// whenever woken, and at least every heartbeat interval. A message stored
/// on this node comes with its frame ([`Wake::hand`]) and goes out without
/// a Redis read when it continues the cursor; anything else (a gap, a
/// doorbell, the poll) reads the inbox after the cursor. A failed read is
/// retried after a short backoff (100 ms, doubling), not at the next poll.
pub(crate) async fn pump(
    shared: Arc<Shared>,
    user: UserId,
    handle: ConnHandle,
    wake: Arc<Wake>,
    pushed: Arc<AtomicU64>,
) {
    let cfg = &shared.config;
    let inbox = cfg.user_key(user, "inbox");
    let page = cfg.hardened.inbox_page_len;
    let interval = cfg.hardened.heartbeat_interval;
    // The backlog after the device's resume point.
    let mut read = true;
    let mut retry: Option<Duration> = None;
    loop {
        loop {
            let Some((seq, frame)) = wake.handed().pop_front() else {
                break;
            };
            let cursor = pushed.load(Ordering::Relaxed);
            if seq <= cursor {
                continue; // a read got it first
            }
            if seq != cursor + 1 {
                // Something between is in Redis (stored elsewhere, or its
                // hand-off is still on the way): read it, and these too.
                wake.handed().clear();
                read = true;
                break;
            }
            if !push(&handle, &pushed, seq, frame).await {
                return;
            }
        }
        if read || wake.read.swap(false, Ordering::Relaxed) {
            read = false;
            let cursor = pushed.load(Ordering::Relaxed);
            // The command lives only for its query: anything in scope at
            // the wait below is kept in every idle pump's future.
            let members = {
                let cmd = redis::cmd("ZRANGEBYSCORE")
                    .arg(&inbox)
                    .arg(format!("({cursor}"))
                    .arg("+inf")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(page)
                    .clone();
                shared.redis.query::<Vec<Vec<u8>>>(&cmd).await
            };
            match members {
                Ok(members) => {
                    retry = None;
                    let full = members.len() == page;
                    for member in members {
                        let deliver = match inbox::entry(&member) {
                            Ok(d) => d,
                            Err(e) => {
                                tracing::error!(error = %e, "corrupt inbox entry; skipping it");
                                continue;
                            }
                        };
                        let seq = deliver.seq;
                        if !push(&handle, &pushed, seq, inbox::frame(deliver).into()).await {
                            return;
                        }
                    }
                    if full {
                        read = true;
                        continue;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "inbox read failed; retrying");
                    if !cfg.has(Bug::SlowRedisRecovery) {
                        let wait = retry.map_or(RETRY_MIN, |w| (w * 2).min(interval));
                        retry = Some(wait);
                    }
                }
            }
        }
        let wait = retry.unwrap_or(interval);
        tokio::select! {
            _ = wake.notify.notified() => {}
            _ = tokio::time::sleep(wait) => read = true,
        }
    }
}

/// Queues one Deliver frame for the pump's connection; false when the pump
/// must end (the connection is closing, or too slow and now closed).
async fn push(handle: &ConnHandle, pushed: &AtomicU64, seq: u64, frame: bytes::Bytes) -> bool {
    // Raised before the frame is queued: on a multi-threaded runtime the
    // client may ack it before the pump runs again, and the ack check must
    // already know the seq.
    let before = pushed.fetch_max(seq, Ordering::Relaxed);
    // A backlog (a device back from a long absence) may be larger than the
    // outbound queue: wait for room, and call it a slow consumer only when
    // none comes. Boxed: only alive while queueing (an idle pump's future
    // stays small).
    match Box::pin(handle.write_when_room(Message::Binary(frame))).await {
        Ok(()) => true,
        Err(WriteError::QueueFull) => {
            tracing::warn!("slow consumer: outbound queue full for the write timeout; closing");
            handle.close(close(close_code::SLOW_CONSUMER, "slow consumer"));
            false
        }
        Err(_) => {
            pushed.store(before, Ordering::Relaxed);
            false
        }
    }
}
