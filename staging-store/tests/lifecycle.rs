//! The store's lifecycle guarantees (`staging_store::store` module docs), end to end through
//! the server and the client library, one in-process store per test: refcounts and block
//! reclamation, backpressure policies, retention, durable replay, consumer exclusivity, stream
//! deletion, and the metrics endpoint.

mod common;

use common::{
    bounded, code, connect, create_stream, failed, framed, memory_store, next, objects_and_blocks,
    producer_of, retaining, stamp, start, subscribe, wait_until, within,
};
use staging_store::client::{Client, ClientError, FrameRef, Subscription};
use staging_store::proto::{Cursor, ErrorCode, FullPolicy, StreamConfig, Transport};
use std::future::Future;
use std::time::{Duration, Instant};

/// Runs a client "process" on a runtime of its own (on another thread), then drops that
/// runtime while the frames `f` returns are still held: the connection ends as if the process
/// had died, with no release sent. Returns the held frames' sequence numbers.
fn crash_holding<F, Fut>(f: F) -> Vec<u64>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Vec<FrameRef>>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let held = rt.block_on(f());
        // The connection's reader and writer tasks die with the runtime: the socket closes.
        drop(rt);
        let seqs = held.iter().map(FrameRef::seq).collect();
        // Their release-on-drop finds no connection any more.
        drop(held);
        seqs
    })
    .join()
    .expect("the crashing client panicked")
}

fn blocks(len: usize, block: u64) -> u64 {
    (len as u64).div_ceil(block)
}

/// Waits until the durable consumer `consumer` of stream "rep" is detached (its client's
/// disconnect processed).
async fn wait_detached(producer: &Client, consumer: &str) {
    wait_until(&format!("{consumer} detaches"), || async {
        let st = producer.stream_stat("rep").await.unwrap();
        st.consumers
            .iter()
            .any(|c| c.name == consumer && !c.attached)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_read_every_frame_and_blocks_return_on_the_last_release() {
    let store = start("lc-refs", || memory_store(64 << 20));
    // Nothing consumed is retained: a frame lives exactly as long as someone holds it.
    let producer = producer_of(&store, "cam", retaining(0)).await;
    let shm = connect(&store.unix(), "shm").await;
    let tcp = connect(&store.tcp(), "tcp").await;
    let getter = connect(&store.tcp(), "getter").await;
    assert_eq!(shm.transport(), Transport::Shm);
    assert_eq!(tcp.transport(), Transport::Tcp);
    let block = producer.welcome().block_bytes;
    let mut a = subscribe(&shm, "cam", "a", Cursor::Oldest, 4).await;
    let mut b = subscribe(&tcp, "cam", "b", Cursor::Oldest, 4).await;
    assert_eq!(objects_and_blocks(&producer).await, (0, 0));

    for seq in 0..16u64 {
        // Small frames (one block) and 256x256 I420 frames (two blocks).
        let bytes = if seq % 3 == 2 {
            framed(256, 256, seq)
        } else {
            framed(64, 32, seq)
        };
        let n = blocks(bytes.len(), block);
        assert_eq!(within(producer.put("cam", &bytes)).await.unwrap(), seq);
        let fa = next(&mut a).await;
        let fb = next(&mut b).await;
        assert_eq!((fa.seq(), fb.seq()), (seq, seq));
        assert_eq!(fa.bytes(), &bytes[..]);
        assert_eq!(fb.bytes(), &bytes[..]);
        assert_eq!(stamp(fa.bytes()), seq);
        assert!(fa.verify() && fb.verify());
        assert_eq!(
            objects_and_blocks(&producer).await,
            (1, n),
            "frame {seq} held twice"
        );

        // Every third frame also has a get holding it: three references.
        let got = if seq % 3 == 0 {
            let g = within(getter.get("cam", Some(seq))).await.unwrap();
            assert_eq!(g.bytes(), &bytes[..]);
            Some(g)
        } else {
            None
        };
        // Release in alternating order; the blocks stay until the very last reference goes.
        let (first, second) = if seq % 2 == 0 { (fa, fb) } else { (fb, fa) };
        first.release().await.unwrap();
        assert_eq!(
            objects_and_blocks(&producer).await,
            (1, n),
            "frame {seq} still held"
        );
        second.release().await.unwrap();
        let held = objects_and_blocks(&producer).await;
        if let Some(g) = got {
            assert_eq!(held, (1, n), "frame {seq} held by a get");
            g.release().await.unwrap();
            assert_eq!(
                objects_and_blocks(&producer).await,
                (0, 0),
                "frame {seq} freed"
            );
        } else {
            assert_eq!(held, (0, 0), "frame {seq} freed");
        }
    }
    // A frame larger than what the store keeps for reuse (a quarter of the region): its blocks
    // go through the region's scrubber (zeroing 19 MB) and still count as back at once.
    let big = framed(4096, 3072, 16);
    let n = blocks(big.len(), block);
    assert!(n * block > producer.welcome().region_bytes / 4);
    assert_eq!(within(producer.put("cam", &big)).await.unwrap(), 16);
    let (fa, fb) = (next(&mut a).await, next(&mut b).await);
    assert_eq!((fa.bytes(), fb.bytes()), (&big[..], &big[..]));
    assert_eq!(objects_and_blocks(&producer).await, (1, n));
    fa.release().await.unwrap();
    fb.release().await.unwrap();
    assert_eq!(
        objects_and_blocks(&producer).await,
        (0, 0),
        "the big frame freed"
    );

    let s = producer.stat().await.unwrap();
    assert_eq!(s.seals, 17);
    assert_eq!(s.deliveries, 34);
    assert_eq!(s.gets, 6);
    assert_eq!(s.releases, 34 + 6);
    assert_eq!(s.reclaimed_references, 0);
    assert_eq!(s.errors, 0);
    drop((a, b, shm, tcp, getter, producer));
    let stat = store.stop();
    assert_eq!(stat.blocks_in_use, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_policy_fails_at_once_with_stream_full() {
    let store = start("lc-reject", || memory_store(16 << 20));
    let producer = producer_of(&store, "r", bounded(2, FullPolicy::Reject)).await;
    let consumer = connect(&store.tcp(), "consumer").await;
    let mut sub = subscribe(&consumer, "r", "slow", Cursor::Oldest, 8).await;
    for seq in 0..2 {
        assert_eq!(producer.put("r", &framed(64, 32, seq)).await.unwrap(), seq);
    }
    let started = Instant::now();
    let e = within(producer.create("r", 4096)).await.unwrap_err();
    assert_eq!(code(e), ErrorCode::StreamFull);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "reject does not wait"
    );
    let e = within(producer.put("r", &framed(64, 32, 2)))
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::StreamFull);
    let st = producer.stream_stat("r").await.unwrap();
    assert_eq!((st.rejected_creates, st.blocked_creates), (2, 0));
    assert_eq!((st.unconsumed_frames, st.writing, st.next_seq), (2, 0, 2));
    // A release makes room for exactly one more.
    next(&mut sub).await.release().await.unwrap();
    assert_eq!(producer.put("r", &framed(64, 32, 2)).await.unwrap(), 2);
    let e = within(producer.create("r", 4096)).await.unwrap_err();
    assert_eq!(code(e), ErrorCode::StreamFull);
    // The consumer got every frame that was sealed, in order.
    for seq in 1..3 {
        let f = next(&mut sub).await;
        assert_eq!(stamp(f.bytes()), seq);
        f.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_policy_times_out_and_grants_as_soon_as_a_consumer_releases() {
    let store = start("lc-block", || memory_store(16 << 20));
    let short = StreamConfig {
        block_timeout_ms: 300,
        ..bounded(2, FullPolicy::Block)
    };
    let long = StreamConfig {
        block_timeout_ms: 8000,
        ..short
    };
    let producer = producer_of(&store, "short", short).await;
    create_stream(&producer, "long", long).await;
    let consumer = connect(&store.unix(), "consumer").await;
    let mut s_short = subscribe(&consumer, "short", "c", Cursor::Oldest, 8).await;
    let mut s_long = subscribe(&consumer, "long", "c", Cursor::Oldest, 8).await;
    for seq in 0..2 {
        producer.put("short", &framed(64, 32, seq)).await.unwrap();
        producer.put("long", &framed(64, 32, seq)).await.unwrap();
    }

    // Nobody releases: the create waits its whole timeout, then fails with `timeout`.
    let started = Instant::now();
    let e = within(producer.create("short", 4096)).await.unwrap_err();
    let waited = started.elapsed();
    assert_eq!(code(e), ErrorCode::Timeout);
    assert!(
        waited >= Duration::from_millis(300),
        "answered after {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "answered after {waited:?}");
    let st = producer.stream_stat("short").await.unwrap();
    assert_eq!(
        (st.blocked_creates, st.rejected_creates, st.writing),
        (1, 1, 0)
    );

    // A consumer releases while a create waits: the grant comes at once, long before the
    // deadline.
    let bytes = framed(64, 32, 2);
    let mut create = Box::pin(producer.create("long", bytes.len() as u64));
    // Poll once: the request is sent (and stays unanswered, the stream is full).
    assert!(tokio::time::timeout(Duration::ZERO, &mut create)
        .await
        .is_err());
    // Requests are handled in order: once this answer is here, the create is parked.
    let st = producer.stream_stat("long").await.unwrap();
    assert_eq!(
        (st.blocked_creates, st.writing),
        (1, 0),
        "the create is waiting"
    );
    let released = Instant::now();
    next(&mut s_long).await.release().await.unwrap();
    let grant = within(create).await.expect("granted after the release");
    assert!(
        released.elapsed() < Duration::from_secs(2),
        "granted {:?} after the release",
        released.elapsed()
    );
    // SAFETY: the only slice of this grant, dropped before it is sealed or aborted.
    unsafe { producer.grant_bytes(&grant) }.unwrap()[..bytes.len()].copy_from_slice(&bytes);
    let seq = producer
        .seal(&grant, grant.offset, bytes.len() as u64, None)
        .await
        .unwrap();
    assert_eq!(seq, 2);
    let st = producer.stream_stat("long").await.unwrap();
    assert_eq!((st.blocked_creates, st.rejected_creates), (1, 0));
    for seq in 1..3 {
        let f = next(&mut s_long).await;
        assert_eq!(stamp(f.bytes()), seq);
        f.release().await.unwrap();
    }
    for seq in 0..2 {
        assert_eq!(next(&mut s_short).await.seq(), seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_consumers_skip_dropped_frames() {
    let store = start("lc-drop", || memory_store(16 << 20));
    let producer = producer_of(&store, "d", bounded(4, FullPolicy::DropOldest)).await;
    let late = connect(&store.tcp(), "late").await;
    let live = connect(&store.unix(), "live").await;
    // A durable consumer that is away (its cursor holds the stream), and one that takes a
    // frame and sits on it.
    subscribe(&late, "d", "late", Cursor::Oldest, 4)
        .await
        .close()
        .await
        .unwrap();
    let mut live_sub = subscribe(&live, "d", "live", Cursor::Oldest, 1).await;
    for seq in 0..10 {
        // Never waits, never fails.
        let started = Instant::now();
        assert_eq!(producer.put("d", &framed(64, 32, seq)).await.unwrap(), seq);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    let st = producer.stream_stat("d").await.unwrap();
    assert_eq!((st.first_seq, st.next_seq, st.frames), (6, 10, 4));
    assert_eq!(st.dropped_total, 6, "frames 0..6 left unconsumed");
    assert_eq!(st.rejected_creates, 0);
    // The frame `live` holds left the stream but stays readable until released.
    let held = next(&mut live_sub).await;
    assert_eq!(held.seq(), 0);
    let s = producer.stat().await.unwrap();
    assert_eq!(s.objects, 5, "4 in the stream + the one `live` holds");
    assert_eq!(stamp(held.bytes()), 0);
    held.release().await.unwrap();
    assert_eq!(producer.stat().await.unwrap().objects, 4);
    // Both consumers go on after the gap.
    let mut late_sub = subscribe(&late, "d", "late", Cursor::Resume, 4).await;
    assert_eq!(late_sub.from_seq(), 6);
    for seq in 6..10 {
        let f = next(&mut late_sub).await;
        assert_eq!((f.seq(), stamp(f.bytes())), (seq, seq));
        f.release().await.unwrap();
        let f = next(&mut live_sub).await;
        assert_eq!((f.seq(), stamp(f.bytes())), (seq, seq));
        f.release().await.unwrap();
    }
    // Deliveries come in order: if the next one is a new frame, nothing was delivered twice.
    producer.put("d", &framed(64, 32, 10)).await.unwrap();
    assert_eq!(next(&mut late_sub).await.seq(), 10);
    assert_eq!(next(&mut live_sub).await.seq(), 10);
    assert_eq!(producer.stream_stat("d").await.unwrap().dropped_total, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_consumed_frames_gettable_and_no_more() {
    let store = start("lc-retain", || memory_store(16 << 20));
    let producer = producer_of(&store, "ret", retaining(3)).await;
    let consumer = connect(&store.tcp(), "consumer").await;
    let mut sub = subscribe(&consumer, "ret", "c", Cursor::Oldest, 2).await;
    for seq in 0..8 {
        producer.put("ret", &framed(64, 32, seq)).await.unwrap();
        let f = next(&mut sub).await;
        assert_eq!(f.seq(), seq);
        f.release().await.unwrap();
    }
    let st = producer.stream_stat("ret").await.unwrap();
    assert_eq!(
        (st.first_seq, st.next_seq, st.frames, st.unconsumed_frames),
        (5, 8, 3, 0)
    );
    assert_eq!(objects_and_blocks(&producer).await, (3, 3));
    for seq in 5..8 {
        let g = within(consumer.get("ret", Some(seq))).await.unwrap();
        assert_eq!((g.seq(), stamp(g.bytes())), (seq, seq));
        g.release().await.unwrap();
    }
    let newest = within(producer.get("ret", None)).await.unwrap();
    assert_eq!(newest.seq(), 7);
    drop(newest);
    for seq in [0, 4, 8, 1000] {
        let e = within(consumer.get("ret", Some(seq))).await.unwrap_err();
        assert_eq!(code(e), ErrorCode::FrameGone, "frame {seq}");
    }
    // Replay: a new consumer from the oldest retained frame.
    let mut replay = subscribe(&producer, "ret", "", Cursor::Oldest, 8).await;
    assert_eq!(replay.from_seq(), 5);
    for seq in 5..8 {
        assert_eq!(next(&mut replay).await.seq(), seq);
    }
    // A later frame pushes the oldest retained one out once everyone has released it.
    producer.put("ret", &framed(64, 32, 8)).await.unwrap();
    next(&mut sub).await.release().await.unwrap();
    next(&mut replay).await.release().await.unwrap();
    let st = producer.stream_stat("ret").await.unwrap();
    assert_eq!((st.first_seq, st.frames), (6, 3));
    let e = within(consumer.get("ret", Some(5))).await.unwrap_err();
    assert_eq!(code(e), ErrorCode::FrameGone);
}

/// A producer that made stream "rep" with the durable consumer "enc" (detached at frame 0,
/// so the frames wait for it), then put `frames` small frames.
async fn durable_stream_with_frames(store: &common::TestStore, frames: u64) -> Client {
    let producer = producer_of(store, "rep", StreamConfig::default()).await;
    // "enc" exists (durable, detached at 0) before the frames: they wait for it.
    subscribe(&producer, "rep", "enc", Cursor::Oldest, 1)
        .await
        .close()
        .await
        .unwrap();
    for seq in 0..frames {
        producer.put("rep", &framed(64, 32, seq)).await.unwrap();
    }
    producer
}

/// A client named `name` at `addr` that attached the durable consumer "enc" of stream "rep"
/// again, where it was, with a window of `window` frames.
async fn resume_enc(addr: &str, name: &str, window: u32) -> (Client, Subscription) {
    let enc = connect(addr, name).await;
    let sub = subscribe(&enc, "rep", "enc", Cursor::Resume, window).await;
    (enc, sub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_consumer_resumes_exactly_once_in_order() {
    let store = start("lc-replay", || memory_store(16 << 20));
    let producer = durable_stream_with_frames(&store, 10).await;
    let addr = store.unix();
    let held = crash_holding(move || async move {
        let (_enc, mut sub) = resume_enc(&addr, "enc", 2).await;
        assert_eq!(sub.from_seq(), 0);
        for seq in 0..5 {
            let f = next(&mut sub).await;
            assert_eq!(f.seq(), seq);
            f.release().await.unwrap();
        }
        // The store answered the last release before delivering the next frame: the window
        // (2) now holds exactly 5 and 6.
        vec![next(&mut sub).await, next(&mut sub).await]
    });
    assert_eq!(held, [5, 6]);
    wait_detached(&producer, "enc").await;
    let st = producer.stream_stat("rep").await.unwrap();
    let c = st.consumers.iter().find(|c| c.name == "enc").unwrap();
    assert_eq!((c.durable, c.committed, c.outstanding), (true, 5, 0));
    assert_eq!(st.unconsumed_frames, 5, "5..10 wait for enc");
    assert_eq!(producer.stat().await.unwrap().reclaimed_references, 2);

    let (_enc, mut sub) = resume_enc(&store.tcp(), "enc-again", 3).await;
    assert_eq!(sub.from_seq(), 5);
    let mut seen = Vec::new();
    for _ in 5..10 {
        let f = next(&mut sub).await;
        assert_eq!(stamp(f.bytes()), f.seq());
        seen.push(f.seq());
        f.release().await.unwrap();
    }
    assert_eq!(seen, vec![5, 6, 7, 8, 9]);
    // Deliveries come in order: if the next one is a new frame, nothing was delivered twice.
    producer.put("rep", &framed(64, 32, 10)).await.unwrap();
    assert_eq!(next(&mut sub).await.seq(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_releases_are_not_redelivered() {
    let store = start("lc-ooo", || memory_store(16 << 20));
    let producer = durable_stream_with_frames(&store, 8).await;
    let addr = store.unix();
    let held = crash_holding(move || async move {
        let (_enc, mut sub) = resume_enc(&addr, "enc", 4).await;
        let mut frames = Vec::new();
        for _ in 0..4 {
            frames.push(next(&mut sub).await);
        }
        assert_eq!(
            frames.iter().map(FrameRef::seq).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        let f2 = frames.remove(2);
        let mut frames = frames.into_iter();
        let (f0, f1, f3) = (
            frames.next().unwrap(),
            frames.next().unwrap(),
            frames.next().unwrap(),
        );
        f0.release().await.unwrap();
        f3.release().await.unwrap();
        f1.release().await.unwrap();
        // Each release opened the window for one more frame: 4, 5, 6.
        let mut held = vec![f2];
        for _ in 0..3 {
            held.push(next(&mut sub).await);
        }
        held
    });
    assert_eq!(held, [2, 4, 5, 6]);
    wait_detached(&producer, "enc").await;
    let (_enc, mut sub) = resume_enc(&store.unix(), "enc", 4).await;
    assert_eq!(sub.from_seq(), 2);
    let mut seen = Vec::new();
    for _ in 0..5 {
        let f = next(&mut sub).await;
        seen.push(f.seq());
        f.release().await.unwrap();
    }
    assert_eq!(
        seen,
        vec![2, 4, 5, 6, 7],
        "3 was released before the disconnect"
    );
    let st = producer.stream_stat("rep").await.unwrap();
    let c = st.consumers.iter().find(|c| c.name == "enc").unwrap();
    assert_eq!(c.committed, 8);
    // Deliveries come in order: if the next one is a new frame, nothing was delivered twice.
    producer.put("rep", &framed(64, 32, 8)).await.unwrap();
    assert_eq!(next(&mut sub).await.seq(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_durable_consumer_is_busy_for_everyone_else() {
    let store = start("lc-busy", || memory_store(16 << 20));
    let one = connect(&store.unix(), "one").await;
    let two = connect(&store.tcp(), "two").await;
    create_stream(&one, "s", StreamConfig::default()).await;
    let sub = subscribe(&one, "s", "enc", Cursor::Oldest, 4).await;
    for from in [
        Cursor::Resume,
        Cursor::Oldest,
        Cursor::Latest,
        Cursor::Seq(0),
    ] {
        let r = within(two.subscribe("s", "enc", from, 4)).await;
        assert_eq!(failed(r), ErrorCode::ConsumerBusy);
    }
    // The same session cannot attach it twice either.
    let r = within(one.subscribe("s", "enc", Cursor::Resume, 4)).await;
    assert_eq!(failed(r), ErrorCode::ConsumerBusy);
    // Other names are free; anonymous consumers never collide.
    let _other = subscribe(&two, "s", "other", Cursor::Oldest, 4).await;
    let _anon1 = subscribe(&two, "s", "", Cursor::Oldest, 4).await;
    let _anon2 = subscribe(&one, "s", "", Cursor::Oldest, 4).await;
    one.put("s", &framed(64, 32, 0)).await.unwrap();
    // Once detached, another session takes it over where it was.
    sub.close().await.unwrap();
    let mut sub = subscribe(&two, "s", "enc", Cursor::Resume, 4).await;
    assert_eq!(sub.from_seq(), 0);
    assert_eq!(next(&mut sub).await.seq(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_stream_ends_subscriptions_and_held_frames_stay_readable() {
    let store = start("lc-delete", || memory_store(16 << 20));
    let admin = connect(&store.unix(), "admin").await;
    let shm = connect(&store.unix(), "shm").await;
    let tcp = connect(&store.tcp(), "tcp").await;
    create_stream(&admin, "del", StreamConfig::default()).await;
    // Windows of 2: each consumer holds frames 0 and 1, and nothing is in flight.
    let mut a = subscribe(&shm, "del", "a", Cursor::Oldest, 2).await;
    let mut b = subscribe(&tcp, "del", "b", Cursor::Oldest, 2).await;
    for seq in 0..3 {
        admin.put("del", &framed(64, 32, seq)).await.unwrap();
    }
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(next(&mut a).await);
        held.push(next(&mut b).await);
    }
    let got = within(admin.get("del", Some(2))).await.unwrap();
    // A grant being written when the stream goes.
    let grant = admin.create("del", 4096).await.unwrap();
    assert_eq!(admin.stat().await.unwrap().objects, 4);

    admin.delete_stream("del").await.unwrap();
    let e = within(admin.stream_stat("del")).await.unwrap_err();
    assert_eq!(code(e), ErrorCode::UnknownStream);
    // The subscriptions end with the store's reason.
    for sub in [&mut a, &mut b] {
        assert_eq!(failed(within(sub.next()).await), ErrorCode::UnknownStream);
    }
    // Every frame a client holds is still there, bytes intact, until released.
    assert_eq!(
        objects_and_blocks(&admin).await,
        (3, 3),
        "held frames must outlive their stream"
    );
    for f in &held {
        assert_eq!(stamp(f.bytes()), f.seq());
    }
    assert_eq!(stamp(got.bytes()), 2);
    for f in held {
        f.release().await.expect("a held reference is still valid");
    }
    got.release().await.unwrap();
    let s = admin.stat().await.unwrap();
    assert_eq!((s.objects, s.blocks_in_use, s.streams), (0, 0, 0));
    // The name can be used again, from scratch: the old grant belongs to no stream of it.
    create_stream(&admin, "del", StreamConfig::default()).await;
    let frame = framed(64, 32, 0);
    // SAFETY: the only slice of this grant, dropped at once.
    unsafe { admin.grant_bytes(&grant) }.unwrap()[..frame.len()].copy_from_slice(&frame);
    let sealed = within(admin.seal(&grant, grant.offset, frame.len() as u64, None)).await;
    assert_eq!(failed(sealed), ErrorCode::UnknownObject);
    let st = admin.stream_stat("del").await.unwrap();
    assert_eq!((st.next_seq, st.writing), (0, 0));
    assert_eq!(admin.put("del", &frame).await.unwrap(), 0);
    assert_eq!(admin.stream_stat("del").await.unwrap().writing, 0);
    let s = admin.stat().await.unwrap();
    assert_eq!((s.aborted_writes, s.objects), (1, 0));
}

/// `GET /metrics` over a plain socket.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = within(tokio::net::TcpStream::connect(addr)).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    within(s.read_to_string(&mut response)).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("a Content-Length")
        .parse()
        .unwrap();
    assert_eq!(length, body.len());
    body.to_owned()
}

fn metric(body: &str, name_and_labels: &str) -> u64 {
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no metric {name_and_labels} in\n{body}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_reports_the_store() {
    let store = start("lc-metrics", || memory_store(16 << 20));
    let addr = store.bound.metrics.expect("metrics bound");
    let config = StreamConfig {
        retain_frames: 1,
        ..bounded(3, FullPolicy::Reject)
    };
    let producer = producer_of(&store, "m", config).await;
    let consumer = connect(&store.tcp(), "consumer").await;
    let mut sub = subscribe(&consumer, "m", "enc", Cursor::Oldest, 8).await;
    for seq in 0..3 {
        producer.put("m", &framed(64, 32, seq)).await.unwrap();
    }
    assert!(producer.put("m", &framed(64, 32, 3)).await.is_err());
    next(&mut sub).await.release().await.unwrap();
    let body = scrape(addr).await;
    assert!(body.contains("# TYPE staging_store_seals_total counter"));
    assert_eq!(metric(&body, "staging_store_seals_total"), 3);
    assert_eq!(metric(&body, "staging_store_creates_total"), 3);
    assert_eq!(metric(&body, "staging_store_errors_total"), 1);
    assert_eq!(metric(&body, "staging_store_sessions"), 2);
    assert_eq!(metric(&body, "staging_store_streams"), 1);
    assert_eq!(metric(&body, "staging_store_objects"), 3);
    assert_eq!(metric(&body, "staging_store_blocks_in_use"), 3);
    assert_eq!(metric(&body, "staging_store_releases_total"), 1);
    assert_eq!(
        metric(&body, "staging_store_stream_frames{stream=\"m\"}"),
        3
    );
    assert_eq!(
        metric(
            &body,
            "staging_store_stream_unconsumed_frames{stream=\"m\"}"
        ),
        2
    );
    assert_eq!(
        metric(
            &body,
            "staging_store_stream_backpressure_rejections_total{stream=\"m\"}"
        ),
        1
    );
    assert_eq!(
        metric(
            &body,
            "staging_store_consumer_committed{stream=\"m\",consumer=\"enc\"}"
        ),
        1
    );
    assert_eq!(
        metric(
            &body,
            "staging_store_consumer_outstanding{stream=\"m\",consumer=\"enc\"}"
        ),
        2
    );
    assert_eq!(
        metric(&body, "staging_store_data_bytes_out_total"),
        3 * framed(64, 32, 0).len() as u64,
        "the tcp consumer received three frames"
    );
    // Values move with the store.
    for _ in 0..2 {
        next(&mut sub).await.release().await.unwrap();
    }
    let body = scrape(addr).await;
    assert_eq!(
        metric(
            &body,
            "staging_store_consumer_committed{stream=\"m\",consumer=\"enc\"}"
        ),
        3
    );
    assert_eq!(
        metric(&body, "staging_store_stream_frames{stream=\"m\"}"),
        1
    );
    assert_eq!(metric(&body, "staging_store_objects"), 1);
    assert_eq!(metric(&body, "staging_store_releases_total"), 3);
    // Frames 0 and 1 are freed: their blocks are no longer in use. (`put` asks for reused
    // blocks, so they wait in the recycled pool instead of the scrubber.)
    let stat = producer.stat().await.unwrap();
    let body = scrape(addr).await;
    assert_eq!(stat.blocks_in_use, 1, "the retained frame 2");
    assert_eq!(metric(&body, "staging_store_blocks_in_use"), 1, "as stat");
    assert_eq!(metric(&body, "staging_store_blocks_recycled"), 2);
    assert_eq!(metric(&body, "staging_store_blocks_allocated"), 3);
    assert_eq!(
        metric(&body, "staging_store_bytes_in_use"),
        stat.block_bytes,
        "one block"
    );
}

/// Dropping (or closing) a subscription detaches its consumer at once — frames queued for
/// it and not taken go back unacknowledged, so the producer is not held up — while a frame
/// the client took stays valid (it may be reading it in place) until it is released. The
/// durable consumer resumes with every frame it had not released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_subscription_detaches_and_frames_taken_stay_valid() {
    for addr_of in [common::TestStore::unix, common::TestStore::tcp] {
        let store = start("lc-drop-sub", || memory_store(16 << 20));
        let producer = producer_of(&store, "s", bounded(3, FullPolicy::Reject)).await;
        let consumer = connect(&addr_of(&store), "consumer").await;
        let mut sub = subscribe(&consumer, "s", "enc", Cursor::Oldest, 3).await;
        let frames: Vec<Vec<u8>> = (0..3).map(|seq| framed(64, 32, seq)).collect();
        for (seq, bytes) in frames.iter().enumerate() {
            assert_eq!(producer.put("s", bytes).await.unwrap(), seq as u64);
        }
        let taken = next(&mut sub).await;
        assert_eq!(taken.seq(), 0);
        // Frames 1 and 2 were delivered (or are on their way) and never taken.
        drop(sub);
        // The consumer is detached: nothing is outstanding but the frame taken...
        wait_until("the consumer detaches", || async {
            let s = producer.stream_stat("s").await.unwrap();
            let c = &s.consumers[0];
            !c.attached && c.outstanding == 0
        })
        .await;
        // ...whose bytes are intact, and whose blocks are not reused while it is held.
        assert_eq!(taken.bytes(), &frames[0][..]);
        // The stream is still full: the frames are the durable consumer's until released.
        assert_eq!(
            failed(producer.put("s", &framed(64, 32, 3)).await),
            ErrorCode::StreamFull
        );
        assert_eq!(taken.bytes(), &frames[0][..]);
        taken.release().await.unwrap();
        // Resuming delivers every frame it had not acknowledged, in order.
        let mut sub = subscribe(&consumer, "s", "enc", Cursor::Resume, 3).await;
        for (seq, bytes) in frames.iter().enumerate() {
            let f = next(&mut sub).await;
            assert_eq!((f.seq(), f.bytes()), (seq as u64, &bytes[..]));
            f.release().await.unwrap();
        }
        sub.close().await.unwrap();
        assert_eq!(objects_and_blocks(&producer).await, (0, 0));
        assert_eq!(producer.put("s", &framed(64, 32, 3)).await.unwrap(), 3);
    }
}

/// An anonymous consumer's frame taken before `close` stays held (its blocks are not
/// reused under it) even though nobody else wants the frame any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_taken_before_close_outlives_its_anonymous_consumer() {
    let store = start("lc-close-held", || memory_store(16 << 20));
    let c = connect(&store.unix(), "shm").await;
    create_stream(&c, "s", StreamConfig::default()).await;
    let mut sub = subscribe(&c, "s", "", Cursor::Oldest, 4).await;
    let frame0 = framed(64, 32, 0);
    c.put("s", &frame0).await.unwrap();
    let taken = next(&mut sub).await;
    sub.close().await.unwrap();
    // The stream keeps nothing now; more frames of the same size would reuse freed blocks.
    for seq in 1..4 {
        c.put("s", &framed(64, 32, seq)).await.unwrap();
    }
    assert_eq!(taken.bytes(), &frame0[..]);
    assert_eq!(c.stat().await.unwrap().objects, 1, "only the frame taken");
    taken.release().await.unwrap();
    assert_eq!(objects_and_blocks(&c).await, (0, 0));
}

/// A tcp consumer's frames travel on its data connection, the end of its subscription on the
/// control connection: when the stream is deleted with frames still on their way, the
/// subscription yields every frame it was delivered before it reports the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_stream_ends_a_tcp_subscription_after_its_last_frame() {
    let store = start("lc-end-tcp", || memory_store(64 << 20));
    let producer = producer_of(&store, "big", StreamConfig::default()).await;
    let consumer = connect(&store.tcp(), "consumer").await;
    let mut sub = subscribe(&consumer, "big", "", Cursor::Oldest, 4).await;
    // 4 frames of 1.5 MB: more than the sockets buffer, still on their way when the
    // stream goes.
    let frames: Vec<Vec<u8>> = (0..4).map(|seq| framed(1024, 1024, seq)).collect();
    for bytes in &frames {
        producer.put("big", bytes).await.unwrap();
    }
    producer.delete_stream("big").await.unwrap();
    for (seq, bytes) in frames.iter().enumerate() {
        let f = next(&mut sub).await;
        assert_eq!(f.seq(), seq as u64);
        assert!(f.bytes() == &bytes[..], "frame {seq} intact");
    }
    let end = within(sub.next()).await.unwrap_err();
    assert!(
        matches!(&end, ClientError::Store(e) if e.code == ErrorCode::UnknownStream),
        "{end:?}"
    );
    // And it stays ended.
    assert!(matches!(
        within(sub.next()).await,
        Err(ClientError::Store(_))
    ));
}
