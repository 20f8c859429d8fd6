//! Local connections on this node, and the handle to one of them.
//!
//! The seed keyed its map by user id (`localConnections[userID]`), and so
//! do the phase profiles: a login replaces the user's entry and a removal
//! deletes whatever entry the user has, even one that belongs to a newer
//! connection. That is the bug surface the simulation exercises.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use im_proto::{ConnId, UserId};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// Why a frame could not be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("outbound queue full")]
    QueueFull,
    #[error("connection closed")]
    Closed,
    #[error("write timed out")]
    Timeout,
    #[error("socket write failed")]
    Socket,
}

/// One frame for the writer task, with an optional report of the outcome.
/// Queued boxed: tokio's bounded channel allocates its slots 32 at a time
/// up front, and a `Message` is about 80 bytes, so an unboxed queue would
/// cost every idle connection 2.5 KB.
pub(crate) type Queued = Box<Outbound>;

pub(crate) struct Outbound {
    pub msg: Message,
    pub done: Option<oneshot::Sender<Result<(), WriteError>>>,
}

/// How a connection is to be closed from outside its session.
#[derive(Clone, Debug, PartialEq)]
pub enum Closing {
    /// Send this close frame, then end.
    Frame(CloseFrame),
    /// Drop the socket without a close handshake (Go's `conn.Close()`).
    Drop,
}

/// A connection's close request: set once (the first request wins), awaited
/// by its session and its writer. A latch rather than a `watch` channel,
/// which costs every connection about 300 bytes more.
#[derive(Debug, Default)]
pub(crate) struct CloseSignal {
    how: Mutex<Option<Closing>>,
    notify: Notify,
}

impl CloseSignal {
    /// Records `how` unless a request came first; wakes the waiters.
    fn request(&self, how: Closing) {
        {
            let mut slot = self.how.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_some() {
                return;
            }
            *slot = Some(how);
        }
        self.notify.notify_waiters();
    }

    fn get(&self) -> Option<Closing> {
        self.how.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Resolves with the request, at once if there already is one.
    pub(crate) async fn requested(&self) -> Closing {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a request between the two
            // still wakes this waiter.
            notified.as_mut().enable();
            if let Some(how) = self.get() {
                return how;
            }
            notified.await;
        }
    }
}

/// A cheap, cloneable reference to one live connection.
#[derive(Clone, Debug)]
pub struct ConnHandle {
    pub conn_id: ConnId,
    pub user: UserId,
    outbound: mpsc::Sender<Queued>,
    closing: Arc<CloseSignal>,
    write_timeout: Duration,
}

impl ConnHandle {
    pub(crate) fn new(
        conn_id: ConnId,
        user: UserId,
        outbound: mpsc::Sender<Queued>,
        closing: Arc<CloseSignal>,
        write_timeout: Duration,
    ) -> ConnHandle {
        ConnHandle {
            conn_id,
            user,
            outbound,
            closing,
            write_timeout,
        }
    }

    /// The same connection, now bound to `user` (after login).
    pub(crate) fn for_user(mut self, user: UserId) -> ConnHandle {
        self.user = user;
        self
    }

    /// Queues a frame and waits until the writer has written it to the
    /// socket (or failed to), as the seed's synchronous `WriteMessage`.
    pub async fn write(&self, msg: Message) -> Result<(), WriteError> {
        let (done, outcome) = oneshot::channel();
        self.enqueue(Box::new(Outbound {
            msg,
            done: Some(done),
        }))?;
        match tokio::time::timeout(self.write_timeout, outcome).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(WriteError::Closed),
            Err(_) => Err(WriteError::Timeout),
        }
    }

    /// Queues a frame without waiting for it to be written.
    pub fn write_nowait(&self, msg: Message) -> Result<(), WriteError> {
        self.enqueue(Box::new(Outbound { msg, done: None }))
    }

    /// Queues a frame, waiting for room while the queue is full; a queue
    /// that stays full for the write timeout is a slow consumer
    /// ([`WriteError::QueueFull`]). For backlogs larger than the queue.
    /// A close requested meanwhile ends the wait ([`WriteError::Closed`]).
    pub async fn write_when_room(&self, msg: Message) -> Result<(), WriteError> {
        let out = Box::new(Outbound { msg, done: None });
        // Room at once is the common case; skip the timer then.
        let out = match self.outbound.try_send(out) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(WriteError::Closed),
            Err(mpsc::error::TrySendError::Full(out)) => out,
        };
        tokio::select! {
            biased;
            _ = self.closing.requested() => Err(WriteError::Closed),
            sent = tokio::time::timeout(self.write_timeout, self.outbound.send(out)) => match sent {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(WriteError::Closed),
                Err(_) => Err(WriteError::QueueFull),
            },
        }
    }

    fn enqueue(&self, out: Queued) -> Result<(), WriteError> {
        self.outbound.try_send(out).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => WriteError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => WriteError::Closed,
        })
    }

    /// Asks the connection's session to close. The first request wins.
    pub fn close(&self, how: Closing) {
        self.closing.request(how);
    }
}

/// The local map of live connections, keyed by user id as the seed's.
#[derive(Debug, Default)]
pub struct Registry {
    by_user: Mutex<BTreeMap<UserId, ConnHandle>>,
}

impl Registry {
    /// Registers `handle` as its user's connection, returning the one it
    /// replaced (which stays open: the seed never closed it).
    pub fn insert(&self, handle: ConnHandle) -> Option<ConnHandle> {
        self.lock().insert(handle.user, handle)
    }

    pub fn get(&self, user: UserId) -> Option<ConnHandle> {
        self.lock().get(&user).cloned()
    }

    /// Deletes the user's entry, whichever connection it holds.
    pub fn remove_user(&self, user: UserId) -> Option<ConnHandle> {
        self.lock().remove(&user)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every registered handle, in user order.
    pub fn handles(&self) -> Vec<ConnHandle> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<UserId, ConnHandle>> {
        // A panic while holding this lock is a bug; keep serving regardless.
        self.by_user.lock().unwrap_or_else(|e| e.into_inner())
    }
}
