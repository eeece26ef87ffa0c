//! What `store` and `transport` print alike: rates, optional columns, the lines of the
//! targets, and the end of a run (the table and the targets, or the summary as JSON).

use capnp_rdma_benches::{json_line, Stats};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// `count` per second over `secs` (0 for an empty period).
pub(crate) fn per_s(count: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

/// `total` per one of `count` (0 for none).
pub(crate) fn per(total: f64, count: u64) -> f64 {
    if count > 0 {
        total / count as f64
    } else {
        0.0
    }
}

/// CPU seconds over wall seconds: the cores kept busy (0 for an empty period).
pub(crate) fn cores(cpu_s: f64, secs: f64) -> f64 {
    if secs > 0.0 {
        cpu_s / secs
    } else {
        0.0
    }
}

/// Latency of a record's frames (or operations), in microseconds; its fields stand in the
/// record's JSON object as its own (`#[serde(flatten)]`).
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct LatencyUs {
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) mean_us: f64,
    pub(crate) max_us: f64,
}

impl LatencyUs {
    /// The median, 99th percentile, mean and maximum of `stats`.
    pub(crate) fn of(stats: &Stats) -> Self {
        Self {
            p50_us: stats.median_ns / 1e3,
            p99_us: stats.p99_ns / 1e3,
            mean_us: stats.mean_ns / 1e3,
            max_us: stats.max_ns / 1e3,
        }
    }
}

/// A table cell of an optional figure: `digits` after the point, or "-".
pub(crate) fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

/// One target's line: what it asks (padded to `width`), whether it is met, and the values.
pub(crate) fn target_line(
    out: &mut String,
    width: usize,
    what: &str,
    met: Option<bool>,
    value: String,
) {
    let verdict = match met {
        Some(true) => "MET",
        Some(false) => "NOT MET",
        None => "not measured",
    };
    let _ = writeln!(out, "  {what:<width$} {verdict:<12} {value}");
}

/// Per-frame-size values as "1080p 1.23x, 4k 0.98x" (`digits` after the point, then `unit`),
/// or "-" when there are none.
pub(crate) fn values(map: &BTreeMap<String, f64>, digits: usize, unit: &str) -> String {
    let parts: Vec<String> = map
        .iter()
        .map(|(frame, v)| format!("{frame} {v:.digits$}{unit}"))
        .collect();
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(", ")
    }
}

/// Writes `text` and a newline to stdout, flushed; a closed pipe is an error, not a panic.
pub(crate) fn emit(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").and_then(|()| out.flush())
}

/// A run's summary: one JSON object, or the targets' lines for people.
pub(crate) trait Targets: Serialize {
    /// Whether each target is met, for people.
    fn targets_text(&self) -> String;
}

/// The end of a run: with `json` the summary as one JSON line; else the table, the targets
/// and, with `quick`, the note that the figures are not measurements.
pub(crate) fn finish(
    json: bool,
    quick: bool,
    summary: &impl Targets,
    table: impl FnOnce() -> String,
) -> std::io::Result<()> {
    if json {
        emit(&json_line(summary))?;
    } else {
        emit(&table())?;
        emit(&summary.targets_text())?;
        if quick {
            emit("(--quick: a smoke run of a few frames each; its figures are not measurements)")?;
        }
    }
    Ok(())
}
