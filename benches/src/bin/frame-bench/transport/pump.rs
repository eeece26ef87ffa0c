//! The stream every system runs: a sender that keeps `window` frames in flight, a receiver that
//! checks each one as it lands, and the clock between them (the credit, warm-up barrier and
//! clock are [`crate::common::flow`]'s, as for `frame-bench store`).
//!
//! ```text
//!  sender task                                    receiver task
//!  admit(seq): credit ── warm-up barrier,         incoming / read_exact
//!              clock start, last frame?                 │ check first+last byte of every entry
//!  collect completions → free payloads (FIFO)           │ latency = now − started_at[slot]
//!  started_at[seq % window] = now                       │ release credit (ack, for raw-tcp)
//!  post_write(payload, slot seq % window, imm = seq) ──▶ └ the last frame: clock and CPU stop
//! ```
//!
//! A frame holds one credit of `window` from admission until the receiving side has checked it,
//! so a slot is never written again while its previous frame is being read and `started_at` of
//! a slot is never overwritten before its frame was timed. Warm-up frames are not timed; before
//! the first measured frame the sender waits until every warm-up frame was checked, then starts
//! the clock and reads the process CPU time. The sender decides which frame is the last one
//! before posting it (after `min_frames` and `min_time`), so the receiver always knows when to
//! stop. The sender yields to the runtime after each post, like a producer waiting for its next
//! frame, so a `post_write` that does all the work itself (shm's copy) cannot starve the
//! receiver's wake-up for a whole window.

use super::frames::Expect;
use super::TransportBenchError;
use crate::common::flow::{self, AdmitError, Timed, Waited};
pub(super) use crate::common::flow::{Flow, Plan, STALL};
use capnp_rdma::transport::shm::WriterStats;
use capnp_rdma::transport::{Target, TransportError, Writer};
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

impl From<AdmitError> for TransportBenchError {
    fn from(e: AdmitError) -> Self {
        match e {
            AdmitError::TooManyCredits => TransportBenchError::Stalled("window"),
            AdmitError::Stalled(Waited::WarmUp) => {
                TransportBenchError::Stalled("the warm-up frames to arrive")
            }
            AdmitError::Stalled(Waited::Check) => {
                TransportBenchError::Stalled("the receiver to check a frame")
            }
            AdmitError::Closed => TransportBenchError::Stalled("credit (closed)"),
        }
    }
}

/// The receiving side's record of one run: the times, and what every write must land.
#[derive(Debug)]
pub(super) struct Receipts {
    times: flow::Receipts,
    expect: Arc<Expect>,
}

impl Receipts {
    pub(super) fn new(flow: &Arc<Flow>, expect: &Arc<Expect>) -> Self {
        Self {
            times: flow::Receipts::new(flow),
            expect: Arc::clone(expect),
        }
    }

    /// Whether the last frame has been checked.
    pub(super) fn finished(&self) -> bool {
        self.times.finished()
    }

    /// Checks frame `seq`, which landed as `landed`, and times it. Frames must arrive in order.
    pub(super) fn arrived(&mut self, seq: u64, landed: &[u8]) -> Result<(), String> {
        let now = Instant::now();
        self.times.in_order(seq, "arrived")?;
        let full = self.times.flow().full_check(seq);
        self.expect.check(seq, landed, full)?;
        self.times.record(seq, now);
        Ok(())
    }

    /// Slots (and credits) of the run.
    pub(super) fn window(&self) -> usize {
        self.times.flow().in_flight()
    }

    /// The frame expected next.
    pub(super) fn next(&self) -> u64 {
        self.times.next()
    }
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
pub(super) struct Measured {
    /// What the clock measured: frames, the process's CPU time (both ends), and the
    /// post-to-arrival latency.
    pub(super) timed: Timed,
    /// The shm writer's counters over the whole run (warm-up included); `None` for other
    /// systems.
    pub(super) shm_writer: Option<WriterStats>,
}

impl Measured {
    pub(super) fn from(receipts: &Receipts) -> Result<Self, TransportBenchError> {
        let timed = receipts.times.timed().ok_or(TransportBenchError::Setup(
            "the run ended before its last frame",
        ))?;
        Ok(Self {
            timed,
            shm_writer: None,
        })
    }
}

/// A connected pair: `accept` runs on a task of its own while this one awaits `connect`;
/// returns both ends once both are up.
pub(super) async fn pair<W, T>(
    accept: impl Future<Output = Result<T, TransportError>> + Send + 'static,
    connect: impl Future<Output = Result<W, TransportError>>,
) -> Result<(W, T), TransportBenchError>
where
    T: Send + 'static,
{
    let accept = tokio::spawn(accept);
    let writer = connect.await.map_err(TransportBenchError::connect)?;
    let target = accept
        .await
        .map_err(TransportBenchError::Task)?
        .map_err(TransportBenchError::connect)?;
    Ok((writer, target))
}

/// The sending side over a [`Writer`]: posts pre-built payloads, re-posting each as its
/// completion hands it back. Returns the writer and the payloads once every write completed.
pub(super) async fn send<W: Writer>(
    mut writer: W,
    payloads: Vec<W::Payload>,
    flow: Arc<Flow>,
    stride: u64,
) -> Result<(W, Vec<W::Payload>), TransportBenchError> {
    let base = writer.remote().offset;
    let mut free: VecDeque<W::Payload> = payloads.into();
    let mut done = Vec::with_capacity(flow.in_flight() + 1);
    let mut seq = 0u64;
    loop {
        let last = flow.admit(seq).await?;
        while free.is_empty() || writer.in_flight() >= writer.window() {
            collect(&mut writer, &mut done, &mut free).await?;
        }
        let payload = free
            .pop_front()
            .ok_or(TransportBenchError::Setup("no payload to post"))?;
        let imm = u32::try_from(seq).map_err(|_| TransportBenchError::Setup("2^32 frames"))?;
        flow.started(seq);
        writer
            .post_write(payload, base + flow.slot(seq) * stride, imm)
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
    let flow = Arc::clone(receipts.times.flow());
    let mut incoming = Vec::with_capacity(flow.in_flight());
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
            let offset = base + flow.slot(seq) * stride;
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
            flow.release();
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
