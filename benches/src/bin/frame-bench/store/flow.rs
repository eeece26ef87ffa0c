//! The stream every system runs: a producer that keeps `in_flight` frames in flight, a
//! consumer that checks each one, and the clock between them. Any system can use it; Redis
//! does (redis.rs).
//!
//! ```text
//!  producer                                           consumer
//!  admit(seq): credit ── warm-up barrier,             the store said frame seq is there
//!              clock start, last frame?                     │ fetch, read_frame, check
//!  started(seq): started_at[seq % in_flight] = now          │ done(seq): latency = now − started
//!  store frame seq ──────────────────────────────────▶      └ release(): the credit comes back;
//!                                                             the last frame: clock and CPU stop
//! ```
//!
//! A frame holds one credit from admission until the consumer has checked it, so at most
//! `in_flight` frames are stored and unchecked, and a `started_at` slot is never overwritten
//! before its frame was timed (frames are checked in order). Warm-up frames are not timed;
//! before the first measured frame the producer waits until every warm-up frame was checked,
//! then starts the clock and reads the CPU times. The producer decides which frame is the last
//! one before storing it (after `min_frames` and `min_time`), so the consumer knows when to
//! stop. [`Flow::abort`] stops the other side when one side fails.

use super::StoreBenchError;
use capnp_rdma_benches::{process_cpu_time, Stats};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};

/// Longest wait for the other side before a run is declared stuck.
pub(crate) const STALL: Duration = Duration::from_secs(120);

/// How many frames to carry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Untimed frames first (each fully checked).
    pub(crate) warmup: u64,
    /// Measure at least this many frames...
    pub(crate) min_frames: u64,
    /// ...and for at least this long.
    pub(crate) min_time: Duration,
    /// Never measure more than this many frames.
    pub(crate) max_frames: u64,
    /// Compare every byte of every frame, not only of warm-up frames.
    pub(crate) check_all: bool,
}

/// A point in time, with both processes' CPU time at that point.
#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    cpu: Duration,
    server_cpu: Option<Duration>,
}

impl Mark {
    fn now(server: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            cpu: process_cpu_time(),
            server_cpu: server.and_then(server_cpu_time),
        }
    }
}

/// State both sides of one run share.
#[derive(Debug)]
pub(crate) struct Flow {
    plan: Plan,
    in_flight: usize,
    credit: Semaphore,
    base: Instant,
    /// Nanoseconds after `base` at which the frame in each slot (`seq % in_flight`) started.
    started_at: Vec<AtomicU64>,
    /// Frames the producer will send in all; `u64::MAX` until it picks the last one.
    total: AtomicU64,
    start: OnceLock<Mark>,
    /// The server process whose CPU time is reported apart.
    server: Option<u32>,
    abort: watch::Sender<bool>,
}

impl Flow {
    /// A run of `plan` with `in_flight` credits; `server` is the pid of the server process,
    /// if there is one (its CPU time is read at the start and the end of the measurement).
    pub(crate) fn new(plan: Plan, in_flight: usize, server: Option<u32>) -> Arc<Self> {
        let in_flight = in_flight.max(1);
        Arc::new(Self {
            plan,
            in_flight,
            credit: Semaphore::new(in_flight),
            base: Instant::now(),
            started_at: (0..in_flight).map(|_| AtomicU64::new(0)).collect(),
            total: AtomicU64::new(u64::MAX),
            start: OnceLock::new(),
            server,
            abort: watch::Sender::new(false),
        })
    }

    /// What the run does.
    pub(crate) fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Whether frame `seq` gets the byte-for-byte comparison (warm-up, or `check_all`).
    pub(crate) fn full_check(&self, seq: u64) -> bool {
        self.plan.check_all || seq < self.plan.warmup
    }

    /// Waits until frame `seq` may be stored (a credit is free; for the first measured frame,
    /// every warm-up frame was checked, and the clock starts). Returns whether `seq` is the
    /// last frame of the run. Call it for every `seq` in order, from one task.
    pub(crate) async fn admit(&self, seq: u64) -> Result<bool, StoreBenchError> {
        let plan = &self.plan;
        if seq == plan.warmup {
            let all =
                u32::try_from(self.in_flight).map_err(|_| StoreBenchError::Setup("in_flight"))?;
            let drained = tokio::time::timeout(STALL, self.credit.acquire_many(all))
                .await
                .map_err(|_| StoreBenchError::Stalled("the warm-up frames to be checked"))?
                .map_err(|_| StoreBenchError::Aborted)?;
            drop(drained);
            let _ = self.start.set(Mark::now(self.server));
        }
        let last = match self.start.get() {
            Some(start) => {
                let measured = seq + 1 - plan.warmup;
                (measured >= plan.min_frames && start.at.elapsed() >= plan.min_time)
                    || measured >= plan.max_frames
            }
            None => false,
        };
        if last {
            self.total.store(seq + 1, Ordering::Release);
        }
        let permit = tokio::time::timeout(STALL, self.credit.acquire())
            .await
            .map_err(|_| StoreBenchError::Stalled("the consumer to check a frame"))?
            .map_err(|_| StoreBenchError::Aborted)?;
        permit.forget();
        Ok(last)
    }

    /// Records that frame `seq` starts now (its latency is measured from here).
    pub(crate) fn started(&self, seq: u64) {
        let ns = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.started_at[self.slot(seq)].store(ns, Ordering::Release);
    }

    /// Gives back the credit of a checked frame.
    pub(crate) fn release(&self) {
        self.credit.add_permits(1);
    }

    /// Frames in the run, once the producer has picked the last one (`u64::MAX` before).
    pub(crate) fn total(&self) -> u64 {
        self.total.load(Ordering::Acquire)
    }

    /// Stops the run: the other side's [`Flow::aborted`] returns, and credit waits fail.
    pub(crate) fn abort(&self) {
        self.abort.send_replace(true);
        self.credit.close();
    }

    /// Returns once [`Flow::abort`] was called: race a side's work against it.
    pub(crate) async fn aborted(&self) {
        let mut rx = self.abort.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|&aborted| aborted).await;
    }

    fn slot(&self, seq: u64) -> usize {
        (seq % self.in_flight as u64) as usize
    }
}

/// The consumer's record of one run.
#[derive(Debug)]
pub(crate) struct Receipts {
    flow: Arc<Flow>,
    next: u64,
    samples_ns: Vec<u64>,
    end: Option<Mark>,
}

impl Receipts {
    pub(crate) fn new(flow: &Arc<Flow>) -> Self {
        let plan = flow.plan;
        Self {
            flow: Arc::clone(flow),
            next: 0,
            samples_ns: Vec::with_capacity(plan.min_frames.clamp(1, 1 << 16) as usize),
            end: None,
        }
    }

    /// Whether the last frame has been checked.
    pub(crate) fn finished(&self) -> bool {
        self.next >= self.flow.total()
    }

    /// The frame expected next.
    pub(crate) fn next(&self) -> u64 {
        self.next
    }

    /// Frame `seq` was checked just now: times it. Frames must be checked in order. Does not
    /// release the credit ([`Flow::release`]).
    pub(crate) fn checked(&mut self, seq: u64) -> Result<(), StoreBenchError> {
        let now = Instant::now();
        if seq != self.next {
            return Err(StoreBenchError::mismatch(
                seq,
                format!("frame {seq} checked, expected frame {}", self.next),
            ));
        }
        let flow = &self.flow;
        if seq >= flow.plan.warmup {
            let started = flow.started_at[flow.slot(seq)].load(Ordering::Acquire);
            let at = u64::try_from(now.duration_since(flow.base).as_nanos()).unwrap_or(u64::MAX);
            self.samples_ns.push(at.saturating_sub(started));
        }
        self.next += 1;
        if self.finished() {
            self.end = Some(Mark::now(flow.server));
        }
        Ok(())
    }
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Measured {
    /// Frames timed (warm-up excluded); operations, for `control`.
    pub(crate) frames: u64,
    /// Untimed frames before them.
    pub(crate) warmup: u64,
    /// From the clock start to the last frame checked.
    pub(crate) elapsed: Duration,
    /// This process's CPU time (producer and consumer) over the same period.
    pub(crate) cpu: Duration,
    /// The server process's CPU time over the same period, when there is a server process
    /// and its `/proc/<pid>/stat` could be read (clock-tick resolution: 10 ms at 100 Hz).
    pub(crate) server_cpu: Option<Duration>,
    /// Start-to-checked latency of the timed frames.
    pub(crate) latency: Stats,
    /// Timed frames the producer wrote whole into the store's memory (or sent whole), when
    /// the system counts them.
    pub(crate) whole_writes: Option<u64>,
}

impl Measured {
    /// What the consumer's receipts say, once the last frame was checked.
    pub(crate) fn from(receipts: &Receipts) -> Result<Self, StoreBenchError> {
        let flow = &receipts.flow;
        let (Some(start), Some(end)) = (flow.start.get(), receipts.end) else {
            return Err(StoreBenchError::Setup(
                "the run ended before its last frame",
            ));
        };
        let server_cpu = match (start.server_cpu, end.server_cpu) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        Ok(Self {
            frames: receipts.samples_ns.len() as u64,
            warmup: flow.plan.warmup,
            elapsed: end.at.saturating_duration_since(start.at),
            cpu: end.cpu.saturating_sub(start.cpu),
            server_cpu,
            latency: Stats::from_samples(&receipts.samples_ns),
            whole_writes: None,
        })
    }

    /// A `control` run: `ops` operations in `elapsed`; `samples_ns` are the latencies of its
    /// cycles (create, seal, get, release).
    pub(crate) fn control(
        ops: u64,
        elapsed: Duration,
        cpu: Duration,
        server_cpu: Option<Duration>,
        samples_ns: &[u64],
    ) -> Self {
        Self {
            frames: ops,
            warmup: 0,
            elapsed,
            cpu,
            server_cpu,
            latency: Stats::from_samples(samples_ns),
            whole_writes: None,
        }
    }
}

/// CPU time (user + system, all threads) process `pid` has used so far, from
/// `/proc/<pid>/stat`; `None` when it cannot be read.
pub(crate) fn server_cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf has no preconditions; _SC_CLK_TCK is a valid name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    parse_proc_stat_cpu(&stat, u64::try_from(ticks).ok()?)
}

/// utime + stime of a `/proc/<pid>/stat` line, at `ticks_per_s` clock ticks per second.
/// Fields are counted after the command name's closing parenthesis (the name may hold spaces
/// and parentheses itself): state is field 3, utime 14, stime 15.
fn parse_proc_stat_cpu(stat: &str, ticks_per_s: u64) -> Option<Duration> {
    if ticks_per_s == 0 {
        return None;
    }
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_ascii_whitespace().skip(11); // fields 3..=13
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = utime.checked_add(stime)?;
    Some(Duration::from_nanos(
        u64::try_from(u128::from(ticks) * 1_000_000_000 / u128::from(ticks_per_s)).ok()?,
    ))
}

/// Runs one side; its failure stops the other side ([`Flow::abort`]), and the other side's
/// failure stops it with [`StoreBenchError::Aborted`].
pub(crate) async fn guarded<T>(
    flow: &Flow,
    work: impl std::future::Future<Output = Result<T, StoreBenchError>>,
) -> Result<T, StoreBenchError> {
    tokio::select! {
        result = work => {
            if result.is_err() {
                flow.abort();
            }
            result
        }
        () = flow.aborted() => Err(StoreBenchError::Aborted),
    }
}

/// How a system's producer and consumer are placed on threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Both on one current-thread runtime (one core for the clients).
    OneThread,
    /// Each on a thread of its own (a current-thread runtime each), as two operators in two
    /// processes would be. Not the default of any system: on the 2-core machines the
    /// benchmark runs on, it gave neither Redis nor the store more frames/s (see redis.rs
    /// and staging.rs); kept for re-measuring.
    #[cfg_attr(not(test), allow(dead_code))]
    TwoThreads,
}

fn runtime() -> Result<tokio::runtime::Runtime, StoreBenchError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StoreBenchError::io("tokio runtime"))
}

/// Runs a system's two sides (each already [`guarded`]) placed as `layout` says. Returns
/// what each side returned, or the failure that came first (not the abort it caused on the
/// other side).
pub(crate) fn run_sides<P, C>(
    flow: &Flow,
    layout: Layout,
    producer: impl std::future::Future<Output = Result<P, StoreBenchError>> + Send,
    consumer: impl std::future::Future<Output = Result<C, StoreBenchError>> + Send,
) -> Result<(P, C), StoreBenchError>
where
    P: Send,
    C: Send,
{
    let (produced, consumed) = match layout {
        Layout::OneThread => {
            return runtime()?.block_on(async { tokio::try_join!(producer, consumer) });
        }
        Layout::TwoThreads => std::thread::scope(|scope| {
            let p = std::thread::Builder::new()
                .name("bench-producer".into())
                .spawn_scoped(scope, || runtime()?.block_on(producer));
            let c = std::thread::Builder::new()
                .name("bench-consumer".into())
                .spawn_scoped(scope, || runtime()?.block_on(consumer));
            (join_side(flow, p), join_side(flow, c))
        }),
    };
    match (produced, consumed) {
        (Ok(p), Ok(c)) => Ok((p, c)),
        (Err(e), Err(StoreBenchError::Aborted)) | (_, Err(e)) | (Err(e), _) => Err(e),
    }
}

/// Waits for a client thread; a thread that could not be spawned stops the other side.
fn join_side<T>(
    flow: &Flow,
    thread: std::io::Result<std::thread::ScopedJoinHandle<'_, Result<T, StoreBenchError>>>,
) -> Result<T, StoreBenchError> {
    match thread {
        Ok(thread) => thread
            .join()
            .map_err(|_| StoreBenchError::Thread("a client thread panicked".into()))?,
        Err(e) => {
            flow.abort();
            Err(StoreBenchError::io("spawning a client thread")(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_cpu_fields() {
        let line = "4242 (redis-server (x) y) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    123 77 0 0 20 0 5 0 1000 0 0";
        assert_eq!(
            parse_proc_stat_cpu(line, 100),
            Some(Duration::from_millis(2000))
        );
        assert_eq!(parse_proc_stat_cpu("4242 (x) S 1 2", 100), None);
        assert_eq!(parse_proc_stat_cpu("no parenthesis", 100), None);
        assert_eq!(parse_proc_stat_cpu(line, 0), None);
        assert!(server_cpu_time(std::process::id()).is_some());
    }

    #[test]
    fn credits_bound_frames_in_flight_and_warmup_is_untimed() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let plan = Plan {
                warmup: 2,
                min_frames: 3,
                min_time: Duration::ZERO,
                max_frames: 3,
                check_all: false,
            };
            let flow = Flow::new(plan, 2, Some(std::process::id()));
            let mut receipts = Receipts::new(&flow);
            assert!(!flow.admit(0).await.unwrap());
            flow.started(0);
            assert!(!flow.admit(1).await.unwrap());
            flow.started(1);
            // Both credits held: frame 2 waits.
            assert!(
                tokio::time::timeout(Duration::from_millis(20), flow.admit(2))
                    .await
                    .is_err()
            );
            for seq in 0..2 {
                receipts.checked(seq).unwrap();
                flow.release();
            }
            assert!(flow.full_check(1) && !flow.full_check(2));
            let mut seq = 2;
            loop {
                let last = flow.admit(seq).await.unwrap();
                flow.started(seq);
                receipts.checked(seq).unwrap();
                flow.release();
                seq += 1;
                if last {
                    break;
                }
            }
            assert_eq!(flow.total(), 5);
            assert!(receipts.finished());
            assert!(receipts.checked(9).is_err());
            let measured = Measured::from(&receipts).unwrap();
            assert_eq!((measured.frames, measured.warmup), (3, 2));
            assert!(measured.server_cpu.is_some());

            flow.abort();
            flow.aborted().await;
            assert!(matches!(
                flow.admit(seq).await,
                Err(StoreBenchError::Aborted)
            ));
        });
    }
}
