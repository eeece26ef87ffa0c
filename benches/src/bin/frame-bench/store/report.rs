//! Records, the human table and the summary of the targets.

use super::flow::Measured;
use super::{Case, SystemKind};
use crate::common::report::{cores, opt, per, per_s, target_line, values, LatencyUs, Targets};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The frame size the targets are stated at.
const TARGET_FRAME: &str = "1080p";
/// store-shm frames/s over Redis's, at least.
const TARGET_SHM_X_REDIS: f64 = 20.0;
/// store-tcp frames/s over Redis's, at least.
const TARGET_TCP_X_REDIS: f64 = 1.5;

/// One measured (system, frame). Rates are over the measured period (warm-up excluded);
/// latencies are per frame, from the start of the producer's store to the end of the
/// consumer's check.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Record {
    pub(super) system: &'static str,
    pub(super) frame: &'static str,
    /// Frames measured.
    frames: u64,
    /// Untimed frames before them.
    warmup_frames: u64,
    in_flight: usize,
    /// Pixel bytes of one frame.
    frame_bytes: usize,
    /// Bytes of the framed message a store carries per frame.
    wire_bytes: usize,
    pub(super) frames_per_s: f64,
    /// Pixel bytes per second, in 10^9.
    gb_per_s: f64,
    #[serde(flatten)]
    latency: LatencyUs,
    /// This process's CPU time (user + system: producer and consumer) per measured frame.
    cpu_s_per_frame: f64,
    /// The server process's CPU time per measured frame (`null` without a server process).
    server_cpu_s_per_frame: Option<f64>,
    /// Both together: what one frame costs the machine (`null` without a server process).
    total_cpu_s_per_frame: Option<f64>,
    /// This process's CPU time over the wall time: cores the clients kept busy.
    cpu_cores: f64,
    /// The same for the server process.
    server_cpu_cores: Option<f64>,
    /// Wall time of the measured period.
    elapsed_s: f64,
    /// Measured frames whose every byte the producer wrote into the store (or sent); the
    /// others were repainted in place: only their stamp was written (`null`: not counted).
    whole_writes: Option<u64>,
    /// frames_per_s over redis's, same frame size (`null` for redis or without redis).
    pub(super) x_redis: Option<f64>,
}

impl Record {
    pub(super) fn new(system: SystemKind, case: &Case, m: &Measured) -> Self {
        let t = &m.timed;
        let secs = t.elapsed.as_secs_f64();
        let frames_per_s = per_s(t.frames, secs);
        let cpu = t.cpu.as_secs_f64();
        let server_cpu = t.server_cpu.map(|d| d.as_secs_f64());
        Self {
            system: system.label(),
            frame: case.size.label(),
            frames: t.frames,
            warmup_frames: t.warmup,
            in_flight: case.in_flight,
            frame_bytes: case.template.frame_bytes(),
            wire_bytes: case.template.wire_len(),
            frames_per_s,
            gb_per_s: frames_per_s * case.template.frame_bytes() as f64 / 1e9,
            latency: LatencyUs::of(&t.latency),
            cpu_s_per_frame: per(cpu, t.frames),
            server_cpu_s_per_frame: server_cpu.map(|s| per(s, t.frames)),
            total_cpu_s_per_frame: server_cpu.map(|s| per(cpu + s, t.frames)),
            cpu_cores: cores(cpu, secs),
            server_cpu_cores: server_cpu.map(|s| cores(s, secs)),
            elapsed_s: secs,
            whole_writes: m.whole_writes,
            x_redis: None,
        }
    }
}

/// The `control` system: the store's control path alone, in operations.
#[derive(Debug, Clone, Serialize)]
pub(super) struct ControlRecord {
    system: &'static str,
    /// Operations measured.
    ops: u64,
    /// Untimed operations before them.
    warmup_ops: u64,
    in_flight: usize,
    ops_per_s: f64,
    #[serde(flatten)]
    latency: LatencyUs,
    /// This process's CPU time per operation.
    cpu_s_per_op: f64,
    /// The server process's CPU time per operation.
    server_cpu_s_per_op: Option<f64>,
    elapsed_s: f64,
}

impl ControlRecord {
    pub(super) fn new(in_flight: usize, m: &Measured) -> Self {
        let t = &m.timed;
        let secs = t.elapsed.as_secs_f64();
        Self {
            system: SystemKind::Control.label(),
            ops: t.frames,
            warmup_ops: t.warmup,
            in_flight,
            ops_per_s: per_s(t.frames, secs),
            latency: LatencyUs::of(&t.latency),
            cpu_s_per_op: per(t.cpu.as_secs_f64(), t.frames),
            server_cpu_s_per_op: t.server_cpu.map(|d| per(d.as_secs_f64(), t.frames)),
            elapsed_s: secs,
        }
    }
}

/// The human table.
pub(super) fn table(records: &[Record], control: Option<&ControlRecord>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:<17} {:<5} {:>7} {:>6} {:>10} {:>7} {:>10} {:>10} {:>11} {:>11} {:>11} {:>7} {:>8}",
        "system",
        "frame",
        "frames",
        "in-fl",
        "frames/s",
        "GB/s",
        "p50 us",
        "p99 us",
        "CPU us/fr",
        "srv us/fr",
        "all us/fr",
        "whole",
        "x redis"
    );
    for r in records {
        let _ = writeln!(
            out,
            "{:<17} {:<5} {:>7} {:>6} {:>10.1} {:>7.2} {:>10.1} {:>10.1} {:>11.1} {:>11} {:>11} {:>7} {:>8}",
            r.system,
            r.frame,
            r.frames,
            r.in_flight,
            r.frames_per_s,
            r.gb_per_s,
            r.latency.p50_us,
            r.latency.p99_us,
            r.cpu_s_per_frame * 1e6,
            opt(r.server_cpu_s_per_frame.map(|s| s * 1e6), 1),
            opt(r.total_cpu_s_per_frame.map(|s| s * 1e6), 1),
            r.whole_writes.map_or_else(|| "-".to_string(), |n| n.to_string()),
            opt(r.x_redis, 2),
        );
    }
    let _ = writeln!(
        out,
        "(CPU: this process, producer + consumer; srv: the server process, from /proc, 10 ms \
         resolution; all: both; whole: measured frames the producer wrote or sent whole, the others only \
         restamped in place)"
    );
    if let Some(c) = control {
        let _ = writeln!(
            out,
            "control: {} ops, {:.0} ops/s, p50 {:.1} us, p99 {:.1} us, CPU {:.2} us/op, \
             srv {} us/op",
            c.ops,
            c.ops_per_s,
            c.latency.p50_us,
            c.latency.p99_us,
            c.cpu_s_per_op * 1e6,
            opt(c.server_cpu_s_per_op.map(|s| s * 1e6), 2),
        );
    }
    out
}

/// The ratios the targets are about, as one JSON object (`"system": "summary"`). Ratio maps
/// are keyed by frame size; the targets are judged at 1080p (`null` when a system or 1080p
/// was not measured).
#[derive(Debug, Clone, Serialize)]
pub(super) struct Summary {
    system: &'static str,
    host_nproc: usize,
    in_flight: usize,
    quick: bool,
    /// Systems whose entry point is not built yet (skipped, no numbers).
    not_built: Vec<&'static str>,
    /// store-shm frames/s over redis frames/s.
    store_shm_over_redis: BTreeMap<String, f64>,
    /// store-shm-rewrite frames/s over redis frames/s (no target: the producer writes every
    /// byte, which Redis's producer does not).
    store_shm_rewrite_over_redis: BTreeMap<String, f64>,
    /// store-tcp frames/s over redis frames/s.
    store_tcp_over_redis: BTreeMap<String, f64>,
    /// store-shm >= 20x redis frames/s at 1080p.
    target_store_shm_20x_redis_1080p: Option<bool>,
    /// store-tcp >= 1.5x redis frames/s at 1080p.
    target_store_tcp_1_5x_redis_1080p: Option<bool>,
}

/// Per frame size, `system`'s frames/s over redis's.
fn over_redis(records: &[Record], system: SystemKind) -> BTreeMap<String, f64> {
    records
        .iter()
        .filter(|r| r.system == system.label())
        .filter_map(|r| Some((r.frame.to_string(), r.x_redis?)))
        .collect()
}

impl Summary {
    pub(super) fn new(
        records: &[Record],
        host_nproc: usize,
        in_flight: usize,
        quick: bool,
        not_built: &[&'static str],
    ) -> Self {
        let store_shm_over_redis = over_redis(records, SystemKind::StoreShm);
        let store_tcp_over_redis = over_redis(records, SystemKind::StoreTcp);
        Self {
            system: "summary",
            host_nproc,
            in_flight,
            quick,
            not_built: not_built.to_vec(),
            target_store_shm_20x_redis_1080p: store_shm_over_redis
                .get(TARGET_FRAME)
                .map(|&x| x >= TARGET_SHM_X_REDIS),
            target_store_tcp_1_5x_redis_1080p: store_tcp_over_redis
                .get(TARGET_FRAME)
                .map(|&x| x >= TARGET_TCP_X_REDIS),
            store_shm_over_redis,
            store_shm_rewrite_over_redis: over_redis(records, SystemKind::StoreShmRewrite),
            store_tcp_over_redis,
        }
    }
}

impl Targets for Summary {
    fn targets_text(&self) -> String {
        /// Width of the targets' column.
        const WHAT: usize = 44;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\ntargets (host nproc {}, {} in flight; ratios of frames/s from this run, judged \
             at {TARGET_FRAME}):",
            self.host_nproc, self.in_flight
        );
        target_line(
            &mut out,
            WHAT,
            "store-shm >= 20x redis frames/s at 1080p",
            self.target_store_shm_20x_redis_1080p,
            values(&self.store_shm_over_redis, 2, "x"),
        );
        target_line(
            &mut out,
            WHAT,
            "store-tcp >= 1.5x redis frames/s at 1080p",
            self.target_store_tcp_1_5x_redis_1080p,
            values(&self.store_tcp_over_redis, 2, "x"),
        );
        if !self.not_built.is_empty() {
            let _ = writeln!(
                out,
                "  (not built yet, skipped: {})",
                self.not_built.join(", ")
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::flow::Timed;
    use crate::roundtrip::FrameSize;
    use crate::store::flow::Plan;
    use crate::store::frames::FrameTemplate;
    use capnp_rdma_benches::Stats;
    use std::sync::Arc;
    use std::time::Duration;

    fn record(system: SystemKind, size: FrameSize, frames: u64, redis: Option<f64>) -> Record {
        let case = Case {
            size,
            template: Arc::new(FrameTemplate::build(FrameSize::P720).unwrap()),
            plan: Plan {
                warmup: 1,
                min_frames: 1,
                min_time: Duration::ZERO,
                max_frames: 1,
                check_all: false,
            },
            in_flight: 4,
        };
        let m = Measured {
            timed: Timed {
                frames,
                warmup: 1,
                elapsed: Duration::from_secs(1),
                cpu: Duration::from_millis(500),
                server_cpu: Some(Duration::from_millis(250)),
                latency: Stats::from_samples(&[1000, 2000, 3000]),
            },
            whole_writes: None,
        };
        let mut r = Record::new(system, &case, &m);
        r.x_redis = redis.map(|redis| r.frames_per_s / redis);
        r
    }

    #[test]
    fn targets_are_judged_at_1080p() {
        let records = vec![
            record(SystemKind::Redis, FrameSize::P1080, 100, None),
            record(SystemKind::StoreShm, FrameSize::P1080, 2500, Some(100.0)),
            record(SystemKind::StoreTcp, FrameSize::P1080, 120, Some(100.0)),
            record(SystemKind::StoreTcp, FrameSize::K4, 400, Some(100.0)),
        ];
        assert_eq!(records[0].cpu_s_per_frame, 0.005);
        assert_eq!(records[0].server_cpu_s_per_frame, Some(0.0025));
        assert_eq!(records[0].latency.p50_us, 2.0);
        let s = Summary::new(&records, 2, 4, false, &["control"]);
        assert_eq!(s.target_store_shm_20x_redis_1080p, Some(true));
        assert_eq!(s.target_store_tcp_1_5x_redis_1080p, Some(false));
        assert_eq!(s.store_tcp_over_redis.get("4k"), Some(&4.0));
        let text = s.targets_text();
        assert!(
            text.contains("NOT MET") && text.contains("1080p 25.00x"),
            "{text}"
        );
        let json = capnp_rdma_benches::json_line(&records[1]);
        for field in [
            "\"system\":\"store-shm\"",
            "\"frame\":\"1080p\"",
            "\"frames_per_s\":",
            "\"gb_per_s\":",
            "\"p50_us\":",
            "\"p99_us\":",
            "\"cpu_s_per_frame\":",
            "\"server_cpu_s_per_frame\":",
            "\"x_redis\":25.0",
        ] {
            assert!(json.contains(field), "{field} in {json}");
        }
        let only_redis = Summary::new(&records[..1], 2, 4, false, &["store-shm", "store-tcp"]);
        assert_eq!(only_redis.target_store_shm_20x_redis_1080p, None);
        assert!(only_redis.targets_text().contains("not measured"));
        assert!(table(&records, None).contains("store-tcp"));
    }
}
