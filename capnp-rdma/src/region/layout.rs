//! The on-disk / in-memory layout of a staging region and its validation.
//!
//! ```text
//! offset 0            header page: magic, version, geometry, shared atomics (hint, used, futex)
//! bitmap_offset       block bitmap: ceil(blocks / 64) AtomicU64 words (bit set = block in use)
//! owners_offset       owner table: OWNER_SLOTS slots of 32 bytes (pid, start time, state)
//! table_offset        allocation table: one AtomicU64 per block; the first block of each
//!                     allocation records (owner slot, length in blocks)
//! data_offset         data blocks, aligned to the block size
//! ```
//!
//! Everything is derived from `(region_bytes, block_size)` by [`Geometry::compute`], so opening a
//! region recomputes the layout and compares it with the header: a header that disagrees with
//! itself is rejected before any pointer is formed from it.

use super::RegionError;
use std::mem::size_of;

/// The first eight bytes of every region.
pub(crate) const MAGIC: [u8; 8] = *b"CAPNRDMA";
/// Layout version written by this build.
pub(crate) const VERSION: u32 = 1;
/// Bytes reserved for the header.
pub(crate) const HEADER_BYTES: u64 = 4096;
/// Number of owner slots (processes that may hold allocations at once).
pub(crate) const OWNER_SLOTS: u64 = 256;
/// Bytes per owner slot.
pub(crate) const OWNER_SLOT_BYTES: u64 = 32;
/// Smallest block size.
pub const MIN_BLOCK_SIZE: u64 = 4 << 10;
/// Largest block size.
pub const MAX_BLOCK_SIZE: u64 = 2 << 20;
/// Header `state` value once the creator has finished formatting.
pub(crate) const STATE_READY: u64 = 0x5245_4144_5921; // "READY!"

/// The fixed part of the header, as stored at offset 0.
#[repr(C)]
pub(crate) struct RawHeader {
    pub(crate) magic: [u8; 8],
    pub(crate) version: u32,
    pub(crate) header_bytes: u32,
    pub(crate) region_bytes: u64,
    pub(crate) block_size: u64,
    pub(crate) block_count: u64,
    pub(crate) bitmap_offset: u64,
    pub(crate) bitmap_words: u64,
    pub(crate) owners_offset: u64,
    pub(crate) owner_slots: u64,
    pub(crate) table_offset: u64,
    pub(crate) data_offset: u64,
    pub(crate) region_id: u64,
}

/// Offsets of the shared atomics inside the header page (after [`RawHeader`]).
pub(crate) const STATE_OFFSET: usize = 128;
pub(crate) const HINT_OFFSET: usize = 192; // own cache line: written on every allocation
pub(crate) const USED_OFFSET: usize = 256; // own cache line
pub(crate) const EPOCH_OFFSET: usize = 320; // futex word (u32) + waiter count (u32)
pub(crate) const WAITERS_OFFSET: usize = 324;

const _: () = assert!(size_of::<RawHeader>() <= STATE_OFFSET);

/// Where everything lives in a region of a given size and block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Total bytes of the region (the mapping length).
    pub region_bytes: u64,
    /// Bytes per block.
    pub block_size: u64,
    /// Number of data blocks.
    pub block_count: u64,
    /// Offset of the block bitmap.
    pub bitmap_offset: u64,
    /// Number of u64 words in the bitmap.
    pub bitmap_words: u64,
    /// Offset of the owner table.
    pub owners_offset: u64,
    /// Number of owner slots.
    pub owner_slots: u64,
    /// Offset of the allocation table.
    pub table_offset: u64,
    /// Offset of the first data block (a multiple of the block size).
    pub data_offset: u64,
}

fn align_up(value: u64, align: u64) -> Option<u64> {
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}

impl Geometry {
    /// The layout of a region of `region_bytes` with blocks of `block_size`.
    pub fn compute(region_bytes: u64, block_size: u64) -> Result<Self, RegionError> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(RegionError::BadBlockSize { block_size });
        }
        let too_small = RegionError::TooSmall {
            region_bytes,
            block_size,
        };
        let meta = |blocks: u64| -> Option<(u64, u64, u64, u64)> {
            let bitmap_words = blocks.div_ceil(64);
            let bitmap_offset = HEADER_BYTES;
            let owners_offset = align_up(bitmap_offset + bitmap_words * 8, 64)?;
            let table_offset = align_up(owners_offset + OWNER_SLOTS * OWNER_SLOT_BYTES, 64)?;
            let data_offset = align_up(
                table_offset.checked_add(blocks.checked_mul(8)?)?,
                block_size,
            )?;
            Some((bitmap_words, owners_offset, table_offset, data_offset))
        };
        let mut blocks = region_bytes / block_size;
        loop {
            if blocks == 0 {
                return Err(too_small);
            }
            let (bitmap_words, owners_offset, table_offset, data_offset) =
                meta(blocks).ok_or(RegionError::TooSmall {
                    region_bytes,
                    block_size,
                })?;
            let end = blocks
                .checked_mul(block_size)
                .and_then(|b| b.checked_add(data_offset));
            match end {
                Some(end) if end <= region_bytes => {
                    return Ok(Self {
                        region_bytes,
                        block_size,
                        block_count: blocks,
                        bitmap_offset: HEADER_BYTES,
                        bitmap_words,
                        owners_offset,
                        owner_slots: OWNER_SLOTS,
                        table_offset,
                        data_offset,
                    });
                }
                Some(end) => {
                    let excess = (end - region_bytes).div_ceil(block_size);
                    blocks = blocks.saturating_sub(excess.max(1));
                }
                None => blocks -= 1,
            }
        }
    }

    /// Byte offset of `block` within the region.
    pub fn block_offset(&self, block: u64) -> u64 {
        self.data_offset + block * self.block_size
    }

    /// Bytes available for data.
    pub fn data_bytes(&self) -> u64 {
        self.block_count * self.block_size
    }

    /// Writes this geometry into a fresh header.
    pub(crate) fn to_raw(self, region_id: u64) -> RawHeader {
        RawHeader {
            magic: MAGIC,
            version: VERSION,
            header_bytes: HEADER_BYTES as u32,
            region_bytes: self.region_bytes,
            block_size: self.block_size,
            block_count: self.block_count,
            bitmap_offset: self.bitmap_offset,
            bitmap_words: self.bitmap_words,
            owners_offset: self.owners_offset,
            owner_slots: self.owner_slots,
            table_offset: self.table_offset,
            data_offset: self.data_offset,
            region_id,
        }
    }

    /// Validates a header read from a region whose backing file holds `file_bytes`.
    pub(crate) fn validate(raw: &RawHeader, file_bytes: u64) -> Result<Self, RegionError> {
        if raw.magic != MAGIC {
            return Err(RegionError::NotARegion { found: raw.magic });
        }
        if raw.version != VERSION {
            return Err(RegionError::UnsupportedVersion {
                found: raw.version,
                supported: VERSION,
            });
        }
        if raw.region_bytes > file_bytes {
            return Err(RegionError::Truncated {
                expected: raw.region_bytes,
                actual: file_bytes,
            });
        }
        let geo = Self::compute(raw.region_bytes, raw.block_size)?;
        let stored = Self {
            region_bytes: raw.region_bytes,
            block_size: raw.block_size,
            block_count: raw.block_count,
            bitmap_offset: raw.bitmap_offset,
            bitmap_words: raw.bitmap_words,
            owners_offset: raw.owners_offset,
            owner_slots: raw.owner_slots,
            table_offset: raw.table_offset,
            data_offset: raw.data_offset,
        };
        if stored != geo || u64::from(raw.header_bytes) != HEADER_BYTES {
            return Err(RegionError::CorruptHeader {
                reason: "geometry fields disagree with region size and block size",
            });
        }
        Ok(geo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_fits_and_is_aligned() {
        for &(size, bs) in &[
            (1u64 << 20, 4096u64),
            (64 << 20, 64 << 10),
            (1 << 30, 2 << 20),
            (3 * (64 << 10) + 4096 * 3, 64 << 10),
        ] {
            let g = Geometry::compute(size, bs).unwrap();
            assert!(g.block_count >= 1);
            assert_eq!(g.data_offset % bs, 0);
            assert!(g.data_offset + g.block_count * bs <= size);
            // Not wasteful: one more block would not fit.
            assert!(
                Geometry::compute(size, bs).unwrap().block_count * bs + g.data_offset + bs > size
            );
            assert!(g.table_offset + g.block_count * 8 <= g.data_offset);
            assert!(g.bitmap_offset + g.bitmap_words * 8 <= g.owners_offset);
        }
    }

    #[test]
    fn rejects_bad_geometry() {
        assert!(matches!(
            Geometry::compute(1 << 20, 3000),
            Err(RegionError::BadBlockSize { .. })
        ));
        assert!(matches!(
            Geometry::compute(1 << 20, 8 << 20),
            Err(RegionError::BadBlockSize { .. })
        ));
        assert!(matches!(
            Geometry::compute(8192, 4096),
            Err(RegionError::TooSmall { .. })
        ));
    }
}
