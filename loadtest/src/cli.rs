//! Command-line surface of `gitplane-load` (clap) and its validation into a runner [`Plan`].
//! Every run must be bounded (`--duration` and/or `--requests`); bad combinations are refused
//! before anything connects.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use thiserror::Error;

use crate::runner::{Mode, Plan};
use crate::scenario::Scenario;

#[derive(Parser, Debug)]
#[command(
    name = "gitplane-load",
    version,
    about = "Load generator for Git hosting: speaks Git's smart HTTP protocol itself, on io_uring"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Protocol v2 clone: info/refs, ls-refs, fetch of every branch head, the whole pack.
    Clone(RunArgs),
    /// An up-to-date fetch: info/refs and ls-refs only.
    FetchNoop(RunArgs),
    /// Small pushes, each client to its own branch (two commits, alternated).
    Push(RunArgs),
    /// Compare two JSON reports; exits 3 when CURRENT regressed from BASELINE.
    Compare {
        baseline: PathBuf,
        current: PathBuf,
        /// Largest tolerated drop in throughput or rise in p99.
        #[arg(long, default_value = "5%", value_parser = crate::report::parse_percent)]
        max_regression: f64,
    },
    /// LFS batch + download (not yet implemented).
    LfsDownload(Unimplemented),
    /// LFS batch + upload (not yet implemented).
    LfsUpload(Unimplemented),
    /// Clone over SSH (not yet implemented).
    SshClone(Unimplemented),
    /// One gRPC call (not yet implemented).
    Grpc(Unimplemented),
}

/// Accepts any arguments, so that the "not yet implemented" error is what the user sees.
#[derive(Args, Debug)]
pub struct Unimplemented {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Repository URL: http://[USER[:PASSWORD]@]HOST:PORT/OWNER/NAME.git
    #[arg(long, env = "GITPLANE_LOAD_URL")]
    pub url: String,
    /// Basic-auth user (overrides the URL's).
    #[arg(long)]
    pub user: Option<String>,
    /// Basic-auth password (overrides the URL's; prefer the environment variable).
    #[arg(long, env = "GITPLANE_LOAD_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
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
    /// monoio runtime threads.
    #[arg(short, long, default_value_t = 1)]
    pub threads: usize,
    /// Pin runtime threads to these CPUs, round-robin (e.g. 2,3 or 2-3).
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<Vec<usize>>,
    /// Give up on one iteration after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// clone: pipe a sample of the received packs through `git index-pack` after the run; an
    /// invalid pack fails the run.
    #[arg(long)]
    pub verify: bool,
    /// How many packs `--verify` checks.
    #[arg(long, default_value_t = 3, requires = "verify")]
    pub verify_samples: usize,
    /// push: branches are refs/heads/PREFIX/tTHREAD-SLOT.
    #[arg(long, default_value = "gitplane-load")]
    pub branch_prefix: String,
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

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("refusing to run unbounded: give --duration and/or --requests")]
    Unbounded,
    #[error("--{0} must be at least 1")]
    Zero(&'static str),
    #[error("--verify only applies to the clone scenario")]
    VerifyNotClone,
    #[error("--branch-prefix `{0}` is not a valid ref component")]
    BadPrefix(String),
}

impl RunArgs {
    /// Validates the arguments into a runner plan.
    ///
    /// # Errors
    /// On an unbounded run, a zero count, or an option that does not fit the scenario.
    pub fn plan(&self, scenario: Scenario) -> Result<Plan, PlanError> {
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
        if self.verify && scenario != Scenario::Clone {
            return Err(PlanError::VerifyNotClone);
        }
        if self.verify && self.verify_samples == 0 {
            return Err(PlanError::Zero("verify-samples"));
        }
        let p = &self.branch_prefix;
        if p.is_empty()
            || p.starts_with(['/', '.', '-'])
            || p.ends_with(['/', '.'])
            || p.contains("..")
            || p.contains("//")
            || p.contains(".lock")
            || p.bytes().any(|b| b <= b' ' || b"~^:?*[\\\x7f".contains(&b))
        {
            return Err(PlanError::BadPrefix(p.clone()));
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
            threads,
            duration: self.duration,
            requests: self.requests,
            verify_samples: if self.verify { self.verify_samples } else { 0 },
            cpus: self.cpus.clone().unwrap_or_default(),
            progress: !self.quiet,
        })
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

    fn args(extra: &[&str]) -> Result<Cli, clap::Error> {
        let mut v = vec!["gitplane-load", "clone", "--url", "http://127.0.0.1:1/o/r"];
        v.extend_from_slice(extra);
        Cli::try_parse_from(v)
    }

    fn plan(extra: &[&str]) -> Result<Plan, PlanError> {
        match args(extra).unwrap().command {
            Command::Clone(a) => a.plan(Scenario::Clone),
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
        assert!(matches!(
            plan(&["-n", "1", "--branch-prefix", "a..b"]).err(),
            Some(PlanError::BadPrefix(_))
        ));
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
    }
}
