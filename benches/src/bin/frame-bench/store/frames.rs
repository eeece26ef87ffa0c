//! The frame every system carries, built once before the clock, and the consumer's check.
//!
//! One I420 `Frame` message per frame size, built as the staging path builds it (a
//! [`StagingAllocator`] over a region: the header segment, then one exactly-sized segment per
//! plane) and copied out as standard Cap'n Proto stream framing into 8-byte aligned memory:
//! the segment table, then the segments. Every plane holds a pattern and a marker in its first
//! and last byte. A producer stamps frame `seq`'s sequence number (u64 little-endian) into the
//! first 8 bytes of plane 0 (Y), at [`FrameTemplate::stamp_offset`] in the framed bytes, so a
//! store that hands back a stale or another frame fails the check.
//!
//! The consumer's check ([`FrameTemplate::check`]) reads the frame in place with
//! [`read_frame`], requires every plane at the offset the producer wrote it, the stamp, and the
//! first and last byte of every plane; with `full` it also compares every byte outside the
//! stamp with the template (a memcmp: a 4K frame costs about a millisecond).

use super::StoreBenchError;
use crate::roundtrip::FrameSize;
use capnp::message::Builder;
use capnp::Word;
use capnp_rdma::frame::{FrameSpec, FrameView, FrameWriter, PixelFormat};
use capnp_rdma::framing::{FramingOptions, OutboundMessage};
use capnp_rdma::reader::{read_frame, ReadOptions};
use capnp_rdma::{Region, RegionOptions, StagingAllocator};
use std::ops::Range;

/// Bytes of the sequence stamp at the start of plane 0.
pub(crate) const STAMP_BYTES: usize = 8;

/// The framed message of one frame size, and where its planes are.
#[derive(Debug)]
pub(crate) struct FrameTemplate {
    /// The framed message (segment table + segments), 8-byte aligned; plane 0 starts with
    /// the stamp of frame 0.
    words: Vec<Word>,
    /// Byte range of each plane's pixels in the framed bytes.
    planes: Vec<Range<usize>>,
    /// Pixel bytes of one frame (the three planes).
    frame_bytes: usize,
    read_options: ReadOptions,
}

/// The marker at the start (`end == false`) or end of plane `plane`: never zero.
fn marker(plane: usize, end: bool) -> u8 {
    0xA1 + (plane * 2 + usize::from(end)) as u8
}

impl FrameTemplate {
    /// Builds the frame of `size`.
    pub(crate) fn build(size: FrameSize) -> Result<Self, StoreBenchError> {
        let (width, height) = size.dimensions();
        let frame_bytes = capnp_rdma::frame::frame_bytes(PixelFormat::I420, width, height)?;
        let region = Region::create(&RegionOptions::memfd(frame_bytes as u64 + (16 << 20)))?;
        let mut message = Builder::new(StagingAllocator::new(&region));
        let mut spec = FrameSpec::new(PixelFormat::I420, width, height);
        spec.stream_id = 7;
        let mut writer = FrameWriter::init(&mut message, &spec)?;
        for p in 0..writer.plane_count() {
            let plane = writer.plane_mut(p)?;
            let k = p as usize * 85;
            for (i, byte) in plane.iter_mut().enumerate() {
                *byte = (i.wrapping_mul(31) ^ (i >> 11) ^ k) as u8;
            }
            if let Some(first) = plane.first_mut() {
                *first = marker(p as usize, false);
            }
            if let Some(last) = plane.last_mut() {
                *last = marker(p as usize, true);
            }
        }
        let message = OutboundMessage::new(&region, message, &FramingOptions::default())
            .map_err(|(e, _)| e)?;
        let len = usize::try_from(message.total_len())
            .map_err(|_| StoreBenchError::Setup("a frame message larger than memory"))?;
        if len % 8 != 0 {
            return Err(StoreBenchError::Setup("a framed message of a partial word"));
        }
        let mut words = Word::allocate_zeroed_vec(len / 8);
        let bytes = Word::words_to_bytes_mut(&mut words);
        let mut at = 0;
        for i in 0..message.entries().len() {
            let entry = message
                .entry_bytes(i)
                .ok_or(StoreBenchError::Setup("an entry outside its region"))?;
            bytes
                .get_mut(at..at + entry.len())
                .ok_or(StoreBenchError::Setup("entries longer than the message"))?
                .copy_from_slice(entry);
            at += entry.len();
        }
        drop(message);

        // Where the planes are, as a reader finds them.
        let words_of_message = (len / 8) as u64;
        let mut read_options = ReadOptions::new();
        // The checks read every plane a few times (read_frame, FrameView, the planes): allow
        // eight times the message, at least the automatic floor; 4K frames need it.
        read_options.traversal_limit_words = Some(
            capnp_rdma::reader::AUTO_TRAVERSAL_FLOOR_WORDS.max(words_of_message.saturating_mul(8)),
        );
        let bytes = Word::words_to_bytes(&words);
        let planes = {
            let (reader, read_len) = read_frame(bytes, &read_options)?;
            if read_len != len {
                return Err(StoreBenchError::Setup("the framed message reads short"));
            }
            let view = FrameView::new(&reader)?;
            let mut planes = Vec::new();
            for p in 0..view.plane_count()? {
                planes.push(
                    place(bytes, view.plane(p)?)
                        .ok_or(StoreBenchError::Setup("a plane outside the framed message"))?,
                );
            }
            planes
        };
        if planes.first().is_none_or(|y| y.len() < STAMP_BYTES) {
            return Err(StoreBenchError::Setup("plane 0 shorter than the stamp"));
        }
        let mut template = Self {
            words,
            planes,
            frame_bytes,
            read_options,
        };
        let mut bytes = template.copy();
        template.stamp(Word::words_to_bytes_mut(&mut bytes), 0)?;
        template.words = bytes;
        Ok(template)
    }

    /// The framed message (stamped with frame 0).
    pub(crate) fn bytes(&self) -> &[u8] {
        Word::words_to_bytes(&self.words)
    }

    /// A copy of the framed message in new 8-byte aligned memory: a producer's buffer.
    pub(crate) fn copy(&self) -> Vec<Word> {
        self.words.clone()
    }

    /// Bytes of the framed message (what a store carries per frame).
    pub(crate) fn wire_len(&self) -> usize {
        self.words.len() * 8
    }

    /// Pixel bytes of one frame.
    pub(crate) fn frame_bytes(&self) -> usize {
        self.frame_bytes
    }

    /// Byte offset of the stamp (the first byte of plane 0) in the framed message.
    pub(crate) fn stamp_offset(&self) -> usize {
        self.planes[0].start
    }

    /// Stamps `seq` into `message`, a copy of the framed message.
    pub(crate) fn stamp(&self, message: &mut [u8], seq: u64) -> Result<(), StoreBenchError> {
        let at = self.stamp_offset();
        message
            .get_mut(at..at + STAMP_BYTES)
            .ok_or(StoreBenchError::Setup(
                "stamping a message shorter than the frame",
            ))?
            .copy_from_slice(&seq.to_le_bytes());
        Ok(())
    }

    /// Checks that `landed` (8-byte aligned) is frame `seq`: read in place with `read_frame`,
    /// every plane where the producer wrote it, the stamp, the first and last byte of every
    /// plane; with `full`, every byte outside the stamp. Says what differs.
    pub(crate) fn check(&self, landed: &[u8], seq: u64, full: bool) -> Result<(), String> {
        if landed.len() != self.wire_len() {
            return Err(format!(
                "{} bytes arrived, the frame has {}",
                landed.len(),
                self.wire_len()
            ));
        }
        let (reader, read_len) =
            read_frame(landed, &self.read_options).map_err(|e| format!("read_frame: {e}"))?;
        if read_len != landed.len() {
            return Err(format!(
                "the message is {read_len} bytes of {}",
                landed.len()
            ));
        }
        let view = FrameView::new(&reader).map_err(|e| format!("frame view: {e}"))?;
        let count = view.plane_count().map_err(|e| format!("planes: {e}"))?;
        if count as usize != self.planes.len() {
            return Err(format!("{count} planes, sent {}", self.planes.len()));
        }
        let expect = self.bytes();
        for (p, range) in (0..count).zip(&self.planes) {
            let plane = view.plane(p).map_err(|e| format!("plane {p}: {e}"))?;
            if place(landed, plane).as_ref() != Some(range) {
                return Err(format!(
                    "plane {p} is not at bytes {}..{} of the message",
                    range.start, range.end
                ));
            }
            let (first, last) = (range.start, range.end - 1);
            for at in [first, last] {
                if p == 0 && at < first + STAMP_BYTES {
                    continue;
                }
                if landed[at] != expect[at] {
                    return Err(format!(
                        "byte {at} (plane {p}) is {:#04x}, sent {:#04x}",
                        landed[at], expect[at]
                    ));
                }
            }
        }
        let at = self.stamp_offset();
        let mut stamp = [0u8; STAMP_BYTES];
        stamp.copy_from_slice(&landed[at..at + STAMP_BYTES]);
        let stamp = u64::from_le_bytes(stamp);
        if stamp != seq {
            return Err(format!("plane 0 is stamped {stamp}, expected {seq}"));
        }
        if full {
            let after = at + STAMP_BYTES;
            if landed[..at] != expect[..at] || landed[after..] != expect[after..] {
                let differs = (0..landed.len())
                    .find(|&i| !(at..after).contains(&i) && landed[i] != expect[i])
                    .unwrap_or(0);
                return Err(format!("byte {differs} differs from what was sent"));
            }
        }
        Ok(())
    }
}

/// Where `part` lies inside `whole`, if it does.
fn place(whole: &[u8], part: &[u8]) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= whole.len()).then_some(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_is_a_readable_framed_frame() {
        let t = FrameTemplate::build(FrameSize::P1080).unwrap();
        assert_eq!(t.frame_bytes(), 3_110_400);
        assert!(t.wire_len() > t.frame_bytes() && t.wire_len() < t.frame_bytes() + 8192);
        assert_eq!(t.bytes().as_ptr() as usize % 8, 0);
        assert_eq!(t.planes.iter().map(|p| p.len()).sum::<usize>(), 3_110_400);
        // Standard stream framing: what capnp's own reader reads.
        let mut slice = t.bytes();
        let message =
            capnp::serialize::read_message_from_flat_slice(&mut slice, Default::default());
        assert!(message.is_ok());
        t.check(t.bytes(), 0, true).unwrap();
    }

    #[test]
    fn check_catches_wrong_stamps_and_bytes() {
        let t = FrameTemplate::build(FrameSize::P720).unwrap();
        let mut words = t.copy();
        let bytes = Word::words_to_bytes_mut(&mut words);
        t.stamp(bytes, 41).unwrap();
        t.check(bytes, 41, true).unwrap();
        assert!(t
            .check(bytes, 42, false)
            .unwrap_err()
            .contains("stamped 41"));

        let last_of_v = t.planes[2].end - 1;
        bytes[last_of_v] ^= 1;
        assert!(t.check(bytes, 41, false).is_err(), "last byte of a plane");
        bytes[last_of_v] ^= 1;

        let middle = t.planes[1].start + 1000;
        bytes[middle] ^= 0x10;
        t.check(bytes, 41, false).unwrap(); // the cheap check does not look there
        let err = t.check(bytes, 41, true).unwrap_err();
        assert!(err.contains(&format!("byte {middle}")), "{err}");
        bytes[middle] ^= 0x10;

        // A broken segment table is a read error, not a panic; so is a short message.
        bytes[0] = 0xff;
        assert!(t
            .check(bytes, 41, false)
            .unwrap_err()
            .contains("read_frame"));
        assert!(t.check(&bytes[..bytes.len() - 8], 41, false).is_err());
    }
}
