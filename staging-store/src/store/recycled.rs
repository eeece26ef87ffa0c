//! The recycled pool: freed frames' blocks kept un-zeroed for `dirtyOk` creates, and where
//! the region's blocks are ([`BlockCounts`]).

use crate::proto::PreviousFrame;
use capnp_rdma::BlockLease;
use std::collections::HashMap;

/// Blocks of freed frames kept un-zeroed for `dirtyOk` creates of the same size: a producer
/// that overwrites its whole frame does not pay for zeroing (the region's scrubber would
/// otherwise clear every freed frame before its blocks can be granted again). Each entry
/// remembers the frame it held, so a grant from the same stream can say what its bytes are.
#[derive(Default)]
pub(super) struct Recycled {
    by_len: HashMap<u64, Vec<(BlockLease, Freed)>>,
    pub(super) bytes: u64,
    pub(super) reused: u64,
}

/// The frame a recycled lease held, as it was sealed.
pub(super) struct Freed {
    pub(super) stream: String,
    pub(super) frame: PreviousFrame,
}

impl Recycled {
    /// Blocks for `size` bytes, preferring a frame of `stream` (whose bytes are then named).
    pub(super) fn take(
        &mut self,
        size: u64,
        block: u64,
        stream: &str,
    ) -> Option<(BlockLease, Option<PreviousFrame>)> {
        let len = size.max(1).div_ceil(block) * block;
        let leases = self.by_len.get_mut(&len)?;
        // The most recently freed frame of this stream, else the most recently freed one.
        let at = leases
            .iter()
            .rposition(|(_, freed)| freed.stream == stream)
            .or_else(|| leases.len().checked_sub(1))?;
        let (lease, freed) = leases.remove(at);
        self.bytes -= lease.len();
        self.reused += 1;
        let previous = (freed.stream == stream).then_some(freed.frame);
        Some((lease, previous))
    }

    pub(super) fn put(&mut self, lease: BlockLease, freed: Freed, cap: u64) {
        if self.bytes + lease.len() <= cap {
            self.bytes += lease.len();
            self.by_len
                .entry(lease.len())
                .or_default()
                .push((lease, freed));
        }
    }

    /// Keeps the blocks but no longer ties them to `stream` (deleted).
    pub(super) fn forget(&mut self, stream: &str) {
        for (_, freed) in self.by_len.values_mut().flatten() {
            if freed.stream == stream {
                freed.stream.clear();
            }
        }
    }

    pub(super) fn clear(&mut self) {
        self.by_len.clear();
        self.bytes = 0;
    }
}

/// Where the region's blocks are ([`Store::blocks`]).
///
/// [`Store::blocks`]: super::Store::blocks
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCounts {
    /// Allocated in the region's bitmap: the three below.
    pub allocated: u64,
    /// Held by frames, grants and sends in flight: back in the region when their last
    /// reference goes.
    pub held: u64,
    /// Freed frames' blocks kept un-zeroed for `dirtyOk` creates (the store's free list;
    /// given back to the region when it runs short).
    pub recycled: u64,
    /// Released, waiting for the scrubber to zero them.
    pub scrubbing: u64,
}
