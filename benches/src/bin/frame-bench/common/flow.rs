//! The paced stream both `store` and `transport` run: one side admits frames against a credit
//! of `in_flight` frames, the other checks each frame as it arrives and gives the credit back,
//! and the clock runs between them.
//!
//! ```text
//!  producing side                                     checking side
//!  admit(seq): credit ── warm-up barrier,             frame seq is there
//!              clock start, last frame?                     │ check it (the subcommand's own)
//!  started(seq): started_at[seq % in_flight] = now          │ Receipts::record(seq, now):
//!  send / store frame seq ───────────────────────────▶      │   latency = now − started_at
//!                                                           └ release(): the credit comes back;
//!                                                             the last frame: clock and CPU stop
//! ```
//!
//! A frame holds one credit from admission until the checking side is done with it, so at most
//! `in_flight` frames are unchecked, and a `started_at` slot is never overwritten before its
//! frame was timed (frames are checked in order). Warm-up frames are not timed; before the
//! first measured frame the producing side waits until every warm-up frame was checked, then
//! starts the clock and reads the CPU times. It decides which frame is the last one before
//! sending it (after `min_frames` and `min_time`), so the checking side knows when to stop.
//! [`Flow::abort`] stops the other side when one side fails.

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

/// The flags both subcommands take to size a run; `None`: the default.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlanFlags {
    /// `--quick`: a smoke run of a few frames, every byte checked.
    pub(crate) quick: bool,
    /// `--min-frames`.
    pub(crate) min_frames: Option<u64>,
    /// `--min-time-ms`.
    pub(crate) min_time_ms: Option<u64>,
    /// `--warmup-frames`.
    pub(crate) warmup_frames: Option<u64>,
    /// `--max-frames`.
    pub(crate) max_frames: u64,
}

impl Plan {
    /// The plan of a run with `credits` frames in flight: by default 2 x (credits + 1) warm-up
    /// frames, then at least 4 x (credits + 1) frames and 2 s; with `--quick`, credits + 1
    /// warm-up frames, then credits + 2 frames.
    pub(crate) fn new(credits: u32, flags: PlanFlags) -> Self {
        let rounds = u64::from(credits) + 1;
        let (warmup, min_frames, min_time_ms) = if flags.quick {
            (rounds, rounds + 1, 0)
        } else {
            (2 * rounds, 4 * rounds, 2000)
        };
        let min_frames = flags.min_frames.unwrap_or(min_frames).max(1);
        Plan {
            warmup: flags.warmup_frames.unwrap_or(warmup),
            min_frames,
            min_time: Duration::from_millis(flags.min_time_ms.unwrap_or(min_time_ms)),
            max_frames: flags.max_frames.max(min_frames),
            check_all: flags.quick,
        }
    }
}

/// A point in time, with this process's CPU time at that point and the server process's
/// (when there is one).
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

/// What [`Flow::admit`] waited for when it gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waited {
    /// Every warm-up frame to be checked, before the clock starts.
    WarmUp,
    /// A frame to be checked, so that its credit comes back.
    Check,
}

/// Why [`Flow::admit`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AdmitError {
    /// More frames in flight than a semaphore counts at once.
    TooManyCredits,
    /// Nothing came back within [`STALL`].
    Stalled(Waited),
    /// The run was aborted ([`Flow::abort`]).
    Closed,
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
    /// Frames the producing side will send in all; `u64::MAX` until it picks the last one.
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

    /// Frames in flight at most (the credits).
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The slot of frame `seq`: `seq % in_flight`.
    pub(crate) fn slot(&self, seq: u64) -> u64 {
        seq % self.in_flight as u64
    }

    /// Whether frame `seq` gets the byte-for-byte comparison (warm-up, or `check_all`).
    pub(crate) fn full_check(&self, seq: u64) -> bool {
        self.plan.check_all || seq < self.plan.warmup
    }

    /// Waits until frame `seq` may be sent (a credit is free; for the first measured frame,
    /// every warm-up frame was checked, and the clock starts). Returns whether `seq` is the
    /// last frame of the run. Call it for every `seq` in order, from one task.
    pub(crate) async fn admit(&self, seq: u64) -> Result<bool, AdmitError> {
        let plan = &self.plan;
        if seq == plan.warmup {
            let all = u32::try_from(self.in_flight).map_err(|_| AdmitError::TooManyCredits)?;
            let drained = tokio::time::timeout(STALL, self.credit.acquire_many(all))
                .await
                .map_err(|_| AdmitError::Stalled(Waited::WarmUp))?
                .map_err(|_| AdmitError::Closed)?;
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
            .map_err(|_| AdmitError::Stalled(Waited::Check))?
            .map_err(|_| AdmitError::Closed)?;
        permit.forget();
        Ok(last)
    }

    /// Records that frame `seq` starts now (its latency is measured from here).
    pub(crate) fn started(&self, seq: u64) {
        let ns = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.started_at[self.slot(seq) as usize].store(ns, Ordering::Release);
    }

    /// Gives back the credit of a checked frame.
    pub(crate) fn release(&self) {
        self.credit.add_permits(1);
    }

    /// Frames in the run, once the producing side has picked the last one (`u64::MAX`
    /// before).
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
}

/// The checking side's record of one run: which frame comes next, and the latency of each
/// timed frame.
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

    /// The run these receipts are of.
    pub(crate) fn flow(&self) -> &Arc<Flow> {
        &self.flow
    }

    /// Whether the last frame has been checked.
    pub(crate) fn finished(&self) -> bool {
        self.next >= self.flow.total()
    }

    /// The frame expected next.
    pub(crate) fn next(&self) -> u64 {
        self.next
    }

    /// Frames must come in order: says so when `seq` (which `came`: "arrived", "checked")
    /// is not the one expected next.
    pub(crate) fn in_order(&self, seq: u64, came: &str) -> Result<(), String> {
        if seq == self.next {
            Ok(())
        } else {
            Err(format!("frame {seq} {came}, expected frame {}", self.next))
        }
    }

    /// Frame `seq`, the one expected next ([`Receipts::in_order`]), was there at `at`: times
    /// it. Does not release the credit ([`Flow::release`]).
    pub(crate) fn record(&mut self, seq: u64, at: Instant) {
        let flow = &self.flow;
        if seq >= flow.plan.warmup {
            let started = flow.started_at[flow.slot(seq) as usize].load(Ordering::Acquire);
            let at = u64::try_from(at.duration_since(flow.base).as_nanos()).unwrap_or(u64::MAX);
            self.samples_ns.push(at.saturating_sub(started));
        }
        self.next += 1;
        if self.finished() {
            self.end = Some(Mark::now(flow.server));
        }
    }

    /// Frame `seq` was checked just now: [`Receipts::in_order`], then [`Receipts::record`].
    pub(crate) fn checked(&mut self, seq: u64) -> Result<(), String> {
        let now = Instant::now();
        self.in_order(seq, "checked")?;
        self.record(seq, now);
        Ok(())
    }

    /// What the run measured, once its last frame was checked (`None` before).
    pub(crate) fn timed(&self) -> Option<Timed> {
        let (Some(start), Some(end)) = (self.flow.start.get(), self.end) else {
            return None;
        };
        let server_cpu = match (start.server_cpu, end.server_cpu) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        Some(Timed {
            frames: self.samples_ns.len() as u64,
            warmup: self.flow.plan.warmup,
            elapsed: end.at.saturating_duration_since(start.at),
            cpu: end.cpu.saturating_sub(start.cpu),
            server_cpu,
            latency: Stats::from_samples(&self.samples_ns),
        })
    }
}

/// What the clock of one run measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timed {
    /// Frames timed (warm-up excluded).
    pub(crate) frames: u64,
    /// Untimed frames before them.
    pub(crate) warmup: u64,
    /// From the clock start to the last frame checked.
    pub(crate) elapsed: Duration,
    /// This process's CPU time over the same period.
    pub(crate) cpu: Duration,
    /// The server process's CPU time over the same period, when there is a server process
    /// and its `/proc/<pid>/stat` could be read (clock-tick resolution: 10 ms at 100 Hz).
    pub(crate) server_cpu: Option<Duration>,
    /// Start-to-checked latency of the timed frames.
    pub(crate) latency: Stats,
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
}
