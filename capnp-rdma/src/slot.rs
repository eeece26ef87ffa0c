//! Messages built in place, contiguously, at their destination: a [`SlotMessage`] lays a Cap'n
//! Proto message out inside a given byte range (a *slot*) of a [`Region`], already in standard
//! stream framing, so handing it over is a matter of telling the reader where it is.
//!
//! ```text
//!  slot = region[offset .. offset + len)     (zeroed; e.g. a slot of the target's grant)
//!  ┌───────────────────┬─────────────────────────────────────────────┬──────────────┐
//!  │ table (8 bytes)   │ segment 0: root, header, planes (Y, U, V)   │ unused, zero │
//!  │ [0u32, words u32] │ ◀── capnp builds here, FrameWriter::plane_mut│              │
//!  └───────────────────┴─────────────────────────────────────────────┴──────────────┘
//!  └──────────────────── Framed { offset, len } ─────────────────────┘
//! ```
//!
//! - The [`SlotAllocator`] gives capnp the whole slot after [`SLOT_HEADER_BYTES`] as the first
//!   segment (rounded down to words, capped so the framed message stays under 4 GiB). A message
//!   that fits is one segment, right behind its one-segment table: the bytes
//!   `region[offset .. offset + framed.len)` are exactly what `capnp::serialize::write_message`
//!   would write for it.
//! - A message that outgrows the slot gets further segments from the heap (capnp's allocator
//!   interface cannot fail, and nothing panics); [`SlotMessage::finish`] then reports
//!   [`SlotError::Overflow`] with the bytes a slot needs, re-zeroes what it wrote in the slot,
//!   and the caller retries with a bigger slot. [`SlotMessage::frame_capacity`] gives the exact
//!   size of a `Frame` message beforehand, so frames never overflow.
//! - [`SlotMessage::into_payload`] turns the finished message into a [`SlotPayload`], a
//!   [`transport::Payload`](crate::transport::Payload) of one entry. Posted through the
//!   [`shm`](crate::transport::shm) writer to the offset where it already is (built in the
//!   target's region, [`ShmWriter::target_region`]), no byte is copied: the write is the ring
//!   notification alone.
//! - Nothing here allocates, frees or zeroes the slot: it belongs to whoever granted it (a lease,
//!   a target's grant, a store's grant). Cap'n Proto needs the slot zeroed; a message dropped
//!   before it was finished, or that overflowed, zeroes the bytes it wrote, so the slot can be
//!   used again.
//!
//! [`ShmWriter::target_region`]: crate::transport::shm::ShmWriter::target_region
//!
//! ```
//! use capnp_rdma::frame::{FrameSpec, FrameView, FrameWriter, PixelFormat};
//! use capnp_rdma::reader::{read_frame, ReadOptions};
//! use capnp_rdma::slot::SlotMessage;
//! use capnp_rdma::{Region, RegionOptions};
//!
//! let region = Region::create(&RegionOptions::memfd(16 << 20)).unwrap();
//! let spec = FrameSpec::new(PixelFormat::I420, 640, 480);
//! let capacity = SlotMessage::frame_capacity(&spec).unwrap();
//! let lease = region.lease(capacity).unwrap(); // zeroed, and nobody else touches it
//!
//! // SAFETY: the lease's blocks are zeroed and only this message uses them until it is
//! // finished; the lease outlives every use of the message's bytes below.
//! let mut message = unsafe { SlotMessage::new(&region, lease.offset(), capacity) }.unwrap();
//! let mut frame = message.init_frame(&spec).unwrap();
//! frame.plane_mut(0).unwrap().fill(16); // pixels go straight into the slot
//! let framed = message.finish().unwrap();
//! assert_eq!((framed.offset, framed.len), (lease.offset(), capacity));
//!
//! // The slot now holds the message in standard stream framing; read it in place.
//! // SAFETY: nothing writes the slot while `bytes` lives.
//! let bytes = unsafe { region.bytes(framed.offset, framed.len) }.unwrap();
//! let (reader, len) = read_frame(bytes, &ReadOptions::default()).unwrap();
//! assert_eq!(len as u64, framed.len);
//! assert_eq!(FrameView::new(&reader).unwrap().plane(0).unwrap()[0], 16);
//! ```

use crate::frame::{plane_layouts, FrameError, FrameSpec, FrameWriter};
use crate::frame_capnp::{frame, metadata_entry, plane};
use crate::framing::Sge;
use crate::region::{Region, RegionError};
use capnp::message::{Allocator, Builder};
use capnp::traits::{FromPointerBuilder, HasStructSize};
use std::alloc::Layout;
use std::ptr::NonNull;

/// Bytes in front of segment 0 for the one-segment stream-framing table `[0u32, words u32]`.
pub const SLOT_HEADER_BYTES: u64 = 8;

/// Smallest slot: the table and one word (a root pointer).
pub const MIN_SLOT_BYTES: u64 = SLOT_HEADER_BYTES + 8;

/// Largest first segment, in words: the framed message (table + segment) must fit a `u32`
/// scatter-gather length, and capnp segments stay under 2^29 words.
pub const MAX_SLOT_SEGMENT_WORDS: u32 = ((u32::MAX as u64 - SLOT_HEADER_BYTES) / 8) as u32;

/// Smallest heap segment handed out once a message outgrows its slot, in words.
const SPILL_MIN_WORDS: u32 = 1024;

/// Why a slot message could not be made, finished or sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SlotError {
    /// The range is not inside the region's data area.
    #[error("slot outside the region: {0}")]
    Range(#[from] RegionError),
    /// The range does not start at a multiple of 8 bytes (capnp segments are word-aligned).
    #[error("slot offset {offset} is not a multiple of 8")]
    Misaligned {
        /// The offset given.
        offset: u64,
    },
    /// The range cannot hold the table and a root pointer.
    #[error("slot of {len} bytes is smaller than {MIN_SLOT_BYTES}")]
    TooSmall {
        /// The length given.
        len: u64,
    },
    /// The message outgrew the slot (it has segments outside it). A slot of `needed_bytes`
    /// holds it; the slot was zeroed again.
    #[error("message needs a slot of {needed_bytes} bytes, the slot has {slot_bytes}")]
    Overflow {
        /// Bytes a slot needs for this message: the table plus every word the message used
        /// (an upper bound: built in one segment it needs no far pointers).
        needed_bytes: u64,
        /// Bytes the slot has.
        slot_bytes: u64,
    },
    /// No root was set: there is no message to frame.
    #[error("the message has no root")]
    EmptyMessage,
    /// A framed message longer than one scatter-gather entry can describe.
    #[error("a framed message of {len} bytes does not fit one entry (at most 4 GiB - 1)")]
    TooLarge {
        /// The length given.
        len: u64,
    },
}

/// Checks a slot against `region`: in the data area, word-aligned, at least [`MIN_SLOT_BYTES`].
fn check_slot(region: &Region, offset: u64, len: u64) -> Result<(), SlotError> {
    region.check_range(offset, len)?;
    if offset % 8 != 0 {
        return Err(SlotError::Misaligned { offset });
    }
    if len < MIN_SLOT_BYTES {
        return Err(SlotError::TooSmall { len });
    }
    Ok(())
}

/// A `capnp::message::Allocator` over one slot of a region: the first segment is the slot after
/// its [`SLOT_HEADER_BYTES`]; later segments (the message outgrew the slot) come from the heap
/// and are counted.
///
/// [`SlotMessage`] wraps it with the framing; use it directly only to build with a bare
/// `capnp::message::Builder` (and frame the message yourself).
#[derive(Debug)]
pub struct SlotAllocator {
    region: Region,
    /// Offset of the slot (the table's first byte).
    offset: u64,
    /// Bytes of the slot.
    len: u64,
    /// Words of the in-slot segment.
    slot_words: u32,
    /// The first request was answered (with the slot, or with the heap if it did not fit).
    first_done: bool,
    /// Words of the in-slot segment capnp wrote, recorded when it is deallocated.
    slot_words_used: u32,
    spilled_segments: u32,
    spilled_bytes: u64,
}

impl SlotAllocator {
    /// An allocator whose first segment is `region[offset + 8 .. offset + len)` (rounded down
    /// to words, at most [`MAX_SLOT_SEGMENT_WORDS`]). Errors as [`SlotMessage::new`].
    ///
    /// # Safety
    /// As [`SlotMessage::new`]: the range is zeroed, stays allocated to its user, and nobody
    /// else reads or writes it while a builder uses this allocator (nor writes what the
    /// message occupies while it is read afterwards).
    pub unsafe fn new(region: &Region, offset: u64, len: u64) -> Result<Self, SlotError> {
        check_slot(region, offset, len)?;
        let words = ((len - SLOT_HEADER_BYTES) / 8).min(u64::from(MAX_SLOT_SEGMENT_WORDS)) as u32;
        Ok(Self {
            region: region.clone(),
            offset,
            len,
            slot_words: words,
            first_done: false,
            slot_words_used: 0,
            spilled_segments: 0,
            spilled_bytes: 0,
        })
    }

    /// Offset of the slot in the region (its table's first byte).
    pub fn slot_offset(&self) -> u64 {
        self.offset
    }

    /// Bytes of the slot.
    pub fn slot_len(&self) -> u64 {
        self.len
    }

    /// Address of the in-slot segment, derived from the mapping.
    fn slot_segment(&self) -> *mut u8 {
        self.region.data_ptr(self.offset + SLOT_HEADER_BYTES)
    }

    /// The region the slot is in.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Heap segments handed out because the message outgrew the slot.
    pub fn spilled_segments(&self) -> u32 {
        self.spilled_segments
    }

    /// Bytes of those heap segments.
    pub fn spilled_bytes(&self) -> u64 {
        self.spilled_bytes
    }

    fn heap_segment(&mut self, minimum_size: u32) -> (NonNull<u8>, u32) {
        let words = minimum_size.max(SPILL_MIN_WORDS);
        let layout =
            Layout::from_size_align(words as usize * 8, 8).expect("segment sizes fit a Layout");
        // SAFETY: the layout has a non-zero size (at least SPILL_MIN_WORDS words).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout)
        };
        self.spilled_segments += 1;
        self.spilled_bytes += u64::from(words) * 8;
        (ptr, words)
    }

    /// Zeroes the words capnp wrote in the slot (after the builder let go of them).
    ///
    /// # Safety
    /// The builder that used this allocator must be gone (no reference into the slot remains),
    /// and the slot must still be this message's (the [`SlotMessage::new`] contract).
    unsafe fn scrub_slot(&self) {
        let bytes = u64::from(self.slot_words_used) * 8;
        if bytes > 0 {
            // SAFETY: `offset + 8 .. + bytes` lies in the slot (capnp used at most the segment
            // it was given), which is inside the region's mapping (checked at construction);
            // no reference covers it (caller), and the slot is ours (caller).
            unsafe { std::ptr::write_bytes(self.slot_segment(), 0, bytes as usize) };
        }
    }
}

// SAFETY: (1) the slot is zeroed ([`SlotMessage::new`]'s contract) and heap segments come from
// alloc_zeroed; (2) the slot stays mapped while the allocator lives (it holds a region handle)
// and belongs to the message until it is finished or dropped (the same contract); heap
// segments live until deallocate_segment; (3) the slot is handed out at most once, and each
// heap segment is a fresh allocation; (4) the slot segment starts at `offset + 8` with `offset`
// a multiple of 8 in a page-aligned mapping, heap segments are 8-aligned; (5) every segment
// has at least `minimum_size` words.
unsafe impl Allocator for SlotAllocator {
    fn allocate_segment(&mut self, minimum_size: u32) -> (NonNull<u8>, u32) {
        if !self.first_done {
            self.first_done = true;
            if minimum_size <= self.slot_words {
                let ptr = NonNull::new(self.slot_segment()).expect("mapping is not at address 0");
                return (ptr, self.slot_words);
            }
        }
        self.heap_segment(minimum_size)
    }

    unsafe fn deallocate_segment(&mut self, ptr: NonNull<u8>, word_size: u32, words_used: u32) {
        if ptr.as_ptr() == self.slot_segment() {
            // The slot is not ours to free; remember what capnp wrote in case it is scrubbed.
            self.slot_words_used = words_used;
            return;
        }
        let layout =
            Layout::from_size_align(word_size as usize * 8, 8).expect("segment sizes fit a Layout");
        // SAFETY: any other pointer came from `heap_segment` with this layout (capnp passes
        // back the word size we returned), and capnp frees each segment once.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
    }
}

/// Where a finished slot message is: `len` bytes at `offset` of the region, the table first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framed {
    /// Offset of the message (its segment table) in the region: the slot's offset.
    pub offset: u64,
    /// Bytes of the framed message: the 8-byte table and the used words of its one segment.
    pub len: u64,
}

/// A Cap'n Proto message being built in one slot of a region. See the [module docs](self).
pub struct SlotMessage {
    /// `Some` until finished (or dropped).
    message: Option<Builder<SlotAllocator>>,
    region: Region,
    offset: u64,
    len: u64,
}

impl std::fmt::Debug for SlotMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotMessage")
            .field("region", &self.region.id())
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl SlotMessage {
    /// A message that will be built in `region[offset .. offset + len)`.
    ///
    /// Fails if the range is not inside the region's data area ([`SlotError::Range`]), does not
    /// start at a multiple of 8 ([`SlotError::Misaligned`]) or is shorter than
    /// [`MIN_SLOT_BYTES`] ([`SlotError::TooSmall`]).
    ///
    /// # Safety
    /// - The range is zeroed (a fresh lease or grant is; a slot used before must be zeroed
    ///   again, which a message that was dropped unfinished or overflowed does itself).
    /// - Nobody else reads or writes the range until this message is finished or dropped, and,
    ///   once finished, nobody writes the first [`Framed::len`] bytes while they are read as the
    ///   message: in particular while a [`SlotPayload`] made from it lives (transports read
    ///   payloads from other threads, or a NIC does).
    /// - The range stays allocated to its user (lease, grant) for all that time.
    pub unsafe fn new(region: &Region, offset: u64, len: u64) -> Result<Self, SlotError> {
        // SAFETY: the caller's contract is this allocator's.
        let allocator = unsafe { SlotAllocator::new(region, offset, len) }?;
        Ok(Self {
            message: Some(Builder::new(allocator)),
            region: region.clone(),
            offset,
            len,
        })
    }

    /// Exact bytes of the framed `Frame` message that [`FrameWriter::init`] builds for `spec`
    /// in one segment (table included): a slot of this length holds it. Depends only on the
    /// spec (geometry, format, metadata), not on any region.
    pub fn frame_capacity(spec: &FrameSpec) -> Result<u64, FrameError> {
        fn words(bytes: u64) -> u64 {
            bytes.div_ceil(8)
        }
        fn total(size: capnp::private::layout::StructSize) -> u64 {
            u64::from(size.data) + u64::from(size.pointers)
        }
        let layouts = plane_layouts(spec.format, spec.width, spec.height)?;
        let frame_words = total(<frame::Builder<'_> as HasStructSize>::STRUCT_SIZE);
        let plane_words = total(<plane::Builder<'_> as HasStructSize>::STRUCT_SIZE);
        let entry_words = total(<metadata_entry::Builder<'_> as HasStructSize>::STRUCT_SIZE);
        // Root pointer, the Frame struct.
        let mut w = 1 + frame_words;
        // Metadata: a struct list (tag word + entries), each key a NUL-terminated text.
        w += 1 + entry_words * spec.metadata.len() as u64;
        for (key, value) in &spec.metadata {
            w += words(key.len() as u64 + 1) + words(value.len() as u64);
        }
        // Planes: a struct list, then each plane's data.
        w += 1 + plane_words * layouts.len() as u64;
        for layout in &layouts {
            w += words(layout.bytes() as u64);
        }
        Ok(SLOT_HEADER_BYTES + w * 8)
    }

    fn builder_ref(&self) -> &Builder<SlotAllocator> {
        // Invariant: `message` is `Some` until `finish` consumes `self` or Drop runs.
        self.message
            .as_ref()
            .expect("a slot message lives until finished")
    }

    /// The capnp builder, for anything the helpers below do not cover.
    pub fn builder_mut(&mut self) -> &mut Builder<SlotAllocator> {
        // Invariant: as in `builder_ref`.
        self.message
            .as_mut()
            .expect("a slot message lives until finished")
    }

    /// The capnp builder, read-only (e.g. for `capnp::serialize::write_message`).
    pub fn builder(&self) -> &Builder<SlotAllocator> {
        self.builder_ref()
    }

    /// Initializes the root as a `T` (see `capnp::message::Builder::init_root`).
    pub fn init_root<'a, T: FromPointerBuilder<'a>>(&'a mut self) -> T {
        self.builder_mut().init_root()
    }

    /// The root as a `T` (see `capnp::message::Builder::get_root`).
    pub fn get_root<'a, T: FromPointerBuilder<'a>>(&'a mut self) -> capnp::Result<T> {
        self.builder_mut().get_root()
    }

    /// Initializes the root as a `Frame` described by `spec`, every plane allocated in the slot
    /// ([`FrameWriter::init`]); write the pixels through [`FrameWriter::plane_mut`].
    pub fn init_frame(&mut self, spec: &FrameSpec) -> Result<FrameWriter<'_>, FrameError> {
        FrameWriter::init(self.builder_mut(), spec)
    }

    /// The region the slot is in.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Offset of the slot in the region.
    pub fn slot_offset(&self) -> u64 {
        self.offset
    }

    /// Bytes of the slot.
    pub fn slot_len(&self) -> u64 {
        self.len
    }

    /// Segments of the message so far that are not in the slot (heap segments: it outgrew
    /// the slot, and [`finish`](Self::finish) will report [`SlotError::Overflow`]).
    pub fn spilled_segments(&self) -> usize {
        let slot_segment = self.region.data_ptr(self.offset + SLOT_HEADER_BYTES);
        self.builder_ref()
            .get_segments_for_output()
            .iter()
            .filter(|s| s.as_ptr() != slot_segment.cast_const())
            .count()
    }

    /// Writes the segment table in front of segment 0 and returns where the framed message
    /// is: `region[framed.offset .. framed.offset + framed.len)` is byte for byte what
    /// `capnp::serialize::write_message` writes for this message.
    ///
    /// [`SlotError::Overflow`] when the message outgrew the slot (the bytes it wrote in the
    /// slot are zeroed again, so the slot can be reused); [`SlotError::EmptyMessage`] when no
    /// root was set.
    pub fn finish(mut self) -> Result<Framed, SlotError> {
        let message = self
            .message
            .take()
            .expect("a slot message lives until finished");
        let slot_segment = self.region.data_ptr(self.offset + SLOT_HEADER_BYTES);
        let outcome = {
            let segments = message.get_segments_for_output();
            match segments.first() {
                None => Err(SlotError::EmptyMessage),
                Some(first)
                    if segments.len() == 1 && first.as_ptr() == slot_segment.cast_const() =>
                {
                    Ok(first.len() as u64)
                }
                Some(_) => Err(SlotError::Overflow {
                    needed_bytes: SLOT_HEADER_BYTES
                        + segments.iter().map(|s| s.len() as u64).sum::<u64>(),
                    slot_bytes: self.len,
                }),
            }
        };
        // Frees the heap segments, if any; the slot segment stays as it is.
        let allocator = message.into_allocator();
        match outcome {
            Ok(segment_bytes) => {
                let words = (segment_bytes / 8) as u32; // ≤ MAX_SLOT_SEGMENT_WORDS
                let mut table = [0u8; SLOT_HEADER_BYTES as usize];
                table[4..].copy_from_slice(&words.to_le_bytes());
                // SAFETY: the table's 8 bytes are the first of the slot (checked in `new`), in
                // front of segment 0, and capnp never touched them; the slot is ours until
                // finished (the `new` contract), and no reference covers these bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        table.as_ptr(),
                        self.region.data_ptr(self.offset),
                        table.len(),
                    )
                };
                Ok(Framed {
                    offset: self.offset,
                    len: SLOT_HEADER_BYTES + segment_bytes,
                })
            }
            Err(e) => {
                // SAFETY: the builder is gone (into_allocator), and the slot is still ours.
                unsafe { allocator.scrub_slot() };
                Err(e)
            }
        }
    }

    /// [`finish`](Self::finish)es the message and wraps it as a transport payload of one entry
    /// (`framed.offset`, `framed.len`), to be posted to `framed.offset` of the same region.
    pub fn into_payload(self) -> Result<SlotPayload, SlotError> {
        let region = self.region.clone();
        let framed = self.finish()?;
        // SAFETY: the message's `new` contract: nobody writes the framed bytes while the
        // payload lives, and the range stays allocated.
        unsafe { SlotPayload::new(&region, framed) }
    }
}

impl Drop for SlotMessage {
    fn drop(&mut self) {
        if let Some(message) = self.message.take() {
            let allocator = message.into_allocator();
            // SAFETY: the builder is gone (into_allocator), and an unfinished message's slot
            // is still ours (the `new` contract).
            unsafe { allocator.scrub_slot() };
        }
    }
}

/// A finished slot message as a [`transport::Payload`](crate::transport::Payload): one entry,
/// the framed message where it was built.
///
/// Posted to `framed().offset` in the same region (for shm: built in
/// [`ShmWriter::target_region`](crate::transport::shm::ShmWriter::target_region)), it is not
/// copied. Posting it anywhere else, or over a transport whose target is another region,
/// copies or sends it like any other payload (for tcp and verbs the slot must then be in the
/// writer's own region).
#[derive(Debug, Clone)]
pub struct SlotPayload {
    region: Region,
    entry: [Sge; 1],
}

impl SlotPayload {
    /// A payload of the framed message at `framed` in `region`.
    ///
    /// Fails if the range is not inside the region's data area, or is longer than one entry
    /// can describe (4 GiB - 1).
    ///
    /// # Safety
    /// Nobody writes `region[framed.offset .. + framed.len)` while the payload lives, and the
    /// range stays allocated to its user for that time.
    pub unsafe fn new(region: &Region, framed: Framed) -> Result<Self, SlotError> {
        region.check_range(framed.offset, framed.len)?;
        let len = u32::try_from(framed.len).map_err(|_| SlotError::TooLarge { len: framed.len })?;
        Ok(Self {
            region: region.clone(),
            entry: [Sge {
                offset: framed.offset,
                len,
            }],
        })
    }

    /// Where the message is.
    pub fn framed(&self) -> Framed {
        Framed {
            offset: self.entry[0].offset,
            len: u64::from(self.entry[0].len),
        }
    }
}

// SAFETY: the entry lies in the region's data area (checked in `new`), and nobody writes it
// while the payload lives (the contract of `SlotPayload::new`, or of `SlotMessage::new` for a
// payload made by `into_payload`).
unsafe impl crate::transport::Payload for SlotPayload {
    fn region(&self) -> &Region {
        &self.region
    }

    fn entries(&self) -> &[Sge] {
        &self.entry
    }
}
