//! Media frames: the generated `Frame` types plus helpers that lay out planes by pixel format.
//!
//! A producer describes the frame with a [`FrameSpec`], [`FrameWriter::init`] creates the message
//! with every plane allocated (and, with a [`StagingAllocator`](crate::StagingAllocator), each
//! plane in its own exactly-sized segment of the staging region), and the producer writes pixels
//! straight into [`FrameWriter::plane_mut`]. No pixel is copied afterwards.
//!
//! ```
//! use capnp_rdma::frame::{FrameSpec, FrameWriter, PixelFormat};
//!
//! let mut message = capnp::message::Builder::new_default();
//! let spec = FrameSpec::new(PixelFormat::I420, 64, 48);
//! let mut frame = FrameWriter::init(&mut message, &spec).unwrap();
//! frame.plane_mut(0).unwrap().fill(0x80); // luma
//! assert_eq!(frame.plane_mut(1).unwrap().len(), 32 * 24);
//! ```

pub use crate::frame_capnp::PixelFormat;
use crate::frame_capnp::{frame, plane};
use capnp::message::{Allocator, Builder};

/// The geometry of one plane: bytes per row and number of rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlaneLayout {
    /// Bytes from the start of one row to the start of the next.
    pub stride: u32,
    /// Number of rows.
    pub rows: u32,
}

impl PlaneLayout {
    /// Size of the plane in bytes.
    pub fn bytes(&self) -> usize {
        self.stride as usize * self.rows as usize
    }
}

/// Why a frame could not be laid out or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The pixel format has no defined plane layout.
    #[error("pixel format {0:?} has no plane layout")]
    UnknownFormat(PixelFormat),
    /// Width or height is zero, odd where chroma subsampling needs even, or too large.
    #[error("invalid frame geometry {width}x{height} for {format:?}")]
    BadGeometry {
        /// Requested width in pixels.
        width: u32,
        /// Requested height in pixels.
        height: u32,
        /// Requested format.
        format: PixelFormat,
    },
    /// The plane index is past the format's plane count.
    #[error("plane {index} out of range: the frame has {count} planes")]
    NoSuchPlane {
        /// Requested plane.
        index: u32,
        /// Planes the frame has.
        count: u32,
    },
    /// The message does not hold a well-formed frame.
    #[error("malformed frame message: {0}")]
    Capnp(#[from] capnp::Error),
}

/// Largest plane a single Cap'n Proto `Data` field can hold (2^29 - 1 bytes).
pub const MAX_PLANE_BYTES: usize = (1 << 29) - 1;

/// The planes of a frame: at most three, stored inline (no heap allocation per frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlaneLayouts {
    planes: [PlaneLayout; 3],
    count: usize,
}

impl PlaneLayouts {
    fn new(planes: &[PlaneLayout]) -> Self {
        let mut out = Self {
            planes: [PlaneLayout { stride: 0, rows: 0 }; 3],
            count: planes.len(),
        };
        out.planes[..planes.len()].copy_from_slice(planes);
        out
    }
}

impl std::ops::Deref for PlaneLayouts {
    type Target = [PlaneLayout];

    fn deref(&self) -> &[PlaneLayout] {
        &self.planes[..self.count]
    }
}

impl<'a> IntoIterator for &'a PlaneLayouts {
    type Item = &'a PlaneLayout;
    type IntoIter = std::slice::Iter<'a, PlaneLayout>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Plane layouts of a `width` x `height` frame in `format` (tightly packed rows).
pub fn plane_layouts(
    format: PixelFormat,
    width: u32,
    height: u32,
) -> Result<PlaneLayouts, FrameError> {
    let bad = || FrameError::BadGeometry {
        width,
        height,
        format,
    };
    if width == 0 || height == 0 {
        return Err(bad());
    }
    let subsampled = matches!(format, PixelFormat::I420 | PixelFormat::Nv12);
    if subsampled && (width % 2 != 0 || height % 2 != 0) {
        return Err(bad());
    }
    let plane = |stride, rows| PlaneLayout { stride, rows };
    let layouts = match format {
        PixelFormat::I420 => PlaneLayouts::new(&[
            plane(width, height),
            plane(width / 2, height / 2),
            plane(width / 2, height / 2),
        ]),
        PixelFormat::Nv12 => PlaneLayouts::new(&[plane(width, height), plane(width, height / 2)]),
        PixelFormat::Rgb24 => {
            PlaneLayouts::new(&[plane(width.checked_mul(3).ok_or_else(bad)?, height)])
        }
        PixelFormat::Gray8 => PlaneLayouts::new(&[plane(width, height)]),
        PixelFormat::Unknown => return Err(FrameError::UnknownFormat(format)),
    };
    if layouts.iter().any(|p| p.bytes() > MAX_PLANE_BYTES) {
        return Err(bad());
    }
    Ok(layouts)
}

/// Total bytes of pixel data in a frame of this geometry.
pub fn frame_bytes(format: PixelFormat, width: u32, height: u32) -> Result<usize, FrameError> {
    Ok(plane_layouts(format, width, height)?
        .iter()
        .map(PlaneLayout::bytes)
        .sum())
}

/// Everything about a frame except its pixels.
#[derive(Clone, Debug)]
pub struct FrameSpec {
    /// Stream this frame belongs to.
    pub stream_id: u64,
    /// Sequence number within the stream.
    pub sequence: u64,
    /// Presentation timestamp in timebase units.
    pub pts_ticks: i64,
    /// Timebase as (numerator, denominator) seconds.
    pub timebase: (u32, u32),
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Pixel format.
    pub format: PixelFormat,
    /// Key/value metadata.
    pub metadata: Vec<(String, Vec<u8>)>,
}

impl FrameSpec {
    /// A frame of the given geometry with stream 0, sequence 0, pts 0, a 90 kHz timebase.
    pub fn new(format: PixelFormat, width: u32, height: u32) -> Self {
        Self {
            stream_id: 0,
            sequence: 0,
            pts_ticks: 0,
            timebase: (1, 90_000),
            width,
            height,
            format,
            metadata: Vec::new(),
        }
    }
}

/// A frame being built: its header is set and every plane is allocated (zeroed) in the message.
pub struct FrameWriter<'a> {
    frame: frame::Builder<'a>,
    planes: u32,
}

impl<'a> FrameWriter<'a> {
    /// Initializes `message`'s root as a frame described by `spec`, allocating every plane.
    ///
    /// The header and metadata are written before the planes, so that with a
    /// [`StagingAllocator`](crate::StagingAllocator) they share the first segment and each plane
    /// gets an exactly-sized segment of its own.
    pub fn init<A: Allocator>(
        message: &'a mut Builder<A>,
        spec: &FrameSpec,
    ) -> Result<Self, FrameError> {
        let layouts = plane_layouts(spec.format, spec.width, spec.height)?;
        let mut frame: frame::Builder<'a> = message.init_root();
        frame.set_stream_id(spec.stream_id);
        frame.set_sequence(spec.sequence);
        frame.set_pts_ticks(spec.pts_ticks);
        frame.set_timebase_num(spec.timebase.0);
        frame.set_timebase_den(spec.timebase.1);
        frame.set_width(spec.width);
        frame.set_height(spec.height);
        frame.set_format(spec.format);
        let count = u32::try_from(spec.metadata.len()).map_err(|_| FrameError::BadGeometry {
            width: spec.width,
            height: spec.height,
            format: spec.format,
        })?;
        {
            let mut meta = frame.reborrow().init_metadata(count);
            for (i, (key, value)) in (0..count).zip(&spec.metadata) {
                let mut entry = meta.reborrow().get(i);
                entry.set_key(key.as_str());
                entry.set_value(value);
            }
        }
        let count = layouts.len() as u32; // at most 3 planes
        let mut planes = frame.reborrow().init_planes(count);
        for (i, layout) in (0..count).zip(&layouts) {
            let mut plane: plane::Builder<'_> = planes.reborrow().get(i);
            plane.set_stride(layout.stride);
            plane.set_rows(layout.rows);
            // `bytes()` is bounded by MAX_PLANE_BYTES above, so it fits in u32.
            plane.init_data(layout.bytes() as u32);
        }
        Ok(Self {
            frame,
            planes: count,
        })
    }

    /// Number of planes in the frame.
    pub fn plane_count(&self) -> u32 {
        self.planes
    }

    /// The pixels of plane `index`, inside the message's segment: write them here.
    pub fn plane_mut(&mut self, index: u32) -> Result<&mut [u8], FrameError> {
        if index >= self.planes {
            return Err(FrameError::NoSuchPlane {
                index,
                count: self.planes,
            });
        }
        Ok(self.frame.reborrow().get_planes()?.get(index).get_data()?)
    }

    /// The underlying generated builder, for fields the helpers do not cover.
    pub fn builder(&mut self) -> frame::Builder<'_> {
        self.frame.reborrow()
    }
}

/// A read-only view of a received frame's header and planes.
pub struct FrameView<'a> {
    frame: frame::Reader<'a>,
}

impl<'a> FrameView<'a> {
    /// Reads the root of `message` as a frame and checks that every plane's data covers
    /// `stride * rows` bytes.
    pub fn new<S: capnp::message::ReaderSegments>(
        message: &'a capnp::message::Reader<S>,
    ) -> Result<Self, FrameError> {
        let frame: frame::Reader<'a> = message.get_root()?;
        Self::from_reader(frame)
    }

    /// Wraps an already-obtained frame reader, with the same checks as [`FrameView::new`].
    pub fn from_reader(frame: frame::Reader<'a>) -> Result<Self, FrameError> {
        for plane in frame.get_planes()?.iter() {
            let want = plane.get_stride() as usize * plane.get_rows() as usize;
            if plane.get_data()?.len() < want {
                return Err(FrameError::Capnp(capnp::Error::failed(format!(
                    "plane data holds {} bytes, stride*rows needs {want}",
                    plane.get_data()?.len()
                ))));
            }
        }
        Ok(Self { frame })
    }

    /// The generated reader.
    pub fn reader(&self) -> frame::Reader<'a> {
        self.frame
    }

    /// Number of planes.
    pub fn plane_count(&self) -> Result<u32, FrameError> {
        Ok(self.frame.get_planes()?.len())
    }

    /// The bytes of plane `index`, read in place.
    pub fn plane(&self, index: u32) -> Result<&'a [u8], FrameError> {
        let planes = self.frame.get_planes()?;
        if index >= planes.len() {
            return Err(FrameError::NoSuchPlane {
                index,
                count: planes.len(),
            });
        }
        Ok(planes.get(index).get_data()?)
    }
}
