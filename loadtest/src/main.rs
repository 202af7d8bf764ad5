//! The `gitplane-load` binary: parses the command line, prepares the run (target, push pack,
//! the object to download, SSH keys, the gRPC request), runs it, verifies sampled packs, prints
//! and writes the report, compares with a baseline. The error edge (anyhow) lives here only.
//!
//! Exit status: 0 success; 1 the run could not be made or a verified pack was invalid; 2 bad
//! arguments; 3 a regression against `--compare`; 4 some iterations failed (unless
//! `--allow-errors`).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use gitplane_load::cli::{
    Cli, CloneArgs, Command, FetchNoopArgs, GrpcArgs, HttpAuth, LfsDownloadArgs, LfsUploadArgs,
    LoadArgs, PlanError, PushArgs, SshCloneArgs,
};
use gitplane_load::gitcli;
use gitplane_load::report::{compare, Report, RunInfo};
use gitplane_load::runner::{self, Mode, Plan};
use gitplane_load::runtime::{Monoio, Rt};
use gitplane_load::scenario::git::{GitLoad, GitOp};
use gitplane_load::scenario::grpc::GrpcLoad;
use gitplane_load::scenario::lfs::{LfsDownload, LfsUpload, Stored};
use gitplane_load::scenario::ssh::{HostKeyPolicy, SshLoad};
use gitplane_load::scenario::{Scenario, Workload};
use gitplane_load::url::{Scheme, SshTarget, Target};

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_REGRESSION: u8 = 3;
const EXIT_ERRORS: u8 = 4;

/// Why a command did not run to its report.
enum Failure {
    /// Refused before anything connected (exit 2).
    Usage(String),
    /// The run could not be made (exit 1).
    Run(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::Run(e)
    }
}

/// Turns an argument error into a [`Failure::Usage`].
trait OrUsage<T> {
    fn usage(self) -> Result<T, Failure>;
}

impl<T, E: std::fmt::Display> OrUsage<T> for Result<T, E> {
    fn usage(self) -> Result<T, Failure> {
        self.map_err(|e| Failure::Usage(e.to_string()))
    }
}

type Outcome = Result<u8, Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Clone(a) => clone(&a),
        Command::FetchNoop(a) => fetch_noop(&a),
        Command::Push(a) => push(&a),
        Command::LfsUpload(a) => lfs_upload(&a),
        Command::LfsDownload(a) => lfs_download(&a),
        Command::SshClone(a) => ssh_clone(&a),
        Command::Grpc(a) => grpc(&a),
        Command::Compare {
            baseline,
            current,
            max_regression,
        } => compare_files(&baseline, &current, max_regression).map_err(Failure::Run),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Failure::Usage(msg)) => {
            eprintln!("gitplane-load: error: {msg}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Run(e)) => {
            eprintln!("gitplane-load: error: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn compare_files(
    baseline: &std::path::Path,
    current: &std::path::Path,
    max: f64,
) -> anyhow::Result<u8> {
    let b = Report::read_json(baseline)?;
    let c = Report::read_json(current)?;
    let cmp = compare(&b, &c, max);
    print!("{}", cmp.text);
    Ok(if cmp.regressed { EXIT_REGRESSION } else { 0 })
}

fn http_target(url: &str, auth: &HttpAuth) -> Result<Target, Failure> {
    Target::parse(url, auth.user.as_deref(), auth.password.as_deref())
        .map_err(|e| Failure::Usage(format!("--url: {e}")))
}

/// `scenario` speaks HTTP only.
fn require_http(target: &Target, scenario: Scenario) -> Result<(), Failure> {
    match target.scheme {
        Scheme::Http => Ok(()),
        Scheme::Git => Err(Failure::Usage(format!(
            "{} needs an http:// URL (git:// serves clone and fetch-noop only)",
            scenario.name()
        ))),
    }
}

fn clone(a: &CloneArgs) -> Outcome {
    let plan = a.load.plan(a.verify.samples().usage()?).usage()?;
    let target = http_target(&a.url, &a.auth)?;
    let url = target.display_url();
    let work = GitLoad {
        op: GitOp::Clone,
        target,
        branch_prefix: String::new(),
    };
    Ok(execute(Scenario::Clone, work, url, &a.load, &plan)?)
}

fn fetch_noop(a: &FetchNoopArgs) -> Outcome {
    let plan = a.load.plan(0).usage()?;
    let target = http_target(&a.url, &a.auth)?;
    let url = target.display_url();
    let work = GitLoad {
        op: GitOp::FetchNoop,
        target,
        branch_prefix: String::new(),
    };
    Ok(execute(Scenario::FetchNoop, work, url, &a.load, &plan)?)
}

fn push(a: &PushArgs) -> Outcome {
    let plan = a.load.plan(0).usage()?;
    let target = http_target(&a.url, &a.auth)?;
    require_http(&target, Scenario::Push)?;
    let url = target.display_url();
    let seed = std::process::id().to_string();
    let pack = gitcli::build_push_pack(&seed).context("building the push pack")?;
    let work = GitLoad {
        op: GitOp::Push(pack),
        target,
        branch_prefix: a.branch_prefix.clone(),
    };
    Ok(execute(Scenario::Push, work, url, &a.load, &plan)?)
}

/// A number no earlier run used, so uploaded objects are new to the server.
fn run_nonce() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

fn lfs_upload(a: &LfsUploadArgs) -> Outcome {
    let plan = a.load.plan(0).usage()?;
    let target = http_target(&a.url, &a.auth)?;
    require_http(&target, Scenario::LfsUpload)?;
    let url = target.display_url();
    let work = LfsUpload::new(target, a.object_size, run_nonce());
    Ok(execute(Scenario::LfsUpload, work, url, &a.load, &plan)?)
}

fn lfs_download(a: &LfsDownloadArgs) -> Outcome {
    let plan = a.load.plan(0).usage()?;
    let target = http_target(&a.url, &a.auth)?;
    require_http(&target, Scenario::LfsDownload)?;
    let url = target.display_url();
    let object = match &a.oid {
        Some(oid) => Stored {
            oid: oid.clone(),
            size: a.object_size,
        },
        // Outside the measured window: the one object every iteration downloads.
        None => {
            let seed = LfsUpload::new(target.clone(), a.object_size, run_nonce());
            Monoio::block_on(seed.upload())
                .context("starting a runtime for the upload before the run")?
                .context("uploading the object to download")?
        }
    };
    if !a.load.quiet {
        eprintln!(
            "gitplane-load: downloading object {} ({} bytes)",
            object.oid, object.size
        );
    }
    let work = LfsDownload::new(target, object);
    Ok(execute(Scenario::LfsDownload, work, url, &a.load, &plan)?)
}

fn ssh_clone(a: &SshCloneArgs) -> Outcome {
    let plan = a.load.plan(a.verify.samples().usage()?).usage()?;
    let policy = match (&a.known_hosts, a.insecure_accept_host_key) {
        (Some(path), _) => HostKeyPolicy::KnownHosts(path.clone()),
        (None, true) => HostKeyPolicy::AcceptAny,
        (None, false) => return Err(PlanError::NoHostKeyCheck).usage(),
    };
    let target = SshTarget::parse(&a.url).map_err(|e| Failure::Usage(format!("--url: {e}")))?;
    let url = target.display_url();
    let work = SshLoad::new(target, &a.identity, policy).usage()?;
    Ok(execute(Scenario::SshClone, work, url, &a.load, &plan)?)
}

fn grpc(a: &GrpcArgs) -> Outcome {
    let plan = a.load.plan(0).usage()?;
    let token = match (&a.token_file, &a.token) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map_err(|e| Failure::Usage(format!("--token-file {}: {e}", path.display())))?,
        (None, Some(t)) => t.clone(),
        (None, None) => return Err(PlanError::NoToken).usage(),
    };
    let target =
        Target::parse(&a.url, None, None).map_err(|e| Failure::Usage(format!("--url: {e}")))?;
    require_http(&target, Scenario::Grpc)?;
    let work = GrpcLoad::new(&target, a.rpc, &token, &a.revision).usage()?;
    let url = work.display_url().to_owned();
    Ok(execute(Scenario::Grpc, work, url, &a.load, &plan)?)
}

/// Runs `work` as `plan` says and reports: verification of sampled packs after the measured
/// window, text and JSON report, plot, comparison, exit status.
fn execute<W: Workload>(
    scenario: Scenario,
    work: W,
    url: String,
    load: &LoadArgs,
    plan: &Plan,
) -> anyhow::Result<u8> {
    // Read the baseline before spending minutes on a run it would reject.
    let baseline = load.compare.as_deref().map(Report::read_json).transpose()?;
    let info = RunInfo {
        scenario: scenario.name().into(),
        url,
        concurrency: match plan.mode {
            Mode::Closed { concurrency } => Some(concurrency),
            Mode::Open { .. } => None,
        },
        rate: match plan.mode {
            Mode::Open { rate, .. } => Some(rate),
            Mode::Closed { .. } => None,
        },
        threads: plan.threads,
    };
    let out = runner::run(work, plan)?;

    // Verification runs after the measured window so it cannot perturb the figures.
    let mut verified = 0;
    let mut invalid = Vec::new();
    for pack in &out.packs {
        match gitcli::verify_pack(pack) {
            Ok(_) => verified += 1,
            Err(e) => invalid.push(e.to_string()),
        }
    }
    let report = Report::build(info, &out.recorder, out.elapsed, verified);
    print!("{}", report.text());
    if let Some(p) = &load.json {
        report.write_json(p)?;
    }
    if let Some(p) = &load.plot {
        std::fs::write(p, gitplane_load::plot::svg(&report))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if plan.verify_samples > 0 {
        if !invalid.is_empty() {
            for e in &invalid {
                eprintln!("gitplane-load: invalid pack: {e}");
            }
            eprintln!(
                "gitplane-load: error: {} sampled pack(s) failed git index-pack",
                invalid.len()
            );
            return Ok(EXIT_FAILED);
        }
        if verified == 0 {
            eprintln!("gitplane-load: error: --verify: no pack was received to verify");
            return Ok(EXIT_FAILED);
        }
    }
    if let Some(b) = &baseline {
        let cmp = compare(b, &report, load.max_regression);
        print!("{}", cmp.text);
        if cmp.regressed {
            return Ok(EXIT_REGRESSION);
        }
    }
    if report.errors_total > 0 && !load.allow_errors {
        eprintln!(
            "gitplane-load: error: {} of {} iterations failed (pass --allow-errors to exit 0)",
            report.errors_total,
            report.errors_total + report.ok
        );
        return Ok(EXIT_ERRORS);
    }
    Ok(0)
}
