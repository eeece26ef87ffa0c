//! The shm backend against the transport conformance suite, plus what only shm has: writes
//! that need no copy, a notification ring a hostile peer can scribble on, wake-ups that cost
//! a system call only when the target sleeps. The one-way latency measurement is an ignored
//! test at the end.

mod conformance;

use capnp_rdma::frame::{FrameSpec, PixelFormat};
use capnp_rdma::framing::{FramingOptions, OutboundMessage, Sge};
use capnp_rdma::slot::SlotMessage;
use capnp_rdma::transport::shm::ring::{
    ring_bytes, RingEntry, ENTRIES_OFFSET, ENTRY_BYTES, HEAD_OFFSET,
};
use capnp_rdma::transport::shm::{Hello, ShmOptions, ShmTarget, ShmWriter, HELLO_LEN};
use capnp_rdma::transport::{
    Incoming, LeasePayload, Payload, RemoteRegion, SendError, Target, TransportError, Writer,
};
use capnp_rdma::{BlockLease, Region};
use conformance::Backend;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

/// A socket path no other test uses.
fn socket_path() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "capnp-rdma-shm-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

async fn connect_pair<P: Payload>(
    local: &Region,
    lease: BlockLease,
    options: ShmOptions,
) -> (ShmWriter<P>, ShmTarget) {
    let path = socket_path();
    let listener = UnixListener::bind(&path).unwrap();
    let accept = tokio::spawn(async move { ShmTarget::accept(&listener, lease, &options).await });
    let writer = ShmWriter::connect(&path, local).await.unwrap();
    let target = accept.await.unwrap().unwrap();
    std::fs::remove_file(&path).unwrap();
    (writer, target)
}

struct Shm {
    spin_polls: u32,
}

/// The default: a target that polls briefly before it sleeps.
const SHM: Shm = Shm { spin_polls: 200 };
/// A target that sleeps at once, so every write goes through the eventfd wake-up.
const SHM_SLEEPY: Shm = Shm { spin_polls: 0 };

impl Backend for Shm {
    type W = ShmWriter<OutboundMessage>;
    type T = ShmTarget;

    async fn connect(&self, local: &Region, lease: BlockLease, window: u32) -> (Self::W, Self::T) {
        let options = ShmOptions {
            window,
            spin_polls: self.spin_polls,
            ..Default::default()
        };
        connect_pair(local, lease, options).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_and_immediates() {
    conformance::ordering_and_immediates(&SHM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_is_enforced() {
    conformance::window_is_enforced(&SHM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_tiny() {
    conformance::large_and_tiny(&SHM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_entries() {
    conformance::many_entries(&SHM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_is_rejected() {
    conformance::out_of_range_is_rejected(&SHM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_disconnect_mid_stream() {
    conformance::peer_disconnect_mid_stream(&SHM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_disconnect() {
    conformance::writer_disconnect(&SHM).await;
}

/// The whole suite again with a target that never polls: every write wakes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_with_a_sleeping_target() {
    conformance::run_all(&SHM_SLEEPY).await;
}

/// The moment a write is announced its last bytes are there: a target polling the ring reads
/// the end of each 4K frame (12 MB, copied front to back) first thing after `incoming`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_writes_are_complete_at_once() {
    const FRAMES: u64 = 12;
    const SLOT: u64 = 16 << 20;
    let local = conformance::region(64);
    let remote = conformance::region(64);
    let lease = remote.lease(2 * SLOT).unwrap();
    let base = lease.offset();
    let options = ShmOptions {
        window: 1,
        spin_polls: u32::MAX,
        ..Default::default()
    };
    let (mut w, mut t) = connect_pair::<OutboundMessage>(&local, lease, options).await;
    let consumer = tokio::spawn(async move {
        let mut ends = Vec::new();
        let mut out = Vec::new();
        while (ends.len() as u64) < FRAMES {
            out.clear();
            t.incoming(&mut out).await.unwrap();
            for inc in &out {
                let (offset, len) = place(inc);
                // SAFETY: the writer next writes this slot two writes later, and with a window
                // of 1 it cannot post that before this loop has taken the write in between.
                let end = unsafe { t.region().bytes(offset + len - 64, 64) }
                    .unwrap()
                    .to_vec();
                ends.push(end);
            }
        }
        ends
    });
    let mut tails = Vec::new();
    for seq in 0..FRAMES {
        let msg = conformance::frame(&local, seq, 3840, 2160, &FramingOptions::default());
        let bytes = conformance::bytes_of(&msg);
        tails.push(bytes[bytes.len() - 64..].to_vec());
        let offset = base + (seq % 2) * SLOT;
        let mut msg = Some(msg);
        while let Some(m) = msg.take() {
            if let Err(e) = w.post_write(m, offset, seq as u32) {
                assert!(
                    matches!(e.error, TransportError::WindowFull(_)),
                    "{:?}",
                    e.error
                );
                conformance::drain(&mut w).await;
                w.ready().await.unwrap();
                msg = Some(e.payload);
            }
        }
    }
    let ends = consumer.await.unwrap();
    for (seq, (end, tail)) in ends.iter().zip(&tails).enumerate() {
        assert!(
            end == tail,
            "write {seq} was announced before its last bytes landed"
        );
    }
}

/// A writer that posts while the target sleeps and closes its end at once: the target wakes
/// to both the eventfd and the end-of-stream, delivers every write, then reports the end.
/// (Which of the two wakes it first is random: the test repeats.)
#[tokio::test(flavor = "current_thread")]
async fn writes_before_a_disconnect_are_all_delivered() {
    for round in 0..16 {
        let local = conformance::region(8);
        let remote = conformance::region(8);
        let lease = remote.lease(1 << 20).unwrap();
        let base = lease.offset();
        let options = ShmOptions {
            window: 4,
            spin_polls: 0,
            ..Default::default()
        };
        let (mut w, mut t) = connect_pair::<LeasePayload>(&local, lease, options).await;
        let target = tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                match t.incoming(&mut out).await {
                    Ok(_) => continue,
                    Err(e) => return (out, e, t.stats()),
                }
            }
        });
        // Let the target go to sleep on the eventfd.
        tokio::time::sleep(Duration::from_millis(5)).await;
        for i in 0..3u32 {
            let payload = LeasePayload::new(local.lease(64).unwrap(), 64);
            w.post_write(payload, base + u64::from(i) * 64, i)
                .map_err(|e| e.error)
                .unwrap();
        }
        assert_eq!(
            w.stats().wakes_sent,
            1,
            "one wake-up for the sleeping target"
        );
        drop(w);
        let (out, end, stats) = target.await.unwrap();
        assert!(stats.sleeps >= 1, "round {round}: {stats:?}");
        let imms: Vec<u32> = out.iter().map(|i| i.imm).collect();
        assert_eq!(imms, [0, 1, 2], "round {round}");
        assert!(matches!(end, TransportError::Disconnected), "{end:?}");
    }
}

/// Ping-pong with a target that sleeps as soon as the ring is empty, each write posted a
/// varying delay after the previous one was taken: 20,000 sleep/wake-up cycles, none lost (a
/// lost wake-up would stall the exchange until the timeout). The racing interleaving itself
/// is pinned down deterministically in the ring's unit tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_wake_up_is_lost() {
    const ROUNDS: u32 = 20_000;
    let local = conformance::region(8);
    let remote = conformance::region(8);
    let lease = remote.lease(1 << 20).unwrap();
    let base = lease.offset();
    let options = ShmOptions {
        window: 1,
        spin_polls: 0,
        ..Default::default()
    };
    let (mut w, mut t) = connect_pair::<LeasePayload>(&local, lease, options).await;
    let taken = Arc::new(AtomicUsize::new(0));
    let consumer = {
        let taken = Arc::clone(&taken);
        tokio::spawn(async move {
            let mut out = Vec::new();
            while out.len() < ROUNDS as usize {
                let got = tokio::time::timeout(Duration::from_secs(10), t.incoming(&mut out))
                    .await
                    .map_err(|_| format!("stalled after {} writes", out.len()));
                got?.map_err(|e| e.to_string())?;
                taken.store(out.len(), Ordering::Release);
            }
            Ok::<_, String>(t.stats())
        })
    };
    let mut payload = LeasePayload::new(local.lease(64).unwrap(), 64);
    let mut done = Vec::new();
    for i in 0..ROUNDS {
        for _ in 0..(i * 7919) % 1024 {
            std::hint::spin_loop();
        }
        w.post_write(payload, base, i).map_err(|e| e.error).unwrap();
        w.completions(&mut done).await.unwrap();
        payload = done.pop().unwrap().payload;
        while taken.load(Ordering::Acquire) <= i as usize {
            if consumer.is_finished() {
                break;
            }
            std::hint::spin_loop();
        }
    }
    let stats = consumer.await.unwrap().unwrap();
    assert!(stats.sleeps > 0, "{stats:?}");
}

/// A target dropped with writes it never took: the writer's uncollected writes fail with
/// `Disconnected`, payloads handed back, and the granted blocks stay leased until the writer
/// has seen the end (a copy it started just before must not land in recycled blocks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_target_keeps_its_grant_until_the_writer_lets_go() {
    let local = conformance::region(8);
    let remote = conformance::region(8);
    let lease = remote.lease(1 << 20).unwrap();
    let base = lease.offset();
    let options = ShmOptions {
        window: 2,
        ..Default::default()
    };
    let (mut w, t) = connect_pair::<LeasePayload>(&local, lease, options).await;
    for i in 0..2u32 {
        let payload = LeasePayload::new(local.lease(64).unwrap(), 64);
        w.post_write(payload, base + u64::from(i) * 64, i)
            .map_err(|e| e.error)
            .unwrap();
    }
    let granted_blocks = remote.stats().blocks_in_use;
    assert_eq!(granted_blocks, 16, "1 MiB of 64 KiB blocks");
    drop(t);
    tokio::time::sleep(Duration::from_millis(50)).await;
    remote.quiesce();
    assert_eq!(
        remote.stats().blocks_in_use,
        granted_blocks,
        "the grant is held while the writer may still copy"
    );
    // The window is full of writes the target never took: waiting for room finds it gone.
    let err = tokio::time::timeout(Duration::from_secs(10), w.ready())
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, TransportError::Disconnected), "{err:?}");
    let mut done = Vec::new();
    assert_eq!(w.completions(&mut done).await.unwrap(), 2);
    for c in &done {
        assert!(
            matches!(c.status, Err(TransportError::Disconnected)),
            "{:?}",
            c.status
        );
    }
    drop(done);
    // The writer has let go (it closed its end on seeing the disconnect): the grant is freed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while remote.stats().blocks_in_use != 0 {
        assert!(Instant::now() < deadline, "the grant was never released");
        tokio::time::sleep(Duration::from_millis(5)).await;
        remote.quiesce();
    }
    let payload = LeasePayload::new(local.lease(64).unwrap(), 64);
    let err = w.post_write(payload, base, 9).unwrap_err();
    assert!(
        matches!(err.error, TransportError::Disconnected),
        "{:?}",
        err.error
    );
}

/// Bytes already in the target's region, described by offset: what a producer that built
/// its message in the shared region sends.
struct InPlace {
    region: Region,
    entry: [Sge; 1],
}

// SAFETY: the entry lies in `region` (the tests take it from a lease of that region), and the
// tests do not write those bytes while the payload lives.
unsafe impl Payload for InPlace {
    fn region(&self) -> &Region {
        &self.region
    }

    fn entries(&self) -> &[Sge] {
        &self.entry
    }
}

fn place(incoming: &Incoming) -> (u64, u64) {
    let at = incoming.at.expect("shm reports where a write landed");
    (at.offset, at.len)
}

/// A payload already at its destination in the target's region is not copied; one elsewhere
/// in the same region, or in the writer's own region, is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_at_its_destination_is_not_copied() {
    let remote = conformance::region(16);
    let mut lease = remote.lease(1 << 20).unwrap();
    let base = lease.offset();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 3) as u8).collect();
    lease.as_mut_slice()[4096..4096 + data.len()].copy_from_slice(&data);
    // The producer allocates in the shared region: the writer's "local" region is the
    // target's.
    let (mut w, mut t) = connect_pair::<InPlace>(&remote, lease, ShmOptions::default()).await;
    assert_eq!(w.target_region().id(), remote.id());
    assert_ne!(
        w.target_region().owner_slot(),
        remote.owner_slot(),
        "the writer's handle has its own owner slot"
    );
    let at = base + 4096;
    let in_place = InPlace {
        region: remote.clone(),
        entry: [Sge {
            offset: at,
            len: data.len() as u32,
        }],
    };
    w.post_write(in_place, at, 1).map_err(|e| e.error).unwrap();
    let stats = w.stats();
    assert_eq!((stats.bytes_copied, stats.zero_copy_writes), (0, 1));
    let got = conformance::wait_incoming(&mut t, 1).await;
    assert_eq!(place(&got[0]), (at, data.len() as u64));
    assert!(conformance::landed(&t, &got[0], at, data.len()) == data);

    // The same bytes sent elsewhere in the grant are copied (memmove within one region).
    let elsewhere = base + (512 << 10);
    let moved = InPlace {
        region: remote.clone(),
        entry: [Sge {
            offset: at,
            len: data.len() as u32,
        }],
    };
    w.post_write(moved, elsewhere, 2)
        .map_err(|e| e.error)
        .unwrap();
    let stats = w.stats();
    assert_eq!(
        (stats.bytes_copied, stats.zero_copy_writes),
        (data.len() as u64, 1)
    );
    let got = conformance::wait_incoming(&mut t, 1).await;
    assert!(conformance::landed(&t, &got[0], elsewhere, data.len()) == data);
    assert_eq!(conformance::drain(&mut w).await.len(), 2);
}

/// The writer's counters against an ordinary payload from its own region.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_from_the_writer_region_is_copied_once() {
    let local = conformance::region(16);
    let remote = conformance::region(16);
    let lease = remote.lease(1 << 20).unwrap();
    let base = lease.offset();
    let (mut w, mut t) =
        connect_pair::<OutboundMessage>(&local, lease, ShmOptions::default()).await;
    let msg = conformance::frame(&local, 4, 320, 240, &FramingOptions::default());
    let bytes = conformance::bytes_of(&msg);
    w.post_write(msg, base, 4).map_err(|e| e.error).unwrap();
    let stats = w.stats();
    assert_eq!(
        (stats.writes, stats.bytes_copied, stats.zero_copy_writes),
        (1, bytes.len() as u64, 0)
    );
    let got = conformance::wait_incoming(&mut t, 1).await;
    assert!(conformance::landed(&t, &got[0], base, bytes.len()) == bytes);
}

/// A second mapping of the notification ring, as a hostile (or buggy) writer has.
struct RawRing {
    ptr: *mut u8,
    len: usize,
}

impl RawRing {
    fn map(fd: BorrowedFd<'_>, capacity: u32) -> Self {
        let len = ring_bytes(capacity);
        // SAFETY: a fresh shared mapping at an address the kernel picks aliases no Rust object;
        // `len` does not exceed the memfd (the target sized it for `capacity` entries).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Self {
            ptr: ptr.cast(),
            len,
        }
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        assert!(offset % 8 == 0 && offset + 8 <= self.len);
        // SAFETY: in bounds and 8-aligned (checked above, from a page-aligned mapping); the
        // ring's words are only ever accessed atomically, and the mapping outlives `&self`.
        unsafe { &*self.ptr.add(offset).cast::<AtomicU64>() }
    }

    fn write_entry(&self, slot: usize, words: [u64; 4]) {
        for (i, w) in words.into_iter().enumerate() {
            self.word(ENTRIES_OFFSET + slot * ENTRY_BYTES + i * 8)
                .store(w, Ordering::Relaxed);
        }
    }
}

impl Drop for RawRing {
    fn drop(&mut self) {
        // SAFETY: exactly the range mmap returned; no reference into it outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Entries scribbled into the ring behind the writer's back are checked before anything is
/// announced; a bad one ends the connection with a typed error, and the writer learns of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ring_entries_are_refused_and_not_announced() {
    const CAPACITY: u32 = 4;
    type Check = fn(&TransportError) -> bool;
    let out_of_range: Check = |e| matches!(e, TransportError::OutOfRange { .. });
    let protocol: Check = |e| matches!(e, TransportError::Protocol(_));
    // (what is scribbled, given the grant) -> (entry words, new head), expected error
    type Scribble = fn(&RemoteRegion) -> ([u64; 4], u64);
    let cases: [(&str, Scribble, Check); 5] = [
        (
            "past the grant",
            |g| ([9, g.offset + g.len - 8, 64, 1], 2),
            out_of_range,
        ),
        (
            "before the grant",
            |g| ([9, g.offset - 4096, 64, 1], 2),
            out_of_range,
        ),
        (
            "wrong sequence number",
            |g| ([9, g.offset, 64, 7], 2),
            protocol,
        ),
        (
            "reserved bits set",
            |g| ([9 | 1 << 40, g.offset, 64, 1], 2),
            protocol,
        ),
        (
            "head beyond the capacity",
            |g| ([9, g.offset, 64, 1], 2 + u64::from(CAPACITY)),
            protocol,
        ),
    ];
    for (name, scribble, expected) in cases {
        let local = conformance::region(8);
        let remote = conformance::region(8);
        let lease = remote.lease(1 << 20).unwrap();
        let granted_end = lease.offset() + lease.len();
        let options = ShmOptions {
            window: CAPACITY,
            ring_capacity: CAPACITY,
            ..Default::default()
        };
        let (mut w, mut t) = connect_pair::<OutboundMessage>(&local, lease, options).await;
        // One honest write first: the ring works.
        let msg = conformance::frame(&local, 0, 16, 16, &FramingOptions::default());
        w.post_write(msg, w.remote().offset, 0)
            .map_err(|e| e.error)
            .unwrap();
        assert_eq!(conformance::wait_incoming(&mut t, 1).await[0].imm, 0);
        conformance::drain(&mut w).await;

        let raw = RawRing::map(w.ring_fd(), CAPACITY);
        let (words, head) = scribble(&w.remote());
        assert!(RingEntry::decode(words).map_or(true, |e| e.seq != 0));
        raw.write_entry(1, words);
        raw.word(HEAD_OFFSET).store(head, Ordering::Release);

        let mut out = Vec::new();
        let err = tokio::time::timeout(Duration::from_secs(10), t.incoming(&mut out))
            .await
            .unwrap()
            .unwrap_err();
        assert!(expected(&err), "{name}: {err:?}");
        assert!(out.is_empty(), "{name}: nothing announced");
        let err = t.incoming(&mut out).await.unwrap_err();
        assert!(
            matches!(err, TransportError::Disconnected),
            "{name}: {err:?}"
        );
        // Nothing landed past the grant (the bytes after it are still zero).
        // SAFETY: nobody writes there.
        let after = unsafe { remote.bytes(granted_end, 64) }.unwrap();
        assert_eq!(after, &[0u8; 64]);
        // The writer learns the connection is over and hands its payload back.
        let mut refused = None;
        for _ in 0..200 {
            let msg = conformance::frame(&local, 1, 16, 16, &FramingOptions::default());
            match w.post_write(msg, w.remote().offset, 1) {
                Err(e) => {
                    refused = Some(e);
                    break;
                }
                Ok(_) => {
                    conformance::drain(&mut w).await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        let refused = refused.expect("the writer notices the target ended the connection");
        assert!(
            matches!(refused.error, TransportError::Disconnected),
            "{name}: {:?}",
            refused.error
        );
    }
}

/// A peer that is not a capnp-rdma shm target is refused with a typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_foreign_server_is_a_protocol_error() {
    let local = conformance::region(8);
    let good = Hello {
        remote: RemoteRegion {
            region_id: local.id(),
            rkey: 0,
            base: 0,
            offset: local.geometry().data_offset,
            len: 65536,
        },
        window: 4,
        ring_capacity: 4,
    }
    .encode();
    let replies: [(&str, Vec<u8>); 3] = [
        (
            "an HTTP server",
            b"HTTP/1.1 400 Bad Request\r\n\r\nnot a capnp-rdma peer".to_vec(),
        ),
        ("a short hello", good[..HELLO_LEN - 4].to_vec()),
        ("a hello without descriptors", good.to_vec()),
    ];
    for (name, reply) in replies {
        let path = socket_path();
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(&reply).await.unwrap();
            s.shutdown().await.unwrap();
            let _ = s.readable().await;
        });
        let err = ShmWriter::<OutboundMessage>::connect(&path, &local)
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransportError::Protocol(_)),
            "{name}: {err:?}"
        );
        server.await.unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}

/// Sends `n` small writes, one every millisecond, to a target polling with `spin_polls`, and
/// returns both ends' counters.
async fn trickle(
    n: u32,
    spin_polls: u32,
) -> (
    capnp_rdma::transport::shm::WriterStats,
    capnp_rdma::transport::shm::TargetStats,
) {
    let local = conformance::region(8);
    let remote = conformance::region(8);
    let lease = remote.lease(1 << 20).unwrap();
    let base = lease.offset();
    let options = ShmOptions {
        window: 4,
        spin_polls,
        ..Default::default()
    };
    let (mut w, mut t) = connect_pair::<LeasePayload>(&local, lease, options).await;
    let consumer = tokio::spawn(async move {
        let got = conformance::wait_incoming(&mut t, n as usize).await;
        for (i, inc) in got.iter().enumerate() {
            assert_eq!(inc.imm, i as u32);
        }
        t.stats()
    });
    let mut done = Vec::new();
    for i in 0..n {
        let payload = LeasePayload::new(local.lease(64).unwrap(), 64);
        let offset = base + u64::from(i % 16) * 64;
        let mut pending = Some(payload);
        while let Some(payload) = pending.take() {
            match w.post_write(payload, offset, i) {
                Ok(_) => {}
                Err(SendError {
                    payload,
                    error: TransportError::WindowFull(_),
                }) => {
                    w.completions(&mut done).await.unwrap();
                    w.ready().await.unwrap();
                    pending = Some(payload);
                }
                Err(e) => panic!("{}", e.error),
            }
        }
        w.completions(&mut done).await.unwrap();
        done.clear();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let target = tokio::time::timeout(Duration::from_secs(60), consumer)
        .await
        .unwrap()
        .unwrap();
    (w.stats(), target)
}

/// A target that keeps polling costs the writer no system call; one that sleeps is woken
/// through the eventfd (so the counters do move when they should).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_makes_no_system_call_while_the_target_polls() {
    let (writer, target) = trickle(100, u32::MAX).await;
    assert_eq!(writer.writes, 100);
    assert_eq!(writer.wakes_sent, 0, "{writer:?} {target:?}");
    assert_eq!((target.sleeps, target.wakes), (0, 0), "{target:?}");
    assert!(target.spins > 0, "{target:?}");

    let (writer, target) = trickle(100, 0).await;
    assert_eq!(target.spins, 0, "{target:?}");
    assert!(target.sleeps > 0 && target.wakes > 0, "{target:?}");
    assert!(
        writer.wakes_sent > 0 && writer.wakes_sent <= writer.writes,
        "{writer:?}"
    );
}

/// What the latency runs send.
enum Load {
    /// A 64-byte lease payload.
    Small,
    /// A 1080p I420 frame message from the writer's region (copied).
    Frame1080,
    /// A 1080p frame built in place at its destination in the target's grant with a
    /// `SlotMessage` (not copied).
    Frame1080InPlace,
}

/// One-way latency (post_write → incoming returns) percentiles in microseconds: one write at a
/// time, the next posted once the target has reported the previous one and `gap` has passed
/// since it was posted.
async fn latency(load: Load, spin_polls: u32, gap: Duration, n: usize) -> (f64, f64, f64) {
    let local = conformance::region(64);
    let remote = conformance::region(64);
    let lease = remote.lease(8 << 20).unwrap();
    let base = lease.offset();
    let options = ShmOptions {
        window: 4,
        spin_polls,
        ..Default::default()
    };
    let start = Instant::now();
    let posted: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let received = Arc::new(AtomicUsize::new(0));
    let (mut w, mut t) = connect_pair::<Box<dyn LatencyPayload>>(&local, lease, options).await;
    let consumer = {
        let posted = Arc::clone(&posted);
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            let mut nanos = Vec::with_capacity(n);
            let mut out = Vec::new();
            while nanos.len() < n {
                out.clear();
                t.incoming(&mut out).await.unwrap();
                let now = start.elapsed().as_nanos() as u64;
                for inc in &out {
                    nanos.push(now - posted[inc.imm as usize].load(Ordering::Acquire));
                }
                received.store(nanos.len(), Ordering::Release);
            }
            nanos
        })
    };
    let mut payload: Box<dyn LatencyPayload> = match load {
        Load::Small => Box::new(LeasePayload::new(local.lease(64).unwrap(), 64)),
        Load::Frame1080 => Box::new(conformance::frame(
            &local,
            0,
            1920,
            1080,
            &FramingOptions::default(),
        )),
        Load::Frame1080InPlace => {
            let spec = FrameSpec::new(PixelFormat::I420, 1920, 1080);
            let len = SlotMessage::frame_capacity(&spec).unwrap();
            // SAFETY: the start of a fresh grant: zeroed, written by this message only, and
            // never written again while the target reads it.
            let mut message = unsafe { SlotMessage::new(w.target_region(), base, len) }.unwrap();
            message.init_frame(&spec).unwrap();
            Box::new(message.into_payload().unwrap())
        }
    };
    let mut done = Vec::new();
    for i in 0..n {
        posted[i].store(start.elapsed().as_nanos() as u64, Ordering::Release);
        w.post_write(payload, base, i as u32)
            .map_err(|e| e.error)
            .unwrap();
        if !gap.is_zero() {
            // Off the CPU while the target wakes (this box may have few cores), and long
            // enough for it to go back to sleep before the next write.
            tokio::time::sleep(gap).await;
        }
        while received.load(Ordering::Acquire) <= i {
            tokio::task::yield_now().await;
        }
        w.completions(&mut done).await.unwrap();
        payload = done.pop().unwrap().payload;
    }
    let mut nanos = consumer.await.unwrap();
    nanos.sort_unstable();
    let us = |q: f64| nanos[((nanos.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    (us(0.5), us(0.9), us(0.99))
}

/// A payload of any of the latency loads.
trait LatencyPayload: Payload {}
impl<P: Payload> LatencyPayload for P {}

// SAFETY: forwards to the boxed payload, which upholds the contract itself.
unsafe impl Payload for Box<dyn LatencyPayload> {
    fn region(&self) -> &Region {
        (**self).region()
    }

    fn entries(&self) -> &[Sge] {
        (**self).entries()
    }
}

/// `cargo test --release -p capnp-rdma --test transport_shm -- --ignored --nocapture latency`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run in release: see the doc comment"]
async fn one_way_latency() {
    let polling = u32::MAX;
    let runs = [
        ("64 B, target polling", Load::Small, polling, 0, 20_000),
        ("64 B, target asleep (eventfd)", Load::Small, 200, 2, 500),
        (
            "1080p copied, target polling",
            Load::Frame1080,
            polling,
            0,
            500,
        ),
        ("1080p copied, target asleep", Load::Frame1080, 200, 2, 300),
        (
            "1080p in place, target polling",
            Load::Frame1080InPlace,
            polling,
            0,
            5_000,
        ),
    ];
    for (name, load, spin_polls, gap_ms, n) in runs {
        let (p50, p90, p99) = latency(load, spin_polls, Duration::from_millis(gap_ms), n).await;
        println!("{name:<34} n={n:<6} p50 {p50:>8.2} us  p90 {p90:>8.2} us  p99 {p99:>8.2} us");
    }
}
