//! GetTree (paged listings of a directory, optionally recursive) and GetBlob (a file's content
//! streamed in bounded chunks, whatever its size).
//!
//! GetBlob never holds a large blob in memory. libgit2's streaming reader (`Odb::reader`) does
//! not help here: for a loose object it mmaps the whole file (the server's RSS grows by the
//! object's size as pages are touched) and for a packed object it is not implemented at all. So:
//! - blobs up to [`SMALL_BLOB`] are read with libgit2 and sent from memory;
//! - a larger loose object is inflated from its file with a 64 KiB buffer (the loose format is
//!   just zlib over `blob SIZE\0CONTENT`);
//! - a larger packed object is streamed from `git cat-file blob ID`, read 64 KiB at a time (git
//!   streams undeltified pack entries itself; its memory is not the server's).

use std::io::{BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use bytes::Bytes;
use git2::{ObjectType, Oid, Repository, TreeWalkMode, TreeWalkResult};

use super::{decode_token, encode_token, git, page_limit, parse_oid, resolve_commit, tree_path};
use super::{Emitter, OpError, OpResult};
use crate::rpc::pb::v1 as pb;
use crate::rpc::pool::CallCtx;

const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;
/// Bytes of content per GetBlob message.
pub const CHUNK: usize = 64 << 10;
/// Blobs up to this size are read whole through libgit2.
pub const SMALL_BLOB: usize = 1 << 20;

fn kind_of(kind: Option<ObjectType>) -> pb::ObjectKind {
    match kind {
        Some(ObjectType::Blob) => pb::ObjectKind::Blob,
        Some(ObjectType::Tree) => pb::ObjectKind::Tree,
        Some(ObjectType::Commit) => pb::ObjectKind::Commit,
        _ => pb::ObjectKind::Unspecified,
    }
}

pub fn get_tree(
    repo: &Repository,
    req: &pb::GetTreeRequest,
    ctx: &CallCtx,
) -> OpResult<pb::GetTreeResponse> {
    let limit = page_limit(req.limit, DEFAULT_PAGE, MAX_PAGE);
    let path = tree_path("path", &req.path)?;
    // The token pins the tree, so later pages list the same tree even if the branch moved.
    let (tree_id, skip) = match decode_token("tree", &req.page_token)? {
        Some(t) => {
            let bad = || OpError::InvalidArgument("page_token is malformed".into());
            let (id, n) = t.split_once(':').ok_or_else(bad)?;
            (
                Oid::from_str(id).map_err(|_| bad())?,
                n.parse::<usize>().map_err(|_| bad())?,
            )
        }
        None => {
            let root = resolve_commit(repo, &req.revision)?
                .tree()
                .map_err(git("reading the root tree"))?;
            let id = if path.is_empty() {
                root.id()
            } else {
                let entry = root
                    .get_path(Path::new(&path))
                    .map_err(|_| OpError::NotFound(format!("path {path:?}")))?;
                if entry.kind() != Some(ObjectType::Tree) {
                    return Err(OpError::InvalidArgument(format!(
                        "path {path:?} is not a directory"
                    )));
                }
                entry.id()
            };
            (id, 0)
        }
    };
    let tree = repo.find_tree(tree_id).map_err(git("reading a tree"))?;
    let odb = repo.odb().map_err(git("opening the object database"))?;
    let prefix = if path.is_empty() {
        String::new()
    } else {
        format!("{path}/")
    };
    let mut entries = Vec::new();
    let mut seen = 0usize;
    let mut more = false;
    let mut failure: Option<OpError> = None;
    let mut visit = |dir: &str, e: &git2::TreeEntry<'_>| -> bool {
        seen += 1;
        if seen <= skip {
            return true;
        }
        if entries.len() == limit {
            more = true;
            return false;
        }
        if entries.len() % 256 == 0 {
            if let Err(s) = ctx.check() {
                failure = Some(s.into());
                return false;
            }
        }
        let name = String::from_utf8_lossy(e.name_bytes()).into_owned();
        let kind = kind_of(e.kind());
        let size = if kind == pb::ObjectKind::Blob {
            odb.read_header(e.id()).map(|(s, _)| s as u64).unwrap_or(0)
        } else {
            0
        };
        entries.push(pb::TreeEntry {
            path: format!("{prefix}{dir}{name}"),
            name,
            kind: kind as i32,
            mode: u32::try_from(e.filemode()).unwrap_or(0),
            id: e.id().to_string(),
            size,
        });
        true
    };
    if req.recursive {
        let walked = tree.walk(TreeWalkMode::PreOrder, |dir, e| {
            if visit(dir, e) {
                TreeWalkResult::Ok
            } else {
                TreeWalkResult::Abort
            }
        });
        // Aborting is how the callback stops the walk early (page full, deadline): libgit2 then
        // reports a callback error, which is not a failure here.
        if let Err(e) = walked {
            if !more && failure.is_none() {
                return Err(git("walking a tree")(e));
            }
        }
    } else {
        for e in tree.iter() {
            if !visit("", &e) {
                break;
            }
        }
    }
    if let Some(f) = failure {
        return Err(f);
    }
    let next_page_token = if more {
        encode_token("tree", &format!("{tree_id}:{}", skip + entries.len()))
    } else {
        String::new()
    };
    Ok(pb::GetTreeResponse {
        tree_id: tree_id.to_string(),
        entries,
        next_page_token,
    })
}

/// Which blob a GetBlob request names.
fn blob_id(repo: &Repository, req: &pb::GetBlobRequest) -> OpResult<Oid> {
    if !req.id.is_empty() {
        return parse_oid("id", &req.id);
    }
    let path = tree_path("path", &req.path)?;
    if path.is_empty() {
        return Err(OpError::InvalidArgument(
            "give either id, or revision and path".into(),
        ));
    }
    let tree = resolve_commit(repo, &req.revision)?
        .tree()
        .map_err(git("reading the root tree"))?;
    let entry = tree
        .get_path(Path::new(&path))
        .map_err(|_| OpError::NotFound(format!("path {path:?}")))?;
    if entry.kind() != Some(ObjectType::Blob) {
        return Err(OpError::InvalidArgument(format!(
            "path {path:?} is not a file"
        )));
    }
    Ok(entry.id())
}

pub fn get_blob(
    repo: &Repository,
    req: &pb::GetBlobRequest,
    git_binary: &Path,
    out: &Emitter,
) -> OpResult<()> {
    let id = blob_id(repo, req)?;
    let odb = repo.odb().map_err(git("opening the object database"))?;
    let (size, kind) = odb
        .read_header(id)
        .map_err(|_| OpError::NotFound(format!("object {id}")))?;
    if kind != ObjectType::Blob {
        return Err(OpError::InvalidArgument(format!(
            "object {id} is a {kind}, not a blob"
        )));
    }
    let size = size as u64;
    let send = if req.limit == 0 {
        size
    } else {
        size.min(req.limit)
    };
    let mut sink = ChunkSink {
        out,
        first: Some(pb::GetBlobResponse {
            id: id.to_string(),
            size,
            data: Bytes::new(),
        }),
        remaining: send,
    };
    if size as usize <= SMALL_BLOB {
        let blob = repo.find_blob(id).map_err(git("reading a blob"))?;
        let content = blob.content();
        let want = usize::try_from(send)
            .unwrap_or(usize::MAX)
            .min(content.len());
        for chunk in content[..want].chunks(CHUNK) {
            sink.send(Bytes::copy_from_slice(chunk))?;
        }
        return sink.finish();
    }
    let loose = loose_path(repo.path(), id);
    match std::fs::File::open(&loose) {
        Ok(file) => stream_loose(file, &loose, size, &mut sink),
        Err(_) => stream_cat_file(git_binary, repo.path(), id, &mut sink),
    }
}

/// Collects content into GetBlob messages; the first carries id and size.
struct ChunkSink<'a> {
    out: &'a Emitter,
    first: Option<pb::GetBlobResponse>,
    remaining: u64,
}

impl ChunkSink<'_> {
    fn wants(&self) -> usize {
        usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(CHUNK)
    }

    fn send(&mut self, data: Bytes) -> OpResult<()> {
        self.remaining -= data.len() as u64;
        let msg = match self.first.take() {
            Some(mut first) => {
                first.data = data;
                first
            }
            None => pb::GetBlobResponse {
                data,
                ..pb::GetBlobResponse::default()
            },
        };
        self.out.send(&msg)
    }

    /// Sends the metadata for an empty blob (or `limit` 0 bytes) and checks nothing is missing.
    fn finish(&mut self) -> OpResult<()> {
        if let Some(first) = self.first.take() {
            self.out.send(&first)?;
        }
        if self.remaining > 0 {
            return Err(OpError::Status(crate::rpc::status::Status::new(
                crate::rpc::status::Code::DataLoss,
                format!("blob ended {} bytes early", self.remaining),
            )));
        }
        Ok(())
    }

    /// Reads from `src` in chunks until the wanted bytes are sent.
    fn pump(&mut self, src: &mut impl Read, what: &Path) -> OpResult<()> {
        let mut buf = vec![0u8; CHUNK];
        while self.wants() > 0 {
            let want = self.wants();
            let mut filled = 0;
            while filled < want {
                let n = src
                    .read(&mut buf[filled..want])
                    .map_err(|source| OpError::Io {
                        doing: "reading blob content from",
                        path: what.to_owned(),
                        source,
                    })?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            self.send(Bytes::copy_from_slice(&buf[..filled]))?;
        }
        self.finish()
    }
}

fn loose_path(git_dir: &Path, id: Oid) -> PathBuf {
    let hex = id.to_string();
    let (dir, file) = hex.split_at(2);
    git_dir.join("objects").join(dir).join(file)
}

/// Inflates a loose object, checks its `blob SIZE\0` header, and streams the content.
fn stream_loose(
    file: std::fs::File,
    path: &Path,
    size: u64,
    sink: &mut ChunkSink<'_>,
) -> OpResult<()> {
    let mut z = flate2::read::ZlibDecoder::new(BufReader::with_capacity(CHUNK, file));
    let mut header = Vec::with_capacity(32);
    let mut byte = [0u8; 1];
    loop {
        let n = z.read(&mut byte).map_err(|source| OpError::Io {
            doing: "inflating loose object",
            path: path.to_owned(),
            source,
        })?;
        if n == 0 || header.len() > 32 {
            return Err(OpError::Status(crate::rpc::status::Status::new(
                crate::rpc::status::Code::DataLoss,
                format!("loose object {} has a corrupt header", path.display()),
            )));
        }
        if byte[0] == 0 {
            break;
        }
        header.push(byte[0]);
    }
    if header != format!("blob {size}").as_bytes() {
        return Err(OpError::Status(crate::rpc::status::Status::new(
            crate::rpc::status::Code::DataLoss,
            format!(
                "loose object {} does not hold the blob it should",
                path.display()
            ),
        )));
    }
    sink.pump(&mut z, path)
}

/// Kills and reaps the child if the stream stops early.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn stream_cat_file(
    git_binary: &Path,
    git_dir: &Path,
    id: Oid,
    sink: &mut ChunkSink<'_>,
) -> OpResult<()> {
    let mut cmd = crate::git::process::git_command(git_binary, git_dir);
    cmd.env("GIT_DIR", git_dir)
        .args(["cat-file", "blob"])
        .arg(id.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: the closure makes one async-signal-safe syscall.
    unsafe {
        cmd.pre_exec(|| {
            // CLOSE_RANGE_CLOEXEC (4): no socket or pipe of another connection may leak into git.
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 4u32) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| OpError::Io {
        doing: "starting",
        path: git_binary.to_owned(),
        source,
    })?;
    drop(cmd);
    let mut child = Reaped(child);
    let mut stdout = child
        .0
        .stdout
        .take()
        .ok_or_else(|| OpError::Status(crate::rpc::status::Status::internal("no stdout")))?;
    sink.pump(&mut stdout, Path::new("git cat-file"))
}
