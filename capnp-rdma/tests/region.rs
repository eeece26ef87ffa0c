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

// ---------------------------------------------------------------------------------------------
// Keeping allocations across a restart and adopting them.

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn kept_leases_survive_a_graceful_close_and_are_adopted() {
    use capnp_rdma::region::KeptAllocation;
    let path = temp_path("keep");
    let _c = Cleanup(path.clone());
    let bs = 4096u64;
    let (a, b, c): (KeptAllocation, KeptAllocation, KeptAllocation) = {
        let region = Region::create(&RegionOptions::file(&path, 4 << 20).block_size(bs)).unwrap();
        let keep = |bytes: u64, seed: u8| {
            let mut lease = region.lease(bytes).unwrap();
            let len = lease.len() as usize;
            lease.as_mut_slice().copy_from_slice(&pattern(seed, len));
            lease.keep()
        };
        let kept = (keep(10_000, 1), keep(1, 2), keep(2 * bs, 3));
        // A lease dropped normally is freed as usual.
        drop(region.lease(bs).unwrap());
        region.quiesce();
        assert_eq!(region.stats().blocks_in_use, 3 + 1 + 2);
        kept
    }; // graceful close: the slot is released as detached, the kept blocks stay allocated
    assert_eq!((a.len, b.len, c.len), (3 * bs, bs, 2 * bs));

    let region = Region::open_path(&path, &OpenOptions::default()).unwrap();
    assert_eq!(
        region.stats().blocks_in_use,
        6,
        "kept blocks survive in the file"
    );
    let audit = region.audit();
    assert_eq!(audit.orphaned_blocks(), 0, "{audit:?}");
    assert!(
        audit
            .owners
            .iter()
            .any(|&(slot, pid, n)| slot != region.owner_slot()
                && pid == std::process::id()
                && n == 3),
        "the detached slot still records its kept allocations: {audit:?}"
    );

    let lease_a = region.adopt(a.offset).unwrap();
    assert_eq!((lease_a.offset(), lease_a.len()), (a.offset, a.len));
    assert_eq!(lease_a.as_slice(), &pattern(1, a.len as usize)[..]);
    let lease_b = region.adopt(b.offset).unwrap();
    assert_eq!(lease_b.as_slice(), &pattern(2, b.len as usize)[..]);
    // Adopted once, it is ours (a live owner): not again.
    match region.adopt(a.offset) {
        Err(RegionError::OwnerAlive {
            offset, owner_slot, ..
        }) => {
            assert_eq!(offset, a.offset);
            assert_eq!(owner_slot, region.owner_slot());
        }
        other => panic!("expected OwnerAlive, got {other:?}"),
    }

    // Reclaim frees exactly what was kept and not adopted (c), and the detached slot.
    let report = region.reclaim_dead_owners().unwrap();
    assert_eq!(report.allocations, 1, "{report:?}");
    assert_eq!(report.blocks, 2);
    assert_eq!(report.detached_pids, vec![std::process::id()]);
    assert!(report.dead_pids.is_empty());
    assert_eq!(region.stats().blocks_in_use, 4);
    assert_eq!(region.audit().owners.len(), 1, "only our slot is left");
    assert!(matches!(
        region.adopt(c.offset),
        Err(RegionError::NoAllocation { .. })
    ));
    assert_eq!(region.reclaim_dead_owners().unwrap().allocations, 0);

    // A second restart: keep an adopted lease again, drop the other one.
    let a_again = lease_a.keep();
    assert_eq!(a_again, a);
    drop(lease_b);
    region.quiesce();
    drop(region);
    let region = Region::open_path(&path, &OpenOptions::default()).unwrap();
    assert_eq!(region.stats().blocks_in_use, 3);
    let lease_a = region.adopt(a.offset).unwrap();
    assert_eq!(lease_a.as_slice(), &pattern(1, a.len as usize)[..]);
    assert_eq!(region.reclaim_dead_owners().unwrap().allocations, 0);
    // Released normally, the adopted lease is zeroed and freed like any other.
    drop(lease_a);
    region.quiesce();
    assert_eq!(region.stats().blocks_in_use, 0);
    let all = region.lease(region.geometry().data_bytes()).unwrap();
    assert!(
        all.as_slice().iter().all(|&b| b == 0),
        "reclaimed and released blocks are zeroed"
    );
}

#[test]
fn adopting_from_a_live_owner_is_a_typed_error() {
    let region = Region::create(&RegionOptions::memfd(4 << 20).block_size(4096)).unwrap();
    let other = Region::open_fd(
        region.fd().try_clone_to_owned().unwrap(),
        &OpenOptions::default(),
    )
    .unwrap();
    let lease = other.lease(5000).unwrap();
    let kept = other.lease(1).unwrap().keep(); // kept, but its handle is still open
    for offset in [lease.offset(), kept.offset] {
        match region.adopt(offset) {
            Err(RegionError::OwnerAlive {
                offset: o,
                owner_slot,
                pid,
            }) => {
                assert_eq!(o, offset);
                assert_eq!(owner_slot, other.owner_slot());
                assert_eq!(pid, std::process::id());
            }
            other => panic!("expected OwnerAlive, got {other:?}"),
        }
    }
    // Our own allocation is held by a live owner too.
    let mine = region.lease(1).unwrap();
    assert!(matches!(
        region.adopt(mine.offset()),
        Err(RegionError::OwnerAlive { .. })
    ));
    // Nothing was taken or freed by the attempts.
    assert_eq!(region.stats().blocks_in_use, 2 + 1 + 1);
    assert_eq!(region.reclaim_dead_owners().unwrap().allocations, 0);
    assert_eq!(lease.len(), 2 * 4096);
}

#[test]
fn adopting_where_no_allocation_starts_is_a_typed_error() {
    let region = Region::create(&RegionOptions::memfd(4 << 20).block_size(4096)).unwrap();
    let geo = region.geometry();
    let end = geo.data_offset + geo.data_bytes();
    for offset in [
        0,
        geo.data_offset - 4096,
        geo.data_offset + 1,
        geo.data_offset + 4095,
        end,
        end + 4096,
        u64::MAX,
    ] {
        match region.adopt(offset) {
            Err(RegionError::NotABlockStart {
                offset: o,
                data_offset,
                block_size,
                ..
            }) => {
                assert_eq!(
                    (o, data_offset, block_size),
                    (offset, geo.data_offset, 4096)
                );
            }
            other => panic!("offset {offset}: expected NotABlockStart, got {other:?}"),
        }
    }
    // A free block, and the second block of a three-block allocation.
    assert!(matches!(
        region.adopt(geo.data_offset),
        Err(RegionError::NoAllocation { offset }) if offset == geo.data_offset
    ));
    let lease = region.lease(3 * 4096).unwrap();
    assert!(matches!(
        region.adopt(lease.offset() + 4096),
        Err(RegionError::NoAllocation { .. })
    ));
    assert!(matches!(
        region.adopt(end - 4096),
        Err(RegionError::NoAllocation { .. })
    ));
}

#[test]
fn a_leaked_lease_is_not_detached_at_close() {
    // A forgotten lease (not kept) keeps the owner slot claimed while this process lives:
    // neither adoptable nor reclaimable until the process is gone.
    let path = temp_path("leak");
    let _c = Cleanup(path.clone());
    let (leaked, kept) = {
        let region = Region::create(&RegionOptions::file(&path, 2 << 20).block_size(4096)).unwrap();
        let leaked = region.lease(1).unwrap();
        let offset = leaked.offset();
        std::mem::forget(leaked);
        (offset, region.lease(1).unwrap().keep())
    };
    let region = Region::open_path(&path, &OpenOptions::default()).unwrap();
    for offset in [leaked, kept.offset] {
        assert!(matches!(
            region.adopt(offset),
            Err(RegionError::OwnerAlive { .. })
        ));
    }
    assert_eq!(region.reclaim_dead_owners().unwrap().allocations, 0);
    assert_eq!(region.stats().blocks_in_use, 2);
}

#[test]
fn adopters_and_reclaimers_race_without_losing_or_sharing_blocks() {
    // Kept allocations of a detached slot; two handles adopt every one of them while a third
    // reclaims. Each allocation ends adopted by exactly one handle with its bytes intact, or
    // freed (and then not adoptable); nothing is freed under an adopter.
    let path = temp_path("race");
    let _c = Cleanup(path.clone());
    let bs = 4096u64;
    let count = 200usize;
    let kept: Vec<_> = {
        let region = Region::create(&RegionOptions::file(&path, 8 << 20).block_size(bs)).unwrap();
        (0..count)
            .map(|i| {
                let mut lease = region.lease(bs * (1 + (i as u64 % 3))).unwrap();
                let len = lease.len() as usize;
                lease.as_mut_slice().copy_from_slice(&pattern(i as u8, len));
                lease.keep()
            })
            .collect()
    };
    // Each round races over what the previous one adopted and kept again.
    let mut left = count as u64;
    for _round in 0..3 {
        let opened = || Region::open_path(&path, &OpenOptions::default()).unwrap();
        let (r1, r2, r3) = (opened(), opened(), opened());
        let adopt_all = |region: Region, kept: Vec<capnp_rdma::region::KeptAllocation>| {
            std::thread::spawn(move || {
                let mut got = Vec::new();
                for (i, k) in kept.iter().enumerate() {
                    match region.adopt(k.offset) {
                        Ok(lease) => {
                            assert_eq!(lease.len(), k.len);
                            assert_eq!(
                                lease.as_slice(),
                                &pattern(i as u8, k.len as usize)[..],
                                "adopted bytes intact"
                            );
                            got.push((i, lease));
                        }
                        Err(RegionError::OwnerAlive { .. } | RegionError::NoAllocation { .. }) => {}
                        Err(e) => panic!("adopt: {e}"),
                    }
                }
                (region, got)
            })
        };
        let t1 = adopt_all(r1, kept.clone());
        let mut reversed = kept.clone();
        reversed.reverse();
        let t2 = {
            let region = r2;
            std::thread::spawn(move || {
                let mut got = Vec::new();
                for (j, k) in reversed.iter().enumerate() {
                    let i = count - 1 - j;
                    if let Ok(lease) = region.adopt(k.offset) {
                        assert_eq!(lease.as_slice(), &pattern(i as u8, k.len as usize)[..]);
                        got.push((i, lease));
                    }
                }
                (region, got)
            })
        };
        let t3 = std::thread::spawn(move || {
            let mut freed = 0;
            for _ in 0..20 {
                freed += r3.reclaim_dead_owners().unwrap().allocations;
                std::thread::yield_now();
            }
            (r3, freed)
        });
        let (r1, got1) = t1.join().unwrap();
        let (r2, got2) = t2.join().unwrap();
        let (r3, freed) = t3.join().unwrap();
        let mut owners = vec![0u32; count];
        for &(i, _) in got1.iter().chain(&got2) {
            owners[i] += 1;
        }
        assert!(
            owners.iter().all(|&n| n <= 1),
            "an allocation adopted twice"
        );
        let adopted = owners.iter().filter(|&&n| n == 1).count() as u64;
        assert_eq!(adopted + freed, left, "every allocation accounted for");
        left = adopted;
        let adopted_blocks: u64 = got1.iter().chain(&got2).map(|(_, l)| l.len() / bs).sum();
        assert_eq!(r3.stats().blocks_in_use, adopted_blocks);
        assert_eq!(r3.audit().orphaned_blocks(), 0);
        // Keep them again for the next round (both adopters close gracefully).
        for (_, lease) in got1.into_iter().chain(got2) {
            lease.keep();
        }
        drop((r1, r2, r3));
    }
}
