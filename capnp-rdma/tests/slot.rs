//! `SlotMessage`: messages built contiguously in a slot of a region. The slot's bytes are the
//! standard stream framing of the message (against `capnp::serialize`), `frame_capacity` is
//! exact, a message that outgrows its slot is reported and leaves the slot clean, bad ranges
//! are refused, and over shm a frame built in the target's grant is handed over with no byte
//! copied.

use capnp::message::{Builder, HeapAllocator};
use capnp_rdma::frame::{FrameSpec, FrameView, FrameWriter, PixelFormat};
use capnp_rdma::reader::{read_frame, read_framed, ReadOptions};
use capnp_rdma::slot::{Framed, SlotMessage, SlotPayload, MIN_SLOT_BYTES, SLOT_HEADER_BYTES};
use capnp_rdma::transport::shm::{ShmOptions, ShmTarget, ShmWriter};
use capnp_rdma::transport::tcp::{TcpOptions, TcpTarget, TcpWriter};
use capnp_rdma::transport::{Payload, Target, TransportError, Writer};
use capnp_rdma::{Region, RegionOptions, SlotError};
use proptest::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn region(mb: u64) -> Region {
    Region::create(&RegionOptions::memfd(mb << 20).block_size(64 << 10)).unwrap()
}

/// The pixel byte at `i` of plane `plane`, different for every seed.
fn pixel(seed: u64, plane: u32, i: usize) -> u8 {
    (i as u64)
        .wrapping_mul(31)
        .wrapping_add(seed.wrapping_mul(13) + u64::from(plane) * 101) as u8
}

fn paint(frame: &mut FrameWriter<'_>, seed: u64) {
    for p in 0..frame.plane_count() {
        for (i, b) in frame.plane_mut(p).unwrap().iter_mut().enumerate() {
            *b = pixel(seed, p, i);
        }
    }
}

/// The region's bytes at `offset..+len`, copied.
fn bytes_at(region: &Region, offset: u64, len: u64) -> Vec<u8> {
    // SAFETY: the tests read slots only while nothing writes them.
    unsafe { region.bytes(offset, len) }.unwrap().to_vec()
}

/// What `capnp::serialize::write_message` writes for the same frame built on the heap, in one
/// segment (so its layout is the slot's).
fn heap_framing(spec: &FrameSpec, seed: u64, words: u32) -> Vec<u8> {
    let mut heap = Builder::new(HeapAllocator::new().first_segment_words(words));
    let mut frame = FrameWriter::init(&mut heap, spec).unwrap();
    paint(&mut frame, seed);
    assert_eq!(heap.get_segments_for_output().len(), 1);
    let mut out = Vec::new();
    capnp::serialize::write_message(&mut out, &heap).unwrap();
    out
}

fn spec_strategy() -> impl Strategy<Value = FrameSpec> {
    let format = prop_oneof![
        Just(PixelFormat::I420),
        Just(PixelFormat::Nv12),
        Just(PixelFormat::Rgb24),
        Just(PixelFormat::Gray8),
    ];
    let metadata = prop::collection::vec(
        ("\\PC{0,12}", prop::collection::vec(any::<u8>(), 0..40)),
        0..4,
    );
    (format, 1u32..40, 1u32..30, metadata, any::<u64>()).prop_map(
        |(format, w, h, metadata, sequence)| {
            let even = matches!(format, PixelFormat::I420 | PixelFormat::Nv12);
            let (w, h) = if even { (2 * w, 2 * h) } else { (w, h) };
            let mut spec = FrameSpec::new(format, w, h);
            spec.sequence = sequence;
            spec.stream_id = sequence.rotate_left(17);
            spec.metadata = metadata;
            spec
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Built in a slot of any size that holds it, a frame's bytes are exactly
    /// `write_message` of the same frame, and their length is `frame_capacity`.
    #[test]
    fn slot_bytes_are_write_message_and_frame_capacity_is_exact(
        spec in spec_strategy(),
        seed in any::<u64>(),
        slack_words in 0u64..64,
    ) {
        let region = region(4);
        let capacity = SlotMessage::frame_capacity(&spec).unwrap();
        let lease = region.lease(capacity + slack_words * 8).unwrap();
        // SAFETY: a fresh lease: zeroed, used by this message only, alive until the end.
        let mut message =
            unsafe { SlotMessage::new(&region, lease.offset(), capacity + slack_words * 8) }
                .unwrap();
        let mut frame = message.init_frame(&spec).unwrap();
        paint(&mut frame, seed);
        prop_assert_eq!(message.spilled_segments(), 0);
        let own = capnp::serialize::write_message_to_words(message.builder());
        let framed = message.finish().unwrap();
        prop_assert_eq!(framed, Framed { offset: lease.offset(), len: capacity });
        let slot = bytes_at(&region, framed.offset, framed.len);
        // The one-segment table: no more segments, then segment 0's words.
        let words = (capacity - SLOT_HEADER_BYTES) / 8;
        prop_assert_eq!(&slot[..4], &[0u8; 4][..]);
        prop_assert_eq!(&slot[4..8], &(words as u32).to_le_bytes()[..]);
        prop_assert!(slot == own, "slot bytes differ from write_message of the slot's builder");
        let words = u32::try_from(capacity / 8).unwrap();
        prop_assert!(slot == heap_framing(&spec, seed, words), "differs from a heap build");
        // The slack after the message is untouched (still zero).
        let rest = bytes_at(&region, framed.offset + framed.len, slack_words * 8);
        prop_assert!(rest.iter().all(|&b| b == 0));
    }
}

/// Messages that are not frames, down to the smallest slot: the framing is still
/// `write_message`'s.
#[test]
fn any_message_down_to_the_smallest_slot() {
    let region = region(4);
    let lease = region.lease(1 << 16).unwrap();
    // A root pointer alone (a null any-pointer) fits the smallest slot.
    // SAFETY: a fresh lease, used by one message at a time, each finished before the next.
    let mut message = unsafe { SlotMessage::new(&region, lease.offset(), MIN_SLOT_BYTES) }.unwrap();
    message.init_root::<capnp::any_pointer::Builder>();
    let own = capnp::serialize::write_message_to_words(message.builder());
    let framed = message.finish().unwrap();
    assert_eq!(framed.len, MIN_SLOT_BYTES);
    assert_eq!(bytes_at(&region, framed.offset, framed.len), own);

    // A text list right behind it in the same lease (8-aligned, zeroed).
    let offset = lease.offset() + 64;
    // SAFETY: as above; the range does not overlap the first message.
    let mut message = unsafe { SlotMessage::new(&region, offset, 4096) }.unwrap();
    {
        let mut list = message
            .init_root::<capnp::any_pointer::Builder>()
            .initn_as::<capnp::text_list::Builder>(3);
        for (i, s) in ["in", "place", "framing"].into_iter().enumerate() {
            list.set(i as u32, s);
        }
    }
    let own = capnp::serialize::write_message_to_words(message.builder());
    let framed = message.finish().unwrap();
    assert_eq!(bytes_at(&region, framed.offset, framed.len), own);
    let bytes = bytes_at(&region, framed.offset, framed.len);
    let mut aligned = capnp::Word::allocate_zeroed_vec(bytes.len() / 8);
    capnp::Word::words_to_bytes_mut(&mut aligned).copy_from_slice(&bytes);
    let (reader, len) = read_framed(
        capnp::Word::words_to_bytes(&aligned),
        &ReadOptions::default(),
    )
    .unwrap();
    assert_eq!(len as u64, framed.len);
    let list: capnp::text_list::Reader<'_> = reader
        .get_root::<capnp::any_pointer::Reader<'_>>()
        .unwrap()
        .get_as()
        .unwrap();
    assert_eq!(list.get(2).unwrap().to_str().unwrap(), "framing");
}

/// A frame read back in place, where it was built, with the reader's checks.
#[test]
fn read_back_in_place_as_a_frame() {
    let region = region(16);
    let mut spec = FrameSpec::new(PixelFormat::I420, 320, 240);
    spec.sequence = 42;
    spec.metadata = vec![("codec".into(), b"h264".to_vec())];
    let capacity = SlotMessage::frame_capacity(&spec).unwrap();
    let lease = region.lease(capacity).unwrap();
    // SAFETY: a fresh lease, alive until the end, used by this message only.
    let mut message = unsafe { SlotMessage::new(&region, lease.offset(), capacity) }.unwrap();
    let mut frame = message.init_frame(&spec).unwrap();
    paint(&mut frame, 5);
    let framed = message.finish().unwrap();
    assert_eq!(framed.len, capacity);
    // SAFETY: nothing writes the slot any more.
    let bytes = unsafe { region.bytes(framed.offset, framed.len) }.unwrap();
    let (reader, len) = read_frame(bytes, &ReadOptions::default()).unwrap();
    assert_eq!(len as u64, framed.len);
    let view = FrameView::new(&reader).unwrap();
    assert_eq!(view.reader().get_sequence(), 42);
    for p in 0..3 {
        let plane = view.plane(p).unwrap();
        assert!(plane.iter().enumerate().all(|(i, &b)| b == pixel(5, p, i)));
        // In place: the plane is inside the slot, not a copy.
        let at = plane.as_ptr() as usize - region.as_ptr() as usize;
        assert!(
            at as u64 > framed.offset && (at + plane.len()) as u64 <= framed.offset + len as u64
        );
    }
    let meta = view.reader().get_metadata().unwrap();
    assert_eq!(meta.get(0).get_value().unwrap(), b"h264");
}

/// A frame one word too big for its slot: `Overflow` with a size that does fit, the slot
/// zeroed again, and the retry in the same place succeeds. No panic on the way.
#[test]
fn overflow_is_reported_the_slot_cleaned_and_a_retry_fits() {
    let region = region(16);
    let spec = FrameSpec::new(PixelFormat::I420, 320, 240);
    let capacity = SlotMessage::frame_capacity(&spec).unwrap();
    let lease = region.lease(capacity).unwrap();
    let short = capacity - 8;
    // SAFETY: a fresh lease, alive until the end, used by one message at a time.
    let mut message = unsafe { SlotMessage::new(&region, lease.offset(), short) }.unwrap();
    let mut frame = message.init_frame(&spec).unwrap();
    paint(&mut frame, 1);
    assert!(
        message.spilled_segments() >= 1,
        "the last plane went to the heap"
    );
    let needed = match message.finish() {
        Err(SlotError::Overflow {
            needed_bytes,
            slot_bytes,
        }) => {
            assert_eq!(slot_bytes, short);
            needed_bytes
        }
        other => panic!("expected an overflow, got {other:?}"),
    };
    assert!(needed >= capacity, "{needed} < {capacity}");
    assert!(
        bytes_at(&region, lease.offset(), lease.len())
            .iter()
            .all(|&b| b == 0),
        "an overflowed message leaves its slot zeroed"
    );

    // SAFETY: the slot is zero again (checked above) and still ours.
    let mut message = unsafe { SlotMessage::new(&region, lease.offset(), needed) }.unwrap();
    let mut frame = message.init_frame(&spec).unwrap();
    paint(&mut frame, 1);
    let framed = message.finish().unwrap();
    assert_eq!(framed.len, capacity);
    assert_eq!(
        bytes_at(&region, framed.offset, framed.len),
        heap_framing(&spec, 1, (capacity / 8) as u32)
    );
}

/// The first request already bigger than the slot, a dropped unfinished message, and a
/// message with no root.
#[test]
fn unfinished_and_empty_messages() {
    let region = region(4);
    let lease = region.lease(4096).unwrap();
    // SAFETY: a fresh lease, one message at a time.
    let mut message = unsafe { SlotMessage::new(&region, lease.offset(), 4096) }.unwrap();
    let mut frame = message
        .init_frame(&FrameSpec::new(PixelFormat::Gray8, 100, 10))
        .unwrap();
    frame.plane_mut(0).unwrap().fill(0xff);
    drop(message);
    assert!(
        bytes_at(&region, lease.offset(), 4096)
            .iter()
            .all(|&b| b == 0),
        "a dropped message zeroes what it wrote"
    );

    // SAFETY: as above.
    let message = unsafe { SlotMessage::new(&region, lease.offset(), 4096) }.unwrap();
    assert!(matches!(message.finish(), Err(SlotError::EmptyMessage)));

    // A slot whose whole segment is smaller than the root struct capnp asks for first:
    // everything spills, nothing panics, the overflow is reported.
    // SAFETY: as above.
    let mut message = unsafe { SlotMessage::new(&region, lease.offset(), MIN_SLOT_BYTES) }.unwrap();
    message
        .init_frame(&FrameSpec::new(PixelFormat::Gray8, 8, 8))
        .unwrap();
    let needed = SlotMessage::frame_capacity(&FrameSpec::new(PixelFormat::Gray8, 8, 8)).unwrap();
    match message.finish() {
        Err(SlotError::Overflow { needed_bytes, .. }) => assert!(needed_bytes >= needed),
        other => panic!("expected an overflow, got {other:?}"),
    }
    assert!(bytes_at(&region, lease.offset(), 4096)
        .iter()
        .all(|&b| b == 0));
}

/// Ranges outside the data area, unaligned, or too small are refused before anything is
/// written.
#[test]
fn bad_ranges_are_refused() {
    let region = region(4);
    let data = region.geometry().data_offset;
    let end = region.len();
    let refuse = |offset: u64, len: u64| {
        // SAFETY: every one of these is refused before the range is touched.
        unsafe { SlotMessage::new(&region, offset, len) }.unwrap_err()
    };
    assert!(matches!(refuse(0, 4096), SlotError::Range(_)), "the header");
    assert!(matches!(refuse(data - 8, 4096), SlotError::Range(_)));
    assert!(
        matches!(refuse(end - 4096, 4104), SlotError::Range(_)),
        "past the end"
    );
    assert!(matches!(refuse(end, 16), SlotError::Range(_)));
    assert!(
        matches!(refuse(data, u64::MAX), SlotError::Range(_)),
        "overflowing"
    );
    assert!(matches!(
        refuse(data + 4, 4096),
        SlotError::Misaligned { offset } if offset == data + 4
    ));
    assert!(matches!(
        refuse(data, MIN_SLOT_BYTES - 1),
        SlotError::TooSmall { len: 15 }
    ));
    // The last 16 bytes of the region are a valid slot.
    // SAFETY: no block of the fresh region is leased; nobody else uses it.
    let mut last = unsafe { SlotMessage::new(&region, end - 16, 16) }.unwrap();
    last.init_root::<capnp::any_pointer::Builder>();
    assert_eq!(last.finish().unwrap().len, 16);

    // SlotPayload checks its range too.
    let outside = Framed { offset: 0, len: 64 };
    let huge = Framed {
        offset: data,
        len: 1 << 32,
    };
    // SAFETY: refused before use.
    let refused = unsafe { SlotPayload::new(&region, outside) };
    assert!(matches!(refused, Err(SlotError::Range(_))));
    // A region bigger than 4 GiB (never touched: not pre-faulted) for a range one entry
    // cannot describe.
    let big = Region::create(&RegionOptions::memfd((1 << 32) + (8 << 20)).prefault(false)).unwrap();
    let data = big.geometry().data_offset;
    // SAFETY: refused before use.
    let refused = unsafe {
        SlotPayload::new(
            &big,
            Framed {
                offset: data,
                ..huge
            },
        )
    };
    assert!(matches!(refused, Err(SlotError::TooLarge { len }) if len == 1 << 32));
}

/// A socket path no other test uses.
fn socket_path() -> std::path::PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "capnp-rdma-slot-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

async fn incoming(target: &mut ShmTarget) -> capnp_rdma::transport::Incoming {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), target.incoming(&mut out))
        .await
        .expect("incoming timed out")
        .unwrap();
    assert_eq!(out.len(), 1);
    out[0]
}

/// The in-place path end to end: a 1080p frame built with `FrameWriter` in a slot of the
/// target's grant (through the writer's handle on the target's region) is handed over with
/// no byte copied, and the target reads it as a frame where it was built. The same payload
/// posted to another slot is copied, and one from an unrelated region is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_hands_over_a_frame_built_in_the_grant_without_a_copy() {
    let target_region = region(32);
    let local = region(4);
    let spec = FrameSpec::new(PixelFormat::I420, 1920, 1080);
    let capacity = SlotMessage::frame_capacity(&spec).unwrap();
    let stride = capacity.next_multiple_of(4096);
    let lease = target_region.lease(2 * stride).unwrap();
    let base = lease.offset();
    let path = socket_path();
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let accept =
        tokio::spawn(
            async move { ShmTarget::accept(&listener, lease, &ShmOptions::default()).await },
        );
    let mut writer = ShmWriter::<SlotPayload>::connect(&path, &local)
        .await
        .unwrap();
    let mut target = accept.await.unwrap().unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_ne!(writer.target_region().id(), local.id());

    // SAFETY: slot 0 of the grant: zeroed (a fresh lease), written only by this message
    // until it is finished, and read by the target only after the write is announced; the
    // target keeps the grant while the writer is connected.
    let mut message = unsafe { SlotMessage::new(writer.target_region(), base, capacity) }.unwrap();
    let mut frame = message.init_frame(&spec).unwrap();
    paint(&mut frame, 9);
    let payload = message.into_payload().unwrap();
    assert_eq!(
        payload.framed(),
        Framed {
            offset: base,
            len: capacity
        }
    );
    assert_eq!(payload.total_len(), capacity);
    writer
        .post_write(payload, base, 7)
        .map_err(|e| e.error)
        .unwrap();
    let stats = writer.stats();
    assert_eq!(
        (stats.writes, stats.zero_copy_writes, stats.bytes_copied),
        (1, 1, 0)
    );

    let got = incoming(&mut target).await;
    let at = got.at.expect("shm reports where a write landed");
    assert_eq!((got.imm, at.offset, at.len), (7, base, capacity));
    {
        // SAFETY: the writer does not write slot 0 again in this test.
        let bytes = unsafe { target.region().bytes(at.offset, at.len) }.unwrap();
        let (reader, len) = read_frame(bytes, &ReadOptions::default()).unwrap();
        assert_eq!(len as u64, capacity);
        let view = FrameView::new(&reader).unwrap();
        assert_eq!(
            (view.reader().get_width(), view.reader().get_height()),
            (1920, 1080)
        );
        for p in 0..3 {
            let plane = view.plane(p).unwrap();
            assert!(plane.iter().enumerate().all(|(i, &b)| b == pixel(9, p, i)));
        }
    }
    let mut done = Vec::new();
    writer.completions(&mut done).await.unwrap();
    let payload = done.pop().unwrap();
    payload.status.unwrap();
    let payload = payload.payload;

    // Posted to slot 1 instead, the same bytes are moved within the region: a copy.
    writer
        .post_write(payload, base + stride, 8)
        .map_err(|e| e.error)
        .unwrap();
    let stats = writer.stats();
    assert_eq!(
        (stats.writes, stats.zero_copy_writes, stats.bytes_copied),
        (2, 1, capacity)
    );
    let got = incoming(&mut target).await;
    assert_eq!(got.at.map(|a| a.offset), Some(base + stride));
    assert_eq!(
        bytes_at(target.region(), base + stride, capacity),
        bytes_at(target.region(), base, capacity)
    );
    writer.completions(&mut done).await.unwrap();

    // A slot in a region that is neither the writer's nor the target's is refused.
    let stranger = region(4);
    let slot = stranger.lease(4096).unwrap();
    // SAFETY: a fresh lease, alive until the end, used by this message only.
    let mut message = unsafe { SlotMessage::new(&stranger, slot.offset(), 4096) }.unwrap();
    message.init_root::<capnp::any_pointer::Builder>();
    let foreign = message.into_payload().unwrap();
    let err = writer.post_write(foreign, base, 9).unwrap_err();
    assert!(
        matches!(err.error, TransportError::ForeignPayload(_)),
        "{:?}",
        err.error
    );
}

/// Only shm accepts payloads in the target's region: the tcp writer still wants its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_still_refuses_a_payload_outside_its_region() {
    let target_region = region(4);
    let local = region(4);
    let lease = target_region.lease(1 << 16).unwrap();
    let base = lease.offset();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept =
        tokio::spawn(
            async move { TcpTarget::accept(&listener, lease, &TcpOptions::default()).await },
        );
    let mut writer = TcpWriter::<SlotPayload>::connect(addr, &local)
        .await
        .unwrap();
    let _target = accept.await.unwrap().unwrap();

    let slot = target_region.lease(4096).unwrap();
    // SAFETY: a fresh lease, alive until the end, used by this message only.
    let mut message = unsafe { SlotMessage::new(&target_region, slot.offset(), 4096) }.unwrap();
    message.init_root::<capnp::any_pointer::Builder>();
    let err = writer
        .post_write(message.into_payload().unwrap(), base, 1)
        .unwrap_err();
    assert!(
        matches!(err.error, TransportError::ForeignPayload(_)),
        "{:?}",
        err.error
    );

    // From the writer's own region it goes.
    let own = local.lease(4096).unwrap();
    // SAFETY: as above.
    let mut message = unsafe { SlotMessage::new(&local, own.offset(), 4096) }.unwrap();
    message.init_root::<capnp::any_pointer::Builder>();
    writer
        .post_write(message.into_payload().unwrap(), base, 2)
        .map_err(|e| e.error)
        .unwrap();
    let mut done = Vec::new();
    while writer.in_flight() > 0 {
        tokio::time::timeout(Duration::from_secs(60), writer.completions(&mut done))
            .await
            .unwrap()
            .unwrap();
    }
    done.pop().unwrap().status.unwrap();
}
