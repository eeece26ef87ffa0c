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
