//! Frames built in place (`staging_store::in_place`): the same operator code over shm (in the
//! store's region) and tcp (in the client's own region, sent whole at the seal). The verbs
//! case runs in the Soft-RoCE guest (tests/verbs.rs).

mod common;

use capnp_rdma::frame::{FrameSpec, PixelFormat};
use capnp_rdma::slot::SlotError;
use common::{check_in_place, in_place_frame, memory_store, start};
use staging_store::client::Client;
use staging_store::in_place::{InPlace, InPlaceError};
use staging_store::proto::{Cursor, StreamConfig, Transport};
use std::time::Duration;

async fn settled(client: &Client, objects: u64) -> u64 {
    for _ in 0..500 {
        let s = client.stat().await.unwrap();
        if s.objects == objects {
            return s.blocks_in_use;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the store never came back to {objects} objects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_and_tcp_producers_write_frames_in_place() {
    let store = start("in-place", || memory_store(128 << 20));
    let shm = Client::connect(&store.unix(), "shm-producer")
        .await
        .unwrap();
    let tcp = Client::connect(&store.tcp(), "tcp-producer").await.unwrap();
    let consumer = Client::connect(&store.unix(), "consumer").await.unwrap();
    assert_eq!(
        (shm.transport(), tcp.transport()),
        (Transport::Shm, Transport::Tcp)
    );
    shm.create_stream("cam", StreamConfig::default(), false)
        .await
        .unwrap();
    let mut sub = consumer
        .subscribe("cam", "checker", Cursor::Oldest, 8)
        .await
        .unwrap();
    for seq in 0..6u64 {
        let producer = if seq % 2 == 0 { &shm } else { &tcp };
        assert_eq!(in_place_frame(producer, "cam", seq).await.unwrap(), seq);
        let frame = sub.next().await.unwrap();
        assert_eq!(frame.seq(), seq);
        assert_eq!(check_in_place(frame.bytes()), seq, "frame {seq} intact");
        frame.release().await.unwrap();
    }
    assert_eq!(settled(&consumer, 0).await, 0, "every block came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_outgrows_its_grant_or_is_dropped_gives_the_grant_back() {
    let store = start("in-place-overflow", || memory_store(64 << 20));
    let shm = Client::connect(&store.unix(), "shm").await.unwrap();
    let tcp = Client::connect(&store.tcp(), "tcp").await.unwrap();
    let retain = StreamConfig {
        retain_frames: 1,
        ..StreamConfig::default()
    };
    shm.create_stream("s", retain, false).await.unwrap();
    let spec = FrameSpec::new(PixelFormat::I420, 1920, 1080);
    for client in [&shm, &tcp] {
        // A 720p grant cannot hold a 1080p frame: the seal says how much it needed.
        let small = FrameSpec::new(PixelFormat::I420, 1280, 720);
        let mut frame = InPlace::create_frame(client, "s", &small).await.unwrap();
        frame.message_mut().init_frame(&spec).unwrap();
        match frame.seal().await {
            Err(InPlaceError::Slot(SlotError::Overflow { needed_bytes, .. })) => {
                assert!(needed_bytes > 3_110_400)
            }
            other => panic!(
                "{:?}: expected an overflow, got {other:?}",
                client.transport()
            ),
        }
        assert_eq!(
            settled(client, 0).await,
            0,
            "the overflowing grant is freed"
        );
        // Dropped before its seal: the grant goes back, nothing becomes readable.
        let mut frame = InPlace::create_frame(client, "s", &spec).await.unwrap();
        frame
            .message_mut()
            .init_frame(&spec)
            .unwrap()
            .plane_mut(0)
            .unwrap()[0] = 1;
        drop(frame);
        assert_eq!(settled(client, 0).await, 0, "the dropped grant is freed");
        assert_eq!(client.stat().await.unwrap().seals, 0);
    }
    // Both still write whole frames afterwards (the stream retains the last one).
    assert_eq!(in_place_frame(&tcp, "s", 0).await.unwrap(), 0);
    let got = shm.get("s", Some(0)).await.unwrap();
    assert_eq!(check_in_place(got.bytes()), 0);
}
