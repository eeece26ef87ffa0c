//! Records, the human table and the summary of the targets.

use crate::common::report::{opt, target_line, Targets};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// One measured (system, frame, variant). Per-frame figures are totals over the measured
/// iterations divided by `iters`; times are per iteration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) system: String,
    pub(crate) frame: String,
    pub(crate) variant: String,
    pub(crate) frame_bytes: usize,
    pub(crate) iters: u64,
    pub(crate) batch: u64,
    /// Median of the per-iteration times.
    pub(crate) ns_per_frame: f64,
    pub(crate) p99_ns: f64,
    pub(crate) mean_ns: f64,
    pub(crate) min_ns: f64,
    pub(crate) max_ns: f64,
    /// This median over staging's median for the same frame and variant.
    pub(crate) ratio_vs_staging: Option<f64>,
    /// Minor faults during the measured batches (every thread of the process).
    pub(crate) minflt_per_frame: f64,
    /// Minor faults over the whole measurement, between-batch work included.
    pub(crate) minflt_overall_per_frame: f64,
    /// Bytes the messaging path copied (excluding the decoder's own write of the pixels).
    pub(crate) bytes_copied_per_frame: f64,
    /// Heap allocations (alloc, alloc_zeroed, realloc) during the measured batches.
    pub(crate) allocs_per_frame: f64,
    pub(crate) alloc_bytes_per_frame: f64,
    /// Staging only: time the background scrubber spent zeroing released blocks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) scrub_ns_per_frame: Option<f64>,
    /// Staging only: bytes the background scrubber zeroed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) zeroed_bytes_per_frame: Option<f64>,
    /// Staging only: bytes zeroed on the producer's path because the scrubber was behind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) inline_scrubbed_bytes_per_frame: Option<f64>,
    /// Staging only: segment allocations served by the region.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) region_allocations_per_frame: Option<f64>,
    /// Staging only: allocations the region could not serve (fell back).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) region_fallbacks: Option<u64>,
    /// Wall time of the measurement, between-batch work included.
    pub(crate) wall_ms: f64,
}

/// The human table.
pub(crate) fn table(records: &[Record]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:<10} {:<5} {:<12} {:>6} {:>13} {:>13} {:>10} {:>9} {:>12} {:>9} {:>12} {:>12}",
        "system",
        "frame",
        "variant",
        "iters",
        "median ns/fr",
        "p99 ns",
        "x staging",
        "minflt/fr",
        "copied B/fr",
        "allocs/fr",
        "scrub ns/fr",
        "zeroed B/fr"
    );
    for r in records {
        let _ = writeln!(
            out,
            "{:<10} {:<5} {:<12} {:>6} {:>13.0} {:>13.0} {:>10} {:>9.2} {:>12.0} {:>9.2} {:>12} {:>12}",
            r.system,
            r.frame,
            r.variant,
            r.iters,
            r.ns_per_frame,
            r.p99_ns,
            opt(r.ratio_vs_staging, 1),
            r.minflt_per_frame,
            r.bytes_copied_per_frame,
            r.allocs_per_frame,
            opt(r.scrub_ns_per_frame, 0),
            opt(r.zeroed_bytes_per_frame, 0),
        );
    }
    out
}

/// The ratios the targets are about, as one JSON object (`"system": "summary"`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Summary {
    system: &'static str,
    host_nproc: usize,
    /// prost median / staging median, 1080p pixels-ready (target >= 1000).
    prost_over_staging_1080p: Option<f64>,
    /// capnp-heap median / staging median, 1080p pixels-ready (target >= 100).
    capnp_heap_over_staging_1080p: Option<f64>,
    /// staging 4k median / staging 720p median, pixels-ready (target <= 1.5).
    staging_4k_over_720p: Option<f64>,
    /// Largest staging minflt/frame over every measured staging record (target 0).
    staging_minflt_per_frame: Option<f64>,
    prost_over_staging_1080p_with_pixels: Option<f64>,
    capnp_heap_over_staging_1080p_with_pixels: Option<f64>,
    staging_4k_over_720p_with_pixels: Option<f64>,
    target_prost_1000x: Option<bool>,
    target_capnp_heap_100x: Option<bool>,
    target_4k_within_1_5x_of_720p: Option<bool>,
    target_zero_minflt: Option<bool>,
}

fn median(records: &[Record], system: &str, frame: &str, variant: &str) -> Option<f64> {
    records
        .iter()
        .find(|r| r.system == system && r.frame == frame && r.variant == variant)
        .map(|r| r.ns_per_frame)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? / b?)
}

impl Summary {
    pub(crate) fn new(records: &[Record], host_nproc: usize) -> Self {
        let ready = "pixels-ready";
        let with = "with-pixels";
        let m = |s: &str, f: &str, v: &str| median(records, s, f, v);
        let prost = ratio(m("prost", "1080p", ready), m("staging", "1080p", ready));
        let heap = ratio(
            m("capnp-heap", "1080p", ready),
            m("staging", "1080p", ready),
        );
        let scale = ratio(m("staging", "4k", ready), m("staging", "720p", ready));
        let minflt = records
            .iter()
            .filter(|r| r.system == "staging")
            .map(|r| r.minflt_per_frame)
            .reduce(f64::max);
        Self {
            system: "summary",
            host_nproc,
            prost_over_staging_1080p: prost,
            capnp_heap_over_staging_1080p: heap,
            staging_4k_over_720p: scale,
            staging_minflt_per_frame: minflt,
            prost_over_staging_1080p_with_pixels: ratio(
                m("prost", "1080p", with),
                m("staging", "1080p", with),
            ),
            capnp_heap_over_staging_1080p_with_pixels: ratio(
                m("capnp-heap", "1080p", with),
                m("staging", "1080p", with),
            ),
            staging_4k_over_720p_with_pixels: ratio(
                m("staging", "4k", with),
                m("staging", "720p", with),
            ),
            target_prost_1000x: prost.map(|r| r >= 1000.0),
            target_capnp_heap_100x: heap.map(|r| r >= 100.0),
            target_4k_within_1_5x_of_720p: scale.map(|r| r <= 1.5),
            target_zero_minflt: minflt.map(|f| f == 0.0),
        }
    }
}

impl Targets for Summary {
    fn targets_text(&self) -> String {
        /// Width of the targets' column.
        const WHAT: usize = 62;
        let mut out = String::new();
        let _ = writeln!(out, "\ntargets (host nproc {}):", self.host_nproc);
        target_line(
            &mut out,
            WHAT,
            "staging >= 1000x faster than prost (1080p, pixels-ready)",
            self.target_prost_1000x,
            format!("{}x", opt(self.prost_over_staging_1080p, 1)),
        );
        target_line(
            &mut out,
            WHAT,
            "staging >= 100x faster than capnp-heap (1080p, pixels-ready)",
            self.target_capnp_heap_100x,
            format!("{}x", opt(self.capnp_heap_over_staging_1080p, 1)),
        );
        target_line(
            &mut out,
            WHAT,
            "staging 4k within 1.5x of 720p (pixels-ready)",
            self.target_4k_within_1_5x_of_720p,
            format!("{}x", opt(self.staging_4k_over_720p, 2)),
        );
        target_line(
            &mut out,
            WHAT,
            "0 minor faults per staging frame (worst record)",
            self.target_zero_minflt,
            format!("{} minflt/frame", opt(self.staging_minflt_per_frame, 3)),
        );
        let _ = writeln!(
            out,
            "  with pixels inside the clock (1080p): prost {}x, capnp-heap {}x; staging 4k/720p {}x",
            opt(self.prost_over_staging_1080p_with_pixels, 1),
            opt(self.capnp_heap_over_staging_1080p_with_pixels, 1),
            opt(self.staging_4k_over_720p_with_pixels, 2),
        );
        out
    }
}
