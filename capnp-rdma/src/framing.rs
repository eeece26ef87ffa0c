//! A built message as a scatter-gather list: `[segment table, seg0, seg1, …]` as
//! (region offset, length) entries whose concatenation is byte-identical to
//! `capnp::serialize::write_message` of the same message.
//!
//! ```text
//!  block k                          block m                block p
//!  ┌──────────┬───────┬──────┐      ┌──────────────┐       ┌────────┐
//!  │ (prefix) │ table │ seg0 │ ...  │ seg1 (plane) │  ...  │ seg2   │
//!  └──────────┴───────┴──────┘      └──────────────┘       └────────┘
//!             └─ entry 0 ────┘      └─ entry 1 ────┘       └entry 2─┘
//! ```
//!
//! - The segment table costs no entry of its own: [`StagingAllocator`](crate::StagingAllocator)
//!   leaves [`TABLE_PREFIX_BYTES`](crate::allocator::TABLE_PREFIX_BYTES) free in front of
//!   segment 0 and the table is written right before it.
//! - Pieces that are physically adjacent in the region merge into one entry.
//! - Runs of two or more consecutive entries under `copy_threshold` bytes are copied into one
//!   scratch entry (leased from the region, so the NIC can read it); a lone small entry stays
//!   in place since copying it would not save an entry. Segments outside the region (heap
//!   fallback) are always copied.
//! - At most `max_sge` entries: with [`SgeOverflow::Coalesce`] the adjacent pair with the
//!   fewest bytes is copied together until the list fits; with [`SgeOverflow::Error`] the
//!   build fails with [`FramingError::TooManyEntries`] (a transport may then chain requests).
//!
//! The list borrows the message mutably: the message cannot change (or be dropped, releasing
//! its blocks) while its entries may still be read by a NIC or a peer.
//!
//! ```
//! use capnp_rdma::framing::{FramingOptions, SgeList};
//! use capnp_rdma::{Region, RegionOptions, StagingAllocator};
//!
//! let region = Region::create(&RegionOptions::memfd(16 << 20)).unwrap();
//! let mut message = capnp::message::Builder::new(StagingAllocator::new(&region));
//! message.init_root::<capnp::any_pointer::Builder>()
//!     .set_as::<capnp::data::Owned>(&vec![9u8; 100_000][..]).unwrap();
//! let expected = capnp::serialize::write_message_to_words(&message);
//!
//! let sges = SgeList::build(&region, &mut message, &FramingOptions::default()).unwrap();
//! assert_eq!(sges.entries().len(), 2); // [table + root segment], [the 100 kB blob]
//! assert_eq!(sges.bytes_copied(), 0);
//! assert_eq!(sges.to_vec(), expected);
//! ```

use crate::reader::{ReadError, ReadOptions, SegmentTable};
use crate::region::{BlockLease, Region, RegionError};
use capnp::message::{Allocator, Builder, Reader, ReaderSegments};
use std::marker::PhantomData;

/// One scatter-gather entry: `len` bytes at `offset` from the start of the region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sge {
    /// Offset from the start of the region (never an address: valid in every process).
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// What to do when a message needs more entries than `max_sge`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SgeOverflow {
    /// Copy the cheapest adjacent entries together until the list fits (default).
    #[default]
    Coalesce,
    /// Fail with [`FramingError::TooManyEntries`].
    Error,
}

/// How to turn a message into entries.
#[derive(Clone, Copy, Debug)]
pub struct FramingOptions {
    /// Entries below this many bytes are copied together with small neighbours (default 512).
    pub copy_threshold: usize,
    /// Most entries allowed (default 30, the usual `max_send_sge` of RDMA NICs; Soft-RoCE
    /// allows 32).
    pub max_sge: usize,
    /// Behaviour beyond `max_sge`.
    pub overflow: SgeOverflow,
}

impl Default for FramingOptions {
    fn default() -> Self {
        Self {
            copy_threshold: 512,
            max_sge: 30,
            overflow: SgeOverflow::Coalesce,
        }
    }
}

/// Why a message could not be framed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FramingError {
    /// The message has no segments (no root was set).
    #[error("message has no segments")]
    EmptyMessage,
    /// Cap'n Proto readers reject 512 segments or more.
    #[error("message has {0} segments; stream framing allows at most 511")]
    TooManySegments(usize),
    /// The message needs more entries than allowed and the policy is [`SgeOverflow::Error`].
    #[error("message needs {needed} scatter-gather entries, max_sge is {max_sge}")]
    TooManyEntries {
        /// Entries needed without further copying.
        needed: usize,
        /// The limit.
        max_sge: usize,
    },
    /// `max_sge` is zero.
    #[error("max_sge must be at least 1")]
    BadOptions,
    /// No scratch space in the region for copied pieces.
    #[error("no region space for {bytes} bytes of copied pieces: {source}")]
    Scratch {
        /// Bytes that needed copying.
        bytes: u64,
        /// The region's error.
        source: RegionError,
    },
}

const INLINE: usize = 6;

/// A small vector that keeps up to `INLINE` items without allocating.
#[derive(Debug)]
enum Small<T: Copy + Default> {
    Inline([T; INLINE], usize),
    Heap(Vec<T>),
}

impl<T: Copy + Default> Small<T> {
    fn new() -> Self {
        Small::Inline([T::default(); INLINE], 0)
    }

    fn push(&mut self, item: T) {
        match self {
            Small::Inline(items, len) if *len < INLINE => {
                items[*len] = item;
                *len += 1;
            }
            Small::Inline(items, len) => {
                let mut v = items[..*len].to_vec();
                v.push(item);
                *self = Small::Heap(v);
            }
            Small::Heap(v) => v.push(item),
        }
    }

    fn as_slice(&self) -> &[T] {
        match self {
            Small::Inline(items, len) => &items[..*len],
            Small::Heap(v) => v,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        match self {
            Small::Inline(items, len) => &mut items[..*len],
            Small::Heap(v) => v,
        }
    }
}

/// A planned entry: either bytes already in the region, or pieces `first..=last` to copy.
#[derive(Clone, Copy, Debug, Default)]
struct Planned {
    len: u64,
    /// Region offset when zero-copy.
    offset: Option<u64>,
    /// Piece range (piece 0 is the table, piece i+1 is segment i).
    first: usize,
    last: usize,
}

/// A framed message as scatter-gather entries over a region. See the [module docs](self).
#[derive(Debug)]
pub struct SgeList<'m> {
    region: &'m Region,
    entries: Small<Sge>,
    scratch: Option<BlockLease>,
    bytes_copied: usize,
    total: u64,
    _message: PhantomData<&'m mut ()>,
}

fn write_table(out: &mut [u8], segments: &[&[u8]]) {
    let count = segments.len() as u32 - 1; // 1..=511 segments, checked by the caller
    out[..4].copy_from_slice(&count.to_le_bytes());
    for (i, seg) in segments.iter().enumerate() {
        let words = (seg.len() / 8) as u32; // a segment is < 2^29 words
        out[4 + 4 * i..8 + 4 * i].copy_from_slice(&words.to_le_bytes());
    }
    out[4 + 4 * segments.len()..].fill(0);
}

/// The entries of a framed message and the scratch lease backing its copied pieces.
#[derive(Debug)]
struct Framed {
    entries: Small<Sge>,
    scratch: Option<BlockLease>,
    bytes_copied: usize,
    total: u64,
}

impl<'m> SgeList<'m> {
    /// Frames `message`, whose segments should come from a
    /// [`StagingAllocator`](crate::StagingAllocator) over `region` (segments that do not are
    /// copied into region scratch space).
    pub fn build<A: Allocator>(
        region: &'m Region,
        message: &'m mut Builder<A>,
        options: &FramingOptions,
    ) -> Result<Self, FramingError> {
        let framed = frame_segments(region, &message.get_segments_for_output(), options)?;
        Ok(Self {
            region,
            entries: framed.entries,
            scratch: framed.scratch,
            bytes_copied: framed.bytes_copied,
            total: framed.total,
            _message: PhantomData,
        })
    }

    /// The entries, in order.
    pub fn entries(&self) -> &[Sge] {
        self.entries.as_slice()
    }

    /// Bytes of segment data copied to build the list (0 when fully zero-copy).
    pub fn bytes_copied(&self) -> usize {
        self.bytes_copied
    }

    /// Total bytes described: the framed message's length.
    pub fn total_len(&self) -> u64 {
        self.total
    }

    /// The region the entries point into.
    pub fn region(&self) -> &Region {
        self.region
    }

    /// The scratch lease holding copied pieces, if any.
    pub fn scratch(&self) -> Option<&BlockLease> {
        self.scratch.as_ref()
    }

    /// The bytes of entry `i`, in place.
    pub fn entry_bytes(&self, i: usize) -> Option<&[u8]> {
        let e = self.entries().get(i)?;
        // SAFETY: every entry lies in the region (checked when planned) and belongs to the
        // message we borrow mutably or to our scratch lease, so nothing writes it while `self`
        // (and hence the returned borrow) lives.
        unsafe { self.region.bytes(e.offset, u64::from(e.len)) }.ok()
    }

    /// The concatenated entries: the message in standard stream framing (copies; for tests,
    /// debugging and non-RDMA sinks).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.total as usize);
        for i in 0..self.entries().len() {
            out.extend_from_slice(self.entry_bytes(i).unwrap_or_default());
        }
        out
    }

    /// Reads the message back in place from its entries, as a receiver sharing the region
    /// would: the segment table is parsed and bounds-checked like untrusted input.
    pub fn read(&self, options: &ReadOptions) -> Result<Reader<ScatteredSegments<'_>>, ReadError> {
        let entries: Small<&[u8]> = {
            let mut v = Small::new();
            for i in 0..self.entries().len() {
                v.push(self.entry_bytes(i).unwrap_or_default());
            }
            v
        };
        read_scattered(entries, options)
    }
}

/// A framed message that owns its builder: what a transport holds while a write is in flight.
///
/// The segments (and any scratch copy) stay allocated until this value is dropped, so the
/// entries stay valid for as long as a NIC or a peer may read them; a failed write hands the
/// value back so nothing is freed under an operation that may still be running.
///
/// ```
/// use capnp_rdma::framing::{FramingOptions, OutboundMessage};
/// use capnp_rdma::{Region, RegionOptions, StagingAllocator};
///
/// let region = Region::create(&RegionOptions::memfd(16 << 20)).unwrap();
/// let mut message = capnp::message::Builder::new(StagingAllocator::new(&region));
/// message.init_root::<capnp::any_pointer::Builder>().set_as::<capnp::text::Owned>("hi").unwrap();
/// let out = OutboundMessage::new(&region, message, &FramingOptions::default())
///     .map_err(|(error, _message)| error)
///     .unwrap();
/// assert_eq!(out.entries().len(), 1);
/// let message = out.into_message(); // back to the builder once the write has completed
/// # drop(message);
/// ```
pub struct OutboundMessage<A: Allocator = crate::StagingAllocator> {
    framed: Framed,
    region: Region,
    message: Builder<A>,
}

impl<A: Allocator> std::fmt::Debug for OutboundMessage<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundMessage")
            .field("entries", &self.entries())
            .field("bytes_copied", &self.framed.bytes_copied)
            .finish()
    }
}

impl<A: Allocator> OutboundMessage<A> {
    /// Frames `message` over `region`; on failure the builder is handed back with the error.
    pub fn new(
        region: &Region,
        message: Builder<A>,
        options: &FramingOptions,
    ) -> Result<Self, (FramingError, Builder<A>)> {
        match frame_segments(region, &message.get_segments_for_output(), options) {
            Ok(framed) => Ok(Self {
                framed,
                region: region.clone(),
                message,
            }),
            Err(e) => Err((e, message)),
        }
    }

    /// The entries, in order.
    pub fn entries(&self) -> &[Sge] {
        self.framed.entries.as_slice()
    }

    /// Total bytes: the framed message's length.
    pub fn total_len(&self) -> u64 {
        self.framed.total
    }

    /// Bytes of segment data copied while framing.
    pub fn bytes_copied(&self) -> usize {
        self.framed.bytes_copied
    }

    /// The region the entries point into.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The bytes of entry `i`, in place.
    pub fn entry_bytes(&self, i: usize) -> Option<&[u8]> {
        let e = self.entries().get(i)?;
        // SAFETY: the entries point into segments of the builder we own (never mutated after
        // framing: we hand out no mutable access) or into our scratch lease.
        unsafe { self.region.bytes(e.offset, u64::from(e.len)) }.ok()
    }

    /// Gives the builder back (its segments are released when it is dropped).
    pub fn into_message(self) -> Builder<A> {
        self.message
    }
}

fn frame_segments(
    region: &Region,
    segments: &[&[u8]],
    options: &FramingOptions,
) -> Result<Framed, FramingError> {
    if options.max_sge == 0 {
        return Err(FramingError::BadOptions);
    }
    let n = segments.len();
    if n == 0 {
        return Err(FramingError::EmptyMessage);
    }
    if n >= 512 {
        return Err(FramingError::TooManySegments(n));
    }
    let table_len = (4 * (n + 1)).next_multiple_of(8);
    let geo = region.geometry();
    let prefix = crate::allocator::TABLE_PREFIX_BYTES;

    // Where each piece is: the table goes in front of segment 0 when the allocator left
    // room for it there.
    let seg_offset = |i: usize| region.offset_of(segments[i].as_ptr(), segments[i].len());
    let table_offset = seg_offset(0).filter(|&off| {
        (off - geo.data_offset) % geo.block_size == prefix && table_len as u64 <= prefix
    });
    let table_offset = table_offset.map(|off| off - table_len as u64);

    // Plan: one entry per piece, merged where physically adjacent.
    let mut plan: Small<Planned> = Small::new();
    let pieces = (0..=n).map(|p| {
        if p == 0 {
            (table_len as u64, table_offset)
        } else {
            (segments[p - 1].len() as u64, seg_offset(p - 1))
        }
    });
    for (p, (len, offset)) in pieces.enumerate() {
        if len == 0 {
            continue;
        }
        let entries = plan.as_mut_slice();
        if let (Some(last), Some(off)) = (entries.last_mut(), offset) {
            if last.offset.map(|o| o + last.len) == Some(off) && last.len + len <= u32::MAX as u64 {
                last.len += len;
                last.last = p;
                continue;
            }
        }
        plan.push(Planned {
            len,
            offset,
            first: p,
            last: p,
        });
    }

    // Copy runs of small neighbours together.
    let mut merged: Small<Planned> = Small::new();
    for &entry in plan.as_slice() {
        let small = |e: &Planned| e.offset.is_none() || (e.len as usize) < options.copy_threshold;
        match merged.as_mut_slice().last_mut() {
            Some(prev)
                if small(prev) && small(&entry) && prev.len + entry.len <= u32::MAX as u64 =>
            {
                prev.offset = None;
                prev.len += entry.len;
                prev.last = entry.last;
            }
            _ => merged.push(entry),
        }
    }
    let mut plan = merged;

    // Honour max_sge.
    if plan.as_slice().len() > options.max_sge {
        if options.overflow == SgeOverflow::Error {
            return Err(FramingError::TooManyEntries {
                needed: plan.as_slice().len(),
                max_sge: options.max_sge,
            });
        }
        let mut v = plan.as_slice().to_vec();
        while v.len() > options.max_sge {
            let i = (0..v.len() - 1)
                .filter(|&i| v[i].len + v[i + 1].len <= u32::MAX as u64)
                .min_by_key(|&i| v[i].len + v[i + 1].len)
                .ok_or(FramingError::TooManyEntries {
                    needed: v.len(),
                    max_sge: options.max_sge,
                })?;
            let next = v.remove(i + 1);
            v[i] = Planned {
                len: v[i].len + next.len,
                offset: None,
                first: v[i].first,
                last: next.last,
            };
        }
        plan = Small::Heap(v);
    }

    // Copy what has to be copied into one scratch lease.
    let copy_bytes: u64 = plan
        .as_slice()
        .iter()
        .filter(|e| e.offset.is_none())
        .map(|e| e.len)
        .sum();
    let mut scratch = if copy_bytes > 0 {
        Some(
            region
                .lease(copy_bytes)
                .map_err(|source| FramingError::Scratch {
                    bytes: copy_bytes,
                    source,
                })?,
        )
    } else {
        None
    };
    let mut entries = Small::new();
    let mut cursor = 0usize;
    let mut bytes_copied = 0usize;
    let mut total = 0u64;
    for entry in plan.as_slice() {
        let offset = match (entry.offset, scratch.as_mut()) {
            (Some(off), _) => off,
            (None, Some(lease)) => {
                let base = lease.offset() + cursor as u64;
                let buf = lease.as_mut_slice();
                for p in entry.first..=entry.last {
                    if p == 0 {
                        write_table(&mut buf[cursor..cursor + table_len], segments);
                        cursor += table_len;
                    } else {
                        let seg = segments[p - 1];
                        buf[cursor..cursor + seg.len()].copy_from_slice(seg);
                        cursor += seg.len();
                        bytes_copied += seg.len();
                    }
                }
                base
            }
            (None, None) => unreachable!("copy_bytes > 0 whenever an entry is copied"),
        };
        total += entry.len;
        entries.push(Sge {
            offset,
            len: entry.len as u32, // merged only up to u32::MAX
        });
    }
    if let Some(lease) = scratch.as_mut() {
        // SAFETY: only the first `cursor` bytes of the (zeroed) lease were written.
        unsafe { lease.set_dirty_len(cursor as u64) };
    }
    if let Some(off) = table_offset {
        // The table sits in the prefix of segment 0's first block, which belongs to the
        // message's allocation (kept alive and unchanged by the `&mut` borrow we hold) and
        // which Cap'n Proto never reads or writes.
        let mut table = [0u8; crate::allocator::TABLE_PREFIX_BYTES as usize];
        write_table(&mut table[..table_len], segments);
        // SAFETY: `off..off+table_len` lies inside segment 0's block, in front of the
        // segment (checked above); no Rust reference covers those bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                table.as_ptr(),
                region.as_ptr().add(off as usize).cast_mut(),
                table_len,
            );
        }
    }
    Ok(Framed {
        entries,
        scratch,
        bytes_copied,
        total,
    })
}

/// Segments of a message that lies in several places (scatter-gather entries), each segment
/// wholly inside one entry.
pub struct ScatteredSegments<'a> {
    segments: Small<&'a [u8]>,
}

impl std::fmt::Debug for ScatteredSegments<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScatteredSegments")
            .field("segments", &self.segments.as_slice().len())
            .finish()
    }
}

impl ReaderSegments for ScatteredSegments<'_> {
    fn get_segment(&self, idx: u32) -> Option<&[u8]> {
        self.segments.as_slice().get(idx as usize).copied()
    }

    fn len(&self) -> usize {
        self.segments.as_slice().len()
    }
}

/// Reads a framed message whose bytes are split over `parts` (in order): the first part must
/// start with the segment table, and no segment may straddle two parts.
fn read_scattered<'a>(
    parts: Small<&'a [u8]>,
    options: &ReadOptions,
) -> Result<Reader<ScatteredSegments<'a>>, ReadError> {
    let parts = parts.as_slice();
    let first = parts.first().copied().unwrap_or_default();
    let table = SegmentTable::parse(first, options.max_segments)?;
    let available: u64 = parts.iter().map(|p| p.len() as u64).sum();
    if available < table.message_bytes() {
        return Err(ReadError::Truncated {
            needed: table.message_bytes(),
            available,
        });
    }
    let mut segments = Small::new();
    let (mut part, mut part_start) = (0usize, 0u64);
    for i in 0..table.segment_count() {
        let start = table.segment_offset(i).unwrap_or(0);
        let len = u64::from(table.segment_words(i).unwrap_or(0)) * 8;
        while part < parts.len() && part_start + parts[part].len() as u64 <= start && len > 0 {
            part_start += parts[part].len() as u64;
            part += 1;
        }
        let bytes = parts
            .get(part)
            .and_then(|p| p.get((start - part_start) as usize..(start - part_start + len) as usize))
            .or(if len == 0 { Some(&[][..]) } else { None })
            .ok_or(ReadError::Truncated {
                needed: start + len,
                available,
            })?;
        if bytes.as_ptr() as usize % 8 != 0 {
            return Err(ReadError::Misaligned {
                address: bytes.as_ptr() as usize,
            });
        }
        segments.push(bytes);
    }
    Ok(Reader::new(
        ScatteredSegments { segments },
        options.capnp_options(table.body_words()),
    ))
}
