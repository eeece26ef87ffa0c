//! `frame-bench roundtrip`: one video frame per iteration, built, framed, read back and
//! dropped, for each system, frame size and variant.
//!
//! ```text
//!  for frame in --frames:                     Source (pre-generated pixels, untimed)
//!    for variant in [pixels-ready, with-pixels]:
//!      for system in [staging, then the rest of --systems]:
//!        measure(case)  ── timed per iteration ──────────────────────────────────────┐
//!          producer:  (with-pixels: decoder memcpy) + markers ─▶ build message        │
//!          wire:      SGE list (staging) / Vec<u8> (capnp-heap, prost)                │
//!          receiver:  read back, reach every plane, checksum == expected, drop all ◀─┘
//!        ─▶ Record (JSON line or table row; ratio against staging's median)
//!  summary: the ratios the targets are about
//! ```
//!
//! Variants: `pixels-ready` has the decoder's pixels already in place before the clock starts
//! (a separate pre-filled buffer for the baselines, which then copy it into their message; the
//! staging segments themselves for staging, so its producer writes no pixels); `with-pixels`
//! puts the decoder's write (a memcpy from the source frame into that place) inside the clock.
//! Both stamp six marker bytes per frame so that every read-back is checked.
//!
//! Each (system, frame, variant) runs in a child process of its own unless `--in-process` is
//! given (see [`child`]). `bytes_copied_per_frame` counts the copies the messaging path makes
//! (the decoder's own write, the same for every system, is not counted).

mod capnp_heap;
mod child;
mod pixels;
mod prost_frame;
mod report;
mod staging;

use crate::common::report::finish;
use capnp_rdma_benches::{host_nproc, json_line, measure, Run, Sampler, Stats, Workload};
use pixels::Source;
use report::Record;
use std::time::Duration;

/// Flags of `frame-bench roundtrip`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print one JSON object per line per (system, frame, variant), then a summary object.
    #[arg(long)]
    json: bool,
    /// Frame sizes (I420).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "720p,1080p,4k"
    )]
    frames: Vec<FrameSize>,
    /// Systems to measure; staging is always measured first so the others have a ratio.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "staging,capnp-heap,prost"
    )]
    systems: Vec<SystemKind>,
    /// Measure at least this many frames per (system, frame, variant)
    /// [default: 20, or 4 with --quick].
    #[arg(long)]
    min_iters: Option<u64>,
    /// And at least this much wall time per measurement [default: 1200, or 0 with --quick].
    #[arg(long)]
    min_time_ms: Option<u64>,
    /// Frames per batch; staging quiesces its region between batches, outside the clock.
    #[arg(long, default_value_t = 16)]
    batch: u64,
    /// Variants: pixels-ready (the decoder's pixels exist before the clock starts) and
    /// with-pixels (the decoder's write is timed too).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "pixels-ready,with-pixels"
    )]
    variants: Vec<Variant>,
    /// Tiny iteration counts for a CI smoke run: every system runs and every result is checked.
    #[arg(long)]
    quick: bool,
    /// Measure everything in this one process. By default each (system, frame, variant) runs
    /// in a fresh child process, so that one measurement's heap state (glibc's adaptive mmap
    /// and trim thresholds) does not carry over into the next.
    #[arg(long)]
    in_process: bool,
}

/// A frame size; every frame is I420.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum FrameSize {
    /// 1280x720, 1,382,400 bytes.
    #[value(name = "720p")]
    P720,
    /// 1920x1080, 3,110,400 bytes.
    #[value(name = "1080p")]
    P1080,
    /// 3840x2160, 12,441,600 bytes.
    #[value(name = "4k")]
    K4,
}

impl FrameSize {
    pub(crate) fn dimensions(self) -> (u32, u32) {
        match self {
            FrameSize::P720 => (1280, 720),
            FrameSize::P1080 => (1920, 1080),
            FrameSize::K4 => (3840, 2160),
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            FrameSize::P720 => "720p",
            FrameSize::P1080 => "1080p",
            FrameSize::K4 => "4k",
        }
    }
}

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SystemKind {
    /// capnp-rdma: StagingAllocator segments in a shared region, sent as an SGE list.
    Staging,
    /// Stock Cap'n Proto: HeapAllocator, write_message, read_message.
    CapnpHeap,
    /// Protocol Buffers via prost: encode_to_vec, decode.
    Prost,
}

/// Whether producing the pixels is inside the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Variant {
    /// The decoder's pixels exist before the clock starts.
    PixelsReady,
    /// The decoder's write of the pixels is timed too.
    WithPixels,
}

impl Variant {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Variant::PixelsReady => "pixels-ready",
            Variant::WithPixels => "with-pixels",
        }
    }
}

/// Why a round trip failed. Any of these ends the run with a non-zero exit.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BenchError {
    /// The receiving side reached the wrong bytes.
    #[error("{system} {frame} {variant}: frame {seq} read back wrong: {what}")]
    Mismatch {
        system: &'static str,
        frame: &'static str,
        variant: &'static str,
        seq: u64,
        what: String,
    },
    #[error("frame layout: {0}")]
    Frame(#[from] capnp_rdma::frame::FrameError),
    #[error("capnp: {0}")]
    Capnp(#[from] capnp::Error),
    #[error("prost decode: {0}")]
    ProstDecode(#[from] prost::DecodeError),
    #[error("measuring {what} in a child process: {why}")]
    Child { what: String, why: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("staging selected but no region was created")]
    NoRegion,
    #[error("staging: {0}")]
    Staging(#[from] staging::StagingError),
}

/// One measurable (system, frame, variant).
pub(crate) trait Case: Workload<Error = BenchError> {
    /// For staging: what the region's background scrubber did during the measurement.
    fn scrub_delta(&self) -> Option<staging::ScrubDelta> {
        None
    }
}

fn sampler(args: &Args) -> Sampler {
    let (min_iters, min_time_ms, warmup_batches, batch) = if args.quick {
        (4, 0, 4, args.batch.min(4))
    } else {
        (20, 1200, 2, args.batch)
    };
    Sampler {
        min_iters: args.min_iters.unwrap_or(min_iters),
        min_time: Duration::from_millis(args.min_time_ms.unwrap_or(min_time_ms)),
        batch,
        warmup_batches,
        ..Sampler::default()
    }
}

/// Staging first (the others' ratios are against it), then the rest in the order given.
fn ordered_systems(requested: &[SystemKind]) -> Vec<SystemKind> {
    let mut out = Vec::new();
    if requested.contains(&SystemKind::Staging) {
        out.push(SystemKind::Staging);
    }
    for &s in requested {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

impl SystemKind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            SystemKind::Staging => staging::StagingCase::NAME,
            SystemKind::CapnpHeap => capnp_heap::CapnpHeapCase::NAME,
            SystemKind::Prost => prost_frame::ProstCase::NAME,
        }
    }
}

/// Runs the subcommand.
pub(crate) fn run(args: &Args) -> Result<(), BenchError> {
    let sampler = sampler(args);
    let nproc = host_nproc();
    if !args.json {
        let isolation = if args.in_process {
            "all in one process"
        } else {
            "one child process each"
        };
        emit(&format!(
            "frame-bench roundtrip: host nproc {nproc}; min {} iters and {} ms per measurement, \
             batches of {}, {} warm-up batches, {isolation}",
            sampler.min_iters,
            sampler.min_time.as_millis(),
            sampler.batch,
            sampler.warmup_batches,
        ))?;
    }
    let mut frames = args.frames.clone();
    frames.dedup();
    let mut variants = args.variants.clone();
    variants.dedup();
    let systems = ordered_systems(&args.systems);
    let staging = if args.in_process && systems.contains(&SystemKind::Staging) {
        Some(staging::Staging::new()?)
    } else {
        None
    };

    let mut records = Vec::new();
    for &size in &frames {
        let source = if args.in_process {
            Some(Source::new(size)?)
        } else {
            None
        };
        for &variant in &variants {
            let mut staging_median = None;
            for &system in &systems {
                if !args.json {
                    eprintln!(
                        "  measuring {} {} {} ...",
                        system.label(),
                        size.label(),
                        variant.label()
                    );
                }
                let mut record = match &source {
                    Some(source) => {
                        measure_here(&sampler, system, source, variant, staging.as_ref())?
                    }
                    None => child::measure_one(args, system, size, variant)?,
                };
                if system == SystemKind::Staging {
                    staging_median = Some(record.ns_per_frame);
                }
                record.ratio_vs_staging = staging_median.map(|s| record.ns_per_frame / s);
                if args.json {
                    emit(&json_line(&record))?;
                }
                records.push(record);
            }
        }
    }

    let summary = report::Summary::new(&records, nproc);
    finish(args.json, args.quick, &summary, || report::table(&records))?;
    Ok(())
}

/// Measures one (system, frame, variant) in this process.
fn measure_here(
    sampler: &Sampler,
    system: SystemKind,
    source: &Source,
    variant: Variant,
    staging: Option<&staging::Staging>,
) -> Result<Record, BenchError> {
    let mut case: Box<dyn Case + '_> = match system {
        SystemKind::Staging => {
            // `run` creates the region whenever staging is selected.
            let staging = staging.ok_or(BenchError::NoRegion)?;
            Box::new(staging.case(source, variant))
        }
        SystemKind::CapnpHeap => Box::new(capnp_heap::CapnpHeapCase::new(source, variant)),
        SystemKind::Prost => Box::new(prost_frame::ProstCase::new(source, variant)?),
    };
    let run = measure(sampler, case.as_mut())?;
    let scrub = case.scrub_delta();
    Ok(record(system, source, variant, sampler, &run, scrub))
}

/// Writes `text` and a newline to stdout, flushed; a closed pipe is an error, not a panic.
fn emit(text: &str) -> Result<(), BenchError> {
    Ok(crate::common::report::emit(text)?)
}

fn record(
    system: SystemKind,
    source: &Source,
    variant: Variant,
    sampler: &Sampler,
    run: &Run,
    scrub: Option<staging::ScrubDelta>,
) -> Record {
    let stats = Stats::from_samples(&run.samples_ns);
    Record {
        system: system.label().to_string(),
        frame: source.size.label().to_string(),
        variant: variant.label().to_string(),
        frame_bytes: source.frame_bytes,
        iters: run.iters(),
        batch: sampler.batch,
        ns_per_frame: stats.median_ns,
        p99_ns: stats.p99_ns,
        mean_ns: stats.mean_ns,
        min_ns: stats.min_ns,
        max_ns: stats.max_ns,
        ratio_vs_staging: None,
        minflt_per_frame: run.per_iter(run.in_batches.minflt),
        minflt_overall_per_frame: run.per_iter(run.overall.minflt),
        bytes_copied_per_frame: run.per_iter(run.counted),
        allocs_per_frame: run.per_iter(run.in_batches.allocs),
        alloc_bytes_per_frame: run.per_iter(run.in_batches.alloc_bytes),
        scrub_ns_per_frame: scrub.map(|s| run.per_iter(s.scrub_nanos)),
        zeroed_bytes_per_frame: scrub.map(|s| run.per_iter(s.scrubbed_bytes)),
        inline_scrubbed_bytes_per_frame: scrub.map(|s| run.per_iter(s.inline_scrubbed_bytes)),
        region_allocations_per_frame: scrub.map(|s| run.per_iter(s.allocations)),
        region_fallbacks: scrub.map(|s| s.fallbacks),
        wall_ms: run.wall.as_secs_f64() * 1e3,
    }
}
