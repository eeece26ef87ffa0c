//! Verbs clients of the store over real RDMA: Soft-RoCE (rxe0) in the CI guest
//! (`ci/softroce`, see ci/test). The tests are `#[ignore]`d on hosts without a device; the
//! guest runs them with `--ignored`. A producer writes each frame into its grant with one RDMA
//! WRITE and a consumer reads each delivery with one RDMA READ: the store's CPU never touches
//! the bytes, and everything else (refcounts, liveness, backpressure) is the same as for shm
//! and tcp clients.

mod common;

use common::{check_in_place, framed, in_place_frame, memory_store, stamp, start, start_with};
use staging_store::client::{Client, ClientError};
use staging_store::proto::{Cursor, ErrorCode, StreamConfig, Transport};
use std::future::Future;
use std::time::Duration;

/// RDMA in the guest is emulated: generous deadlines.
async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("no answer within 60 s")
}

fn verbs_store(tag: &str) -> common::TestStore {
    start_with(tag, Some("127.0.0.1:0".parse().unwrap()), || {
        memory_store(256 << 20)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run in the Soft-RoCE guest (ci/test)"]
async fn verbs_producer_to_verbs_and_shm_consumers() {
    let store = verbs_store("verbs-flow");
    assert!(store.bound.verbs.is_some());
    let producer = within(Client::connect(
        &format!("verbs:{}", store.bound.tcp.unwrap()),
        "producer",
    ))
    .await
    .unwrap();
    // No prefix: RDMA, because both sides have a device.
    let consumer = within(Client::connect(&store.remote(), "consumer"))
        .await
        .unwrap();
    let local = within(Client::connect(&store.unix(), "local"))
        .await
        .unwrap();
    assert_eq!(producer.transport(), Transport::Verbs);
    assert_eq!(consumer.transport(), Transport::Verbs);
    producer
        .create_stream(
            "cam",
            StreamConfig {
                retain_frames: 1,
                ..Default::default()
            },
            false,
        )
        .await
        .unwrap();
    let mut remote = within(consumer.subscribe("cam", "remote", Cursor::Oldest, 2))
        .await
        .unwrap();
    let mut shm = within(local.subscribe("cam", "local", Cursor::Oldest, 2))
        .await
        .unwrap();
    // 1080p I420 frames: 3 MB each, one RDMA WRITE in, one RDMA READ out.
    for seq in 0..6u64 {
        let bytes = framed(1920, 1080, seq);
        assert_eq!(within(producer.put("cam", &bytes)).await.unwrap(), seq);
        let r = within(remote.next()).await.unwrap();
        let l = within(shm.next()).await.unwrap();
        assert_eq!(r.seq(), seq);
        assert!(r.bytes() == &bytes[..], "frame {seq} read by RDMA intact");
        assert!(
            l.bytes() == &bytes[..],
            "frame {seq} written by RDMA intact"
        );
        assert_eq!(stamp(r.bytes()), seq);
        r.release().await.unwrap();
        l.release().await.unwrap();
    }
    // Every frame moved with one RDMA operation: 6 WRITEs, 6 READs (+ the get below).
    let completions = |c: &Client| c.rdma_poll_stats().expect("a verbs client").completions;
    assert_eq!(completions(&producer), 6);
    assert_eq!(completions(&consumer), 6);
    assert!(local.rdma_poll_stats().is_none());
    // A get over RDMA.
    let got = within(consumer.get("cam", Some(5))).await.unwrap();
    assert_eq!(stamp(got.bytes()), 5);
    got.release().await.unwrap();
    let s = producer.stat().await.unwrap();
    assert_eq!((s.seals, s.objects), (6, 1), "the retained frame only");
    let blocks = s.blocks_in_use;
    assert!(blocks > 0);
    drop((remote, shm));
    let stat = store.stop();
    assert_eq!(stat.seals, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run in the Soft-RoCE guest (ci/test)"]
async fn a_verbs_producer_that_goes_away_mid_write_loses_its_grant_only() {
    let store = verbs_store("verbs-gone");
    let watcher = within(Client::connect(&store.unix(), "watcher"))
        .await
        .unwrap();
    watcher
        .create_stream("s", StreamConfig::default(), false)
        .await
        .unwrap();
    let mut sub = within(watcher.subscribe("s", "w", Cursor::Oldest, 4))
        .await
        .unwrap();
    let bytes = framed(1920, 1080, 0);
    {
        let producer = within(Client::connect(&store.remote(), "producer"))
            .await
            .unwrap();
        assert_eq!(producer.transport(), Transport::Verbs);
        let grant = within(producer.create("s", bytes.len() as u64))
            .await
            .unwrap();
        // Half a frame by RDMA; a write past the grant is refused before anything is posted.
        within(producer.write_grant(&grant, 0, &bytes[..bytes.len() / 2]))
            .await
            .unwrap();
        assert!(matches!(
            within(producer.write_grant(&grant, grant.len - 8, &bytes[..16])).await,
            Err(ClientError::Grant(_))
        ));
        assert_eq!(watcher.stat().await.unwrap().objects, 1);
    }
    // The producer is gone: its grant (and queue pair) with it; nothing became readable.
    within(async {
        while watcher.stat().await.unwrap().objects != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(watcher.stat().await.unwrap().blocks_in_use, 0);
    // Another verbs producer goes on.
    let producer = within(Client::connect(&store.remote(), "producer-2"))
        .await
        .unwrap();
    assert_eq!(within(producer.put("s", &bytes)).await.unwrap(), 0);
    let f = within(sub.next()).await.unwrap();
    assert_eq!((f.seq(), f.bytes()), (0, &bytes[..]));
    f.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run in the Soft-RoCE guest (ci/test)"]
async fn without_a_verbs_listener_clients_use_tcp_or_are_told_why_not() {
    let store = start("verbs-none", || memory_store(64 << 20));
    assert!(store.bound.verbs.is_none());
    // A device here, none offered there: tcp.
    let auto = within(Client::connect(&store.remote(), "auto"))
        .await
        .unwrap();
    assert_eq!(auto.transport(), Transport::Tcp);
    auto.create_stream("s", StreamConfig::default(), false)
        .await
        .unwrap();
    assert_eq!(within(auto.put("s", &framed(64, 32, 0))).await.unwrap(), 0);
    // RDMA required: a typed refusal.
    let required = within(Client::connect(
        &format!("verbs:{}", store.bound.tcp.unwrap()),
        "required",
    ))
    .await;
    assert!(
        matches!(&required, Err(ClientError::Store(e)) if e.code == ErrorCode::Unsupported),
        "{required:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device: run in the Soft-RoCE guest (ci/test)"]
async fn a_verbs_producer_builds_frames_in_its_registered_region() {
    let store = verbs_store("verbs-in-place");
    let producer = within(Client::connect(&store.remote(), "producer"))
        .await
        .unwrap();
    let local = within(Client::connect(&store.unix(), "local"))
        .await
        .unwrap();
    assert_eq!(producer.transport(), Transport::Verbs);
    local
        .create_stream("cam", StreamConfig::default(), false)
        .await
        .unwrap();
    let mut sub = within(local.subscribe("cam", "checker", Cursor::Oldest, 4))
        .await
        .unwrap();
    for seq in 0..4u64 {
        // Pixels written in the producer's registered region, sent by the NIC: one RDMA
        // WRITE per frame and no copy on either side.
        assert_eq!(
            within(in_place_frame(&producer, "cam", seq)).await.unwrap(),
            seq
        );
        let f = within(sub.next()).await.unwrap();
        assert_eq!(check_in_place(f.bytes()), seq, "frame {seq} intact");
        f.release().await.unwrap();
    }
    assert_eq!(producer.rdma_poll_stats().unwrap().completions, 4);
    // A frame that outgrows its grant is never sent, and its grant goes back.
    let spec = capnp_rdma::frame::FrameSpec::new(capnp_rdma::frame::PixelFormat::I420, 1920, 1080);
    let small = capnp_rdma::frame::FrameSpec::new(capnp_rdma::frame::PixelFormat::I420, 640, 360);
    let mut frame = within(staging_store::in_place::InPlace::create_frame(
        &producer, "cam", &small,
    ))
    .await
    .unwrap();
    frame.message_mut().init_frame(&spec).unwrap();
    assert!(matches!(
        within(frame.seal()).await,
        Err(staging_store::in_place::InPlaceError::Slot(
            capnp_rdma::slot::SlotError::Overflow { .. }
        ))
    ));
    assert_eq!(producer.rdma_poll_stats().unwrap().completions, 4);
    within(async {
        while local.stat().await.unwrap().blocks_in_use != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}
