//! Criterion: building a `Frame` message (header plus every plane allocated, no pixels written)
//! and dropping it, with capnp-rdma's `StagingAllocator` and with capnp's default
//! `HeapAllocator`.
//!
//! Groups are named after their settings: `frame_build_drop/<format>_<width>x<height>`, one
//! function per allocator. Throughput is the frame's pixel bytes. Staging releases its blocks
//! to the region's background scrubber; every 16 iterations the bench waits for it
//! (`Region::quiesce`) outside the timed section, as `frame-bench` does, so the region never
//! runs dry and no iteration falls back to the heap.
//!
//! ```text
//! cargo bench -p capnp-rdma-benches --bench allocator
//! ```

use capnp::message::{Allocator, Builder};
use capnp_rdma::frame::{frame_bytes, FrameSpec, FrameWriter, PixelFormat};
use capnp_rdma::{Region, RegionOptions, StagingAllocator};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Iterations between two waits for the scrubber.
const BATCH: u64 = 16;

/// 1 GiB region with the default 64 KiB blocks, pre-faulted.
const REGION_BYTES: u64 = 1 << 30;

fn build_and_drop<A: Allocator>(mut message: Builder<A>, spec: &FrameSpec) {
    let frame = FrameWriter::init(&mut message, spec).expect("a valid I420 geometry");
    black_box(frame.plane_count());
    black_box(&message);
}

/// Times `iters` build-and-drops in batches of [`BATCH`], running `between` untimed after
/// each batch.
fn timed_batches(iters: u64, mut one: impl FnMut(), mut between: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let n = BATCH.min(iters - done);
        let start = Instant::now();
        for _ in 0..n {
            one();
        }
        total += start.elapsed();
        between();
        done += n;
    }
    total
}

fn frame_group(c: &mut Criterion, region: &Region, width: u32, height: u32) {
    let spec = FrameSpec::new(PixelFormat::I420, width, height);
    let bytes = frame_bytes(spec.format, width, height).expect("a valid I420 geometry");
    let mut group = c.benchmark_group(format!("frame_build_drop/i420_{width}x{height}"));
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("staging_allocator", |b| {
        b.iter_custom(|iters| {
            timed_batches(
                iters,
                || build_and_drop(Builder::new(StagingAllocator::new(region)), &spec),
                || region.quiesce(),
            )
        });
    });
    group.bench_function("heap_allocator", |b| {
        b.iter_custom(|iters| {
            timed_batches(
                iters,
                || build_and_drop(Builder::new_default(), &spec),
                || {},
            )
        });
    });
    group.finish();
    let fallbacks = region.stats().fallbacks;
    assert_eq!(fallbacks, 0, "staging segments fell back to the heap");
}

fn allocators(c: &mut Criterion) {
    let region = Region::create(&RegionOptions::memfd(REGION_BYTES)).expect("creating the region");
    // 1080p I420: three planes of 2,073,600 + 518,400 + 518,400 bytes, each its own segment.
    frame_group(c, &region, 1920, 1080);
    // A small message: the frame header with three tiny planes (256 + 64 + 64 bytes).
    frame_group(c, &region, 16, 16);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = allocators
}
criterion_main!(benches);
