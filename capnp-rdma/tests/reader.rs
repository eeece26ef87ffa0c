//! Behaviour of `capnp_rdma::reader`: round trips against capnp's own writer, real frame sizes,
//! every rejection case on its own, the traversal and nesting limits, no heap allocation on the
//! hot path, and a property test that mutated frames never panic.

mod wire;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::time::Instant;

use capnp::message::{AllocationStrategy, Builder, HeapAllocator, ReaderSegments};
use capnp::{ErrorKind, Word};
use capnp_rdma::frame::{FrameError, FrameSpec, FrameView, FrameWriter, PixelFormat};
use capnp_rdma::frame_capnp::frame;
use capnp_rdma::reader::{
    self, read_frame, read_framed, InPlaceSegments, ReadError, ReadOptions, SegmentTable,
    MAX_SEGMENT_WORDS,
};
use proptest::prelude::*;
use wire::aligned;

// ---------------------------------------------------------------------------------------------
// Allocation counting (per thread, so parallel tests do not disturb each other).

struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_allocation() {
    let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
}

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract holds exactly as it does for `System`; counting touches no memory
// the allocator hands out.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract (non-zero size layout).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was returned by this allocator, i.e. by `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_allocation();
        // SAFETY: `ptr` was returned by `System` with `layout`; the caller guarantees `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

// ---------------------------------------------------------------------------------------------
// Helpers.

/// A built message in stream framing, written by capnp's own `write_message`.
fn write<A: capnp::message::Allocator>(message: &Builder<A>) -> Vec<Word> {
    let mut words =
        Word::allocate_zeroed_vec(capnp::serialize::compute_serialized_size_in_words(message));
    capnp::serialize::write_message(Word::words_to_bytes_mut(&mut words), message).unwrap();
    words
}

fn bytes(words: &[Word]) -> &[u8] {
    Word::words_to_bytes(words)
}

fn spec(format: PixelFormat, width: u32, height: u32) -> FrameSpec {
    let mut spec = FrameSpec::new(format, width, height);
    spec.stream_id = 7;
    spec.sequence = 42;
    spec.pts_ticks = -3000;
    spec.metadata = vec![
        ("camera".into(), b"north".to_vec()),
        ("gain".into(), vec![1, 2]),
    ];
    spec
}

/// A frame whose pixels are a deterministic pattern.
fn build_frame<A: capnp::message::Allocator>(message: &mut Builder<A>, spec: &FrameSpec) {
    let mut writer = FrameWriter::init(message, spec).unwrap();
    for plane in 0..writer.plane_count() {
        for (i, byte) in writer.plane_mut(plane).unwrap().iter_mut().enumerate() {
            *byte = (i as u32).wrapping_mul(31).wrapping_add(plane * 7) as u8;
        }
    }
}

/// Checks every header field and pixel of a read frame against `spec` and the pattern.
fn check_frame<S: ReaderSegments>(message: &capnp::message::Reader<S>, spec: &FrameSpec) {
    let view = FrameView::new(message).unwrap();
    let reader = view.reader();
    assert_eq!(reader.get_stream_id(), spec.stream_id);
    assert_eq!(reader.get_sequence(), spec.sequence);
    assert_eq!(reader.get_pts_ticks(), spec.pts_ticks);
    assert_eq!(
        (reader.get_width(), reader.get_height()),
        (spec.width, spec.height)
    );
    assert_eq!(reader.get_format().unwrap(), spec.format);
    let metadata = reader.get_metadata().unwrap();
    assert_eq!(metadata.len() as usize, spec.metadata.len());
    for (entry, (key, value)) in metadata.iter().zip(&spec.metadata) {
        assert_eq!(entry.get_key().unwrap().to_str().unwrap(), key);
        assert_eq!(entry.get_value().unwrap(), &value[..]);
    }
    let layouts = capnp_rdma::frame::plane_layouts(spec.format, spec.width, spec.height).unwrap();
    assert_eq!(view.plane_count().unwrap() as usize, layouts.len());
    for (plane, layout) in (0..).zip(&layouts) {
        let data = view.plane(plane).unwrap();
        assert_eq!(data.len(), layout.bytes());
        assert!(data
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i as u32).wrapping_mul(31).wrapping_add(plane * 7) as u8));
    }
}

/// A single-segment `Frame` (I420) with `planes` planes whose data pointers all point at the
/// same `data_words`-word blob.
fn amplified_frame(planes: u32, data_words: u32) -> Vec<u8> {
    let mut words = vec![0u64; 10];
    words[0] = wire::struct_ptr(0, 6, 2);
    words[5] = u64::from(1u32) | u64::from(1u32) << 32; // width, height
    words[6] = PixelFormat::I420 as u64;
    words[7] = wire::list_ptr(1, 7, planes * 2);
    words[9] = u64::from(planes << 2) | 1 << 32 | 1 << 48; // tag: planes x (1 data, 1 ptr)
    let blob = 10 + 2 * planes as usize;
    for j in 0..planes as usize {
        let at = 10 + 2 * j;
        words.push(u64::from(data_words * 8)); // stride = blob bytes, rows = 0
        words.push(wire::list_ptr(
            blob as i32 - (at as i32 + 2),
            2,
            data_words * 8,
        ));
    }
    words.extend((0..data_words).map(u64::from));
    wire::frame(&[words])
}

// ---------------------------------------------------------------------------------------------
// Round trips against capnp's own writer.

#[test]
fn raw_segments_round_trip_for_1_to_20_and_many_segments() {
    for count in (1..=20).chain([31, 32, 33, 64, 511]) {
        // Segment 0 holds at least the root pointer; later ones have 0..=3 words, some empty.
        let segments: Vec<Vec<Word>> = (0..count)
            .map(|i| {
                let words = if i == 0 { 1 } else { i % 4 };
                (0..words)
                    .map(|w| {
                        let b = (i * 16 + w) as u8;
                        capnp::word(b, b, b, b, b, b, b, b)
                    })
                    .collect()
            })
            .collect();
        let slices: Vec<&[u8]> = segments.iter().map(|s| Word::words_to_bytes(s)).collect();
        let mut written = Vec::new();
        capnp::serialize::write_message_segments(&mut written, &slices).unwrap();
        let buffer = aligned(&written);
        let (message, len) = read_framed(bytes(&buffer), &ReadOptions::default()).unwrap();

        assert_eq!(len, written.len(), "{count} segments");
        let segments_read = message.get_segments();
        assert_eq!(segments_read.len(), count);
        let table = segments_read.table();
        assert_eq!(table.segment_count() as usize, count);
        assert_eq!(table.header_bytes(), (count / 2 + 1) * 8);
        assert_eq!(table.message_bytes(), written.len() as u64);
        for (i, expected) in (0..).zip(&slices) {
            let got = segments_read.get_segment(i).unwrap();
            assert_eq!(got, *expected, "segment {i} of {count}");
            assert_eq!(table.segment_words(i), Some((expected.len() / 8) as u32));
            // In place: the segment is a slice of the buffer at the offset the table gives.
            let offset = got.as_ptr() as usize - bytes(&buffer).as_ptr() as usize;
            assert_eq!(Some(offset as u64), table.segment_offset(i));
        }
        assert!(segments_read.get_segment(count as u32).is_none());
        assert_eq!(table.segment_words(count as u32), None);
    }
}

#[test]
fn frames_round_trip_for_1_to_20_segments() {
    // Small fixed-size segments force capnp to spread the frame over many segments, with far
    // and double-far pointers between them.
    let mut seen = std::collections::BTreeSet::new();
    let mut spec = spec(PixelFormat::I420, 8, 4);
    for first_segment_words in [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 1024] {
        for metadata in 0..8 {
            spec.metadata = (0..metadata)
                .map(|i| (format!("k{i}"), vec![i as u8; i]))
                .collect();
            let allocator = HeapAllocator::new()
                .first_segment_words(first_segment_words)
                .allocation_strategy(AllocationStrategy::FixedSize);
            let mut message = Builder::new(allocator);
            build_frame(&mut message, &spec);
            let expected: Vec<Vec<u8>> = message
                .get_segments_for_output()
                .iter()
                .map(|s| s.to_vec())
                .collect();
            let buffer = write(&message);
            let (read, len) = read_frame(bytes(&buffer), &ReadOptions::default()).unwrap();
            assert_eq!(len, bytes(&buffer).len());
            assert_eq!(read.get_segments().len(), expected.len());
            for (i, segment) in (0..).zip(&expected) {
                assert_eq!(read.get_segments().get_segment(i).unwrap(), &segment[..]);
            }
            check_frame(&read, &spec);
            seen.insert(expected.len());
        }
    }
    for count in 1..=20 {
        assert!(
            seen.contains(&count),
            "no frame with {count} segments; saw {seen:?}"
        );
    }
}

#[test]
fn frame_1080p_i420_reads_in_place() {
    let spec = spec(PixelFormat::I420, 1920, 1080);
    assert_eq!(
        capnp_rdma::frame::frame_bytes(spec.format, 1920, 1080).unwrap(),
        3_110_400
    );
    // A header segment plus one exactly-sized segment per plane, as the staging allocator does.
    let allocator = HeapAllocator::new()
        .first_segment_words(64)
        .allocation_strategy(AllocationStrategy::FixedSize);
    let mut message = Builder::new(allocator);
    build_frame(&mut message, &spec);
    assert_eq!(message.get_segments_for_output().len(), 4);
    let buffer = write(&message);
    let input = bytes(&buffer);

    let (read, len) = read_frame(input, &ReadOptions::default()).unwrap();
    assert_eq!(len, input.len());
    check_frame(&read, &spec);
    let view = FrameView::new(&read).unwrap();
    let range = input.as_ptr_range();
    for plane in 0..3 {
        let data = view.plane(plane).unwrap().as_ptr_range();
        assert!(
            range.start <= data.start && data.end <= range.end,
            "plane {plane} was copied"
        );
    }
}

#[test]
fn frames_4k_and_8k_read_with_default_options() {
    for (width, height) in [(3840, 2160), (7680, 4320)] {
        let spec = spec(PixelFormat::I420, width, height);
        let mut message = Builder::new_default();
        FrameWriter::init(&mut message, &spec).unwrap();
        let buffer = write(&message);
        let input = bytes(&buffer);

        // The automatic limit covers the frame's checks and every plane read twice.
        let (read, _) = read_frame(input, &ReadOptions::default()).unwrap();
        let view = FrameView::new(&read).unwrap();
        for _ in 0..2 {
            for plane in 0..3 {
                view.plane(plane).unwrap();
            }
        }
        if width == 7680 {
            // capnp's fixed default (8 Mi words) would not: the automatic limit matters.
            let fixed = ReadOptions {
                traversal_limit_words: Some(8 << 20),
                ..ReadOptions::default()
            };
            let (read, _) = read_framed(input, &fixed).unwrap();
            let view = FrameView::new(&read).unwrap();
            let err = (0..3)
                .try_for_each(|p| view.plane(p).map(drop))
                .unwrap_err();
            assert!(matches!(err, FrameError::Capnp(e) if e.kind == ErrorKind::ReadLimitExceeded));
        }
    }
}

#[test]
fn every_format_round_trips() {
    for (format, width, height) in [
        (PixelFormat::I420, 64, 48),
        (PixelFormat::Nv12, 32, 16),
        (PixelFormat::Rgb24, 16, 8),
        (PixelFormat::Gray8, 8, 8),
    ] {
        let spec = spec(format, width, height);
        let mut message = Builder::new_default();
        build_frame(&mut message, &spec);
        let buffer = write(&message);
        let (read, _) = read_frame(bytes(&buffer), &ReadOptions::default()).unwrap();
        check_frame(&read, &spec);
    }
}

fn small_frame() -> Vec<Word> {
    let mut message = Builder::new_default();
    build_frame(&mut message, &spec(PixelFormat::Gray8, 8, 2));
    write(&message)
}

#[test]
fn trailing_bytes_are_allowed_and_reported_by_the_length() {
    let frame = small_frame();
    let mut input = bytes(&frame).to_vec();
    let message_len = input.len();
    input.extend_from_slice(&[0xAB; 13]);
    let buffer = aligned(&input);
    let (read, len) = read_framed(&bytes(&buffer)[..input.len()], &ReadOptions::default()).unwrap();
    assert_eq!(len, message_len);
    assert_eq!(read.get_segments().as_bytes().len(), message_len);
    check_frame(&read, &spec(PixelFormat::Gray8, 8, 2));
}

#[test]
fn messages_back_to_back_are_read_one_after_another() {
    let mut stream = Vec::new();
    let mut specs = Vec::new();
    for (i, format) in [PixelFormat::Gray8, PixelFormat::I420, PixelFormat::Rgb24]
        .into_iter()
        .enumerate()
    {
        let mut spec = spec(format, 4, 2);
        spec.sequence = i as u64;
        let mut message = Builder::new_default();
        build_frame(&mut message, &spec);
        stream.extend_from_slice(bytes(&write(&message)));
        specs.push(spec);
    }
    let buffer = aligned(&stream);
    let mut rest = bytes(&buffer);
    for spec in &specs {
        let (read, len) = read_frame(rest, &ReadOptions::default()).unwrap();
        check_frame(&read, spec);
        rest = &rest[len..];
    }
    assert!(rest.is_empty());
    assert!(matches!(
        read_framed(rest, &ReadOptions::default()),
        Err(ReadError::Truncated {
            needed: 8,
            available: 0
        })
    ));
}

#[test]
fn padding_content_is_ignored() {
    // Two segments: the table is count, len0, len1, padding.
    let segments = [vec![0u64], vec![5u64]];
    let mut input = wire::frame(&segments);
    input[12..16].copy_from_slice(&[0xFF; 4]);
    let buffer = aligned(&input);
    let (read, len) = read_framed(bytes(&buffer), &ReadOptions::default()).unwrap();
    assert_eq!(len, 16 + 16);
    assert_eq!(
        read.get_segments().get_segment(1).unwrap(),
        &5u64.to_le_bytes()
    );
}

// ---------------------------------------------------------------------------------------------
// Rejections, one behaviour per test.

fn read_raw(input: &[u8]) -> Result<usize, ReadError> {
    let buffer = aligned(input);
    read_framed(&bytes(&buffer)[..input.len()], &ReadOptions::default()).map(|(_, len)| len)
}

#[test]
fn empty_input_is_truncated() {
    assert!(matches!(
        read_raw(&[]),
        Err(ReadError::Truncated {
            needed: 8,
            available: 0
        })
    ));
    assert!(matches!(
        read_framed(&[], &ReadOptions::default()),
        Err(ReadError::Truncated {
            needed: 8,
            available: 0
        })
    ));
}

#[test]
fn truncated_first_word_is_rejected() {
    for len in 1..8 {
        let input = &wire::table(0, &[1])[..len];
        match read_raw(input) {
            Err(ReadError::Truncated {
                needed: 8,
                available,
            }) => assert_eq!(available, len as u64),
            other => panic!("{len} bytes: {other:?}"),
        }
    }
}

#[test]
fn truncated_table_is_rejected() {
    // Five segments: the table is 4 + 5 * 4 = 24 bytes, already padded.
    let table = wire::table(4, &[1, 1, 1, 1, 1]);
    assert_eq!(table.len(), 24);
    for len in 8..24 {
        match read_raw(&table[..len]) {
            Err(ReadError::Truncated {
                needed: 24,
                available,
            }) => assert_eq!(available, len as u64),
            other => panic!("{len} bytes: {other:?}"),
        }
    }
    // SegmentTable::parse needs only the table.
    let parsed = SegmentTable::parse(&table, 512).unwrap();
    assert_eq!(parsed.segment_count(), 5);
    assert_eq!(parsed.message_bytes(), 24 + 5 * 8);
}

#[test]
fn truncated_body_is_rejected() {
    let frame = small_frame();
    let input = bytes(&frame);
    for len in [16, input.len() - 8, input.len() - 1] {
        match read_raw(&input[..len]) {
            Err(ReadError::Truncated { needed, available }) => {
                assert_eq!((needed, available), (input.len() as u64, len as u64));
            }
            other => panic!("{len} bytes: {other:?}"),
        }
    }
    assert_eq!(read_raw(input).unwrap(), input.len());
}

#[test]
fn segment_count_of_512_or_more_is_rejected() {
    // 512 segments of one word each, all present: rejected by count alone.
    let segments = vec![vec![0u64]; 512];
    let input = wire::frame(&segments);
    assert!(matches!(
        read_raw(&input),
        Err(ReadError::TooManySegments {
            count: 512,
            max: 512
        })
    ));
    let input = wire::frame(&segments[..511]);
    assert_eq!(read_raw(&input).unwrap(), input.len());
    // Rejected before the table is needed: a count alone is enough.
    assert!(matches!(
        read_raw(&100_000u32.to_le_bytes()),
        Err(ReadError::TooManySegments {
            count: 100_001,
            max: 512
        })
    ));
}

#[test]
fn count_field_u32_max_means_2_pow_32_segments_not_zero() {
    // The count field is (segments - 1); u32::MAX would wrap to zero segments in 32-bit
    // arithmetic. It is 2^32 segments, always too many.
    let input = wire::table(u32::MAX, &[1]);
    assert!(matches!(
        read_raw(&input),
        Err(ReadError::TooManySegments {
            count: 4_294_967_296,
            max: 512
        })
    ));
    assert!(matches!(
        SegmentTable::parse(&input, u32::MAX),
        Err(ReadError::TooManySegments {
            count: 4_294_967_296,
            max: u32::MAX
        })
    ));
}

#[test]
fn max_segments_is_an_exclusive_limit() {
    let segments = vec![vec![0u64]; 4];
    let input = aligned(&wire::frame(&segments));
    let options = |max_segments| ReadOptions {
        max_segments,
        ..ReadOptions::default()
    };
    assert!(read_framed(bytes(&input), &options(5)).is_ok());
    assert!(matches!(
        read_framed(bytes(&input), &options(4)),
        Err(ReadError::TooManySegments { count: 4, max: 4 })
    ));
    assert!(matches!(
        read_framed(bytes(&input), &options(0)),
        Err(ReadError::TooManySegments { count: 4, max: 0 })
    ));
}

#[test]
fn misaligned_input_is_rejected_not_copied() {
    let frame = small_frame();
    let mut shifted = Word::allocate_zeroed_vec(frame.len() + 1);
    let len = bytes(&frame).len();
    let shifted = &mut Word::words_to_bytes_mut(&mut shifted)[..len + 8];
    for offset in 1..8 {
        shifted[offset..offset + len].copy_from_slice(bytes(&frame));
        let input = &shifted[offset..offset + len];
        match read_framed(input, &ReadOptions::default()) {
            Err(ReadError::Misaligned { address }) => assert_eq!(address, input.as_ptr() as usize),
            other => panic!("offset {offset}: {:?}", other.map(|(_, len)| len)),
        }
    }
    // SegmentTable::parse reads the table byte-wise and does not care.
    shifted[1..1 + len].copy_from_slice(bytes(&frame));
    assert!(SegmentTable::parse(&shifted[1..1 + len], 512).is_ok());
}

#[test]
fn segment_length_over_2_pow_29_minus_1_is_rejected() {
    for words in [u32::MAX, 1 << 29] {
        let input = wire::table(1, &[1, words]);
        assert!(matches!(
            read_raw(&input),
            Err(ReadError::SegmentTooLarge { words: w }) if w == u64::from(words)
        ));
    }
    // 2^29 - 1 words is accepted by the table; the body is then missing.
    let input = wire::table(0, &[MAX_SEGMENT_WORDS]);
    let needed = 8 + u64::from(MAX_SEGMENT_WORDS) * 8;
    assert!(
        matches!(read_raw(&input), Err(ReadError::Truncated { needed: n, available: 8 }) if n == needed)
    );
}

#[test]
fn huge_lengths_add_up_without_overflow() {
    // 511 segments of 2^29 - 1 words: about 2^41 bytes. The sum is exact, not wrapped.
    let input = wire::table(510, &[MAX_SEGMENT_WORDS; 511]);
    let table = SegmentTable::parse(&input, 512).unwrap();
    let body = 511 * u64::from(MAX_SEGMENT_WORDS) * 8;
    assert_eq!(table.body_bytes(), body);
    assert_eq!(table.message_bytes(), 256 * 8 + body);
    assert_eq!(
        table.segment_offset(510),
        Some(256 * 8 + 510 * u64::from(MAX_SEGMENT_WORDS) * 8)
    );
    assert!(matches!(
        read_raw(&input),
        Err(ReadError::Truncated { needed, available: 2048 }) if needed == 256 * 8 + body
    ));
    // Far more segments than capnp allows, with max_segments raised: still exact.
    let count = 1 << 16;
    let input = wire::table(count - 1, &vec![MAX_SEGMENT_WORDS; count as usize]);
    let table = SegmentTable::parse(&input, u32::MAX).unwrap();
    assert_eq!(
        table.body_bytes(),
        u64::from(count) * u64::from(MAX_SEGMENT_WORDS) * 8
    );
}

#[test]
fn empty_first_segment_is_rejected() {
    // One segment of zero words: no room for the root pointer.
    let input = wire::table(0, &[0]);
    assert!(matches!(
        read_raw(&input),
        Err(ReadError::EmptyFirstSegment)
    ));
    // Even when later segments hold words.
    let input = wire::frame(&[vec![], vec![wire::struct_ptr(0, 0, 0)]]);
    assert!(matches!(
        read_raw(&input),
        Err(ReadError::EmptyFirstSegment)
    ));
    // capnp itself accepts the framing but cannot read a root from it: the early rejection
    // loses nothing.
    let buffer = aligned(&input);
    let mut slice = bytes(&buffer);
    let message =
        capnp::serialize::read_message_from_flat_slice(&mut slice, Default::default()).unwrap();
    assert!(message
        .get_root::<capnp::any_pointer::Reader<'_>>()
        .is_err());
}

#[test]
fn empty_later_segments_are_allowed() {
    // A root struct in segment 2, reached through a far pointer; segments 1 and 3 are empty.
    let segments = [
        vec![wire::far_ptr(false, 0, 2)],
        vec![],
        vec![wire::struct_ptr(0, 1, 0), 99],
        vec![],
    ];
    let input = aligned(&wire::frame(&segments));
    let (read, len) = read_framed(bytes(&input), &ReadOptions::default()).unwrap();
    assert_eq!(len, bytes(&input).len());
    assert_eq!(read.get_segments().get_segment(1), Some(&[][..]));
    assert_eq!(read.get_segments().table().segment_words(3), Some(0));
    let root: capnp::any_pointer::Reader<'_> = read.get_root().unwrap();
    assert_eq!(root.target_size().unwrap().word_count, 1);
    let frame: frame::Reader<'_> = read.get_root().unwrap();
    assert_eq!(frame.get_stream_id(), 99);
}

// ---------------------------------------------------------------------------------------------
// Limits applied while traversing.

#[test]
fn automatic_traversal_limit_is_max_of_8_mi_words_and_4x_the_message() {
    let options = ReadOptions::default();
    assert_eq!(options.traversal_limit_words, None);
    assert_eq!((options.nesting_limit, options.max_segments), (64, 512));
    assert_eq!(options.effective_traversal_limit(0), 8 << 20);
    assert_eq!(options.effective_traversal_limit(2 << 20), 8 << 20);
    assert_eq!(options.effective_traversal_limit(3 << 20), 12 << 20);
    assert_eq!(options.effective_traversal_limit(u64::MAX), u64::MAX);
    let fixed = ReadOptions {
        traversal_limit_words: Some(5),
        ..options
    };
    assert_eq!(fixed.effective_traversal_limit(1 << 30), 5);
    assert_eq!(
        fixed.capnp_options(1 << 30).traversal_limit_in_words,
        Some(5)
    );
}

#[test]
fn amplification_is_stopped_by_the_default_traversal_limit() {
    // 1024 planes all pointing at one 1 MiB blob: 1 GiB if every plane is read.
    let input = amplified_frame(1024, 128 * 1024);
    assert!(input.len() < 1100 * 1024);
    let buffer = aligned(&input);
    let input = bytes(&buffer);

    // A consumer walking the planes (FrameView::new reads every plane's data) is stopped.
    let (read, _) = read_framed(input, &ReadOptions::default()).unwrap();
    match FrameView::new(&read) {
        Err(FrameError::Capnp(e)) => assert_eq!(e.kind, ErrorKind::ReadLimitExceeded),
        other => panic!("{:?}", other.map(|_| ())),
    }
    // So is a generic traversal of the message.
    let root: capnp::any_pointer::Reader<'_> = read.get_root().unwrap();
    assert_eq!(
        root.target_size().unwrap_err().kind,
        ErrorKind::ReadLimitExceeded
    );
    // read_frame rejects it before reading any plane: I420 has three planes, not 1024.
    assert!(matches!(
        read_frame(input, &ReadOptions::default()),
        Err(ReadError::Frame(FrameError::BadGeometry { .. }))
    ));

    // Without a limit the same message "reads" as a gigabyte: the limit is what stopped it.
    let unlimited = ReadOptions {
        traversal_limit_words: Some(u64::MAX),
        ..ReadOptions::default()
    };
    let (read, _) = read_framed(input, &unlimited).unwrap();
    let frame: frame::Reader<'_> = read.get_root().unwrap();
    let total: usize = frame
        .get_planes()
        .unwrap()
        .iter()
        .map(|p| p.get_data().unwrap().len())
        .sum();
    assert_eq!(total, 1 << 30);
}

#[test]
fn explicit_traversal_limit_is_applied() {
    let frame = small_frame();
    let options = ReadOptions {
        traversal_limit_words: Some(4),
        ..ReadOptions::default()
    };
    let (read, _) = read_framed(bytes(&frame), &options).unwrap();
    match FrameView::new(&read) {
        Err(FrameError::Capnp(e)) => assert_eq!(e.kind, ErrorKind::ReadLimitExceeded),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[test]
fn nesting_limit_stops_cycles() {
    // The root struct's only pointer points back at the struct itself.
    let input = aligned(&wire::frame(&[vec![
        wire::struct_ptr(0, 0, 1),
        wire::struct_ptr(-1, 0, 1),
    ]]));
    let (read, _) = read_framed(bytes(&input), &ReadOptions::default()).unwrap();
    let root: capnp::any_pointer::Reader<'_> = read.get_root().unwrap();
    let err = root.target_size().unwrap_err();
    assert_eq!(err.kind, ErrorKind::MessageIsTooDeeplyNested);
    // The option is passed through: with no nesting allowed even the root struct fails.
    let options = ReadOptions {
        nesting_limit: 0,
        ..ReadOptions::default()
    };
    let frame = small_frame();
    let (read, _) = read_framed(bytes(&frame), &options).unwrap();
    assert!(read.get_root::<frame::Reader<'_>>().is_err());
    assert!(matches!(
        read_frame(bytes(&frame), &options),
        Err(ReadError::Capnp(_))
    ));
}

#[test]
fn far_pointer_to_a_far_pointer_is_rejected() {
    // Segment 0's root is a far pointer to segment 1, whose landing pad points back.
    let input = aligned(&wire::frame(&[
        vec![wire::far_ptr(false, 0, 1)],
        vec![wire::far_ptr(false, 0, 0)],
    ]));
    let (read, _) = read_framed(bytes(&input), &ReadOptions::default()).unwrap();
    assert!(read.get_root::<frame::Reader<'_>>().is_err());
    assert!(read
        .get_root::<capnp::any_pointer::Reader<'_>>()
        .unwrap()
        .target_size()
        .is_err());
    // A far pointer into a segment that does not exist.
    let input = aligned(&wire::frame(&[vec![wire::far_ptr(true, 0, 9)]]));
    let (read, _) = read_framed(bytes(&input), &ReadOptions::default()).unwrap();
    assert!(read.get_root::<frame::Reader<'_>>().is_err());
}

// ---------------------------------------------------------------------------------------------
// read_frame's frame checks.

fn frame_with(edit: impl FnOnce(frame::Builder<'_>)) -> Vec<Word> {
    let mut message = Builder::new_default();
    build_frame(&mut message, &spec(PixelFormat::I420, 4, 2));
    edit(message.get_root::<frame::Builder<'_>>().unwrap());
    write(&message)
}

#[test]
fn read_frame_rejects_unknown_formats() {
    let unknown = frame_with(|mut f| f.set_format(PixelFormat::Unknown));
    assert!(matches!(
        read_frame(bytes(&unknown), &ReadOptions::default()),
        Err(ReadError::Frame(FrameError::UnknownFormat(
            PixelFormat::Unknown
        )))
    ));
    // A value outside the schema: patch the format field (data word 5, low 16 bits).
    let mut patched = frame_with(|_| ());
    let raw = Word::words_to_bytes_mut(&mut patched);
    let format_at = 8 + 8 + 5 * 8; // table, root pointer, five data words
    assert_eq!(raw[format_at], PixelFormat::I420 as u8);
    raw[format_at] = 99;
    match read_frame(bytes(&patched), &ReadOptions::default()) {
        Err(ReadError::Capnp(e)) => {
            assert!(matches!(
                e.kind,
                ErrorKind::EnumValueOrUnionDiscriminantNotPresent(_)
            ));
        }
        other => panic!("{:?}", other.map(|(_, len)| len)),
    }
    // read_framed does not look at the content.
    assert!(read_framed(bytes(&patched), &ReadOptions::default()).is_ok());
}

#[test]
fn read_frame_rejects_a_plane_count_other_than_the_formats() {
    for planes in [0, 1, 2, 4] {
        let edited = frame_with(|f| {
            f.init_planes(planes);
        });
        assert!(
            matches!(
                read_frame(bytes(&edited), &ReadOptions::default()),
                Err(ReadError::Frame(FrameError::BadGeometry {
                    format: PixelFormat::I420,
                    ..
                }))
            ),
            "{planes} planes"
        );
    }
}

#[test]
fn read_frame_rejects_geometry_invalid_for_the_format() {
    for (width, height) in [(0, 2), (5, 2), (4, 3)] {
        let edited = frame_with(|mut f| {
            f.set_width(width);
            f.set_height(height);
        });
        assert!(
            matches!(
                read_frame(bytes(&edited), &ReadOptions::default()),
                Err(ReadError::Frame(FrameError::BadGeometry { .. }))
            ),
            "{width}x{height}"
        );
    }
}

#[test]
fn read_frame_rejects_planes_smaller_than_width_and_height_need() {
    // The data still covers stride * rows; it is the geometry that does not fit in it.
    let narrow = frame_with(|f| f.get_planes().unwrap().get(0).set_stride(3));
    let short = frame_with(|f| f.get_planes().unwrap().get(2).set_rows(0));
    for edited in [narrow, short] {
        assert!(matches!(
            read_frame(bytes(&edited), &ReadOptions::default()),
            Err(ReadError::Frame(FrameError::BadGeometry { .. }))
        ));
        let (read, _) = read_framed(bytes(&edited), &ReadOptions::default()).unwrap();
        assert!(FrameView::new(&read).is_ok());
    }
}

#[test]
fn read_frame_accepts_padded_strides_and_extra_rows() {
    let padded = frame_with(|f| {
        let layouts = capnp_rdma::frame::plane_layouts(PixelFormat::I420, 4, 2).unwrap();
        let mut planes = f.init_planes(3);
        for (i, layout) in (0..).zip(&layouts) {
            let mut plane = planes.reborrow().get(i);
            plane.set_stride(layout.stride + 60);
            plane.set_rows(layout.rows + 1);
            plane.init_data((layout.stride + 60) * (layout.rows + 1));
        }
    });
    let (read, _) = read_frame(bytes(&padded), &ReadOptions::default()).unwrap();
    assert_eq!(
        FrameView::new(&read).unwrap().plane(0).unwrap().len(),
        64 * 3
    );
}

#[test]
fn read_frame_rejects_planes_shorter_than_stride_times_rows() {
    let short = frame_with(|f| f.get_planes().unwrap().get(1).set_rows(3));
    assert!(matches!(
        read_frame(bytes(&short), &ReadOptions::default()),
        Err(ReadError::Capnp(_))
    ));
}

/// Reads every field and plane once, through the typed API.
fn read_everything<S: ReaderSegments>(
    message: &capnp::message::Reader<S>,
) -> Result<(), FrameError> {
    let view = FrameView::new(message)?;
    for plane in 0..view.plane_count()? {
        black_box(view.plane(plane)?);
    }
    for entry in view.reader().get_metadata()? {
        black_box((entry.get_key()?, entry.get_value()?));
    }
    Ok(())
}

#[test]
fn read_frame_does_not_spend_the_returned_readers_budget() {
    let frame = small_frame();
    let with_limit = |words| ReadOptions {
        traversal_limit_words: Some(words),
        ..ReadOptions::default()
    };
    // The smallest limit under which a plain read_framed can read everything once.
    let minimal = (0..10_000)
        .find(|&words| {
            let (read, _) = read_framed(bytes(&frame), &with_limit(words)).unwrap();
            read_everything(&read).is_ok()
        })
        .unwrap();
    assert!(minimal > 0);
    // read_frame's checks ran on their own budget: the same limit still reads everything.
    let (read, _) = read_frame(bytes(&frame), &with_limit(minimal)).unwrap();
    read_everything(&read).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The hot path allocates nothing.

fn framed_segments(count: usize) -> Vec<Word> {
    let segments: Vec<Vec<u64>> = (0..count).map(|i| vec![i as u64; 1 + i % 2]).collect();
    aligned(&wire::frame(&segments))
}

#[test]
fn read_framed_does_not_allocate_up_to_32_segments() {
    for count in [1, 4, 32] {
        let input = framed_segments(count);
        let before = allocations();
        let (read, len) = read_framed(bytes(&input), &ReadOptions::default()).unwrap();
        black_box(read.get_segments().get_segment(count as u32 - 1));
        drop(black_box(read));
        assert_eq!(allocations() - before, 0, "{count} segments");
        assert_eq!(len, bytes(&input).len());
    }
    let input = framed_segments(33);
    let before = allocations();
    let read = read_framed(bytes(&input), &ReadOptions::default()).unwrap();
    drop(black_box(read));
    assert_eq!(
        allocations() - before,
        1,
        "33 segments: one allocation for the bounds"
    );
}

#[test]
fn in_place_segments_borrow_the_buffer() {
    let input = framed_segments(4);
    let segments = InPlaceSegments::new(bytes(&input), 512).unwrap();
    assert_eq!(segments.as_bytes().as_ptr(), bytes(&input).as_ptr());
    for i in 0..4 {
        let segment = segments.segment(i).unwrap();
        let offset = segment.as_ptr() as usize - bytes(&input).as_ptr() as usize;
        assert_eq!(Some(offset as u64), segments.table().segment_offset(i));
        assert_eq!(segment.as_ptr() as usize % 8, 0);
    }
    assert_eq!(segments.segment(4), None);
}

// ---------------------------------------------------------------------------------------------
// Random damage never panics.

/// A multi-segment frame (far pointers, metadata) and a single-segment one.
fn mutation_bases() -> [Vec<u8>; 2] {
    let spec = spec(PixelFormat::I420, 8, 4);
    let allocator = HeapAllocator::new()
        .first_segment_words(4)
        .allocation_strategy(AllocationStrategy::FixedSize);
    let mut multi = Builder::new(allocator);
    build_frame(&mut multi, &spec);
    let mut single = Builder::new_default();
    build_frame(&mut single, &spec);
    [
        bytes(&write(&multi)).to_vec(),
        bytes(&write(&single)).to_vec(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn mutated_frames_read_or_fail_with_a_typed_error(
        base in 0usize..2,
        bytes_set in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..12),
        words_set in prop::collection::vec((any::<prop::sample::Index>(), any::<u32>()), 0..4),
        truncate in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let mut input = mutation_bases()[base].clone();
        for (at, value) in bytes_set {
            let at = at.index(input.len());
            input[at] = value;
        }
        for (at, value) in words_set {
            // Aligned u32s: segment lengths, pointer offsets, list sizes.
            let at = at.index(input.len() / 4) * 4;
            input[at..at + 4].copy_from_slice(&value.to_le_bytes());
        }
        if let Some(len) = truncate {
            input.truncate(len.index(input.len() + 1));
        }
        let buffer = aligned(&input);
        let aligned_input = &Word::words_to_bytes(&buffer)[..input.len()];
        match read_framed(aligned_input, &ReadOptions::default()) {
            Ok((read, len)) => {
                prop_assert!(len <= input.len() && len % 8 == 0);
                prop_assert_eq!(read.get_segments().table().message_bytes(), len as u64);
            }
            Err(error) => {
                // Typed, and displayable without panicking.
                prop_assert!(!error.to_string().is_empty());
            }
        }
        if let Ok((read, _)) = read_frame(aligned_input, &ReadOptions::default()) {
            let view = FrameView::new(&read).unwrap();
            for plane in 0..view.plane_count().unwrap() {
                view.plane(plane).unwrap();
            }
        }
        // Full traversal, typed and untyped.
        reader::fuzz_read_framed(&input);
    }
}

// ---------------------------------------------------------------------------------------------
// Cost of the hot path, against capnp's own in-place readers in the same run.
// cargo test --release -p capnp-rdma --test reader -- --ignored --nocapture read_framed_cost

/// The fastest of many short rounds, in ns per call: the machine is shared, and a round that
/// was not descheduled is the least disturbed estimate.
fn time_per_call(iterations: u32, mut f: impl FnMut()) -> f64 {
    const ROUNDS: u32 = 200;
    let per_round = (iterations / ROUNDS).max(1);
    (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..per_round {
                f();
            }
            start.elapsed().as_nanos() as f64 / f64::from(per_round)
        })
        .fold(f64::INFINITY, f64::min)
}

#[test]
#[ignore = "measurement; run in release with --nocapture"]
fn read_framed_cost() {
    let spec = spec(PixelFormat::I420, 1920, 1080);
    let allocator = HeapAllocator::new()
        .first_segment_words(64)
        .allocation_strategy(AllocationStrategy::FixedSize);
    let mut message = Builder::new(allocator);
    build_frame(&mut message, &spec);
    assert_eq!(message.get_segments_for_output().len(), 4);
    let buffer = write(&message);
    let input = bytes(&buffer);
    let segments: Vec<&[u8]> = (0..4)
        .map(|i| {
            InPlaceSegments::new(input, 512)
                .unwrap()
                .segment(i)
                .unwrap()
        })
        .collect();
    let n = 2_000_000;
    let options = ReadOptions::default();

    let before = allocations();
    let ours = time_per_call(n, || {
        let (read, len) = read_framed(black_box(input), &options).unwrap();
        black_box((&read, len));
    });
    let ours_allocs = allocations() - before;
    let table = time_per_call(n, || {
        black_box(SegmentTable::parse(black_box(input), 512).unwrap());
    });
    let reader_new = time_per_call(n, || {
        let read = capnp::message::Reader::new(black_box(&segments[..]), Default::default());
        black_box(&read);
    });
    let no_alloc = time_per_call(n, || {
        let mut slice = black_box(input);
        let read =
            capnp::serialize::read_message_from_flat_slice_no_alloc(&mut slice, Default::default())
                .unwrap();
        black_box(&read);
    });
    let flat = time_per_call(n, || {
        let mut slice = black_box(input);
        let read =
            capnp::serialize::read_message_from_flat_slice(&mut slice, Default::default()).unwrap();
        black_box(&read);
    });
    let view = time_per_call(n / 10, || {
        let (read, _) = read_framed(black_box(input), &options).unwrap();
        let view = FrameView::new(&read).unwrap();
        black_box(view.plane(0).unwrap()[0]);
    });
    println!(
        "4-segment 1080p I420 frame ({} bytes), ns per call:",
        input.len()
    );
    println!("  reader::read_framed                     {ours:8.1}  ({ours_allocs} allocations in {n} calls)");
    println!("  SegmentTable::parse                     {table:8.1}");
    println!("  capnp Reader::new(&[&[u8]]) (baseline)  {reader_new:8.1}");
    println!("  capnp read_message_from_flat_slice_no_alloc {no_alloc:8.1}");
    println!("  capnp read_message_from_flat_slice      {flat:8.1}");
    println!("  read_framed + FrameView::new + plane(0) {view:8.1}");
    println!(
        "  read_framed - Reader::new               {:8.1}",
        ours - reader_new
    );
}
