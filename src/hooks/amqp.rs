//! AMQP mode (`--amqp-url`): the relay and the consumers, with lapin on each core's tokio
//! sidecar.
//!
//! Topology, all durable (names from `hooks.amqp_prefix`, default `gitplane`):
//! - `PREFIX.events`: topic exchange; events are published with routing key `push.OWNER.NAME`;
//! - `PREFIX.jobs.JOB`: one queue per job type, bound with `push.#`, dead-lettering to
//! - `PREFIX.dlx` (direct) with routing key `JOB`, into `PREFIX.dead.JOB`.
//!
//! Per core there is one connection. It carries a channel per job type (`basic_qos` prefetch,
//! ack after the job's end is recorded, reject-without-requeue = dead-letter) and, on core 0
//! only, the relay's channel. The relay publishes outbox rows oldest first as persistent
//! messages with publisher confirms, pipelined in batches, and deletes a row only once the broker
//! confirmed it; the first failure stops the batch, so what is left goes out again in order
//! after a reconnect. It runs on one core because a single publisher keeps the outbox order on
//! the wire without any claim protocol between cores, and one channel with pipelined confirms
//! publishes far more than the jobs consume (see docs/BENCHMARKS.md).
//!
//! When the broker is unreachable the core reconnects with backoff; meanwhile events wait in
//! the outbox and unacknowledged deliveries return to their queues, to be redelivered (jobs are
//! idempotent by event id). lapin runs each connection's socket on its own I/O thread.

use std::cell::Cell;
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_core::Stream;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::Confirmation;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind, PublisherConfirm,
};

use super::db::DbError;
use super::event::PushEvent;
use super::jobs::JobKind;
use super::poll::IdleBackoff;
use super::worker::{Outcome, Worker};
use crate::config::HookConfig;
use crate::metrics::METRICS;
use crate::runtime::sidecar::{stopped, StopSignal};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Relay batches in flight (published, confirms outstanding) at once.
const RELAY_WINDOW_BATCHES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("connecting to the broker timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("the broker did not take event {event}: {why}")]
    NotConfirmed { event: String, why: String },
    #[error("consumer of {0} was cancelled by the broker")]
    ConsumerEnded(String),
}

/// Names of the exchanges and queues for one prefix.
#[derive(Debug, Clone)]
pub struct Topology {
    pub prefix: String,
}

impl Topology {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }
    pub fn exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }
    pub fn dead_exchange(&self) -> String {
        format!("{}.dlx", self.prefix)
    }
    pub fn job_queue(&self, job: JobKind) -> String {
        format!("{}.jobs.{}", self.prefix, job.name())
    }
    pub fn dead_queue(&self, job: JobKind) -> String {
        format!("{}.dead.{}", self.prefix, job.name())
    }
    /// `push.OWNER.NAME`: consumers may bind narrower patterns, e.g. `push.alice.#`.
    pub fn routing_key(repo: &str) -> String {
        format!("push.{}", repo.replace('/', "."))
    }
}

/// Declares the exchanges and, for each job, its queue and dead-letter queue (idempotent).
pub async fn declare(ch: &Channel, cfg: &HookConfig, jobs: &[JobKind]) -> Result<(), lapin::Error> {
    let t = Topology::new(&cfg.prefix);
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    ch.exchange_declare(
        t.exchange().into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        t.dead_exchange().into(),
        ExchangeKind::Direct,
        durable,
        FieldTable::default(),
    )
    .await?;
    let expires = cfg
        .queue_expires
        .map(|d| AMQPValue::LongInt(i32::try_from(d.as_millis()).unwrap_or(i32::MAX)));
    for &job in jobs {
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(t.dead_exchange())),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(job.name())),
        );
        let mut dead_args = FieldTable::default();
        if let Some(e) = &expires {
            args.insert("x-expires".into(), e.clone());
            dead_args.insert("x-expires".into(), e.clone());
        }
        ch.queue_declare(
            t.job_queue(job).into(),
            QueueDeclareOptions::durable(),
            args,
        )
        .await?;
        ch.queue_bind(
            t.job_queue(job).into(),
            t.exchange().into(),
            "push.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(
            t.dead_queue(job).into(),
            QueueDeclareOptions::durable(),
            dead_args,
        )
        .await?;
        ch.queue_bind(
            t.dead_queue(job).into(),
            t.dead_exchange().into(),
            job.name().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(())
}

/// Runs one core until `stop`: connect, consume (and relay on core 0), reconnect on failure.
pub async fn run_core(worker: Rc<Worker>, url: String, stop: StopSignal, grace: Duration) {
    let mut delay = RECONNECT_MIN;
    let mut stop_wait = stop.clone();
    loop {
        if *stop.borrow() {
            return;
        }
        let started = Instant::now();
        match session(&worker, &url, stop.clone(), grace).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(core = worker.core, error = %e, retry_in = ?delay, "AMQP session ended; events wait in the outbox");
            }
        }
        // A session that lived a while was healthy: start backing off from scratch.
        if started.elapsed() > Duration::from_secs(10) {
            delay = RECONNECT_MIN;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut stop_wait) => return,
        }
        delay = (delay * 2).min(RECONNECT_MAX);
    }
}

/// One connection's life. Ok when stopped, Err when the connection or a channel failed.
async fn session(
    worker: &Rc<Worker>,
    url: &str,
    stop: StopSignal,
    grace: Duration,
) -> Result<(), AmqpError> {
    let cfg = &worker.shared.config;
    let props = ConnectionProperties::default()
        .with_connection_name(format!("gitplane-core-{}", worker.core).into());
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props))
        .await
        .map_err(|_| AmqpError::ConnectTimeout(CONNECT_TIMEOUT))??;
    METRICS.hooks.amqp_connects.inc();
    let jobs = JobKind::enabled(&cfg.concurrency);
    let setup = conn.create_channel().await?;
    declare(&setup, cfg, &jobs).await?;
    let _ = setup.close(200, "declared".into()).await;
    tracing::info!(core = worker.core, jobs = ?jobs.iter().map(|j| j.name()).collect::<Vec<_>>(), "connected to the broker");

    let inflight = Rc::new(Cell::new(0usize));
    let mut tasks = tokio::task::JoinSet::new();
    for &job in &jobs {
        let ch = conn.create_channel().await?;
        tasks.spawn_local(consume(Rc::clone(worker), ch, job, Rc::clone(&inflight)));
    }
    if worker.core == 0 && !jobs.is_empty() {
        let ch = conn.create_channel().await?;
        tasks.spawn_local(relay(Rc::clone(worker), ch, stop.clone()));
    }
    let mut stop_wait = stop.clone();
    let result = tokio::select! {
        r = tasks.join_next() => match r {
            Some(Ok(Err(e))) => Err(e),
            Some(Ok(Ok(()))) | None => Ok(()),
            Some(Err(e)) => Err(AmqpError::ConsumerEnded(e.to_string())),
        },
        _ = stopped(&mut stop_wait) => Ok(()),
    };
    // Stop taking deliveries and publishing; deliveries being handled finish (and ack on this
    // connection) within the grace period; the rest return to their queues when it closes.
    tasks.abort_all();
    if result.is_ok() {
        let deadline = Instant::now() + grace;
        while inflight.get() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = conn.close(200, "gitplane stopping".into()).await;
        return Ok(());
    }
    result
}

async fn consume(
    worker: Rc<Worker>,
    ch: Channel,
    job: JobKind,
    inflight: Rc<Cell<usize>>,
) -> Result<(), AmqpError> {
    let cfg = &worker.shared.config;
    let queue = Topology::new(&cfg.prefix).job_queue(job);
    ch.basic_qos(cfg.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = ch
        .basic_consume(
            queue.clone().into(),
            format!("gitplane-{}-{}", worker.core, job.name()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    loop {
        let next = poll_fn(|cx| Pin::new(&mut consumer).poll_next(cx)).await;
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(AmqpError::ConsumerEnded(queue)),
        };
        inflight.set(inflight.get() + 1);
        let (worker, inflight) = (Rc::clone(&worker), Rc::clone(&inflight));
        tokio::task::spawn_local(async move {
            handle(&worker, delivery, job).await;
            inflight.set(inflight.get() - 1);
        });
    }
}

/// Runs the job for one delivery, then acks (done), rejects without requeue (dead-letter), or
/// hands it back (stopping, or its end could not be recorded).
async fn handle(worker: &Worker, delivery: Delivery, job: JobKind) {
    let event = match PushEvent::from_json(&delivery.data) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(job = job.name(), error = %e, "unreadable message dead-lettered");
            let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
            return;
        }
    };
    let settled = match worker.process(&event, job).await {
        Ok(Outcome::Done | Outcome::AlreadyDone) => delivery.ack(BasicAckOptions::default()).await,
        Ok(Outcome::DeadLettered) => delivery.reject(BasicRejectOptions { requeue: false }).await,
        Ok(Outcome::Stopped) => {
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
        }
        Err(e) => {
            tracing::warn!(event = %event.id, job = job.name(), error = %e, "cannot record the job's end; requeueing");
            tokio::time::sleep(Duration::from_secs(1)).await;
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
        }
    };
    if let Err(e) = settled {
        // The connection is gone: the broker redelivers, and the recorded end makes the copy a
        // no-op.
        tracing::debug!(event = %event.id, job = job.name(), error = %e, "could not settle delivery");
    }
}

/// Published rows whose confirms are outstanding, oldest first.
type Window = VecDeque<(i64, String, PublisherConfirm)>;

/// Core 0: outbox -> exchange, with confirms; a row is deleted only after its confirm.
///
/// Pipelined: up to `RELAY_WINDOW_BATCHES` batches are in flight, so the broker's fsync of one
/// batch overlaps the publishing of the next. Confirms are consumed strictly in publish order
/// and rows are deleted as a confirmed prefix; at the first failure the relay stops and the
/// session reconnects, and everything still in the outbox is published again, in order.
async fn relay(worker: Rc<Worker>, ch: Channel, mut stop: StopSignal) -> Result<(), AmqpError> {
    if !super::lease::acquire(&mut stop).await {
        return Ok(());
    }
    let cfg = &worker.shared.config;
    let db = worker.db().clone();
    let exchange = Topology::new(&cfg.prefix).exchange();
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut depth_at = Instant::now()
        .checked_sub(Duration::from_secs(1))
        .unwrap_or_else(Instant::now);
    let batch = cfg.relay_batch;
    let max_window = batch.saturating_mul(RELAY_WINDOW_BATCHES);
    let mut window: Window = VecDeque::with_capacity(max_window);
    // Highest outbox id published on this channel; rows above it are next.
    let mut last_published = 0i64;
    let mut idle = IdleBackoff::default();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        if depth_at.elapsed() >= Duration::from_millis(500) {
            depth_at = Instant::now();
            let n = db.call(|s| s.outbox_depth()).await?;
            METRICS
                .hooks
                .outbox_depth
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let room = max_window.saturating_sub(window.len()).min(batch);
        if room > 0 {
            let rows = db
                .call(move |s| s.outbox_after(last_published, room))
                .await?;
            if !rows.is_empty() {
                idle.found();
            }
            for row in rows {
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_message_id(row.event_id.clone().into());
                let confirm = ch
                    .basic_publish(
                        exchange.clone().into(),
                        Topology::routing_key(&row.repo).into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        row.payload.as_bytes(),
                        props,
                    )
                    .await
                    .inspect_err(|_| METRICS.hooks.publish_failures.inc())?;
                METRICS.hooks.published.inc();
                last_published = row.id;
                window.push_back((row.id, row.event_id, confirm));
            }
        }
        if window.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(idle.empty()) => {}
                _ = stopped(&mut stop) => return Ok(()),
            }
            continue;
        }
        // Wait for the oldest confirm, then take every further one already in.
        let mut confirmed = Vec::new();
        let outcome = settle_confirms(&mut window, &mut confirmed).await;
        if !confirmed.is_empty() {
            db.call(move |s| s.outbox_delete(&confirmed)).await?;
        }
        outcome?;
    }
}

/// Pops confirmed rows off the front of `window` into `confirmed`: waits for the first, then
/// takes the ones already resolved. Err at the first row the broker did not take.
async fn settle_confirms(window: &mut Window, confirmed: &mut Vec<i64>) -> Result<(), AmqpError> {
    let mut first = true;
    while let Some((_, _, confirm)) = window.front_mut() {
        let result = if first {
            first = false;
            Some(Pin::new(confirm).await)
        } else {
            // Ready now, or leave it for the next round.
            poll_fn(|cx| match Pin::new(&mut *confirm).poll(cx) {
                Poll::Ready(r) => Poll::Ready(Some(r)),
                Poll::Pending => Poll::Ready(None),
            })
            .await
        };
        let Some(result) = result else { break };
        let Some((id, event, _)) = window.pop_front() else {
            break;
        };
        let why = match result {
            Ok(Confirmation::Ack(None)) => None,
            Ok(Confirmation::Ack(Some(_))) => Some("unroutable (no job queue bound)".to_owned()),
            Ok(Confirmation::Nack(_)) => Some("nacked".to_owned()),
            Ok(Confirmation::NotRequested) => Some("confirms are off".to_owned()),
            Err(e) => Some(e.to_string()),
        };
        match why {
            None => {
                METRICS.hooks.confirmed.inc();
                confirmed.push(id);
            }
            Some(why) => {
                METRICS.hooks.publish_failures.inc();
                return Err(AmqpError::NotConfirmed { event, why });
            }
        }
    }
    Ok(())
}
