//! A lock-free bitmap of fixed-size blocks whose storage is caller-provided atomic words.
//!
//! [`BlockBitmap`] is the free-space map of the staging region: one bit per data block, a set
//! bit meaning "in use". Its storage is a slice of `AtomicU64` words plus two more atomic words
//! (a next-fit hint and a used-block counter). In production all three live inside the mapped
//! region, so every process that maps the region allocates and frees directly, without a lock
//! or a round trip to an owner process. [`OwnedBitmap`] owns heap storage of the same shape for
//! tests, benchmarks, loom models and in-process use.
//!
//! # Layout
//!
//! ```text
//!   word 0                      word 1                        word n-1 (last)
//!  ┌──────────────────────────┐┌──────────────────────────┐  ┌────────────────┬──────────┐
//!  │ bit i = block i          ││ bit i = block 64 + i     │..│ blocks ...     │ padding  │
//!  └──────────────────────────┘└──────────────────────────┘  └────────────────┴──────────┘
//!   hint: block index where the next search starts    used: number of blocks in use
//! ```
//!
//! Bit `i` of word `w` is block `w * 64 + i`. There are [`BlockBitmap::words_for`]`(blocks)`
//! words; the bits of the last word past `blocks` are *padding*: [`BlockBitmap::format`] sets
//! them once and they are never handed out, never freed and never counted, so the search needs
//! no end-of-bitmap special case inside a word.
//!
//! # Algorithm
//!
//! [`BlockBitmap::allocate`]`(k)` is first fit starting at the next-fit hint, wrapping around
//! once: it looks for the first run of `k` free blocks starting in `[hint, blocks)`, then in
//! `[0, hint)`. A run never wraps from the last block to block 0. The scan reads each word once
//! with a relaxed load and works a word at a time: full words (`== !0`) are skipped, a run that
//! fits inside a word is found with a logarithmic shift-and of the free mask plus
//! `trailing_zeros`, and a run that crosses words is tracked with `leading_zeros` (free bits at
//! the top of a word) and `trailing_zeros` (free bits at the bottom of the next). Block indices
//! are word index `<< 6` plus a bit offset: there is no division in the loop.
//!
//! A candidate run is then *claimed* word by word in ascending order, each word with a
//! compare-and-swap loop that sets the run's bits only if all of them are still clear. If a
//! word has meanwhile been taken by another thread or process, the words already claimed for
//! this run are rolled back (those bits were set by us, so clearing them is safe) and the scan
//! resumes at the same candidate, now seeing the new bits. On success the hint moves past the
//! run and `used` grows by `k`. [`BlockBitmap::free`] clears a run word by word with a
//! compare-and-swap that first checks that *all* of the run's bits in that word are set, so a
//! double free is reported as [`BitmapError::NotAllocated`] instead of clearing bits that now
//! belong to somebody else. No operation takes a lock or allocates memory.
//!
//! # Memory ordering
//!
//! Blocks are recycled: a block's previous owner may have written to (and zeroed) it just
//! before freeing it, and its next owner must see those writes. The clearing CAS in
//! [`BlockBitmap::free`] is `Release`; the setting CAS in the claim is `AcqRel`. When the claim
//! reads the value written by the free it synchronizes with it, so everything the freeing
//! thread did to the block happens before everything the new owner does with it. Every write
//! to a bitmap word after [`BlockBitmap::format`] is a read-modify-write (claim, rollback,
//! free), and read-modify-writes continue a release sequence, so this holds even if other
//! threads claimed and rolled back bits of the same word in between. The scan's loads are
//! `Relaxed`: a stale value only makes a candidate wrong, and the CAS re-checks it. The hint
//! and the `used` counter are plain `Relaxed` statistics: the hint only steers where the search
//! starts (an out-of-range hint, e.g. from a corrupted region, is treated as 0) and `used` is
//! exact whenever no operation is in flight; [`BlockBitmap::count_used`] recomputes it from
//! the bits for verification and recovery.
//!
//! # Across processes
//!
//! The bitmap holds no pointers and no process-local state: a [`BlockBitmap`] is a view made of
//! references to atomic words, and the words' values are block indices and bits. Lock-free
//! 64-bit atomics are address-free, so the same words mapped at different addresses in several
//! processes form one bitmap. A process that dies mid-claim can leave bits set that it does not
//! own (a leak, never a double allocation); recovery code rebuilds ownership from its own
//! records and uses [`BlockBitmap::claim`], [`BlockBitmap::free`] and
//! [`BlockBitmap::count_used`].
//!
//! # Example
//!
//! ```
//! use capnp_rdma::bitmap::{BitmapError, OwnedBitmap};
//!
//! let storage = OwnedBitmap::new(100); // formatted: all 100 blocks free
//! let bitmap = storage.view();
//! let a = bitmap.allocate(60)?; // blocks 0..60
//! let b = bitmap.allocate(30)?; // blocks 60..90: spans words 0 and 1
//! assert_eq!((a, b), (0, 60));
//! assert_eq!(bitmap.used(), 90);
//! assert!(matches!(
//!     bitmap.allocate(20),
//!     Err(BitmapError::Exhausted { requested: 20, largest_free_run: 10 })
//! ));
//! bitmap.free(a, 60)?;
//! assert_eq!(bitmap.free(a, 60), Err(BitmapError::NotAllocated { block: 0 }));
//! assert_eq!(bitmap.allocate(20)?, 0); // wrapped around to the first fit
//! assert_eq!(bitmap.count_used(), bitmap.used());
//! # Ok::<(), BitmapError>(())
//! ```

use core::fmt;

use crate::sync::{AtomicU64, Ordering};

/// Blocks per bitmap word.
const WORD_BITS: u64 = 64;

/// Why a bitmap operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BitmapError {
    /// No run of `requested` free blocks exists right now.
    #[error("no run of {requested} free blocks (largest free run: {largest_free_run})")]
    Exhausted {
        /// The run length asked for.
        requested: u64,
        /// The longest free run seen by a scan after the search failed.
        largest_free_run: u64,
    },
    /// A run length of 0, or longer than the whole bitmap.
    #[error("invalid run length {requested} for a bitmap of {blocks} blocks")]
    InvalidLength {
        /// The run length asked for.
        requested: u64,
        /// The number of blocks in the bitmap.
        blocks: u64,
    },
    /// `[start, start + len)` is not inside the bitmap.
    #[error("blocks {start}..{start}+{len} out of range for a bitmap of {blocks} blocks")]
    OutOfRange {
        /// First block of the range.
        start: u64,
        /// Length of the range.
        len: u64,
        /// The number of blocks in the bitmap.
        blocks: u64,
    },
    /// A block being freed was not allocated: a double free or a corrupted owner record.
    #[error("block {block} is not allocated (double free?)")]
    NotAllocated {
        /// The first block of the range found free.
        block: u64,
    },
    /// A block of a run being claimed is already in use.
    #[error("block {block} is already in use")]
    Conflict {
        /// The first block of the run found in use.
        block: u64,
    },
    /// The storage does not match the block count.
    #[error("{words} bitmap words cannot hold exactly {blocks} blocks")]
    Geometry {
        /// Number of words provided.
        words: usize,
        /// Number of blocks asked for.
        blocks: u64,
    },
}

/// A view of a lock-free block bitmap stored in caller-provided atomic words.
///
/// Cheap to copy (four fields); all methods take `&self` and may be called concurrently from
/// any number of threads and processes sharing the storage. See the [module docs](self).
#[derive(Clone, Copy)]
pub struct BlockBitmap<'a> {
    words: &'a [AtomicU64],
    hint: &'a AtomicU64,
    used: &'a AtomicU64,
    blocks: u64,
}

impl<'a> BlockBitmap<'a> {
    /// Builds a view over existing storage.
    ///
    /// `words.len()` must equal [`words_for`](Self::words_for)`(blocks)` and `blocks` must be at
    /// least 1, otherwise [`BitmapError::Geometry`]. The storage is used as it is: call
    /// [`format`](Self::format) on fresh storage before sharing it.
    pub fn new(
        words: &'a [AtomicU64],
        hint: &'a AtomicU64,
        used: &'a AtomicU64,
        blocks: u64,
    ) -> Result<Self, BitmapError> {
        // Compared in u64 so that a block count too large for `usize` cannot match by truncation.
        if blocks == 0 || blocks.div_ceil(WORD_BITS) != words.len() as u64 {
            return Err(BitmapError::Geometry {
                words: words.len(),
                blocks,
            });
        }
        Ok(Self {
            words,
            hint,
            used,
            blocks,
        })
    }

    /// Number of `AtomicU64` words needed for `blocks` blocks: `ceil(blocks / 64)`.
    pub const fn words_for(blocks: u64) -> usize {
        // A bitmap must fit in memory, so the word count fits in `usize` for every valid size.
        blocks.div_ceil(WORD_BITS) as usize
    }

    /// Initialises fresh storage: all blocks free, the padding bits past `blocks` in the last
    /// word permanently set, hint and used count 0.
    ///
    /// Single-threaded: call it before the storage is shared, and publish the storage to other
    /// threads or processes with a synchronizing operation (e.g. a `Release` store of a region
    /// header), as for any initialisation.
    pub fn format(&self) {
        for word in self.words {
            word.store(0, Ordering::Relaxed);
        }
        if let Some(last) = self.words.last() {
            last.store(self.padding_mask(), Ordering::Relaxed);
        }
        self.hint.store(0, Ordering::Relaxed);
        self.used.store(0, Ordering::Relaxed);
    }

    /// Allocates a run of `k` contiguous free blocks and returns its first block.
    ///
    /// First fit starting at the next-fit hint, wrapping around once; lock-free. On success the
    /// hint moves past the run and [`used`](Self::used) grows by `k`.
    ///
    /// # Errors
    /// - [`BitmapError::InvalidLength`] if `k == 0` or `k > blocks`.
    /// - [`BitmapError::Exhausted`] if no run of `k` free blocks exists right now.
    pub fn allocate(&self, k: u64) -> Result<u64, BitmapError> {
        if k == 0 || k > self.blocks {
            return Err(BitmapError::InvalidLength {
                requested: k,
                blocks: self.blocks,
            });
        }
        let mut start = self.hint.load(Ordering::Relaxed);
        if start >= self.blocks {
            start = 0;
        }
        // First pass: runs starting in [start, blocks); second pass: runs starting in [0, start).
        let (mut from, mut limit) = (start, self.blocks);
        loop {
            match self.find_run(from, limit, k) {
                Some(first) => match self.claim_run(first, first + k) {
                    Ok(()) => {
                        let end = first + k;
                        let next = if end >= self.blocks { 0 } else { end };
                        self.hint.store(next, Ordering::Relaxed);
                        self.used.fetch_add(k, Ordering::Relaxed);
                        return Ok(first);
                    }
                    // Someone took part of the run; rescan from the same place: the scan now
                    // sees their bits (or finds the run free again if they rolled back).
                    Err(_) => from = first,
                },
                None if limit == self.blocks && start != 0 => (from, limit) = (0, start),
                None => {
                    return Err(BitmapError::Exhausted {
                        requested: k,
                        largest_free_run: self.largest_free_run(),
                    })
                }
            }
        }
    }

    /// Claims exactly the blocks `[start, start + k)` if all of them are free (for recovery).
    ///
    /// Does not move the hint; [`used`](Self::used) grows by `k` on success.
    ///
    /// # Errors
    /// - [`BitmapError::InvalidLength`] if `k == 0`.
    /// - [`BitmapError::OutOfRange`] if the range does not lie inside the bitmap.
    /// - [`BitmapError::Conflict`] with the first block found in use; nothing is left claimed.
    pub fn claim(&self, start: u64, k: u64) -> Result<(), BitmapError> {
        let end = self.checked_range(start, k)?;
        self.claim_run(start, end)
            .map_err(|block| BitmapError::Conflict { block })?;
        self.used.fetch_add(k, Ordering::Relaxed);
        Ok(())
    }

    /// Frees the blocks `[start, start + k)` (`Release`: writes to the blocks before the free
    /// are visible to their next owner).
    ///
    /// Each word is cleared with a compare-and-swap that first checks that all of the range's
    /// bits in it are set, so a double free never clears bits another owner holds in that
    /// word. A range spanning several words is checked in full before any word is cleared.
    ///
    /// # Errors
    /// - [`BitmapError::InvalidLength`] if `k == 0`.
    /// - [`BitmapError::OutOfRange`] if the range does not lie inside the bitmap.
    /// - [`BitmapError::NotAllocated`] with the first block of the range found free. Nothing
    ///   is cleared, except if a concurrent operation changes a later word of a multi-word range
    ///   between the check and the clear: then the words before it stay cleared.
    pub fn free(&self, start: u64, k: u64) -> Result<(), BitmapError> {
        let end = self.checked_range(start, k)?;
        let first = word_index(start);
        let last = word_index(end - 1);
        if first != last {
            for w in first..=last {
                let mask = run_mask(w, start, end);
                let missing = mask & !self.words[w].load(Ordering::Relaxed);
                if missing != 0 {
                    return Err(BitmapError::NotAllocated {
                        block: block_index(w, missing.trailing_zeros()),
                    });
                }
            }
        }
        let mut freed = 0u64;
        for w in first..=last {
            let mask = run_mask(w, start, end);
            let word = &self.words[w];
            let mut current = word.load(Ordering::Relaxed);
            loop {
                let missing = mask & !current;
                if missing != 0 {
                    self.used.fetch_sub(freed, Ordering::Relaxed);
                    return Err(BitmapError::NotAllocated {
                        block: block_index(w, missing.trailing_zeros()),
                    });
                }
                match word.compare_exchange_weak(
                    current,
                    current & !mask,
                    Ordering::Release,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break,
                    Err(actual) => current = actual,
                }
            }
            freed += u64::from(mask.count_ones());
        }
        self.used.fetch_sub(freed, Ordering::Relaxed);
        Ok(())
    }

    /// Whether `block` is in use right now; `false` for blocks outside the bitmap.
    pub fn is_allocated(&self, block: u64) -> bool {
        block < self.blocks
            && self.words[word_index(block)].load(Ordering::Acquire) & (1 << (block & 63)) != 0
    }

    /// Number of blocks managed by the bitmap.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Number of blocks in use, from the counter (exact when no operation is in flight).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Number of blocks in use, counted from the bits (padding excluded): for verification and
    /// recovery.
    pub fn count_used(&self) -> u64 {
        let last = self.words.len() - 1;
        let mut count = 0u64;
        for (w, word) in self.words.iter().enumerate() {
            let mut bits = word.load(Ordering::Relaxed);
            if w == last {
                bits &= !self.padding_mask();
            }
            count += u64::from(bits.count_ones());
        }
        count
    }

    /// Number of free blocks according to the counter: `blocks() - used()`.
    pub fn free_blocks(&self) -> u64 {
        self.blocks.saturating_sub(self.used())
    }

    /// Length of the longest run of free blocks right now (a full scan: for diagnostics and
    /// error messages).
    pub fn largest_free_run(&self) -> u64 {
        let mut best = 0u64;
        let mut run = 0u64; // free blocks at the top of the words seen so far
        for word in self.words {
            let free = !word.load(Ordering::Relaxed);
            if free == !0 {
                run += WORD_BITS;
                continue;
            }
            best = best.max(run + u64::from(free.trailing_ones()));
            best = best.max(longest_ones(free));
            run = u64::from(free.leading_ones());
        }
        best.max(run)
    }

    /// The padding bits of the last word: those past `blocks`.
    fn padding_mask(&self) -> u64 {
        match self.blocks & 63 {
            0 => 0,
            used_bits => !0 << used_bits,
        }
    }

    /// `start + k` if `[start, start + k)` is a non-empty range inside the bitmap.
    fn checked_range(&self, start: u64, k: u64) -> Result<u64, BitmapError> {
        if k == 0 {
            return Err(BitmapError::InvalidLength {
                requested: 0,
                blocks: self.blocks,
            });
        }
        match start.checked_add(k) {
            Some(end) if end <= self.blocks => Ok(end),
            _ => Err(BitmapError::OutOfRange {
                start,
                len: k,
                blocks: self.blocks,
            }),
        }
    }

    /// The first run of `k` free blocks starting in `[from, limit)` (it may extend past
    /// `limit`, never past the last block), from relaxed loads.
    fn find_run(&self, from: u64, limit: u64, k: u64) -> Option<u64> {
        let mut w = word_index(from);
        // Blocks below `from` in its word count as used.
        let mut bits = self.words[w].load(Ordering::Relaxed) | !(!0 << (from & 63));
        let mut run_start = 0u64;
        let mut run_len = 0u64; // free blocks carried in from the words before `w`
        loop {
            let base = (w as u64) << 6;
            if run_len != 0 {
                let bottom = u64::from(bits.trailing_zeros()); // free blocks at the bottom
                if run_len + bottom >= k {
                    return Some(run_start);
                }
                if bottom == WORD_BITS {
                    run_len += WORD_BITS;
                } else {
                    run_len = 0;
                }
            }
            if run_len == 0 && bits != !0 {
                if k <= WORD_BITS {
                    let starts = run_starts(!bits, k);
                    if starts != 0 {
                        let first = base + u64::from(starts.trailing_zeros());
                        return (first < limit).then_some(first);
                    }
                }
                let top = u64::from(bits.leading_zeros()); // free blocks at the top
                if top != 0 {
                    run_start = base + WORD_BITS - top;
                    if run_start >= limit {
                        return None;
                    }
                    run_len = top;
                }
            }
            if run_len == 0 && base + WORD_BITS >= limit {
                return None; // no run in progress, and no new run may start past `limit`
            }
            w += 1;
            bits = self.words.get(w)?.load(Ordering::Relaxed);
        }
    }

    /// Sets the bits of `[start, end)` if all are clear, word by word in ascending order;
    /// on a conflict rolls back the words already set and returns the first busy block.
    fn claim_run(&self, start: u64, end: u64) -> Result<(), u64> {
        let first = word_index(start);
        let last = word_index(end - 1);
        for w in first..=last {
            let mask = run_mask(w, start, end);
            let word = &self.words[w];
            let mut current = word.load(Ordering::Relaxed);
            loop {
                let busy = current & mask;
                if busy != 0 {
                    for undo in first..w {
                        // These bits were set by this call, so no one else can own them.
                        self.words[undo].fetch_and(!run_mask(undo, start, end), Ordering::Release);
                    }
                    return Err(block_index(w, busy.trailing_zeros()));
                }
                match word.compare_exchange_weak(
                    current,
                    current | mask,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break,
                    Err(actual) => current = actual,
                }
            }
        }
        Ok(())
    }
}

impl fmt::Debug for BlockBitmap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockBitmap")
            .field("blocks", &self.blocks)
            .field("used", &self.used())
            .field("hint", &self.hint.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A block bitmap that owns its storage (on the heap): for tests, benchmarks, loom models and
/// in-process use. Created formatted.
pub struct OwnedBitmap {
    words: Box<[AtomicU64]>,
    hint: AtomicU64,
    used: AtomicU64,
    blocks: u64,
}

impl OwnedBitmap {
    /// A formatted bitmap of `blocks` free blocks.
    ///
    /// # Panics
    /// If `blocks` is 0.
    pub fn new(blocks: u64) -> Self {
        assert!(blocks >= 1, "a block bitmap needs at least one block");
        let owned = Self {
            words: (0..BlockBitmap::words_for(blocks))
                .map(|_| AtomicU64::new(0))
                .collect(),
            hint: AtomicU64::new(0),
            used: AtomicU64::new(0),
            blocks,
        };
        owned.view().format();
        owned
    }

    /// The bitmap view of this storage.
    pub fn view(&self) -> BlockBitmap<'_> {
        // Geometry is right by construction (`new`), so no check is needed.
        BlockBitmap {
            words: &self.words,
            hint: &self.hint,
            used: &self.used,
            blocks: self.blocks,
        }
    }
}

impl fmt::Debug for OwnedBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.view().fmt(f)
    }
}

/// Index of the word holding `block`.
#[inline]
fn word_index(block: u64) -> usize {
    // `block` < blocks <= 64 * words.len(), so the quotient fits in usize.
    (block >> 6) as usize
}

/// Block number of bit `bit` of word `w`.
#[inline]
fn block_index(w: usize, bit: u32) -> u64 {
    ((w as u64) << 6) + u64::from(bit)
}

/// The bits of word `w` that lie in `[start, end)` (the range must intersect the word).
#[inline]
fn run_mask(w: usize, start: u64, end: u64) -> u64 {
    let base = (w as u64) << 6;
    let lo = start.max(base) - base;
    let hi = end.min(base + WORD_BITS) - base;
    let width = hi - lo;
    if width == WORD_BITS {
        !0
    } else {
        ((1u64 << width) - 1) << lo
    }
}

/// Bit positions `p` of `free` such that bits `p..p + k` are all set (`1 <= k <= 64`): the
/// starts of runs of `k` free blocks lying inside one word.
#[inline]
fn run_starts(mut free: u64, k: u64) -> u64 {
    let mut have = 1;
    while have < k && free != 0 {
        let shift = have.min(k - have);
        free &= free >> shift;
        have += shift;
    }
    free
}

/// Length of the longest run of set bits in `bits`.
fn longest_ones(mut bits: u64) -> u64 {
    let mut best = 0;
    while bits != 0 {
        bits >>= bits.trailing_zeros();
        let ones = bits.trailing_ones();
        best = best.max(u64::from(ones));
        bits = bits.checked_shr(ones).unwrap_or(0);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_starts_finds_inner_runs() {
        assert_eq!(run_starts(0b0111_0110, 2), 0b0011_0010);
        assert_eq!(run_starts(0b0111_0110, 3), 0b0001_0000);
        assert_eq!(run_starts(0b0111_0110, 4), 0);
        assert_eq!(run_starts(!0, 64), 1);
        assert_eq!(run_starts(!0, 1), !0);
    }

    #[test]
    fn masks_and_runs() {
        assert_eq!(run_mask(0, 60, 68), 0xF << 60);
        assert_eq!(run_mask(1, 60, 68), 0xF);
        assert_eq!(run_mask(1, 0, 1000), !0);
        assert_eq!(longest_ones(0), 0);
        assert_eq!(longest_ones(!0), 64);
        assert_eq!(longest_ones(0b1110_1111_0011), 4);
    }

    #[test]
    fn geometry_is_checked() {
        let words: Vec<AtomicU64> = (0..2).map(|_| AtomicU64::new(0)).collect();
        let (hint, used) = (AtomicU64::new(0), AtomicU64::new(0));
        assert!(BlockBitmap::new(&words, &hint, &used, 65).is_ok());
        assert!(BlockBitmap::new(&words, &hint, &used, 128).is_ok());
        for blocks in [0, 64, 129] {
            assert_eq!(
                BlockBitmap::new(&words, &hint, &used, blocks).err(),
                Some(BitmapError::Geometry { words: 2, blocks })
            );
        }
    }

    #[test]
    fn runs_cross_words_but_not_the_end() {
        let owned = OwnedBitmap::new(130);
        let bitmap = owned.view();
        assert_eq!(bitmap.allocate(60), Ok(0));
        assert_eq!(bitmap.allocate(70), Ok(60));
        assert_eq!(bitmap.count_used(), 130);
        bitmap.free(0, 10).unwrap();
        // The hint is at 0 again after the wrap; 120..130 is used, so no wrapping run exists.
        bitmap.free(125, 5).unwrap();
        assert_eq!(bitmap.largest_free_run(), 10);
        assert!(matches!(
            bitmap.allocate(15),
            Err(BitmapError::Exhausted {
                requested: 15,
                largest_free_run: 10
            })
        ));
        assert_eq!(bitmap.allocate(5), Ok(0));
        assert_eq!(bitmap.allocate(5), Ok(5));
        assert_eq!(bitmap.allocate(5), Ok(125));
    }
}
