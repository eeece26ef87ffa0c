//! The scatter-gather list of a message built with the StagingAllocator is byte-identical to
//! `capnp::serialize::write_message`, respects max_sge and the copy threshold, and reads back.

mod wire;

use capnp_rdma::allocator::TABLE_PREFIX_BYTES;
use capnp_rdma::frame::{FrameSpec, FrameView, FrameWriter, PixelFormat};
use capnp_rdma::framing::{FramingError, FramingOptions, SgeList, SgeOverflow};
use capnp_rdma::reader::{read_framed, ReadOptions};
use capnp_rdma::{AllocatorOptions, Exhausted, Region, RegionOptions, StagingAllocator};
use proptest::prelude::*;
use wire::aligned;

fn region(size: u64, block: u64) -> Region {
    Region::create(&RegionOptions::memfd(size).block_size(block)).unwrap()
}

fn check_entries(region: &Region, sges: &SgeList<'_>, options: &FramingOptions) {
    assert!(sges.entries().len() <= options.max_sge);
    let geo = region.geometry();
    for e in sges.entries() {
        assert!(e.offset >= geo.data_offset && e.offset + u64::from(e.len) <= geo.region_bytes);
        assert_eq!(e.offset % 8, 0, "entries stay word aligned");
    }
    assert_eq!(
        sges.total_len(),
        sges.entries().iter().map(|e| u64::from(e.len)).sum::<u64>()
    );
}

#[test]
fn i420_1080p_frame_is_four_entries_with_no_copy() {
    let region = region(64 << 20, 64 << 10);
    let mut message = capnp::message::Builder::new(StagingAllocator::new(&region));
    let mut spec = FrameSpec::new(PixelFormat::I420, 1920, 1080);
    spec.metadata.push(("codec".into(), b"h264".to_vec()));
    let mut frame = FrameWriter::init(&mut message, &spec).unwrap();
    for i in 0..3 {
        frame.plane_mut(i).unwrap().fill(i as u8 + 1);
    }
    let expected = capnp::serialize::write_message_to_words(&message);
    assert_eq!(
        message.get_segments_for_output().len(),
        4,
        "header + one segment per plane"
    );
    let options = FramingOptions::default();
    let sges = SgeList::build(&region, &mut message, &options).unwrap();
    check_entries(&region, &sges, &options);
    assert_eq!(sges.entries().len(), 4);
    assert_eq!(sges.bytes_copied(), 0);
    assert!(sges.scratch().is_none());
    // The table sits right in front of segment 0, inside its first block.
    let first = sges.entries()[0];
    assert_eq!(
        (first.offset - region.geometry().data_offset) % (64 << 10),
        TABLE_PREFIX_BYTES - 24
    );
    // Each plane is exactly its landing pad plus its pixels.
    assert_eq!(sges.entries()[1].len, 8 + 1920 * 1080);
    assert_eq!(sges.entries()[2].len, 8 + 960 * 540);
    assert_eq!(sges.to_vec(), expected);

    let reader = sges.read(&ReadOptions::default()).unwrap();
    let view = FrameView::new(&reader).unwrap();
    for i in 0..3 {
        let plane = view.plane(i).unwrap();
        assert!(plane.iter().all(|&b| b == i as u8 + 1));
    }
    // The same bytes, delivered contiguously (as a transport would), read the same way.
    let contiguous = aligned(&sges.to_vec());
    let (reader, used) = read_framed(
        capnp::Word::words_to_bytes(&contiguous),
        &ReadOptions::default(),
    )
    .unwrap();
    assert_eq!(used as u64, sges.total_len());
    assert_eq!(FrameView::new(&reader).unwrap().plane(2).unwrap()[0], 3);
}

fn many_blobs(
    region: &Region,
    count: u32,
    blob: usize,
    options: AllocatorOptions,
) -> capnp::message::Builder<StagingAllocator> {
    let mut message = capnp::message::Builder::new(StagingAllocator::with_options(region, options));
    let mut list = message.initn_root::<capnp::data_list::Builder>(count);
    for i in 0..count {
        list.set(i, &vec![i as u8; blob]);
    }
    message
}

#[test]
fn more_segments_than_max_sge() {
    let region = region(64 << 20, 4096);
    let options = AllocatorOptions {
        large_segment_bytes: 1024,
        ..Default::default()
    };
    let mut message = many_blobs(&region, 40, 2000, options);
    assert!(message.get_segments_for_output().len() > 35);
    let expected = capnp::serialize::write_message_to_words(&message);

    let strict = FramingOptions {
        overflow: SgeOverflow::Error,
        ..Default::default()
    };
    match SgeList::build(&region, &mut message, &strict) {
        Err(FramingError::TooManyEntries {
            needed,
            max_sge: 30,
        }) => assert!(needed > 30),
        other => panic!("expected TooManyEntries, got {other:?}"),
    }
    let options = FramingOptions::default();
    let sges = SgeList::build(&region, &mut message, &options).unwrap();
    check_entries(&region, &sges, &options);
    assert_eq!(sges.entries().len(), 30);
    assert!(sges.bytes_copied() > 0);
    assert_eq!(sges.to_vec(), expected);
    let reader = sges.read(&ReadOptions::default()).unwrap();
    let list: capnp::data_list::Reader = reader.get_root().unwrap();
    assert_eq!(list.get(39).unwrap(), &[39u8; 2000][..]);
}

#[test]
fn small_segments_are_coalesced_by_copy() {
    let region = region(16 << 20, 4096);
    let mut message = capnp::message::Builder::new(StagingAllocator::with_options(
        &region,
        AllocatorOptions {
            large_segment_bytes: 8,
            ..Default::default()
        },
    ));
    // Every object lands in its own small, exactly-sized segment.
    let mut list = message.initn_root::<capnp::data_list::Builder>(6);
    for i in 0..6 {
        list.set(i, &[i as u8; 16]);
    }
    let n = message.get_segments_for_output().len();
    assert!(n >= 7, "{n} segments");
    let expected = capnp::serialize::write_message_to_words(&message);
    let sges = SgeList::build(&region, &mut message, &FramingOptions::default()).unwrap();
    assert_eq!(sges.to_vec(), expected);
    // Every piece is under the threshold: they are all copied into one entry.
    assert_eq!(
        sges.entries().len(),
        1,
        "all pieces are small: one copied entry"
    );
    let table = (4 * (n as u64 + 1)).next_multiple_of(8);
    assert_eq!(sges.bytes_copied() as u64, sges.total_len() - table);

    let no_copy = FramingOptions {
        copy_threshold: 0,
        max_sge: 64,
        ..Default::default()
    };
    drop(sges);
    let sges = SgeList::build(&region, &mut message, &no_copy).unwrap();
    assert_eq!(sges.entries().len(), n, "table shares segment 0's entry");
    assert_eq!(sges.bytes_copied(), 0);
    assert_eq!(sges.to_vec(), expected);
}

#[test]
fn heap_fallback_segments_are_copied_and_counted() {
    let region = region(1 << 20, 4096);
    let options = AllocatorOptions {
        exhausted: Exhausted::Heap,
        ..Default::default()
    };
    let mut message = many_blobs(&region, 5, 300_000, options);
    assert!(region.stats().fallbacks >= 1, "{:?}", region.stats());
    let expected = capnp::serialize::write_message_to_words(&message);
    match SgeList::build(&region, &mut message, &FramingOptions::default()) {
        // The region is too small to hold copies of the heap segments: a typed error.
        Err(FramingError::Scratch { .. }) => {}
        Ok(sges) => assert_eq!(sges.to_vec(), expected),
        Err(e) => panic!("unexpected {e}"),
    }
    drop(message);

    let big = self::region(16 << 20, 4096);
    let mut message = capnp::message::Builder::new_default(); // all heap
    message
        .init_root::<capnp::any_pointer::Builder>()
        .set_as::<capnp::text::Owned>("hello")
        .unwrap();
    let expected = capnp::serialize::write_message_to_words(&message);
    let sges = SgeList::build(&big, &mut message, &FramingOptions::default()).unwrap();
    assert_eq!(sges.to_vec(), expected);
    assert!(sges.bytes_copied() > 0);
}

#[test]
fn empty_message_is_an_error() {
    let region = region(1 << 20, 4096);
    let mut message = capnp::message::Builder::new(StagingAllocator::new(&region));
    assert!(matches!(
        SgeList::build(&region, &mut message, &FramingOptions::default()),
        Err(FramingError::EmptyMessage)
    ));
}

#[test]
fn segments_are_released_and_reused_clean() {
    let region = region(8 << 20, 4096);
    for round in 0..20u8 {
        let mut message = capnp::message::Builder::new(StagingAllocator::new(&region));
        let spec = FrameSpec::new(PixelFormat::Rgb24, 320, 240);
        let mut frame = FrameWriter::init(&mut message, &spec).unwrap();
        let plane = frame.plane_mut(0).unwrap();
        assert!(
            plane.iter().all(|&b| b == 0),
            "round {round}: dirty segment handed out"
        );
        plane.fill(round + 1);
        let _ = SgeList::build(&region, &mut message, &FramingOptions::default()).unwrap();
        drop(message);
        if round % 4 == 0 {
            region.quiesce();
        }
    }
    region.quiesce();
    assert_eq!(region.stats().blocks_in_use, 0);
    assert_eq!(region.audit().table_blocks, 0);
}

#[derive(Debug, Clone)]
struct Case {
    format: u8,
    width: u32,
    height: u32,
    metadata: Vec<(String, Vec<u8>)>,
    large_segment_bytes: u64,
    copy_threshold: usize,
    max_sge: usize,
    block: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        0u8..4,
        1u32..200,
        1u32..120,
        proptest::collection::vec(
            (
                "[a-z]{0,12}",
                proptest::collection::vec(any::<u8>(), 0..600),
            ),
            0..12,
        ),
        prop_oneof![Just(8u64), Just(512), Just(16 << 10), 1u64..100_000],
        0usize..4096,
        1usize..40,
        prop_oneof![Just(4096u64), Just(16 << 10), Just(64 << 10)],
    )
        .prop_map(
            |(format, w, h, metadata, large_segment_bytes, copy_threshold, max_sge, block)| Case {
                format,
                width: w * 2,
                height: h * 2,
                metadata,
                large_segment_bytes,
                copy_threshold,
                max_sge,
                block,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn framing_equals_write_message(case in case()) {
        let region = region(64 << 20, case.block);
        let format = [PixelFormat::I420, PixelFormat::Nv12, PixelFormat::Rgb24, PixelFormat::Gray8][case.format as usize];
        let mut message = capnp::message::Builder::new(StagingAllocator::with_options(
            &region,
            AllocatorOptions { large_segment_bytes: case.large_segment_bytes, ..Default::default() },
        ));
        let mut spec = FrameSpec::new(format, case.width, case.height);
        spec.metadata = case.metadata.clone();
        let mut frame = FrameWriter::init(&mut message, &spec).unwrap();
        for i in 0..frame.plane_count() {
            for (j, b) in frame.plane_mut(i).unwrap().iter_mut().enumerate() {
                *b = (j as u32).wrapping_mul(31).wrapping_add(i) as u8;
            }
        }
        let expected = capnp::serialize::write_message_to_words(&message);
        let options = FramingOptions { copy_threshold: case.copy_threshold, max_sge: case.max_sge, overflow: SgeOverflow::Coalesce };
        let sges = SgeList::build(&region, &mut message, &options).unwrap();
        check_entries(&region, &sges, &options);
        prop_assert_eq!(sges.to_vec(), expected);

        let reader = sges.read(&ReadOptions::default()).unwrap();
        let view = FrameView::new(&reader).unwrap();
        let header = view.reader();
        prop_assert_eq!(header.get_width(), case.width);
        prop_assert_eq!(header.get_metadata().unwrap().len() as usize, case.metadata.len());
        for (i, (k, v)) in case.metadata.iter().enumerate() {
            let entry = header.get_metadata().unwrap().get(i as u32);
            prop_assert_eq!(entry.get_key().unwrap().to_str().unwrap(), k.as_str());
            prop_assert_eq!(entry.get_value().unwrap(), &v[..]);
        }
        for i in 0..view.plane_count().unwrap() {
            for (j, &b) in view.plane(i).unwrap().iter().enumerate() {
                prop_assert_eq!(b, (j as u32).wrapping_mul(31).wrapping_add(i) as u8);
            }
        }
        drop(reader);
        drop(sges);
        drop(message);
        region.quiesce();
        prop_assert_eq!(region.stats().blocks_in_use, 0);
    }
}
