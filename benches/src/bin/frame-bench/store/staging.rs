//! The staging store's systems: ENTRY POINTS FOR THE LEAD TO FILL.
//!
//! Each function gets the [`Case`] of one (system, frame) and returns what it measured, like
//! [`super::redis::run_redis`]: start the store (a process of its own, or in this one), run a
//! producer and a consumer that carry `case.plan`'s frames with at most `case.in_flight` in
//! flight, stamp frame `i` into plane 0 ([`super::frames::FrameTemplate::stamp`]), check each
//! one in place on the consumer ([`super::frames::FrameTemplate::check`], full when
//! [`super::flow::Flow::full_check`]), and time them with [`super::flow::Flow`] /
//! [`super::flow::Receipts`] (pass the store server's pid to `Flow::new` to get its CPU time).
//!
//! Until a system is built its function returns [`StoreBenchError::NotBuilt`]: the run skips
//! it with a note on stderr and reports no numbers for it.

use super::flow::Measured;
use super::{Case, StoreBenchError};

/// `control`: the store's control path alone (operations that move no pixels), run once per
/// `frame-bench store` run with the first `--frames` size. `Measured::frames` counts
/// operations; the report prints ops/s.
pub(crate) fn run_control(case: &Case) -> Result<Measured, StoreBenchError> {
    let _ = case;
    Err(StoreBenchError::NotBuilt("control"))
}

/// `store-shm`: producer → staging store → consumer, frames handed over in shared memory.
/// Target: >= 20x Redis frames/s at 1080p.
pub(crate) fn run_store_shm(case: &Case) -> Result<Measured, StoreBenchError> {
    let _ = case;
    Err(StoreBenchError::NotBuilt("store-shm"))
}

/// `store-tcp`: producer → staging store → consumer, frames over loopback TCP.
/// Target: >= 1.5x Redis frames/s at 1080p.
pub(crate) fn run_store_tcp(case: &Case) -> Result<Measured, StoreBenchError> {
    let _ = case;
    Err(StoreBenchError::NotBuilt("store-tcp"))
}
