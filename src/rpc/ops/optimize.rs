//! OptimizeRepository: one housekeeping pass now ([`crate::housekeeping::run`]), on the pool
//! worker. The repository's maintenance lock makes it wait for a pass of the hook workers or of
//! `gitplane repo maintain` instead of running beside it. A started pass runs to its end: a
//! cancelled call does not stop it (git leaves a consistent repository either way).

use std::sync::atomic::AtomicBool;

use git2::Repository;

use super::{OpError, OpResult};
use crate::housekeeping::run::Runner;
use crate::rpc::pb::v1 as pb;
use crate::rpc::service::CallEnv;
use crate::rpc::status::Status;

pub fn optimize_repository(
    repo: &Repository,
    req: &pb::OptimizeRepositoryRequest,
    env: &CallEnv,
) -> OpResult<pb::OptimizeRepositoryResponse> {
    env.ctx.check()?;
    let cancel = AtomicBool::new(false);
    let report = Runner {
        config: &env.housekeeping,
        git: &env.git_binary,
        cancel: &cancel,
    }
    .maintain(repo.path(), req.full)
    .map_err(|e| OpError::Status(Status::internal(format!("maintaining {}: {e}", env.name))))?;
    Ok(pb::OptimizeRepositoryResponse {
        tasks: report
            .tasks
            .iter()
            .map(|(t, _)| t.label().to_owned())
            .collect(),
        reasons: report.plan.reasons,
        packs_before: report.packs_before as u64,
        packs_after: report.packs_after as u64,
        loose_objects_before: report.loose_before,
        loose_objects_after: report.loose_after,
    })
}
