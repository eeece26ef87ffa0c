//! [`BlockLease`]: blocks held by this process, released (and scrubbed) on drop.

use super::Region;

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
