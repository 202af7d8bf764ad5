//! The hook workers' door to the store: one dedicated thread owns a SQLite connection and runs
//! every request from every sidecar core, grouping whatever has queued up into one transaction
//! (group commit). With synchronous=FULL each commit is an fsync, so batching is what lets
//! thousands of job completions per second be durable; a reply is sent only after its batch
//! committed, so "recorded" always means "on disk". SQLite is blocking: it never runs on a
//! sidecar's runtime thread.

use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::store::{Location, Store, StoreError};

/// Most requests grouped into one transaction.
const MAX_BATCH: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("committing a batch of hook records: {0}")]
    Commit(String),
    #[error("the hook database thread is gone")]
    Gone,
    #[error("cannot start the hook database thread: {0}")]
    Thread(std::io::Error),
}

type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;
type Request = Box<dyn FnOnce(&Store) -> Reply + Send>;

/// A cheap, cloneable handle to the writer thread. The thread ends when every handle is dropped.
#[derive(Clone)]
pub struct HookDb {
    tx: mpsc::Sender<Request>,
}

impl HookDb {
    /// Opens the store and starts the writer thread.
    pub fn start(location: &Location) -> Result<Self, DbError> {
        let store = Store::open(location)?;
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("gitplane-hookdb".into())
            .spawn(move || writer(store, rx))
            .map_err(DbError::Thread)?;
        Ok(Self { tx })
    }

    /// Runs `f` on the writer thread; resolves once its batch committed.
    pub async fn call<R, F>(&self, f: F) -> Result<R, DbError>
    where
        R: Send + 'static,
        F: FnOnce(&Store) -> Result<R, StoreError> + Send + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel::<Result<R, DbError>>();
        let request: Request = Box::new(move |store: &Store| {
            let result = store.in_transaction(f);
            Box::new(move |commit: Option<&StoreError>| {
                let result = match commit {
                    // The batch did not commit: whatever `f` did is gone.
                    Some(e) => Err(DbError::Commit(e.to_string())),
                    None => result.map_err(DbError::Store),
                };
                let _ = reply_tx.send(result);
            })
        });
        self.tx.send(request).map_err(|_| DbError::Gone)?;
        reply_rx.await.map_err(|_| DbError::Gone)?
    }
}

fn writer(store: Store, rx: mpsc::Receiver<Request>) {
    while let Ok(first) = rx.recv() {
        let mut replies = Vec::with_capacity(16);
        // If BEGIN fails each request still runs in its own savepoint (its own transaction).
        let begun = store.begin_batch().is_ok();
        replies.push(first(&store));
        while replies.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(req) => replies.push(req(&store)),
                Err(_) => break,
            }
        }
        let commit = if begun { store.commit_batch() } else { Ok(()) };
        let err = commit.err();
        for reply in replies {
            reply(err.as_ref());
        }
    }
}
