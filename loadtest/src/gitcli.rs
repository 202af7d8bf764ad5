//! The few things gitplane-load asks of the real `git` binary, all outside the measured path: the
//! tiny pack the `push` scenario sends (built once, before the run), and `--verify`, which pipes
//! sampled clone packs through `git index-pack` after the run.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum GitCliError {
    #[error("running `git {args}`: {source} (is git installed?)")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`git {args}` failed ({status}): {stderr}")]
    Failed {
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("creating a temporary directory: {0}")]
    TempDir(#[source] std::io::Error),
    #[error("`git {args}` printed `{output}`, not an object id")]
    BadOutput { args: String, output: String },
}

/// Runs `git ARGS` in `dir` with a predictable environment, feeding `stdin`; returns stdout.
fn git(dir: &Path, args: &[&str], stdin: &[u8]) -> Result<Vec<u8>, GitCliError> {
    let joined = args.join(" ");
    let mut child = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "gitplane-load")
        .env("GIT_AUTHOR_EMAIL", "load@gitplane.invalid")
        .env("GIT_COMMITTER_NAME", "gitplane-load")
        .env("GIT_COMMITTER_EMAIL", "load@gitplane.invalid")
        .env("GIT_AUTHOR_DATE", "2026-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2026-01-01T00:00:00Z")
        .env_remove("GIT_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| GitCliError::Spawn {
            args: joined.clone(),
            source,
        })?;
    // Small inputs here would fit a pipe, but a sampled pack may not: write from a thread so a
    // child that fills its stdout before reading all of stdin cannot deadlock us.
    let mut input = child.stdin.take();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        if let Some(i) = input.as_mut() {
            let _ = i.write_all(&data);
        }
    });
    let out = child
        .wait_with_output()
        .map_err(|source| GitCliError::Spawn {
            args: joined.clone(),
            source,
        })?;
    let _ = writer.join();
    if !out.status.success() {
        return Err(GitCliError::Failed {
            args: joined,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

fn oid(dir: &Path, args: &[&str], stdin: &[u8]) -> Result<String, GitCliError> {
    let out = git(dir, args, stdin)?;
    let s = String::from_utf8_lossy(&out).trim().to_owned();
    if s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s)
    } else {
        Err(GitCliError::BadOutput {
            args: args.join(" "),
            output: s,
        })
    }
}

/// Two commits, `first` and its child `second`, and one pack holding both. Pushes alternate a
/// branch between them, so every push is a real ref update that carries a pack.
#[derive(Debug, Clone)]
pub struct PushPack {
    pub first: String,
    pub second: String,
    pub pack: Vec<u8>,
}

/// Builds the [`PushPack`] in a throw-away repository. `seed` makes the objects unique to a run
/// if wanted (the same seed gives the same object ids).
///
/// # Errors
/// When git is missing or fails.
pub fn build_push_pack(seed: &str) -> Result<PushPack, GitCliError> {
    let tmp = tempfile::tempdir().map_err(GitCliError::TempDir)?;
    let dir = tmp.path();
    git(dir, &["init", "-q", "--bare", "."], b"")?;
    let mut commits = Vec::new();
    let mut parent: Option<String> = None;
    for i in 0..2 {
        let content = format!("gitplane-load push {seed} {i}\n").repeat(20);
        let blob = oid(dir, &["hash-object", "-w", "--stdin"], content.as_bytes())?;
        let tree = oid(
            dir,
            &["mktree"],
            format!("100644 blob {blob}\tload.txt\n").as_bytes(),
        )?;
        let mut args = vec!["commit-tree", tree.as_str(), "-m", "gitplane-load"];
        if let Some(p) = &parent {
            args.extend(["-p", p.as_str()]);
        }
        let c = oid(dir, &args, b"")?;
        parent = Some(c.clone());
        commits.push(c);
    }
    let second = commits.pop().unwrap_or_default();
    let first = commits.pop().unwrap_or_default();
    let pack = git(
        dir,
        &["pack-objects", "--revs", "--stdout", "-q"],
        format!("{second}\n").as_bytes(),
    )?;
    Ok(PushPack {
        first,
        second,
        pack,
    })
}

/// What `git index-pack` made of one pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The pack checksum index-pack printed.
    pub pack_hash: String,
    pub bytes: usize,
}

/// Pipes `pack` through `git index-pack --stdin --fix-thin` in a throw-away repository, which
/// checks the header, every object's inflation and the trailing checksum.
///
/// # Errors
/// When the pack is invalid (index-pack fails) or git cannot run.
pub fn verify_pack(pack: &[u8]) -> Result<Verified, GitCliError> {
    let tmp = tempfile::tempdir().map_err(GitCliError::TempDir)?;
    let dir = tmp.path();
    git(dir, &["init", "-q", "--bare", "."], b"")?;
    let out = git(dir, &["index-pack", "--stdin", "--fix-thin"], pack)?;
    let line = String::from_utf8_lossy(&out).trim().to_owned();
    let pack_hash = line.rsplit('\t').next().unwrap_or_default().to_owned();
    Ok(Verified {
        pack_hash,
        bytes: pack.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_pack_is_a_valid_pack_and_verify_rejects_garbage() {
        let p = build_push_pack("t").unwrap();
        assert_ne!(p.first, p.second);
        assert!(p.pack.starts_with(b"PACK"));
        let v = verify_pack(&p.pack).unwrap();
        assert_eq!(v.pack_hash.len(), 40);
        let mut bad = p.pack.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        assert!(verify_pack(&bad).is_err());
        assert!(verify_pack(b"not a pack").is_err());
    }
}
