//! A shard-local coarse timer for long deadlines that rarely fire, such as an idle keep-alive
//! connection's. A monoio `Sleep` is 640 bytes, carried in the waiting task for as long as it
//! waits; with tens of thousands of idle connections that was most of their memory. A
//! [`Deadline`] is a few words: its waker sits in the shard's table, and one ticker task per
//! shard wakes what is due every [`TICK`] while anything waits. Deadlines fire up to one tick
//! late, which is nothing next to a 60 s idle timeout.
//!
//! Must be polled inside a monoio runtime (the ticker is spawned on the current shard).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How often the ticker looks for due deadlines.
pub const TICK: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Table {
    waiting: BTreeMap<(Instant, u64), Waker>,
    next_key: u64,
    ticking: bool,
}

thread_local! {
    static TABLE: RefCell<Table> = RefCell::new(Table::default());
}

/// Resolves at `at` (up to one [`TICK`] later).
pub fn deadline(at: Instant) -> Deadline {
    Deadline { at, key: None }
}

pub struct Deadline {
    at: Instant,
    key: Option<u64>,
}

impl Future for Deadline {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.at {
            return Poll::Ready(());
        }
        let at = self.at;
        let key = TABLE.with(|t| {
            let mut t = t.borrow_mut();
            let key = match self.key {
                Some(key) => key,
                None => {
                    t.next_key = t.next_key.wrapping_add(1);
                    t.next_key
                }
            };
            match t.waiting.get_mut(&(at, key)) {
                Some(w) if w.will_wake(cx.waker()) => {}
                Some(w) => w.clone_from(cx.waker()),
                None => {
                    t.waiting.insert((at, key), cx.waker().clone());
                }
            }
            if !t.ticking {
                t.ticking = true;
                monoio::spawn(tick());
            }
            key
        });
        self.key = Some(key);
        Poll::Pending
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let _ = TABLE.try_with(|t| t.borrow_mut().waiting.remove(&(self.at, key)));
        }
    }
}

/// Wakes due deadlines every tick; ends when nothing waits (the next deadline starts it again).
async fn tick() {
    loop {
        monoio::time::sleep(TICK).await;
        let (due, more) = TABLE.with(|t| {
            let mut t = t.borrow_mut();
            let now = Instant::now();
            let mut due = Vec::new();
            while let Some(entry) = t.waiting.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                due.push(entry.remove());
            }
            let more = !t.waiting.is_empty();
            t.ticking = more;
            (due, more)
        });
        for w in due {
            w.wake();
        }
        if !more {
            return;
        }
    }
}

/// Deadlines waiting on this thread.
#[cfg(test)]
fn waiting() -> usize {
    TABLE.with(|t| t.borrow().waiting.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_fire_in_order_and_dropped_ones_leave_nothing() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            let start = Instant::now();
            let late = monoio::spawn(deadline(start + Duration::from_millis(300)));
            let early = monoio::spawn(async move {
                deadline(start + Duration::from_millis(150)).await;
                start.elapsed()
            });
            // A wait that is given up leaves no entry behind.
            let given_up = monoio::time::timeout(
                Duration::from_millis(10),
                deadline(start + Duration::from_secs(60)),
            )
            .await;
            assert!(given_up.is_err());
            let fired = early.await;
            assert!(fired >= Duration::from_millis(150));
            assert!(fired < Duration::from_millis(150) + 3 * TICK, "{fired:?}");
            late.await;
            assert!(start.elapsed() >= Duration::from_millis(300));
            assert_eq!(waiting(), 0);
            assert!(std::mem::size_of::<Deadline>() <= 32);
        });
    }
}
