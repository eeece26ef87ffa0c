//! [`BlockLease`]: blocks held by this process, released (and scrubbed) on drop, or
//! [kept](BlockLease::keep) in the region for a later process to [adopt](Region::adopt).

use super::Region;
use std::mem::ManuallyDrop;

/// Where a [kept](BlockLease::keep) allocation lies in its region: what a later process passes
/// to [`Region::adopt`] (`offset`) to get it back as a lease of `len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeptAllocation {
    /// Offset of the allocation's first byte within the region (block-aligned).
    pub offset: u64,
    /// Length in bytes (whole blocks).
    pub len: u64,
}

/// Blocks of a region held by this process until dropped; zeroed when leased, scrubbed when
/// released.
pub struct BlockLease {
    pub(super) region: Region,
    pub(super) first: u64,
    pub(super) blocks: u64,
    pub(super) dirty: u64,
}

impl std::fmt::Debug for BlockLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockLease")
            .field("offset", &self.offset())
            .field("len", &self.len())
            .finish()
    }
}

impl BlockLease {
    /// Offset of the lease's first byte within the region.
    pub fn offset(&self) -> u64 {
        self.region.inner.core.geo.block_offset(self.first)
    }

    /// Length in bytes (whole blocks).
    pub fn len(&self) -> u64 {
        self.blocks * self.region.block_size()
    }

    /// Always false: a lease holds at least one block.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The region the lease belongs to.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The leased bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the blocks are allocated to this lease (bitmap + table) and the mapping
        // outlives `self.region`; only this lease writes them, through `&mut self`.
        unsafe {
            std::slice::from_raw_parts(
                self.region.inner.core.block_ptr(self.first),
                self.len() as usize,
            )
        }
    }

    /// The leased bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.region.inner.core.block_ptr(self.first),
                self.len() as usize,
            )
        }
    }

    /// Ends the lease **without** freeing its blocks: the allocation stays recorded in the
    /// region's allocation table, marked kept, under this handle's owner slot, and its bytes stay
    /// as they are. Use it at a graceful shutdown for data that must outlive the process in a
    /// file-backed region.
    ///
    /// While this handle's process is alive the allocation counts as held by it (no one can
    /// [adopt](Region::adopt) or reclaim it). When the last clone of the handle is dropped with
    /// only kept allocations left, its owner slot is released as *detached*, and another handle —
    /// typically the next process, after [`Region::open_path`] — adopts the allocation by its
    /// offset; [`Region::reclaim_dead_owners`] frees kept allocations nobody adopted. A process
    /// that dies instead of closing leaves the same allocations adoptable, as a dead owner's.
    ///
    /// Nothing is written to disk here: the bytes reach the file through the page cache when the
    /// kernel writes them back (surviving a process exit); call [`Region::sync_data`] to survive
    /// a power failure as well.
    pub fn keep(self) -> KeptAllocation {
        let kept = KeptAllocation {
            offset: self.offset(),
            len: self.len(),
        };
        self.region.mark_kept(self.first, self.blocks);
        let this = ManuallyDrop::new(self);
        // SAFETY: `this` is never used or dropped again, so moving the region handle out of it
        // duplicates nothing; dropping the moved-out handle releases its reference, while the
        // lease's own `Drop` (which would free the blocks) never runs.
        drop(unsafe { std::ptr::read(&this.region) });
        kept
    }

    /// Declares that only the first `bytes` were written, so release zeroes only those.
    ///
    /// # Safety
    /// No byte at or past `bytes` may have been written with a non-zero value.
    pub unsafe fn set_dirty_len(&mut self, bytes: u64) {
        self.dirty = bytes.min(self.len());
    }
}

impl Drop for BlockLease {
    fn drop(&mut self) {
        // SAFETY: this lease's allocation, released once, with no outstanding borrows (Drop).
        unsafe { self.region.release(self.first, self.blocks, self.dirty) };
    }
}
