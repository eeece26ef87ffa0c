//! `frame-bench transport`: frames streamed from a writer to a target in this process, over
//! each transport backend, against a plain TCP socket pair measured in the same run.
//!
//! ```text
//!  for frame in --frames:
//!    for system in [raw-tcp, tcp, shm, shm-copy, verbs] ∩ --systems:  (raw-tcp first: baseline)
//!      target region: a lease of `window` slots
//!      sender region: window + 1 frame messages, built once, untimed (frames.rs)
//!        (shm: `window` frame messages built once, untimed, in place: message i in slot i of
//!         the target's grant, so each write hands over the message already there, shm.rs)
//!      tokio runtime (multi-thread, 2 workers), loopback:
//!        sender task ── post_write(message seq % (window+1), slot seq % window, imm = seq) ──┐
//!             ▲ completions hand the message back; it is posted again                       │
//!             └──── credit (≤ window frames posted and not yet checked) ◀── receiver task ◀─┘
//!                                                      checks each frame as it lands (pump.rs)
//!      ─▶ Record: frames/s, GB/s, p50/p99 post→arrival, CPU s/frame, copied B/frame (shm)
//!         (JSON line or table row)
//!  summary: the ratios the targets are about (report.rs)
//! ```
//!
//! `shm` is the shared-memory backend's zero-copy path: the producer builds each frame with a
//! `SlotMessage` where the target reads it, and a write is a ring notification (the run fails
//! if the writer copied a byte). `shm-copy` is the same backend fed from the sender's own
//! region, like tcp and verbs: every write copies the frame into the slot.
//!
//! Both ends run in this process, so `cpu_s_per_frame` is what the pair costs together
//! (`getrusage(RUSAGE_SELF)` user + system time over the measured period, per frame). Every
//! frame is checked on arrival (first and last byte of every entry, stale slots included);
//! warm-up frames, and every frame with `--quick`, also have every byte hashed. A wrong byte
//! makes the process exit non-zero.
//!
//! `verbs` needs an RDMA device (`CAPNP_RDMA_DEVICE`, ...); without one it is reported as
//! skipped. `ci/softroce-bench` runs it in the Soft-RoCE VM next to perftest's `ib_write_bw`
//! and passes that reference with `--ib-write-bw`.

mod frames;
mod pump;
mod raw_tcp;
mod report;
mod shm;
mod tcp;
#[cfg(feature = "verbs")]
mod verbs;

use crate::common::{self, flow::PlanFlags, report::finish};
use crate::roundtrip::FrameSize;
use capnp_rdma::framing::{FramingError, OutboundMessage};
use capnp_rdma::transport::TransportError;
use capnp_rdma::{Region, RegionError, RegionOptions};
use capnp_rdma_benches::{host_nproc, json_line};
use frames::FrameSet;
use pump::{Flow, Measured, Plan, Receipts, STALL};
use report::{Record, Skipped, Summary};
use std::sync::Arc;
use std::time::Duration;

/// Flags of `frame-bench transport`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print one JSON object per line per (system, frame), then a summary object.
    #[arg(long)]
    json: bool,
    /// Frame sizes (I420).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "1080p,4k")]
    frames: Vec<FrameSize>,
    /// Systems to measure; they always run in the order raw-tcp, tcp, shm, shm-copy, verbs.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "raw-tcp,tcp,shm,shm-copy,verbs"
    )]
    systems: Vec<SystemKind>,
    /// Frames in flight (posted and not yet checked by the receiver); also the number of slots
    /// the target grants.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    window: u32,
    /// Measure at least this many frames per (system, frame)
    /// [default: 4 x (window + 1), or window + 2 with --quick].
    #[arg(long)]
    min_frames: Option<u64>,
    /// And for at least this much wall time [default: 2000, or 0 with --quick].
    #[arg(long)]
    min_time_ms: Option<u64>,
    /// Untimed frames first, every byte of each checked
    /// [default: 2 x (window + 1), or window + 1 with --quick].
    #[arg(long)]
    warmup_frames: Option<u64>,
    /// Never measure more than this many frames per (system, frame).
    #[arg(long, default_value_t = 100_000)]
    max_frames: u64,
    /// Tiny frame counts for a CI smoke run: every system runs and every byte of every frame
    /// is checked.
    #[arg(long)]
    quick: bool,
    /// perftest's ib_write_bw "BW average" at each frame size, in MB/s (2^20 bytes), measured
    /// on the same device: e.g. `1080p=45.2,4k=44.8`. Gives verbs its target ratio.
    #[arg(long, value_delimiter = ',', value_parser = parse_reference)]
    ib_write_bw: Vec<Reference>,
}

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
enum SystemKind {
    /// A plain tokio TcpStream pair: the ceiling for tcp.
    RawTcp,
    /// capnp_rdma::transport::tcp.
    Tcp,
    /// capnp_rdma::transport::shm, frames built in place in the target's grant (SlotMessage):
    /// each write is a zero-copy hand-off.
    Shm,
    /// capnp_rdma::transport::shm, frames in the sender's own region: each write copies.
    ShmCopy,
    /// capnp_rdma::transport::verbs (needs an RDMA device).
    Verbs,
}

impl SystemKind {
    fn label(self) -> &'static str {
        match self {
            SystemKind::RawTcp => "raw-tcp",
            SystemKind::Tcp => "tcp",
            SystemKind::Shm => "shm",
            SystemKind::ShmCopy => "shm-copy",
            SystemKind::Verbs => "verbs",
        }
    }
}

/// ib_write_bw's bandwidth at one frame size.
#[derive(Debug, Clone, Copy)]
struct Reference {
    frame: FrameSize,
    /// MB/s, MB = 2^20 bytes (perftest's unit).
    mb_per_s: f64,
}

fn parse_reference(s: &str) -> Result<Reference, String> {
    let (frame, value) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected FRAME=MB_PER_S, e.g. 1080p=45.2"))?;
    let frame = <FrameSize as clap::ValueEnum>::from_str(frame, true)
        .map_err(|_| format!("`{frame}`: not a frame size (720p, 1080p, 4k)"))?;
    let mb_per_s: f64 = value
        .parse()
        .map_err(|e| format!("`{value}`: not a bandwidth: {e}"))?;
    if !(mb_per_s.is_finite() && mb_per_s > 0.0) {
        return Err(format!("`{value}`: not a positive bandwidth"));
    }
    Ok(Reference { frame, mb_per_s })
}

/// Why a run failed. Any of these ends the process with a non-zero exit.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportBenchError {
    /// Which (system, frame) failed, and how.
    #[error("{system} {frame}: {source}")]
    Case {
        system: &'static str,
        frame: &'static str,
        #[source]
        source: Box<TransportBenchError>,
    },
    /// The receiving side found the wrong bytes (or a frame out of order).
    #[error("frame {seq} landed wrong: {what}")]
    Mismatch { seq: u64, what: String },
    #[error("{what}: {source}")]
    Transport {
        what: &'static str,
        #[source]
        source: TransportError,
    },
    #[error("connecting: {0}")]
    Connect(#[source] TransportError),
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
    #[error("slot message: {0}")]
    Slot(#[from] capnp_rdma::SlotError),
    #[error("a benchmark task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    #[error("waited {STALL:?} for {0}")]
    Stalled(&'static str),
    #[error("{0}")]
    Setup(&'static str),
}

impl TransportBenchError {
    fn mismatch(seq: u64, what: String) -> Self {
        TransportBenchError::Mismatch { seq, what }
    }

    fn connect(e: TransportError) -> Self {
        TransportBenchError::Connect(e)
    }
}

/// What one transport run gets: the messages to post (in the sender's region), the target's
/// region, the slot stride and both sides' shared state.
struct Case {
    messages: Vec<OutboundMessage>,
    sender_region: Region,
    target_region: Region,
    /// Bytes between slot starts (a message, rounded up to a page).
    stride: u64,
    flow: Arc<Flow>,
    receipts: Receipts,
}

fn plan(args: &Args) -> Plan {
    Plan::new(
        args.window,
        PlanFlags {
            quick: args.quick,
            min_frames: args.min_frames,
            min_time_ms: args.min_time_ms,
            warmup_frames: args.warmup_frames,
            max_frames: args.max_frames,
        },
    )
}

/// The RDMA device, opened once per run: `Err` says why there is none.
#[cfg(feature = "verbs")]
type Device = Result<capnp_rdma::transport::verbs::VerbsDevice, String>;
#[cfg(not(feature = "verbs"))]
type Device = Result<std::convert::Infallible, String>;

#[cfg(feature = "verbs")]
fn open_device() -> Device {
    verbs::open()
}

#[cfg(not(feature = "verbs"))]
fn open_device() -> Device {
    Err("built without the `verbs` feature".into())
}

/// A TCP listener on a free loopback port, and its address (every system's set-up socket).
async fn loopback_listener(
) -> Result<(tokio::net::TcpListener, std::net::SocketAddr), TransportBenchError> {
    let io = |what| move |source| TransportBenchError::Io { what, source };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io("bind"))?;
    let addr = listener.local_addr().map_err(io("local_addr"))?;
    Ok((listener, addr))
}

/// Runs the subcommand.
pub(crate) fn run(args: &Args) -> Result<(), TransportBenchError> {
    let plan = plan(args);
    let window = args.window as usize;
    let nproc = host_nproc();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| TransportBenchError::Io {
            what: "tokio runtime",
            source,
        })?;
    if !args.json {
        emit(&format!(
            "frame-bench transport: host nproc {nproc}; one process, tokio multi-thread runtime \
             (2 workers), loopback; window {window} ({} pre-built frames per system; shm: \
             {window}, built in place in the target's slots); {} warm-up frames, then at least {} \
             frames and {} ms per (system, frame)",
            window + 1,
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

    let mut device: Option<Device> = None;
    let mut records = Vec::new();
    let mut skipped: Vec<Skipped> = Vec::new();
    for &size in &frames {
        for &system in &systems {
            if system == SystemKind::Verbs {
                if let Err(reason) = device.get_or_insert_with(open_device) {
                    if skipped.is_empty() {
                        let skip = Skipped::new(system, reason.clone());
                        emit(&if args.json {
                            json_line(&skip)
                        } else {
                            skip.text()
                        })?;
                        skipped.push(skip);
                    }
                    continue;
                }
            }
            if !args.json {
                eprintln!("  measuring {} {} ...", system.label(), size.label());
            }
            let outcome = runtime
                .block_on(measure(system, size, window, plan, device.as_ref()))
                .map_err(|e| TransportBenchError::Case {
                    system: system.label(),
                    frame: size.label(),
                    source: Box::new(e),
                })?;
            let mut record = Record::new(system, size, window, &outcome);
            record.x_raw_tcp = records
                .iter()
                .find(|r: &&Record| r.system == "raw-tcp" && r.frame == size.label())
                .map(|raw| record.frames_per_s / raw.frames_per_s);
            if args.json {
                emit(&json_line(&record))?;
            }
            records.push(record);
        }
    }
    // Stop the runtime's tasks (a target's lease keeper, say) before the regions go away.
    runtime.shutdown_timeout(Duration::from_secs(5));

    let summary = Summary::new(&records, &args.ib_write_bw, nproc, window, args.quick);
    finish(args.json, args.quick, &summary, || report::table(&records)).map_err(stdout)
}

/// What a measurement produced, with the sizes the record reports.
struct Outcome {
    measured: Measured,
    /// Pixel bytes of one frame.
    frame_bytes: usize,
    /// Bytes of one write: the framed message.
    wire_bytes: u64,
}

/// Builds the frames and regions of one (system, frame), runs it, and tears it down.
async fn measure(
    system: SystemKind,
    size: FrameSize,
    window: usize,
    plan: Plan,
    device: Option<&Device>,
) -> Result<Outcome, TransportBenchError> {
    let payloads = window + 1;
    let (width, height) = size.dimensions();
    let frame_bytes =
        capnp_rdma::frame::frame_bytes(capnp_rdma::frame::PixelFormat::I420, width, height)? as u64;
    if system == SystemKind::Shm {
        // Built in place, after connecting: the frames live in the target's grant.
        let (measured, wire_bytes) = shm::run_in_place(size, Flow::new(plan, window, None)).await?;
        return Ok(Outcome {
            measured,
            frame_bytes: frame_bytes as usize,
            wire_bytes,
        });
    }
    // Each message: its planes and a small header segment, each rounded up to whole blocks.
    let sender_bytes = (frame_bytes + (1 << 20)) * payloads as u64 + (16 << 20);
    let sender_region = Region::create(&RegionOptions::memfd(sender_bytes))?;
    let set = FrameSet::build(size, payloads, &sender_region)?;
    let wire_bytes = set.expect.len();
    let stride = wire_bytes.next_multiple_of(4096);
    let sources = (system == SystemKind::RawTcp).then(|| set.wire_copies());
    let FrameSet {
        messages,
        frame_bytes,
        expect,
    } = set;
    let expect = Arc::new(expect);
    let flow = Flow::new(plan, window, None);
    let receipts = Receipts::new(&flow, &expect);
    let measured = match sources {
        Some(sources) => {
            drop(messages);
            raw_tcp::run(sources, flow, receipts).await?
        }
        None => {
            let target_bytes = stride * window as u64 + (16 << 20);
            let case = Case {
                messages,
                sender_region,
                target_region: Region::create(&RegionOptions::memfd(target_bytes))?,
                stride,
                flow,
                receipts,
            };
            run_case(system, device, case).await?
        }
    };
    Ok(Outcome {
        measured,
        frame_bytes,
        wire_bytes,
    })
}

/// Runs one of the library's backends.
async fn run_case(
    system: SystemKind,
    device: Option<&Device>,
    case: Case,
) -> Result<Measured, TransportBenchError> {
    match (system, device) {
        (SystemKind::Tcp, _) => tcp::run(case).await,
        (SystemKind::ShmCopy, _) => shm::run_copy(case).await,
        (SystemKind::Shm, _) => Err(TransportBenchError::Setup("shm builds its own frames")),
        #[cfg(feature = "verbs")]
        (SystemKind::Verbs, Some(Ok(device))) => verbs::run(device, case).await,
        (SystemKind::Verbs, _) => Err(TransportBenchError::Setup("verbs without a device")),
        (SystemKind::RawTcp, _) => Err(TransportBenchError::Setup("raw-tcp is not a backend")),
    }
}

/// Writes `text` and a newline to stdout, flushed; a closed pipe is an error, not a panic.
fn emit(text: &str) -> Result<(), TransportBenchError> {
    common::report::emit(text).map_err(stdout)
}

fn stdout(source: std::io::Error) -> TransportBenchError {
    TransportBenchError::Io {
        what: "stdout",
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            warmup: 3,
            min_frames: 4,
            min_time: Duration::ZERO,
            max_frames: 4,
            check_all: true,
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn every_backend_streams_checked_frames() {
        let rt = runtime();
        for system in [
            SystemKind::RawTcp,
            SystemKind::Tcp,
            SystemKind::Shm,
            SystemKind::ShmCopy,
        ] {
            let outcome = rt
                .block_on(measure(system, FrameSize::P720, 2, plan(), None))
                .unwrap_or_else(|e| panic!("{system:?}: {e}"));
            let timed = outcome.measured.timed;
            assert_eq!(timed.frames, 4, "{system:?}");
            assert_eq!(timed.warmup, 3);
            assert_eq!(outcome.frame_bytes, 1_382_400);
            assert!(outcome.wire_bytes > 1_382_400);
            assert!(timed.latency.median_ns > 0.0);
            assert!(!timed.elapsed.is_zero());
            // 3 warm-up + 4 measured writes: shm hands each over in place, shm-copy copies it.
            let copies = outcome.measured.shm_writer.map(|s| {
                assert_eq!(s.writes, 7, "{system:?}");
                (s.zero_copy_writes, s.bytes_copied)
            });
            let expected = match system {
                SystemKind::Shm => Some((7, 0)),
                SystemKind::ShmCopy => Some((0, 7 * outcome.wire_bytes)),
                _ => None,
            };
            assert_eq!(copies, expected, "{system:?}");
        }
    }

    /// The receiving side expects four messages round-robin while the sender has three: frame
    /// 3 lands message 0 where message 3 belongs, and the run fails with that frame.
    #[test]
    fn a_wrong_frame_fails_the_run() {
        let rt = runtime();
        let err = rt.block_on(async {
            let window = 2;
            let sender_region = Region::create(&RegionOptions::memfd(64 << 20)).unwrap();
            let sent = FrameSet::build(FrameSize::P720, window + 1, &sender_region).unwrap();
            let elsewhere = Region::create(&RegionOptions::memfd(64 << 20)).unwrap();
            let expected = FrameSet::build(FrameSize::P720, window + 2, &elsewhere).unwrap();
            let stride = sent.expect.len().next_multiple_of(4096);
            let flow = Flow::new(plan(), window, None);
            let receipts = Receipts::new(&flow, &Arc::new(expected.expect));
            let target_bytes = stride * window as u64 + (16 << 20);
            let case = Case {
                messages: sent.messages,
                sender_region,
                target_region: Region::create(&RegionOptions::memfd(target_bytes)).unwrap(),
                stride,
                flow,
                receipts,
            };
            tcp::run(case).await.unwrap_err()
        });
        assert!(
            matches!(err, TransportBenchError::Mismatch { seq: 3, .. }),
            "{err}"
        );
    }
}
