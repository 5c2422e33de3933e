//! `CloseSignal`: how a draining backend (or a shutdown) closes the connections still open to
//! it once its `drain_timeout` has passed. Also what stops a listener, a health checker, the
//! admin server. A leaf: the table, health, control and the data plane all use it.
//!
//! Why not `tokio_util::sync::CancellationToken`: polling its `cancelled()` future takes a
//! mutex on every poll, and a connection's forwarding loop is polled on every I/O wake-up.
//! Here a connection registers its waker once when its forwarding starts and removes it once
//! when it ends (a short critical section on the backend's registry); every other poll is a
//! single atomic load. The accept loop never touches this type.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

/// A one-shot "close now" broadcast.
#[derive(Debug, Default)]
pub struct CloseSignal {
    closed: AtomicBool,
    /// Wakers of the connections waiting on this signal, with a free list of slots.
    waiters: Mutex<Waiters>,
}

#[derive(Debug, Default)]
struct Waiters {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl CloseSignal {
    pub fn new() -> CloseSignal {
        CloseSignal::default()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes: every current and future waiter completes.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let wakers: Vec<Waker> = {
            let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            w.free.clear();
            w.slots.drain(..).flatten().collect()
        };
        for w in wakers {
            w.wake();
        }
    }

    /// A future that completes when the signal closes.
    pub fn wait(&self) -> CloseWait<'_> {
        CloseWait {
            signal: self,
            slot: None,
        }
    }

    fn register(&self, waker: &Waker) -> Option<usize> {
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the lock: `close` sets the flag before draining the slots, so either
        // we see the flag here or `close` sees our waker.
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        let slot = match w.free.pop() {
            Some(i) => {
                w.slots[i] = Some(waker.clone());
                i
            }
            None => {
                w.slots.push(Some(waker.clone()));
                w.slots.len() - 1
            }
        };
        Some(slot)
    }

    fn unregister(&self, slot: usize) {
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = w.slots.get_mut(slot) {
            if s.take().is_some() {
                w.free.push(slot);
            }
        }
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        let w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        w.slots.iter().filter(|s| s.is_some()).count()
    }
}

/// Completes when its [`CloseSignal`] closes. Must be polled from one task (its waker is
/// registered once; tokio task wakers are stable, and a changed waker re-registers).
#[derive(Debug)]
pub struct CloseWait<'a> {
    signal: &'a CloseSignal,
    slot: Option<(usize, Waker)>,
}

impl Future for CloseWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.is_closed() {
            return Poll::Ready(());
        }
        let stale = match &self.slot {
            Some((_, w)) => !w.will_wake(cx.waker()),
            None => true,
        };
        if stale {
            if let Some((slot, _)) = self.slot.take() {
                self.signal.unregister(slot);
            }
            match self.signal.register(cx.waker()) {
                Some(slot) => self.slot = Some((slot, cx.waker().clone())),
                None => return Poll::Ready(()),
            }
        }
        Poll::Pending
    }
}

impl Drop for CloseWait<'_> {
    fn drop(&mut self) {
        if let Some((slot, _)) = self.slot.take() {
            if !self.signal.is_closed() {
                self.signal.unregister(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn close_wakes_every_waiter_and_late_waiters_complete() {
        let sig = Arc::new(CloseSignal::new());
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let s = sig.clone();
            tasks.push(tokio::spawn(async move { s.wait().await }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(sig.waiting(), 10);
        sig.close();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(1), t)
                .await
                .expect("woken")
                .unwrap();
        }
        sig.wait().await; // already closed: completes at once
    }

    #[tokio::test]
    async fn dropped_waiters_free_their_slot() {
        let sig = CloseSignal::new();
        for _ in 0..3 {
            let w = sig.wait();
            let r = tokio::time::timeout(Duration::from_millis(5), w).await;
            assert!(r.is_err());
        }
        assert_eq!(sig.waiting(), 0);
    }
}
