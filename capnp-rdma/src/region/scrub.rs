//! The background scrubber: zeroes released blocks off the producer's path, then frees them.
//!
//! Releasing a segment hands `(first block, blocks, dirty bytes)` to this process's scrubber
//! thread through a channel (no system call while the scrubber is awake). The blocks stay
//! allocated in the bitmap until they are zero again, so the allocator only ever hands out
//! clean blocks. Time and bytes spent here are counted so benchmarks can report where the
//! zeroing cost went.

use super::{Core, RegionError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// A release waiting to be zeroed.
pub(crate) struct Job {
    pub(crate) first: u64,
    pub(crate) blocks: u64,
    pub(crate) dirty: u64,
}

#[derive(Default)]
#[repr(align(64))]
struct Shared {
    pending: AtomicU64,
    scrubbed_bytes: AtomicU64,
    scrub_nanos: AtomicU64,
    idle: Mutex<()>,
    idle_cv: Condvar,
}

pub(crate) struct Scrubber {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Scrubber {
    pub(crate) fn start(core: Arc<Core>) -> Result<Self, RegionError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let shared = Arc::new(Shared::default());
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("capnp-rdma-scrub".into())
            .spawn(move || run(&core, &rx, &thread_shared))
            .map_err(|source| RegionError::Io {
                op: "spawn scrubber thread",
                source,
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            shared,
        })
    }

    pub(crate) fn is_running(&self) -> bool {
        self.tx.is_some()
    }

    pub(crate) fn submit(&self, job: Job) {
        self.shared.pending.fetch_add(1, Ordering::AcqRel);
        if let Some(tx) = &self.tx {
            // The receiver lives until `shutdown`, which needs `&mut self`.
            let _ = tx.send(job);
        }
    }

    /// (bytes zeroed, nanoseconds spent, jobs pending)
    pub(crate) fn counters(&self) -> (u64, u64, u64) {
        (
            self.shared.scrubbed_bytes.load(Ordering::Relaxed),
            self.shared.scrub_nanos.load(Ordering::Relaxed),
            self.shared.pending.load(Ordering::Acquire),
        )
    }

    pub(crate) fn quiesce(&self) {
        let mut guard = self.shared.idle.lock().unwrap_or_else(|e| e.into_inner());
        while self.shared.pending.load(Ordering::Acquire) != 0 {
            guard = self
                .shared
                .idle_cv
                .wait(guard)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Finishes every queued job and stops the thread.
    pub(crate) fn shutdown(&mut self) {
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(core: &Core, rx: &mpsc::Receiver<Job>, shared: &Shared) {
    crate::sys::lower_thread_priority();
    while let Ok(job) = rx.recv() {
        let start = Instant::now();
        // SAFETY: the job is a released allocation of this owner; its segment's Builder is gone,
        // so nothing references the bytes, and only this thread handles the job.
        unsafe { core.zero_streaming(job.first, job.dirty) };
        let nanos = start.elapsed().as_nanos() as u64;
        if let Err(e) = core.free_zeroed(job.first, job.blocks) {
            debug_assert!(false, "scrubber could not free its own allocation: {e}");
        }
        shared
            .scrubbed_bytes
            .fetch_add(job.dirty, Ordering::Relaxed);
        shared.scrub_nanos.fetch_add(nanos, Ordering::Relaxed);
        if shared.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _guard = shared.idle.lock().unwrap_or_else(|e| e.into_inner());
            shared.idle_cv.notify_all();
        }
    }
}
