//! The Git scenarios on monoio:
//!
//! - `clone` / `fetch-noop` over smart HTTP: `GET info/refs` asking for protocol v2, then each
//!   request of the [`UploadSession`] as a `POST git-upload-pack` (`ls-refs`, then for a clone
//!   `fetch` of every branch head with `done`, reading the whole side-banded pack);
//! - `clone` / `fetch-noop` over git://: a TCP connection to `git daemon`, the daemon request
//!   line asking for v2, then the same conversation on the raw stream ([`stream::converse`]);
//! - `push` over smart HTTP: `GET info/refs?service=git-receive-pack`, then `POST
//!   git-receive-pack` moving the client's own branch to the other of two commits, with a tiny
//!   prebuilt pack.
//!
//! A new connection per iteration, like a new `git` process; HTTP requests within an iteration
//! reuse it (keep-alive), as git's libcurl does.

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::{IterError, Iteration, Outcome, Workload};
use crate::gitcli::PushPack;
use crate::http::{Link, Request};
use crate::net::NetError;
use crate::proto::{self, Advert, AdvertParser, PktStream, ProtoError};
use crate::runtime::Monoio;
use crate::stream::{self, Duplex};
use crate::upload::{Goal, Next, UploadSession};
use crate::url::{Scheme, Target};

/// Read size on a git:// connection.
const READ_CHUNK: usize = 64 * 1024;

pub enum GitOp {
    Clone,
    FetchNoop,
    /// Needs an http:// target (checked when the load is built).
    Push(PushPack),
}

/// A Git load against one repository.
pub struct GitLoad {
    pub op: GitOp,
    pub target: Target,
    /// Branches pushed to are `refs/heads/{branch_prefix}/{slot}`.
    pub branch_prefix: String,
}

impl Workload for GitLoad {
    type Rt = Monoio;
    type Client = ();

    fn client(&self) {}

    async fn iterate(&self, _client: &(), it: Iteration<'_>) -> Result<Outcome, IterError> {
        let goal = match &self.op {
            GitOp::Push(pack) => return self.push(pack, it.slot).await,
            GitOp::Clone => Goal::Clone {
                capture: it.capture,
            },
            GitOp::FetchNoop => Goal::Refs,
        };
        let session = match self.target.scheme {
            Scheme::Http => self.http_upload(goal).await?,
            Scheme::Git => self.daemon_upload(goal).await?,
        };
        Ok(Outcome {
            bytes: session.pack_bytes,
            pack: session.pack,
            protocol: session.version,
        })
    }
}

/// `extra` plus the target's `Authorization`, when it has credentials.
fn headers<'a>(target: &'a Target, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut h = extra.to_vec();
    if let Some(a) = &target.authorization {
        h.push(("Authorization", a.as_str()));
    }
    h
}

/// Sends `req` and feeds every packet of the response body to `on_pkt`.
async fn exchange(
    link: &mut Link,
    target: &Target,
    req: Request<'_>,
    mut on_pkt: impl FnMut(proto::Pkt<'_>) -> Result<(), ProtoError>,
) -> Result<(), IterError> {
    let c = link.to(target.addr).await?;
    let head = c.send(&req, &target.authority).await?;
    let mut stream = PktStream::default();
    c.read_body(head.framing, |d| {
        stream.feed(d, |p| on_pkt(p).map_err(IterError::from))
    })
    .await?;
    if !stream.is_clean() {
        return Err(ProtoError::Truncated("a partial pkt-line at the end of the body").into());
    }
    Ok(())
}

impl GitLoad {
    async fn http_upload(&self, goal: Goal) -> Result<UploadSession, IterError> {
        let target = &self.target;
        let repo = &target.repo_path;
        let mut link = Link::default();
        let mut session = UploadSession::new(goal, false);

        let path = format!("{repo}/info/refs?service=git-upload-pack");
        let h = headers(target, &[("Git-Protocol", "version=2")]);
        let get = Request {
            method: "GET",
            path: &path,
            headers: &h,
            body: &[],
        };
        exchange(&mut link, target, get, |p| session.on_pkt(p)).await?;

        let rpc_path = format!("{repo}/git-upload-pack");
        let h = headers(
            target,
            &[
                ("Git-Protocol", "version=2"),
                ("Content-Type", "application/x-git-upload-pack-request"),
                ("Accept", "application/x-git-upload-pack-result"),
            ],
        );
        loop {
            match session.next_step() {
                Some(Next::Finish(_)) => return Ok(session),
                Some(Next::Request(body)) => {
                    let post = Request {
                        method: "POST",
                        path: &rpc_path,
                        headers: &h,
                        body: &body,
                    };
                    exchange(&mut link, target, post, |p| session.on_pkt(p)).await?;
                }
                None => {
                    return Err(
                        ProtoError::Truncated("a response body without its closing flush").into(),
                    )
                }
            }
        }
    }

    async fn daemon_upload(&self, goal: Goal) -> Result<UploadSession, IterError> {
        let addr = self.target.addr;
        let stream = TcpStream::connect_addr(addr)
            .await
            .map_err(|source| NetError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let mut io = DaemonStream {
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
        };
        let hello = stream::daemon_request(&self.target.repo_path, &self.target.authority)
            .map_err(ProtoError::from)?;
        io.send(hello).await?;
        stream::converse(&mut io, goal).await
    }

    async fn push(&self, pp: &PushPack, slot: &str) -> Result<Outcome, IterError> {
        let target = &self.target;
        let repo = &target.repo_path;
        let refname = format!("refs/heads/{}/{slot}", self.branch_prefix);
        let mut link = Link::default();

        let path = format!("{repo}/info/refs?service=git-receive-pack");
        let h = headers(target, &[]);
        let mut advert = AdvertParser::default();
        let get = Request {
            method: "GET",
            path: &path,
            headers: &h,
            body: &[],
        };
        exchange(&mut link, target, get, |p| advert.on_pkt(p)).await?;
        let Advert::V0 { refs, .. } = advert.finish()? else {
            return Err(
                ProtoError::Unexpected("a v2 advertisement from receive-pack".into()).into(),
            );
        };
        let old = refs
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
            target,
            &[
                ("Content-Type", "application/x-git-receive-pack-request"),
                ("Accept", "application/x-git-receive-pack-result"),
            ],
        );
        let mut report = proto::ReportParser::default();
        let post = Request {
            method: "POST",
            path: &rpc_path,
            headers: &h,
            body: &body,
        };
        exchange(&mut link, target, post, |p| report.on_pkt(p)).await?;
        if !report.done || !report.unpack_ok || report.refs_ok != 1 {
            return Err(ProtoError::Truncated("report-status incomplete").into());
        }
        Ok(Outcome {
            bytes: pp.pack.len() as u64,
            ..Outcome::default()
        })
    }
}

/// A git:// connection: upload-pack's stdin and stdout, relayed by `git daemon`.
struct DaemonStream {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Duplex for DaemonStream {
    type Error = IterError;

    async fn send(&mut self, data: Vec<u8>) -> Result<(), IterError> {
        let (res, _) = self.stream.write_all(data).await;
        res.map_err(NetError::io("writing to git daemon"))?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<Option<&[u8]>, IterError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let (res, buf) = self.stream.read(buf).await;
        self.buf = buf;
        let n = res.map_err(NetError::io("reading from git daemon"))?;
        Ok(self.buf.get(..n).filter(|b| !b.is_empty()))
    }
}
