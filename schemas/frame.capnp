# Media frames as they travel between pipeline operators.
#
# A frame's pixel planes are `Data` fields. With capnp-rdma's StagingAllocator each plane lands in a
# segment of its own, sized exactly, inside a shared staging region: the producer writes pixels straight
# into that segment and the transport sends the segments as one scatter-gather list. What arrives is
# ordinary Cap'n Proto stream framing, readable by any Cap'n Proto implementation with this schema.

@0xc95bbb95e6288e22;

enum PixelFormat {
  unknown @0;
  i420 @1;    # planar Y, U, V; chroma subsampled 2x2 (4:2:0)
  nv12 @2;    # planar Y, then interleaved UV; chroma subsampled 2x2
  rgb24 @3;   # packed R, G, B; one plane
  gray8 @4;   # luma only; one plane
}

struct Plane {
  stride @0 :UInt32;  # bytes from the start of one row to the start of the next
  rows @1 :UInt32;    # number of rows in this plane
  data @2 :Data;      # stride * rows bytes
}

struct MetadataEntry {
  key @0 :Text;
  value @1 :Data;
}

struct Frame {
  streamId @0 :UInt64;
  sequence @1 :UInt64;            # per stream, increasing by one per frame
  ptsTicks @2 :Int64;             # presentation timestamp in `timebase` units
  timebaseNum @3 :UInt32 = 1;     # timebase = num / den seconds
  timebaseDen @4 :UInt32 = 90000;
  width @5 :UInt32;
  height @6 :UInt32;
  format @7 :PixelFormat;
  planes @8 :List(Plane);
  metadata @9 :List(MetadataEntry);
}
