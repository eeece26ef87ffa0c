//! Reused blocks: a `dirtyOk` grant names the freed frame whose bytes it still holds (so a
//! producer may repaint only what changed), never a frame of another or a deleted stream, and
//! a tcp client's writes into reused blocks can never seal a stale byte.

mod common;

use common::{framed, memory_store, stamp, start};
use staging_store::client::Client;
use staging_store::proto::{Cursor, ErrorCode, StreamConfig};
use std::time::Duration;

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("timed out")
}

/// Writes `bytes` as the stream's next frame through a `dirtyOk` grant, copying every byte.
async fn put_dirty(c: &Client, stream: &str, bytes: &[u8]) -> (u64, staging_store::proto::Grant) {
    let g = within(c.create_with(stream, bytes.len() as u64, true))
        .await
        .unwrap();
    // SAFETY: the only slice of this fresh grant, dropped before the seal.
    unsafe { c.grant_bytes(&g) }.unwrap()[..bytes.len()].copy_from_slice(bytes);
    let seq = within(c.seal(&g, g.offset, bytes.len() as u64, None))
        .await
        .unwrap();
    (seq, g)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_grant_names_the_frame_it_still_holds() {
    let store = start("reuse-names", || memory_store(16 << 20));
    let p = within(Client::connect(&store.unix(), "producer"))
        .await
        .unwrap();
    let c = within(Client::connect(&store.unix(), "consumer"))
        .await
        .unwrap();
    p.create_stream("a", StreamConfig::default(), false)
        .await
        .unwrap();
    p.create_stream("b", StreamConfig::default(), false)
        .await
        .unwrap();
    let mut sub = within(c.subscribe("a", "c", Cursor::Oldest, 4))
        .await
        .unwrap();
    let frame0 = framed(64, 32, 0);
    let (seq, g0) = put_dirty(&p, "a", &frame0).await;
    assert_eq!((seq, g0.previous), (0, None), "fresh blocks hold no frame");
    within(sub.next()).await.unwrap().release().await.unwrap();

    // Same size, same stream: the grant reuses frame 0's blocks and says so; its bytes are
    // frame 0's exactly.
    let g1 = within(p.create_with("a", frame0.len() as u64, true))
        .await
        .unwrap();
    let previous = g1.previous.expect("frame 0's blocks");
    assert_eq!(
        (previous.seq, previous.offset, previous.len),
        (0, g0.offset, frame0.len() as u64)
    );
    assert_eq!(g1.offset, g0.offset);
    // SAFETY: the only slice of this grant, dropped before the seal.
    let bytes = unsafe { p.grant_bytes(&g1) }.unwrap();
    assert_eq!(&bytes[..frame0.len()], &frame0[..]);
    // Repaint only what differs from frame 0 (the stamp), and it reads as frame 1.
    let frame1 = framed(64, 32, 1);
    for (at, (new, old)) in frame1.iter().zip(&frame0).enumerate() {
        if new != old {
            bytes[at] = *new;
        }
    }
    assert_eq!(
        within(p.seal(&g1, g1.offset, frame1.len() as u64, None))
            .await
            .unwrap(),
        1
    );
    let f = within(sub.next()).await.unwrap();
    assert_eq!((f.seq(), f.bytes()), (1, &frame1[..]));
    f.release().await.unwrap();

    // Another stream may get the blocks, but not the frame's name.
    let g = within(p.create_with("b", frame0.len() as u64, true))
        .await
        .unwrap();
    assert_eq!(g.offset, g0.offset, "the only recycled run");
    assert_eq!(g.previous, None, "a frame of another stream is not named");
    p.abort(&g).await.unwrap();

    // A grant that is not `dirtyOk` is zeroed and names nothing.
    let g = within(p.create("a", frame0.len() as u64)).await.unwrap();
    assert_eq!(g.previous, None);
    // SAFETY: the only slice of this grant.
    assert!(unsafe { p.grant_bytes(&g) }
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    p.abort(&g).await.unwrap();
    let s = p.stat().await.unwrap();
    assert_eq!(s.recycled_grants, 2, "g1 and the grant of stream b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_created_again_does_not_inherit_frame_names() {
    let store = start("reuse-deleted", || memory_store(16 << 20));
    let p = within(Client::connect(&store.unix(), "producer"))
        .await
        .unwrap();
    p.create_stream("s", StreamConfig::default(), false)
        .await
        .unwrap();
    let frame = framed(64, 32, 0);
    put_dirty(&p, "s", &frame).await;
    p.delete_stream("s").await.unwrap();
    p.create_stream("s", StreamConfig::default(), false)
        .await
        .unwrap();
    let g = within(p.create_with("s", frame.len() as u64, true))
        .await
        .unwrap();
    assert_eq!(
        g.previous, None,
        "frame 0 of the deleted stream is not this stream's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_writes_fill_reused_blocks_without_gaps() {
    let store = start("reuse-tcp", || memory_store(16 << 20));
    let shm = within(Client::connect(&store.unix(), "shm")).await.unwrap();
    let tcp = within(Client::connect(&store.tcp(), "tcp")).await.unwrap();
    shm.create_stream(
        "s",
        StreamConfig {
            retain_frames: 0,
            ..Default::default()
        },
        false,
    )
    .await
    .unwrap();
    let mut sub = within(shm.subscribe("s", "c", Cursor::Oldest, 4))
        .await
        .unwrap();
    // Frame 0 through shm, released: its blocks wait for a `dirtyOk` create.
    let frame0 = framed(64, 32, 0);
    put_dirty(&shm, "s", &frame0).await;
    within(sub.next()).await.unwrap().release().await.unwrap();

    // tcp: the reused grant does not name the frame (a tcp client cannot repaint part).
    let g = within(tcp.create_with("s", frame0.len() as u64, true))
        .await
        .unwrap();
    assert_eq!(g.previous, None);
    // A write that leaves a gap after the grant's start is refused: bytes 0..8 would be
    // frame 0's.
    let frame1 = framed(64, 32, 1);
    tcp.write_grant(&g, 8, &frame1[8..]).await.unwrap();
    let codes: Vec<ErrorCode> = within(async {
        loop {
            let notices = tcp.take_notices();
            if !notices.is_empty() {
                break notices;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .into_iter()
    .map(|e| e.code)
    .collect();
    assert_eq!(codes, [ErrorCode::OutOfGrant]);
    // In order from the start, it lands and reads back whole.
    tcp.write_grant(&g, 0, &frame1[..8]).await.unwrap();
    tcp.write_grant(&g, 8, &frame1[8..]).await.unwrap();
    assert_eq!(
        within(tcp.seal(&g, g.offset, frame1.len() as u64, None))
            .await
            .unwrap(),
        1
    );
    let f = within(sub.next()).await.unwrap();
    assert_eq!((f.seq(), f.bytes()), (1, &frame1[..]));
    assert_eq!(stamp(f.bytes()), 1);
    f.release().await.unwrap();
    // `put` asks for reused blocks too, and the frame is still whole.
    let frame2 = framed(64, 32, 2);
    assert_eq!(within(tcp.put("s", &frame2)).await.unwrap(), 2);
    let f = within(sub.next()).await.unwrap();
    assert_eq!(f.bytes(), &frame2[..]);
    f.release().await.unwrap();
    assert!(tcp.stat().await.unwrap().recycled_grants >= 2);
}
