//! The `gitplane-load` binary: parses the command line, prepares the run (target, push pack),
//! runs it, verifies sampled packs, prints and writes the report, compares with a baseline. The
//! error edge (anyhow) lives here only.
//!
//! Exit status: 0 success; 1 the run could not be made or a verified pack was invalid; 2 bad
//! arguments or a scenario not yet implemented; 3 a regression against `--compare`; 4 some
//! iterations failed (unless `--allow-errors`).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use gitplane_load::cli::{Cli, Command, RunArgs};
use gitplane_load::gitcli;
use gitplane_load::report::{compare, Report, RunInfo};
use gitplane_load::runner::{self, Mode};
use gitplane_load::scenario::{Ctx, Scenario};
use gitplane_load::url::Target;

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_REGRESSION: u8 = 3;
const EXIT_ERRORS: u8 = 4;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Clone(a) => run(Scenario::Clone, &a),
        Command::FetchNoop(a) => run(Scenario::FetchNoop, &a),
        Command::Push(a) => run(Scenario::Push, &a),
        Command::Compare {
            baseline,
            current,
            max_regression,
        } => compare_files(&baseline, &current, max_regression),
        Command::LfsDownload(_) => not_yet("lfs-download"),
        Command::LfsUpload(_) => not_yet("lfs-upload"),
        Command::SshClone(_) => not_yet("ssh-clone"),
        Command::Grpc(_) => not_yet("grpc"),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("gitplane-load: error: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn not_yet(name: &str) -> anyhow::Result<u8> {
    eprintln!(
        "gitplane-load: error: scenario `{name}` is not yet implemented \
         (implemented: clone, fetch-noop, push)"
    );
    Ok(EXIT_USAGE)
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

fn run(scenario: Scenario, args: &RunArgs) -> anyhow::Result<u8> {
    let plan = match args.plan(scenario) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("gitplane-load: error: {e}");
            return Ok(EXIT_USAGE);
        }
    };
    let target = match Target::parse(&args.url, args.user.as_deref(), args.password.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gitplane-load: error: --url: {e}");
            return Ok(EXIT_USAGE);
        }
    };
    // Read the baseline before spending minutes on a run it would reject.
    let baseline = args.compare.as_deref().map(Report::read_json).transpose()?;
    let push = if scenario == Scenario::Push {
        let seed = std::process::id().to_string();
        Some(gitcli::build_push_pack(&seed).context("building the push pack")?)
    } else {
        None
    };
    let info = RunInfo {
        scenario: scenario.name().into(),
        url: target.display_url(),
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
    let ctx = Ctx {
        scenario,
        target,
        push,
        branch_prefix: args.branch_prefix.clone(),
        timeout: args.timeout,
    };
    let out = runner::run(ctx, &plan)?;

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
    if let Some(p) = &args.json {
        report.write_json(p)?;
    }
    if let Some(p) = &args.plot {
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
        let cmp = compare(b, &report, args.max_regression);
        print!("{}", cmp.text);
        if cmp.regressed {
            return Ok(EXIT_REGRESSION);
        }
    }
    if report.errors_total > 0 && !args.allow_errors {
        eprintln!(
            "gitplane-load: error: {} of {} iterations failed (pass --allow-errors to exit 0)",
            report.errors_total,
            report.errors_total + report.ok
        );
        return Ok(EXIT_ERRORS);
    }
    Ok(0)
}
