//! The frames a sender posts, built once before the clock, and the receiving side's check.
//!
//! The sender owns `window + 1` pre-built I420 frame messages and posts them round-robin: write
//! `seq` carries message `seq % (window + 1)` into slot `seq % window`. Because the two moduli
//! differ, consecutive writes to one slot carry different messages, so a write that never
//! landed (stale bytes from the slot's previous write) fails the check as surely as a misplaced
//! or corrupted one.
//!
//! Every message stamps its own marker into the first and last byte of each plane. The receiver
//! compares the first and last byte of every entry (table + header segment, Y, U, V) at their
//! place in the landed slot — eight loads per frame — and, on checked frames (warm-up, or every
//! frame with `--quick`), a hash of every landed byte.
//!
//! The `shm` system's frames ([`InPlaceSet`]) are built the same way (same pixels, same
//! markers), once per slot, untimed, but in place: each in its slot of the target's grant, as
//! one contiguous [`SlotMessage`], so write `seq` carries message `seq % window` — the one
//! already in slot `seq % window`. The receiver checks the same eight bytes (table + header,
//! Y, U, V) and the same hash, computed before the message was finished from
//! `capnp::serialize::write_message` of its builder, so a framing table that did not match
//! the standard framing would fail the warm-up check. A frame handed over without being built
//! in its slot (a copy, a wrong slot) is caught by the writer's counters and the landing
//! place instead: the slot's content does not change between writes.

use super::TransportBenchError;
use crate::roundtrip::FrameSize;
use capnp::message::Builder;
use capnp_rdma::frame::{FrameSpec, FrameWriter, PixelFormat};
use capnp_rdma::framing::{FramingOptions, OutboundMessage};
use capnp_rdma::slot::{SlotMessage, SlotPayload};
use capnp_rdma::{Region, StagingAllocator};

/// The message a write carries and what the receiver must find where it lands.
#[derive(Debug)]
struct Shape {
    /// (offset in the message, byte): the first and last byte of every entry.
    points: Vec<(usize, u8)>,
    /// [`hash`] of the whole message.
    hash: u64,
}

/// What every write of one (system, frame) must land: shared by the receiving side.
#[derive(Debug)]
pub(super) struct Expect {
    shapes: Vec<Shape>,
    len: u64,
}

impl Expect {
    /// Bytes of every write (all messages have the same length).
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// Checks the bytes write `seq` landed: the first and last byte of every entry, and with
    /// `full` a hash of all of them. Says what differs.
    pub(super) fn check(&self, seq: u64, landed: &[u8], full: bool) -> Result<(), String> {
        let index = (seq % self.shapes.len() as u64) as usize;
        let shape = &self.shapes[index];
        if landed.len() as u64 != self.len {
            return Err(format!("{} bytes landed, {} sent", landed.len(), self.len));
        }
        for &(at, want) in &shape.points {
            let got = landed[at];
            if got != want {
                return Err(format!(
                    "byte {at} of the slot is {got:#04x}, message {index} has {want:#04x} there"
                ));
            }
        }
        if full && hash(landed) != shape.hash {
            return Err(format!(
                "the slot's bytes differ from message {index} (first and last bytes of every \
                 entry match)"
            ));
        }
        Ok(())
    }
}

/// The pre-built messages of one (system, frame), and their receiving-side check.
pub(super) struct FrameSet {
    /// `window + 1` messages in the sender's region.
    pub(super) messages: Vec<OutboundMessage>,
    /// Pixel bytes of one frame (the I420 planes).
    pub(super) frame_bytes: usize,
    pub(super) expect: Expect,
}

/// The marker byte at the start (`end == false`) or end of plane `plane` of message `index`:
/// never zero, and different for consecutive messages (7 is not a multiple of 251).
fn marker(index: usize, plane: usize, end: bool) -> u8 {
    1 + ((index * 7 + plane * 2 + usize::from(end)) % 251) as u8
}

/// A 64-bit hash of `bytes` over four independent lanes of 8-byte words (several GB/s, so a
/// checked 4K frame costs a few milliseconds). Not cryptographic: it catches wrong bytes, not
/// an adversary.
pub(super) fn hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut lanes = [1u64, 2, 3, 4];
    let mut chunks = bytes.chunks_exact(32);
    for chunk in &mut chunks {
        for (lane, word) in lanes.iter_mut().zip(chunk.chunks_exact(8)) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            *lane = (*lane ^ u64::from_le_bytes(w))
                .wrapping_mul(K)
                .rotate_left(29);
        }
    }
    let mut acc = bytes.len() as u64;
    for lane in lanes {
        acc = (acc ^ lane).wrapping_mul(K).rotate_left(31);
    }
    for &b in chunks.remainder() {
        acc = (acc ^ u64::from(b)).wrapping_mul(K);
    }
    acc
}

/// One pattern per plane of an I420 frame of `size`, copied into every message (a memcpy, not
/// a byte loop).
fn patterns(size: FrameSize) -> Result<Vec<Vec<u8>>, TransportBenchError> {
    let (width, height) = size.dimensions();
    let layouts = capnp_rdma::frame::plane_layouts(PixelFormat::I420, width, height)?;
    Ok(layouts
        .iter()
        .enumerate()
        .map(|(p, layout)| {
            (0..layout.bytes())
                .map(|i| (i.wrapping_mul(31) ^ (i >> 11) ^ (p * 85)) as u8)
                .collect()
        })
        .collect())
}

/// The header of message `index` of `size`.
fn spec(size: FrameSize, index: usize) -> FrameSpec {
    let (width, height) = size.dimensions();
    let mut spec = FrameSpec::new(PixelFormat::I420, width, height);
    spec.sequence = index as u64;
    spec.stream_id = 7;
    spec
}

/// Writes the pixels of message `index`: the patterns, and its markers at both ends of every
/// plane.
fn paint(
    writer: &mut FrameWriter<'_>,
    index: usize,
    patterns: &[Vec<u8>],
) -> Result<(), TransportBenchError> {
    for (p, pattern) in (0..writer.plane_count()).zip(patterns) {
        let plane = writer.plane_mut(p)?;
        plane.copy_from_slice(pattern);
        let p = p as usize;
        if let Some(first) = plane.first_mut() {
            *first = marker(index, p, false);
        }
        if let Some(last) = plane.last_mut() {
            *last = marker(index, p, true);
        }
    }
    Ok(())
}

impl FrameSet {
    /// Builds `count` frame messages of `size` in `region`, pixels written.
    pub(super) fn build(
        size: FrameSize,
        count: usize,
        region: &Region,
    ) -> Result<Self, TransportBenchError> {
        let patterns = patterns(size)?;
        let frame_bytes = patterns.iter().map(Vec::len).sum();
        let mut messages = Vec::with_capacity(count);
        let mut shapes = Vec::with_capacity(count);
        let mut wire = Vec::new();
        for index in 0..count {
            let mut message = Builder::new(StagingAllocator::new(region));
            let mut writer = FrameWriter::init(&mut message, &spec(size, index))?;
            paint(&mut writer, index, &patterns)?;
            let message = OutboundMessage::new(region, message, &FramingOptions::default())
                .map_err(|(e, _)| e)?;
            wire.clear();
            let mut points = Vec::new();
            for i in 0..message.entries().len() {
                let bytes = message
                    .entry_bytes(i)
                    .ok_or(TransportBenchError::Setup("an entry outside its region"))?;
                if let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) {
                    points.push((wire.len(), first));
                    points.push((wire.len() + bytes.len() - 1, last));
                }
                wire.extend_from_slice(bytes);
            }
            shapes.push(Shape {
                points,
                hash: hash(&wire),
            });
            messages.push(message);
        }
        let len = messages.first().map_or(0, OutboundMessage::total_len);
        if messages.iter().any(|m| m.total_len() != len) {
            return Err(TransportBenchError::Setup(
                "frame messages of one size differ in length",
            ));
        }
        Ok(Self {
            messages,
            frame_bytes,
            expect: Expect { shapes, len },
        })
    }

    /// The messages' bytes as plain vectors (what `raw-tcp` sends).
    pub(super) fn wire_copies(&self) -> Vec<Vec<u8>> {
        self.messages
            .iter()
            .map(|m| {
                (0..m.entries().len())
                    .filter_map(|i| m.entry_bytes(i))
                    .flatten()
                    .copied()
                    .collect()
            })
            .collect()
    }
}

/// The `shm` system's frames: one per slot of the target's grant, built there in place.
pub(super) struct InPlaceSet {
    /// Payload `i` is the message in slot `i` (at `base + i * stride`).
    pub(super) payloads: Vec<SlotPayload>,
    pub(super) expect: Expect,
}

impl InPlaceSet {
    /// The bytes a slot needs for a frame of `size`.
    pub(super) fn capacity(size: FrameSize) -> Result<u64, TransportBenchError> {
        Ok(SlotMessage::frame_capacity(&spec(size, 0))?)
    }

    /// Builds one frame message of `size` in each of `slots` slots of `region` (the writer's
    /// handle on the target's region), slot `i` at `base + i * stride`, pixels written.
    ///
    /// # Safety
    /// The slots lie in a grant the target holds for as long as the payloads live, are zeroed,
    /// and nobody else writes them; the target reads a slot only once a write to it has been
    /// announced.
    pub(super) unsafe fn build(
        size: FrameSize,
        region: &Region,
        base: u64,
        stride: u64,
        slots: usize,
    ) -> Result<Self, TransportBenchError> {
        let patterns = patterns(size)?;
        let capacity = Self::capacity(size)?;
        if capacity > stride {
            return Err(TransportBenchError::Setup("a frame does not fit its slot"));
        }
        let mut payloads = Vec::with_capacity(slots);
        let mut shapes = Vec::with_capacity(slots);
        for index in 0..slots {
            let offset = base + index as u64 * stride;
            // SAFETY: the caller's contract: the slot is zeroed and only this message writes
            // it, until it is finished and for as long as its payload lives.
            let mut message = unsafe { SlotMessage::new(region, offset, capacity) }?;
            // Where each piece (table + header, Y, U, V) starts in the framed message.
            let mut starts = Vec::with_capacity(4);
            {
                let slot = region.as_ptr() as usize + offset as usize;
                let mut writer = message.init_frame(&spec(size, index))?;
                paint(&mut writer, index, &patterns)?;
                starts.push(0);
                for p in 0..writer.plane_count() {
                    starts.push(writer.plane_mut(p)?.as_ptr() as usize - slot);
                }
            }
            if message.spilled_segments() != 0 {
                return Err(TransportBenchError::Setup("a frame outgrew its slot"));
            }
            // What `capnp::serialize` writes for this message: the slot must hold exactly it.
            let wire = capnp::serialize::write_message_to_words(message.builder());
            let payload = message.into_payload()?;
            let framed = payload.framed();
            // SAFETY: nothing writes the slot now (the message is finished, nothing is posted).
            let landed = unsafe { region.bytes(framed.offset, framed.len) }?;
            if framed.offset != offset || landed != wire.as_slice() {
                return Err(TransportBenchError::Setup(
                    "a frame built in place differs from its standard framing",
                ));
            }
            let mut points = Vec::with_capacity(2 * starts.len());
            let ends = starts.iter().skip(1).copied().chain([wire.len()]);
            for (start, end) in starts.iter().copied().zip(ends) {
                // A piece ends where the next starts: its last byte is the plane's end marker
                // (the planes of these sizes are whole words, so no padding follows them).
                points.push((start, wire[start]));
                points.push((end - 1, wire[end - 1]));
            }
            shapes.push(Shape {
                points,
                hash: hash(&wire),
            });
            payloads.push(payload);
        }
        Ok(Self {
            payloads,
            expect: Expect {
                shapes,
                len: capacity,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capnp_rdma::RegionOptions;

    #[test]
    fn consecutive_messages_differ_at_every_marker() {
        for index in 0..65 {
            for plane in 0..3 {
                for end in [false, true] {
                    assert_ne!(marker(index, plane, end), 0);
                    assert_ne!(marker(index, plane, end), marker(index + 1, plane, end));
                }
            }
        }
    }

    #[test]
    fn check_accepts_the_right_message_only() {
        let region = Region::create(&RegionOptions::memfd(64 << 20)).unwrap();
        let set = FrameSet::build(FrameSize::P720, 3, &region).unwrap();
        let copies = set.wire_copies();
        assert_eq!(copies[0].len() as u64, set.expect.len());
        assert!(set.frame_bytes < copies[0].len());
        for seq in 0..6u64 {
            let own = &copies[(seq % 3) as usize];
            set.expect.check(seq, own, true).unwrap();
            let other = &copies[((seq + 1) % 3) as usize];
            assert!(
                set.expect.check(seq, other, false).is_err(),
                "stale slot caught"
            );
        }
        let mut flipped = copies[1].clone();
        flipped[1000] ^= 1;
        set.expect.check(1, &flipped, false).unwrap();
        assert!(
            set.expect.check(1, &flipped, true).is_err(),
            "the hash sees the middle"
        );
        assert!(set.expect.check(1, &copies[1][1..], false).is_err());
    }

    /// In-place frames: slot `i` holds message `i`, checked like a copied one (its markers,
    /// its hash), and a neighbour's slot or a flipped byte fails.
    #[test]
    fn in_place_frames_check_like_copied_ones() {
        let region = Region::create(&RegionOptions::memfd(64 << 20)).unwrap();
        let stride = InPlaceSet::capacity(FrameSize::P720)
            .unwrap()
            .next_multiple_of(4096);
        let grant = region.lease(3 * stride).unwrap();
        // SAFETY: a fresh lease, held until the end of the test; only the set writes it.
        let set = unsafe { InPlaceSet::build(FrameSize::P720, &region, grant.offset(), stride, 3) }
            .unwrap();
        let len = set.expect.len();
        assert_eq!(set.payloads.len(), 3);
        let slot = |i: u64| {
            // SAFETY: nothing writes the slots after the build.
            unsafe { region.bytes(grant.offset() + i * stride, len) }
                .unwrap()
                .to_vec()
        };
        for seq in 0..6u64 {
            assert_eq!(
                set.payloads[(seq % 3) as usize].framed().offset,
                grant.offset() + (seq % 3) * stride
            );
            set.expect.check(seq, &slot(seq % 3), true).unwrap();
            assert!(set.expect.check(seq, &slot((seq + 1) % 3), false).is_err());
        }
        let mut flipped = slot(1);
        flipped[len as usize / 2] ^= 1;
        set.expect.check(1, &flipped, false).unwrap();
        assert!(set.expect.check(1, &flipped, true).is_err());
        // What lands is a frame, readable in place.
        let bytes = slot(2);
        let mut words = capnp::Word::allocate_zeroed_vec(bytes.len() / 8);
        capnp::Word::words_to_bytes_mut(&mut words).copy_from_slice(&bytes);
        let (message, _) = capnp_rdma::reader::read_frame(
            capnp::Word::words_to_bytes(&words),
            &Default::default(),
        )
        .unwrap();
        let view = capnp_rdma::frame::FrameView::new(&message).unwrap();
        assert_eq!(view.reader().get_sequence(), 2);
        assert_eq!(view.plane(0).unwrap()[0], marker(2, 0, false));
    }
}
