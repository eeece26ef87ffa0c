//! The frames every system sends, how a "decoder" produces them, and how the receiving side
//! proves it reached the right bytes.
//!
//! Each iteration the producer stamps a per-frame marker into the first and last byte of every
//! plane (six stores) wherever its decoder output lives; the receiver folds the first and last
//! byte of every plane, the plane lengths and the header's sequence number into a checksum that
//! must equal the one computed from the markers. Stale, zeroed or misplaced planes fail it.
//! Warm-up iterations also compare every byte of every plane.

use super::{BenchError, FrameSize, Variant};
use capnp_rdma::frame::{FrameSpec, PixelFormat};
use capnp_rdma_benches::Iteration;
use std::hint::black_box;

/// One pre-generated source frame (what the decoder would output), plus its header.
pub(crate) struct Source {
    pub(crate) size: FrameSize,
    pub(crate) spec: FrameSpec,
    pub(crate) planes: Vec<Vec<u8>>,
    pub(crate) frame_bytes: usize,
}

impl Source {
    /// An I420 frame of `size` filled with a deterministic, non-constant pattern.
    pub(crate) fn new(size: FrameSize) -> Result<Self, BenchError> {
        let (width, height) = size.dimensions();
        let mut spec = FrameSpec::new(PixelFormat::I420, width, height);
        spec.stream_id = 7;
        spec.pts_ticks = 3_003;
        let layouts = capnp_rdma::frame::plane_layouts(spec.format, width, height)?;
        let planes: Vec<Vec<u8>> = layouts
            .iter()
            .enumerate()
            .map(|(p, layout)| {
                (0..layout.bytes())
                    .map(|i| (i.wrapping_mul(31) ^ (i >> 11) ^ (p * 85)) as u8)
                    .collect()
            })
            .collect();
        let frame_bytes = planes.iter().map(Vec::len).sum();
        Ok(Self {
            size,
            spec,
            planes,
            frame_bytes,
        })
    }
}

/// The marker byte stamped at the start (`end == false`) or end of plane `plane` of frame
/// `seq`. Never zero, so a zeroed plane cannot pass.
pub(crate) fn marker(seq: u64, plane: usize, end: bool) -> u8 {
    let x = seq
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(plane as u64 * 2 + u64::from(end));
    ((x >> 32) % 255) as u8 + 1
}

/// What the decoder does for plane `plane` of frame `seq`, writing into `dst` (its output
/// buffer, wherever the system needs it): with pixels, copy the whole source plane; either
/// way stamp the frame's markers.
pub(crate) fn produce(variant: Variant, source: &[u8], dst: &mut [u8], plane: usize, seq: u64) {
    if variant == Variant::WithPixels {
        dst.copy_from_slice(source);
    }
    if let Some(first) = dst.first_mut() {
        *first = marker(seq, plane, false);
    }
    if let Some(last) = dst.last_mut() {
        *last = marker(seq, plane, true);
    }
}

fn fold(acc: u64, v: u64) -> u64 {
    (acc ^ v).wrapping_mul(0x0000_0100_0000_01B3)
}

/// Checksum of what a receiver reached: header sequence, plane lengths, first and last bytes.
pub(crate) fn checksum(sequence: u64, planes: &[&[u8]]) -> u64 {
    let mut acc = fold(0xCBF2_9CE4_8422_2325, sequence);
    for plane in planes {
        acc = fold(acc, plane.len() as u64);
        acc = fold(acc, u64::from(plane.first().copied().unwrap_or(0)));
        acc = fold(acc, u64::from(plane.last().copied().unwrap_or(0)));
    }
    acc
}

/// What [`checksum`] must return for frame `seq` of `source`.
pub(crate) fn expected_checksum(source: &Source, seq: u64) -> u64 {
    let mut acc = fold(0xCBF2_9CE4_8422_2325, seq);
    for (p, plane) in source.planes.iter().enumerate() {
        acc = fold(acc, plane.len() as u64);
        acc = fold(acc, u64::from(marker(seq, p, false)));
        acc = fold(acc, u64::from(marker(seq, p, true)));
    }
    acc
}

/// What the bytes between a plane's markers must be on the receiving side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Middle {
    /// The source frame's pixels.
    Source,
    /// Zero: nothing wrote them, and the allocator handed out zeroed memory.
    Zero,
}

/// The receiving side's check for one system and one (frame, variant).
pub(crate) struct Check<'a> {
    pub(crate) system: &'static str,
    pub(crate) source: &'a Source,
    pub(crate) variant: Variant,
}

impl Check<'_> {
    /// Folds what the receiver reached into a black-boxed checksum and compares it with the
    /// expected one; on warm-up iterations also compares every byte against `middle`.
    pub(crate) fn verify(
        &self,
        it: Iteration,
        sequence: u64,
        planes: &[&[u8]],
        middle: Middle,
    ) -> Result<(), BenchError> {
        let got = black_box(checksum(black_box(sequence), planes));
        let want = expected_checksum(self.source, it.seq);
        if got != want || planes.len() != self.source.planes.len() {
            return Err(self.mismatch(
                it,
                format!(
                    "checksum {got:#018x}, expected {want:#018x} (sequence read {sequence}, \
                     {} planes)",
                    planes.len()
                ),
            ));
        }
        if it.check_all {
            for (p, (got, src)) in planes.iter().zip(&self.source.planes).enumerate() {
                let inner = 1..src.len().saturating_sub(1);
                let ok = match middle {
                    Middle::Source => got.get(inner.clone()) == src.get(inner),
                    Middle::Zero => got[inner].iter().all(|&b| b == 0),
                };
                if !ok {
                    return Err(self.mismatch(it, format!("plane {p} pixels differ ({middle:?})")));
                }
            }
        }
        Ok(())
    }

    fn mismatch(&self, it: Iteration, what: String) -> BenchError {
        BenchError::Mismatch {
            system: self.system,
            frame: self.source.size.label(),
            variant: self.variant.label(),
            seq: it.seq,
            what,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn produce_then_checksum_matches_expected() {
        let source = Source::new(FrameSize::P720).unwrap();
        for variant in [Variant::PixelsReady, Variant::WithPixels] {
            let mut out: Vec<Vec<u8>> = source.planes.iter().map(|p| vec![0; p.len()]).collect();
            for (p, dst) in out.iter_mut().enumerate() {
                produce(variant, &source.planes[p], dst, p, 41);
            }
            let refs: Vec<&[u8]> = out.iter().map(Vec::as_slice).collect();
            assert_eq!(checksum(41, &refs), expected_checksum(&source, 41));
            assert_ne!(checksum(41, &refs), expected_checksum(&source, 42));
            let check = Check {
                system: "test",
                source: &source,
                variant,
            };
            let it = Iteration {
                seq: 41,
                check_all: true,
            };
            let middle = if variant == Variant::WithPixels {
                Middle::Source
            } else {
                Middle::Zero
            };
            check.verify(it, 41, &refs, middle).unwrap();
            assert!(check.verify(it, 40, &refs, middle).is_err());
        }
    }

    #[test]
    fn markers_are_never_zero() {
        for seq in 0..10_000 {
            for p in 0..3 {
                assert_ne!(marker(seq, p, false), 0);
                assert_ne!(marker(seq, p, true), 0);
            }
        }
    }
}
