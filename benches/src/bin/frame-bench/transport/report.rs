//! Records, the human table and the summary of the targets.

use super::{Outcome, Reference, SystemKind};
use crate::common::report::{cores, opt, per, per_s, target_line, values, LatencyUs, Targets};
use crate::roundtrip::FrameSize;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One measured (system, frame). Rates are over the measured period (warm-up excluded);
/// latencies are per frame, from `post_write` to the receiver's `incoming` for that frame.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Record {
    pub(super) system: String,
    pub(super) frame: String,
    /// Frames measured.
    frames: u64,
    /// Untimed frames before them.
    warmup_frames: u64,
    window: usize,
    /// Pixel bytes of one frame.
    frame_bytes: usize,
    /// Bytes of one write (the framed message: planes, header segment, segment table).
    wire_bytes: u64,
    pub(super) frames_per_s: f64,
    /// Pixel bytes per second, in 10^9.
    gb_per_s: f64,
    #[serde(flatten)]
    latency: LatencyUs,
    /// Process CPU time (user + system, both ends) per measured frame.
    cpu_s_per_frame: f64,
    /// The same CPU time over the wall time: how many cores the pair kept busy.
    cpu_cores: f64,
    /// Wall time of the measured period.
    elapsed_s: f64,
    /// frames_per_s over raw-tcp's, same frame size.
    pub(super) x_raw_tcp: Option<f64>,
    /// shm systems: the writer's counters over the whole run (warm-up included): writes,
    /// writes handed over without a copy, and bytes copied per write.
    shm_writes: Option<u64>,
    shm_zero_copy_writes: Option<u64>,
    copied_bytes_per_frame: Option<f64>,
}

impl Record {
    pub(super) fn new(system: SystemKind, size: FrameSize, window: usize, o: &Outcome) -> Self {
        let m = &o.measured;
        let t = &m.timed;
        let secs = t.elapsed.as_secs_f64();
        let frames_per_s = per_s(t.frames, secs);
        let cpu = t.cpu.as_secs_f64();
        let shm = m.shm_writer;
        Self {
            system: system.label().to_string(),
            frame: size.label().to_string(),
            frames: t.frames,
            warmup_frames: t.warmup,
            window,
            frame_bytes: o.frame_bytes,
            wire_bytes: o.wire_bytes,
            frames_per_s,
            gb_per_s: frames_per_s * o.frame_bytes as f64 / 1e9,
            latency: LatencyUs::of(&t.latency),
            cpu_s_per_frame: per(cpu, t.frames),
            cpu_cores: cores(cpu, secs),
            elapsed_s: secs,
            x_raw_tcp: None,
            shm_writes: shm.map(|s| s.writes),
            shm_zero_copy_writes: shm.map(|s| s.zero_copy_writes),
            copied_bytes_per_frame: shm
                .filter(|s| s.writes > 0)
                .map(|s| s.bytes_copied as f64 / s.writes as f64),
        }
    }
}

/// A system that could not run here (`{"system": "verbs", "skipped": "..."}`).
#[derive(Debug, Clone, Serialize)]
pub(super) struct Skipped {
    system: &'static str,
    skipped: String,
}

impl Skipped {
    pub(super) fn new(system: SystemKind, reason: String) -> Self {
        Self {
            system: system.label(),
            skipped: reason,
        }
    }

    /// The line people read.
    pub(super) fn text(&self) -> String {
        format!("{}: skipped ({})", self.system, self.skipped)
    }
}

/// The human table.
pub(super) fn table(records: &[Record]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:<8} {:<5} {:>7} {:>6} {:>10} {:>7} {:>10} {:>10} {:>12} {:>6} {:>9} {:>12}",
        "system",
        "frame",
        "frames",
        "window",
        "frames/s",
        "GB/s",
        "p50 us",
        "p99 us",
        "CPU us/fr",
        "cores",
        "x raw-tcp",
        "copied B/fr"
    );
    for r in records {
        let _ = writeln!(
            out,
            "{:<8} {:<5} {:>7} {:>6} {:>10.1} {:>7.2} {:>10.1} {:>10.1} {:>12.1} {:>6.2} {:>9} {:>12}",
            r.system,
            r.frame,
            r.frames,
            r.window,
            r.frames_per_s,
            r.gb_per_s,
            r.latency.p50_us,
            r.latency.p99_us,
            r.cpu_s_per_frame * 1e6,
            r.cpu_cores,
            opt(r.x_raw_tcp, 2),
            opt(r.copied_bytes_per_frame, 0),
        );
    }
    out
}

/// The ratios the targets are about, as one JSON object (`"system": "summary"`). Maps are keyed
/// by frame size; a target is `null` when none of its systems was measured, else whether it
/// holds at every measured frame size.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Summary {
    system: &'static str,
    host_nproc: usize,
    window: usize,
    quick: bool,
    /// tcp frames/s over raw-tcp frames/s (target >= 0.8).
    tcp_over_raw_tcp: BTreeMap<String, f64>,
    /// shm median post-to-arrival latency, microseconds (target <= 5).
    shm_p50_us: BTreeMap<String, f64>,
    /// shm frames/s over tcp frames/s (target >= 10).
    shm_over_tcp: BTreeMap<String, f64>,
    /// shm-copy (frames copied from the sender's region) median latency, microseconds; no
    /// target, for comparison with shm.
    shm_copy_p50_us: BTreeMap<String, f64>,
    /// shm-copy frames/s over tcp frames/s; no target.
    shm_copy_over_tcp: BTreeMap<String, f64>,
    /// ib_write_bw's MB/s (2^20 bytes) given with --ib-write-bw.
    ib_write_bw_mb_per_s: BTreeMap<String, f64>,
    /// verbs bytes/s (frames/s x wire bytes) over ib_write_bw's bytes/s (target >= 0.8).
    verbs_over_ib_write_bw: BTreeMap<String, f64>,
    target_tcp_0_8x_raw_tcp: Option<bool>,
    target_shm_p50_5us: Option<bool>,
    target_shm_10x_tcp: Option<bool>,
    target_verbs_0_8x_ib_write_bw: Option<bool>,
}

fn find<'a>(records: &'a [Record], system: &str, frame: &str) -> Option<&'a Record> {
    records
        .iter()
        .find(|r| r.system == system && r.frame == frame)
}

/// Per frame size, `f` of the records that have what it needs.
fn per_frame(records: &[Record], f: impl Fn(&str) -> Option<f64>) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for r in records {
        if let Some(v) = f(&r.frame) {
            out.insert(r.frame.clone(), v);
        }
    }
    out
}

fn all(values: &BTreeMap<String, f64>, ok: impl Fn(f64) -> bool) -> Option<bool> {
    (!values.is_empty()).then(|| values.values().all(|&v| ok(v)))
}

impl Summary {
    pub(super) fn new(
        records: &[Record],
        references: &[Reference],
        host_nproc: usize,
        window: usize,
        quick: bool,
    ) -> Self {
        let rate = |s: &str, f: &str| find(records, s, f).map(|r| r.frames_per_s);
        let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
        let tcp_over_raw_tcp = per_frame(records, |f| ratio(rate("tcp", f), rate("raw-tcp", f)));
        let shm_p50_us = per_frame(records, |f| {
            find(records, "shm", f).map(|r| r.latency.p50_us)
        });
        let shm_over_tcp = per_frame(records, |f| ratio(rate("shm", f), rate("tcp", f)));
        let shm_copy_p50_us = per_frame(records, |f| {
            find(records, "shm-copy", f).map(|r| r.latency.p50_us)
        });
        let shm_copy_over_tcp = per_frame(records, |f| ratio(rate("shm-copy", f), rate("tcp", f)));
        let ib_write_bw_mb_per_s: BTreeMap<String, f64> = references
            .iter()
            .map(|r| (r.frame.label().to_string(), r.mb_per_s))
            .collect();
        let verbs_over_ib_write_bw = per_frame(records, |f| {
            let verbs = find(records, "verbs", f)?;
            let reference = ib_write_bw_mb_per_s.get(f)? * 1_048_576.0;
            Some(verbs.frames_per_s * verbs.wire_bytes as f64 / reference)
        });
        Self {
            system: "summary",
            host_nproc,
            window,
            quick,
            target_tcp_0_8x_raw_tcp: all(&tcp_over_raw_tcp, |r| r >= 0.8),
            target_shm_p50_5us: all(&shm_p50_us, |us| us <= 5.0),
            target_shm_10x_tcp: all(&shm_over_tcp, |r| r >= 10.0),
            target_verbs_0_8x_ib_write_bw: all(&verbs_over_ib_write_bw, |r| r >= 0.8),
            tcp_over_raw_tcp,
            shm_p50_us,
            shm_over_tcp,
            shm_copy_p50_us,
            shm_copy_over_tcp,
            ib_write_bw_mb_per_s,
            verbs_over_ib_write_bw,
        }
    }
}

impl Targets for Summary {
    fn targets_text(&self) -> String {
        /// Width of the targets' column.
        const WHAT: usize = 58;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\ntargets (host nproc {}, window {}; ratios from this run):",
            self.host_nproc, self.window
        );
        target_line(
            &mut out,
            WHAT,
            "tcp >= 0.8x raw-tcp frames/s (every frame size)",
            self.target_tcp_0_8x_raw_tcp,
            values(&self.tcp_over_raw_tcp, 2, "x"),
        );
        target_line(
            &mut out,
            WHAT,
            "shm p50 post->arrival <= 5 us (every frame size)",
            self.target_shm_p50_5us,
            values(&self.shm_p50_us, 1, " us"),
        );
        target_line(
            &mut out,
            WHAT,
            "shm >= 10x tcp frames/s (every frame size)",
            self.target_shm_10x_tcp,
            values(&self.shm_over_tcp, 2, "x"),
        );
        let verbs = if !self.verbs_over_ib_write_bw.is_empty() {
            values(&self.verbs_over_ib_write_bw, 2, "x")
        } else if self.ib_write_bw_mb_per_s.is_empty() {
            "needs an RDMA device and --ib-write-bw (ci/softroce-bench)".to_string()
        } else {
            "verbs was not measured".to_string()
        };
        target_line(
            &mut out,
            WHAT,
            "verbs >= 0.8x ib_write_bw, same message size (Soft-RoCE VM)",
            self.target_verbs_0_8x_ib_write_bw,
            verbs,
        );
        if !self.shm_p50_us.is_empty() {
            let _ = writeln!(
                out,
                "  (shm: frames built in place in the target's grant (SlotMessage), each write a \
                 zero-copy hand-off through the ring)"
            );
        }
        if !self.shm_copy_p50_us.is_empty() {
            let _ = writeln!(
                out,
                "  (shm-copy, no target: frames copied out of the sender's region inside \
                 post_write: p50 {}; {} tcp)",
                values(&self.shm_copy_p50_us, 1, " us"),
                values(&self.shm_copy_over_tcp, 2, "x"),
            );
        }
        out
    }
}
