//! The staging region: one shared mapping that holds a header, the block bitmap, the owner and
//! allocation tables, and the data blocks that message segments are carved from.
//!
//! A region is created once (from an anonymous memfd, a named POSIX shm object, or a file for
//! persistence), pre-faulted so the hot path never page-faults, optionally locked and backed by
//! huge pages, and then opened by any number of processes, which all allocate from the same
//! bitmap. Every process that opens a region takes an *owner slot* (pid + process start time),
//! and every allocation records its owner, so a supervisor can [reclaim](Region::reclaim_dead_owners)
//! everything a dead process held.
//!
//! Released blocks are zeroed before they are handed out again: small releases inline, larger
//! ones by a background scrubber thread, so the allocator can promise zeroed memory (Cap'n Proto's
//! contract) without zeroing on the producer's critical path.
//!
//! **Across restarts** (file-backed regions): [`BlockLease::keep`] ends a lease without freeing
//! its blocks, which stay recorded in the allocation table; after a graceful close (or a crash) the
//! next process reopens the file with [`Region::open_path`], takes over each allocation it still
//! wants with [`Region::adopt`] and frees the rest with [`Region::reclaim_dead_owners`].
//!
//! ```
//! # let path = std::env::temp_dir().join(format!("capnp-rdma-doc-keep-{}", std::process::id()));
//! use capnp_rdma::{OpenOptions, Region, RegionOptions};
//!
//! let region = Region::create(&RegionOptions::file(&path, 8 << 20).block_size(64 << 10)).unwrap();
//! let mut lease = region.lease(100).unwrap();
//! lease.as_mut_slice()[..5].copy_from_slice(b"frame");
//! let kept = lease.keep(); // { offset, len }: remember it somewhere durable
//! drop(region);            // graceful close: the blocks stay allocated in the file
//!
//! let region = Region::open_path(&path, &OpenOptions::default()).unwrap();
//! let lease = region.adopt(kept.offset).unwrap();
//! assert_eq!(&lease.as_slice()[..5], b"frame");
//! region.reclaim_dead_owners().unwrap(); // frees whatever was kept but not adopted
//! # drop((lease, region)); std::fs::remove_file(&path).unwrap();
//! ```
//! ```
//! use capnp_rdma::{Region, RegionOptions};
//!
//! let region = Region::create(&RegionOptions::memfd(8 << 20).block_size(64 << 10)).unwrap();
//! let mut lease = region.lease(100_000).unwrap(); // two 64 KiB blocks
//! lease.as_mut_slice()[0] = 7;
//! assert_eq!(region.stats().blocks_in_use, 2);
//! drop(lease);
//! region.quiesce();
//! assert_eq!(region.stats().blocks_in_use, 0);
//! ```

mod error;
mod layout;
mod lease;
mod options;
mod owners;
mod scrub;

pub use error::RegionError;
pub use lease::{BlockLease, KeptAllocation};
pub use options::{Backing, HugePages, OpenOptions, RegionOptions};

pub use layout::{Geometry, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
pub use owners::ReclaimReport;

use crate::bitmap::{BitmapError, BlockBitmap};
use crate::sync::AtomicU64;
use crate::sys::{self, Mapping};
use error::io_err;
use layout::RawHeader;
use owners::{OwnerSlot, TableEntry};
use scrub::Scrubber;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counters of a region, as seen by this process.
///
/// `blocks_*` are region-wide (all processes); the others count this process's handle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionStats {
    /// Data blocks in the region.
    pub blocks_total: u64,
    /// Blocks allocated (by any process), including blocks waiting to be scrubbed.
    pub blocks_in_use: u64,
    /// Blocks free.
    pub free_blocks: u64,
    /// `blocks_in_use * block_size`.
    pub bytes_in_use: u64,
    /// Allocations (segments, leases and adoptions) made by this process.
    pub allocations: u64,
    /// Segments that fell back to the heap because the region was exhausted.
    pub fallbacks: u64,
    /// Bytes of heap fallback segments allocated.
    pub fallback_bytes: u64,
    /// Allocations that had to wait for free blocks.
    pub waits: u64,
    /// Total time spent waiting, in nanoseconds.
    pub wait_nanos: u64,
    /// Allocations released by this process.
    pub releases: u64,
    /// Bytes zeroed inline at release (small releases).
    pub inline_scrubbed_bytes: u64,
    /// Bytes zeroed by the background scrubber.
    pub scrubbed_bytes: u64,
    /// Time the background scrubber spent zeroing, in nanoseconds.
    pub scrub_nanos: u64,
    /// Releases queued for the scrubber and not yet freed.
    pub scrub_pending: u64,
}

#[derive(Default)]
#[repr(align(64))]
struct ProducerCounters {
    allocations: std::sync::atomic::AtomicU64,
    fallbacks: std::sync::atomic::AtomicU64,
    fallback_bytes: std::sync::atomic::AtomicU64,
    waits: std::sync::atomic::AtomicU64,
    wait_nanos: std::sync::atomic::AtomicU64,
    releases: std::sync::atomic::AtomicU64,
    inline_scrubbed_bytes: std::sync::atomic::AtomicU64,
}

/// The mapping plus its validated geometry; shared with the scrubber thread.
pub(crate) struct Core {
    map: Mapping,
    geo: Geometry,
    region_id: u64,
}

impl Core {
    /// A shared reference to a `T` at `offset` in the mapping.
    ///
    /// # Safety
    /// `offset` must be aligned for `T` and `offset + size_of::<T>()` within the mapping, and the
    /// bytes there must only ever be accessed as `T` (atomics) by every process.
    unsafe fn at<T>(&self, offset: usize) -> &T {
        debug_assert!(offset + std::mem::size_of::<T>() <= self.map.len());
        debug_assert_eq!(offset % std::mem::align_of::<T>(), 0);
        // SAFETY: in bounds and aligned per the caller; the mapping lives as long as `self`.
        unsafe { &*self.map.as_ptr().add(offset).cast::<T>() }
    }

    /// A slice of `len` `T`s at `offset`.
    ///
    /// # Safety
    /// As for [`Core::at`], for the whole slice.
    unsafe fn slice_at<T>(&self, offset: u64, len: u64) -> &[T] {
        let offset = offset as usize; // within the mapping, so within usize
        debug_assert!(offset + len as usize * std::mem::size_of::<T>() <= self.map.len());
        // SAFETY: in bounds and aligned per the caller; the mapping lives as long as `self`.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(offset).cast::<T>(), len as usize)
        }
    }

    fn hint(&self) -> &AtomicU64 {
        // SAFETY: fixed, 64-aligned offset inside the header page, used only as an AtomicU64.
        unsafe { self.at(layout::HINT_OFFSET) }
    }

    fn used(&self) -> &AtomicU64 {
        // SAFETY: fixed, 64-aligned offset inside the header page, used only as an AtomicU64.
        unsafe { self.at(layout::USED_OFFSET) }
    }

    fn state(&self) -> &AtomicU64 {
        // SAFETY: fixed, 64-aligned offset inside the header page, used only as an AtomicU64.
        unsafe { self.at(layout::STATE_OFFSET) }
    }

    fn free_epoch(&self) -> &AtomicU32 {
        // SAFETY: fixed, 4-aligned offset inside the header page, used only as an AtomicU32.
        unsafe { self.at(layout::EPOCH_OFFSET) }
    }

    fn waiters(&self) -> &AtomicU32 {
        // SAFETY: fixed, 4-aligned offset inside the header page, used only as an AtomicU32.
        unsafe { self.at(layout::WAITERS_OFFSET) }
    }

    pub(crate) fn bitmap(&self) -> BlockBitmap<'_> {
        // SAFETY: the validated geometry places bitmap_words u64s at the 8-aligned bitmap_offset,
        // inside the mapping, and the bitmap words are only ever accessed atomically.
        let words = unsafe { self.slice_at(self.geo.bitmap_offset, self.geo.bitmap_words) };
        BlockBitmap::new(words, self.hint(), self.used(), self.geo.block_count)
            .expect("geometry validated: bitmap words match block count")
    }

    pub(crate) fn table(&self) -> &[AtomicU64] {
        // SAFETY: the validated geometry places block_count u64s at the 64-aligned table_offset,
        // inside the mapping; table entries are only ever accessed atomically.
        unsafe { self.slice_at(self.geo.table_offset, self.geo.block_count) }
    }

    pub(crate) fn owners(&self) -> &[OwnerSlot] {
        // SAFETY: the validated geometry places owner_slots 32-byte slots (all atomics) at the
        // 64-aligned owners_offset, inside the mapping.
        unsafe { self.slice_at(self.geo.owners_offset, self.geo.owner_slots) }
    }

    /// Address of the first byte of `block`.
    pub(crate) fn block_ptr(&self, block: u64) -> *mut u8 {
        debug_assert!(block < self.geo.block_count);
        // SAFETY: block < block_count, so the offset is inside the mapping.
        unsafe { self.map.as_ptr().add(self.geo.block_offset(block) as usize) }
    }

    /// Zeroes `len` bytes from the start of `block`.
    ///
    /// # Safety
    /// The caller holds the allocation covering these bytes and no reference into them exists.
    pub(crate) unsafe fn zero(&self, block: u64, len: u64) {
        debug_assert!(self.geo.block_offset(block) + len <= self.geo.region_bytes);
        // SAFETY: in bounds (len never exceeds the allocation); exclusive per the caller.
        unsafe { std::ptr::write_bytes(self.block_ptr(block), 0, len as usize) };
    }

    /// Like [`Core::zero`], but with non-temporal stores where the CPU has them: the zeroes go
    /// to memory without filling this core's cache, so the next user of the blocks (often on
    /// another core) does not have to pull freshly written lines out of ours.
    ///
    /// # Safety
    /// As for [`Core::zero`].
    pub(crate) unsafe fn zero_streaming(&self, block: u64, len: u64) {
        let ptr = self.block_ptr(block);
        let len = len as usize;
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{__m128i, _mm_setzero_si128, _mm_sfence, _mm_stream_si128};
            // Blocks start 4 KiB-aligned, so whole 16-byte chunks are aligned.
            let chunks = len / 16;
            // SAFETY: SSE2 is part of the x86_64 baseline; every chunk is 16-aligned and inside
            // the allocation (chunks * 16 <= len); exclusive per the caller. The sfence orders
            // the streaming stores before the Release store that frees the blocks.
            unsafe {
                let zero = _mm_setzero_si128();
                let base = ptr.cast::<__m128i>();
                for i in 0..chunks {
                    _mm_stream_si128(base.add(i), zero);
                }
                _mm_sfence();
                std::ptr::write_bytes(ptr.add(chunks * 16), 0, len - chunks * 16);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        // SAFETY: as for `zero`.
        unsafe {
            std::ptr::write_bytes(ptr, 0, len)
        };
    }

    /// Frees an allocation whose bytes are already zeroed: clears its table entry, clears its
    /// bits and wakes any allocation waiting for space.
    pub(crate) fn free_zeroed(&self, block: u64, blocks: u64) -> Result<(), RegionError> {
        self.table()[block as usize].store(0, Ordering::Release);
        self.free_claimed(block, blocks)
    }

    /// Frees zeroed blocks whose table entry the caller has already cleared (a reclaimer, which
    /// clears it with a CAS to claim the allocation): clears the bits and wakes any allocation
    /// waiting for space.
    pub(crate) fn free_claimed(&self, block: u64, blocks: u64) -> Result<(), RegionError> {
        self.bitmap().free(block, blocks)?;
        self.free_epoch().fetch_add(1, Ordering::Release);
        if self.waiters().load(Ordering::SeqCst) != 0 {
            sys::futex_wake_all(self.free_epoch());
        }
        Ok(())
    }
}

struct Inner {
    core: Arc<Core>,
    owner: u16,
    counters: ProducerCounters,
    scrubber: Scrubber,
    inline_scrub_limit: u64,
    huge_pages: bool,
    file: File,
    unlink_on_drop: Option<String>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.scrubber.shutdown();
        owners::release_slot(&self.core, self.owner);
        if let Some(name) = self.unlink_on_drop.take() {
            let _ = sys::shm_unlink(&name);
        }
    }
}

/// A handle to a mapped staging region. Cheap to clone; the mapping lives until the last
/// clone (and every allocator and lease made from it) is gone.
#[derive(Clone)]
pub struct Region {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("id", &self.id())
            .field("geometry", &self.inner.core.geo)
            .field("owner_slot", &self.inner.owner)
            .finish()
    }
}

fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(sys::pid().into());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

impl Region {
    /// Creates and formats a new region.
    pub fn create(options: &RegionOptions) -> Result<Self, RegionError> {
        let geo = Geometry::compute(options.size, options.block_size)?;
        let mut huge = false;
        let file = match &options.backing {
            Backing::Memfd => match options.huge_pages {
                HugePages::Off => {
                    sys::memfd("capnp-rdma", false).map_err(io_err("memfd_create"))?
                }
                HugePages::Prefer | HugePages::Require => {
                    match sys::memfd("capnp-rdma", true).and_then(|f| {
                        f.set_len(options.size)?;
                        sys::fallocate(&f, options.size)?;
                        Ok(f)
                    }) {
                        Ok(f) => {
                            huge = true;
                            f
                        }
                        Err(source) if options.huge_pages == HugePages::Require => {
                            return Err(RegionError::HugePagesUnavailable { source })
                        }
                        Err(_) => {
                            sys::memfd("capnp-rdma", false).map_err(io_err("memfd_create"))?
                        }
                    }
                }
            },
            Backing::Shm(name) => sys::shm_open(name, true).map_err(io_err("shm_open"))?,
            Backing::File(path) => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(io_err("create region file"))?,
        };
        if options.huge_pages == HugePages::Require && !huge {
            return Err(RegionError::HugePagesUnavailable {
                source: io::Error::new(
                    io::ErrorKind::Unsupported,
                    "explicit huge pages are only available for memfd regions",
                ),
            });
        }
        if !huge {
            file.set_len(options.size).map_err(io_err("ftruncate"))?;
            // Reserve the pages now: running out later would be a SIGBUS on first write.
            sys::fallocate(&file, options.size).map_err(io_err("fallocate"))?;
        }
        let map =
            Mapping::map_shared(file.as_fd(), options.size as usize).map_err(io_err("mmap"))?;
        if options.huge_pages == HugePages::Prefer && !huge {
            let _ = map.advise_huge(); // best effort: THP for shmem may be disabled
        }
        let region_id = random_id();
        // SAFETY: the mapping is new and exclusively ours (memfd, or created with O_EXCL), at
        // least one page long and page-aligned, so the header fits and nothing else reads it yet.
        unsafe { std::ptr::write(map.as_ptr().cast::<RawHeader>(), geo.to_raw(region_id)) };
        let core = Core {
            map,
            geo,
            region_id,
        };
        core.bitmap().format();
        // Owner slots and table entries are zero in a fresh file: nothing to do.
        core.state().store(layout::STATE_READY, Ordering::Release);
        let unlink = match (&options.backing, options.keep_name) {
            (Backing::Shm(name), false) => Some(name.clone()),
            _ => None,
        };
        Self::finish(
            core,
            file,
            options.prefault,
            options.mlock,
            options.inline_scrub_limit,
            huge,
            unlink,
        )
    }

    /// Opens a region from a descriptor received from its creator (e.g. over SCM_RIGHTS).
    pub fn open_fd(fd: OwnedFd, options: &OpenOptions) -> Result<Self, RegionError> {
        Self::open_file(File::from(fd), options)
    }

    /// Opens a region created with [`Backing::Shm`] by name.
    pub fn open_shm(name: &str, options: &OpenOptions) -> Result<Self, RegionError> {
        Self::open_file(
            sys::shm_open(name, false).map_err(io_err("shm_open"))?,
            options,
        )
    }

    /// Opens a file-backed region.
    pub fn open_path(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Self, RegionError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("open region file"))?;
        Self::open_file(file, options)
    }

    fn open_file(file: File, options: &OpenOptions) -> Result<Self, RegionError> {
        let file_bytes = file.metadata().map_err(io_err("fstat"))?.len();
        if file_bytes < layout::HEADER_BYTES {
            return Err(RegionError::Truncated {
                expected: layout::HEADER_BYTES,
                actual: file_bytes,
            });
        }
        let header_map = Mapping::map_shared(file.as_fd(), layout::HEADER_BYTES as usize)
            .map_err(io_err("mmap header"))?;
        // SAFETY: the header mapping is HEADER_BYTES long and page-aligned; RawHeader is plain
        // integers (any bit pattern is valid) and is copied out with a volatile read, so a
        // concurrent writer cannot make us act on a value we did not validate.
        let raw = unsafe { std::ptr::read_volatile(header_map.as_ptr().cast::<RawHeader>()) };
        // SAFETY: STATE_OFFSET is inside the header page and 8-aligned.
        let state = unsafe {
            &*header_map
                .as_ptr()
                .add(layout::STATE_OFFSET)
                .cast::<AtomicU64>()
        }
        .load(Ordering::Acquire);
        let geo = Geometry::validate(&raw, file_bytes)?;
        if state != layout::STATE_READY {
            return Err(RegionError::CorruptHeader {
                reason: "region was never fully initialized",
            });
        }
        drop(header_map);
        let map =
            Mapping::map_shared(file.as_fd(), geo.region_bytes as usize).map_err(io_err("mmap"))?;
        let core = Core {
            map,
            geo,
            region_id: raw.region_id,
        };
        Self::finish(
            core,
            file,
            options.prefault,
            options.mlock,
            options.inline_scrub_limit,
            false,
            None,
        )
    }

    fn finish(
        core: Core,
        file: File,
        prefault: bool,
        mlock: bool,
        inline_scrub_limit: u64,
        huge_pages: bool,
        unlink_on_drop: Option<String>,
    ) -> Result<Self, RegionError> {
        if mlock {
            core.map.lock().map_err(|source| RegionError::Mlock {
                bytes: core.geo.region_bytes,
                limit: sys::memlock_limit()
                    .map(|l| format!("{l} bytes"))
                    .unwrap_or_else(|| "unlimited".into()),
                source,
            })?;
        }
        if prefault {
            let page = if huge_pages {
                2 << 20
            } else {
                sys::page_size()
            };
            core.map.prefault(page).map_err(io_err("prefault"))?;
        }
        let core = Arc::new(core);
        let owner = owners::claim_slot(&core)?;
        let scrubber = Scrubber::start(Arc::clone(&core))?;
        Ok(Self {
            inner: Arc::new(Inner {
                core,
                owner,
                counters: ProducerCounters::default(),
                scrubber,
                inline_scrub_limit,
                huge_pages,
                file,
                unlink_on_drop,
            }),
        })
    }

    /// A random id chosen at creation, the same in every process that opens the region.
    pub fn id(&self) -> u64 {
        self.inner.core.region_id
    }

    /// The region's layout.
    pub fn geometry(&self) -> Geometry {
        self.inner.core.geo
    }

    /// Bytes per block.
    pub fn block_size(&self) -> u64 {
        self.inner.core.geo.block_size
    }

    /// Base address of the mapping in this process (for NIC registration of the whole
    /// region; never send it to another process — send offsets).
    pub fn as_ptr(&self) -> *const u8 {
        self.inner.core.map.as_ptr()
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> u64 {
        self.inner.core.geo.region_bytes
    }

    /// Always false: a region holds at least one block.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The backing descriptor, to share the region with another process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.file.as_fd()
    }

    /// Whether explicit huge pages back this region.
    pub fn huge_pages(&self) -> bool {
        self.inner.huge_pages
    }

    /// The owner slot this handle allocates under.
    pub fn owner_slot(&self) -> u16 {
        self.inner.owner
    }

    /// The block bitmap (shared by every process using the region).
    pub fn bitmap(&self) -> BlockBitmap<'_> {
        self.inner.core.bitmap()
    }

    pub(crate) fn core(&self) -> &Core {
        &self.inner.core
    }

    /// Offset of `ptr` within the region if `[ptr, ptr + len)` lies in the data area.
    pub(crate) fn offset_of(&self, ptr: *const u8, len: usize) -> Option<u64> {
        let base = self.as_ptr() as usize;
        let addr = ptr as usize;
        let geo = &self.inner.core.geo;
        let offset = addr.checked_sub(base)? as u64;
        (offset >= geo.data_offset && offset.checked_add(len as u64)? <= geo.region_bytes)
            .then_some(offset)
    }

    /// Address of `offset` in this process, derived from the mapping (not from a reference).
    /// The caller checks the range first.
    pub(crate) fn data_ptr(&self, offset: u64) -> *mut u8 {
        debug_assert!(offset <= self.len());
        self.inner.core.map.as_ptr().wrapping_add(offset as usize)
    }

    /// Checks that `offset..offset+len` lies in the data area.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<(), RegionError> {
        let geo = &self.inner.core.geo;
        match offset.checked_add(len) {
            Some(end) if offset >= geo.data_offset && end <= geo.region_bytes => Ok(()),
            _ => Err(RegionError::OutOfRange {
                offset,
                len,
                data_offset: geo.data_offset,
                end: geo.region_bytes,
            }),
        }
    }

    /// The bytes at `offset..offset+len` of the data area.
    ///
    /// # Safety
    /// While the returned slice lives, no thread or process may write those bytes: the caller
    /// must hold (or be lent) the allocation that covers them, e.g. as the consumer of a sealed
    /// message whose producer no longer writes it.
    pub unsafe fn bytes(&self, offset: u64, len: u64) -> Result<&[u8], RegionError> {
        self.check_range(offset, len)?;
        // SAFETY: the range is inside the mapping (checked above), which lives as long as
        // `self`; the absence of writers is the caller's obligation.
        Ok(unsafe { std::slice::from_raw_parts(self.as_ptr().add(offset as usize), len as usize) })
    }

    /// Allocates `blocks` contiguous zeroed blocks owned by this handle, recording the owner.
    pub(crate) fn alloc_blocks(&self, blocks: u64) -> Result<u64, RegionError> {
        let core = &self.inner.core;
        let first = core.bitmap().allocate(blocks).map_err(|e| match e {
            BitmapError::Exhausted {
                largest_free_run, ..
            } => RegionError::Exhausted {
                requested: blocks,
                free: core.bitmap().free_blocks(),
                largest_run: largest_free_run,
            },
            other => RegionError::Bitmap(other),
        })?;
        core.table()[first as usize].store(
            TableEntry::new(self.inner.owner, blocks).to_bits(),
            Ordering::Release,
        );
        self.inner
            .counters
            .allocations
            .fetch_add(1, Ordering::Relaxed);
        Ok(first)
    }

    /// Like [`Region::alloc_blocks`], but when the region is exhausted waits up to `timeout`
    /// for blocks to be freed (by this or any other process).
    pub(crate) fn alloc_blocks_wait(
        &self,
        blocks: u64,
        timeout: Duration,
    ) -> Result<u64, RegionError> {
        match self.alloc_blocks(blocks) {
            Err(RegionError::Exhausted { .. }) if !timeout.is_zero() => {}
            other => return other,
        }
        let core = &self.inner.core;
        let start = Instant::now();
        let deadline = start + timeout;
        self.inner.counters.waits.fetch_add(1, Ordering::Relaxed);
        let result = loop {
            let epoch = core.free_epoch().load(Ordering::Acquire);
            core.waiters().fetch_add(1, Ordering::SeqCst);
            // Re-try after announcing ourselves: a free between the failed attempt and the
            // announcement would otherwise not wake us.
            let attempt = self.alloc_blocks(blocks);
            let now = Instant::now();
            if !matches!(attempt, Err(RegionError::Exhausted { .. })) || now >= deadline {
                core.waiters().fetch_sub(1, Ordering::SeqCst);
                break attempt;
            }
            sys::futex_wait(core.free_epoch(), epoch, deadline - now);
            core.waiters().fetch_sub(1, Ordering::SeqCst);
        };
        self.inner
            .counters
            .wait_nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        result
    }

    /// Releases an allocation made by this handle: `dirty` bytes from the start of `first`
    /// are zeroed (inline if small, else by the scrubber) before the blocks become free.
    ///
    /// # Safety
    /// `first`/`blocks` must be an allocation made by this handle and not yet released, and
    /// no reference into its bytes may be used afterwards.
    pub(crate) unsafe fn release(&self, first: u64, blocks: u64, dirty: u64) {
        let inner = &self.inner;
        inner.counters.releases.fetch_add(1, Ordering::Relaxed);
        let dirty = dirty.min(blocks * inner.core.geo.block_size);
        if dirty <= inner.inline_scrub_limit || !inner.scrubber.is_running() {
            // SAFETY: the allocation is ours and unreferenced (caller's contract).
            unsafe { inner.core.zero(first, dirty) };
            inner
                .counters
                .inline_scrubbed_bytes
                .fetch_add(dirty, Ordering::Relaxed);
            if let Err(e) = inner.core.free_zeroed(first, blocks) {
                debug_assert!(false, "releasing our own allocation failed: {e}");
            }
        } else {
            inner.scrubber.submit(scrub::Job {
                first,
                blocks,
                dirty,
            });
        }
    }

    /// Allocates a lease of at least `bytes` (whole blocks), zeroed, owned by this process.
    /// Fails at once with [`RegionError::Exhausted`] if no run of blocks is free.
    pub fn lease(&self, bytes: u64) -> Result<BlockLease, RegionError> {
        let blocks = bytes.max(1).div_ceil(self.block_size());
        let first = self.alloc_blocks(blocks)?;
        Ok(BlockLease {
            region: self.clone(),
            first,
            blocks,
            dirty: blocks * self.block_size(),
        })
    }

    /// Counters (see [`RegionStats`]).
    pub fn stats(&self) -> RegionStats {
        let c = &self.inner.counters;
        let core = &self.inner.core;
        let used = core.used().load(Ordering::Relaxed);
        let (scrubbed_bytes, scrub_nanos, scrub_pending) = self.inner.scrubber.counters();
        RegionStats {
            blocks_total: core.geo.block_count,
            blocks_in_use: used,
            free_blocks: core.geo.block_count.saturating_sub(used),
            bytes_in_use: used * core.geo.block_size,
            allocations: c.allocations.load(Ordering::Relaxed),
            fallbacks: c.fallbacks.load(Ordering::Relaxed),
            fallback_bytes: c.fallback_bytes.load(Ordering::Relaxed),
            waits: c.waits.load(Ordering::Relaxed),
            wait_nanos: c.wait_nanos.load(Ordering::Relaxed),
            releases: c.releases.load(Ordering::Relaxed),
            inline_scrubbed_bytes: c.inline_scrubbed_bytes.load(Ordering::Relaxed),
            scrubbed_bytes,
            scrub_nanos,
            scrub_pending,
        }
    }

    pub(crate) fn count_fallback(&self, bytes: u64) {
        let c = &self.inner.counters;
        c.fallbacks.fetch_add(1, Ordering::Relaxed);
        c.fallback_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Blocks until every release this process queued has been zeroed and freed.
    pub fn quiesce(&self) {
        self.inner.scrubber.quiesce();
    }

    /// Frees every allocation held by owners that are not alive: processes that have died
    /// (checked by pid and process start time, so a reused pid is not mistaken for the original
    /// owner), owner slots released at a graceful close with [kept](BlockLease::keep) allocations,
    /// and entries naming no claimed slot. Their blocks are zeroed before they are freed.
    ///
    /// Kept allocations are freed too: a process that restarts on a file-backed region
    /// [adopts](Region::adopt) what it wants first, then calls this. Whoever else calls it on such a
    /// region (a supervisor) destroys kept allocations nobody has adopted yet.
    pub fn reclaim_dead_owners(&self) -> Result<ReclaimReport, RegionError> {
        owners::reclaim(&self.inner.core, self.inner.owner, owners::Scope::NotAlive)
    }

    /// Takes over the allocation whose first block is at `offset` (as [`KeptAllocation::offset`]
    /// or [`BlockLease::offset`] reported it) from an owner that is not alive: a process that has
    /// died, or an owner slot released at a graceful close with [kept](BlockLease::keep)
    /// allocations. The allocation moves to this handle's owner slot atomically, so a concurrent
    /// [`reclaim_dead_owners`](Region::reclaim_dead_owners) in any process either frees it before
    /// or leaves it alone after, and it is never adopted twice. The returned lease covers exactly
    /// the allocation's blocks; their bytes are left as they are (and zeroed when the lease is
    /// released, all of them: the whole length counts as dirty).
    ///
    /// # Errors
    /// - [`RegionError::NotABlockStart`]: `offset` is not the first byte of a block in the data
    ///   area;
    /// - [`RegionError::NoAllocation`]: no allocation starts there;
    /// - [`RegionError::OwnerAlive`]: its owner is a live process (this one included);
    /// - [`RegionError::AdoptContended`]: another handle kept the owner slot locked for a second;
    /// - [`RegionError::CorruptTable`]: the table entry runs past the data area or covers blocks
    ///   the bitmap marks free.
    pub fn adopt(&self, offset: u64) -> Result<BlockLease, RegionError> {
        let core = &self.inner.core;
        let geo = &core.geo;
        let block = offset
            .checked_sub(geo.data_offset)
            .filter(|rel| rel % geo.block_size == 0 && rel / geo.block_size < geo.block_count)
            .map(|rel| rel / geo.block_size)
            .ok_or(RegionError::NotABlockStart {
                offset,
                data_offset: geo.data_offset,
                end: geo.region_bytes,
                block_size: geo.block_size,
            })?;
        let blocks = owners::adopt(core, self.inner.owner, block).map_err(|e| match e {
            owners::AdoptError::NoAllocation => RegionError::NoAllocation { offset },
            owners::AdoptError::Corrupt(reason) => RegionError::CorruptTable { offset, reason },
            owners::AdoptError::Alive(owner_slot, pid) => RegionError::OwnerAlive {
                offset,
                owner_slot,
                pid,
            },
            owners::AdoptError::Busy(owner_slot) => {
                RegionError::AdoptContended { offset, owner_slot }
            }
        })?;
        self.inner
            .counters
            .allocations
            .fetch_add(1, Ordering::Relaxed);
        Ok(BlockLease {
            region: self.clone(),
            first: block,
            blocks,
            dirty: blocks * geo.block_size,
        })
    }

    /// Writes the region's modified pages back to its file and waits for the device
    /// (`fdatasync`): kept allocations then survive a power failure, not only a process exit.
    /// Flushes every dirty page of the region, not one allocation's. A no-op in effect for memfd
    /// and shm regions.
    pub fn sync_data(&self) -> Result<(), RegionError> {
        self.inner
            .file
            .sync_data()
            .map_err(io_err("fdatasync region file"))
    }

    pub(crate) fn mark_kept(&self, first: u64, blocks: u64) {
        owners::mark_kept(&self.inner.core, self.inner.owner, first, blocks);
    }

    /// Number of live allocations per owner slot and blocks the bitmap marks used that no
    /// allocation covers (blocks of a process killed between claiming bits and recording the
    /// allocation). Racy while other processes allocate; for diagnostics and tests.
    pub fn audit(&self) -> owners::Audit {
        owners::audit(&self.inner.core)
    }
}

pub use owners::Audit;
