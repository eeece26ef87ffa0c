//! Real processes: the `staging-store` binary serving, producers and consumers in processes of
//! their own (this test binary re-executed as `child_entry` with a role in the environment),
//! and clients killed with SIGKILL in the middle of what they do.

mod common;
#[path = "common/processes.rs"]
mod processes;

use common::{framed, stamp, temp_dir};
use processes::{spawn_child, Proc, Server};
use staging_store::client::{Client, ClientError, Subscription};
use staging_store::proto::{Cursor, ErrorCode, FullPolicy, StoreError, StoreStat, StreamConfig};
use std::future::Future;
use std::time::{Duration, Instant};

const ROLE: &str = "STAGING_STORE_TEST_ROLE";
const ADDR: &str = "STAGING_STORE_TEST_ADDR";
const STREAM: &str = "STAGING_STORE_TEST_STREAM";
const CONSUMER: &str = "STAGING_STORE_TEST_CONSUMER";
const COUNT: &str = "STAGING_STORE_TEST_COUNT";

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("the store did not answer within 10 s")
}

async fn next(sub: &mut Subscription) -> staging_store::client::FrameRef {
    within(sub.next()).await.expect("a frame")
}

/// The frame every producer writes as `seq` (consumers check theirs against it).
fn frame(seq: u64) -> Vec<u8> {
    framed(64, 32 + 2 * (seq % 5) as u32, seq)
}

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("{key} not set"))
}

fn env_u64(key: &str) -> u64 {
    env(key).parse().unwrap()
}

/// A child's body: what a producer or consumer process does, then print a line the parent
/// waits for. Roles that end up killed wait for it (at most two minutes).
#[test]
#[ignore = "entry point of child processes spawned by the other tests"]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let client = within(Client::connect(&env(ADDR), &role)).await.unwrap();
        let stream = env(STREAM);
        match role.as_str() {
            // Consumes COUNT frames from the oldest, checking each one byte for byte.
            "consume" => {
                let mut sub = client
                    .subscribe(&stream, &env(CONSUMER), Cursor::Oldest, 4)
                    .await
                    .unwrap();
                println!("SUBSCRIBED");
                let count = env_u64(COUNT);
                for seq in 0..count {
                    let f = next(&mut sub).await;
                    assert_eq!(f.seq(), seq, "frames arrive in order, none missing");
                    assert_eq!(f.bytes(), &frame(seq)[..], "frame {seq}'s bytes");
                    assert_eq!(stamp(f.bytes()), seq);
                    assert!(f.verify());
                    f.release().await.unwrap();
                    println!("GOT {seq}");
                }
                println!("CONSUMED {count}");
            }
            "produce" => {
                let count = env_u64(COUNT);
                for seq in 0..count {
                    // With a CRC-32C, which consumers verify.
                    let bytes = frame(seq);
                    let put = client.put_with(&stream, &bytes, true);
                    assert_eq!(within(put).await.unwrap(), seq);
                }
                println!("PRODUCED {count}");
            }
            // Takes three frames and holds them until killed.
            "hold" => {
                let mut sub = client
                    .subscribe(&stream, "", Cursor::Latest, 3)
                    .await
                    .unwrap();
                println!("SUBSCRIBED");
                let mut held = Vec::new();
                for _ in 0..3 {
                    held.push(next(&mut sub).await);
                }
                let seqs: Vec<String> = held.iter().map(|f| f.seq().to_string()).collect();
                println!("HOLDING {}", seqs.join(" "));
                tokio::time::sleep(Duration::from_secs(120)).await;
                unreachable!("should have been killed");
            }
            // Gets a grant, writes half a frame into it, and is killed before sealing.
            "half-write" => {
                let bytes = frame(1000);
                let grant = client.create(&stream, bytes.len() as u64).await.unwrap();
                let half = bytes.len() / 2;
                match client.transport() {
                    staging_store::proto::Transport::Shm => {
                        // SAFETY: the only slice of this grant in this process.
                        unsafe { client.grant_bytes(&grant) }.unwrap()[..half]
                            .copy_from_slice(&bytes[..half]);
                    }
                    staging_store::proto::Transport::Tcp
                    | staging_store::proto::Transport::Verbs => {
                        client.write_grant(&grant, 0, &bytes[..half]).await.unwrap();
                    }
                }
                println!("HALF {}", grant.object);
                tokio::time::sleep(Duration::from_secs(120)).await;
                unreachable!("should have been killed");
            }
            other => panic!("unknown role {other}"),
        }
    });
}

fn child(role: &str, addr: &str, stream: &str, consumer: &str, count: u64) -> Proc {
    spawn_child(
        "child_entry",
        &[
            (ROLE, role),
            (ADDR, addr),
            (STREAM, stream),
            (CONSUMER, consumer),
            (COUNT, &count.to_string()),
        ],
    )
}

/// Waits for a child line without blocking the runtime's other tasks.
fn expect(p: &mut Proc, marker: &str) -> String {
    tokio::task::block_in_place(|| p.expect(marker))
}

fn exit_ok(p: &mut Proc) {
    let status = tokio::task::block_in_place(|| p.wait());
    assert!(status.success(), "a child failed: {status}");
}

fn serve(tag: &str) -> (Server, std::path::PathBuf) {
    let dir = temp_dir(tag);
    let sock = dir.join("s.sock");
    let server = Server::start(&[
        "--unix",
        sock.to_str().unwrap(),
        "--tcp",
        "127.0.0.1:0",
        "--region-size",
        "64MiB",
    ]);
    (server, dir)
}

/// SIGTERM: the server stops cleanly and exits 0.
fn stop(server: &mut Server) {
    let status = tokio::task::block_in_place(|| server.proc.term());
    assert_eq!(
        status.code(),
        Some(0),
        "staging-store exit status: {status}"
    );
}

/// A fresh connection's view of the store.
async fn fresh_stat(addr: &str) -> StoreStat {
    let c = within(Client::connect(addr, "auditor")).await.unwrap();
    c.stat().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_and_two_consumers_in_their_own_processes() {
    let (mut server, dir) = serve("proc-flow");
    const N: u64 = 60;
    const RETAIN: u64 = 4;
    let admin = within(Client::connect(server.unix(), "admin"))
        .await
        .unwrap();
    // A small stream: the producer cannot run more than two frames ahead of the consumers.
    admin
        .create_stream(
            "cam",
            StreamConfig {
                max_frames: 2,
                retain_frames: RETAIN as u32,
                on_full: FullPolicy::Block,
                block_timeout_ms: 10_000,
                checksums: true,
                ..Default::default()
            },
            false,
        )
        .await
        .unwrap();
    drop(admin);
    let mut a = child("consume", server.unix(), "cam", "a", N);
    let mut b = child("consume", server.tcp(), "cam", "b", N);
    expect(&mut a, "SUBSCRIBED");
    expect(&mut b, "SUBSCRIBED");
    let started = Instant::now();
    let mut p = child("produce", server.unix(), "cam", "", N);
    assert_eq!(expect(&mut p, "PRODUCED"), N.to_string());
    assert_eq!(expect(&mut a, "CONSUMED"), N.to_string());
    assert_eq!(expect(&mut b, "CONSUMED"), N.to_string());
    for c in [&mut p, &mut a, &mut b] {
        exit_ok(c);
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    let s = fresh_stat(server.unix()).await;
    assert_eq!((s.seals, s.deliveries, s.releases), (N, 2 * N, 2 * N));
    assert_eq!((s.objects, s.blocks_in_use), (RETAIN, RETAIN));
    assert_eq!(
        (s.reclaimed_references, s.aborted_writes, s.errors),
        (0, 0, 0)
    );
    let c = within(Client::connect(server.tcp(), "auditor"))
        .await
        .unwrap();
    let st = c.stream_stat("cam").await.unwrap();
    assert_eq!(
        (st.next_seq, st.frames, st.unconsumed_frames),
        (N, RETAIN as u32, 0)
    );
    // (Whether the producer had to wait depends on the scheduler; it never gave up.)
    assert_eq!(st.rejected_creates, 0);
    drop(c);
    stop(&mut server);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_clients_lose_exactly_what_they_held_and_nobody_else_notices() {
    let (mut server, dir) = serve("proc-kill");
    const TOTAL: u64 = 12;
    const RETAIN: u64 = 2;
    let admin = within(Client::connect(server.unix(), "admin"))
        .await
        .unwrap();
    admin
        .create_stream(
            "live",
            StreamConfig {
                retain_frames: RETAIN as u32,
                ..Default::default()
            },
            false,
        )
        .await
        .unwrap();
    // A consumer that keeps going (tcp), and one that takes three frames and sits on them.
    let mut steady = child("consume", server.tcp(), "live", "steady", TOTAL);
    let mut holder = child("hold", server.unix(), "live", "", 0);
    expect(&mut steady, "SUBSCRIBED");
    expect(&mut holder, "SUBSCRIBED");
    for seq in 0..3 {
        assert_eq!(admin.put("live", &frame(seq)).await.unwrap(), seq);
    }
    assert_eq!(expect(&mut holder, "HOLDING"), "0 1 2");
    expect(&mut steady, "GOT 2");
    // Two producers, each with half a frame written into its grant (one over shm, one over
    // tcp).
    let mut half_shm = child("half-write", server.unix(), "live", "", 0);
    let mut half_tcp = child("half-write", server.tcp(), "live", "", 0);
    expect(&mut half_shm, "HALF");
    expect(&mut half_tcp, "HALF");
    let st = admin.stream_stat("live").await.unwrap();
    assert_eq!((st.next_seq, st.writing, st.frames), (3, 2, 3));
    let s = admin.stat().await.unwrap();
    assert_eq!(
        s.objects,
        3 + 2,
        "three frames (the holder has them), two grants"
    );

    for p in [&mut holder, &mut half_shm, &mut half_tcp] {
        p.kill9();
    }
    // The store learns of the deaths when their sockets close; nothing announces it to us.
    let deadline = Instant::now() + Duration::from_secs(5);
    let s = loop {
        let s = admin.stat().await.unwrap();
        // admin and steady
        if s.sessions == 2 {
            break s;
        }
        assert!(Instant::now() < deadline, "dead sessions linger: {s:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(s.reclaimed_references, 3, "the holder's three frames");
    assert_eq!(s.aborted_writes, 2, "the two half-written grants");
    // Left: the frames the stream retains (the holder was the last one to need frame 0).
    assert_eq!((s.objects, s.blocks_in_use), (RETAIN, RETAIN));
    let st = admin.stream_stat("live").await.unwrap();
    assert_eq!((st.next_seq, st.writing, st.first_seq), (3, 0, 1));
    // The half-written frames never became readable.
    let gone = admin.get("live", Some(3)).await.unwrap_err();
    assert!(matches!(
        gone,
        ClientError::Store(StoreError {
            code: ErrorCode::FrameGone,
            ..
        })
    ));

    // The steady consumer got everything before, and gets everything after.
    for seq in 3..TOTAL {
        assert_eq!(admin.put("live", &frame(seq)).await.unwrap(), seq);
    }
    assert_eq!(expect(&mut steady, "CONSUMED"), TOTAL.to_string());
    exit_ok(&mut steady);
    let deadline = Instant::now() + Duration::from_secs(5);
    let s = loop {
        let s = fresh_stat(server.tcp()).await;
        // admin and the auditor asking
        if s.sessions == 2 {
            break s;
        }
        assert!(Instant::now() < deadline, "sessions linger: {s:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!((s.objects, s.blocks_in_use), (RETAIN, RETAIN));
    assert_eq!((s.reclaimed_references, s.aborted_writes), (3, 2));
    assert_eq!((s.seals, s.creates), (TOTAL, TOTAL + 2));
    let st = admin.stream_stat("live").await.unwrap();
    assert_eq!(
        (st.next_seq, st.sealed_total, st.writing),
        (TOTAL, TOTAL, 0)
    );
    drop(admin);
    stop(&mut server);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sigterm_as_soon_as_it_is_ready_exits_zero() {
    // The race this guards against (a signal between the "ready" line and the signal handler)
    // is narrow: try it a few dozen times.
    let dir = temp_dir("proc-term");
    let sock = dir.join("s.sock");
    for i in 0..40 {
        let mut server =
            Server::start(&["--unix", sock.to_str().unwrap(), "--region-size", "8MiB"]);
        let status = server.proc.term();
        assert_eq!(status.code(), Some(0), "attempt {i}: exit status {status}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
