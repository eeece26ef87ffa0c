//! `frame-bench store`: frames carried producer → store → consumer through the staging store
//! (over shm and over tcp) against Redis carrying the same frames, measured in the same run.
//!
//! ```text
//!  control (once): the store's control path alone, ops/s              (staging.rs)
//!  for frame in --frames:
//!    one framed I420 Frame message, built once, untimed (frames.rs)
//!    for system in [redis, store-shm, store-tcp] ∩ --systems:        (redis first: the baseline)
//!      producer: for frame i: wait for credit (≤ in_flight frames stored and not yet checked),
//!                stamp i into the first 8 bytes of plane 0, store the frame    ── clock starts
//!        │ the store acknowledged frame i → tells the consumer (in-process, free)
//!        ▼
//!      consumer: fetch frame i into 8-byte aligned memory, read it in place with
//!                capnp_rdma::reader::read_frame, check the stamp (== i), release  ── clock stops
//!      ─▶ Record: frames/s, GB/s, p50/p99 store-start→checked, CPU s/frame of this process and
//!                 of the server process (JSON line or table row)
//!  summary: store-shm / redis and store-tcp / redis frames/s against the targets (report.rs)
//! ```
//!
//! Producer and consumer run in this process, so `cpu_s_per_frame` is what the two clients
//! cost together (`getrusage(RUSAGE_SELF)` user + system time over the measured period, per
//! frame); the server is another process and its CPU time (`/proc/<pid>/stat` utime + stime)
//! is reported apart as `server_cpu_s_per_frame`. Every frame is read back with `read_frame`
//! and its stamp and the first and last byte of every plane are compared; warm-up frames, and
//! every frame with `--quick`, are also compared byte for byte with what was sent. A wrong byte
//! makes the process exit non-zero.
//!
//! Redis runs in `redis.rs`; `control`, `store-shm` and `store-tcp` in `staging.rs`, against a
//! staging-store server process (this binary re-executed as the hidden `store-server`).

mod flow;
mod frames;
mod redis;
mod report;
mod resp;
mod staging;

pub(crate) use staging::{serve, ServerArgs};

use crate::common::{self, flow::PlanFlags, report::finish};
use crate::roundtrip::FrameSize;
use capnp_rdma::framing::FramingError;
use capnp_rdma::RegionError;
use capnp_rdma_benches::{host_nproc, json_line};
use flow::STALL;
pub(crate) use flow::{Measured, Plan};
use frames::FrameTemplate;
use report::{ControlRecord, Record, Summary};
use std::sync::Arc;

/// Flags of `frame-bench store`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print one JSON object per line per (system, frame), one for `control`, then a summary.
    #[arg(long)]
    json: bool,
    /// Frame sizes (I420).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "1080p,4k")]
    frames: Vec<FrameSize>,
    /// Systems to measure; they always run in the order control, redis (the baseline, so
    /// the others have their ratio as they are printed), store-shm, store-shm-rewrite,
    /// store-tcp.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "control,store-shm,store-shm-rewrite,store-tcp,redis"
    )]
    systems: Vec<SystemKind>,
    /// Frames in flight: stored and not yet checked by the consumer (the producer waits for
    /// credit beyond that).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    in_flight: u32,
    /// Measure at least this many frames per (system, frame)
    /// [default: 4 x (in_flight + 1), or in_flight + 2 with --quick].
    #[arg(long)]
    min_frames: Option<u64>,
    /// And for at least this much wall time [default: 2000, or 0 with --quick].
    #[arg(long)]
    min_time_ms: Option<u64>,
    /// Untimed frames first, every byte of each checked
    /// [default: 2 x (in_flight + 1), or in_flight + 1 with --quick].
    #[arg(long)]
    warmup_frames: Option<u64>,
    /// Never measure more than this many frames per (system, frame).
    #[arg(long, default_value_t = 100_000)]
    max_frames: u64,
    /// Tiny frame counts for a CI smoke run: every system runs and every byte of every frame
    /// is checked.
    #[arg(long)]
    quick: bool,
}

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(crate) enum SystemKind {
    /// The staging store's control path alone (operations that move no pixels): ops/s.
    Control,
    /// Redis on loopback: SET, GET, DEL of the framed message (the baseline).
    Redis,
    /// Producer → staging store → consumer, frames handed over in shared memory; the producer
    /// writes only what differs from the frame its grant still holds.
    StoreShm,
    /// store-shm with every byte of every frame written by the producer (as a decoder would).
    StoreShmRewrite,
    /// Producer → staging store → consumer, frames over loopback TCP.
    StoreTcp,
}

impl SystemKind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            SystemKind::Control => "control",
            SystemKind::StoreShm => "store-shm",
            SystemKind::StoreShmRewrite => "store-shm-rewrite",
            SystemKind::StoreTcp => "store-tcp",
            SystemKind::Redis => "redis",
        }
    }

    /// The system's entry point. Every system has the same shape: it gets the case and
    /// returns what it measured, or why it could not.
    fn entry(self) -> fn(&Case) -> Result<Measured, StoreBenchError> {
        match self {
            SystemKind::Control => staging::run_control,
            SystemKind::StoreShm => staging::run_store_shm,
            SystemKind::StoreShmRewrite => staging::run_store_shm_rewrite,
            SystemKind::StoreTcp => staging::run_store_tcp,
            SystemKind::Redis => redis::run_redis,
        }
    }
}

/// Why a run failed. Any of these
/// ends the process with a non-zero exit.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreBenchError {
    /// Which (system, frame) failed, and how.
    #[error("{system} {frame}: {source}")]
    Case {
        system: &'static str,
        frame: &'static str,
        #[source]
        source: Box<StoreBenchError>,
    },
    /// The consumer found the wrong bytes (or a frame out of order).
    #[error("frame {seq} arrived wrong: {what}")]
    Mismatch { seq: u64, what: String },
    /// No `redis-server` executable.
    #[error(
        "redis-server not found (looked on PATH and at /usr/bin/redis-server): run `ci/deps`, \
         which installs the Debian package redis-server"
    )]
    RedisMissing,
    /// redis-server did not come up.
    #[error("redis-server {what}; its output:\n{log}")]
    RedisStart { what: String, log: String },
    /// A Redis request or reply failed.
    #[error("redis {what}: {source}")]
    Resp {
        what: &'static str,
        #[source]
        source: resp::RespError,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("region: {0}")]
    Region(#[from] RegionError),
    #[error("framing: {0}")]
    Framing(#[from] FramingError),
    #[error("frame layout: {0}")]
    Frame(#[from] capnp_rdma::frame::FrameError),
    #[error("reading the frame back: {0}")]
    Read(#[from] capnp_rdma::reader::ReadError),
    #[error("a benchmark thread failed: {0}")]
    Thread(String),
    #[error("waited {STALL:?} for {0}")]
    Stalled(&'static str),
    /// The other side of the run failed first (its error is the one reported).
    #[error("stopped: the other side failed")]
    Aborted,
    #[error("{0}")]
    Setup(&'static str),
}

impl StoreBenchError {
    pub(crate) fn mismatch(seq: u64, what: String) -> Self {
        StoreBenchError::Mismatch { seq, what }
    }

    pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| StoreBenchError::Io { what, source }
    }

    pub(crate) fn resp(what: &'static str) -> impl FnOnce(resp::RespError) -> Self {
        move |source| StoreBenchError::Resp { what, source }
    }
}

/// What every system's entry point gets for one (system, frame).
#[derive(Debug, Clone)]
pub(crate) struct Case {
    /// The frame size.
    pub(crate) size: FrameSize,
    /// The framed message to carry (the producer stamps its own copy per frame) and the
    /// consumer's check.
    pub(crate) template: Arc<FrameTemplate>,
    /// How many frames, and for how long.
    pub(crate) plan: Plan,
    /// Frames stored and not yet checked, at most (the producer's credit).
    pub(crate) in_flight: usize,
}

fn plan(args: &Args) -> Plan {
    Plan::new(
        args.in_flight,
        PlanFlags {
            quick: args.quick,
            min_frames: args.min_frames,
            min_time_ms: args.min_time_ms,
            warmup_frames: args.warmup_frames,
            max_frames: args.max_frames,
        },
    )
}

/// Runs the subcommand.
pub(crate) fn run(args: &Args) -> Result<(), StoreBenchError> {
    let plan = plan(args);
    let in_flight = args.in_flight as usize;
    let nproc = host_nproc();
    if !args.json {
        emit(&format!(
            "frame-bench store: host nproc {nproc}; producer and consumer in this process, the \
             server in its own; loopback; {in_flight} frames in flight; {} warm-up frames, then \
             at least {} frames and {} ms per (system, frame)",
            plan.warmup,
            plan.min_frames,
            plan.min_time.as_millis(),
        ))?;
    }
    let mut frames = args.frames.clone();
    frames.dedup();
    let mut systems = args.systems.clone();
    systems.sort();
    systems.dedup();

    let not_built: Vec<&'static str> = Vec::new();
    let case_error = |system: SystemKind, size: FrameSize| {
        move |e: StoreBenchError| StoreBenchError::Case {
            system: system.label(),
            frame: size.label(),
            source: Box::new(e),
        }
    };

    let mut control = None;
    if let (true, Some(&size)) = (systems.contains(&SystemKind::Control), frames.first()) {
        let case = Case {
            size,
            template: Arc::new(
                FrameTemplate::build(size).map_err(case_error(SystemKind::Control, size))?,
            ),
            plan,
            in_flight,
        };
        if !args.json {
            eprintln!("  measuring control ...");
        }
        match (SystemKind::Control.entry())(&case) {
            Ok(measured) => {
                let record = ControlRecord::new(in_flight, &measured);
                if args.json {
                    emit(&json_line(&record))?;
                }
                control = Some(record);
            }
            Err(e) => return Err(case_error(SystemKind::Control, size)(e)),
        }
    }

    let mut records = Vec::new();
    for &size in &frames {
        let template = Arc::new(
            FrameTemplate::build(size).map_err(|e| StoreBenchError::Case {
                system: "setup",
                frame: size.label(),
                source: Box::new(e),
            })?,
        );
        for &system in systems.iter().filter(|&&s| s != SystemKind::Control) {
            let case = Case {
                size,
                template: Arc::clone(&template),
                plan,
                in_flight,
            };
            if !args.json {
                eprintln!("  measuring {} {} ...", system.label(), size.label());
            }
            let measured = match (system.entry())(&case) {
                Ok(measured) => measured,
                Err(e) => return Err(case_error(system, size)(e)),
            };
            let mut record = Record::new(system, &case, &measured);
            record.x_redis = records
                .iter()
                .find(|r: &&Record| r.system == "redis" && r.frame == size.label())
                .filter(|_| system != SystemKind::Redis)
                .map(|redis| record.frames_per_s / redis.frames_per_s);
            if args.json {
                emit(&json_line(&record))?;
            }
            records.push(record);
        }
    }
    let summary = Summary::new(&records, nproc, in_flight, args.quick, &not_built);
    finish(args.json, args.quick, &summary, || {
        report::table(&records, control.as_ref())
    })
    .map_err(StoreBenchError::io("stdout"))
}

/// Writes `text` and a newline to stdout, flushed; a closed pipe is an error, not a panic.
fn emit(text: &str) -> Result<(), StoreBenchError> {
    common::report::emit(text).map_err(StoreBenchError::io("stdout"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_plan_is_small() {
        use clap::Parser;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let cli = Cli::parse_from(["x", "--quick", "--in-flight", "3", "--systems", "redis"]);
        let plan = plan(&cli.args);
        assert_eq!((plan.warmup, plan.min_frames), (4, 5));
        assert!(plan.min_time.is_zero() && plan.check_all);
        assert_eq!(cli.args.systems, vec![SystemKind::Redis]);
        assert_eq!(cli.args.frames, vec![FrameSize::P1080, FrameSize::K4]);
    }
}
