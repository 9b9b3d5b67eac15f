//! A shard-local "something changed" signal: tasks wait for the next `notify_all`.
//! Single-threaded by construction (no atomics), like everything a shard owns.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[derive(Debug, Default)]
pub struct Event {
    generation: Cell<u64>,
    wakers: RefCell<Vec<Waker>>,
}

impl Event {
    /// Wakes every task waiting on a listener taken before this call.
    pub fn notify_all(&self) {
        self.generation.set(self.generation.get() + 1);
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for waker in wakers {
            waker.wake();
        }
    }

    /// A future that completes at the next `notify_all`. Take it before checking the
    /// condition you wait for, so that a notification in between is not missed.
    pub fn listen(&self) -> Listener<'_> {
        Listener { event: self, generation: self.generation.get() }
    }
}

#[derive(Debug)]
pub struct Listener<'a> {
    event: &'a Event,
    generation: u64,
}

impl Future for Listener<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.event.generation.get() != self.generation {
            return Poll::Ready(());
        }
        let mut wakers = self.event.wakers.borrow_mut();
        if !wakers.iter().any(|waker| waker.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_completes_after_notify_only() {
        let event = Event::default();
        let mut listener = std::pin::pin!(event.listen());
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(listener.as_mut().poll(&mut cx).is_pending());
        event.notify_all();
        assert!(listener.as_mut().poll(&mut cx).is_ready());
        let mut late = std::pin::pin!(event.listen());
        assert!(late.as_mut().poll(&mut cx).is_pending(), "a listener taken after notify waits for the next");
    }
}
