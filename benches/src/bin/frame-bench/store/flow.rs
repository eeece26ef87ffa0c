//! The store's side of the paced stream every system runs ([`crate::common::flow`]): what a
//! run measured, and how a system's producer and consumer are placed on threads and stopped
//! together. Any system can use it; Redis does (redis.rs).
//!
//! A failure on one side stops the other ([`guarded`], [`Flow::abort`]), and the first
//! failure is the one reported ([`run_sides`]).

use super::StoreBenchError;
pub(crate) use crate::common::flow::{server_cpu_time, Flow, Plan, Receipts, STALL};
use crate::common::flow::{AdmitError, Timed, Waited};
use capnp_rdma_benches::Stats;
use std::time::Duration;

impl From<AdmitError> for StoreBenchError {
    fn from(e: AdmitError) -> Self {
        match e {
            AdmitError::TooManyCredits => StoreBenchError::Setup("in_flight"),
            AdmitError::Stalled(Waited::WarmUp) => {
                StoreBenchError::Stalled("the warm-up frames to be checked")
            }
            AdmitError::Stalled(Waited::Check) => {
                StoreBenchError::Stalled("the consumer to check a frame")
            }
            AdmitError::Closed => StoreBenchError::Aborted,
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Measured {
    /// What the clock measured: frames (operations, for `control`), this process's CPU time
    /// (producer and consumer), the server process's, and the start-to-checked latency.
    pub(crate) timed: Timed,
    /// Timed frames the producer wrote whole into the store's memory (or sent whole), when
    /// the system counts them.
    pub(crate) whole_writes: Option<u64>,
}

impl Measured {
    /// What the consumer's receipts say, once the last frame was checked.
    pub(crate) fn from(receipts: &Receipts) -> Result<Self, StoreBenchError> {
        let timed = receipts.timed().ok_or(StoreBenchError::Setup(
            "the run ended before its last frame",
        ))?;
        Ok(Self {
            timed,
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
            timed: Timed {
                frames: ops,
                warmup: 0,
                elapsed,
                cpu,
                server_cpu,
                latency: Stats::from_samples(samples_ns),
            },
            whole_writes: None,
        }
    }
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
            assert_eq!((measured.timed.frames, measured.timed.warmup), (3, 2));
            assert!(measured.timed.server_cpu.is_some());

            flow.abort();
            flow.aborted().await;
            assert!(matches!(
                flow.admit(seq).await.map_err(StoreBenchError::from),
                Err(StoreBenchError::Aborted)
            ));
        });
    }
}
