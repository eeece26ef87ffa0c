//! [`StagingAllocator`]: a `capnp::message::Allocator` that carves segments out of a [`Region`].
//!
//! Segment sizing:
//! - the first segment of a message takes one block and starts [`TABLE_PREFIX_BYTES`] into it,
//!   leaving room in front for the stream-framing segment table, so the table and segment 0
//!   go out as a single scatter-gather entry;
//! - a request of at least `large_segment_bytes` (a pixel plane) gets a segment of exactly the
//!   requested size, so the plane sits alone in its segment and travels as one entry;
//! - other requests get segments that double in size (one block, two, four, …), like
//!   capnp's default allocator.
//!
//! Memory handed out is zeroed, as Cap'n Proto requires, without zeroing on the producer's
//! path: the region scrubs blocks when they are released and only hands out clean ones.
//!
//! When the region is exhausted, [`Exhausted`] decides: wait for free blocks up to a deadline,
//! then fall back to heap segments (counted in [`RegionStats::fallbacks`](crate::RegionStats));
//! heap segments are not zero-copy: [`SgeList`](crate::framing::SgeList) copies them into the
//! region.
//!
//! ```
//! use capnp_rdma::{Region, RegionOptions, StagingAllocator};
//!
//! let region = Region::create(&RegionOptions::memfd(16 << 20)).unwrap();
//! let mut message = capnp::message::Builder::new(StagingAllocator::new(&region));
//! let mut root: capnp::any_pointer::Builder = message.init_root();
//! root.set_as::<capnp::data::Owned>(&[1u8, 2, 3][..]).unwrap();
//! assert!(region.stats().blocks_in_use >= 1);
//! ```

use crate::region::Region;
use capnp::message::Allocator;
use std::alloc::Layout;
use std::ptr::NonNull;
use std::time::Duration;

/// Bytes reserved in front of a message's first segment for its segment table: room for the
/// table of a message with up to 63 segments.
pub const TABLE_PREFIX_BYTES: u64 = 256;

/// What to do when the region has no run of free blocks for a segment.
///
/// `Allocator::allocate_segment` cannot fail, so every policy produces memory or panics;
/// the default never panics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Exhausted {
    /// Wait up to the duration for blocks to be freed (by this or any other process), then use
    /// a heap segment. The default, with 100 ms.
    WaitThenHeap(Duration),
    /// Use a heap segment at once.
    Heap,
    /// Wait up to the duration, then panic (for deployments that prefer a crash to a copy).
    WaitThenPanic(Duration),
}

impl Default for Exhausted {
    fn default() -> Self {
        Exhausted::WaitThenHeap(Duration::from_millis(100))
    }
}

/// Tuning of a [`StagingAllocator`].
#[derive(Clone, Copy, Debug)]
pub struct AllocatorOptions {
    /// Requests of at least this many bytes get an exactly-sized segment of their own
    /// (default 16 KiB).
    pub large_segment_bytes: u64,
    /// Largest size the doubling of small segments reaches (default 1 MiB).
    pub max_small_segment_bytes: u64,
    /// Policy when the region is exhausted.
    pub exhausted: Exhausted,
}

impl Default for AllocatorOptions {
    fn default() -> Self {
        Self {
            large_segment_bytes: 16 << 10,
            max_small_segment_bytes: 1 << 20,
            exhausted: Exhausted::default(),
        }
    }
}

/// A Cap'n Proto allocator over a shared staging [`Region`].
///
/// Use one allocator per message builder; it is cheap to create (a reference-count increment).
/// Segments are released (and scrubbed) when the builder is dropped.
#[derive(Debug)]
pub struct StagingAllocator {
    region: Region,
    options: AllocatorOptions,
    /// Live segments of the current message; 0 means the next segment is a first segment.
    live: u32,
    /// Size of the next small segment, in bytes.
    next_small: u64,
}

impl StagingAllocator {
    /// An allocator with default options.
    pub fn new(region: &Region) -> Self {
        Self::with_options(region, AllocatorOptions::default())
    }

    /// An allocator with the given options.
    pub fn with_options(region: &Region, options: AllocatorOptions) -> Self {
        Self {
            region: region.clone(),
            options,
            live: 0,
            next_small: region.block_size(),
        }
    }

    /// The region segments come from.
    pub fn region(&self) -> &Region {
        &self.region
    }

    fn alloc_run(&self, blocks: u64) -> Option<u64> {
        let result = match self.options.exhausted {
            Exhausted::Heap => self.region.alloc_blocks(blocks),
            Exhausted::WaitThenHeap(d) | Exhausted::WaitThenPanic(d) => {
                self.region.alloc_blocks_wait(blocks, d)
            }
        };
        match (result, self.options.exhausted) {
            (Ok(first), _) => Some(first),
            (Err(e), Exhausted::WaitThenPanic(_)) => {
                panic!("staging region exhausted and policy is WaitThenPanic: {e}")
            }
            (Err(_), _) => None,
        }
    }

    fn heap_segment(&self, words: u32) -> (NonNull<u8>, u32) {
        let bytes = words as usize * 8;
        self.region.count_fallback(bytes as u64);
        let layout = Layout::from_size_align(bytes.max(8), 8).expect("segment sizes fit a Layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        match NonNull::new(ptr) {
            Some(p) => (p, words),
            None => std::alloc::handle_alloc_error(layout),
        }
    }
}

/// Largest segment Cap'n Proto supports, in words.
const MAX_SEGMENT_WORDS: u64 = (1 << 29) - 1;

// SAFETY: (1) every region block is zero when allocated — fresh files are zero and released
// blocks are zeroed before their bits are cleared (inline or by the scrubber), and heap segments
// come from alloc_zeroed; (2) a segment stays allocated in the bitmap until deallocate_segment;
// (3) the bitmap never hands a block to two allocations; (4) blocks start at multiples of the
// block size (≥ 4 KiB) from a page-aligned mapping, plus TABLE_PREFIX_BYTES (a multiple of 8).
unsafe impl Allocator for StagingAllocator {
    fn allocate_segment(&mut self, minimum_size: u32) -> (NonNull<u8>, u32) {
        let block_size = self.region.block_size();
        let min_bytes = u64::from(minimum_size) * 8;
        let first = self.live == 0;
        let prefix = if first { TABLE_PREFIX_BYTES } else { 0 };
        let bytes = if min_bytes >= self.options.large_segment_bytes {
            min_bytes
        } else if first {
            // One block, unless even the first request is bigger.
            (min_bytes + prefix).max(block_size) - prefix
        } else {
            let size = self.next_small.max(min_bytes);
            self.next_small =
                (self.next_small * 2).min(self.options.max_small_segment_bytes.max(block_size));
            size
        };
        let blocks = (bytes + prefix).div_ceil(block_size);
        // Hand capnp the whole tail of the blocks for small segments, exactly the request for
        // large ones (so nothing else is placed after a plane).
        let words = if min_bytes >= self.options.large_segment_bytes {
            u64::from(minimum_size)
        } else {
            ((blocks * block_size - prefix) / 8).min(MAX_SEGMENT_WORDS)
        } as u32; // ≤ MAX_SEGMENT_WORDS < 2^32
        match self.alloc_run(blocks) {
            Some(block) => {
                self.live += 1;
                let ptr = self.region.core().block_ptr(block);
                // SAFETY: prefix < block size, so the pointer stays inside the allocation.
                let ptr = unsafe { ptr.add(prefix as usize) };
                (
                    NonNull::new(ptr).expect("mapping is not at address 0"),
                    words,
                )
            }
            None => {
                self.live += 1;
                self.heap_segment(words)
            }
        }
    }

    unsafe fn deallocate_segment(&mut self, ptr: NonNull<u8>, word_size: u32, words_used: u32) {
        self.live = self.live.saturating_sub(1);
        if self.live == 0 {
            self.next_small = self.region.block_size();
        }
        let bytes = word_size as usize * 8;
        let Some(offset) = self.region.offset_of(ptr.as_ptr(), bytes) else {
            let layout =
                Layout::from_size_align(bytes.max(8), 8).expect("segment sizes fit a Layout");
            // SAFETY: a pointer outside the region came from `heap_segment` with this layout
            // (capnp passes back the word_size we returned).
            unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
            return;
        };
        let geo = self.region.geometry();
        let within = (offset - geo.data_offset) % geo.block_size;
        let first = (offset - geo.data_offset) / geo.block_size;
        let blocks = (within + bytes as u64).div_ceil(geo.block_size);
        let dirty = within + u64::from(words_used) * 8;
        // SAFETY: (first, blocks) is exactly the run allocate_segment took for this segment
        // (same size arithmetic); capnp deallocates each segment once and no longer touches it.
        unsafe { self.region.release(first, blocks, dirty) };
    }
}
