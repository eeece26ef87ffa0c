//! # capnp-rdma-benches
//!
//! The shared harness behind `frame-bench` and the criterion benches: per-iteration timing,
//! order statistics, minor page faults and process CPU time from `getrusage`, heap allocations
//! from a counting global allocator, and JSON output. Every figure `frame-bench roundtrip` prints
//! comes out of one [`measure`] call; `frame-bench transport` streams frames instead and uses the
//! statistics, counters and JSON.
//!
//! ```text
//!  warm-up batches (every result fully checked, not timed)
//!        │
//!        ▼
//!  ┌── batch ──────────────────────────────────────┐   between batches (not timed):
//!  │ counters ─▶ [Instant │ iteration │ elapsed]×N │──▶ e.g. quiesce the staging region
//!  │   (minflt,        one sample per iteration)   │
//!  │    allocs) ◀─ delta summed over batches        │
//!  └───────────────────────────────────────────────┘
//!        │ until min_iters and min_time are both reached
//!        ▼
//!  Run { samples, counters } ─▶ Stats (median, p99, mean)
//! ```
//!
//! ## Example
//! ```
//! use capnp_rdma_benches::{measure, Iteration, Sampler, Stats, Workload};
//! use std::time::Duration;
//!
//! struct Sum(u64);
//! impl Workload for Sum {
//!     type Error = std::convert::Infallible;
//!     fn iteration(&mut self, it: Iteration) -> Result<u64, Self::Error> {
//!         self.0 += std::hint::black_box(it.seq);
//!         Ok(8) // "bytes copied" by this iteration
//!     }
//! }
//!
//! let sampler = Sampler { min_iters: 10, min_time: Duration::ZERO, ..Sampler::default() };
//! let run = measure(&sampler, &mut Sum(0)).unwrap();
//! assert!(run.iters() >= 10);
//! assert_eq!(run.per_iter(run.counted), 8.0);
//! let stats = Stats::from_samples(&run.samples_ns);
//! assert!(stats.median_ns <= stats.p99_ns);
//! ```

#![deny(unsafe_op_in_unsafe_fn)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Allocation counting
// ---------------------------------------------------------------------------------------------

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static ALLOC_BYTES: AtomicU64 = AtomicU64::new(0);

/// A global allocator that counts allocation events and bytes, then defers to [`System`].
///
/// Install it in a benchmark binary with
/// `#[global_allocator] static GLOBAL: CountingAlloc = CountingAlloc;` and read the counters with
/// [`Counters::now`]. `alloc`, `alloc_zeroed` and `realloc` each count as one allocation;
/// frees are not counted. The counters are process-wide (every thread).
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingAlloc;

impl CountingAlloc {
    fn count(size: usize) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        ALLOC_BYTES.fetch_add(size as u64, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's own arguments, so `System`'s
// guarantees (valid, correctly aligned, non-overlapping blocks) are exactly what callers get;
// the counting touches only atomics and never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::count(layout.size());
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract (non-zero size), which is
        // `System::alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::count(layout.size());
        // SAFETY: same contract as `alloc`, forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was returned by this allocator, i.e. by `System`, with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::count(new_size);
        // SAFETY: `ptr` was returned by `System` with `layout`; the caller upholds `realloc`'s
        // contract for `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

// ---------------------------------------------------------------------------------------------
// Process counters: minor faults and allocations
// ---------------------------------------------------------------------------------------------

/// Minor page faults of the whole process so far (`getrusage(RUSAGE_SELF).ru_minflt`).
///
/// Counts every thread, so a background thread's faults during a measurement are included.
pub fn minor_faults() -> u64 {
    // SAFETY: `rusage` is plain old data for which all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable `rusage`; RUSAGE_SELF is always a valid target.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    // getrusage(RUSAGE_SELF, valid pointer) cannot fail (EFAULT/EINVAL only).
    assert_eq!(rc, 0, "getrusage(RUSAGE_SELF) failed");
    u64::try_from(usage.ru_minflt).unwrap_or(0)
}

/// CPU time (user + system) the whole process has used so far (`getrusage(RUSAGE_SELF)`:
/// `ru_utime + ru_stime`).
///
/// Counts every thread, so when both ends of a connection run in this process the difference of
/// two readings is what the pair cost together.
pub fn process_cpu_time() -> Duration {
    // SAFETY: `rusage` is plain old data for which all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable `rusage`; RUSAGE_SELF is always a valid target.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    // getrusage(RUSAGE_SELF, valid pointer) cannot fail (EFAULT/EINVAL only).
    assert_eq!(rc, 0, "getrusage(RUSAGE_SELF) failed");
    let timeval = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    timeval(usage.ru_utime) + timeval(usage.ru_stime)
}

/// A snapshot (or a difference of two snapshots) of the process counters a benchmark reports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Minor page faults.
    pub minflt: u64,
    /// Allocation events seen by [`CountingAlloc`] (zero unless it is the global allocator).
    pub allocs: u64,
    /// Bytes requested from [`CountingAlloc`].
    pub alloc_bytes: u64,
}

impl Counters {
    /// The counters now. Neither allocates nor touches new memory.
    pub fn now() -> Self {
        Self {
            minflt: minor_faults(),
            allocs: ALLOCS.load(Ordering::Relaxed),
            alloc_bytes: ALLOC_BYTES.load(Ordering::Relaxed),
        }
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            minflt: self.minflt.saturating_sub(earlier.minflt),
            allocs: self.allocs.saturating_sub(earlier.allocs),
            alloc_bytes: self.alloc_bytes.saturating_sub(earlier.alloc_bytes),
        }
    }

    fn add(&mut self, other: &Counters) {
        self.minflt += other.minflt;
        self.allocs += other.allocs;
        self.alloc_bytes += other.alloc_bytes;
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling loop
// ---------------------------------------------------------------------------------------------

/// How long and in what shape to measure.
#[derive(Debug, Clone)]
pub struct Sampler {
    /// Measure at least this many iterations.
    pub min_iters: u64,
    /// And keep measuring until this much wall time has passed (between-batch work included).
    pub min_time: Duration,
    /// Never measure more than this many iterations (the sample buffer is allocated up front).
    pub max_iters: u64,
    /// Iterations per batch; `between_batches` runs, untimed, after each batch.
    pub batch: u64,
    /// Untimed warm-up batches before measuring; their iterations have `check_all` set.
    pub warmup_batches: u64,
}

impl Default for Sampler {
    fn default() -> Self {
        Self {
            min_iters: 20,
            min_time: Duration::from_millis(1000),
            max_iters: 1 << 20,
            batch: 16,
            warmup_batches: 2,
        }
    }
}

/// What an iteration is told.
#[derive(Debug, Clone, Copy)]
pub struct Iteration {
    /// Sequence number of this iteration, increasing by one across warm-up and measurement.
    pub seq: u64,
    /// Set during warm-up: verify the whole result, not just the cheap per-iteration checksum.
    pub check_all: bool,
}

/// Something [`measure`] can time: one iteration at a time, in batches.
pub trait Workload {
    /// Why an iteration failed; the first error stops the measurement.
    type Error;

    /// One timed iteration. Returns a count to be summed over the measured iterations into
    /// [`Run::counted`] (for example the bytes this iteration copied).
    fn iteration(&mut self, it: Iteration) -> Result<u64, Self::Error>;

    /// Untimed work after every batch (warm-up batches included), e.g. letting a background
    /// thread catch up.
    fn between_batches(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Called once, untimed, after the warm-up and before the first measured batch: snapshot
    /// any statistics of your own here.
    fn start_measuring(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// The raw result of [`measure`].
#[derive(Debug, Clone)]
pub struct Run {
    /// Wall time of each measured iteration, in nanoseconds, in the order they ran.
    pub samples_ns: Vec<u64>,
    /// Sum of what the measured iterations returned.
    pub counted: u64,
    /// Counter deltas summed over the measured batches only (between-batch work excluded).
    pub in_batches: Counters,
    /// Counter deltas over the whole measurement, between-batch work included.
    pub overall: Counters,
    /// Wall time of the whole measurement, between-batch work included.
    pub wall: Duration,
    /// Number of measured batches.
    pub batches: u64,
}

impl Run {
    /// Number of measured iterations.
    pub fn iters(&self) -> u64 {
        self.samples_ns.len() as u64
    }

    /// `total / iters` as a float (0 when nothing was measured).
    pub fn per_iter(&self, total: u64) -> f64 {
        if self.samples_ns.is_empty() {
            0.0
        } else {
            total as f64 / self.samples_ns.len() as f64
        }
    }
}

/// Runs `work` in timed batches and returns one wall-time sample per iteration.
///
/// Warm-up: `sampler.warmup_batches` untimed batches with [`Iteration::check_all`] set, then
/// [`Workload::start_measuring`]. Then batches of `sampler.batch` iterations, each timed on its
/// own with [`Instant`], until at least `min_iters` iterations ran and `min_time` passed (or
/// `max_iters` is reached). [`Workload::between_batches`] runs after every batch, outside the
/// clock and outside [`Run::in_batches`] (it is inside [`Run::overall`]). The sample buffer is
/// allocated and touched before measuring, so the harness adds no allocation and no fault to
/// the counters. The first error stops the run and is returned.
pub fn measure<W: Workload + ?Sized>(sampler: &Sampler, work: &mut W) -> Result<Run, W::Error> {
    let batch = sampler.batch.max(1);
    let max_iters = sampler.max_iters.max(sampler.min_iters).max(1);
    let mut seq = 0u64;
    for _ in 0..sampler.warmup_batches {
        for _ in 0..batch {
            work.iteration(Iteration {
                seq,
                check_all: true,
            })?;
            seq += 1;
        }
        work.between_batches()?;
    }

    // Allocate and touch every sample slot now: growing the buffer later would allocate or
    // fault inside the measured batches.
    let cap = usize::try_from(max_iters).unwrap_or(usize::MAX);
    let mut samples = Vec::with_capacity(cap);
    samples.resize(cap, u64::MAX);
    let mut n = 0usize;
    let mut counted = 0u64;
    let mut in_batches = Counters::default();
    let mut batches = 0u64;
    work.start_measuring()?;

    let start_counters = Counters::now();
    let start = Instant::now();
    loop {
        let this_batch = batch.min(max_iters - n as u64) as usize;
        let before = Counters::now();
        for slot in &mut samples[n..n + this_batch] {
            let it = Iteration {
                seq,
                check_all: false,
            };
            let t0 = Instant::now();
            let result = work.iteration(it);
            let dt = t0.elapsed();
            counted += result?;
            *slot = u64::try_from(dt.as_nanos()).unwrap_or(u64::MAX);
            seq += 1;
        }
        in_batches.add(&Counters::now().since(&before));
        n += this_batch;
        work.between_batches()?;
        batches += 1;
        let done = n as u64 >= sampler.min_iters && start.elapsed() >= sampler.min_time;
        if done || n as u64 >= max_iters {
            break;
        }
    }
    let wall = start.elapsed();
    let overall = Counters::now().since(&start_counters);
    samples.truncate(n);
    Ok(Run {
        samples_ns: samples,
        counted,
        in_batches,
        overall,
        wall,
        batches,
    })
}

// ---------------------------------------------------------------------------------------------
// Statistics and output
// ---------------------------------------------------------------------------------------------

/// Order statistics of a set of per-iteration times.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Median (mean of the two middle samples for an even count).
    pub median_ns: f64,
    /// 99th percentile (nearest rank).
    pub p99_ns: f64,
    /// Arithmetic mean.
    pub mean_ns: f64,
    /// Fastest sample.
    pub min_ns: f64,
    /// Slowest sample.
    pub max_ns: f64,
}

impl Stats {
    /// Statistics of `samples` (all zero for an empty slice).
    pub fn from_samples(samples: &[u64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let n = sorted.len();
        let median_ns = if n % 2 == 1 {
            sorted[n / 2] as f64
        } else {
            (sorted[n / 2 - 1] as f64 + sorted[n / 2] as f64) / 2.0
        };
        // Nearest rank: the smallest sample with at least 99% of samples at or below it.
        let rank = (n * 99).div_ceil(100).clamp(1, n);
        let p99_ns = sorted[rank - 1] as f64;
        let mean_ns = sorted.iter().map(|&s| s as f64).sum::<f64>() / n as f64;
        Self {
            median_ns,
            p99_ns,
            mean_ns,
            min_ns: sorted[0] as f64,
            max_ns: sorted[n - 1] as f64,
        }
    }
}

/// Serializes `value` as one line of JSON.
pub fn json_line<T: serde::Serialize>(value: &T) -> String {
    // Serializing plain structs of numbers and strings into a String cannot fail.
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// Number of CPUs this process may run on (what `nproc` prints).
pub fn host_nproc() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_known_samples() {
        let samples: Vec<u64> = (1..=100).collect();
        let s = Stats::from_samples(&samples);
        assert_eq!(s.median_ns, 50.5);
        assert_eq!(s.p99_ns, 99.0);
        assert_eq!(s.mean_ns, 50.5);
        assert_eq!(s.min_ns, 1.0);
        assert_eq!(s.max_ns, 100.0);
        let odd = Stats::from_samples(&[5, 1, 3]);
        assert_eq!(odd.median_ns, 3.0);
        assert_eq!(odd.p99_ns, 5.0);
    }

    struct Recorder {
        seen: Vec<(u64, bool)>,
        between: u32,
        started_after: usize,
        fail_at: Option<u64>,
    }

    impl Workload for Recorder {
        type Error = u64;
        fn iteration(&mut self, it: Iteration) -> Result<u64, u64> {
            if self.fail_at == Some(it.seq) {
                return Err(it.seq);
            }
            self.seen.push((it.seq, it.check_all));
            Ok(3)
        }
        fn between_batches(&mut self) -> Result<(), u64> {
            self.between += 1;
            Ok(())
        }
        fn start_measuring(&mut self) -> Result<(), u64> {
            self.started_after = self.seen.len();
            Ok(())
        }
    }

    #[test]
    fn measure_runs_warmup_then_batches_and_stops_on_error() {
        let sampler = Sampler {
            min_iters: 10,
            min_time: Duration::ZERO,
            max_iters: 100,
            batch: 4,
            warmup_batches: 1,
        };
        let mut rec = Recorder {
            seen: Vec::new(),
            between: 0,
            started_after: 0,
            fail_at: None,
        };
        let run = measure(&sampler, &mut rec).unwrap();
        assert_eq!(run.iters(), 12); // three whole batches reach min_iters
        assert_eq!(run.batches, 3);
        assert_eq!(run.counted, 36);
        assert_eq!(rec.between, 4);
        assert_eq!(rec.started_after, 4);
        assert!(rec.seen[..4].iter().all(|&(_, check)| check));
        assert!(rec.seen[4..].iter().all(|&(_, check)| !check));
        assert_eq!(rec.seen.last().unwrap().0, 15);

        let mut failing = Recorder {
            seen: Vec::new(),
            between: 0,
            started_after: 0,
            fail_at: Some(6),
        };
        assert_eq!(measure(&sampler, &mut failing).unwrap_err(), 6);
    }

    #[test]
    fn process_cpu_time_advances_with_work() {
        let before = process_cpu_time();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        assert!(process_cpu_time() > before);
    }

    #[test]
    fn minor_faults_count_first_touch() {
        let before = minor_faults();
        let mut v = vec![0u8; 8 << 20];
        for i in (0..v.len()).step_by(4096) {
            v[i] = 1;
        }
        std::hint::black_box(&v);
        assert!(minor_faults() > before);
    }
}
