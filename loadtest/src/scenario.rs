//! One iteration of each scenario, as a real client would do it on the wire:
//!
//! - `clone`: `GET info/refs` (protocol v2), `POST ls-refs`, `POST fetch` of every branch head
//!   with `done`, reading the whole pack (side-band demultiplexed, bytes counted);
//! - `fetch-noop`: the same up to `ls-refs` (what an up-to-date `git fetch` costs);
//! - `push`: `GET info/refs?service=git-receive-pack`, then `POST git-receive-pack` moving the
//!   client's own branch to the other of two commits, with a tiny prebuilt pack.
//!
//! A new connection per iteration, like a new `git` process; requests within an iteration reuse it
//! (keep-alive), as git's libcurl does.

use std::time::Duration;

use thiserror::Error;

use crate::gitcli::PushPack;
use crate::http::{Conn, HttpError, Request};
use crate::proto::{self, CapsParser, FetchParser, LsRefsParser, Pkt, PktStream, ProtoError};
use crate::url::Target;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    Clone,
    FetchNoop,
    Push,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Self::Clone => "clone",
            Self::FetchNoop => "fetch-noop",
            Self::Push => "push",
        }
    }
}

#[derive(Debug, Error)]
pub enum IterError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl IterError {
    /// The key in the errors-by-kind table.
    pub fn kind(&self) -> String {
        match self {
            Self::Http(e) => e.kind(),
            Self::Proto(e) => e.kind().to_owned(),
            Self::Timeout(_) => "timeout".into(),
        }
    }
}

/// What every iteration of a run shares (read-only).
pub struct Ctx {
    pub scenario: Scenario,
    pub target: Target,
    pub push: Option<PushPack>,
    /// Branches pushed to are `refs/heads/{branch_prefix}/{slot}`.
    pub branch_prefix: String,
    pub timeout: Duration,
}

/// What one successful iteration moved.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Pack bytes received (clone) or sent (push).
    pub bytes: u64,
    /// The received pack, when the iteration was asked to capture it for `--verify`.
    pub pack: Option<Vec<u8>>,
}

/// Runs one iteration within the run's timeout. `slot` names the push branch (unique among the
/// iterations in flight); `capture` keeps the clone's pack.
///
/// # Errors
/// Whatever failed first, classified for the report.
pub async fn run_once(ctx: &Ctx, slot: &str, capture: bool) -> Result<Outcome, IterError> {
    let fut = async {
        match ctx.scenario {
            Scenario::Clone => clone(ctx, true, capture).await,
            Scenario::FetchNoop => clone(ctx, false, false).await,
            Scenario::Push => push(ctx, slot).await,
        }
    };
    match monoio::time::timeout(ctx.timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(IterError::Timeout(ctx.timeout)),
    }
}

/// Sends `req` and feeds every packet of the response body to `on_pkt`.
async fn exchange(
    conn: &mut Conn,
    ctx: &Ctx,
    req: Request<'_>,
    mut on_pkt: impl FnMut(Pkt<'_>) -> Result<(), ProtoError>,
) -> Result<(), IterError> {
    let head = conn.send(&req, &ctx.target.authority).await?;
    let mut stream = PktStream::default();
    conn.read_body(head.framing, |d| {
        stream.feed(d, |p| on_pkt(p).map_err(IterError::from))
    })
    .await?;
    if !stream.is_clean() {
        return Err(ProtoError::Truncated("a partial pkt-line at the end of the body").into());
    }
    Ok(())
}

/// A connection for the next request: the current one unless the server said it would close.
async fn ready(conn: &mut Option<Conn>, ctx: &Ctx) -> Result<(), IterError> {
    if conn.as_ref().is_none_or(|c| c.closing) {
        *conn = Some(Conn::connect(ctx.target.addr).await?);
    }
    Ok(())
}

fn headers<'a>(ctx: &'a Ctx, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut h = extra.to_vec();
    if let Some(a) = &ctx.target.authorization {
        h.push(("Authorization", a.as_str()));
    }
    h
}

async fn clone(ctx: &Ctx, fetch: bool, capture: bool) -> Result<Outcome, IterError> {
    let repo = &ctx.target.repo_path;
    let mut conn = None;

    ready(&mut conn, ctx).await?;
    let c = conn
        .as_mut()
        .ok_or(ProtoError::Truncated("no connection"))?;
    let path = format!("{repo}/info/refs?service=git-upload-pack");
    let mut caps = CapsParser::default();
    let h = headers(ctx, &[("Git-Protocol", "version=2")]);
    exchange(c, ctx, get(&path, &h), |p| caps.on_pkt(p)).await?;
    if !caps.caps.version2 || !caps.caps.ls_refs || !caps.caps.fetch {
        return Err(ProtoError::Unexpected(
            "the server did not advertise protocol v2 with ls-refs and fetch".into(),
        )
        .into());
    }

    let rpc_path = format!("{repo}/git-upload-pack");
    let h = headers(
        ctx,
        &[
            ("Git-Protocol", "version=2"),
            ("Content-Type", "application/x-git-upload-pack-request"),
            ("Accept", "application/x-git-upload-pack-result"),
        ],
    );
    let body = proto::ls_refs_request(&caps.caps).map_err(ProtoError::from)?;
    let mut refs = LsRefsParser::default();
    ready(&mut conn, ctx).await?;
    let c = conn
        .as_mut()
        .ok_or(ProtoError::Truncated("no connection"))?;
    exchange(c, ctx, post(&rpc_path, &h, &body), |p| refs.on_pkt(p)).await?;
    if !refs.done {
        return Err(ProtoError::Truncated("ls-refs without its closing flush").into());
    }
    let wants = refs.branch_wants();
    if !fetch || wants.is_empty() {
        // fetch-noop, or a clone of an empty repository: nothing more to ask.
        return Ok(Outcome::default());
    }

    let body = proto::fetch_request(&caps.caps, &wants).map_err(ProtoError::from)?;
    let mut pack = FetchParser::new(capture);
    ready(&mut conn, ctx).await?;
    let c = conn
        .as_mut()
        .ok_or(ProtoError::Truncated("no connection"))?;
    exchange(c, ctx, post(&rpc_path, &h, &body), |p| pack.on_pkt(p)).await?;
    if !pack.done || pack.pack_bytes == 0 {
        return Err(ProtoError::Truncated("fetch response without a complete packfile").into());
    }
    Ok(Outcome {
        bytes: pack.pack_bytes,
        pack: pack.capture,
    })
}

async fn push(ctx: &Ctx, slot: &str) -> Result<Outcome, IterError> {
    let pp = ctx.push.as_ref().ok_or(ProtoError::Unexpected(
        "push scenario without a pack".into(),
    ))?;
    let repo = &ctx.target.repo_path;
    let refname = format!("refs/heads/{}/{slot}", ctx.branch_prefix);
    let mut conn = None;

    ready(&mut conn, ctx).await?;
    let c = conn
        .as_mut()
        .ok_or(ProtoError::Truncated("no connection"))?;
    let path = format!("{repo}/info/refs?service=git-receive-pack");
    let h = headers(ctx, &[]);
    let mut advert = proto::ReceiveAdvertParser::default();
    exchange(c, ctx, get(&path, &h), |p| advert.on_pkt(p)).await?;
    if !advert.done {
        return Err(ProtoError::Truncated("receive-pack advertisement").into());
    }
    let old = advert
        .refs
        .iter()
        .find(|r| r.name == refname)
        .map_or(proto::ZERO_OID, |r| r.oid.as_str());
    // Alternate between the two commits so every push really moves the branch.
    let new = if old == pp.second {
        &pp.first
    } else {
        &pp.second
    };
    let body = proto::push_request(old, new, &refname, &pp.pack).map_err(ProtoError::from)?;

    let rpc_path = format!("{repo}/git-receive-pack");
    let h = headers(
        ctx,
        &[
            ("Content-Type", "application/x-git-receive-pack-request"),
            ("Accept", "application/x-git-receive-pack-result"),
        ],
    );
    let mut report = proto::ReportParser::default();
    ready(&mut conn, ctx).await?;
    let c = conn
        .as_mut()
        .ok_or(ProtoError::Truncated("no connection"))?;
    exchange(c, ctx, post(&rpc_path, &h, &body), |p| report.on_pkt(p)).await?;
    if !report.done || !report.unpack_ok || report.refs_ok != 1 {
        return Err(ProtoError::Truncated("report-status incomplete").into());
    }
    Ok(Outcome {
        bytes: pp.pack.len() as u64,
        pack: None,
    })
}

fn get<'a>(path: &'a str, headers: &'a [(&'a str, &'a str)]) -> Request<'a> {
    Request {
        method: "GET",
        path,
        headers,
        body: &[],
    }
}

fn post<'a>(path: &'a str, headers: &'a [(&'a str, &'a str)], body: &'a [u8]) -> Request<'a> {
    Request {
        method: "POST",
        path,
        headers,
        body,
    }
}
