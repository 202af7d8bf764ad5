//! OS threads reused for blocking per-request work: the cluster relay and the cluster transport
//! each need two or three threads per git request, and a relayed clone makes three requests.
//! Starting and ending a thread (stack mapping, clone, TLS, unmapping) cost a relayed clone
//! more CPU than the bytes it moved (bench/cluster.py); a thread that finished its job instead
//! waits up to [`KEEP_IDLE`] for the next one, and at most [`MAX_IDLE`] wait at once.

use std::io;
use std::sync::mpsc::{self, SyncSender};
use std::sync::Mutex;
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send>;

/// How long a thread with nothing to do waits for another job before it ends.
const KEEP_IDLE: Duration = Duration::from_secs(10);
/// Most threads waiting for a job at once; one more ends instead.
const MAX_IDLE: usize = 256;

/// Each idle thread's door: a sender whose receiver it is blocked on.
static IDLE: Mutex<Vec<SyncSender<Job>>> = Mutex::new(Vec::new());

/// Runs `job` on an idle thread, or on a new one named `gitplane-pool`.
pub fn run(job: impl FnOnce() + Send + 'static) -> io::Result<()> {
    let mut job: Job = Box::new(job);
    loop {
        let Some(door) = IDLE.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
            break;
        };
        match door.try_send(job) {
            Ok(()) => return Ok(()),
            // That thread stopped waiting (timed out) after it registered: try the next.
            Err(mpsc::TrySendError::Disconnected(back) | mpsc::TrySendError::Full(back)) => {
                job = back
            }
        }
    }
    std::thread::Builder::new()
        .name("gitplane-pool".into())
        .spawn(move || serve(job))
        .map(drop)
}

fn serve(first: Job) {
    first();
    loop {
        let (door, jobs) = mpsc::sync_channel::<Job>(1);
        {
            let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() >= MAX_IDLE {
                return;
            }
            idle.push(door);
        }
        match jobs.recv_timeout(KEEP_IDLE) {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn a_finished_thread_takes_the_next_job() {
        let (tx, rx) = channel();
        let first = tx.clone();
        run(move || first.send(std::thread::current().id()).unwrap()).unwrap();
        let a = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // Give the thread time to register as idle; other tests may also take it, so look for
        // reuse over a few jobs rather than on exactly the next one.
        let mut reused = false;
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(20));
            let next = tx.clone();
            run(move || next.send(std::thread::current().id()).unwrap()).unwrap();
            let b = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            if b == a {
                reused = true;
                break;
            }
        }
        assert!(reused, "no job ran on the thread that had finished one");
    }
}
