//! The transport conformance suite: the same behaviour demanded of every backend.
//!
//! A backend test file implements [`Backend`] and calls [`run_all`].

#![allow(dead_code, unreachable_pub)]

use capnp_rdma::frame::{FrameSpec, FrameView, FrameWriter, PixelFormat};
use capnp_rdma::framing::{FramingOptions, OutboundMessage, SgeOverflow};
use capnp_rdma::reader::{read_framed, ReadOptions};
use capnp_rdma::transport::{Completion, Incoming, Target, TransportError, Writer};
use capnp_rdma::{BlockLease, Region, RegionOptions, StagingAllocator};
use std::time::Duration;

/// How a backend makes a connected (writer, target) pair.
#[allow(async_fn_in_trait)]
pub trait Backend {
    type W: Writer<Payload = OutboundMessage>;
    type T: Target;
    /// Connects a writer whose payloads come from `local` to a target granting `lease`.
    async fn connect(&self, local: &Region, lease: BlockLease, window: u32) -> (Self::W, Self::T);
}

pub fn region(mb: u64) -> Region {
    Region::create(&RegionOptions::memfd(mb << 20).block_size(64 << 10)).unwrap()
}

/// A frame message of the given geometry, every plane byte a function of (seq, plane, index).
pub fn frame(
    region: &Region,
    seq: u64,
    width: u32,
    height: u32,
    options: &FramingOptions,
) -> OutboundMessage {
    let mut message = capnp::message::Builder::new(StagingAllocator::new(region));
    let mut spec = FrameSpec::new(PixelFormat::I420, width, height);
    spec.sequence = seq;
    let mut w = FrameWriter::init(&mut message, &spec).unwrap();
    for p in 0..3 {
        for (i, b) in w.plane_mut(p).unwrap().iter_mut().enumerate() {
            *b = pattern(seq, p, i);
        }
    }
    OutboundMessage::new(region, message, options)
        .map_err(|(e, _)| e)
        .unwrap()
}

pub fn pattern(seq: u64, plane: u32, i: usize) -> u8 {
    (i as u64)
        .wrapping_mul(7)
        .wrapping_add(seq * 13 + u64::from(plane) * 101) as u8
}

pub fn bytes_of(message: &OutboundMessage) -> Vec<u8> {
    (0..message.entries().len())
        .flat_map(|i| message.entry_bytes(i).unwrap().to_vec())
        .collect()
}

/// The bytes the test wrote to `offset` (`len` of them), as they are in the target's region.
/// Where the transport reports the landing place, it must be exactly that.
pub fn landed<T: Target>(target: &T, incoming: &Incoming, offset: u64, len: usize) -> Vec<u8> {
    if let Some(at) = incoming.at {
        assert_eq!(
            (at.offset, at.len),
            (offset, len as u64),
            "reported landing place"
        );
    }
    // SAFETY: the conformance tests never write a range again before reading it back.
    unsafe { target.region().bytes(offset, len as u64) }
        .unwrap()
        .to_vec()
}

pub async fn wait_incoming<T: Target>(target: &mut T, n: usize) -> Vec<Incoming> {
    let mut out = Vec::new();
    while out.len() < n {
        tokio::time::timeout(Duration::from_secs(60), target.incoming(&mut out))
            .await
            .expect("incoming timed out")
            .expect("incoming failed");
    }
    out
}

pub async fn drain<W: Writer>(writer: &mut W) -> Vec<Completion<W::Payload>> {
    let mut out = Vec::new();
    while writer.in_flight() > 0 {
        tokio::time::timeout(Duration::from_secs(60), writer.completions(&mut out))
            .await
            .expect("completions timed out")
            .unwrap();
    }
    out
}

/// Writes land in order with their immediates, byte for byte, and read back as frames in place.
pub async fn ordering_and_immediates<B: Backend>(b: &B) {
    let local = region(64);
    let remote = region(64);
    let lease = remote.lease(32 << 20).unwrap();
    let base = lease.offset();
    let (mut w, mut t) = b.connect(&local, lease, 8).await;
    let opts = FramingOptions::default();
    let sizes = [(64u32, 48u32), (320, 240), (2, 2), (640, 360), (1280, 720)];
    let mut expected = Vec::new();
    let mut offset = base;
    for (seq, &(width, height)) in sizes.iter().enumerate() {
        let msg = frame(&local, seq as u64, width, height, &opts);
        expected.push((offset, bytes_of(&msg)));
        let len = msg.total_len();
        w.post_write(msg, offset, 1000 + seq as u32)
            .map_err(|e| e.error)
            .unwrap();
        offset += len.next_multiple_of(64);
    }
    let done = drain(&mut w).await;
    assert_eq!(done.len(), sizes.len());
    for (i, c) in done.iter().enumerate() {
        assert_eq!(c.id, done[0].id + i as u64, "completions in posting order");
        assert!(c.status.is_ok(), "{:?}", c.status);
    }
    let got = wait_incoming(&mut t, sizes.len()).await;
    for (seq, (inc, (off, bytes))) in got.iter().zip(&expected).enumerate() {
        assert_eq!(inc.imm, 1000 + seq as u32);
        let landed = landed(&t, inc, *off, bytes.len());
        assert!(landed == *bytes, "write {seq} landed different bytes");
        // Read in place from the target's region, as a consumer would.
        // SAFETY: nothing writes this range while we read it.
        let in_place = unsafe { t.region().bytes(*off, bytes.len() as u64) }.unwrap();
        let (reader, used) = read_framed(in_place, &ReadOptions::default()).unwrap();
        assert_eq!(used, bytes.len());
        let view = FrameView::new(&reader).unwrap();
        assert_eq!(view.reader().get_sequence(), seq as u64);
        let y = view.plane(0).unwrap();
        assert_eq!(y[y.len() - 1], pattern(seq as u64, 0, y.len() - 1));
    }
}

/// At most `window` writes in flight; the one past it comes back with its payload.
pub async fn window_is_enforced<B: Backend>(b: &B) {
    let local = region(32);
    let remote = region(32);
    let lease = remote.lease(8 << 20).unwrap();
    let base = lease.offset();
    let (mut w, mut t) = b.connect(&local, lease, 4).await;
    assert_eq!(w.window(), 4);
    let opts = FramingOptions::default();
    for i in 0..4u64 {
        let msg = frame(&local, i, 320, 240, &opts);
        w.post_write(msg, base + i * (1 << 20), i as u32)
            .map_err(|e| e.error)
            .unwrap();
    }
    let extra = frame(&local, 9, 320, 240, &opts);
    let entries = extra.entries().to_vec();
    let err = w.post_write(extra, base, 9).unwrap_err();
    assert!(
        matches!(err.error, TransportError::WindowFull(4)),
        "{:?}",
        err.error
    );
    assert_eq!(
        err.payload.entries(),
        &entries[..],
        "the payload comes back untouched"
    );
    let done = drain(&mut w).await;
    assert_eq!(done.len(), 4);
    wait_incoming(&mut t, 4).await;
    // Room again.
    w.post_write(err.payload, base, 9)
        .map_err(|e| e.error)
        .unwrap();
    assert_eq!(drain(&mut w).await.len(), 1);
    assert_eq!(wait_incoming(&mut t, 1).await[0].imm, 9);
}

/// A 4K frame (12 MB) and a one-word message.
pub async fn large_and_tiny<B: Backend>(b: &B) {
    let local = region(64);
    let remote = region(64);
    let lease = remote.lease(16 << 20).unwrap();
    let base = lease.offset();
    let (mut w, mut t) = b.connect(&local, lease, 2).await;
    let big = frame(&local, 1, 3840, 2160, &FramingOptions::default());
    let big_bytes = bytes_of(&big);
    let mut tiny = capnp::message::Builder::new(StagingAllocator::new(&local));
    tiny.init_root::<capnp::any_pointer::Builder>().clear();
    let tiny = OutboundMessage::new(&local, tiny, &FramingOptions::default())
        .map_err(|(e, _)| e)
        .unwrap();
    let tiny_bytes = bytes_of(&tiny);
    assert_eq!(tiny_bytes.len(), 16, "segment table + one root word");
    w.post_write(big, base, 1).map_err(|e| e.error).unwrap();
    let tiny_at = base + (14 << 20);
    w.post_write(tiny, tiny_at, 2).map_err(|e| e.error).unwrap();
    assert!(drain(&mut w).await.iter().all(|c| c.status.is_ok()));
    let got = wait_incoming(&mut t, 2).await;
    assert!(landed(&t, &got[0], base, big_bytes.len()) == big_bytes);
    assert_eq!(landed(&t, &got[1], tiny_at, tiny_bytes.len()), tiny_bytes);
}

/// A message with more entries than any NIC takes in one work request.
pub async fn many_entries<B: Backend>(b: &B) {
    let local = Region::create(&RegionOptions::memfd(32 << 20).block_size(4096)).unwrap();
    let remote = region(32);
    let lease = remote.lease(8 << 20).unwrap();
    let base = lease.offset();
    let (mut w, mut t) = b.connect(&local, lease, 2).await;
    let mut message = capnp::message::Builder::new(StagingAllocator::with_options(
        &local,
        capnp_rdma::AllocatorOptions {
            large_segment_bytes: 1024,
            ..Default::default()
        },
    ));
    let mut list = message.initn_root::<capnp::data_list::Builder>(70);
    for i in 0..70u32 {
        list.set(i, &vec![i as u8; 3000]);
    }
    let opts = FramingOptions {
        max_sge: 100,
        overflow: SgeOverflow::Error,
        ..Default::default()
    };
    let msg = OutboundMessage::new(&local, message, &opts)
        .map_err(|(e, _)| e)
        .unwrap();
    assert!(msg.entries().len() > 64, "{} entries", msg.entries().len());
    let bytes = bytes_of(&msg);
    w.post_write(msg, base, 7).map_err(|e| e.error).unwrap();
    assert!(drain(&mut w).await[0].status.is_ok());
    let got = wait_incoming(&mut t, 1).await;
    assert!(landed(&t, &got[0], base, bytes.len()) == bytes);
}

/// A write outside the granted range is never sent, and its payload comes back.
pub async fn out_of_range_is_rejected<B: Backend>(b: &B) {
    let local = region(16);
    let remote = region(16);
    let lease = remote.lease(1 << 20).unwrap();
    let granted = (lease.offset(), lease.len());
    let (mut w, mut t) = b.connect(&local, lease, 4).await;
    assert_eq!((w.remote().offset, w.remote().len), granted);
    let opts = FramingOptions::default();
    for offset in [
        granted.0 + granted.1 - 8,
        granted.0.saturating_sub(64),
        u64::MAX - 8,
    ] {
        let msg = frame(&local, 0, 64, 64, &opts);
        let err = w.post_write(msg, offset, 0).unwrap_err();
        assert!(
            matches!(err.error, TransportError::OutOfRange { .. }),
            "{:?}",
            err.error
        );
    }
    assert_eq!(w.in_flight(), 0);
    // The connection still works.
    let msg = frame(&local, 1, 64, 64, &opts);
    w.post_write(msg, granted.0, 5)
        .map_err(|e| e.error)
        .unwrap();
    assert!(drain(&mut w).await[0].status.is_ok());
    assert_eq!(wait_incoming(&mut t, 1).await[0].imm, 5);
}

/// The target goes away mid-stream: every in-flight write completes (with an error or not),
/// every payload comes back, and later posts fail with the payload handed back.
pub async fn peer_disconnect_mid_stream<B: Backend>(b: &B) {
    let local = region(64);
    let remote = region(64);
    let lease = remote.lease(32 << 20).unwrap();
    let base = lease.offset();
    let (mut w, t) = b.connect(&local, lease, 8).await;
    let opts = FramingOptions::default();
    let in_use_before = local.stats().blocks_in_use;
    for i in 0..8u64 {
        let msg = frame(&local, i, 1280, 720, &opts);
        w.post_write(msg, base + i * (2 << 20), i as u32)
            .map_err(|e| e.error)
            .unwrap();
    }
    drop(t);
    let done = drain(&mut w).await;
    assert_eq!(done.len(), 8, "every payload comes back");
    // Completion-after-error ownership: the blocks are still held by the returned payloads.
    assert!(local.stats().blocks_in_use > in_use_before);
    drop(done);
    local.quiesce();
    assert_eq!(local.stats().blocks_in_use, in_use_before);
    // Eventually posting fails and hands the payload back.
    let mut failed = None;
    for _ in 0..100 {
        let msg = frame(&local, 99, 64, 64, &opts);
        match w.post_write(msg, base, 99) {
            Err(e) => {
                failed = Some(e);
                break;
            }
            Ok(_) => {
                let c = drain(&mut w).await;
                if c.iter().any(|c| c.status.is_err()) {
                    continue;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failed = failed.expect("posting to a dead peer keeps failing");
    assert!(
        matches!(failed.error, TransportError::Disconnected),
        "{:?}",
        failed.error
    );
}

/// The writer goes away: the target reports the disconnect after delivering what landed.
pub async fn writer_disconnect<B: Backend>(b: &B) {
    let local = region(16);
    let remote = region(16);
    let lease = remote.lease(4 << 20).unwrap();
    let base = lease.offset();
    let (mut w, mut t) = b.connect(&local, lease, 4).await;
    let msg = frame(&local, 3, 64, 64, &FramingOptions::default());
    w.post_write(msg, base, 3).map_err(|e| e.error).unwrap();
    drain(&mut w).await;
    drop(w);
    let mut out = Vec::new();
    let mut end = None;
    for _ in 0..10 {
        match tokio::time::timeout(Duration::from_secs(30), t.incoming(&mut out))
            .await
            .unwrap()
        {
            Ok(_) => continue,
            Err(e) => {
                end = Some(e);
                break;
            }
        }
    }
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].imm, 3);
    assert!(matches!(end, Some(TransportError::Disconnected)), "{end:?}");
}

pub async fn run_all<B: Backend>(b: &B) {
    ordering_and_immediates(b).await;
    window_is_enforced(b).await;
    large_and_tiny(b).await;
    many_entries(b).await;
    out_of_range_is_rejected(b).await;
    peer_disconnect_mid_stream(b).await;
    writer_disconnect(b).await;
}
