//! End of stream, seals that release their inputs, and commits that carry a consumer's state:
//! what operators build exactly-once pipelines on. Over shm and tcp.

mod common;

use capnp_rdma::frame::{FrameSpec, PixelFormat};
use common::{framed, memory_store, stamp, start, TestStore};
use staging_store::client::{Client, ClientError};
use staging_store::in_place::{InPlace, InPlaceError};
use staging_store::proto::{stream_id, Cursor, ErrorCode, StreamConfig};
use std::future::Future;
use std::time::Duration;

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("the store did not answer within 10 s")
}

fn store(tag: &str) -> TestStore {
    start(tag, || memory_store(64 << 20))
}

async fn both(store: &TestStore, name: &str) -> [Client; 2] {
    [
        within(Client::connect(&store.unix(), name)).await.unwrap(),
        within(Client::connect(&store.tcp(), name)).await.unwrap(),
    ]
}

/// Takes frames until the subscription reports its end; returns their stamps.
async fn drain(sub: &mut staging_store::client::Subscription) -> Vec<u64> {
    let mut seqs = Vec::new();
    loop {
        match within(sub.next()).await {
            Ok(frame) => {
                seqs.push(stamp(frame.bytes()));
                frame.release().await.unwrap();
            }
            Err(e) if e.is_end_of_stream() => return seqs,
            Err(e) => panic!("subscription failed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_consumer_gets_every_frame_then_the_end_also_one_that_comes_later() {
    let store = store("eos");
    for (i, consumer) in both(&store, "consumer").await.into_iter().enumerate() {
        let producer = within(Client::connect(&store.unix(), "producer"))
            .await
            .unwrap();
        let stream = format!("cam{i}");
        let config = StreamConfig {
            retain_frames: 8,
            ..StreamConfig::default()
        };
        producer
            .create_stream(&stream, config, false)
            .await
            .unwrap();
        let mut early = consumer
            .subscribe(&stream, "early", Cursor::Oldest, 2)
            .await
            .unwrap();
        // A durable consumer that takes two frames, goes away, and resumes after the end.
        let mut late = consumer
            .subscribe(&stream, "late", Cursor::Oldest, 2)
            .await
            .unwrap();
        for seq in 0..5 {
            assert_eq!(
                producer.put(&stream, &framed(64, 48, seq)).await.unwrap(),
                seq
            );
        }
        for want in 0..2 {
            let frame = within(late.next()).await.unwrap();
            assert_eq!(stamp(frame.bytes()), want);
            frame.release().await.unwrap();
        }
        late.close().await.unwrap();
        producer.end_stream(&stream).await.unwrap();
        producer.end_stream(&stream).await.unwrap(); // ending again is fine
        assert_eq!(drain(&mut early).await, [0, 1, 2, 3, 4]);
        let stat = producer.stream_stat(&stream).await.unwrap();
        assert!(stat.ended);
        assert_eq!(stat.id, stream_id(&stream));

        let mut resumed = consumer
            .subscribe(&stream, "late", Cursor::Resume, 2)
            .await
            .unwrap();
        assert_eq!(
            drain(&mut resumed).await,
            [2, 3, 4],
            "resumed after its cursor"
        );
        // A consumer that was never there gets the retained frames, then the end.
        let mut newcomer = consumer
            .subscribe(&stream, "", Cursor::Oldest, 2)
            .await
            .unwrap();
        assert_eq!(drain(&mut newcomer).await, [0, 1, 2, 3, 4]);

        // Nothing more can be written.
        let e = producer.put(&stream, &framed(64, 48, 5)).await.unwrap_err();
        assert!(e.is_end_of_stream(), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_waiting_for_room_fails_when_the_stream_ends() {
    let store = store("eos-parked");
    let producer = within(Client::connect(&store.unix(), "p")).await.unwrap();
    let config = StreamConfig {
        max_frames: 1,
        block_timeout_ms: 10_000,
        ..StreamConfig::default()
    };
    producer.create_stream("s", config, false).await.unwrap();
    let _sub = producer
        .subscribe("s", "c", Cursor::Oldest, 1)
        .await
        .unwrap();
    producer.put("s", &framed(64, 48, 0)).await.unwrap();
    let other = within(Client::connect(&store.unix(), "q")).await.unwrap();
    let waiting = tokio::spawn(async move { other.create("s", 4096).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "the create waits for room");
    producer.end_stream("s").await.unwrap();
    let e = within(waiting).await.unwrap().unwrap_err();
    assert!(e.is_end_of_stream(), "{e}");
}

/// An output frame built in place, its grant checked to say which sequence number and stream
/// id it will carry.
async fn output_frame(client: &Client, stream: &str, seq: u64) -> InPlace {
    let spec = FrameSpec::new(PixelFormat::Gray8, 64, 48);
    let mut frame = InPlace::create_frame(client, stream, &spec).await.unwrap();
    assert_eq!(frame.grant().seq, seq);
    assert_eq!(frame.grant().stream_id, stream_id(stream));
    let mut w = frame.message_mut().init_frame(&spec).unwrap();
    w.builder().set_sequence(seq);
    frame
}

/// A filter's step: take the input frame, write the output, seal it releasing the input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seal_releases_its_input_in_the_same_operation_or_not_at_all() {
    let store = store("seal-release");
    for (i, filter) in both(&store, "filter").await.into_iter().enumerate() {
        let (input, output) = (format!("in{i}"), format!("out{i}"));
        let source = within(Client::connect(&store.unix(), "src")).await.unwrap();
        source
            .create_stream(&input, StreamConfig::default(), false)
            .await
            .unwrap();
        source
            .create_stream(&output, StreamConfig::default(), false)
            .await
            .unwrap();
        let mut sub = filter
            .subscribe(&input, "f", Cursor::Oldest, 3)
            .await
            .unwrap();
        for seq in 0..3 {
            source.put(&input, &framed(64, 48, seq)).await.unwrap();
        }
        let first = within(sub.next()).await.unwrap();
        let second = within(sub.next()).await.unwrap();

        // A reference that is not the client's: nothing is sealed, nothing released (the
        // failed seal gives its grant back).
        let frame = output_frame(&filter, &output, 0).await;
        let e = frame
            .seal_releasing(&[first.delivery().reference, 999_999])
            .await
            .unwrap_err();
        assert!(
            matches!(&e, InPlaceError::Client(ClientError::Store(s)) if s.code == ErrorCode::UnknownReference),
            "{e}"
        );
        let stat = source.stream_stat(&output).await.unwrap();
        assert_eq!(stat.next_seq, 0, "not sealed");
        let consumer = &source.stream_stat(&input).await.unwrap().consumers[0];
        assert_eq!(
            (consumer.committed, consumer.outstanding),
            (0, 3),
            "nothing released"
        );

        // Both references at once: the output is sealed and both inputs are released.
        let seq = output_frame(&filter, &output, 0)
            .await
            .seal_releasing(&[first.delivery().reference, second.delivery().reference])
            .await
            .unwrap();
        let first_reference = first.delivery().reference;
        first.forget();
        second.forget();
        assert_eq!(seq, 0);
        let consumer = &source.stream_stat(&input).await.unwrap().consumers[0];
        assert_eq!((consumer.committed, consumer.outstanding), (2, 1));
        // A reference released by the seal is gone.
        let again = output_frame(&filter, &output, 1)
            .await
            .seal_releasing(&[first_reference])
            .await
            .unwrap_err();
        assert!(
            matches!(&again, InPlaceError::Client(ClientError::Store(s)) if s.code == ErrorCode::UnknownReference),
            "{again}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_releases_and_records_the_state_a_resumed_consumer_gets_back() {
    let store = store("commit");
    for (i, sink) in both(&store, "sink").await.into_iter().enumerate() {
        let stream = format!("s{i}");
        let source = within(Client::connect(&store.unix(), "src")).await.unwrap();
        source
            .create_stream(&stream, StreamConfig::default(), false)
            .await
            .unwrap();
        let mut sub = sink
            .subscribe(&stream, "writer", Cursor::Oldest, 4)
            .await
            .unwrap();
        for seq in 0..4 {
            source.put(&stream, &framed(64, 48, seq)).await.unwrap();
        }
        assert!(sub.state().is_empty(), "no state before the first commit");
        let a = within(sub.next()).await.unwrap();
        let b = within(sub.next()).await.unwrap();
        // A state past the limit, and an unknown reference: refused, nothing released.
        let e = sink
            .commit(sub.id(), &[a.delivery().reference], &[0; 4097])
            .await
            .unwrap_err();
        assert!(matches!(&e, ClientError::TooLarge { len: 4097, .. }), "{e}");
        let e = sink
            .commit(sub.id(), &[a.delivery().reference, 77_777], b"x")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::Store(s) if s.code == ErrorCode::UnknownReference),
            "{e}"
        );
        assert_eq!(
            source.stream_stat(&stream).await.unwrap().consumers[0].committed,
            0
        );

        sink.commit(
            sub.id(),
            &[a.delivery().reference, b.delivery().reference],
            b"offset=2",
        )
        .await
        .unwrap();
        a.forget();
        b.forget();
        let c = within(sub.next()).await.unwrap();
        assert_eq!(stamp(c.bytes()), 2);
        // A plain release moves the cursor and keeps the state last committed.
        c.release().await.unwrap();
        sub.close().await.unwrap();

        let resumed = sink
            .subscribe(&stream, "writer", Cursor::Resume, 4)
            .await
            .unwrap();
        assert_eq!(resumed.state(), b"offset=2");
        assert_eq!(resumed.from_seq(), 3);
        // Only a named consumer has a state to commit.
        let mut anonymous = sink
            .subscribe(&stream, "", Cursor::Oldest, 1)
            .await
            .unwrap();
        let f = within(anonymous.next()).await.unwrap();
        let e = sink
            .commit(anonymous.id(), &[f.delivery().reference], b"s")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::Store(s) if s.code == ErrorCode::BadRequest),
            "{e}"
        );
    }
}
