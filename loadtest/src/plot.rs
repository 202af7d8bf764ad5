//! `--plot FILE.svg`: a hand-written SVG with two panels drawn from a [`Report`]: latency over
//! time (p50, p99 and max per second, with completions per second as grey bars) and the latency
//! histogram on log-spaced bins. No plotting crate: the picture is simple and the file must open
//! in any browser.

use std::fmt::Write as _;

use crate::report::Report;

const W: f64 = 900.0;
const PANEL_H: f64 = 260.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const GAP: f64 = 70.0;

/// Renders `report` as an SVG document.
pub fn svg(report: &Report) -> String {
    let height = TOP + 2.0 * PANEL_H + GAP + 50.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="20" font-size="14">{} {}: {} ok, {} errors, {:.1}/s, p99 {:.2} ms</text>"#,
        escape(&report.scenario),
        escape(&report.url),
        report.ok,
        report.errors_total,
        report.throughput,
        report.latency_ms.p99
    );
    timeline(&mut s, report, TOP);
    histogram(&mut s, report, TOP + PANEL_H + GAP);
    s.push_str("</svg>\n");
    s
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn axes(s: &mut String, top: f64, title: &str, xlabel: &str, ylabel: &str) {
    let bottom = top + PANEL_H;
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="{}" font-weight="bold">{title}</text>"#,
        top - 8.0
    );
    let _ = writeln!(
        s,
        r#"<line x1="{LEFT}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="black"/><line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{bottom}" stroke="black"/>"#,
        W - RIGHT
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{xlabel}</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        bottom + 32.0
    );
    let _ = writeln!(
        s,
        r#"<text x="15" y="{}" transform="rotate(-90 15 {})" text-anchor="middle">{ylabel}</text>"#,
        top + PANEL_H / 2.0,
        top + PANEL_H / 2.0
    );
}

/// A "nice" axis maximum at or above `v`.
fn nice(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn timeline(s: &mut String, r: &Report, top: f64) {
    axes(
        s,
        top,
        "Latency over time",
        "seconds since start",
        "latency (ms)",
    );
    let bottom = top + PANEL_H;
    let n = r.timeline.len().max(1) as f64;
    let xw = (W - LEFT - RIGHT) / n;
    let ymax = nice(r.timeline.iter().map(|b| b.max_ms).fold(0.0, f64::max));
    let cmax = nice(
        r.timeline
            .iter()
            .map(|b| b.ok + b.errors)
            .max()
            .unwrap_or(0) as f64,
    );
    let y = |v: f64| bottom - v / ymax * PANEL_H;
    for i in 0..=4 {
        let v = ymax * f64::from(i) / 4.0;
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{v:.1}</text><line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="#eee"/>"##,
            LEFT - 5.0,
            y(v) + 4.0,
            y(v),
            W - RIGHT,
            y(v)
        );
    }
    for (i, b) in r.timeline.iter().enumerate() {
        let h = (b.ok + b.errors) as f64 / cmax * PANEL_H * 0.9;
        let _ = writeln!(
            s,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#ddd"><title>{}s: {} ok, {} errors</title></rect>"##,
            LEFT + i as f64 * xw + 1.0,
            bottom - h,
            (xw - 2.0).max(0.5),
            b.t,
            b.ok,
            b.errors
        );
        if b.errors > 0 {
            let eh = b.errors as f64 / cmax * PANEL_H * 0.9;
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{eh:.1}" fill="#f99"/>"##,
                LEFT + i as f64 * xw + 1.0,
                bottom - eh,
                (xw - 2.0).max(0.5)
            );
        }
    }
    for (series, color, pick) in [
        (
            "p50",
            "#1f77b4",
            (|b: &crate::report::Second| b.p50_ms) as fn(&_) -> f64,
        ),
        ("p99", "#d62728", |b| b.p99_ms),
        ("max", "#999999", |b| b.max_ms),
    ] {
        let pts: Vec<String> = r
            .timeline
            .iter()
            .enumerate()
            .filter(|(_, b)| b.ok > 0)
            .map(|(i, b)| format!("{:.1},{:.1}", LEFT + (i as f64 + 0.5) * xw, y(pick(b))))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"><title>{series}</title></polyline>"#,
            pts.join(" ")
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="end"><tspan fill="#1f77b4">p50</tspan> <tspan fill="#d62728">p99</tspan> <tspan fill="#999">max</tspan> <tspan fill="#aaa">bars: completions/s (max {cmax})</tspan></text>"##,
        W - RIGHT,
        top - 8.0
    );
}

fn histogram(s: &mut String, r: &Report, top: f64) {
    axes(
        s,
        top,
        "Latency histogram",
        "latency (ms, log bins)",
        "iterations",
    );
    let bottom = top + PANEL_H;
    let n = r.histogram.len().max(1) as f64;
    let xw = (W - LEFT - RIGHT) / n;
    let cmax = nice(r.histogram.iter().map(|b| b.count).max().unwrap_or(0) as f64);
    for i in 0..=4 {
        let v = cmax * f64::from(i) / 4.0;
        let yv = bottom - v / cmax * PANEL_H;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{v:.0}</text>"#,
            LEFT - 5.0,
            yv + 4.0
        );
    }
    let label_every = (r.histogram.len() / 12).max(1);
    for (i, b) in r.histogram.iter().enumerate() {
        let h = b.count as f64 / cmax * PANEL_H;
        let x = LEFT + i as f64 * xw;
        let _ = writeln!(
            s,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#4c72b0"><title>&lt;= {} ms: {}</title></rect>"##,
            x + 1.0,
            bottom - h,
            (xw - 2.0).max(0.5),
            b.le_ms,
            b.count
        );
        if i % label_every == 0 {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle" font-size="10">{}</text>"#,
                x + xw,
                bottom + 14.0,
                short(b.le_ms)
            );
        }
    }
}

fn short(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Bin, Latency, Second};

    #[test]
    fn renders_well_formed_svg() {
        let r = Report {
            tool: "t".into(),
            scenario: "clone".into(),
            url: "http://h/<o>/r".into(),
            mode: "closed".into(),
            concurrency: Some(1),
            rate: None,
            threads: 1,
            elapsed_s: 2.0,
            ok: 3,
            errors_total: 1,
            errors: Default::default(),
            throughput: 1.5,
            bytes: 0,
            bytes_per_s: 0.0,
            latency_ms: Latency::default(),
            verified_packs: 0,
            error_samples: vec![],
            protocols: Default::default(),
            timeline: vec![
                Second {
                    t: 0,
                    ok: 2,
                    errors: 1,
                    p50_ms: 1.0,
                    p99_ms: 2.0,
                    max_ms: 3.0,
                },
                Second {
                    t: 1,
                    ok: 1,
                    errors: 0,
                    p50_ms: 1.5,
                    p99_ms: 1.5,
                    max_ms: 1.5,
                },
            ],
            histogram: vec![
                Bin {
                    le_ms: 1.0,
                    count: 1,
                },
                Bin {
                    le_ms: 1.78,
                    count: 2,
                },
            ],
        };
        let out = svg(&r);
        assert!(out.starts_with("<svg") && out.ends_with("</svg>\n"));
        assert!(out.contains("&lt;o&gt;"));
        assert_eq!(out.matches("<polyline").count(), 3);
    }
}
