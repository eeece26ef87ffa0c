//! Block bitmap hot path: one `allocate(k)` + `free` pair per element, on a 16384-block bitmap
//! (a 64 MiB region of 4 KiB blocks), empty or half full with fragmented holes, and with two
//! threads contending for the same words.
//!
//! `cargo bench -p capnp-rdma-benches --bench bitmap`

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use capnp_rdma::bitmap::{BlockBitmap, OwnedBitmap};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const BLOCKS: u64 = 16384;
const RUN_LENGTHS: [u64; 3] = [1, 16, 48];

/// A tiny deterministic generator (xorshift64) so every run sees the same layout.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Fills the bitmap with runs of 1..=96 blocks, then frees every other one: about half the
/// blocks in use, with free holes of 1..=96 blocks scattered over the whole bitmap.
fn fragment(bitmap: &BlockBitmap<'_>) {
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut runs = Vec::new();
    while let Ok(start) = bitmap.allocate(1 + rng.next() % 96) {
        runs.push(start);
    }
    // Fill the tail too, so every hole comes from a freed run.
    while let Ok(start) = bitmap.allocate(1) {
        runs.push(start);
    }
    let run_end = |i: usize| runs.get(i + 1).copied().unwrap_or(BLOCKS);
    for i in (0..runs.len()).step_by(2) {
        let end = run_end(i);
        bitmap
            .free(runs[i], end - runs[i])
            .expect("freeing a run allocated above");
    }
}

fn alloc_free(c: &mut Criterion, fill: &str, fragmented: bool) {
    let mut group = c.benchmark_group(format!("bitmap-{BLOCKS}blocks-fill{fill}"));
    group.throughput(Throughput::Elements(1));
    for k in RUN_LENGTHS {
        let owned = OwnedBitmap::new(BLOCKS);
        let bitmap = owned.view();
        if fragmented {
            fragment(&bitmap);
        }
        group.bench_with_input(BenchmarkId::new("alloc+free", k), &k, |b, &k| {
            b.iter(|| {
                let start = bitmap.allocate(black_box(k)).expect("a run of k exists");
                bitmap.free(start, k).expect("just allocated");
            })
        });
    }
    group.finish();
}

fn empty(c: &mut Criterion) {
    alloc_free(c, "0pct", false);
}

fn fragmented(c: &mut Criterion) {
    alloc_free(c, "50pct-fragmented", true);
}

/// Two threads, each doing `iters` allocate(16) + free pairs on the same empty bitmap; the
/// reported time is wall time / iters, i.e. the time of one pair while the other thread runs.
fn contended(c: &mut Criterion) {
    const THREADS: usize = 2;
    const K: u64 = 16;
    let mut group = c.benchmark_group(format!("bitmap-{BLOCKS}blocks-fill0pct-{THREADS}threads"));
    group.throughput(Throughput::Elements(1));
    let owned = OwnedBitmap::new(BLOCKS);
    let bitmap = owned.view();
    group.bench_function(BenchmarkId::new("alloc+free", K), |b| {
        b.iter_custom(|iters| {
            let barrier = Barrier::new(THREADS);
            std::thread::scope(|scope| {
                let workers: Vec<_> = (0..THREADS)
                    .map(|_| {
                        scope.spawn(|| {
                            barrier.wait();
                            let started = Instant::now();
                            for _ in 0..iters {
                                let start = bitmap.allocate(black_box(K)).expect("mostly empty");
                                bitmap.free(start, K).expect("just allocated");
                            }
                            started.elapsed()
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().expect("worker panicked"))
                    .max()
                    .unwrap_or(Duration::ZERO)
            })
        })
    });
    group.finish();
}

criterion_group!(benches, empty, fragmented, contended);
criterion_main!(benches);
