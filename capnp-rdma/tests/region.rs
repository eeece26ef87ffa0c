//! Region creation, opening, validation and the release/scrub path.

use capnp_rdma::region::Geometry;
use capnp_rdma::{HugePages, OpenOptions, Region, RegionError, RegionOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn temp_path(tag: &str) -> PathBuf {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    std::env::temp_dir().join(format!("capnp-rdma-{tag}-{}-{r:x}", std::process::id()))
}

struct Cleanup(PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn geometry_is_validated() {
    for (size, bs) in [(1 << 20, 3000), (1 << 20, 2048), (1 << 20, 4 << 20)] {
        assert!(matches!(
            Region::create(&RegionOptions::memfd(size).block_size(bs)),
            Err(RegionError::BadBlockSize { .. })
        ));
    }
    assert!(matches!(
        Region::create(&RegionOptions::memfd(8192).block_size(4096)),
        Err(RegionError::TooSmall { .. })
    ));
    let r = Region::create(&RegionOptions::memfd(64 << 20).block_size(2 << 20)).unwrap();
    assert_eq!(r.geometry(), Geometry::compute(64 << 20, 2 << 20).unwrap());
    assert_eq!(r.geometry().data_offset % (2 << 20), 0);
}

#[test]
fn opening_foreign_or_damaged_files_is_a_typed_error() {
    let path = temp_path("foreign");
    let _c = Cleanup(path.clone());
    // Too short for a header.
    std::fs::write(&path, b"hello").unwrap();
    assert!(matches!(
        Region::open_path(&path, &OpenOptions::default()),
        Err(RegionError::Truncated { .. })
    ));
    // Long enough, but not ours.
    std::fs::write(&path, vec![0x5a; 1 << 20]).unwrap();
    assert!(matches!(
        Region::open_path(&path, &OpenOptions::default()),
        Err(RegionError::NotARegion { .. })
    ));
    std::fs::remove_file(&path).unwrap();

    // A real region, then damaged in various ways.
    drop(Region::create(&RegionOptions::file(&path, 2 << 20).block_size(4096)).unwrap());
    let pristine = std::fs::read(&path).unwrap();
    assert!(Region::open_path(&path, &OpenOptions::default()).is_ok());

    let mut other_version = pristine.clone();
    other_version[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&path, &other_version).unwrap();
    assert!(matches!(
        Region::open_path(&path, &OpenOptions::default()),
        Err(RegionError::UnsupportedVersion { found: 99, .. })
    ));

    std::fs::write(&path, &pristine[..pristine.len() / 2]).unwrap();
    assert!(matches!(
        Region::open_path(&path, &OpenOptions::default()),
        Err(RegionError::Truncated { .. })
    ));

    let mut bad_geometry = pristine.clone();
    bad_geometry[32..40].copy_from_slice(&7u64.to_le_bytes()); // block_count
    std::fs::write(&path, &bad_geometry).unwrap();
    assert!(matches!(
        Region::open_path(&path, &OpenOptions::default()),
        Err(RegionError::CorruptHeader { .. })
    ));

    let mut huge_offset = pristine.clone();
    huge_offset[80..88].copy_from_slice(&u64::MAX.to_le_bytes()); // data_offset
    std::fs::write(&path, &huge_offset).unwrap();
    assert!(matches!(
        Region::open_path(&path, &OpenOptions::default()),
        Err(RegionError::CorruptHeader { .. })
    ));

    let mut unfinished = pristine;
    unfinished[128..136].fill(0); // state: never marked ready
    std::fs::write(&path, &unfinished).unwrap();
    assert!(matches!(
        Region::open_path(&path, &OpenOptions::default()),
        Err(RegionError::CorruptHeader { .. })
    ));
}

#[test]
fn file_region_persists_contents() {
    let path = temp_path("persist");
    let _c = Cleanup(path.clone());
    let (offset, id) = {
        let region = Region::create(&RegionOptions::file(&path, 4 << 20).block_size(4096)).unwrap();
        let mut lease = region.lease(10_000).unwrap();
        lease.as_mut_slice()[..5].copy_from_slice(b"frame");
        let offset = lease.offset();
        std::mem::forget(lease); // keep the blocks allocated in the file
        (offset, region.id())
    };
    let region = Region::open_path(&path, &OpenOptions::default()).unwrap();
    assert_eq!(region.id(), id);
    // SAFETY: nobody else uses this region.
    let bytes = unsafe { region.bytes(offset, 5) }.unwrap();
    assert_eq!(bytes, b"frame");
    assert_eq!(region.stats().blocks_in_use, 3);
    // The forgotten lease belongs to this (live) process's earlier slot: not reclaimable.
    assert_eq!(region.reclaim_dead_owners().unwrap().blocks, 0);
    assert!(region.check_range(offset, 1 << 30).is_err());
    assert!(region.check_range(0, 8).is_err(), "the header is not data");
}

#[test]
fn shared_by_fd_and_by_name() {
    let region = Region::create(&RegionOptions::memfd(8 << 20)).unwrap();
    let fd = region.fd().try_clone_to_owned().unwrap();
    let other = Region::open_fd(fd, &OpenOptions::default()).unwrap();
    assert_eq!(other.id(), region.id());
    assert_ne!(other.owner_slot(), region.owner_slot());
    let mut lease = other.lease(1).unwrap();
    lease.as_mut_slice()[0] = 42;
    assert_eq!(
        region.stats().blocks_in_use,
        1,
        "one bitmap, seen from both handles"
    );
    // SAFETY: the lease holder does not write while we read.
    assert_eq!(unsafe { region.bytes(lease.offset(), 1) }.unwrap()[0], 42);
    drop(lease);
    other.quiesce();
    assert_eq!(region.stats().blocks_in_use, 0);

    let name = format!("capnp-rdma-test-name-{}", std::process::id());
    let named = Region::create(&RegionOptions::shm(&name, 4 << 20)).unwrap();
    let by_name = Region::open_shm(&name, &OpenOptions::default()).unwrap();
    assert_eq!(by_name.id(), named.id());
    drop((named, by_name));
    assert!(
        Region::open_shm(&name, &OpenOptions::default()).is_err(),
        "the creator unlinks the name"
    );
    let _ = region.fd().as_fd();
}

#[test]
fn released_blocks_come_back_zeroed_both_paths() {
    let region = Region::create(&RegionOptions::memfd(4 << 20).block_size(4096)).unwrap();
    let blocks = region.geometry().block_count;
    // Dirty every block through leases; small ones are zeroed inline, big ones by the scrubber.
    for size in [100u64, 64 << 10, region.geometry().data_bytes()] {
        let mut lease = region.lease(size).unwrap();
        lease.as_mut_slice().fill(0xEE);
        drop(lease);
        region.quiesce();
    }
    region.quiesce();
    let s = region.stats();
    assert!(s.inline_scrubbed_bytes > 0 && s.scrubbed_bytes > 0, "{s:?}");
    assert_eq!(s.blocks_in_use, 0);
    let all = region.lease(blocks * 4096).unwrap();
    assert!(all.as_slice().iter().all(|&b| b == 0));
}

#[test]
fn huge_page_policies() {
    match Region::create(&RegionOptions::memfd(8 << 20).huge_pages(HugePages::Require)) {
        Ok(r) => assert!(r.huge_pages()),
        Err(RegionError::HugePagesUnavailable { .. }) => {}
        Err(e) => panic!("unexpected error {e}"),
    }
    // Prefer always succeeds, with or without explicit huge pages.
    let r = Region::create(&RegionOptions::memfd(8 << 20).huge_pages(HugePages::Prefer)).unwrap();
    let _ = r.huge_pages();
    assert!(matches!(
        Region::create(
            &RegionOptions::file(temp_path("huge"), 8 << 20).huge_pages(HugePages::Require)
        ),
        Err(RegionError::HugePagesUnavailable { .. })
    ));
}

#[test]
fn mlock_reports_success_or_a_clear_error() {
    match Region::create(&RegionOptions::memfd(4 << 20).mlock(true)) {
        Ok(_) => {}
        Err(RegionError::Mlock { limit, .. }) => assert!(!limit.is_empty()),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[test]
fn exhausted_lease_is_a_typed_error_and_wait_sees_frees() {
    let region = Region::create(&RegionOptions::memfd(1 << 20).block_size(4096)).unwrap();
    let all = region.lease(region.geometry().data_bytes()).unwrap();
    match region.lease(1) {
        Err(RegionError::Exhausted {
            requested: 1,
            free: 0,
            ..
        }) => {}
        other => panic!("expected Exhausted, got {other:?}"),
    }
    // An allocator waiting for space is woken by a release from another thread.
    let r2 = region.clone();
    let waiter = std::thread::spawn(move || {
        let start = Instant::now();
        let mut message = capnp::message::Builder::new(capnp_rdma::StagingAllocator::with_options(
            &r2,
            capnp_rdma::AllocatorOptions {
                exhausted: capnp_rdma::Exhausted::WaitThenHeap(Duration::from_secs(10)),
                ..Default::default()
            },
        ));
        message
            .init_root::<capnp::any_pointer::Builder>()
            .set_as::<capnp::text::Owned>("x")
            .unwrap();
        (start.elapsed(), r2.stats().fallbacks)
    });
    std::thread::sleep(Duration::from_millis(200));
    drop(all);
    let (waited, fallbacks) = waiter.join().unwrap();
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    assert_eq!(fallbacks, 0);
    assert_eq!(region.stats().waits, 1);

    // With the wait policy's deadline passed, the allocator falls back to the heap.
    let all = region.lease(region.geometry().data_bytes()).unwrap();
    let mut message = capnp::message::Builder::new(capnp_rdma::StagingAllocator::with_options(
        &region,
        capnp_rdma::AllocatorOptions {
            exhausted: capnp_rdma::Exhausted::WaitThenHeap(Duration::from_millis(20)),
            ..Default::default()
        },
    ));
    message
        .init_root::<capnp::any_pointer::Builder>()
        .set_as::<capnp::text::Owned>("y")
        .unwrap();
    assert_eq!(region.stats().fallbacks, 1);
    drop((message, all));
}

#[test]
fn region_file_write_does_not_break_open() {
    // A file region whose data area is scribbled on still opens (the data area is not metadata).
    let path = temp_path("scribble");
    let _c = Cleanup(path.clone());
    let geo = Region::create(&RegionOptions::file(&path, 2 << 20).block_size(4096))
        .unwrap()
        .geometry();
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(geo.data_offset)).unwrap();
    f.write_all(&[0xff; 4096]).unwrap();
    drop(f);
    let r = Region::open_path(&path, &OpenOptions::default()).unwrap();
    assert_eq!(r.stats().blocks_in_use, 0);
}
