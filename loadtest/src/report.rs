//! The run's report: built once from the merged [`Recorder`], printed as text, written as JSON
//! (`--json`), and compared with a baseline report (`--compare`, `gitplane-load compare`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::stats::Recorder;

#[derive(Debug, Error)]
pub enum ReportError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a gitplane-load JSON report: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding the report: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// One second of the timeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Second {
    pub t: u64,
    pub ok: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// One bar of the latency histogram: `count` iterations took at most `le_ms` (and more than the
/// previous bar's bound).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Bin {
    pub le_ms: f64,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub tool: String,
    pub scenario: String,
    pub url: String,
    /// `closed` or `open`.
    pub mode: String,
    pub concurrency: Option<usize>,
    pub rate: Option<f64>,
    pub threads: usize,
    pub elapsed_s: f64,
    pub ok: u64,
    pub errors_total: u64,
    pub errors: BTreeMap<String, u64>,
    /// Successful iterations per second.
    pub throughput: f64,
    pub bytes: u64,
    pub bytes_per_s: f64,
    pub latency_ms: Latency,
    #[serde(default)]
    pub verified_packs: usize,
    #[serde(default)]
    pub error_samples: Vec<String>,
    /// Git scenarios: successful iterations by protocol version (`v2`, `v0`).
    #[serde(default)]
    pub protocols: BTreeMap<String, u64>,
    #[serde(default)]
    pub timeline: Vec<Second>,
    #[serde(default)]
    pub histogram: Vec<Bin>,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn quantile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        ms(h.value_at_quantile(q))
    }
}

/// What the report header says about the run's shape.
pub struct RunInfo {
    pub scenario: String,
    pub url: String,
    pub concurrency: Option<usize>,
    pub rate: Option<f64>,
    pub threads: usize,
}

impl Report {
    pub fn build(info: RunInfo, rec: &Recorder, elapsed: Duration, verified_packs: usize) -> Self {
        let h = &rec.latency;
        let secs = elapsed.as_secs_f64().max(1e-9);
        let latency_ms = if h.is_empty() {
            Latency::default()
        } else {
            Latency {
                min: ms(h.min()),
                mean: h.mean() / 1000.0,
                p50: quantile_ms(h, 0.5),
                p90: quantile_ms(h, 0.9),
                p99: quantile_ms(h, 0.99),
                p999: quantile_ms(h, 0.999),
                max: ms(h.max()),
            }
        };
        let timeline = rec
            .timeline
            .iter()
            .enumerate()
            .map(|(t, b)| Second {
                t: t as u64,
                ok: b.ok,
                errors: b.errors,
                p50_ms: quantile_ms(&b.latency, 0.5),
                p99_ms: quantile_ms(&b.latency, 0.99),
                max_ms: if b.latency.is_empty() {
                    0.0
                } else {
                    ms(b.latency.max())
                },
            })
            .collect();
        Self {
            tool: format!("gitplane-load {}", env!("CARGO_PKG_VERSION")),
            mode: if info.rate.is_some() {
                "open"
            } else {
                "closed"
            }
            .into(),
            scenario: info.scenario,
            url: info.url,
            concurrency: info.concurrency,
            rate: info.rate,
            threads: info.threads,
            elapsed_s: elapsed.as_secs_f64(),
            ok: rec.ok,
            errors_total: rec.error_count(),
            errors: rec.errors.clone(),
            throughput: rec.ok as f64 / secs,
            bytes: rec.bytes,
            bytes_per_s: rec.bytes as f64 / secs,
            latency_ms,
            verified_packs,
            error_samples: rec.samples.clone(),
            protocols: rec
                .protocols
                .iter()
                .map(|(v, n)| (format!("v{v}"), *n))
                .collect(),
            timeline,
            histogram: bins(h),
        }
    }

    /// The human summary printed at the end of a run.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let shape = match (self.concurrency, self.rate) {
            (_, Some(r)) => format!("open loop at {r}/s"),
            (Some(c), None) => format!("closed loop, {c} clients"),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "{} {} against {} ({shape}, {} threads), {:.2} s",
            self.tool, self.scenario, self.url, self.threads, self.elapsed_s
        );
        let _ = writeln!(
            s,
            "  requests   {} ok, {} errors\n  throughput {:.1}/s, {:.2} MB/s ({} bytes)",
            self.ok,
            self.errors_total,
            self.throughput,
            self.bytes_per_s / 1e6,
            self.bytes
        );
        let l = &self.latency_ms;
        let _ = writeln!(
            s,
            "  latency ms min {:.2}  mean {:.2}  p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            l.min, l.mean, l.p50, l.p90, l.p99, l.p999, l.max
        );
        if !self.protocols.is_empty() {
            let by: Vec<String> = self
                .protocols
                .iter()
                .map(|(v, n)| format!("{v} {n}"))
                .collect();
            let _ = writeln!(s, "  protocol   {}", by.join(", "));
        }
        if self.verified_packs > 0 {
            let _ = writeln!(
                s,
                "  verified   {} packs with git index-pack",
                self.verified_packs
            );
        }
        if !self.errors.is_empty() {
            let _ = writeln!(s, "  errors by kind:");
            for (k, v) in &self.errors {
                let _ = writeln!(s, "    {k:<20} {v}");
            }
            for e in &self.error_samples {
                let _ = writeln!(s, "    e.g. {e}");
            }
        }
        s
    }

    /// # Errors
    /// When the file cannot be written.
    pub fn write_json(&self, path: &Path) -> Result<(), ReportError> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n").map_err(|source| ReportError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    /// # Errors
    /// When the file cannot be read or is not a report.
    pub fn read_json(path: &Path) -> Result<Self, ReportError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ReportError::Parse {
            path: path.display().to_string(),
            source,
        })
    }
}

/// Log-spaced bins, 4 per power of ten, the first ending at 10 µs: each recorded value lands in
/// exactly one bin (the first whose bound is at least the value).
fn bins(h: &Histogram<u64>) -> Vec<Bin> {
    if h.is_empty() {
        return Vec::new();
    }
    let bound_us = |k: usize| 10.0 * 10f64.powf(k as f64 / 4.0);
    let index = |us: u64| -> usize {
        if us <= 10 {
            0
        } else {
            ((us as f64 / 10.0).log10() * 4.0).ceil() as usize
        }
    };
    let mut counts: Vec<u64> = Vec::new();
    for v in h.iter_recorded() {
        let i = index(h.highest_equivalent(v.value_iterated_to()).min(h.max()));
        if counts.len() <= i {
            counts.resize(i + 1, 0);
        }
        counts[i] += v.count_at_value();
    }
    let first = counts.iter().position(|&c| c > 0).unwrap_or(0);
    counts
        .iter()
        .enumerate()
        .skip(first)
        .map(|(k, &count)| Bin {
            le_ms: bound_us(k) / 1000.0,
            count,
        })
        .collect()
}

/// The verdict of comparing a run with a baseline.
#[derive(Debug)]
pub struct Comparison {
    pub text: String,
    pub regressed: bool,
}

/// Throughput down by more than `max` (a fraction: 0.05 is 5 %) or p99 up by more than `max`
/// is a regression. An equal run never regresses.
pub fn compare(baseline: &Report, current: &Report, max: f64) -> Comparison {
    let mut text = String::new();
    let mut regressed = false;
    let tp_change = relative(baseline.throughput, current.throughput);
    let tp_bad = current.throughput < baseline.throughput * (1.0 - max);
    let p99_change = relative(baseline.latency_ms.p99, current.latency_ms.p99);
    let p99_bad = current.latency_ms.p99 > baseline.latency_ms.p99 * (1.0 + max);
    let mark = |bad: bool| if bad { "REGRESSION" } else { "ok" };
    let _ = writeln!(
        text,
        "compare with baseline (max regression {:.1}%):",
        max * 100.0
    );
    let _ = writeln!(
        text,
        "  throughput {:>10.2}/s -> {:>10.2}/s  {:+.1}%  {}",
        baseline.throughput,
        current.throughput,
        tp_change * 100.0,
        mark(tp_bad)
    );
    let _ = writeln!(
        text,
        "  p99        {:>10.2}ms -> {:>10.2}ms {:+.1}%  {}",
        baseline.latency_ms.p99,
        current.latency_ms.p99,
        p99_change * 100.0,
        mark(p99_bad)
    );
    if baseline.scenario != current.scenario {
        let _ = writeln!(
            text,
            "  note: comparing scenario {} with baseline scenario {}",
            current.scenario, baseline.scenario
        );
    }
    regressed |= tp_bad || p99_bad;
    Comparison { text, regressed }
}

fn relative(base: f64, now: f64) -> f64 {
    if base == 0.0 {
        0.0
    } else {
        now / base - 1.0
    }
}

/// Parses `5%`, `5` (percent) or `0.05%`; returns a fraction.
///
/// # Errors
/// On anything else, or a negative value.
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let n = s.trim().trim_end_matches('%');
    let v: f64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a percentage (e.g. 5%)"))?;
    if !(0.0..=1000.0).contains(&v) {
        return Err(format!("`{s}` is out of range (0% to 1000%)"));
    }
    Ok(v / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn report(throughput_scale: u64, latency_us: u64) -> Report {
        let start = Instant::now();
        let mut rec = Recorder::new(start);
        for _ in 0..100 * throughput_scale {
            rec.success(start, Duration::from_micros(latency_us), 10);
        }
        let info = RunInfo {
            scenario: "clone".into(),
            url: "http://x/o/r".into(),
            concurrency: Some(4),
            rate: None,
            threads: 1,
        };
        Report::build(info, &rec, Duration::from_secs(10), 0)
    }

    #[test]
    fn equal_runs_pass_and_regressions_fail() {
        let base = report(2, 1000);
        assert!(!compare(&base, &base, 0.05).regressed);
        let slower = report(1, 1000);
        let c = compare(&base, &slower, 0.05);
        assert!(c.regressed, "{}", c.text);
        let laggier = report(2, 2000);
        assert!(compare(&base, &laggier, 0.05).regressed);
        // Better is never a regression.
        assert!(!compare(&slower, &base, 0.05).regressed);
    }

    #[test]
    fn json_round_trips() {
        let r = report(1, 1500);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        r.write_json(&p).unwrap();
        assert_eq!(Report::read_json(&p).unwrap(), r);
        assert!(r.histogram.iter().map(|b| b.count).sum::<u64>() == 100);
        assert!((r.latency_ms.p99 - 1.5).abs() < 0.01);
    }

    #[test]
    fn percentages() {
        assert_eq!(parse_percent("5%").unwrap(), 0.05);
        assert_eq!(parse_percent("10").unwrap(), 0.1);
        assert!(parse_percent("x").is_err());
        assert!(parse_percent("-1%").is_err());
    }
}
