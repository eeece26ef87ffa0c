//! The verbs backend against the transport conformance suite. The suite needs an RDMA device:
//! `ci/softroce` runs these tests (with `--ignored`) inside a qemu guest with Soft-RoCE.

#![cfg(feature = "verbs")]

mod conformance;

use capnp_rdma::framing::OutboundMessage;
use capnp_rdma::transport::verbs::{
    RegisteredRegion, VerbsDevice, VerbsOptions, VerbsTarget, VerbsWriter,
};
use capnp_rdma::transport::{TransportError, Writer};
use capnp_rdma::{BlockLease, Region};
use conformance::Backend;
use std::sync::Arc;
use tokio::net::TcpListener;

struct Verbs {
    device: VerbsDevice,
}

impl Verbs {
    fn new() -> Self {
        let device = VerbsDevice::open(&VerbsOptions::from_env()).expect("an RDMA device");
        Self { device }
    }
}

impl Backend for Verbs {
    type W = VerbsWriter<OutboundMessage>;
    type T = VerbsTarget;

    async fn connect(&self, local: &Region, lease: BlockLease, window: u32) -> (Self::W, Self::T) {
        let options = VerbsOptions {
            window,
            ..VerbsOptions::from_env()
        };
        let local = Arc::new(self.device.register(local).unwrap());
        let remote: Arc<RegisteredRegion> = Arc::new(self.device.register(lease.region()).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target_options = options.clone();
        let accept = tokio::spawn(async move {
            VerbsTarget::accept(&listener, &remote, lease, &target_options).await
        });
        let writer = VerbsWriter::connect(addr, &local, &options).await.unwrap();
        (writer, accept.await.unwrap().unwrap())
    }
}

/// Without a device (or with a name that matches none) opening fails with a clear, typed
/// error — never a panic. Runs everywhere: on a host without RDMA the device list itself fails.
#[test]
fn no_device_is_a_clear_error() {
    let options = VerbsOptions {
        device: Some("no-such-device0".into()),
        ..VerbsOptions::default()
    };
    match VerbsDevice::open(&options) {
        Err(TransportError::NoDevice(why)) => assert!(!why.is_empty()),
        other => panic!("expected NoDevice, got {other:?}"),
    }
}

/// The device, port GID and index can be chosen by the IPv4 address the GID maps.
#[test]
#[ignore = "needs an RDMA device: ci/softroce runs it"]
fn device_is_found_by_ip() {
    let ip: std::net::Ipv4Addr = std::env::var("CAPNP_RDMA_IP")
        .expect("CAPNP_RDMA_IP")
        .parse()
        .unwrap();
    let by_ip = VerbsDevice::open(&VerbsOptions {
        ip: Some(ip),
        ..VerbsOptions::default()
    })
    .unwrap();
    let by_env = VerbsDevice::open(&VerbsOptions::from_env()).unwrap();
    assert_eq!(
        (by_ip.name(), by_ip.gid_index()),
        (by_env.name(), by_env.gid_index())
    );
    let none = VerbsDevice::open(&VerbsOptions {
        ip: Some([192, 0, 2, 1].into()),
        ..VerbsOptions::default()
    });
    assert!(matches!(none, Err(TransportError::NoDevice(_))), "{none:?}");
}

macro_rules! conformance_tests {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[ignore = "needs an RDMA device: ci/softroce runs it"]
        async fn $name() {
            conformance::$name(&Verbs::new()).await;
        }
    )*};
}

conformance_tests!(
    ordering_and_immediates,
    window_is_enforced,
    large_and_tiny,
    many_entries,
    out_of_range_is_rejected,
    peer_disconnect_mid_stream,
    writer_disconnect,
);

/// A 1080p I420 frame from Rust to Rust over RDMA: one work request (its four entries fit the
/// device's max_send_sge), checked byte for byte and decoded as a Frame on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: ci/softroce runs it"]
async fn frame_1080p_over_rdma() {
    use capnp_rdma::frame::FrameView;
    use capnp_rdma::reader::{read_framed, ReadOptions};
    let verbs = Verbs::new();
    let local = conformance::region(32);
    let remote = conformance::region(32);
    let lease = remote.lease(8 << 20).unwrap();
    let at = lease.offset();
    let (mut w, mut t) = verbs.connect(&local, lease, 4).await;
    let msg = conformance::frame(&local, 42, 1920, 1080, &Default::default());
    assert!(msg.entries().len() as u32 <= verbs.device.max_send_sge());
    let bytes = conformance::bytes_of(&msg);
    // The target waits first, with nothing in flight: its poller must spin, arm the CQ, and
    // sleep on the completion channel until the write arrives 200 ms later.
    let send = async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        w.post_write(msg, at, 42).map_err(|e| e.error).unwrap();
        conformance::drain(&mut w).await
    };
    let (done, got) = tokio::join!(send, conformance::wait_incoming(&mut t, 1));
    assert!(done[0].status.is_ok(), "{:?}", done[0].status);
    assert_eq!(got[0].imm, 42);
    assert!(conformance::landed(&t, &got[0], at, bytes.len()) == bytes);
    // SAFETY: nothing writes the range while we read it.
    let in_place = unsafe { remote.bytes(at, bytes.len() as u64) }.unwrap();
    let (reader, _) = read_framed(in_place, &ReadOptions::default()).unwrap();
    let view = FrameView::new(&reader).unwrap();
    assert_eq!(view.reader().get_sequence(), 42);
    assert_eq!(view.plane(2).unwrap().len(), 960 * 540);
    let stats = t.poll_stats();
    println!(
        "device {} max_send_sge {} writer {:?} target {stats:?}",
        verbs.device.name(),
        verbs.device.max_send_sge(),
        w.poll_stats()
    );
    assert!(stats.sleeps >= 1 && stats.wakes >= 1, "{stats:?}");
}

// One-sided RDMA over RC (`verbs::rc`): a client moves bytes into and out of a store's region
// with RDMA WRITE and READ; the store's side of the connection posts and polls nothing.

use capnp_rdma::transport::verbs::rc::{RcConnection, RcListener, RcRegion};

/// A client connection and the store's end of it, between two regions registered for RC.
async fn rc_pair(
    device: &VerbsDevice,
    client: &Region,
    store: &Region,
    window: u32,
) -> (RcConnection, RcConnection) {
    let options = VerbsOptions {
        window,
        ..VerbsOptions::from_env()
    };
    let store = RcRegion::register(device, store).unwrap();
    let client = RcRegion::register(device, client).unwrap();
    let listener = RcListener::bind("127.0.0.1:0", &store, &options)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move { listener.accept().await });
    let conn = RcConnection::connect(addr, &client, &options)
        .await
        .unwrap();
    (conn, accept.await.unwrap().unwrap())
}

/// `len` bytes of a pattern that differs per `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(7).wrapping_add(seed.wrapping_mul(31)) % 251) as u8)
        .collect()
}

/// A lease of `len` bytes (whole blocks) in `region` whose first `len` bytes are `bytes`.
fn filled(region: &Region, bytes: &[u8]) -> BlockLease {
    let mut lease = region.lease(bytes.len() as u64).unwrap();
    lease.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
    lease
}

/// A 1080p I420 frame (3,110,400 bytes) gathered from five scattered ranges of the client's
/// region lands byte-exact at an offset of the store's region with ONE multi-SGE RDMA WRITE, and
/// comes back byte-exact into another range of the client's region with one RDMA READ. The
/// store's connection sees no completion at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: ci/softroce runs it"]
async fn rc_write_and_read_back_1080p_frame() {
    let verbs = Verbs::new();
    let (client, store) = (conformance::region(32), conformance::region(32));
    let (conn, store_end) = rc_pair(&verbs.device, &client, &store, 4).await;
    assert!(conn.max_sge() >= 5, "max_sge {}", conn.max_sge());
    assert_eq!(conn.peer().region_id, store.id());
    assert_eq!(store_end.peer().region_id, client.id());
    // Y in two halves, U, V in two halves; placed in the region in reverse order, with a gap.
    let sizes = [1_036_800usize, 1_036_800, 518_400, 259_200, 259_200];
    assert_eq!(sizes.iter().sum::<usize>(), 3_110_400);
    let pieces: Vec<Vec<u8>> = (0..5).map(|i| pattern(i as u64 + 1, sizes[i])).collect();
    let mut leases: Vec<BlockLease> = Vec::new();
    for piece in pieces.iter().rev() {
        leases.push(filled(&client, piece));
        leases.push(client.lease(64 << 10).unwrap()); // a gap
    }
    let entries: Vec<(u64, u64)> = (0..5)
        .map(|i| (leases[2 * (4 - i)].offset(), sizes[i] as u64))
        .collect();
    let expected: Vec<u8> = pieces.concat();
    let landing = store.lease(4 << 20).unwrap();
    let at = landing.offset() + 4096 + 24;
    conn.write(&entries, at).await.unwrap();
    // SAFETY: nothing writes the store's range while we read it (the write completed).
    let landed = unsafe { store.bytes(at - 24, expected.len() as u64 + 48) }.unwrap();
    assert!(
        landed[..24].iter().all(|&b| b == 0),
        "bytes before the range"
    );
    assert!(
        landed[24..24 + expected.len()] == expected[..],
        "frame bytes differ"
    );
    assert!(
        landed[24 + expected.len()..].iter().all(|&b| b == 0),
        "bytes after the range"
    );

    let back = client.lease(4 << 20).unwrap();
    conn.read(at, expected.len() as u64, back.offset() + 100)
        .await
        .unwrap();
    assert!(back.as_slice()[..100].iter().all(|&b| b == 0));
    assert!(
        back.as_slice()[100..100 + expected.len()] == expected[..],
        "read-back differs"
    );

    let stats = conn.poll_stats();
    println!(
        "rc: device {} max_sge {} client {stats:?} store {:?}",
        verbs.device.name(),
        conn.max_sge(),
        store_end.poll_stats()
    );
    assert_eq!(stats.completions, 2, "{stats:?}");
    assert_eq!(store_end.poll_stats().completions, 0);
}

/// Ranges outside the peer's advertised data area (past its end, in its header, overflowing),
/// local ranges outside our data area and too many entries are typed errors with nothing
/// posted; the connection keeps working afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: ci/softroce runs it"]
async fn rc_out_of_range_is_refused_and_connection_survives() {
    let verbs = Verbs::new();
    let (client, store) = (conformance::region(8), conformance::region(8));
    let (conn, _store_end) = rc_pair(&verbs.device, &client, &store, 4).await;
    let peer = conn.peer();
    let bytes = pattern(9, 8192);
    let src = filled(&client, &bytes);
    let one = [(src.offset(), bytes.len() as u64)];
    let end = peer.offset + peer.len;
    for remote in [end - 100, end, 0, peer.offset - 1, u64::MAX - 10] {
        let w = conn.write(&one, remote).await;
        assert!(
            matches!(w, Err(TransportError::OutOfRange { .. })),
            "{remote}: {w:?}"
        );
        let r = conn.read(remote, 8192, src.offset()).await;
        assert!(
            matches!(r, Err(TransportError::OutOfRange { .. })),
            "{remote}: {r:?}"
        );
    }
    let target = store.lease(64 << 10).unwrap().offset();
    let w = conn.write(&[(0, 64)], target).await;
    assert!(matches!(w, Err(TransportError::ForeignPayload(_))), "{w:?}");
    let r = conn.read(target, 64, client.len() - 10).await;
    assert!(matches!(r, Err(TransportError::ForeignPayload(_))), "{r:?}");
    let many = vec![(src.offset(), 1u64); conn.max_sge() + 1];
    let w = conn.write(&many, target).await;
    assert!(
        matches!(w, Err(TransportError::TooManyEntries { .. })),
        "{w:?}"
    );
    assert_eq!(conn.poll_stats().completions, 0, "nothing was posted");

    conn.write(&one, target).await.unwrap();
    // SAFETY: the write completed; nothing else writes the range.
    assert!(unsafe { store.bytes(target, 8192) }.unwrap() == &bytes[..]);
    let back = client.lease(8192).unwrap();
    conn.read(target, 8192, back.offset()).await.unwrap();
    assert!(back.as_slice()[..8192] == bytes[..]);
    assert_eq!(conn.poll_stats().completions, 2);
}

/// Operations from several tasks at once (more than the window of 4): every one completes,
/// each with its own status, and the poll stats count exactly one completion per operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: ci/softroce runs it"]
async fn rc_concurrent_operations_and_poll_stats() {
    let verbs = Verbs::new();
    let (client, store) = (conformance::region(16), conformance::region(16));
    let (conn, _store_end) = rc_pair(&verbs.device, &client, &store, 4).await;
    let conn = Arc::new(conn);
    let n = 12u64;
    let sources: Vec<(BlockLease, Vec<u8>)> = (0..n)
        .map(|i| {
            let bytes = pattern(100 + i, 64 << 10);
            (filled(&client, &bytes), bytes)
        })
        .collect();
    let landing = store.lease(n * (64 << 10)).unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (lease, _)) in sources.iter().enumerate() {
        let conn = Arc::clone(&conn);
        let entry = [(lease.offset(), 64u64 << 10)];
        let at = landing.offset() + i as u64 * (64 << 10);
        tasks.spawn(async move { conn.write(&entry, at).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    for (i, (_, bytes)) in sources.iter().enumerate() {
        let at = landing.offset() + i as u64 * (64 << 10);
        // SAFETY: every write completed; nothing writes the range now.
        let landed = unsafe { store.bytes(at, bytes.len() as u64) }.unwrap();
        assert!(landed == &bytes[..], "{i}");
    }
    // Concurrent reads of all of them back into one lease.
    let back = client.lease(n * (64 << 10)).unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let conn = Arc::clone(&conn);
        let (from, to) = (
            landing.offset() + i * (64 << 10),
            back.offset() + i * (64 << 10),
        );
        tasks.spawn(async move { conn.read(from, 64 << 10, to).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    let expected: Vec<u8> = sources.iter().flat_map(|(_, b)| b.clone()).collect();
    assert!(back.as_slice() == &expected[..]);
    let stats = conn.poll_stats();
    println!("rc concurrent: {stats:?}");
    assert_eq!(stats.completions, 2 * n, "{stats:?}");
}

/// When the store's end goes away, an operation fails with a typed error instead of hanging
/// (whether it is posted before or after the client notices: in flight it is flushed), `closed`
/// resolves on the client, and later operations fail the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: ci/softroce runs it"]
async fn rc_peer_gone_fails_operations() {
    let verbs = Verbs::new();
    let (client, store) = (conformance::region(8), conformance::region(8));
    let (conn, store_end) = rc_pair(&verbs.device, &client, &store, 4).await;
    let src = filled(&client, &pattern(3, 4096));
    let target = store.lease(64 << 10).unwrap().offset();
    conn.write(&[(src.offset(), 4096)], target).await.unwrap();
    let minute = std::time::Duration::from_secs(60);
    // Right after the drop: the client may not have seen the socket close yet.
    drop(store_end);
    let w = tokio::time::timeout(minute, conn.write(&[(src.offset(), 4096)], target))
        .await
        .expect("a write to a vanished peer fails, it does not hang");
    assert!(matches!(w, Err(TransportError::Disconnected)), "{w:?}");
    tokio::time::timeout(minute, conn.closed())
        .await
        .expect("closed() resolves once the peer is gone");
    let r = tokio::time::timeout(minute, conn.read(target, 4096, src.offset()))
        .await
        .expect("a read from a vanished peer fails, it does not hang");
    assert!(matches!(r, Err(TransportError::Disconnected)), "{r:?}");
}
