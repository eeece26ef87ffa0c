//! `serve --persist DIR`: the store is killed (SIGKILL) or stopped (SIGTERM) and restarted on
//! the same directory; every sealed frame comes back with identical bytes, numbering
//! continues, durable cursors survive, and a frame whose bytes were damaged on disk is dropped
//! (and only it).

mod common;
#[path = "common/processes.rs"]
mod processes;

use common::{framed, stamp, temp_dir};
use processes::Server;
use staging_store::client::{Client, ClientError};
use staging_store::proto::{Cursor, ErrorCode, StoreError, StreamConfig};
use std::future::Future;
use std::path::Path;
use std::time::Duration;

const N: u64 = 10;
/// Frames the durable consumer "enc" releases before the store goes down.
const CONSUMED: u64 = 5;

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("the store did not answer within 10 s")
}

fn frame(seq: u64) -> Vec<u8> {
    framed(64 + 16 * (seq % 3) as u32, 48, seq)
}

fn serve(dir: &Path) -> Server {
    let sock = dir.join("s.sock");
    Server::start(&[
        "--persist",
        dir.to_str().unwrap(),
        "--unix",
        sock.to_str().unwrap(),
        "--region-size",
        "64MiB",
    ])
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Stop {
    Kill,
    Term,
}

fn stop(server: &mut Server, how: Stop) {
    tokio::task::block_in_place(|| match how {
        Stop::Kill => server.proc.kill9(),
        Stop::Term => {
            let status = server.proc.term();
            assert_eq!(
                status.code(),
                Some(0),
                "staging-store exit status: {status}"
            );
        }
    });
}

/// Writes frames 0..N to stream "rec" (retaining them all), lets the durable consumer "enc"
/// release 0..CONSUMED and hold a few more, and returns where each frame's bytes lie in the
/// region: `(offset, len)` from a get's delivery.
async fn write_frames(server: &Server) -> Vec<(u64, u64)> {
    let c = within(Client::connect(server.unix(), "writer"))
        .await
        .unwrap();
    assert!(c.welcome().checksums, "a persisting store wants checksums");
    c.create_stream(
        "rec",
        StreamConfig {
            retain_frames: 32,
            ..Default::default()
        },
        false,
    )
    .await
    .unwrap();
    let mut enc = c.subscribe("rec", "enc", Cursor::Oldest, 8).await.unwrap();
    for seq in 0..N {
        // Half with an explicit checksum, half with the one the client adds for this store.
        let bytes = frame(seq);
        let put = if seq % 2 == 0 {
            within(c.put("rec", &bytes)).await
        } else {
            within(c.put_with("rec", &bytes, true)).await
        };
        assert_eq!(put.unwrap(), seq);
    }
    for seq in 0..CONSUMED {
        let f = within(enc.next()).await.unwrap();
        assert_eq!(f.seq(), seq);
        f.release().await.unwrap();
    }
    // enc holds CONSUMED.. (its window) when the store goes down.
    let mut offsets = Vec::new();
    for seq in 0..N {
        let g = within(c.get("rec", Some(seq))).await.unwrap();
        assert_eq!(g.bytes(), &frame(seq)[..]);
        assert!(g.delivery().checksum.is_some());
        offsets.push((g.delivery().offset, g.delivery().len));
        g.release().await.unwrap();
    }
    offsets
}

/// Flips bytes in the middle of frame `seq` inside the region file (the store is down).
fn corrupt(dir: &Path, (offset, len): (u64, u64), seq: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("region"))
        .unwrap();
    // The region file maps 1:1 to region offsets: the frame is there, byte for byte.
    let mut bytes = vec![0u8; len as usize];
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.read_exact(&mut bytes).unwrap();
    assert_eq!(
        bytes,
        frame(seq),
        "frame {seq} at {offset} in the region file"
    );
    // Pixels, not the segment table: only the checksum can tell.
    let at = len / 2;
    for b in &mut bytes[at as usize..at as usize + 8] {
        *b ^= 0x5a;
    }
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.write_all(&bytes).unwrap();
    file.sync_all().unwrap();
}

/// Everything a restarted store must have: the frames (but `corrupt`), their numbering, the
/// durable cursor. Then writes frame N and returns.
async fn check_recovered(server: &Server, corrupt: Option<u64>) {
    let c = within(Client::connect(server.unix(), "checker"))
        .await
        .unwrap();
    let lost = u64::from(corrupt.is_some());
    let s = c.stat().await.unwrap();
    assert_eq!(
        (s.recovered_frames, s.corrupt_frames),
        (N - lost, lost),
        "{s:?}"
    );
    // Only the recovered frames hold blocks: everything else the old store had is reclaimed.
    assert_eq!((s.objects, s.blocks_in_use), (N - lost, N - lost));
    for seq in 0..N {
        let got = within(c.get("rec", Some(seq))).await;
        if Some(seq) == corrupt {
            match got {
                Err(ClientError::Store(StoreError {
                    code: ErrorCode::FrameGone,
                    ..
                })) => {}
                other => panic!("the corrupt frame {seq}: {other:?}"),
            }
            continue;
        }
        let g = got.unwrap_or_else(|e| panic!("frame {seq}: {e}"));
        assert_eq!(g.bytes(), &frame(seq)[..], "frame {seq}'s bytes");
        assert!(g.verify(), "frame {seq}'s checksum");
        assert_eq!(stamp(g.bytes()), seq);
        g.release().await.unwrap();
    }
    let st = c.stream_stat("rec").await.unwrap();
    assert_eq!(st.next_seq, N);
    assert_eq!(st.config.retain_frames, 32, "the configuration survives");
    let enc = st.consumers.iter().find(|k| k.name == "enc").expect("enc");
    assert_eq!(
        (enc.durable, enc.attached, enc.committed),
        (true, false, CONSUMED)
    );
    // Numbering continues.
    assert_eq!(within(c.put("rec", &frame(N))).await.unwrap(), N);
    // enc resumes where it was: nothing it released comes again.
    let mut sub = c.subscribe("rec", "enc", Cursor::Resume, 4).await.unwrap();
    assert_eq!(sub.from_seq(), CONSUMED);
    let mut seen = Vec::new();
    while seen.len()
        < (N + 1 - CONSUMED - u64::from(corrupt.is_some_and(|s| s >= CONSUMED))) as usize
    {
        let f = within(sub.next()).await.unwrap();
        assert_eq!(f.bytes(), &frame(f.seq())[..]);
        seen.push(f.seq());
        f.release().await.unwrap();
    }
    let expected: Vec<u64> = (CONSUMED..=N).filter(|&s| Some(s) != corrupt).collect();
    assert_eq!(seen, expected);
}

async fn restart_after(how: Stop, corrupt_seq: Option<u64>) {
    let dir = temp_dir(&format!("persist-{how:?}").to_lowercase());
    let mut server = serve(&dir);
    let offsets = write_frames(&server).await;
    stop(&mut server, how);
    if let Some(seq) = corrupt_seq {
        corrupt(&dir, offsets[seq as usize], seq);
    }
    let mut server = serve(&dir);
    check_recovered(&server, corrupt_seq).await;
    // And again: the recovered store persists too (frame N included).
    stop(&mut server, how);
    let mut server = serve(&dir);
    let c = within(Client::connect(server.unix(), "again"))
        .await
        .unwrap();
    let g = within(c.get("rec", Some(N))).await.unwrap();
    assert_eq!(g.bytes(), &frame(N)[..]);
    g.release().await.unwrap();
    let s = c.stat().await.unwrap();
    assert_eq!(s.corrupt_frames, 0, "nothing new is corrupt");
    assert_eq!(
        c.stream_stat("rec").await.unwrap().next_seq,
        N + 1,
        "numbering continues"
    );
    drop(c);
    stop(&mut server, Stop::Term);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_then_restart_recovers_every_sealed_frame() {
    restart_after(Stop::Kill, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_then_restart_recovers_every_sealed_frame() {
    restart_after(Stop::Term, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_corrupted_on_disk_is_dropped_after_a_crash() {
    restart_after(Stop::Kill, Some(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_corrupted_on_disk_is_dropped_after_a_clean_stop() {
    restart_after(Stop::Term, Some(7)).await;
}

/// A seal that released its input, a sink's committed state and an ended stream survive a
/// SIGKILL of the store: the journal holds each operation as one record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seals_with_releases_commits_and_ends_survive_a_crash() {
    use capnp_rdma::frame::{FrameSpec, PixelFormat};
    use staging_store::in_place::InPlace;

    let dir = temp_dir("persist-exactly-once");
    let mut server = serve(&dir);
    let c = within(Client::connect(server.unix(), "ops")).await.unwrap();
    for s in ["in", "out"] {
        c.create_stream(s, StreamConfig::default(), false)
            .await
            .unwrap();
    }
    let mut filter = c.subscribe("in", "f", Cursor::Oldest, 4).await.unwrap();
    let mut sink = c.subscribe("out", "s", Cursor::Oldest, 4).await.unwrap();
    for seq in 0..3 {
        c.put("in", &frame(seq)).await.unwrap();
    }
    c.end_stream("in").await.unwrap();
    for _ in 0..2 {
        let input = within(filter.next()).await.unwrap();
        let spec = FrameSpec::new(PixelFormat::Gray8, 32, 16);
        let mut out = InPlace::create_frame(&c, "out", &spec).await.unwrap();
        out.message_mut().init_frame(&spec).unwrap();
        out.seal_releasing(&[input.delivery().reference])
            .await
            .unwrap();
        input.forget();
    }
    let written = within(sink.next()).await.unwrap();
    c.commit(sink.id(), &[written.delivery().reference], b"one frame")
        .await
        .unwrap();
    written.forget();
    stop(&mut server, Stop::Kill);
    drop((filter, sink, c));

    let mut server = serve(&dir);
    let c = within(Client::connect(server.unix(), "again"))
        .await
        .unwrap();
    let input = c.stream_stat("in").await.unwrap();
    assert!(input.ended, "the end survived");
    let mut filter = c.subscribe("in", "f", Cursor::Resume, 4).await.unwrap();
    assert_eq!(
        filter.from_seq(),
        2,
        "both releases made with seals survived"
    );
    let last = within(filter.next()).await.unwrap();
    assert_eq!(stamp(last.bytes()), 2);
    last.release().await.unwrap();
    assert!(within(filter.next()).await.unwrap_err().is_end_of_stream());
    assert_eq!(
        c.stream_stat("out").await.unwrap().next_seq,
        2,
        "both seals survived"
    );
    let sink = c.subscribe("out", "s", Cursor::Resume, 4).await.unwrap();
    assert_eq!(sink.state(), b"one frame");
    assert_eq!(sink.from_seq(), 1);
    drop((filter, sink, c));
    stop(&mut server, Stop::Term);
    let _ = std::fs::remove_dir_all(dir);
}
