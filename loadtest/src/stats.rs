//! What a run measured. Each runtime thread records into its own [`Recorder`] (no sharing on
//! the hot path); the runner merges them at the end. Latencies are microseconds in an HDR
//! histogram; the timeline keeps one low-precision histogram per second for the plot.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Three significant figures: p99.9 is exact to 0.1 %.
const SIGFIGS: u8 = 3;
/// Per-second buckets only feed a picture: two figures are plenty and keep them small.
const BUCKET_SIGFIGS: u8 = 2;

fn new_hist(sigfigs: u8) -> Histogram<u64> {
    // `new` with auto-resize cannot fail for sigfigs in 0..=5.
    let mut h = Histogram::new(sigfigs).expect("sigfigs in range");
    h.auto(true);
    h
}

/// One second of the run.
#[derive(Clone)]
pub struct Bucket {
    pub ok: u64,
    pub errors: u64,
    pub latency: Histogram<u64>,
}

impl Bucket {
    fn new() -> Self {
        Self {
            ok: 0,
            errors: 0,
            latency: new_hist(BUCKET_SIGFIGS),
        }
    }
}

/// Per-thread measurements.
#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    pub latency: Histogram<u64>,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    /// Pack bytes received (clone) or sent (push).
    pub bytes: u64,
    pub timeline: Vec<Bucket>,
    /// The first few error messages, for the report (the kinds alone rarely say enough).
    pub samples: Vec<String>,
    /// Successful Git iterations by the protocol version the server spoke (2 or 0).
    pub protocols: BTreeMap<u8, u64>,
}

const MAX_SAMPLES: usize = 5;

impl Recorder {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            latency: new_hist(SIGFIGS),
            ok: 0,
            errors: BTreeMap::new(),
            bytes: 0,
            timeline: Vec::new(),
            samples: Vec::new(),
            protocols: BTreeMap::new(),
        }
    }

    fn bucket(&mut self, at: Instant) -> &mut Bucket {
        let sec = usize::try_from(at.saturating_duration_since(self.start).as_secs()).unwrap_or(0);
        if self.timeline.len() <= sec {
            self.timeline.resize_with(sec + 1, Bucket::new);
        }
        &mut self.timeline[sec]
    }

    /// A successful iteration that ended at `end` after `latency`.
    pub fn success(&mut self, end: Instant, latency: Duration, bytes: u64) {
        let us = micros(latency);
        record(&mut self.latency, us, 1);
        self.ok += 1;
        self.bytes += bytes;
        let b = self.bucket(end);
        b.ok += 1;
        record(&mut b.latency, us, 1);
    }

    /// A successful iteration spoke Git protocol `version`.
    pub fn protocol(&mut self, version: u8) {
        *self.protocols.entry(version).or_insert(0) += 1;
    }

    pub fn failure(&mut self, end: Instant, kind: &str, message: String) {
        *self.errors.entry(kind.to_owned()).or_insert(0) += 1;
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(message);
        }
        self.bucket(end).errors += 1;
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Adds `other` into `self` (both must share a start instant).
    pub fn merge(&mut self, other: &Recorder) {
        add_into(&mut self.latency, &other.latency);
        self.ok += other.ok;
        self.bytes += other.bytes;
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_insert(0) += v;
        }
        for (v, n) in &other.protocols {
            *self.protocols.entry(*v).or_insert(0) += n;
        }
        for s in &other.samples {
            if self.samples.len() < MAX_SAMPLES {
                self.samples.push(s.clone());
            }
        }
        if self.timeline.len() < other.timeline.len() {
            self.timeline.resize_with(other.timeline.len(), Bucket::new);
        }
        for (mine, theirs) in self.timeline.iter_mut().zip(&other.timeline) {
            mine.ok += theirs.ok;
            mine.errors += theirs.errors;
            add_into(&mut mine.latency, &theirs.latency);
        }
    }
}

/// Records `us` `n` times, growing the histogram as needed. (`saturating_record` would clamp to
/// the current range without growing it, auto-resize or not.)
fn record(h: &mut Histogram<u64>, us: u64, n: u64) {
    if h.record_n(us, n).is_err() {
        h.saturating_record_n(us, n);
    }
}

fn add_into(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    for v in from.iter_recorded() {
        record(into, v.value_iterated_to(), v.count_at_value());
    }
}

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_merges() {
        let start = Instant::now();
        let mut a = Recorder::new(start);
        let mut b = Recorder::new(start);
        for i in 1..=100u64 {
            a.success(start, Duration::from_micros(i * 10), 5);
        }
        b.success(
            start + Duration::from_millis(2500),
            Duration::from_millis(50),
            7,
        );
        b.failure(start, "connect", "refused".into());
        b.protocol(2);
        a.protocol(2);
        a.protocol(0);
        a.merge(&b);
        assert_eq!(a.protocols, BTreeMap::from([(0, 1), (2, 2)]));
        assert_eq!(a.ok, 101);
        assert_eq!(a.bytes, 507);
        assert_eq!(a.error_count(), 1);
        assert_eq!(a.timeline.len(), 3);
        assert_eq!(a.timeline[0].ok, 100);
        assert_eq!(a.timeline[2].ok, 1);
        assert_eq!(a.timeline[0].errors, 1);
        assert!(
            a.latency.equivalent(a.latency.max(), 50_000),
            "max {} len {}",
            a.latency.max(),
            a.latency.len()
        );
        assert!(a.latency.value_at_quantile(0.5) >= 490 && a.latency.value_at_quantile(0.5) <= 520);
    }
}
