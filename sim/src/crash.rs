//! Crashes that drop a host's streams in a deterministic order.
//!
//! When turmoil crashes a host it drops the host's tokio runtime, and tokio
//! shuts the runtime's tasks down in the order of its task list, which is
//! sharded by task id; task ids come from a process-wide counter, so that
//! order differs between two runs of the same seed (another test running
//! alongside, or a sweep against a replay of one of its seeds). Each
//! dropped TCP stream sends its FIN or RST with a latency drawn from the
//! run's RNG, so the drop order changed what the peers saw: the
//! determinism test caught a client seeing its node's reset at 0.600 s in
//! one run and at 0.601 s in the other.
//!
//! So every stream a host opens or accepts is wrapped in [`Ordered`],
//! numbered in creation order (deterministic), by the host's
//! [`Graveyard`]. While the driver crashes the host
//! ([`Graveyard::crash`]), a dropped `Ordered` is buried instead of
//! dropped. The host's software holds a [`Graveyard::guard`] as its first
//! local: it is dropped after the runtime's tasks (turmoil drops the
//! runtime, then the software), still inside the crash, and drops the
//! buried streams in number order.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One host's streams, for burial during a crash.
#[derive(Clone, Default)]
pub struct Graveyard(Arc<Mutex<Yard>>);

#[derive(Default)]
struct Yard {
    crashing: bool,
    next: u64,
    buried: BTreeMap<u64, Box<dyn Send>>,
}

impl Graveyard {
    fn lock(&self) -> MutexGuard<'_, Yard> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Numbers `stream` (in creation order) for burial.
    pub fn wrap<S: Send + 'static>(&self, stream: S) -> Ordered<S> {
        let mut yard = self.lock();
        yard.next += 1;
        Ordered {
            inner: Some(stream),
            id: yard.next,
            yard: self.clone(),
        }
    }

    /// Held by the host's software, declared first (so dropped last): drops
    /// what a crash buried, in number order.
    pub fn guard(&self) -> Guard {
        Guard(self.clone())
    }

    /// Runs `crash` (the driver's `sim.crash(host)`) with burial on.
    pub fn crash(&self, crash: impl FnOnce()) {
        self.lock().crashing = true;
        crash();
        let leftover = {
            let mut yard = self.lock();
            yard.crashing = false;
            std::mem::take(&mut yard.buried)
        };
        // Only a host whose software had already ended (no guard left)
        // leaves streams here; outside the host they go without a word.
        if !leftover.is_empty() {
            tracing::debug!(
                streams = leftover.len(),
                "crash: streams outlived the host's software"
            );
        }
    }
}

/// See [`Graveyard::guard`].
pub struct Guard(Graveyard);

impl Drop for Guard {
    fn drop(&mut self) {
        let buried = std::mem::take(&mut self.0.lock().buried);
        for (_, stream) in buried {
            drop(stream);
        }
    }
}

/// A stream its host's [`Graveyard`] buries if it is dropped in a crash.
pub struct Ordered<S: Send + 'static> {
    inner: Option<S>,
    id: u64,
    yard: Graveyard,
}

impl<S: Send + 'static> Ordered<S> {
    fn get(&mut self) -> Pin<&mut S>
    where
        S: Unpin,
    {
        Pin::new(self.inner.as_mut().expect("stream used after drop"))
    }
}

impl<S: Send + 'static> Drop for Ordered<S> {
    fn drop(&mut self) {
        let Some(stream) = self.inner.take() else {
            return;
        };
        let mut yard = self.yard.lock();
        if yard.crashing {
            yard.buried.insert(self.id, Box::new(stream));
        } else {
            drop(yard);
            drop(stream);
        }
    }
}

impl<S: AsyncRead + Unpin + Send + 'static> AsyncRead for Ordered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.get().poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin + Send + 'static> AsyncWrite for Ordered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get().poll_shutdown(cx)
    }
}
