//! Several real processes allocating from one region, and processes killed with SIGKILL while
//! holding blocks.
//!
//! Children are this test binary re-executed with `--ignored --exact child_entry` and a role in
//! the environment.

use capnp_rdma::frame::{FrameSpec, FrameView, FrameWriter, PixelFormat};
use capnp_rdma::framing::{FramingOptions, SgeList};
use capnp_rdma::reader::ReadOptions;
use capnp_rdma::{OpenOptions, Region, RegionOptions, StagingAllocator};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROLE: &str = "CAPNP_RDMA_TEST_ROLE";
const NAME: &str = "CAPNP_RDMA_TEST_REGION";
const BLOCK: u64 = 16 << 10;

fn spawn(role: &str, region: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env(NAME, region)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn unique(tag: &str) -> String {
    format!(
        "capnp-rdma-test-{tag}-{}-{}",
        std::process::id(),
        rand_u64()
    )
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// xorshift, seeded per child: no shared RNG state between processes.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn open(role_env: &str) -> Region {
    let name = std::env::var(role_env).unwrap();
    if name.starts_with('/') {
        Region::open_path(&name, &OpenOptions::default()).unwrap()
    } else {
        Region::open_shm(&name, &OpenOptions::default()).unwrap()
    }
}

/// Leases runs of blocks and builds frames at random, stamping each block with (pid, serial)
/// and checking the stamp is intact before releasing: two processes ever holding the same
/// block would overwrite each other's stamps. Also checks every block arrives zeroed.
fn churn(region: &Region) {
    let pid = u64::from(std::process::id());
    let mut rng = Rng(pid.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for serial in 0..3000u64 {
        assert!(Instant::now() < deadline, "churn took too long");
        if rng.next() % 3 == 0 {
            // A frame built with the allocator, read back in place.
            let mut message = capnp::message::Builder::new(StagingAllocator::new(region));
            let mut spec = FrameSpec::new(PixelFormat::Gray8, 64, 40 + (rng.next() % 200) as u32);
            spec.sequence = serial;
            let mut frame = FrameWriter::init(&mut message, &spec).unwrap();
            let plane = frame.plane_mut(0).unwrap();
            assert!(plane.iter().all(|&b| b == 0), "segment not zeroed");
            plane.fill((serial % 251) as u8);
            let sges = SgeList::build(region, &mut message, &FramingOptions::default()).unwrap();
            let reader = sges.read(&ReadOptions::default()).unwrap();
            let view = FrameView::new(&reader).unwrap();
            assert_eq!(view.reader().get_sequence(), serial);
            assert!(view
                .plane(0)
                .unwrap()
                .iter()
                .all(|&b| b == (serial % 251) as u8));
            continue;
        }
        let blocks = 1 + rng.next() % 6;
        let mut lease = loop {
            match region.lease(blocks * BLOCK) {
                Ok(l) => break l,
                Err(capnp_rdma::RegionError::Exhausted { .. }) => {
                    if let Some(old) = held.pop() {
                        drop::<(capnp_rdma::BlockLease, u64)>(old);
                    }
                    std::thread::yield_now();
                }
                Err(e) => panic!("lease failed: {e}"),
            }
        };
        let bytes = lease.as_mut_slice();
        assert!(bytes.iter().all(|&b| b == 0), "leased blocks not zeroed");
        for block in bytes.chunks_mut(BLOCK as usize) {
            block[..8].copy_from_slice(&pid.to_le_bytes());
            block[8..16].copy_from_slice(&serial.to_le_bytes());
        }
        held.push((lease, serial));
        if held.len() > 8 || rng.next() % 2 == 0 {
            let i = (rng.next() % held.len() as u64) as usize;
            let (lease, serial) = held.swap_remove(i);
            for block in lease.as_slice().chunks(BLOCK as usize) {
                assert_eq!(
                    &block[..8],
                    &pid.to_le_bytes(),
                    "block overwritten by another owner"
                );
                assert_eq!(&block[8..16], &serial.to_le_bytes(), "block overwritten");
            }
        }
    }
    drop(held);
    region.quiesce();
}

#[test]
#[ignore = "entry point of child processes spawned by the other tests"]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let region = open(NAME);
    match role.as_str() {
        "churn" => churn(&region),
        "hold-and-wait" => {
            // Hold 3 leases (1 + 2 + 3 blocks) and a frame message, dirty them, then wait to be killed.
            let mut leases = Vec::new();
            for blocks in 1..=3u64 {
                let mut l = region.lease(blocks * BLOCK).unwrap();
                l.as_mut_slice().fill(0xAB);
                leases.push(l);
            }
            let mut message = capnp::message::Builder::new(StagingAllocator::new(&region));
            let spec = FrameSpec::new(PixelFormat::Gray8, 256, 200); // 50 KiB plane
            FrameWriter::init(&mut message, &spec)
                .unwrap()
                .plane_mut(0)
                .unwrap()
                .fill(0xCD);
            println!("READY {}", region.stats().blocks_in_use);
            std::thread::sleep(Duration::from_secs(120));
            unreachable!("should have been killed");
        }
        "write-and-wait" => {
            // Two leases (2 blocks and 1), filled with a pattern; the parent kills us and adopts
            // the first.
            let mut offsets = Vec::new();
            for (blocks, seed) in [(2u64, 7u8), (1, 9)] {
                let mut lease = region.lease(blocks * BLOCK).unwrap();
                let bytes = lease.as_mut_slice();
                let len = bytes.len();
                bytes.copy_from_slice(&pattern(seed, len));
                offsets.push(lease.offset());
                std::mem::forget(lease); // held until we are killed
            }
            println!("LEASED {} {}", offsets[0], offsets[1]);
            std::thread::sleep(Duration::from_secs(120));
            unreachable!("should have been killed");
        }
        other => panic!("unknown role {other}"),
    }
}

fn wait_ready(child: &mut Child) -> u64 {
    let stdout = child.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        // libtest prints "test child_entry ... " without a newline first.
        if let Some(at) = line.find("READY ") {
            return line[at + 6..].trim().parse().unwrap();
        }
    }
    panic!("child exited before READY");
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

/// The words after `marker` on the first child output line that contains it.
fn wait_for(child: &mut Child, marker: &str) -> Vec<u64> {
    let stdout = child.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(at) = line.find(marker) {
            return line[at + marker.len()..]
                .split_whitespace()
                .map(|w| w.parse().unwrap())
                .collect();
        }
    }
    panic!("child exited before {marker}");
}

fn kill9(child: &mut Child) {
    // Child::kill sends SIGKILL.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
}

#[test]
fn four_processes_allocate_without_overlap() {
    let name = unique("churn");
    let region = Region::create(&RegionOptions::shm(&name, 8 << 20).block_size(BLOCK)).unwrap();
    let mut children: Vec<Child> = (0..4).map(|_| spawn("churn", &name)).collect();
    for child in &mut children {
        let status = child.wait().unwrap();
        assert!(status.success(), "a child failed: {status}");
    }
    assert_eq!(
        region.stats().blocks_in_use,
        0,
        "children left blocks behind"
    );
    let audit = region.audit();
    assert_eq!(audit.orphaned_blocks(), 0);
    assert_eq!(
        audit.owners.len(),
        1,
        "only the parent's slot remains: {:?}",
        audit.owners
    );
}

#[test]
fn killed_owner_blocks_are_reclaimed() {
    let name = unique("kill");
    let region = Region::create(&RegionOptions::shm(&name, 8 << 20).block_size(BLOCK)).unwrap();
    let mut child = spawn("hold-and-wait", &name);
    let held = wait_ready(&mut child);
    // 1 + 2 + 3 lease blocks, one block for the frame's first segment, 4 for the 50 KiB plane
    // (plus its 8-byte far-pointer landing pad).
    assert_eq!(held, 1 + 2 + 3 + 1 + 4);
    assert_eq!(region.stats().blocks_in_use, held);
    let pid = child.id();
    kill9(&mut child);

    let report = region.reclaim_dead_owners().unwrap();
    assert_eq!(report.dead_pids, vec![pid]);
    assert_eq!(report.allocations, 5);
    assert_eq!(report.blocks, held);
    assert_eq!(region.stats().blocks_in_use, 0);
    assert_eq!(
        region.reclaim_dead_owners().unwrap().allocations,
        0,
        "reclaim is idempotent"
    );

    // The dead owner's dirty bytes were zeroed before the blocks became free.
    let all = region.lease(region.geometry().data_bytes()).unwrap();
    assert!(all.as_slice().iter().all(|&b| b == 0));
}

#[test]
fn region_left_by_killed_process_reopens_and_reclaims() {
    let dir = std::env::temp_dir().join(unique("file"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("region");
    let geometry = {
        let region =
            Region::create(&RegionOptions::file(&path, 4 << 20).block_size(BLOCK)).unwrap();
        region.geometry()
    }; // nobody maps the region now
    let mut child = spawn("hold-and-wait", path.to_str().unwrap());
    let held = wait_ready(&mut child);
    let pid = child.id();
    kill9(&mut child);

    let region = Region::open_path(&path, &OpenOptions::default()).unwrap();
    assert_eq!(region.geometry(), geometry);
    assert_eq!(
        region.stats().blocks_in_use,
        held,
        "the dead owner's blocks survive in the file"
    );
    let audit = region.audit();
    assert!(
        audit.owners.iter().any(|&(_, p, n)| p == pid && n == 5),
        "{audit:?}"
    );
    let report = region.reclaim_dead_owners().unwrap();
    assert_eq!(report.dead_pids, vec![pid]);
    assert_eq!(report.blocks, held);
    assert_eq!(region.stats().blocks_in_use, 0);
    assert_eq!(region.audit().orphaned_blocks(), 0);
    drop(region);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn allocation_of_killed_process_is_adopted_with_its_bytes() {
    let dir = std::env::temp_dir().join(unique("adopt"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("region");
    drop(Region::create(&RegionOptions::file(&path, 4 << 20).block_size(BLOCK)).unwrap());
    let mut child = spawn("write-and-wait", path.to_str().unwrap());
    let offsets = wait_for(&mut child, "LEASED ");
    let pid = child.id();
    kill9(&mut child);

    let region = Region::open_path(&path, &OpenOptions::default()).unwrap();
    assert_eq!(region.stats().blocks_in_use, 3);
    let lease = region.adopt(offsets[0]).unwrap();
    assert_eq!(lease.len(), 2 * BLOCK);
    assert_eq!(lease.as_slice(), &pattern(7, 2 * BLOCK as usize)[..]);
    // The other allocation is not adopted: reclaim frees it, and only it.
    let report = region.reclaim_dead_owners().unwrap();
    assert_eq!(report.dead_pids, vec![pid]);
    assert_eq!((report.allocations, report.blocks), (1, 1));
    assert_eq!(region.stats().blocks_in_use, 2);
    assert!(matches!(
        region.adopt(offsets[1]),
        Err(capnp_rdma::RegionError::NoAllocation { .. })
    ));
    assert_eq!(region.audit().orphaned_blocks(), 0);
    drop((lease, region));
    std::fs::remove_dir_all(&dir).unwrap();
}
