//! Hook workers (issue #6): every push becomes one durable event, and workers run jobs for it.
//!
//! Data flow, in the order an event travels:
//! - [`capture`]: git's reference-transaction hook records each ref transaction of a push as
//!   pending before git commits it; post-receive runs `gitplane hook post-receive`, which writes
//!   the push's one [`event::PushEvent`] into the outbox (SQLite, WAL, synchronous=FULL) before
//!   receive-pack reports success;
//! - [`pending`]: pending transactions whose process died are reconciled against the refs on
//!   disk (at start-up, then every few seconds): published as one event, or dropped;
//! - with `--amqp-url`, [`amqp`]: the relay (core 0 only) publishes outbox rows to a durable topic
//!   exchange with publisher confirms and deletes a row only once confirmed; per core, one
//!   connection consumes a durable queue per job type;
//! - without a broker, [`embedded`]: a dispatcher on core 0 hands outbox rows straight to the
//!   same per-core workers;
//! - [`worker`]: the per-core semaphores, retries with backoff, dead-lettering and the
//!   idempotency check by (event id, job);
//! - [`jobs`]: disk usage, webhooks (signed, delivered by [`http_client`]), commit indexing.
//!
//! All SQLite work goes through [`db::HookDb`], one writer thread with group commit.

pub mod amqp;
pub mod capture;
pub mod db;
pub mod embedded;
pub mod event;
pub mod http_client;
pub mod jobs;
mod lease;
pub mod pending;
mod poll;
pub mod worker;

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::config::ServeConfig;
use crate::git::repo::RepoRoot;
use crate::git::repo_name::{RepoName, RepoNameError};
use crate::runtime::sidecar::{SidecarService, StopSignal};
use crate::store::{Location, Store, StoreError};
use worker::{Shared, Worker};

/// Errors starting the hook workers.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot find the gitplane executable for the git hooks: {0}")]
    Exe(std::io::Error),
    #[error(transparent)]
    Capture(#[from] capture::CaptureError),
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("reconciling pending ref changes at start-up: {0}")]
    Reconcile(#[from] pending::ReconcileError),
}

/// The hook workers as a sidecar service: on every core, the consumers (AMQP) or this core's
/// share of the outbox (embedded); the relay or the dispatcher on core 0.
pub struct HooksService {
    shared: Arc<Shared>,
    queues: Arc<embedded::Queues>,
}

impl HooksService {
    /// Writes the git hooks, points receive-pack at them, opens the store, and reconciles the
    /// pending ref changes of processes that died (then keeps doing so in the background).
    pub fn new(
        config: &ServeConfig,
        housekeeper: Arc<crate::housekeeping::Housekeeper>,
    ) -> Result<Self, HookError> {
        let exe = crate::lifecycle::running_exe().map_err(HookError::Exe)?;
        let hooks_dir = capture::install_hooks(&config.store, &exe, &config.hook_env())?;
        lease::init(config.data_dir.join("hooks").join("dispatch.lock"));
        crate::git::process::set_hooks_path(&hooks_dir);
        let db = db::HookDb::start(&config.store)?;
        let reconciled = pending::Reconciler::new(&config.store, &config.git.binary).start()?;
        let jobs = jobs::JobContext {
            db: db.clone(),
            repos: RepoRoot::new(&config.data_dir),
            git: config.git.binary.clone(),
            webhook_timeout: config.hooks.webhook_timeout,
            housekeeper,
        };
        let enabled: Vec<_> = jobs::JobKind::enabled(&config.hooks.concurrency)
            .iter()
            .map(|j| j.name())
            .collect();
        tracing::info!(
            mode = if config.hooks.amqp_url.is_some() { "amqp" } else { "embedded" },
            jobs = ?enabled,
            hooks = %hooks_dir.display(),
            reconciled_published = reconciled.published,
            reconciled_dropped = reconciled.dropped,
            "hook workers ready"
        );
        Ok(Self {
            shared: Arc::new(Shared::new(config.hooks.clone(), db, jobs)),
            queues: Arc::new(embedded::Queues::new(config.shards.get())),
        })
    }
}

impl SidecarService for HooksService {
    fn name(&self) -> &'static str {
        "hooks"
    }

    fn run(
        self: Arc<Self>,
        core: usize,
        stop: StopSignal,
        grace: Duration,
    ) -> Pin<Box<dyn Future<Output = ()>>> {
        Box::pin(async move {
            let worker = Rc::new(Worker::new(core, Arc::clone(&self.shared), stop.clone()));
            match self.shared.config.amqp_url.clone() {
                Some(url) => amqp::run_core(worker, url, stop, grace).await,
                None => embedded::run_core(worker, Arc::clone(&self.queues), stop, grace).await,
            }
        })
    }
}

/// Errors of the hook admin commands.
#[derive(Debug, thiserror::Error)]
pub enum HookAdminError {
    #[error("invalid repository name: {0}")]
    RepoName(#[from] RepoNameError),
    #[error(transparent)]
    Url(#[from] http_client::HttpClientError),
    #[error("the webhook secret is empty")]
    EmptySecret,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `gitplane webhook add OWNER/NAME URL --secret-stdin`: returns the new webhook's id.
pub fn add_webhook(
    location: &Location,
    repo: &str,
    url: &str,
    secret: &str,
) -> Result<i64, HookAdminError> {
    let repo = RepoName::parse(repo)?;
    http_client::HttpUrl::parse(url)?;
    if secret.is_empty() {
        return Err(HookAdminError::EmptySecret);
    }
    Ok(Store::open(location)?.add_webhook(&repo.to_string(), url, secret)?)
}
