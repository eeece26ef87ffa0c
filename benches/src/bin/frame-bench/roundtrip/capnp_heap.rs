//! Baseline `capnp-heap`: stock Cap'n Proto with the default `HeapAllocator` and stream
//! serialization.
//!
//! Round trip: `FrameWriter::init` on a `Builder::new_default()`, copy each plane out of the
//! decoder's buffer into the message, `serialize::write_message` into a `Vec<u8>` sized up
//! front (so no hidden reallocation copies), `serialize::read_message` through a counting
//! reader into fresh segments, then `FrameView` to reach the planes. All three copies are
//! counted.

use super::pixels::{produce, Check, Middle, Source};
use super::{BenchError, Case, Variant};
use capnp::message::{Builder, ReaderOptions};
use capnp::serialize;
use capnp_rdma::frame::{FrameSpec, FrameView, FrameWriter};
use capnp_rdma_benches::{Iteration, Workload};

/// An `io::Read` that counts the bytes it hands out: what `read_message` copied.
struct CountingRead<'a> {
    inner: &'a [u8],
    read: u64,
}

impl std::io::Read for CountingRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// One (frame, variant) of the capnp-heap baseline.
pub(crate) struct CapnpHeapCase<'a> {
    check: Check<'a>,
    spec: FrameSpec,
    /// The decoder's output buffers, pre-filled with the source frame.
    decoded: Vec<Vec<u8>>,
    options: ReaderOptions,
}

impl<'a> CapnpHeapCase<'a> {
    pub(crate) const NAME: &'static str = "capnp-heap";

    pub(crate) fn new(source: &'a Source, variant: Variant) -> Self {
        let mut options = ReaderOptions::new();
        // FrameView reads every plane twice (validation, then access); leave ample room above
        // the 4K frame (the default limit is 8 Mi words).
        let frame_words = source.frame_bytes / 8;
        options.traversal_limit_in_words = Some((frame_words * 4).max(8 << 20));
        Self {
            check: Check {
                system: Self::NAME,
                source,
                variant,
            },
            spec: source.spec.clone(),
            decoded: source.planes.clone(),
            options,
        }
    }
}

impl Workload for CapnpHeapCase<'_> {
    type Error = BenchError;

    fn iteration(&mut self, it: Iteration) -> Result<u64, BenchError> {
        let source = self.check.source;
        let mut copied = 0u64;
        for (p, dst) in self.decoded.iter_mut().enumerate() {
            produce(self.check.variant, &source.planes[p], dst, p, it.seq);
        }

        self.spec.sequence = it.seq;
        let mut message = Builder::new_default();
        let mut writer = FrameWriter::init(&mut message, &self.spec)?;
        for (p, pixels) in (0..writer.plane_count()).zip(&self.decoded) {
            writer.plane_mut(p)?.copy_from_slice(pixels);
            copied += pixels.len() as u64;
        }

        let mut wire =
            Vec::with_capacity(serialize::compute_serialized_size_in_words(&message) * 8);
        serialize::write_message(&mut wire, &message)?;
        copied += wire.len() as u64;

        let mut counting = CountingRead {
            inner: &wire[..],
            read: 0,
        };
        let received = serialize::read_message(&mut counting, self.options)?;
        copied += counting.read;
        let view = FrameView::new(&received)?;
        let mut reached: [&[u8]; 4] = [&[]; 4];
        let count = view.plane_count()?.min(4);
        for (p, slot) in (0..count).zip(reached.iter_mut()) {
            *slot = view.plane(p)?;
        }
        let sequence = view.reader().get_sequence();
        self.check
            .verify(it, sequence, &reached[..count as usize], Middle::Source)?;
        drop(received);
        drop(wire);
        drop(message);
        Ok(copied)
    }
}

impl Case for CapnpHeapCase<'_> {}
