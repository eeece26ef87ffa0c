//! Producer → store → consumers over shm and tcp, in one process.

mod common;

use common::{framed, memory_store, stamp, start};
use staging_store::client::Client;
use staging_store::proto::{Cursor, StreamConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_flow_to_shm_and_tcp_consumers() {
    let store = start("basics", || memory_store(64 << 20));
    let producer = Client::connect(&store.unix(), "producer").await.unwrap();
    producer
        .create_stream(
            "cam0",
            StreamConfig {
                retain_frames: 2,
                ..Default::default()
            },
            false,
        )
        .await
        .unwrap();
    let shm = Client::connect(&store.unix(), "shm-consumer")
        .await
        .unwrap();
    let tcp = Client::connect(&store.tcp(), "tcp-consumer").await.unwrap();
    let mut a = shm.subscribe("cam0", "a", Cursor::Oldest, 4).await.unwrap();
    let mut b = tcp.subscribe("cam0", "b", Cursor::Oldest, 4).await.unwrap();
    for seq in 0..10u64 {
        let bytes = framed(64, 32, seq);
        assert_eq!(producer.put("cam0", &bytes).await.unwrap(), seq);
        let fa = a.next().await.unwrap();
        let fb = b.next().await.unwrap();
        assert_eq!(stamp(fa.bytes()), seq);
        assert_eq!(stamp(fb.bytes()), seq);
        assert_eq!(fa.bytes(), &bytes[..]);
        assert_eq!(fb.bytes(), &bytes[..]);
        fa.release().await.unwrap();
        fb.release().await.unwrap();
    }
    let s = producer.stream_stat("cam0").await.unwrap();
    assert_eq!((s.first_seq, s.next_seq, s.frames), (8, 10, 2));
    // A tcp producer, a get over both transports.
    let tcp_producer = Client::connect(&store.tcp(), "tcp-producer").await.unwrap();
    let bytes = framed(64, 32, 10);
    assert_eq!(tcp_producer.put("cam0", &bytes).await.unwrap(), 10);
    assert_eq!(stamp(a.next().await.unwrap().bytes()), 10);
    assert_eq!(stamp(b.next().await.unwrap().bytes()), 10);
    let got = tcp.get("cam0", None).await.unwrap();
    assert_eq!(got.bytes(), &bytes[..]);
    drop(got);
    let got = shm.get("cam0", Some(9)).await.unwrap();
    assert_eq!(stamp(got.bytes()), 9);
    got.release().await.unwrap();
    drop((a, b, shm, tcp, producer, tcp_producer));
    let stat = store.stop();
    assert_eq!(stat.seals, 11);
}
