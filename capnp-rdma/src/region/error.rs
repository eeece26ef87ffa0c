//! Typed errors of region operations.

use crate::bitmap::BitmapError;
use std::io;

/// Why a region could not be created, opened or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegionError {
    /// The block size is not a power of two between 4 KiB and 2 MiB.
    #[error("block size {block_size} is not a power of two between 4 KiB and 2 MiB")]
    BadBlockSize {
        /// Requested block size.
        block_size: u64,
    },
    /// The region cannot hold its metadata and at least one block.
    #[error(
        "a region of {region_bytes} bytes cannot hold metadata and one {block_size}-byte block"
    )]
    TooSmall {
        /// Requested size.
        region_bytes: u64,
        /// Requested block size.
        block_size: u64,
    },
    /// The memory does not start with the region magic.
    #[error("not a capnp-rdma region (magic {found:02x?})")]
    NotARegion {
        /// The first eight bytes found.
        found: [u8; 8],
    },
    /// The region was written by an incompatible version.
    #[error("region layout version {found} is not supported (this build reads {supported})")]
    UnsupportedVersion {
        /// Version in the header.
        found: u32,
        /// Version this build understands.
        supported: u32,
    },
    /// The backing file is shorter than the header says.
    #[error("region is truncated: header says {expected} bytes, backing holds {actual}")]
    Truncated {
        /// Bytes the header declares.
        expected: u64,
        /// Bytes actually present.
        actual: u64,
    },
    /// The header is inconsistent or was never finished.
    #[error("corrupt region header: {reason}")]
    CorruptHeader {
        /// What is wrong.
        reason: &'static str,
    },
    /// Explicit huge pages were required but none could be had.
    #[error("huge pages required but unavailable ({source}); reserve some via /proc/sys/vm/nr_hugepages or use HugePages::Prefer")]
    HugePagesUnavailable {
        /// The system error.
        source: io::Error,
    },
    /// mlock failed, usually because RLIMIT_MEMLOCK is too low.
    #[error("cannot lock {bytes} bytes in memory: {source} (RLIMIT_MEMLOCK is {limit}); raise it with `ulimit -l` or LimitMEMLOCK=")]
    Mlock {
        /// Bytes to lock.
        bytes: u64,
        /// The soft limit, human readable.
        limit: String,
        /// The system error.
        source: io::Error,
    },
    /// Every owner slot is taken by a live process.
    #[error("all {0} owner slots of the region are in use")]
    NoOwnerSlot(u64),
    /// No free run of blocks is large enough right now.
    #[error("region exhausted: {requested} blocks requested, {free} free, largest free run {largest_run}")]
    Exhausted {
        /// Blocks requested.
        requested: u64,
        /// Blocks free in total.
        free: u64,
        /// Longest run of free blocks.
        largest_run: u64,
    },
    /// A byte range is outside the region's data area.
    #[error("range {offset}+{len} is outside the data area {data_offset}..{end}")]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Start of the data area.
        data_offset: u64,
        /// End of the region.
        end: u64,
    },
    /// [`Region::adopt`](super::Region::adopt): the offset is not the first byte of a block in
    /// the data area.
    #[error("offset {offset} is not the start of a block in the data area {data_offset}..{end} (blocks of {block_size} bytes)")]
    NotABlockStart {
        /// Requested offset.
        offset: u64,
        /// Start of the data area.
        data_offset: u64,
        /// End of the region.
        end: u64,
        /// Bytes per block.
        block_size: u64,
    },
    /// [`Region::adopt`](super::Region::adopt): the allocation table records no allocation
    /// starting at this offset (never allocated, freed, reclaimed, or inside a longer one).
    #[error("no allocation starts at offset {offset}")]
    NoAllocation {
        /// Requested offset.
        offset: u64,
    },
    /// [`Region::adopt`](super::Region::adopt): the allocation's owner is a live process (this
    /// handle included); only allocations of dead processes or of slots released at a graceful
    /// close can be adopted.
    #[error("the allocation at offset {offset} belongs to owner slot {owner_slot}, held by live process {pid}")]
    OwnerAlive {
        /// Requested offset.
        offset: u64,
        /// The owner slot recorded for the allocation.
        owner_slot: u16,
        /// The live process holding that slot (0 while it is still registering).
        pid: u32,
    },
    /// [`Region::adopt`](super::Region::adopt): another handle kept the owner's slot locked
    /// (reclaiming or adopting) for too long; retry.
    #[error("owner slot {owner_slot} of the allocation at offset {offset} is locked by another reclaimer or adopter")]
    AdoptContended {
        /// Requested offset.
        offset: u64,
        /// The owner slot recorded for the allocation.
        owner_slot: u16,
    },
    /// The allocation table disagrees with the region (a damaged file).
    #[error("corrupt allocation table at offset {offset}: {reason}")]
    CorruptTable {
        /// Offset of the allocation's first block.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The bitmap reported an inconsistency (double free or corruption).
    #[error("block bitmap: {0}")]
    Bitmap(#[from] BitmapError),
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The system error.
        source: io::Error,
    },
}

pub(crate) fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> RegionError {
    move |source| RegionError::Io { op, source }
}
