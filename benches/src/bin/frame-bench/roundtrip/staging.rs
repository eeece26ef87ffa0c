//! System `staging` (capnp-rdma): segments carved from a pre-faulted shared region, the
//! message sent as a scatter-gather list, read back in place.
//!
//! Round trip: `FrameWriter::init` on a `Builder<StagingAllocator>` (each plane gets its own
//! segment in the region), the decoder's write into the segments (with-pixels only; both
//! variants stamp the six marker bytes), `SgeList::build`, `SgeList::read` (the receiver's
//! in-place, bounds-checked read through the entries), `FrameView` to reach the planes, drop.
//! Bytes copied are what the library reports (`SgeList::bytes_copied`).
//!
//! Dropping the message releases its blocks to the region's background scrubber, which zeroes
//! them off the producer's path. Between batches the harness waits for it (`Region::quiesce`,
//! outside the clock) so the region never runs dry; what the scrubber did is reported per frame
//! from the region's counters, not hidden.

use super::pixels::{produce, Check, Middle, Source};
use super::{BenchError, Case, Variant};
use capnp::message::Builder;
use capnp_rdma::frame::{FrameSpec, FrameView, FrameWriter};
use capnp_rdma::framing::{FramingError, FramingOptions, SgeList};
use capnp_rdma::reader::{ReadError, ReadOptions};
use capnp_rdma::{Region, RegionError, RegionOptions, RegionStats, StagingAllocator};
use capnp_rdma_benches::{Iteration, Workload};

/// Size of the staging region: 1 GiB (default 64 KiB blocks, pre-faulted at creation).
const REGION_BYTES: u64 = 1 << 30;

/// Why the staging system failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StagingError {
    #[error("region: {0}")]
    Region(#[from] RegionError),
    #[error("framing: {0}")]
    Framing(#[from] FramingError),
    #[error("reading back: {0}")]
    Read(#[from] ReadError),
    #[error("{0} blocks still in use after the scrubber went quiet (a leak)")]
    Leak(u64),
}

impl From<RegionError> for BenchError {
    fn from(e: RegionError) -> Self {
        BenchError::Staging(e.into())
    }
}

impl From<FramingError> for BenchError {
    fn from(e: FramingError) -> Self {
        BenchError::Staging(e.into())
    }
}

impl From<ReadError> for BenchError {
    fn from(e: ReadError) -> Self {
        BenchError::Staging(e.into())
    }
}

/// What the region's counters moved by during a measurement.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScrubDelta {
    /// Bytes the background scrubber zeroed.
    pub(crate) scrubbed_bytes: u64,
    /// Time the background scrubber spent zeroing.
    pub(crate) scrub_nanos: u64,
    /// Bytes zeroed inline at release, on the producer's path (small segments).
    pub(crate) inline_scrubbed_bytes: u64,
    /// Segment allocations from the region.
    pub(crate) allocations: u64,
    /// Segments that fell back to the heap.
    pub(crate) fallbacks: u64,
}

impl ScrubDelta {
    fn between(start: &RegionStats, end: &RegionStats) -> Self {
        Self {
            scrubbed_bytes: end.scrubbed_bytes.saturating_sub(start.scrubbed_bytes),
            scrub_nanos: end.scrub_nanos.saturating_sub(start.scrub_nanos),
            inline_scrubbed_bytes: end
                .inline_scrubbed_bytes
                .saturating_sub(start.inline_scrubbed_bytes),
            allocations: end.allocations.saturating_sub(start.allocations),
            fallbacks: end.fallbacks.saturating_sub(start.fallbacks),
        }
    }
}

/// The region every staging case of this process uses.
pub(crate) struct Staging {
    region: Region,
}

impl Staging {
    pub(crate) fn new() -> Result<Self, StagingError> {
        Ok(Self {
            region: Region::create(&RegionOptions::memfd(REGION_BYTES))?,
        })
    }

    pub(crate) fn case<'a>(&'a self, source: &'a Source, variant: Variant) -> StagingCase<'a> {
        StagingCase {
            region: &self.region,
            check: Check {
                system: StagingCase::NAME,
                source,
                variant,
            },
            spec: source.spec.clone(),
            framing: FramingOptions::default(),
            read: ReadOptions::default(),
            start: None,
        }
    }
}

/// One (frame, variant) of the staging system.
pub(crate) struct StagingCase<'a> {
    region: &'a Region,
    check: Check<'a>,
    spec: FrameSpec,
    framing: FramingOptions,
    read: ReadOptions,
    start: Option<RegionStats>,
}

impl StagingCase<'_> {
    pub(crate) const NAME: &'static str = "staging";
}

impl Workload for StagingCase<'_> {
    type Error = BenchError;

    fn iteration(&mut self, it: Iteration) -> Result<u64, BenchError> {
        let source = self.check.source;
        let variant = self.check.variant;
        self.spec.sequence = it.seq;
        let mut message = Builder::new(StagingAllocator::new(self.region));
        let mut writer = FrameWriter::init(&mut message, &self.spec)?;
        for (p, pixels) in (0..writer.plane_count()).zip(&source.planes) {
            produce(variant, pixels, writer.plane_mut(p)?, p as usize, it.seq);
        }

        let sges = SgeList::build(self.region, &mut message, &self.framing)?;
        let copied = sges.bytes_copied() as u64;

        let received = sges.read(&self.read)?;
        let view = FrameView::new(&received)?;
        let mut reached: [&[u8]; 4] = [&[]; 4];
        let count = view.plane_count()?.min(4);
        for (p, slot) in (0..count).zip(reached.iter_mut()) {
            *slot = view.plane(p)?;
        }
        let sequence = view.reader().get_sequence();
        // Pixels-ready: nothing wrote between the markers, so the region's zeroed blocks show.
        let middle = match variant {
            Variant::PixelsReady => Middle::Zero,
            Variant::WithPixels => Middle::Source,
        };
        self.check
            .verify(it, sequence, &reached[..count as usize], middle)?;
        drop(received);
        drop(sges);
        drop(message);
        Ok(copied)
    }

    fn between_batches(&mut self) -> Result<(), BenchError> {
        self.region.quiesce();
        let in_use = self.region.stats().blocks_in_use;
        if in_use != 0 {
            return Err(StagingError::Leak(in_use).into());
        }
        Ok(())
    }

    fn start_measuring(&mut self) -> Result<(), BenchError> {
        self.start = Some(self.region.stats());
        Ok(())
    }
}

impl Case for StagingCase<'_> {
    fn scrub_delta(&self) -> Option<ScrubDelta> {
        // The last measured batch ended with `between_batches`, so the scrubber is quiet.
        let start = self.start?;
        Some(ScrubDelta::between(&start, &self.region.stats()))
    }
}
