//! The stream every system runs: a sender that keeps `window` frames in flight, a receiver that
//! checks each one as it lands, and the clock between them.
//!
//! ```text
//!  sender task                                    receiver task
//!  admit(seq): credit ── warm-up barrier,         incoming / read_exact
//!              clock start, last frame?                 │ check first+last byte of every entry
//!  collect completions → free payloads (FIFO)           │ latency = now − posted_at[slot]
//!  posted_at[seq % window] = now                        │ release credit (ack, for raw-tcp)
//!  post_write(payload, slot seq % window, imm = seq) ──▶ └ the last frame: clock and CPU stop
//! ```
//!
//! A frame holds one credit of `window` from admission until the receiving side has checked it,
//! so a slot is never written again while its previous frame is being read and `posted_at` of a
//! slot is never overwritten before its frame was timed. Warm-up frames are not timed; before
//! the first measured frame the sender waits until every warm-up frame was checked, then starts
//! the clock and reads the process CPU time. The sender decides which frame is the last one
//! before posting it (after `min_frames` and `min_time`), so the receiver always knows when to
//! stop. The sender yields to the runtime after each post, like a producer waiting for its next
//! frame, so a `post_write` that does all the work itself (shm's copy) cannot starve the
//! receiver's wake-up for a whole window.

use super::frames::Expect;
use super::TransportBenchError;
use capnp_rdma::transport::shm::WriterStats;
use capnp_rdma::transport::{Target, Writer};
use capnp_rdma_benches::{process_cpu_time, Stats};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Longest wait for the other side before a run is declared stuck.
pub(super) const STALL: Duration = Duration::from_secs(120);

/// How many frames to send.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    /// Untimed frames first (each fully checked).
    pub(super) warmup: u64,
    /// Measure at least this many frames...
    pub(super) min_frames: u64,
    /// ...and for at least this long.
    pub(super) min_time: Duration,
    /// Never measure more than this many frames.
    pub(super) max_frames: u64,
    /// Hash every landed byte of every frame, not only of warm-up frames.
    pub(super) check_all: bool,
}

#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    cpu: Duration,
}

impl Mark {
    fn now() -> Self {
        Self {
            at: Instant::now(),
            cpu: process_cpu_time(),
        }
    }
}

/// State both sides of one run share.
#[derive(Debug)]
pub(super) struct Shared {
    plan: Plan,
    window: usize,
    credit: Semaphore,
    base: Instant,
    /// Nanoseconds after `base` at which the frame in each slot was posted.
    posted_at: Vec<AtomicU64>,
    /// Frames the sender will send in all; `u64::MAX` until it picks the last one.
    total: AtomicU64,
    start: OnceLock<Mark>,
}

impl Shared {
    pub(super) fn new(plan: Plan, window: usize) -> Arc<Self> {
        Arc::new(Self {
            plan,
            window,
            credit: Semaphore::new(window),
            base: Instant::now(),
            posted_at: (0..window).map(|_| AtomicU64::new(0)).collect(),
            total: AtomicU64::new(u64::MAX),
            start: OnceLock::new(),
        })
    }

    pub(super) fn window(&self) -> usize {
        self.window
    }

    /// The slot write `seq` goes to.
    pub(super) fn slot(&self, seq: u64) -> u64 {
        seq % self.window as u64
    }

    /// Waits until frame `seq` may be sent (a credit is free; for the first measured frame,
    /// every warm-up frame was checked, and the clock starts). Returns whether `seq` is the
    /// last frame of the run.
    pub(super) async fn admit(&self, seq: u64) -> Result<bool, TransportBenchError> {
        let plan = &self.plan;
        if seq == plan.warmup {
            let all =
                u32::try_from(self.window).map_err(|_| TransportBenchError::Stalled("window"))?;
            let drained = tokio::time::timeout(STALL, self.credit.acquire_many(all))
                .await
                .map_err(|_| TransportBenchError::Stalled("the warm-up frames to arrive"))?
                .map_err(|_| TransportBenchError::Stalled("credit (closed)"))?;
            drop(drained);
            let _ = self.start.set(Mark::now());
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
            .map_err(|_| TransportBenchError::Stalled("the receiver to check a frame"))?
            .map_err(|_| TransportBenchError::Stalled("credit (closed)"))?;
        permit.forget();
        Ok(last)
    }

    /// Records that write `seq` is being posted now.
    pub(super) fn posting(&self, seq: u64) {
        let ns = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.posted_at[self.slot(seq) as usize].store(ns, Ordering::Release);
    }

    /// Gives back the credit of a checked frame.
    pub(super) fn release(&self) {
        self.credit.add_permits(1);
    }

    /// Frames in the run, once the sender has picked the last one.
    pub(super) fn total(&self) -> u64 {
        self.total.load(Ordering::Acquire)
    }
}

/// The receiving side's record of one run.
#[derive(Debug)]
pub(super) struct Receipts {
    shared: Arc<Shared>,
    expect: Arc<Expect>,
    next: u64,
    samples_ns: Vec<u64>,
    end: Option<Mark>,
}

impl Receipts {
    pub(super) fn new(shared: &Arc<Shared>, expect: &Arc<Expect>) -> Self {
        let plan = shared.plan;
        Self {
            shared: Arc::clone(shared),
            expect: Arc::clone(expect),
            next: 0,
            samples_ns: Vec::with_capacity(plan.min_frames.clamp(1, 1 << 16) as usize),
            end: None,
        }
    }

    /// Whether the last frame has been checked.
    pub(super) fn finished(&self) -> bool {
        self.next >= self.shared.total()
    }

    /// Checks frame `seq`, which landed as `landed`, and times it. Frames must arrive in order.
    pub(super) fn arrived(&mut self, seq: u64, landed: &[u8]) -> Result<(), String> {
        let now = Instant::now();
        if seq != self.next {
            return Err(format!("frame {seq} arrived, expected frame {}", self.next));
        }
        let plan = &self.shared.plan;
        let full = plan.check_all || seq < plan.warmup;
        self.expect.check(seq, landed, full)?;
        if seq >= plan.warmup {
            let slot = self.shared.slot(seq) as usize;
            let posted = self.shared.posted_at[slot].load(Ordering::Acquire);
            let at =
                u64::try_from(now.duration_since(self.shared.base).as_nanos()).unwrap_or(u64::MAX);
            self.samples_ns.push(at.saturating_sub(posted));
        }
        self.next += 1;
        if self.finished() {
            self.end = Some(Mark::now());
        }
        Ok(())
    }

    /// Slots (and credits) of the run.
    pub(super) fn window(&self) -> usize {
        self.shared.window
    }

    /// The frame expected next.
    pub(super) fn next(&self) -> u64 {
        self.next
    }
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
pub(super) struct Measured {
    /// Frames timed (warm-up excluded).
    pub(super) frames: u64,
    pub(super) warmup: u64,
    /// From the clock start to the last frame checked.
    pub(super) elapsed: Duration,
    /// Process CPU time (both ends) over the same period.
    pub(super) cpu: Duration,
    /// Post-to-arrival latency of the timed frames.
    pub(super) latency: Stats,
    /// The shm writer's counters over the whole run (warm-up included); `None` for other
    /// systems.
    pub(super) shm_writer: Option<WriterStats>,
}

impl Measured {
    pub(super) fn from(receipts: &Receipts) -> Result<Self, TransportBenchError> {
        let shared = &receipts.shared;
        let (Some(start), Some(end)) = (shared.start.get(), receipts.end) else {
            return Err(TransportBenchError::Setup(
                "the run ended before its last frame",
            ));
        };
        Ok(Self {
            frames: receipts.samples_ns.len() as u64,
            warmup: shared.plan.warmup,
            elapsed: end.at.saturating_duration_since(start.at),
            cpu: end.cpu.saturating_sub(start.cpu),
            latency: Stats::from_samples(&receipts.samples_ns),
            shm_writer: None,
        })
    }
}

/// The sending side over a [`Writer`]: posts pre-built payloads, re-posting each as its
/// completion hands it back. Returns the writer and the payloads once every write completed.
pub(super) async fn send<W: Writer>(
    mut writer: W,
    payloads: Vec<W::Payload>,
    shared: Arc<Shared>,
    stride: u64,
) -> Result<(W, Vec<W::Payload>), TransportBenchError> {
    let base = writer.remote().offset;
    let mut free: VecDeque<W::Payload> = payloads.into();
    let mut done = Vec::with_capacity(shared.window() + 1);
    let mut seq = 0u64;
    loop {
        let last = shared.admit(seq).await?;
        while free.is_empty() || writer.in_flight() >= writer.window() {
            collect(&mut writer, &mut done, &mut free).await?;
        }
        let payload = free
            .pop_front()
            .ok_or(TransportBenchError::Setup("no payload to post"))?;
        let imm = u32::try_from(seq).map_err(|_| TransportBenchError::Setup("2^32 frames"))?;
        shared.posting(seq);
        writer
            .post_write(payload, base + shared.slot(seq) * stride, imm)
            .map_err(|e| TransportBenchError::Transport {
                what: "post_write",
                source: e.error,
            })?;
        seq += 1;
        if last {
            break;
        }
        // Let the runtime poll its I/O driver between frames, as a producer awaiting its next
        // frame would: a backend whose post_write does all the work (shm copies the frame) would
        // otherwise hold its worker for `window` frames and delay the receiver's wake-up.
        tokio::task::yield_now().await;
    }
    while writer.in_flight() > 0 {
        collect(&mut writer, &mut done, &mut free).await?;
    }
    Ok((writer, free.into()))
}

/// Waits for completions and puts their payloads back at the end of the free list (completions
/// come in posting order, so the list stays in round-robin order).
async fn collect<W: Writer>(
    writer: &mut W,
    done: &mut Vec<capnp_rdma::transport::Completion<W::Payload>>,
    free: &mut VecDeque<W::Payload>,
) -> Result<(), TransportBenchError> {
    let n = tokio::time::timeout(STALL, writer.completions(done))
        .await
        .map_err(|_| TransportBenchError::Stalled("completions"))?
        .map_err(|source| TransportBenchError::Transport {
            what: "completions",
            source,
        })?;
    if n == 0 {
        return Err(TransportBenchError::Setup(
            "waited for completions with nothing in flight",
        ));
    }
    for c in done.drain(..) {
        c.status.map_err(|source| TransportBenchError::Transport {
            what: "write completion",
            source,
        })?;
        free.push_back(c.payload);
    }
    Ok(())
}

/// The receiving side over a [`Target`]: checks each landed frame in place and gives its
/// credit back. Returns the target and the record once the last frame was checked.
pub(super) async fn receive<T: Target>(
    mut target: T,
    mut receipts: Receipts,
    stride: u64,
) -> Result<(T, Receipts), TransportBenchError> {
    let base = target.granted().offset;
    let len = receipts.expect.len();
    let shared = Arc::clone(&receipts.shared);
    let mut incoming = Vec::with_capacity(shared.window());
    while !receipts.finished() {
        tokio::time::timeout(STALL, target.incoming(&mut incoming))
            .await
            .map_err(|_| TransportBenchError::Stalled("incoming frames"))?
            .map_err(|source| TransportBenchError::Transport {
                what: "incoming",
                source,
            })?;
        for landed in incoming.drain(..) {
            let seq = u64::from(landed.imm);
            let offset = base + shared.slot(seq) * stride;
            if let Some(at) = landed.at {
                if (at.offset, at.len) != (offset, len) {
                    return Err(TransportBenchError::mismatch(
                        seq,
                        format!("landed {}+{}, posted to {offset}+{len}", at.offset, at.len),
                    ));
                }
            }
            // SAFETY: the slot is not written again before this frame's credit is released
            // below (the sender admits the slot's next write only with that credit), and the
            // transport announced the write only after its last byte landed.
            let bytes = unsafe { target.region().bytes(offset, len) }
                .map_err(|_| TransportBenchError::Setup("a slot outside the target's region"))?;
            receipts
                .arrived(seq, bytes)
                .map_err(|what| TransportBenchError::mismatch(seq, what))?;
            shared.release();
        }
    }
    Ok((target, receipts))
}

/// Waits for both sides. The first failure aborts the other side and is returned, except
/// that a sender failure waits briefly for the receiver: a receiver that found a wrong frame
/// closes its end, so the sender's "peer disconnected" is only the echo of that mismatch.
pub(super) async fn join<S, R>(
    mut sender: JoinHandle<Result<S, TransportBenchError>>,
    mut receiver: JoinHandle<Result<R, TransportBenchError>>,
) -> Result<(S, R), TransportBenchError> {
    fn flat<X>(
        r: Result<Result<X, TransportBenchError>, tokio::task::JoinError>,
    ) -> Result<X, TransportBenchError> {
        r.map_err(TransportBenchError::Task)?
    }
    tokio::select! {
        s = &mut sender => match flat(s) {
            Ok(s) => Ok((s, flat(receiver.await)?)),
            Err(e) => {
                let cause = tokio::time::timeout(Duration::from_secs(1), &mut receiver).await;
                receiver.abort();
                match cause.map(flat) {
                    Ok(Err(mismatch @ TransportBenchError::Mismatch { .. })) => Err(mismatch),
                    _ => Err(e),
                }
            }
        },
        r = &mut receiver => match flat(r) {
            Ok(r) => Ok((flat(sender.await)?, r)),
            Err(e) => {
                sender.abort();
                Err(e)
            }
        },
    }
}
