//! The pack-objects cache: identical fetches (a CI fleet cloning the same commit, many developers
//! pulling the same push) share one `git pack-objects` run instead of each paying for their own.
//! Generating the pack is most of a clone's CPU; serving a cached one is a splice.
//!
//! git's upload-pack runs `uploadpack.packObjectsHook` in place of `git pack-objects` (the setting
//! is honoured only from protected config, which `GIT_CONFIG_COUNT` is). The hook is the running
//! gitplane binary's path alone, its settings in [`HOOK_ENV`]: a hook value with spaces or
//! quotes is run through `sh -c` by git, which cost a shell per clone. It keys each request on
//! the repository, pack-objects' arguments and its whole stdin (wants, haves, shallow boundaries): objects are immutable, so the same key
//! always describes a valid pack. Only `--include-tag` can go stale (a tag created later onto an
//! object in the pack), which `max_age` bounds, as Gitaly's cache does.
//!
//! Concurrent misses for one key are serialised by `flock`: the first generates while streaming to
//! its client and writing the entry; the others wait for the lock and then serve the entry.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::pack_cache_stats::{Counter, Stats, STATS_FILE};
use super::splice;

/// Cache settings, passed to the hook on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackCacheSettings {
    pub dir: PathBuf,
    /// An entry older than this is neither served nor kept.
    pub max_age: Duration,
    /// Beyond this many bytes of entries, the oldest are removed.
    pub max_bytes: u64,
}

/// A request whose stdin is larger than this (a fetch with a huge have list) is not cached.
const MAX_KEYED_INPUT: usize = 16 << 20;

/// Arguments that change only what pack-objects prints on stderr, not the pack: two clones that
/// differ only in `--progress` share an entry.
const STDERR_ONLY_ARGS: &[&str] = &["--progress", "--quiet", "-q", "--all-progress-implied"];

/// The variable that carries the settings to the hook (`MAX_AGE_SECS:MAX_BYTES:DIR`), and marks a
/// run of the binary as the hook.
pub const HOOK_ENV: &str = "GITPLANE_PACK_CACHE";
/// Characters for which git runs a hook command through the shell (run-command.c,
/// prepare_shell_cmd).
const SHELL_METACHARACTERS: &[char] = &[
    '|', '&', ';', '<', '>', '(', ')', '$', '`', '\\', '"', '\'', ' ', '\t', '\n', '*', '?', '[',
    '#', '~', '=', '%',
];

/// The enabled cache: None until [`enable`].
static ENABLED: RwLock<Option<Enabled>> = RwLock::new(None);
/// The server's view of the counters the hooks update.
static STATS: OnceLock<Stats> = OnceLock::new();

struct Enabled {
    /// The hook's `uploadpack.packObjectsHook` value and its [`HOOK_ENV`] value.
    hook: (OsString, OsString),
    /// The settings [`enable`] was given, its directory made absolute (the relay's cache uses
    /// them too).
    settings: PackCacheSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum PackCacheError {
    #[error("cannot create the pack cache directory {path}: {source}")]
    Prepare { path: PathBuf, source: io::Error },
    #[error("the pack-objects hook was run without a command to run")]
    NoCommand,
    #[error("cannot run {program:?}: {source}")]
    Spawn {
        program: OsString,
        source: io::Error,
    },
    #[error("pack-objects stream: {0}")]
    Io(#[from] io::Error),
}

/// Creates the cache directory and makes every upload-pack spawned from now on use the cache
/// through `exe` (the gitplane binary).
pub fn enable(exe: &Path, settings: &PackCacheSettings) -> Result<(), PackCacheError> {
    fs::create_dir_all(&settings.dir).map_err(|source| PackCacheError::Prepare {
        path: settings.dir.clone(),
        source,
    })?;
    let dir = settings
        .dir
        .canonicalize()
        .map_err(|source| PackCacheError::Prepare {
            path: settings.dir.clone(),
            source,
        })?;
    // git appends `git pack-objects ARGS`; a path without shell metacharacters (the usual
    // /proc/PID/exe) is run directly, any other through the shell, quoted.
    let exe = exe.to_string_lossy();
    let command = if exe.contains(SHELL_METACHARACTERS) {
        super::shell_quote(&exe)
    } else {
        exe.into_owned()
    };
    let mut env = format!("{}:{}:", settings.max_age.as_secs(), settings.max_bytes).into_bytes();
    env.extend_from_slice(dir.as_os_str().as_bytes());
    *ENABLED.write().unwrap_or_else(|p| p.into_inner()) = Some(Enabled {
        hook: (command.into(), OsString::from_vec(env)),
        settings: PackCacheSettings {
            dir: dir.clone(),
            ..settings.clone()
        },
    });
    match Stats::open(&dir) {
        Ok(stats) => {
            let _ = STATS.set(stats);
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "pack cache counters unavailable")
        }
    }
    Ok(())
}

/// The cache's settings, when the cache is enabled.
pub fn settings() -> Option<PackCacheSettings> {
    let enabled = ENABLED.read().unwrap_or_else(|p| p.into_inner());
    enabled.as_ref().map(|e| e.settings.clone())
}

/// The cache's counters, when the cache is enabled.
pub fn stats() -> Option<&'static Stats> {
    STATS.get()
}

/// The `uploadpack.packObjectsHook` value and the [`HOOK_ENV`] value, when the cache is enabled.
pub fn hook_command() -> Option<(OsString, OsString)> {
    let enabled = ENABLED.read().unwrap_or_else(|p| p.into_inner());
    enabled.as_ref().map(|e| e.hook.clone())
}

/// The cache key: SHA-256 over the repository's identity, the pack-shaping arguments and stdin.
/// The directory's device and inode are in it, so a repository deleted and created again under
/// the same name never gets the old one's packs.
pub fn cache_key(repo: &Path, repo_id: (u64, u64), args: &[OsString], input: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"gitplane-pack-cache-v1\0");
    h.update(repo.as_os_str().as_bytes());
    h.update(b"\0");
    h.update(repo_id.0.to_le_bytes());
    h.update(repo_id.1.to_le_bytes());
    for arg in args
        .iter()
        .filter(|a| !STDERR_ONLY_ARGS.iter().any(|s| OsStr::new(s) == *a))
    {
        // Length-prefixed, so no two argument lists hash alike.
        h.update((arg.len() as u64).to_le_bytes());
        h.update(arg.as_bytes());
    }
    h.update(b"\0stdin\0");
    h.update(input);
    hex::encode(h.finalize())
}

/// The hook's settings and command when this process was started as the hook
/// (`gitplane git pack-objects ARGS` with [`HOOK_ENV`] set), else None.
pub fn hook_invocation(
    args: &[OsString],
    env: Option<OsString>,
) -> Option<(PackCacheSettings, Vec<OsString>)> {
    let command = args
        .get(1..)
        .filter(|c| c.first().is_some_and(|p| p == "git"))?;
    let env = env?;
    let mut parts = env.as_bytes().splitn(3, |b| *b == b':');
    let mut number = || -> Option<u64> { std::str::from_utf8(parts.next()?).ok()?.parse().ok() };
    let (max_age, max_bytes) = (number()?, number()?);
    let dir = PathBuf::from(OsStr::from_bytes(parts.next()?));
    let settings = PackCacheSettings {
        dir,
        max_age: Duration::from_secs(max_age),
        max_bytes,
    };
    Some((settings, command.to_vec()))
}

/// Runs as `gitplane git pack-objects ARGS` ([`hook_invocation`]) in the repository (upload-pack's
/// working directory), with upload-pack's stdin and stdout. Returns pack-objects' exit status.
/// Anything wrong with the cache itself falls back to running pack-objects uncached: the cache
/// may only ever make a fetch faster, never fail it.
pub fn run_hook(settings: &PackCacheSettings, command: &[OsString]) -> Result<i32, PackCacheError> {
    let (program, args) = command.split_first().ok_or(PackCacheError::NoCommand)?;
    let mut input = Vec::new();
    io::stdin()
        .lock()
        .take(MAX_KEYED_INPUT as u64 + 1)
        .read_to_end(&mut input)?;
    let stdout = &mut io::stdout().lock();
    let stats = Stats::open(&settings.dir).ok();
    let count = |counter: Counter, n: u64| {
        if let Some(s) = &stats {
            s.add(counter, n);
        }
    };
    let bypass = |input: Input<'_>, stdout: &mut io::StdoutLock<'_>| {
        count(Counter::Bypassed, 1);
        generate(program, args, input, None, stdout)
    };
    let hit = |pack: File, stdout: &mut io::StdoutLock<'_>| {
        count(Counter::Hits, 1);
        let len = pack.metadata()?.len();
        count(Counter::HitBytes, len);
        serve(pack, len, stdout)
    };
    if input.len() > MAX_KEYED_INPUT {
        return bypass(Input::Rest(input), stdout);
    }
    let Some(entry) = Entry::for_request(settings, args, &input) else {
        return bypass(Input::Whole(&input), stdout);
    };
    if let Some(pack) = entry.fresh_pack(settings.max_age) {
        return hit(pack, stdout);
    }
    // Held until the entry exists or generation failed; released by the kernel if we are killed.
    let Ok(_lock) = entry.lock() else {
        return bypass(Input::Whole(&input), stdout);
    };
    if let Some(pack) = entry.fresh_pack(settings.max_age) {
        return hit(pack, stdout);
    }
    let tmp = entry.temp_file();
    let status = generate(
        program,
        args,
        Input::Whole(&input),
        tmp.as_ref().map(|(_, f)| f),
        stdout,
    )?;
    let published = tmp.is_some_and(|tmp| entry.publish(tmp, status == 0, settings));
    count(
        if published {
            Counter::Misses
        } else {
            Counter::Bypassed
        },
        1,
    );
    Ok(status)
}

/// One cache entry: `NAME.pack` when it exists, written under `NAME.lock` by one writer at a
/// time through `NAME.tmp.PID`. The relay's cache ([`super::relay_cache`]) keeps its entries here
/// too, so one disk budget and one eviction cover both.
pub(crate) struct Entry {
    pack: PathBuf,
    lock: PathBuf,
}

impl Entry {
    fn for_request(settings: &PackCacheSettings, args: &[OsString], input: &[u8]) -> Option<Self> {
        let repo = std::env::current_dir().ok()?.canonicalize().ok()?;
        let meta = fs::metadata(&repo).ok()?;
        let key = cache_key(&repo, (meta.dev(), meta.ino()), args, input);
        Some(Self::named(settings, &key))
    }

    pub(crate) fn named(settings: &PackCacheSettings, name: &str) -> Self {
        Self {
            pack: settings.dir.join(format!("{name}.pack")),
            lock: settings.dir.join(format!("{name}.lock")),
        }
    }

    /// The entry, opened, if it exists and is young enough. Opened before its age is checked, so
    /// an eviction racing with us cannot take it away mid-stream.
    pub(crate) fn fresh_pack(&self, max_age: Duration) -> Option<File> {
        let file = File::open(&self.pack).ok()?;
        let age = file.metadata().ok()?.modified().ok()?.elapsed().ok()?;
        (age < max_age).then_some(file)
    }

    /// Held until the entry exists or writing it failed; released by the kernel if we die.
    pub(crate) fn lock(&self) -> io::Result<File> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(file)
    }

    /// Where to write the entry, under [`Self::lock`].
    pub(crate) fn temp_file(&self) -> Option<(PathBuf, File)> {
        // KEY.tmp.PID: never served (not .pack), removed by eviction if a kill leaves it.
        let path = self
            .pack
            .with_extension(format!("tmp.{}", std::process::id()));
        let file = File::create(&path).ok()?;
        Some((path, file))
    }

    /// Makes the written temp file the entry when `complete`, else removes it; true if published.
    pub(crate) fn publish(
        &self,
        (tmp_path, file): (PathBuf, File),
        complete: bool,
        settings: &PackCacheSettings,
    ) -> bool {
        // Synced before the rename: after a power cut the name must never point at a torn pack.
        let published =
            complete && file.sync_data().is_ok() && fs::rename(&tmp_path, &self.pack).is_ok();
        if published {
            evict(settings);
        } else {
            let _ = fs::remove_file(&tmp_path);
        }
        published
    }
}

/// Writes a cached pack to upload-pack. Its stdout is a pipe: splice moves references to the
/// file's pages into it, so the bytes pass through neither this process nor a copy (io::copy
/// read and wrote them through StdoutLock's buffer: 20% of a serving node's CPU per SSH clone of
/// the 52 MB bench fixture), and the pipe is grown so upload-pack wakes once per MiB.
fn serve(
    mut pack: File,
    len: u64,
    stdout: &mut (impl Write + AsRawFd),
) -> Result<i32, PackCacheError> {
    stdout.flush()?;
    let out = stdout.as_raw_fd();
    splice::enlarge_pipe(out);
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    match splice::splice_exact(pack.as_raw_fd(), out, len) {
        Ok(()) => {}
        // Not a pipe (run by hand into a file or a terminal): copy what splice has not moved.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            io::copy(&mut pack, stdout)?;
            stdout.flush()?;
        }
        Err(e) => return Err(e.into()),
    }
    Ok(0)
}

enum Input<'a> {
    /// All of stdin, already read.
    Whole(&'a [u8]),
    /// The first part of stdin, already read; the rest is still to come.
    Rest(Vec<u8>),
}

/// Runs pack-objects, copying its pack to `stdout` and, when caching, to `cache`. A client that
/// goes away does not stop the cache write: the entry still serves the next fetch.
fn generate(
    program: &OsStr,
    args: &[OsString],
    input: Input<'_>,
    cache: Option<&File>,
    stdout: &mut impl Write,
) -> Result<i32, PackCacheError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|source| PackCacheError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    let mut child_in = child.stdin.take().ok_or(PackCacheError::NoCommand)?;
    let mut child_out = child.stdout.take().ok_or(PackCacheError::NoCommand)?;
    let result = std::thread::scope(|scope| {
        // pack-objects reads all of stdin before it writes, but feeding it from its own thread
        // keeps that an optimisation rather than a deadlock risk.
        let feeder = scope.spawn(move || -> io::Result<()> {
            match input {
                Input::Whole(bytes) => child_in.write_all(bytes),
                Input::Rest(head) => {
                    child_in.write_all(&head)?;
                    io::copy(&mut io::stdin().lock(), &mut child_in).map(drop)
                }
            }
        });
        let copied = tee(&mut child_out, stdout, cache);
        let fed = feeder
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("stdin feeder panicked")));
        copied.and(fed)
    });
    // Closed first: a pack-objects still writing to a client that left must not block the wait.
    drop(child_out);
    let status = child.wait()?;
    result?;
    Ok(status.code().unwrap_or(128))
}

fn tee(from: &mut impl Read, to: &mut impl Write, mut cache: Option<&File>) -> io::Result<()> {
    let mut buf = vec![0u8; 256 << 10];
    let mut client_gone = false;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if !client_gone && to.write_all(&buf[..n]).is_err() {
            client_gone = true;
        }
        if let Some(file) = cache {
            if (&*file).write_all(&buf[..n]).is_err() {
                cache = None;
            }
        }
        if client_gone && cache.is_none() {
            break;
        }
    }
    if client_gone {
        return Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "upload-pack stopped reading",
        ));
    }
    to.flush()
}

/// Removes entries past `max_age`, leftovers of killed generations, and then the oldest entries
/// until the rest fit in `max_bytes`. The counters file stays: the server keeps it mapped.
pub fn evict(settings: &PackCacheSettings) {
    let Ok(dir) = fs::read_dir(&settings.dir) else {
        return;
    };
    let now = SystemTime::now();
    let mut packs = Vec::new();
    for entry in dir.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        let age = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or_default();
        let path = entry.path();
        if entry.file_name() == STATS_FILE {
            continue;
        }
        if age >= settings.max_age {
            let _ = fs::remove_file(&path);
        } else if path.extension() == Some(OsStr::new("pack")) {
            packs.push((age, meta.len(), path));
        }
    }
    let mut total: u64 = packs.iter().map(|(_, len, _)| len).sum();
    packs.sort_by_key(|p| std::cmp::Reverse(p.0));
    for (_, len, path) in packs {
        if total <= settings.max_bytes {
            break;
        }
        if fs::remove_file(&path).is_ok() {
            total -= len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_hit_reaches_a_pipe_and_a_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let entry = dir.path().join("entry.pack");
        // Over one 1 MiB pipe's worth, so the splice loop runs more than once.
        let pack: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(&entry, &pack).unwrap();

        let (from_pipe, into_pipe) = splice::pipe().unwrap();
        let (mut from_pipe, mut into_pipe) = (File::from(from_pipe), File::from(into_pipe));
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            from_pipe.read_to_end(&mut got).unwrap();
            got
        });
        let len = pack.len() as u64;
        assert_eq!(
            serve(File::open(&entry).unwrap(), len, &mut into_pipe).unwrap(),
            0
        );
        drop(into_pipe);
        assert!(reader.join().unwrap() == pack, "the pipe got other bytes");

        // splice refuses a file on both ends (EINVAL): the copy serves it instead.
        let copy = dir.path().join("copy.pack");
        let mut out = File::create(&copy).unwrap();
        assert_eq!(
            serve(File::open(&entry).unwrap(), len, &mut out).unwrap(),
            0
        );
        assert!(fs::read(&copy).unwrap() == pack, "the file got other bytes");
    }

    #[test]
    fn the_hook_is_recognised_by_its_variable_and_command() {
        let run = args(&["/proc/1/exe", "git", "pack-objects", "--stdout", "--revs"]);
        let env = || Some(OsString::from("300:1048576:/var/cache/a:b"));
        let (settings, command) = hook_invocation(&run, env()).expect("the hook");
        assert_eq!(
            settings,
            PackCacheSettings {
                dir: PathBuf::from("/var/cache/a:b"),
                max_age: Duration::from_secs(300),
                max_bytes: 1 << 20,
            }
        );
        assert_eq!(command, run[1..].to_vec());
        // Without the variable, or not given git's command, it is the ordinary CLI.
        assert!(hook_invocation(&run, None).is_none());
        assert!(hook_invocation(&args(&["gitplane", "serve"]), env()).is_none());
        assert!(hook_invocation(&run, Some(OsString::from("x:1:/d"))).is_none());
    }

    #[test]
    fn key_ignores_progress_but_not_pack_shaping_arguments() {
        let repo = Path::new("/data/repos/a/b.git");
        let base = cache_key(repo, (1, 2), &args(&["--revs", "--thin"]), b"want\n");
        assert_eq!(base.len(), 64);
        assert_eq!(
            base,
            cache_key(
                repo,
                (1, 2),
                &args(&["--revs", "--progress", "--thin"]),
                b"want\n"
            )
        );
        for other in [
            cache_key(repo, (1, 2), &args(&["--revs"]), b"want\n"),
            cache_key(
                repo,
                (1, 2),
                &args(&["--revs", "--thin", "--filter=blob:none"]),
                b"want\n",
            ),
            cache_key(repo, (1, 2), &args(&["--revs", "--thin"]), b"want\nhave\n"),
            cache_key(repo, (1, 3), &args(&["--revs", "--thin"]), b"want\n"),
            cache_key(
                Path::new("/data/repos/a/c.git"),
                (1, 2),
                &args(&["--revs", "--thin"]),
                b"want\n",
            ),
            // Argument boundaries count: ["ab"] and ["a", "b"] differ.
            cache_key(repo, (1, 2), &args(&["--revs", "--th", "in"]), b"want\n"),
        ] {
            assert_ne!(base, other);
        }
    }

    fn settings(dir: &Path, max_age: Duration, max_bytes: u64) -> PackCacheSettings {
        PackCacheSettings {
            dir: dir.to_owned(),
            max_age,
            max_bytes,
        }
    }

    fn set_age(path: &Path, age: Duration) {
        let file = File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
    }

    #[test]
    fn eviction_drops_old_entries_then_the_oldest_over_the_size_cap() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, len: usize, age_secs: u64| {
            let path = dir.path().join(name);
            fs::write(&path, vec![0u8; len]).unwrap();
            set_age(&path, Duration::from_secs(age_secs));
        };
        write("expired.pack", 10, 400);
        write("stale.lock", 0, 400);
        write("killed.tmp.42", 10, 400);
        write("old.pack", 100, 200);
        write("mid.pack", 100, 100);
        write("new.pack", 100, 10);
        write("new.lock", 0, 10);
        evict(&settings(dir.path(), Duration::from_secs(300), 250));
        let mut left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["mid.pack", "new.lock", "new.pack"]);
    }

    #[test]
    fn fresh_pack_respects_max_age() {
        let dir = tempfile::tempdir().unwrap();
        let entry = Entry {
            pack: dir.path().join("k.pack"),
            lock: dir.path().join("k.lock"),
        };
        assert!(entry.fresh_pack(Duration::from_secs(60)).is_none());
        fs::write(&entry.pack, b"PACK").unwrap();
        assert!(entry.fresh_pack(Duration::from_secs(60)).is_some());
        set_age(&entry.pack, Duration::from_secs(120));
        assert!(entry.fresh_pack(Duration::from_secs(60)).is_none());
    }
}
