//! The one place shared-memory atomics come from.
//!
//! Under `--cfg loom` the lock-free pieces (the block bitmap) are compiled against loom's
//! model-checked atomics so `tests/loom_*.rs` can explore every interleaving; otherwise these are
//! the standard library's atomics, which are valid in memory shared between processes.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
