//! Baseline `prost`: the frame as a Protocol Buffers message with `bytes` planes.
//!
//! The message types are derived by hand (no `protoc` at build time) and mirror
//! `schemas/frame.capnp` field for field:
//!
//! ```proto
//! syntax = "proto3";
//! package capnp_rdma.bench;
//!
//! enum PixelFormat {
//!   UNKNOWN = 0;
//!   I420 = 1;
//!   NV12 = 2;
//!   RGB24 = 3;
//!   GRAY8 = 4;
//! }
//!
//! message Plane {
//!   uint32 stride = 1;
//!   uint32 rows = 2;
//!   bytes data = 3;
//! }
//!
//! message MetadataEntry {
//!   string key = 1;
//!   bytes value = 2;
//! }
//!
//! message Frame {
//!   uint64 stream_id = 1;
//!   uint64 sequence = 2;
//!   int64 pts_ticks = 3;
//!   uint32 timebase_num = 4;
//!   uint32 timebase_den = 5;
//!   uint32 width = 6;
//!   uint32 height = 7;
//!   PixelFormat format = 8;
//!   repeated Plane planes = 9;
//!   repeated MetadataEntry metadata = 10;
//! }
//! ```
//!
//! Round trip: the producer copies each plane out of the decoder's buffer into the message
//! (`Vec<u8>`), `encode_to_vec` copies everything into the wire buffer, `Frame::decode` copies
//! each plane into a fresh `Vec<u8>`. All three copies are counted.

use super::pixels::{produce, Check, Middle, Source};
use super::{BenchError, Case, Variant};
use capnp_rdma_benches::{Iteration, Workload};
use prost::Message;

/// `PixelFormat` of the `.proto` above.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub(crate) enum PixelFormat {
    Unknown = 0,
    I420 = 1,
    Nv12 = 2,
    Rgb24 = 3,
    Gray8 = 4,
}

/// `Plane` of the `.proto` above.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Plane {
    #[prost(uint32, tag = "1")]
    pub(crate) stride: u32,
    #[prost(uint32, tag = "2")]
    pub(crate) rows: u32,
    #[prost(bytes = "vec", tag = "3")]
    pub(crate) data: Vec<u8>,
}

/// `MetadataEntry` of the `.proto` above.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct MetadataEntry {
    #[prost(string, tag = "1")]
    pub(crate) key: String,
    #[prost(bytes = "vec", tag = "2")]
    pub(crate) value: Vec<u8>,
}

/// `Frame` of the `.proto` above.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Frame {
    #[prost(uint64, tag = "1")]
    pub(crate) stream_id: u64,
    #[prost(uint64, tag = "2")]
    pub(crate) sequence: u64,
    #[prost(int64, tag = "3")]
    pub(crate) pts_ticks: i64,
    #[prost(uint32, tag = "4")]
    pub(crate) timebase_num: u32,
    #[prost(uint32, tag = "5")]
    pub(crate) timebase_den: u32,
    #[prost(uint32, tag = "6")]
    pub(crate) width: u32,
    #[prost(uint32, tag = "7")]
    pub(crate) height: u32,
    #[prost(enumeration = "PixelFormat", tag = "8")]
    pub(crate) format: i32,
    #[prost(message, repeated, tag = "9")]
    pub(crate) planes: Vec<Plane>,
    #[prost(message, repeated, tag = "10")]
    pub(crate) metadata: Vec<MetadataEntry>,
}

/// One (frame, variant) of the prost baseline.
pub(crate) struct ProstCase<'a> {
    check: Check<'a>,
    /// The decoder's output buffers, pre-filled with the source frame.
    decoded: Vec<Vec<u8>>,
    layouts: Vec<(u32, u32)>,
}

impl<'a> ProstCase<'a> {
    pub(crate) const NAME: &'static str = "prost";

    pub(crate) fn new(source: &'a Source, variant: Variant) -> Result<Self, BenchError> {
        let spec = &source.spec;
        let layouts = capnp_rdma::frame::plane_layouts(spec.format, spec.width, spec.height)?
            .iter()
            .map(|l| (l.stride, l.rows))
            .collect();
        Ok(Self {
            check: Check {
                system: Self::NAME,
                source,
                variant,
            },
            decoded: source.planes.clone(),
            layouts,
        })
    }
}

impl Workload for ProstCase<'_> {
    type Error = BenchError;

    fn iteration(&mut self, it: Iteration) -> Result<u64, BenchError> {
        let source = self.check.source;
        let spec = &source.spec;
        let mut copied = 0u64;
        for (p, dst) in self.decoded.iter_mut().enumerate() {
            produce(self.check.variant, &source.planes[p], dst, p, it.seq);
        }

        let planes = self
            .decoded
            .iter()
            .zip(&self.layouts)
            .map(|(pixels, &(stride, rows))| {
                copied += pixels.len() as u64;
                Plane {
                    stride,
                    rows,
                    data: pixels.clone(),
                }
            })
            .collect();
        let frame = Frame {
            stream_id: spec.stream_id,
            sequence: it.seq,
            pts_ticks: spec.pts_ticks,
            timebase_num: spec.timebase.0,
            timebase_den: spec.timebase.1,
            width: spec.width,
            height: spec.height,
            format: PixelFormat::I420 as i32,
            planes,
            metadata: Vec::new(),
        };
        let wire = frame.encode_to_vec();
        copied += wire.len() as u64;

        let received = Frame::decode(&wire[..])?;
        let mut reached: [&[u8]; 4] = [&[]; 4];
        let count = received.planes.len().min(reached.len());
        for (slot, plane) in reached.iter_mut().zip(&received.planes) {
            *slot = &plane.data;
            copied += plane.data.len() as u64;
        }
        self.check
            .verify(it, received.sequence, &reached[..count], Middle::Source)?;
        drop(received);
        drop(wire);
        drop(frame);
        Ok(copied)
    }
}

impl Case for ProstCase<'_> {}
