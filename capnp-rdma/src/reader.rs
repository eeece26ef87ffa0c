//! Reading framed Cap'n Proto messages **in place** from untrusted bytes.
//!
//! The bytes of a received message (an RDMA write into our region, a shared-memory slot, a TCP
//! receive buffer) come from a peer we do not trust. [`read_framed`] checks the stream framing,
//! then hands the segments to `capnp::message::Reader` as slices of the caller's buffer: nothing
//! is copied, nothing is allocated for messages of up to 32 segments, and no work is done per
//! byte. The message content is validated lazily by capnp as it is traversed.
//!
//! ```text
//!  bytes (8-byte aligned, from the peer)
//!  ┌───────────────┬─────────────────────┬───────────┬────────┬──────────────┐
//!  │ n-1 │ len 0   │ len 1 .. len n-1 pad│ segment 0 │  ...   │ trailing ... │
//!  └───────────────┴─────────────────────┴───────────┴────────┴──────────────┘
//!   SegmentTable::parse ───────────────▶ bounds     InPlaceSegments: &bytes[a..b] per segment
//!                                                   capnp::message::Reader ─▶ FrameView
//!  returned length = header + segments; the trailing bytes are not part of the message
//! ```
//!
//! # What is accepted
//! Standard Cap'n Proto [stream framing]: a `u32` little-endian (segment count − 1), one `u32`
//! little-endian word length per segment, padding to a multiple of 8 bytes (its content is
//! ignored), then the segments back to back. The message must sit at the start of one contiguous
//! buffer; bytes after it are allowed and are not looked at (the returned length tells where the
//! next message starts, so a stream of messages can be read back to back).
//!
//! # What is checked, before capnp sees anything
//! 1. **Alignment**: a non-empty buffer must start on an 8-byte boundary, else
//!    [`ReadError::Misaligned`]. The reader never copies to fix this up.
//! 2. **Table present**: at least 8 bytes, then the whole padded table (`(count / 2 + 1) * 8`
//!    bytes), else [`ReadError::Truncated`]. The count is checked *before* the table length is
//!    computed from it, so a huge count cannot make the reader look far ahead.
//! 3. **Segment count**: `1 <= count < max_segments` ([`ReadOptions::max_segments`], default
//!    512 — the same exclusive limit as capnp's `SEGMENTS_COUNT_LIMIT`), else
//!    [`ReadError::TooManySegments`]. A count field of `u32::MAX` encodes 2^32 segments (not
//!    zero) and is rejected here.
//! 4. **Segment length**: every segment is at most [`MAX_SEGMENT_WORDS`] (2^29 − 1) words, else
//!    [`ReadError::SegmentTooLarge`].
//! 5. **Root pointer**: segment 0 holds at least one word, else [`ReadError::EmptyFirstSegment`].
//!    Later segments may be empty (capnp allows it).
//! 6. **Total size**: all sums are done in `u64` and cannot overflow (at most 2^32 segments of
//!    fewer than 2^29 words each); the whole body must be present, else
//!    [`ReadError::Truncated`] with the exact number of bytes the table asks for.
//!
//! [`read_frame`] adds the checks that make the message a usable `Frame`: known pixel format,
//! valid geometry, exactly the format's planes, each plane large enough for its geometry.
//!
//! # What capnp checks while traversing
//! Every pointer must stay inside its segment, far pointers must name an existing segment and
//! land on a valid pad, lists must fit their declared sizes; the **traversal limit** bounds the
//! words read through pointers (this is what stops a small message whose pointers all point at
//! one large `Data` from being "read" as gigabytes), and the **nesting limit** bounds recursion
//! (cycles and deep nesting). Failures surface as `capnp::Error` from the accessors, or as
//! [`ReadError::Capnp`] from [`read_frame`].
//!
//! The default traversal limit is automatic: `max(8 Mi words, 4 × the message's words)`, so a
//! 4K or 8K frame (12–50 MB) can be read and each of its planes reached a few times, while an
//! amplification attack is still bounded by a small multiple of what was actually received.
//!
//! # Example
//! ```
//! use capnp_rdma::frame::{FrameSpec, FrameView, FrameWriter, PixelFormat};
//! use capnp_rdma::reader::{read_framed, ReadOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut message = capnp::message::Builder::new_default();
//! let mut frame = FrameWriter::init(&mut message, &FrameSpec::new(PixelFormat::Gray8, 16, 4))?;
//! frame.plane_mut(0)?.fill(7);
//!
//! // What the peer would have written into our region: standard stream framing, in a buffer
//! // that is 8-byte aligned because it is made of `capnp::Word`s.
//! let words = capnp::serialize::compute_serialized_size_in_words(&message);
//! let mut buffer = capnp::Word::allocate_zeroed_vec(words);
//! capnp::serialize::write_message(capnp::Word::words_to_bytes_mut(&mut buffer), &message)?;
//! let bytes = capnp::Word::words_to_bytes(&buffer);
//!
//! let (received, used) = read_framed(bytes, &ReadOptions::default())?;
//! assert_eq!(used, bytes.len());
//! let view = FrameView::new(&received)?;
//! assert_eq!(view.plane(0)?, &[7; 64][..]);
//! # Ok(())
//! # }
//! ```
//!
//! [stream framing]: https://capnproto.org/encoding.html#serialization-over-a-stream

use crate::frame::{plane_layouts, FrameError, FrameView};
use crate::frame_capnp::frame;
use capnp::message::{Reader, ReaderOptions, ReaderSegments};

/// Largest segment accepted, in words: 2^29 − 1, the limit of the reference (C++)
/// implementation (29-bit segment word counts). capnp-rust's `HeapAllocator` can make a segment
/// of exactly 2^29 words (4 GiB); such a message is rejected here.
pub const MAX_SEGMENT_WORDS: u32 = (1 << 29) - 1;

/// Default [`ReadOptions::max_segments`]: capnp's own readers reject 512 or more segments.
pub const DEFAULT_MAX_SEGMENTS: u32 = 512;

/// Floor of the automatic traversal limit, in words (capnp's default: 8 Mi words = 64 MiB).
pub const AUTO_TRAVERSAL_FLOOR_WORDS: u64 = 8 * 1024 * 1024;

/// The automatic traversal limit allows this many times the message's own size.
pub const AUTO_TRAVERSAL_FACTOR: u64 = 4;

/// Segments whose bounds are stored inline, without a heap allocation.
const INLINE_SEGMENTS: usize = 32;

/// Bytes per Cap'n Proto word.
const WORD_BYTES: u64 = 8;

/// Limits applied when reading a message from untrusted bytes.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// Words that may be read through pointers before traversal fails with
    /// `ErrorKind::ReadLimitExceeded`. Each access to a struct, list or blob counts again, so a
    /// message whose pointers all share one large object cannot be read as many times its size.
    ///
    /// `None` (the default) is automatic: `max(8 Mi words, 4 × the message's words)`.
    /// `Some(u64::MAX)` is effectively unlimited.
    pub traversal_limit_words: Option<u64>,
    /// How deeply structs and lists may nest (capnp's default: 64). Bounds recursion on cyclic
    /// or deeply nested messages.
    pub nesting_limit: i32,
    /// Exclusive limit on the segment count: a message is accepted when
    /// `count < max_segments`. Default 512, as capnp's readers.
    pub max_segments: u32,
}

impl ReadOptions {
    /// The defaults: automatic traversal limit, nesting limit 64, fewer than 512 segments.
    pub const fn new() -> Self {
        Self {
            traversal_limit_words: None,
            nesting_limit: 64,
            max_segments: DEFAULT_MAX_SEGMENTS,
        }
    }

    /// The traversal limit, in words, applied to a message whose segments hold `message_words`.
    pub fn effective_traversal_limit(&self, message_words: u64) -> u64 {
        match self.traversal_limit_words {
            Some(limit) => limit,
            None => {
                AUTO_TRAVERSAL_FLOOR_WORDS.max(message_words.saturating_mul(AUTO_TRAVERSAL_FACTOR))
            }
        }
    }

    /// The capnp reader options for a message whose segments hold `message_words`.
    pub fn capnp_options(&self, message_words: u64) -> ReaderOptions {
        let limit = self.effective_traversal_limit(message_words);
        let mut options = ReaderOptions::new();
        options
            .traversal_limit_in_words(Some(usize::try_from(limit).unwrap_or(usize::MAX)))
            .nesting_limit(self.nesting_limit);
        options
    }
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a framed message could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The buffer ends before the segment table or the segments it declares.
    #[error("framed message truncated: it needs {needed} bytes, {available} are present")]
    Truncated {
        /// Bytes needed from the start of the buffer (the minimal 8-byte table, the whole table,
        /// or the whole message).
        needed: u64,
        /// Bytes present.
        available: u64,
    },
    /// The buffer does not start on an 8-byte boundary (the reader never copies).
    #[error("framed message at address {address:#x} is not 8-byte aligned")]
    Misaligned {
        /// Address of the first byte.
        address: usize,
    },
    /// The table declares at least `max` segments.
    #[error("segment table declares {count} segments; fewer than {max} are accepted")]
    TooManySegments {
        /// Declared segment count (the count field plus one, up to 2^32).
        count: u64,
        /// The exclusive limit, [`ReadOptions::max_segments`].
        max: u32,
    },
    /// Segment 0 holds no words, so the message has no root pointer.
    #[error("segment 0 is empty: the message has no root pointer")]
    EmptyFirstSegment,
    /// A segment is longer than [`MAX_SEGMENT_WORDS`].
    #[error("a segment declares {words} words; at most {MAX_SEGMENT_WORDS} are accepted")]
    SegmentTooLarge {
        /// Declared length in words.
        words: u64,
    },
    /// The message is a well-formed Cap'n Proto message but not a usable frame: an unknown
    /// pixel format, or a geometry the planes do not match. Returned by [`read_frame`] only.
    #[error("not a usable frame: {0}")]
    Frame(FrameError),
    /// capnp rejected the content: an out-of-bounds or malformed pointer, the traversal limit,
    /// the nesting limit, a value not in the schema.
    #[error("malformed message: {0}")]
    Capnp(#[from] capnp::Error),
}

impl From<FrameError> for ReadError {
    fn from(error: FrameError) -> Self {
        match error {
            FrameError::Capnp(error) => Self::Capnp(error),
            other => Self::Frame(other),
        }
    }
}

/// Segment boundaries: `count + 1` offsets from the start of the framed message. Segment `i`
/// spans offsets `i..i + 1`; offset 0 is the padded table length.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Bounds {
    /// Offsets in words, for up to 32 segments in a message of fewer than 2^32 words: small,
    /// so a `Reader` over it is cheap to move.
    Inline([u32; INLINE_SEGMENTS + 1]),
    /// Offsets in bytes, for everything else.
    Heap(Box<[u64]>),
}

/// A parsed, validated segment table.
///
/// Holds the segment count and where each segment starts and ends. Up to 32 segments are stored
/// inline (no heap allocation), more on the heap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentTable {
    count: u32,
    bounds: Bounds,
}

/// Reads the little-endian `u32` at byte `at` of `bytes`, if present.
fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let field = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([field[0], field[1], field[2], field[3]]))
}

/// The segment lengths, in words, from the length fields of a segment table.
fn lengths(table: &[u8]) -> impl Iterator<Item = u64> + '_ {
    table.chunks_exact(4).map(|length| {
        u64::from(u32::from_le_bytes([
            length[0], length[1], length[2], length[3],
        ]))
    })
}

impl SegmentTable {
    /// Parses and validates the segment table at the start of `bytes`.
    ///
    /// Checks the count against `max_segments` (exclusive), every length against
    /// [`MAX_SEGMENT_WORDS`], that segment 0 is not empty, and computes the total without
    /// overflow. Only the table needs to be present, not the segments, and `bytes` need not be
    /// aligned.
    pub fn parse(bytes: &[u8], max_segments: u32) -> Result<Self, ReadError> {
        let available = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        let Some(count_field) = u32_at(bytes, 0) else {
            return Err(ReadError::Truncated {
                needed: WORD_BYTES,
                available,
            });
        };
        let count = u64::from(count_field) + 1;
        if count >= u64::from(max_segments) {
            return Err(ReadError::TooManySegments {
                count,
                max: max_segments,
            });
        }
        // count < max_segments <= u32::MAX, so it fits in u32.
        let count = count_field + 1;
        let header_words = u64::from(count) / 2 + 1;
        if available < header_words * WORD_BYTES {
            return Err(ReadError::Truncated {
                needed: header_words * WORD_BYTES,
                available,
            });
        }
        // The table is present, so its length fits in usize.
        let table = &bytes[4..4 + 4 * count as usize];

        // One pass validates every length and, for small tables, records the bounds in words.
        let mut inline = [0u32; INLINE_SEGMENTS + 1];
        let mut end = header_words;
        inline[0] = u32::try_from(end).unwrap_or(u32::MAX);
        for (i, words) in lengths(table).enumerate() {
            if words > u64::from(MAX_SEGMENT_WORDS) {
                return Err(ReadError::SegmentTooLarge { words });
            }
            if i == 0 && words == 0 {
                return Err(ReadError::EmptyFirstSegment);
            }
            // Cannot overflow: fewer than 2^32 segments of fewer than 2^29 words each, plus a
            // table of at most 2^31 + 1 words, is below 2^62 words.
            end += words;
            if let Some(slot) = inline.get_mut(i + 1) {
                // Truncated values are never used: the inline form needs `end` to fit (below).
                *slot = u32::try_from(end).unwrap_or(u32::MAX);
            }
        }
        let bounds = if count as usize <= INLINE_SEGMENTS && end <= u64::from(u32::MAX) {
            Bounds::Inline(inline)
        } else {
            // The table itself is present and takes 4 bytes per entry, so this allocation is at
            // most twice the size of the input.
            let mut bytes = Vec::with_capacity(count as usize + 1);
            let mut end = header_words * WORD_BYTES;
            bytes.push(end);
            for words in lengths(table) {
                end += words * WORD_BYTES;
                bytes.push(end);
            }
            Bounds::Heap(bytes.into_boxed_slice())
        };
        Ok(Self { count, bounds })
    }

    /// Offset `i` in bytes from the start of the message; `i <= count`.
    #[inline]
    fn offset(&self, i: u32) -> u64 {
        debug_assert!(i <= self.count);
        let i = i as usize;
        // Every index up to `count` is stored; the fallback is never taken.
        match &self.bounds {
            Bounds::Inline(words) => words.get(i).map_or(0, |&w| u64::from(w) * WORD_BYTES),
            Bounds::Heap(bytes) => bytes.get(i).copied().unwrap_or(0),
        }
    }

    /// Number of segments (at least 1).
    pub fn segment_count(&self) -> u32 {
        self.count
    }

    /// Length of segment `i` in words, or `None` if there is no such segment.
    pub fn segment_words(&self, i: u32) -> Option<u32> {
        if i >= self.count {
            return None;
        }
        // Every length was read from a u32 field.
        u32::try_from((self.offset(i + 1) - self.offset(i)) / WORD_BYTES).ok()
    }

    /// Length of the segment table in bytes, padded to a multiple of 8.
    pub fn header_bytes(&self) -> usize {
        // The table was present in the parsed buffer, so its length fits in usize.
        usize::try_from(self.offset(0)).unwrap_or(usize::MAX)
    }

    /// Total length of the segments in bytes.
    pub fn body_bytes(&self) -> u64 {
        self.offset(self.count) - self.offset(0)
    }

    /// Total length of the segments in words.
    pub fn body_words(&self) -> u64 {
        self.body_bytes() / WORD_BYTES
    }

    /// Length of the whole framed message (table and segments) in bytes.
    pub fn message_bytes(&self) -> u64 {
        self.offset(self.count)
    }

    /// Byte offset of segment `i` from the start of the framed message, or `None` if there is
    /// no such segment.
    pub fn segment_offset(&self, i: u32) -> Option<u64> {
        (i < self.count).then(|| self.offset(i))
    }
}

/// The segments of one framed message, borrowed from the contiguous buffer it arrived in.
///
/// Implements `capnp::message::ReaderSegments`; looking a segment up is two array reads and a
/// slice. No heap allocation for up to 32 segments.
#[derive(Clone, Debug)]
pub struct InPlaceSegments<'a> {
    /// Exactly the framed message: table and segments.
    message: &'a [u8],
    table: SegmentTable,
}

impl<'a> InPlaceSegments<'a> {
    /// Validates the framed message at the start of `bytes`: alignment, the segment table (see
    /// [`SegmentTable::parse`]) and that every segment is present. Bytes after the message are
    /// allowed.
    pub fn new(bytes: &'a [u8], max_segments: u32) -> Result<Self, ReadError> {
        let address = bytes.as_ptr() as usize;
        if !bytes.is_empty() && address % 8 != 0 {
            return Err(ReadError::Misaligned { address });
        }
        let table = SegmentTable::parse(bytes, max_segments)?;
        let needed = table.message_bytes();
        let available = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        let len = match usize::try_from(needed) {
            Ok(len) if needed <= available => len,
            _ => return Err(ReadError::Truncated { needed, available }),
        };
        Ok(Self {
            message: &bytes[..len],
            table,
        })
    }

    /// The validated segment table.
    pub fn table(&self) -> &SegmentTable {
        &self.table
    }

    /// The framed message (table and segments), without any trailing bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.message
    }

    /// Segment `i` as a slice of the original buffer, or `None` if there is no such segment.
    #[inline]
    pub fn segment(&self, i: u32) -> Option<&'a [u8]> {
        if i >= self.table.count {
            return None;
        }
        let i = i as usize;
        // Offsets up to `count` are stored, and they lie within `message` (checked in `new`),
        // so they fit in usize; `get` keeps this panic-free regardless.
        let (start, end) = match &self.table.bounds {
            Bounds::Inline(words) => (
                usize::try_from(*words.get(i)?).ok()?.checked_mul(8)?,
                usize::try_from(*words.get(i + 1)?).ok()?.checked_mul(8)?,
            ),
            Bounds::Heap(bytes) => (
                usize::try_from(*bytes.get(i)?).ok()?,
                usize::try_from(*bytes.get(i + 1)?).ok()?,
            ),
        };
        self.message.get(start..end)
    }
}

impl ReaderSegments for InPlaceSegments<'_> {
    #[inline]
    fn get_segment(&self, idx: u32) -> Option<&[u8]> {
        self.segment(idx)
    }

    fn len(&self) -> usize {
        self.table.count as usize
    }
}

/// Reads the framed message at the start of `bytes` in place.
///
/// Checks alignment, the segment table and that the whole message is present (see the
/// [module docs](self) for every bound); the content is validated lazily by capnp as it is
/// read. Returns the reader and the number of bytes the message occupies: a following message,
/// if any, starts there.
///
/// Costs a table parse (a few comparisons per segment) plus capnp's `Reader::new`; no copy, and
/// no heap allocation for up to 32 segments.
pub fn read_framed<'a>(
    bytes: &'a [u8],
    options: &ReadOptions,
) -> Result<(Reader<InPlaceSegments<'a>>, usize), ReadError> {
    let segments = InPlaceSegments::new(bytes, options.max_segments)?;
    let len = segments.message.len();
    let capnp_options = options.capnp_options(segments.table.body_words());
    Ok((Reader::new(segments, capnp_options), len))
}

/// Reads a framed `Frame` message in place and checks it is usable as a frame.
///
/// On top of [`read_framed`], the root is a `Frame` and:
/// - its pixel format is known: in the schema and not `unknown`;
/// - width and height are valid for the format ([`plane_layouts`]);
/// - it has exactly as many planes as the format, checked before any plane is read, so a
///   small message with a huge planes list costs nothing to reject;
/// - every plane's data covers `stride * rows` bytes ([`FrameView::new`]'s check), and
///   `stride` and `rows` are at least what width, height and format need, so a consumer that
///   indexes pixels by width and height stays inside the plane.
///
/// Failures are [`ReadError::Frame`] (format, geometry) or [`ReadError::Capnp`] (malformed
/// content, short plane data, limits). The checks run on a separate reader over the same
/// segments, so they do not spend the returned reader's traversal budget. Get at the planes
/// with [`FrameView::new`]`(&reader)`, which repeats the cheap plane checks (a few pointer
/// reads, no per-byte work):
///
/// ```
/// # use capnp_rdma::frame::{FrameSpec, FrameView, FrameWriter, PixelFormat};
/// # use capnp_rdma::reader::{read_frame, ReadOptions};
/// # let mut message = capnp::message::Builder::new_default();
/// # FrameWriter::init(&mut message, &FrameSpec::new(PixelFormat::I420, 8, 8)).unwrap();
/// # let mut buffer = capnp::Word::allocate_zeroed_vec(
/// #     capnp::serialize::compute_serialized_size_in_words(&message));
/// # capnp::serialize::write_message(capnp::Word::words_to_bytes_mut(&mut buffer), &message).unwrap();
/// # let bytes = capnp::Word::words_to_bytes(&buffer);
/// let (message, _len) = read_frame(bytes, &ReadOptions::default())?;
/// let view = FrameView::new(&message)?;
/// assert_eq!(view.plane(2)?.len(), 16);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn read_frame<'a>(
    bytes: &'a [u8],
    options: &ReadOptions,
) -> Result<(Reader<InPlaceSegments<'a>>, usize), ReadError> {
    let segments = InPlaceSegments::new(bytes, options.max_segments)?;
    let len = segments.message.len();
    let capnp_options = options.capnp_options(segments.table.body_words());
    check_frame(&Reader::new(&segments, capnp_options))?;
    Ok((Reader::new(segments, capnp_options), len))
}

/// The checks of [`read_frame`] on an already-constructed reader.
fn check_frame<S: ReaderSegments>(message: &Reader<S>) -> Result<(), ReadError> {
    let frame: frame::Reader<'_> = message.get_root()?;
    let format = frame.get_format().map_err(capnp::Error::from)?;
    let (width, height) = (frame.get_width(), frame.get_height());
    // Unknown format, zero or odd-where-subsampled sizes.
    let layouts = plane_layouts(format, width, height)?;
    let inconsistent = || {
        ReadError::Frame(FrameError::BadGeometry {
            width,
            height,
            format,
        })
    };
    // Before any plane is looked at: a huge planes list is rejected here, not iterated.
    let planes = frame.get_planes()?;
    if planes.len() as usize != layouts.len() {
        return Err(inconsistent());
    }
    // Every plane's data covers stride * rows.
    FrameView::from_reader(frame)?;
    // And stride * rows covers what width, height and format say.
    for (plane, layout) in planes.iter().zip(&layouts) {
        if plane.get_stride() < layout.stride || plane.get_rows() < layout.rows {
            return Err(inconsistent());
        }
    }
    Ok(())
}

/// Fuzz entry point shared by the cargo-fuzz target and the corpus test. Copies `data` into an
/// aligned buffer, reads every message in it back to back with [`read_framed`] and traverses
/// each one completely, as a `Frame` and untyped; also runs [`read_frame`] and
/// [`SegmentTable::parse`]. Errors are expected; a panic is a bug (the few assertions state
/// invariants of this module).
#[doc(hidden)]
pub fn fuzz_read_framed(data: &[u8]) {
    fuzz::run(data);
}

mod fuzz {
    use super::*;
    use core::fmt::{self, Write as _};
    use core::hint::black_box;

    /// Messages read back to back from one input.
    const MAX_MESSAGES: usize = 4;
    /// Output the schema-driven `Debug` traversal may produce before it is cut off.
    const DEBUG_BUDGET: usize = 64 << 10;

    pub(super) fn run(data: &[u8]) {
        let mut words = capnp::Word::allocate_zeroed_vec(data.len().div_ceil(8));
        capnp::Word::words_to_bytes_mut(&mut words)[..data.len()].copy_from_slice(data);
        let bytes = &capnp::Word::words_to_bytes(&words)[..data.len()];

        for max in [0, 1, 4, DEFAULT_MAX_SEGMENTS, u32::MAX] {
            if let Ok(table) = SegmentTable::parse(bytes, max) {
                check_table(&table, bytes);
            }
        }

        let options = ReadOptions::default();
        let mut rest = bytes;
        for _ in 0..MAX_MESSAGES {
            let Ok((message, len)) = read_framed(rest, &options) else {
                break;
            };
            assert!(
                len >= 16 && len <= rest.len() && len % 8 == 0,
                "bad message length {len}"
            );
            traverse(&message);
            rest = &rest[len..];
        }

        if let Ok((message, _)) = read_frame(bytes, &options) {
            // read_frame promises that FrameView::new succeeds on what it returns.
            let view = FrameView::new(&message).expect("read_frame accepted the frame");
            for i in 0..view.plane_count().unwrap_or(0) {
                let _ = black_box(
                    view.plane(i)
                        .map(|p| (p.first().copied(), p.last().copied())),
                );
            }
        }

        if !data.is_empty() {
            // The same bytes one byte off alignment are always rejected, never copied.
            let mut shifted = capnp::Word::allocate_zeroed_vec(data.len() / 8 + 1);
            let shifted = &mut capnp::Word::words_to_bytes_mut(&mut shifted)[1..=data.len()];
            shifted.copy_from_slice(data);
            assert!(matches!(
                read_framed(shifted, &options),
                Err(ReadError::Misaligned { .. })
            ));
        }
    }

    fn check_table(table: &SegmentTable, bytes: &[u8]) {
        let count = table.segment_count();
        assert!(count >= 1);
        assert_eq!(table.header_bytes() % 8, 0);
        assert!(table.header_bytes() <= bytes.len());
        let mut sum = 0u64;
        for i in 0..count {
            let words = table.segment_words(i).expect("segment in range");
            assert!(words <= MAX_SEGMENT_WORDS);
            assert_eq!(
                table.segment_offset(i),
                Some(table.header_bytes() as u64 + sum)
            );
            sum += u64::from(words) * WORD_BYTES;
        }
        assert_eq!(table.segment_words(count), None);
        assert_eq!(table.segment_offset(count), None);
        assert_eq!(table.body_bytes(), sum);
        assert_eq!(table.message_bytes(), table.header_bytes() as u64 + sum);
    }

    fn traverse<S: ReaderSegments>(message: &Reader<S>) {
        let _ = black_box(traverse_frame(message));
        if let Ok(root) = message.get_root::<capnp::any_pointer::Reader<'_>>() {
            let _ = black_box(root.target_size());
            let _ = black_box(root.is_null());
        }
        let _ = black_box(message.is_canonical());
        if let Ok(frame) = message.get_root::<frame::Reader<'_>>() {
            // The generated Debug walks the message through the schema (dynamic reflection).
            let _ = write!(Sink(DEBUG_BUDGET), "{frame:?}");
        }
    }

    fn traverse_frame<S: ReaderSegments>(message: &Reader<S>) -> capnp::Result<()> {
        let frame: frame::Reader<'_> = message.get_root()?;
        black_box((
            frame.get_stream_id(),
            frame.get_sequence(),
            frame.get_pts_ticks(),
            frame.get_timebase_num(),
            frame.get_timebase_den(),
            frame.get_width(),
            frame.get_height(),
        ));
        let _ = black_box(frame.get_format());
        let planes = traverse_planes(frame);
        let metadata = traverse_metadata(frame);
        planes.and(metadata)
    }

    fn traverse_planes(frame: frame::Reader<'_>) -> capnp::Result<()> {
        if !frame.has_planes() {
            return Ok(());
        }
        for plane in frame.get_planes()?.iter() {
            black_box((plane.get_stride(), plane.get_rows(), plane.has_data()));
            let data = plane.get_data()?;
            black_box((data.len(), data.first(), data.last()));
        }
        Ok(())
    }

    fn traverse_metadata(frame: frame::Reader<'_>) -> capnp::Result<()> {
        for entry in frame.get_metadata()?.iter() {
            let key = entry.get_key();
            if let Ok(key) = key {
                black_box(key.as_bytes());
                let _ = black_box(key.to_str());
            }
            let value = entry.get_value()?;
            black_box((value.first(), value.last()));
            key?;
        }
        Ok(())
    }

    /// Discards formatted output; fails once its byte budget is spent.
    struct Sink(usize);

    impl fmt::Write for Sink {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0 = self.0.checked_sub(s.len()).ok_or(fmt::Error)?;
            black_box(s);
            Ok(())
        }
    }
}
