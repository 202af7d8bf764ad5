//! The method table and dispatch: which path is which call, whether it needs the token, and how
//! each request runs (decode on the shard, libgit2 work on the [`GitPool`], encode on the
//! worker). A unary call answers one framed message; a streaming call answers a channel of
//! framed messages and a final status.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use git2::Repository;
use prost::Message;
use tokio::sync::mpsc;

use super::auth::Token;
use super::conns::AddressCaps;
use super::frame::encode_message;
use super::ops::{self, with_repo, Emitter, OpResult};
use super::pb::{health, v1 as pb};
use super::pool::{CallCtx, GitPool};
use super::status::{Code, Status};
use crate::cluster::membership::Route;
use crate::cluster::replicate;
use crate::config::{HousekeepingConfig, RpcLimits};
use crate::git::repo::RepoRoot;
use crate::git::repo_name::RepoName;
use crate::hooks::event::RefUpdate;
use crate::hooks::pending::ServerChange;
use crate::lifecycle::ShutdownSignal;

/// Messages a streaming call may have in flight between its worker and the shard: with 64 KiB
/// blob chunks, 4 keep the socket busy while bounding memory per call.
const STREAM_QUEUE: usize = 4;

macro_rules! methods {
    ($($variant:ident => $path:literal,)*) => {
        /// Every method the server knows.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Method { $($variant,)* }

        /// All methods, in metric-index order.
        pub const METHODS: &[Method] = &[$(Method::$variant,)*];

        /// `service/method` labels, in the same order (for metrics).
        pub const METHOD_LABELS: &[&str] = &[$($path,)*];

        impl Method {
            /// The `:path` of the call, e.g. `/gitplane.v1.RepositoryService/ListBranches`.
            pub fn label(self) -> &'static str {
                match self { $(Method::$variant => $path,)* }
            }
        }
    };
}

methods! {
    ListBranches => "gitplane.v1.RepositoryService/ListBranches",
    ListTags => "gitplane.v1.RepositoryService/ListTags",
    FindCommit => "gitplane.v1.RepositoryService/FindCommit",
    CommitLog => "gitplane.v1.RepositoryService/CommitLog",
    CommitDiff => "gitplane.v1.RepositoryService/CommitDiff",
    CompareRefs => "gitplane.v1.RepositoryService/CompareRefs",
    GetTree => "gitplane.v1.RepositoryService/GetTree",
    GetBlob => "gitplane.v1.RepositoryService/GetBlob",
    CreateBranch => "gitplane.v1.RepositoryService/CreateBranch",
    DeleteBranch => "gitplane.v1.RepositoryService/DeleteBranch",
    CheckMergeability => "gitplane.v1.RepositoryService/CheckMergeability",
    Merge => "gitplane.v1.RepositoryService/Merge",
    RepositoryInfo => "gitplane.v1.RepositoryService/RepositoryInfo",
    OptimizeRepository => "gitplane.v1.RepositoryService/OptimizeRepository",
    HealthCheck => "grpc.health.v1.Health/Check",
    HealthWatch => "grpc.health.v1.Health/Watch",
}

impl Method {
    pub fn from_path(path: &str) -> Option<Self> {
        let p = path.strip_prefix('/')?;
        METHODS.iter().copied().find(|m| m.label() == p)
    }

    /// Health checks are open: load balancers probe without the token.
    pub fn needs_token(self) -> bool {
        !matches!(self, Method::HealthCheck | Method::HealthWatch)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Requests that name a repository.
trait RepoRequest: Message + Default + Send + 'static {
    fn repository(&self) -> &str;
}

macro_rules! repo_requests {
    ($($t:ty),*) => {$(
        impl RepoRequest for $t {
            fn repository(&self) -> &str { &self.repository }
        }
    )*};
}

repo_requests!(
    pb::ListBranchesRequest,
    pb::ListTagsRequest,
    pb::FindCommitRequest,
    pb::CommitLogRequest,
    pb::CommitDiffRequest,
    pb::CompareRefsRequest,
    pb::GetTreeRequest,
    pb::GetBlobRequest,
    pb::CreateBranchRequest,
    pb::DeleteBranchRequest,
    pb::CheckMergeabilityRequest,
    pb::MergeRequest,
    pb::RepositoryInfoRequest,
    pb::OptimizeRepositoryRequest
);

/// State shared by every shard's RPC front end.
pub struct RpcState {
    pub limits: RpcLimits,
    /// Connections per source address, node-wide.
    pub address_caps: AddressCaps,
    pub token: Token,
    pub pool: GitPool,
    pub repos: RepoRoot,
    pub git_binary: PathBuf,
    /// Where the hook outbox lives, for the events of calls that change refs.
    pub store: crate::store::Location,
    /// In a cluster: which copies may answer.
    pub routing: Option<crate::cluster::membership::Routing>,
    pub housekeeping: Arc<HousekeepingConfig>,
}

/// What a call runs with on the worker.
pub struct CallEnv {
    pub ctx: CallCtx,
    /// `owner/name`, for messages.
    pub name: String,
    pub git_binary: PathBuf,
    pub store: crate::store::Location,
    pub routing: Option<crate::cluster::membership::Routing>,
    pub housekeeping: Arc<HousekeepingConfig>,
}

impl CallEnv {
    /// In a cluster, a call reads this node's copy only when it is current; elsewhere it is
    /// told which node to ask (the API does not relay calls).
    fn check_current(&self) -> Result<(), Status> {
        let Some(routing) = &self.routing else {
            return Ok(());
        };
        let route = crate::store::with_thread_store(&self.store, |s| routing.route(s, &self.name))
            .map_err(|e| {
                Status::new(Code::Unavailable, format!("cluster state unavailable: {e}"))
            })?;
        match route {
            Route::Local => Ok(()),
            Route::Remote(r) => Err(Status::new(
                Code::FailedPrecondition,
                format!(
                    "this node's copy of {} is not current; call node {}",
                    self.name, r.node
                ),
            )),
            Route::NoCurrentReplica => Err(Status::new(
                Code::Unavailable,
                format!("no up-to-date copy of {} is reachable now", self.name),
            )),
        }
    }

    /// Runs `op`, which writes one ref: the change is recorded as pending (durably) right before
    /// libgit2 writes the ref, and becomes its hook event once the op is done, so webhooks and
    /// indexing see merges and branches made through the API too, even across a crash.
    ///
    /// In a cluster the update is voted as a push's is: libgit2 writes refs without git's
    /// reference-transaction hook, so the call itself does what the hook does for a push
    /// ([`crate::cluster::replicate::prepared`]: the new objects and the update, leased on the
    /// old value, pushed to the other current copies; a majority or nothing), right before the
    /// local write, and closes the window after it.
    fn changing_ref<T>(
        &self,
        method: &str,
        repo: &Repository,
        op: impl FnOnce(ops::BeforeRefWrite<'_>) -> OpResult<T>,
    ) -> OpResult<T> {
        let change = ServerChange::new(&self.store, &self.name, format!("grpc:{method}"));
        let voted = std::cell::RefCell::new(Vec::new());
        let result = op(&|update: &RefUpdate| {
            change.prepare(update).map_err(|e| {
                ops::OpError::Status(Status::new(
                    Code::Internal,
                    format!(
                        "{method} did not change {}: its hook event could not be recorded: {e}",
                        update.refname
                    ),
                ))
            })?;
            if let Some(routing) = &self.routing {
                let updates = [replicate::RefUpdate {
                    before: update.before.clone(),
                    after: update.after.clone(),
                    refname: update.refname.clone(),
                }];
                replicate::prepared(&self.store, routing, &self.name, repo.path(), &updates)
                    .map_err(|e| {
                        ops::OpError::Status(Status::new(
                            Code::Unavailable,
                            format!("{method} did not change {}: {e}", update.refname),
                        ))
                    })?;
                voted.borrow_mut().extend(updates);
            }
            Ok(())
        });
        let voted = voted.into_inner();
        if !voted.is_empty() {
            if let Err(e) =
                replicate::finished(&self.store, &self.name, repo.path(), &voted, result.is_ok())
            {
                tracing::warn!(repo = %self.name, method, error = %e, "closing a replicated write");
            }
        }
        let current = |name: &str| {
            ops::refs::ref_target(repo, name)
                .ok()
                .flatten()
                .map(|o| o.to_string())
        };
        if let Err(e) = change.finish(result.is_ok(), current) {
            // The pending row stays, and the next start publishes it: the answer stands.
            tracing::warn!(repo = %self.name, method, error = %e, "ref change event left pending");
        }
        result
    }
}

/// How a call answers.
pub enum Reply {
    Unary(Bytes),
    Stream {
        messages: mpsc::Receiver<Bytes>,
        /// The final status, once the producer is done.
        done: Pin<Box<dyn Future<Output = Status>>>,
    },
}

fn decode<M: Message + Default>(body: Bytes) -> Result<M, Status> {
    M::decode(body).map_err(|e| Status::invalid_argument(format!("cannot decode the request: {e}")))
}

impl RpcState {
    fn locate(&self, name: &str) -> Result<(PathBuf, String), Status> {
        let repo = RepoName::parse(name)
            .map_err(|e| Status::invalid_argument(format!("repository {name:?}: {e}")))?;
        Ok((self.repos.path_of(&repo), repo.to_string()))
    }

    fn env(&self, ctx: &CallCtx, name: String) -> CallEnv {
        CallEnv {
            ctx: ctx.clone(),
            name,
            git_binary: self.git_binary.clone(),
            store: self.store.clone(),
            routing: self.routing.clone(),
            housekeeping: Arc::clone(&self.housekeeping),
        }
    }

    async fn unary<Req: RepoRequest, Resp: Message + 'static>(
        &self,
        body: Bytes,
        ctx: &CallCtx,
        f: fn(&Repository, &Req, &CallEnv) -> OpResult<Resp>,
    ) -> Result<Reply, Status> {
        let req: Req = decode(body)?;
        let (path, name) = self.locate(req.repository())?;
        let env = self.env(ctx, name);
        let frame = self
            .pool
            .run(move || -> Result<Bytes, Status> {
                // The call may have waited in the queue past its deadline.
                env.ctx.check()?;
                env.check_current()?;
                let resp = with_repo(&path, &env.name, |repo| f(repo, &req, &env))?;
                encode_message(&resp).map_err(|e| Status::internal(e.to_string()))
            })
            .await??;
        Ok(Reply::Unary(frame))
    }

    async fn streaming<Req: RepoRequest>(
        &self,
        body: Bytes,
        ctx: &CallCtx,
        f: fn(&Repository, &Req, &CallEnv, &Emitter) -> OpResult<()>,
    ) -> Result<Reply, Status> {
        let req: Req = decode(body)?;
        let (path, name) = self.locate(req.repository())?;
        let env = self.env(ctx, name);
        let permit = self.pool.streaming_slot().await?;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let job = self.pool.submit(move || -> Status {
            let _permit = permit;
            let emitter = Emitter::new(tx, env.ctx.clone());
            let r = env
                .ctx
                .check()
                .and_then(|()| env.check_current())
                .map_err(ops::OpError::from)
                .and_then(|()| with_repo(&path, &env.name, |repo| f(repo, &req, &env, &emitter)));
            match r {
                Ok(()) => Status::ok(),
                Err(e) => e.into(),
            }
        })?;
        let done = Box::pin(async move {
            match job.await {
                Ok(s) | Err(s) => s,
            }
        });
        Ok(Reply::Stream { messages: rx, done })
    }

    /// Runs `method` with its decoded-from-wire request `body`.
    pub async fn call(
        self: &Arc<Self>,
        method: Method,
        body: Bytes,
        ctx: &CallCtx,
        shutdown: &Rc<ShutdownSignal>,
    ) -> Result<Reply, Status> {
        use ops::{commits, diff, info, merge, optimize, refs, tree};
        match method {
            Method::ListBranches => {
                self.unary(body, ctx, |r, q, _| refs::list_branches(r, q))
                    .await
            }
            Method::ListTags => self.unary(body, ctx, |r, q, _| refs::list_tags(r, q)).await,
            Method::FindCommit => {
                self.unary(body, ctx, |r, q, _| commits::find_commit(r, q))
                    .await
            }
            Method::CommitLog => {
                self.unary(body, ctx, |r, q, e| commits::commit_log(r, q, &e.ctx))
                    .await
            }
            Method::CommitDiff => {
                self.streaming(body, ctx, |r, q, _, out| diff::commit_diff(r, q, out))
                    .await
            }
            Method::CompareRefs => {
                self.streaming(body, ctx, |r, q, _, out| diff::compare_refs(r, q, out))
                    .await
            }
            Method::GetTree => {
                self.unary(body, ctx, |r, q, e| tree::get_tree(r, q, &e.ctx))
                    .await
            }
            Method::GetBlob => {
                self.streaming(body, ctx, |r, q, e, out| {
                    tree::get_blob(r, q, &e.git_binary, out)
                })
                .await
            }
            Method::CreateBranch => {
                self.unary(body, ctx, |r, q, e| {
                    e.changing_ref("CreateBranch", r, |w| refs::create_branch(r, q, w))
                })
                .await
            }
            Method::DeleteBranch => {
                self.unary(body, ctx, |r, q, e| {
                    e.changing_ref("DeleteBranch", r, |w| refs::delete_branch(r, q, w))
                })
                .await
            }
            Method::CheckMergeability => {
                self.unary(body, ctx, |r, q, _| merge::check_mergeability(r, q))
                    .await
            }
            Method::Merge => {
                self.unary(body, ctx, |r, q, e| {
                    e.changing_ref("Merge", r, |w| merge::merge(r, q, w))
                })
                .await
            }
            Method::RepositoryInfo => {
                self.unary(body, ctx, |r, _: &pb::RepositoryInfoRequest, e| {
                    info::repository_info(r, &e.name, &e.ctx)
                })
                .await
            }
            Method::OptimizeRepository => {
                self.unary(body, ctx, optimize::optimize_repository).await
            }
            Method::HealthCheck => health_check(body, shutdown),
            Method::HealthWatch => health_watch(body, shutdown),
        }
    }
}

/// Services the health protocol knows; "" is the server as a whole.
const HEALTH_SERVICES: &[&str] = &["", "gitplane.v1.RepositoryService", "grpc.health.v1.Health"];

fn serving(shutdown: &ShutdownSignal) -> health::health_check_response::ServingStatus {
    use health::health_check_response::ServingStatus;
    // Draining: tell load balancers to stop sending new calls here.
    if shutdown.is_triggered() {
        ServingStatus::NotServing
    } else {
        ServingStatus::Serving
    }
}

fn health_frame(status: health::health_check_response::ServingStatus) -> Result<Bytes, Status> {
    encode_message(&health::HealthCheckResponse {
        status: status as i32,
    })
    .map_err(|e| Status::internal(e.to_string()))
}

fn health_check(body: Bytes, shutdown: &ShutdownSignal) -> Result<Reply, Status> {
    let req: health::HealthCheckRequest = decode(body)?;
    if !HEALTH_SERVICES.contains(&req.service.as_str()) {
        return Err(Status::new(
            Code::NotFound,
            format!("unknown service {:?}", req.service),
        ));
    }
    Ok(Reply::Unary(health_frame(serving(shutdown))?))
}

/// Sends the current status, then NOT_SERVING when the server starts draining, then ends.
fn health_watch(body: Bytes, shutdown: &Rc<ShutdownSignal>) -> Result<Reply, Status> {
    use health::health_check_response::ServingStatus;
    let req: health::HealthCheckRequest = decode(body)?;
    let (tx, rx) = mpsc::channel(2);
    let shutdown = Rc::clone(shutdown);
    let known = HEALTH_SERVICES.contains(&req.service.as_str());
    let done = Box::pin(async move {
        let first = if known {
            serving(&shutdown)
        } else {
            ServingStatus::ServiceUnknown
        };
        let Ok(frame) = health_frame(first) else {
            return Status::internal("cannot encode a health response");
        };
        if tx.send(frame).await.is_err() {
            return Status::ok();
        }
        if known && first == ServingStatus::Serving {
            shutdown.wait().await;
            if let Ok(frame) = health_frame(ServingStatus::NotServing) {
                let _ = tx.send(frame).await;
            }
        } else {
            // Nothing will change; the client's deadline or cancel ends the call.
            std::future::pending::<()>().await;
        }
        Status::ok()
    });
    Ok(Reply::Stream { messages: rx, done })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip() {
        for m in METHODS {
            assert_eq!(Method::from_path(&format!("/{}", m.label())), Some(*m));
            assert_eq!(METHOD_LABELS[m.index()], m.label());
        }
        assert_eq!(
            Method::from_path("/gitplane.v1.RepositoryService/Nope"),
            None
        );
        assert_eq!(
            Method::from_path("gitplane.v1.RepositoryService/GetBlob"),
            None
        );
        assert!(!Method::HealthCheck.needs_token());
        assert!(Method::Merge.needs_token());
    }
}
