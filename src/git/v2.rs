//! Protocol v2 answered without spawning git: the capability advertisement of `GET info/refs`
//! and the `ls-refs` command, the first two of a smart-HTTP v2 clone's three requests. Before
//! this, each spawned its own `git upload-pack`; `git daemon` spawns one per clone (issue #12,
//! item 6).
//!
//! - The advertisement depends only on the git binary and its configuration, so it is captured
//!   once at start-up from git itself ([`capture_advertisement`]) and served from memory.
//! - `ls-refs` is answered from the files backend (loose refs under `refs/`, then `packed-refs`,
//!   then `HEAD`), the same way git's `ls-refs.c` walks them, byte for byte.
//!
//! Whatever this module does not read exactly as git would goes to git: a repository whose own
//! config touches upload-pack, ls-refs, transfer or ref storage settings (or includes other
//! config), reftable, symlinked refs, an unusual `packed-refs`. One known difference is kept on
//! purpose: git skips a ref whose object is missing, which costs an object lookup per ref; this
//! module looks objects up only to peel tags. receive-pack checks every push's connectivity and
//! housekeeping never drops a reachable object, so such a ref means a damaged repository, which
//! `git fsck` reports.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::Path;

use gitplane_wire::git::ls_refs::{encode_ref, LsRefsRequest, RefLine};
use gitplane_wire::git::pktline::{self, PktError};

use super::process::git_command;

/// git's `SYMREF_MAXDEPTH`.
const SYMREF_MAX_DEPTH: usize = 5;
/// A loose ref file is an oid or `ref: NAME` and a newline; anything this large is not one.
const MAX_LOOSE_REF: u64 = 4096;
/// A repository config mentioning any of these may change the advertisement or the listing.
const CONFIG_NEEDS_GIT: &[&[u8]] = &[
    b"uploadpack",
    b"lsrefs",
    b"transfer",
    b"extensions",
    b"include",
];

type Oid = [u8; 40];

#[derive(Debug, thiserror::Error)]
pub enum LsRefsError {
    #[error("git must answer: {0}")]
    NeedsGit(&'static str),
    #[error("reading refs: {0}")]
    Io(#[from] io::Error),
    #[error("reading objects to peel tags: {0}")]
    Objects(#[from] git2::Error),
    #[error("encoding the answer: {0}")]
    Encode(#[from] PktError),
}

/// Runs `git upload-pack --advertise-refs --stateless-rpc` under protocol v2 once, on an empty
/// scratch repository under `scratch_parent`, with every setting gitplane's git children get:
/// the bytes it prints are what every repository's v2 `info/refs` answers.
pub fn capture_advertisement(git: &Path, scratch_parent: &Path) -> io::Result<Vec<u8>> {
    let scratch = scratch_parent.join(format!(".v2-advertisement-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let run = |cmd: &mut std::process::Command| -> io::Result<Vec<u8>> {
        let out = cmd.stdin(std::process::Stdio::null()).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "{:?} failed: {}",
                cmd.get_args().collect::<Vec<_>>(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(out.stdout)
    };
    let captured = run(git_command(git, scratch_parent)
        .args(["init", "--quiet", "--bare"])
        .arg(&scratch))
    .and_then(|_| {
        run(git_command(git, scratch_parent)
            .env("GIT_PROTOCOL", "version=2")
            .args(["upload-pack", "--advertise-refs", "--stateless-rpc"])
            .arg(&scratch))
    });
    let _ = std::fs::remove_dir_all(&scratch);
    let advertisement = captured?;
    if !advertisement.starts_with(b"000eversion 2\n") || !advertisement.ends_with(pktline::FLUSH) {
        return Err(io::Error::other(format!(
            "git did not advertise protocol v2: {}",
            advertisement.escape_ascii()
        )));
    }
    Ok(advertisement)
}

/// How a v2 `ls-refs` request body starts (clients send the command first), so a fetch is told
/// apart from its first bytes without parsing.
pub const LS_REFS_COMMAND: &[u8] = b"0014command=ls-refs\n";

/// [`capture_advertisement`], or None (logged) when git would not tell: then every
/// advertisement spawns git.
pub fn capture_or_warn(git: &Path, scratch_parent: &Path) -> Option<std::sync::Arc<[u8]>> {
    match capture_advertisement(git, scratch_parent) {
        Ok(a) => Some(a.into()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot capture git's protocol v2 advertisement; git will answer each one");
            None
        }
    }
}

/// Answers a whole `ls-refs` request body ([`answer`]); Err says why git must answer instead.
pub fn answer_body(repo_dir: &Path, body: &[u8]) -> Result<Vec<u8>, String> {
    match gitplane_wire::git::ls_refs::parse_request(body) {
        Ok(request) => answer(repo_dir, &request).map_err(|e| e.to_string()),
        Err(decline) => Err(decline.to_string()),
    }
}

/// Whether a repository's own config may make git answer differently from the server-wide
/// settings (it is read as bytes: a mention is enough to let git decide).
pub fn config_needs_git(config: &[u8]) -> bool {
    let lower = config.to_ascii_lowercase();
    CONFIG_NEEDS_GIT
        .iter()
        .any(|key| lower.windows(key.len()).any(|w| w == *key))
}

/// Answers `request` for the repository at `repo_dir` as `git upload-pack --stateless-rpc`
/// would: the ref lines, then a flush.
pub fn answer(repo_dir: &Path, request: &LsRefsRequest<'_>) -> Result<Vec<u8>, LsRefsError> {
    let config = read_small(&repo_dir.join("config"), 1 << 20)?
        .ok_or(LsRefsError::NeedsGit("no config file"))?;
    if config_needs_git(&config) {
        return Err(LsRefsError::NeedsGit(
            "the repository's config has its own settings",
        ));
    }
    if repo_dir.join("reftable").exists() {
        return Err(LsRefsError::NeedsGit("reftable"));
    }
    let refs = RefStore::read(repo_dir)?;
    let mut peeler = Peeler::new(repo_dir);
    let mut out = Vec::with_capacity(256 + refs.refs.len() * 64);

    // HEAD first, even unborn if the client asked (ls-refs.c, send_possibly_unborn_head).
    if let Some(head) = &refs.head {
        let resolved = refs.resolve(head);
        let symbolic = matches!(head, Value::Symbolic(_));
        if let Some((target, oid)) = resolved {
            let unborn = oid.is_none();
            if (!unborn || (request.unborn && request.symrefs && symbolic))
                && request.wants(b"HEAD")
            {
                let peeled = match (request.peel, oid) {
                    (true, Some(oid)) => peeler.peel(&oid, PackedPeel::Unknown)?.flatten(),
                    _ => None,
                };
                encode_ref(
                    &mut out,
                    &RefLine {
                        oid: oid.as_ref().map(|o| &o[..]),
                        name: b"HEAD",
                        symref_target: (request.symrefs && symbolic).then_some(target.as_slice()),
                        peeled: peeled.as_ref().map(|p| &p[..]),
                    },
                )?;
            }
        }
    }

    for (name, r) in &refs.refs {
        if !request.wants(name) {
            continue;
        }
        // A symbolic ref that does not resolve to an object is broken: git skips it.
        let Some((target, Some(oid))) = refs.resolve(&r.value) else {
            continue;
        };
        let symbolic = matches!(r.value, Value::Symbolic(_));
        let peeled = if request.peel {
            let known = if symbolic {
                PackedPeel::Unknown
            } else {
                r.packed_peel
            };
            match peeler.peel(&oid, known)? {
                Some(p) => p,
                // The object is missing: git skips the ref as broken.
                None => continue,
            }
        } else {
            None
        };
        encode_ref(
            &mut out,
            &RefLine {
                oid: Some(&oid),
                name,
                symref_target: (request.symrefs && symbolic).then_some(target.as_slice()),
                peeled: peeled.as_ref().map(|p| &p[..]),
            },
        )?;
    }
    out.extend_from_slice(pktline::FLUSH);
    Ok(out)
}

/// What a ref holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Oid(Oid),
    Symbolic(Vec<u8>),
}

/// What `packed-refs` says about a ref's peeled value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PackedPeel {
    /// Not recorded: the object must be read.
    Unknown,
    /// Recorded: `None` when the ref is not an annotated tag.
    Known(Option<Oid>),
}

#[derive(Debug)]
struct StoredRef {
    value: Value,
    packed_peel: PackedPeel,
}

/// A snapshot of a repository's refs in the files backend.
#[derive(Debug, Default)]
struct RefStore {
    head: Option<Value>,
    /// Every ref under `refs/`, loose over packed, in byte order (git's iteration order).
    refs: BTreeMap<Vec<u8>, StoredRef>,
}

impl RefStore {
    /// Loose refs first, then `packed-refs`: a concurrent `pack-refs` writes the packed file
    /// before it deletes the loose ones, so this order never misses a ref (git reads them in
    /// the same order for the same reason).
    fn read(repo_dir: &Path) -> Result<Self, LsRefsError> {
        let mut store = RefStore::default();
        let mut loose = Vec::new();
        walk_loose(&repo_dir.join("refs"), b"refs/", &mut loose)?;
        for (name, value) in loose {
            store.refs.insert(
                name,
                StoredRef {
                    value,
                    packed_peel: PackedPeel::Unknown,
                },
            );
        }
        if let Some(packed) = read_small(&repo_dir.join("packed-refs"), u64::MAX)? {
            for (name, oid, peel) in parse_packed_refs(&packed)? {
                store.refs.entry(name).or_insert(StoredRef {
                    value: Value::Oid(oid),
                    packed_peel: peel,
                });
            }
        }
        store.head = match read_small(&repo_dir.join("HEAD"), MAX_LOOSE_REF)? {
            Some(bytes) => parse_loose(&bytes),
            None => None,
        };
        Ok(store)
    }

    /// Follows symbolic refs to an object: the last name reached and its object, None for the
    /// object when that name does not exist (an unborn branch), None altogether when the chain
    /// is too deep.
    fn resolve(&self, value: &Value) -> Option<(Vec<u8>, Option<Oid>)> {
        let mut value = value.clone();
        let mut name = Vec::new();
        // git reads at most SYMREF_MAX_DEPTH refs, the first one included.
        for depth in 1..=SYMREF_MAX_DEPTH {
            match value {
                Value::Oid(oid) => return Some((name, Some(oid))),
                Value::Symbolic(_) if depth == SYMREF_MAX_DEPTH => return None,
                Value::Symbolic(target) => {
                    match self.refs.get(&target) {
                        Some(r) => value = r.value.clone(),
                        None => return Some((target, None)),
                    }
                    name = target;
                }
            }
        }
        None
    }
}

/// Reads every loose ref under `dir` (named `prefix` + path), skipping what git's loose-ref
/// reader skips: names starting with `.`, `*.lock`, names that are not valid ref names, and
/// files that hold neither an object id nor `ref: NAME`.
fn walk_loose(
    dir: &Path,
    prefix: &[u8],
    out: &mut Vec<(Vec<u8>, Value)>,
) -> Result<(), LsRefsError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let bytes = file_name.as_encoded_bytes();
        if bytes.starts_with(b".") || bytes.ends_with(b".lock") {
            continue;
        }
        let mut name = prefix.to_vec();
        name.extend_from_slice(bytes);
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            return Err(LsRefsError::NeedsGit("a symlinked loose ref"));
        }
        if kind.is_dir() {
            name.push(b'/');
            walk_loose(&entry.path(), &name, out)?;
        } else if is_valid_ref_name(&name) {
            // A ref deleted since the directory was listed is simply gone.
            if let Some(value) = read_small(&entry.path(), MAX_LOOSE_REF)?
                .as_deref()
                .and_then(parse_loose)
            {
                out.push((name, value));
            }
        }
    }
    Ok(())
}

/// The contents of a small file; None if it does not exist. Larger than `limit`: git decides.
fn read_small(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, LsRefsError> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut bytes = Vec::new();
    file.by_ref()
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(LsRefsError::NeedsGit("an oversized ref file"));
    }
    Ok(Some(bytes))
}

/// A loose ref's contents as git's `parse_loose_ref_contents` reads them.
fn parse_loose(bytes: &[u8]) -> Option<Value> {
    if let Some(rest) = bytes.strip_prefix(b"ref:") {
        let target = rest.trim_ascii();
        return (!target.is_empty()).then(|| Value::Symbolic(target.to_vec()));
    }
    let oid = parse_oid(bytes)?;
    match bytes.get(40) {
        None => Some(Value::Oid(oid)),
        Some(b) if b.is_ascii_whitespace() => Some(Value::Oid(oid)),
        Some(_) => None,
    }
}

/// Forty hex digits at the front of `bytes`, in lower case as git prints them (git reads
/// either case).
fn parse_oid(bytes: &[u8]) -> Option<Oid> {
    let mut oid: Oid = bytes.get(..40)?.try_into().ok()?;
    oid.make_ascii_lowercase();
    oid.iter()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        .then_some(oid)
}

/// `packed-refs` entries with what the file says about peeling (git's packed-backend.c: the
/// `peeled` trait covers `refs/tags/`, `fully-peeled` every ref).
fn parse_packed_refs(bytes: &[u8]) -> Result<Vec<(Vec<u8>, Oid, PackedPeel)>, LsRefsError> {
    let mut lines = bytes.split(|&b| b == b'\n').peekable();
    let mut fully_peeled = false;
    let mut tags_peeled = false;
    if let Some(header) = lines.next_if(|l| l.starts_with(b"# pack-refs with:")) {
        for trait_name in header[b"# pack-refs with:".len()..].split(|&b| b == b' ') {
            match trait_name {
                b"fully-peeled" => fully_peeled = true,
                b"peeled" => tags_peeled = true,
                _ => {}
            }
        }
    }
    let mut out: Vec<(Vec<u8>, Oid, PackedPeel)> = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if let Some(peeled) = line.strip_prefix(b"^") {
            let (Some(oid), Some(last)) = (parse_oid(peeled), out.last_mut()) else {
                return Err(LsRefsError::NeedsGit("an unusual packed-refs file"));
            };
            last.2 = PackedPeel::Known(Some(oid));
            continue;
        }
        let (Some(oid), Some(b' ')) = (parse_oid(line), line.get(40)) else {
            return Err(LsRefsError::NeedsGit("an unusual packed-refs file"));
        };
        let name = &line[41..];
        if !is_valid_ref_name(name) {
            return Err(LsRefsError::NeedsGit("an unusual packed-refs file"));
        }
        let known = fully_peeled || (tags_peeled && name.starts_with(b"refs/tags/"));
        let peel = if known {
            PackedPeel::Known(None)
        } else {
            PackedPeel::Unknown
        };
        out.push((name.to_vec(), oid, peel));
    }
    Ok(out)
}

/// git's `check_refname_format` for a full ref name under `refs/`.
fn is_valid_ref_name(name: &[u8]) -> bool {
    if name.is_empty()
        || name.ends_with(b".")
        || name == b"@"
        || name.windows(2).any(|w| w == b"@{")
    {
        return false;
    }
    name.split(|&b| b == b'/').all(|part| {
        !part.is_empty()
            && !part.starts_with(b".")
            && !part.ends_with(b".lock")
            && !part.windows(2).any(|w| w == b"..")
            && part.iter().all(|&b| {
                b > b' '
                    && b != 0x7f
                    && !matches!(b, b'~' | b'^' | b':' | b'?' | b'*' | b'[' | b'\\')
            })
    })
}

/// Peels annotated tags, opening the repository's objects only when a ref needs it.
struct Peeler<'a> {
    repo_dir: &'a Path,
    repo: Option<git2::Repository>,
}

impl<'a> Peeler<'a> {
    fn new(repo_dir: &'a Path) -> Self {
        Self {
            repo_dir,
            repo: None,
        }
    }

    /// What an annotated tag finally points to: `Some(None)` for an object that is not a tag,
    /// `None` when the object itself is missing. Like git's `peel_object`, a tag's target is
    /// taken from the tag (its declared type), not read.
    fn peel(&mut self, oid: &Oid, known: PackedPeel) -> Result<Option<Option<Oid>>, LsRefsError> {
        if let PackedPeel::Known(peeled) = known {
            return Ok(Some(peeled));
        }
        let repo = match &mut self.repo {
            Some(r) => r,
            None => self
                .repo
                .insert(git2::Repository::open_bare(self.repo_dir)?),
        };
        let odb = repo.odb()?;
        // `oid` is 40 validated hex digits (parse_oid).
        let id = git2::Oid::from_str(std::str::from_utf8(oid).unwrap_or_default())?;
        let kind = match odb.read_header(id) {
            Ok((_, kind)) => kind,
            Err(e) if e.code() == git2::ErrorCode::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if kind != git2::ObjectType::Tag {
            return Ok(Some(None));
        }
        let mut tag_id = id;
        // A chain of tags longer than this is not something a client can expect peeled.
        for _ in 0..64 {
            let tag = match repo.find_tag(tag_id) {
                Ok(t) => t,
                Err(e) if e.code() == git2::ErrorCode::NotFound => return Ok(Some(None)),
                Err(e) => return Err(e.into()),
            };
            if tag.target_type() != Some(git2::ObjectType::Tag) {
                let mut peeled = [0u8; 40];
                hex::encode_to_slice(tag.target_id().as_bytes(), &mut peeled)
                    .map_err(|e| LsRefsError::Io(io::Error::other(e)))?;
                return Ok(Some(Some(peeled)));
            }
            tag_id = tag.target_id();
        }
        Ok(Some(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &[u8; 40] = b"1111111111111111111111111111111111111111";
    const B: &[u8; 40] = b"2222222222222222222222222222222222222222";

    #[test]
    fn loose_refs_parse_as_git_reads_them() {
        assert_eq!(
            parse_loose(&[A.as_slice(), b"\n"].concat()),
            Some(Value::Oid(*A))
        );
        assert_eq!(parse_loose(A), Some(Value::Oid(*A)));
        assert_eq!(
            parse_loose(b"ref: refs/heads/main\n"),
            Some(Value::Symbolic(b"refs/heads/main".to_vec()))
        );
        assert_eq!(parse_loose(b"ref:\n"), None);
        assert_eq!(parse_loose(&[A.as_slice(), b"x"].concat()), None);
        let upper = b"ABCDEF0123456789ABCDEF0123456789ABCDEF01";
        assert_eq!(
            parse_loose(upper),
            Some(Value::Oid(upper.to_ascii_lowercase().try_into().unwrap()))
        );
        assert_eq!(
            parse_loose(b"g111111111111111111111111111111111111111"),
            None
        );
        assert_eq!(parse_loose(b"1234"), None);
    }

    #[test]
    fn packed_refs_traits_say_what_is_peeled() {
        let file = [
            b"# pack-refs with: peeled fully-peeled sorted \n".as_slice(),
            A,
            b" refs/heads/main\n",
            A,
            b" refs/tags/v1\n^",
            B,
            b"\n",
        ]
        .concat();
        assert_eq!(
            parse_packed_refs(&file).unwrap(),
            vec![
                (b"refs/heads/main".to_vec(), *A, PackedPeel::Known(None)),
                (b"refs/tags/v1".to_vec(), *A, PackedPeel::Known(Some(*B))),
            ]
        );
        let tags_only = [
            b"# pack-refs with: peeled \n".as_slice(),
            A,
            b" refs/heads/main\n",
            A,
            b" refs/tags/v1\n",
        ]
        .concat();
        let parsed = parse_packed_refs(&tags_only).unwrap();
        assert_eq!(parsed[0].2, PackedPeel::Unknown);
        assert_eq!(parsed[1].2, PackedPeel::Known(None));
        let no_header = [A.as_slice(), b" refs/tags/v1\n"].concat();
        assert_eq!(
            parse_packed_refs(&no_header).unwrap()[0].2,
            PackedPeel::Unknown
        );
        assert!(parse_packed_refs(b"^1111\n").is_err());
        assert!(parse_packed_refs(&[A.as_slice(), b" refs/heads/a..b\n"].concat()).is_err());
    }

    #[test]
    fn ref_names_follow_check_refname_format() {
        for good in [
            "refs/heads/main",
            "refs/tags/v1.0",
            "refs/heads/a-b_c/d",
            "refs/heads/@x",
        ] {
            assert!(is_valid_ref_name(good.as_bytes()), "{good}");
        }
        for bad in [
            "refs/heads/a..b",
            "refs/heads/.hidden",
            "refs/heads/x.lock",
            "refs/heads/a b",
            "refs/heads/a~1",
            "refs/heads/a^",
            "refs/heads/a:b",
            "refs/heads/a?",
            "refs/heads/a*",
            "refs/heads/a[",
            "refs/heads/a\\b",
            "refs/heads/a@{1}",
            "refs/heads/",
            "refs//heads",
            "refs/heads/end.",
        ] {
            assert!(!is_valid_ref_name(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn symbolic_refs_resolve_to_the_last_name_and_stop_when_too_deep() {
        let mut store = RefStore::default();
        let sym = |t: &str| StoredRef {
            value: Value::Symbolic(t.as_bytes().to_vec()),
            packed_peel: PackedPeel::Unknown,
        };
        store.refs.insert(
            b"refs/heads/main".to_vec(),
            StoredRef {
                value: Value::Oid(*A),
                packed_peel: PackedPeel::Unknown,
            },
        );
        store
            .refs
            .insert(b"refs/heads/alias".to_vec(), sym("refs/heads/main"));
        assert_eq!(
            store.resolve(&Value::Symbolic(b"refs/heads/alias".to_vec())),
            Some((b"refs/heads/main".to_vec(), Some(*A)))
        );
        assert_eq!(
            store.resolve(&Value::Symbolic(b"refs/heads/none".to_vec())),
            Some((b"refs/heads/none".to_vec(), None))
        );
        store.refs.insert(b"refs/x".to_vec(), sym("refs/x"));
        assert_eq!(store.resolve(&Value::Symbolic(b"refs/x".to_vec())), None);
    }

    #[test]
    fn configs_that_change_the_answer_go_to_git() {
        assert!(!config_needs_git(b"[core]\n\tbare = true\n"));
        assert!(config_needs_git(b"[uploadPack]\n\thideRefs = refs/x\n"));
        assert!(config_needs_git(b"[LSREFS]\nunborn = ignore\n"));
        assert!(config_needs_git(b"[extensions]\n\trefStorage = reftable\n"));
        assert!(config_needs_git(b"[include]\npath = x\n"));
    }
}
