//! Command-line surface of `gitplane-load` (clap) and its validation into a runner [`Plan`]:
//! every scenario takes the shared [`LoadArgs`] (shape, bounds, output) and its own options.
//! Every run must be bounded (`--duration` and/or `--requests`); bad combinations are refused
//! before anything connects.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use thiserror::Error;

use crate::lfs_api::MIN_OBJECT_SIZE;
use crate::runner::{Mode, Plan};
use crate::scenario::grpc::Rpc;

#[derive(Parser, Debug)]
#[command(
    name = "gitplane-load",
    version,
    about = "Load generator for Git hosting: speaks Git (smart HTTP, git://, SSH), Git LFS and \
             gRPC itself, on io_uring (monoio) and tokio"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Clone over http:// (protocol v2: info/refs, ls-refs, fetch of every branch head, the
    /// whole pack) or git:// (`git daemon`: the same conversation on the TCP stream).
    Clone(CloneArgs),
    /// An up-to-date fetch over http:// or git://: the advertisement and ls-refs only.
    FetchNoop(FetchNoopArgs),
    /// Small pushes over http://, each client to its own branch (two commits, alternated).
    Push(PushArgs),
    /// Git LFS downloads: batch API, then GET of the object, hashed and size-checked. One object
    /// of --object-size is uploaded before the run (or name one with --oid).
    LfsDownload(LfsDownloadArgs),
    /// Git LFS uploads: a new object per iteration (batch API, PUT, verify).
    LfsUpload(LfsUploadArgs),
    /// Clone over SSH (russh): a new SSH connection per iteration, `git-upload-pack` with
    /// GIT_PROTOCOL=version=2 (a v0 answer is cloned in v0).
    SshClone(SshCloneArgs),
    /// One RPC of gitplane's gRPC repository API over HTTP/2 cleartext. Each client keeps one
    /// HTTP/2 connection and makes its calls on it in turn; in open loop (--rate) the calls of a
    /// thread share one connection as concurrent streams.
    Grpc(GrpcArgs),
    /// Compare two JSON reports; exits 3 when CURRENT regressed from BASELINE.
    Compare {
        baseline: PathBuf,
        current: PathBuf,
        /// Largest tolerated drop in throughput or rise in p99.
        #[arg(long, default_value = "5%", value_parser = crate::report::parse_percent)]
        max_regression: f64,
    },
}

/// The shape, bounds and output of a run, common to every scenario.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Closed loop: this many clients, each starting its next iteration when the last ends
    /// [default: 1 when --rate is absent].
    #[arg(short, long, conflicts_with = "rate")]
    pub concurrency: Option<usize>,
    /// Open loop: start iterations at this rate (per second, e.g. 200 or 200/s), whatever the
    /// server does; latency counts from the scheduled start.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Open loop: most iterations in flight before new starts count as `client_overload` errors.
    #[arg(long, default_value_t = 10_000)]
    pub max_in_flight: usize,
    /// Stop starting iterations after this long (e.g. 30s, 2m, 500ms).
    #[arg(short, long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many iterations in all.
    #[arg(short = 'n', long)]
    pub requests: Option<u64>,
    /// Runtime threads (monoio; tokio for ssh-clone and grpc).
    #[arg(short, long, default_value_t = 1)]
    pub threads: usize,
    /// Pin runtime threads to these CPUs, round-robin (e.g. 2,3 or 2-3).
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<Vec<usize>>,
    /// Give up on one iteration after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Write the report as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write latency over time and a histogram as SVG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Compare with this JSON report; exit 3 on a regression.
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// Largest tolerated drop in throughput or rise in p99 for --compare.
    #[arg(long, default_value = "5%", value_parser = crate::report::parse_percent)]
    pub max_regression: f64,
    /// Exit 0 even when iterations failed (they are still reported).
    #[arg(long)]
    pub allow_errors: bool,
    /// No progress line.
    #[arg(short, long)]
    pub quiet: bool,
}

/// HTTP Basic credentials.
#[derive(Args, Debug, Clone)]
pub struct HttpAuth {
    /// Basic-auth user (overrides the URL's).
    #[arg(long)]
    pub user: Option<String>,
    /// Basic-auth password (overrides the URL's; prefer the environment variable).
    #[arg(long, env = "GITPLANE_LOAD_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
}

/// Checking received packs.
#[derive(Args, Debug, Clone)]
pub struct VerifyArgs {
    /// Pipe a sample of the received packs through `git index-pack` after the run; an invalid
    /// pack fails the run.
    #[arg(long)]
    pub verify: bool,
    /// How many packs `--verify` checks.
    #[arg(long, default_value_t = 3, requires = "verify")]
    pub verify_samples: usize,
}

impl VerifyArgs {
    /// Packs to keep (0 without `--verify`).
    ///
    /// # Errors
    /// `--verify-samples 0`.
    pub fn samples(&self) -> Result<usize, PlanError> {
        match (self.verify, self.verify_samples) {
            (false, _) => Ok(0),
            (true, 0) => Err(PlanError::Zero("verify-samples")),
            (true, n) => Ok(n),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct CloneArgs {
    /// http://[USER[:PASSWORD]@]HOST:PORT/OWNER/NAME.git or git://HOST[:PORT]/PATH
    #[arg(long, env = "GITPLANE_LOAD_URL")]
    pub url: String,
    #[command(flatten)]
    pub auth: HttpAuth,
    #[command(flatten)]
    pub verify: VerifyArgs,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Args, Debug, Clone)]
pub struct FetchNoopArgs {
    /// http://[USER[:PASSWORD]@]HOST:PORT/OWNER/NAME.git or git://HOST[:PORT]/PATH
    #[arg(long, env = "GITPLANE_LOAD_URL")]
    pub url: String,
    #[command(flatten)]
    pub auth: HttpAuth,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Args, Debug, Clone)]
pub struct PushArgs {
    /// http://[USER[:PASSWORD]@]HOST:PORT/OWNER/NAME.git
    #[arg(long, env = "GITPLANE_LOAD_URL")]
    pub url: String,
    #[command(flatten)]
    pub auth: HttpAuth,
    /// Branches are refs/heads/PREFIX/tTHREAD-SLOT.
    #[arg(long, default_value = "gitplane-load", value_parser = parse_branch_prefix)]
    pub branch_prefix: String,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Args, Debug, Clone)]
pub struct LfsUploadArgs {
    /// The repository: http://[USER[:PASSWORD]@]HOST:PORT/OWNER/NAME.git (the LFS endpoint is
    /// its .git/info/lfs)
    #[arg(long, env = "GITPLANE_LOAD_URL")]
    pub url: String,
    #[command(flatten)]
    pub auth: HttpAuth,
    /// Size of each object: bytes, or with K, M, G (KiB, MiB, GiB), e.g. 1M, 64M; at least 16.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub object_size: u64,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Args, Debug, Clone)]
pub struct LfsDownloadArgs {
    /// The repository: http://[USER[:PASSWORD]@]HOST:PORT/OWNER/NAME.git (the LFS endpoint is
    /// its .git/info/lfs)
    #[arg(long, env = "GITPLANE_LOAD_URL")]
    pub url: String,
    #[command(flatten)]
    pub auth: HttpAuth,
    /// Size of the object: bytes, or with K, M, G (KiB, MiB, GiB), e.g. 1M, 64M; at least 16.
    /// With --oid, the size the object is expected to have.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub object_size: u64,
    /// Download this object (SHA-256 hex, already stored for the repository) instead of
    /// uploading one before the run.
    #[arg(long, value_parser = parse_oid)]
    pub oid: Option<String>,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Args, Debug, Clone)]
pub struct SshCloneArgs {
    /// ssh://[USER@]HOST[:PORT]/PATH, e.g. ssh://git@127.0.0.1:2222/OWNER/NAME.git
    #[arg(long, env = "GITPLANE_LOAD_URL")]
    pub url: String,
    /// OpenSSH private key to authenticate with (unencrypted; Ed25519, ECDSA or RSA).
    #[arg(long, value_name = "FILE")]
    pub identity: PathBuf,
    /// Check the server's host key against this known_hosts file (entries for `[HOST]:PORT`).
    #[arg(long, value_name = "FILE", conflicts_with = "insecure_accept_host_key")]
    pub known_hosts: Option<PathBuf>,
    /// Accept any host key (exposes the load to a man in the middle; for throw-away servers).
    #[arg(long)]
    pub insecure_accept_host_key: bool,
    #[command(flatten)]
    pub verify: VerifyArgs,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Args, Debug, Clone)]
pub struct GrpcArgs {
    /// The gRPC listener and the repository: http://HOST:PORT/OWNER/NAME
    #[arg(long, env = "GITPLANE_LOAD_URL")]
    pub url: String,
    /// The RPC to call.
    #[arg(long, value_enum)]
    pub rpc: Rpc,
    /// File holding the bearer token (the server's DATA/rpc-token).
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// The bearer token itself (prefer the environment variable or --token-file).
    #[arg(long, env = "GITPLANE_LOAD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// find-commit: the revision to look up.
    #[arg(long, default_value = "HEAD")]
    pub revision: String,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("refusing to run unbounded: give --duration and/or --requests")]
    Unbounded,
    #[error("--{0} must be at least 1")]
    Zero(&'static str),
    #[error("refusing to connect without checking the host key: give --known-hosts FILE, or --insecure-accept-host-key")]
    NoHostKeyCheck,
    #[error("grpc needs the server's bearer token: give --token-file FILE (the server's DATA/rpc-token) or --token")]
    NoToken,
}

impl LoadArgs {
    /// Validates the arguments into a runner plan that keeps `verify_samples` packs.
    ///
    /// # Errors
    /// On an unbounded run or a zero count.
    pub fn plan(&self, verify_samples: usize) -> Result<Plan, PlanError> {
        if self.duration.is_none() && self.requests.is_none() {
            return Err(PlanError::Unbounded);
        }
        if self.requests == Some(0) {
            return Err(PlanError::Zero("requests"));
        }
        if self.duration == Some(Duration::ZERO) {
            return Err(PlanError::Zero("duration"));
        }
        if self.threads == 0 {
            return Err(PlanError::Zero("threads"));
        }
        let mut threads = self.threads;
        let mode = match (self.rate, self.concurrency) {
            (Some(rate), _) => {
                if self.max_in_flight == 0 {
                    return Err(PlanError::Zero("max-in-flight"));
                }
                Mode::Open {
                    rate,
                    max_in_flight: self.max_in_flight,
                }
            }
            (None, c) => {
                let concurrency = c.unwrap_or(1);
                if concurrency == 0 {
                    return Err(PlanError::Zero("concurrency"));
                }
                // A thread without a client would only idle.
                threads = threads.min(concurrency);
                Mode::Closed { concurrency }
            }
        };
        Ok(Plan {
            mode,
            timeout: self.timeout,
            threads,
            duration: self.duration,
            requests: self.requests,
            verify_samples,
            cpus: self.cpus.clone().unwrap_or_default(),
            progress: !self.quiet,
        })
    }
}

/// A branch name component for `push` (refs/heads/PREFIX/...).
///
/// # Errors
/// On anything `git check-ref-format` would refuse.
pub fn parse_branch_prefix(p: &str) -> Result<String, String> {
    if p.is_empty()
        || p.starts_with(['/', '.', '-'])
        || p.ends_with(['/', '.'])
        || p.contains("..")
        || p.contains("//")
        || p.contains(".lock")
        || p.bytes().any(|b| b <= b' ' || b"~^:?*[\\\x7f".contains(&b))
    {
        return Err(format!("`{p}` is not a valid ref component"));
    }
    Ok(p.to_owned())
}

/// `1048576`, `512K`, `1M`, `64MiB`, `2G` (binary multiples); at least [`MIN_OBJECT_SIZE`].
///
/// # Errors
/// On anything else.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 1M, 64M, 4096)"))?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use K, M or G)")),
    };
    let v = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))?;
    if v < MIN_OBJECT_SIZE {
        return Err(format!(
            "`{s}` is smaller than {MIN_OBJECT_SIZE} bytes (each object carries a 16-byte id)"
        ));
    }
    Ok(v)
}

/// A Git LFS object id: 64 lowercase hex digits.
///
/// # Errors
/// On anything else.
pub fn parse_oid(s: &str) -> Result<String, String> {
    if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "`{s}` is not a SHA-256 object id (64 lowercase hex digits)"
        ))
    }
}

/// `500ms`, `30s`, `2m`, `1h`, or a bare number of seconds.
///
/// # Errors
/// On anything else.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 30s, 2m, 500ms)"))?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1000.0,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{s}` is out of range"))
}

/// `200` or `200/s` iterations per second; must be positive.
///
/// # Errors
/// On anything else.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let n = s.trim().trim_end_matches("/s");
    match n.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("`{s}` is not a positive rate (e.g. 200/s)")),
    }
}

/// `2,3`, `0-3` or a mix.
///
/// # Errors
/// On anything else.
pub fn parse_cpus(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let bad = || format!("`{s}` is not a CPU list (e.g. 2,3 or 0-3)");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(v: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(v)
    }

    fn args(extra: &[&str]) -> Result<Cli, clap::Error> {
        let mut v = vec!["gitplane-load", "clone", "--url", "http://127.0.0.1:1/o/r"];
        v.extend_from_slice(extra);
        parse(&v)
    }

    fn plan(extra: &[&str]) -> Result<Plan, PlanError> {
        match args(extra).unwrap().command {
            Command::Clone(a) => a.load.plan(a.verify.samples()?),
            _ => unreachable!(),
        }
    }

    #[test]
    fn refuses_unbounded_and_zero() {
        assert_eq!(plan(&[]).err(), Some(PlanError::Unbounded));
        assert_eq!(plan(&["-n", "0"]).err(), Some(PlanError::Zero("requests")));
        assert_eq!(
            plan(&["-n", "1", "-c", "0"]).err(),
            Some(PlanError::Zero("concurrency"))
        );
        assert_eq!(
            plan(&["-n", "1", "-t", "0"]).err(),
            Some(PlanError::Zero("threads"))
        );
        assert_eq!(
            plan(&["-n", "1", "--verify", "--verify-samples", "0"]).err(),
            Some(PlanError::Zero("verify-samples"))
        );
        let push = |p: &str| {
            parse(&[
                "gitplane-load",
                "push",
                "--url",
                "http://h/o/r",
                "-n",
                "1",
                "--branch-prefix",
                p,
            ])
        };
        assert!(push("a..b").is_err());
        assert!(push("load/x").is_ok());
    }

    #[test]
    fn modes() {
        let p = plan(&["-d", "2s", "-c", "3", "-t", "8"]).unwrap();
        assert_eq!(p.mode, Mode::Closed { concurrency: 3 });
        assert_eq!(p.threads, 3);
        let p = plan(&["-n", "10", "--rate", "50/s"]).unwrap();
        assert!(matches!(p.mode, Mode::Open { rate, .. } if rate == 50.0));
        assert!(
            args(&["-n", "1", "--rate", "5", "-c", "2"]).is_err(),
            "rate conflicts with concurrency"
        );
        assert!(args(&["-n", "1", "--rate", "0"]).is_err());
        assert!(
            args(&["-n", "1", "--verify-samples", "2"]).is_err(),
            "requires --verify"
        );
        assert_eq!(plan(&["-n", "1", "--verify"]).unwrap().verify_samples, 3);
    }

    #[test]
    fn scenario_options() {
        let ssh = |extra: &[&str]| {
            let mut v = vec![
                "gitplane-load",
                "ssh-clone",
                "--url",
                "ssh://git@h/o/r",
                "-n",
                "1",
            ];
            v.extend_from_slice(extra);
            parse(&v)
        };
        assert!(
            ssh(&["--known-hosts", "k"]).is_err(),
            "--identity is required"
        );
        assert!(
            ssh(&[
                "--identity",
                "i",
                "--known-hosts",
                "k",
                "--insecure-accept-host-key"
            ])
            .is_err(),
            "one host key policy"
        );
        assert!(ssh(&["--identity", "i", "--insecure-accept-host-key", "--verify"]).is_ok());
        let grpc = |rpc: &str| {
            parse(&[
                "gitplane-load",
                "grpc",
                "--url",
                "http://h/o/r",
                "--rpc",
                rpc,
                "-n",
                "1",
            ])
        };
        assert!(grpc("find-commit").is_ok());
        assert!(grpc("merge").is_err());
        let lfs = |size: &str| {
            parse(&[
                "gitplane-load",
                "lfs-upload",
                "--url",
                "http://h/o/r",
                "--object-size",
                size,
                "-n",
                "1",
            ])
        };
        assert!(lfs("64M").is_ok());
        assert!(lfs("8").is_err());
        assert!(parse(&[
            "gitplane-load",
            "lfs-download",
            "--url",
            "u",
            "--oid",
            "abc",
            "-n",
            "1"
        ])
        .is_err());
        assert!(parse(&["gitplane-load", "push", "--url", "u", "--verify", "-n", "1"]).is_err());
    }

    #[test]
    fn parsers() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_cpus("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpus("3-1").is_err());
        assert_eq!(parse_rate("20/s").unwrap(), 20.0);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert!(parse_size("1T").is_err());
        assert!(parse_size("15").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_oid(&"a".repeat(64)).is_ok());
        assert!(parse_oid(&"A".repeat(64)).is_err());
    }
}
