//! The shm backend between two real processes: a writer child sends 1080p frames to a target
//! in the test process, and a writer killed with SIGKILL mid-stream leaves only complete
//! writes announced.
//!
//! Children are this test binary re-executed with `--ignored --exact child_entry` and a role in
//! the environment.

mod conformance;

use capnp_rdma::framing::{FramingOptions, OutboundMessage};
use capnp_rdma::transport::shm::{ShmOptions, ShmTarget, ShmWriter};
use capnp_rdma::transport::{Incoming, SendError, Target, TransportError, Writer};
use capnp_rdma::Region;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::net::UnixListener;

const ROLE: &str = "CAPNP_RDMA_SHM_TEST_ROLE";
const SOCKET: &str = "CAPNP_RDMA_SHM_TEST_SOCKET";
const WIDTH: u32 = 1920;
const HEIGHT: u32 = 1080;
const WINDOW: u32 = 4;
/// Destination slots in the grant, used round robin. With at least twice the window, a slot
/// is not written again until the target has taken (and checked) the write that was in it:
/// after taking a batch of at most `WINDOW` writes the target lets the writer run at most
/// `WINDOW` further ahead.
const SLOTS: u64 = 2 * WINDOW as u64;
/// Room for one 1080p I420 frame message (3,110,400 bytes of planes plus its header).
const SLOT_BYTES: u64 = 4 << 20;
/// Frames the "send" role sends.
const FRAMES: u64 = 50;

fn spawn(role: &str, socket: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env(SOCKET, socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn socket_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "capnp-rdma-shm-proc-{tag}-{}.sock",
        std::process::id()
    ))
}

fn slot(seq: u64, base: u64) -> u64 {
    base + (seq % SLOTS) * SLOT_BYTES
}

/// Posts `msg`, waiting for credit while the window is full. `Err` once the target is gone.
async fn post(
    w: &mut ShmWriter<OutboundMessage>,
    mut msg: OutboundMessage,
    offset: u64,
    imm: u32,
) -> Result<(), TransportError> {
    let mut done = Vec::new();
    loop {
        match w.post_write(msg, offset, imm) {
            Ok(_) => break,
            Err(SendError {
                payload,
                error: TransportError::WindowFull(_),
            }) => {
                msg = payload;
                w.completions(&mut done).await?;
                w.ready().await?;
            }
            Err(e) => return Err(e.error),
        }
    }
    // The write is finished: hand its blocks back to the region at once.
    w.completions(&mut done).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "entry point of child processes spawned by the other tests"]
async fn child_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let socket = std::env::var(SOCKET).unwrap();
    let local = conformance::region(32);
    let mut w = ShmWriter::<OutboundMessage>::connect(&socket, &local)
        .await
        .unwrap();
    let base = w.remote().offset;
    let frames = match role.as_str() {
        "send" => FRAMES,
        "send-until-killed" => u64::MAX,
        other => panic!("unknown role {other}"),
    };
    let options = FramingOptions::default();
    for seq in 0..frames {
        let msg = conformance::frame(&local, seq, WIDTH, HEIGHT, &options);
        if let Err(e) = post(&mut w, msg, slot(seq, base), seq as u32).await {
            panic!("frame {seq}: {e}");
        }
    }
    println!("SENT {frames} copied {}", w.stats().bytes_copied);
}

/// The exact bytes of frame `seq`, built again in a scratch region.
fn expected(scratch: &Region, seq: u64) -> Vec<u8> {
    let msg = conformance::frame(scratch, seq, WIDTH, HEIGHT, &FramingOptions::default());
    conformance::bytes_of(&msg)
}

/// Checks one announced write: in order, at its slot, every byte of the frame.
fn check(target: &ShmTarget, scratch: &Region, seq: u64, incoming: &Incoming) {
    assert_eq!(u64::from(incoming.imm), seq, "writes arrive in order");
    let want = expected(scratch, seq);
    let landed = conformance::landed(
        target,
        incoming,
        slot(seq, target.granted().offset),
        want.len(),
    );
    assert!(landed == want, "frame {seq} landed different bytes");
}

/// Takes and checks writes until the writer is gone (or `stop_after` have arrived, then
/// calls `stop` once and carries on). Returns how many arrived.
async fn receive_all(
    target: &mut ShmTarget,
    mut stop_after: Option<(u64, Box<dyn FnOnce() + Send>)>,
) -> u64 {
    let scratch = conformance::region(16);
    let mut seq = 0u64;
    let mut out = Vec::new();
    loop {
        out.clear();
        let got = tokio::time::timeout(Duration::from_secs(60), target.incoming(&mut out))
            .await
            .expect("incoming timed out");
        match got {
            Ok(_) => {
                for incoming in &out {
                    check(target, &scratch, seq, incoming);
                    seq += 1;
                }
            }
            Err(TransportError::Disconnected) => return seq,
            Err(e) => panic!("after {seq} writes: {e}"),
        }
        if stop_after.as_ref().is_some_and(|(n, _)| seq >= *n) {
            if let Some((_, stop)) = stop_after.take() {
                stop();
            }
        }
    }
}

async fn accept(listener: &UnixListener, region: &Region) -> ShmTarget {
    let lease = region.lease(SLOTS * SLOT_BYTES).unwrap();
    let options = ShmOptions {
        window: WINDOW,
        ..Default::default()
    };
    tokio::time::timeout(
        Duration::from_secs(60),
        ShmTarget::accept(listener, lease, &options),
    )
    .await
    .expect("the child did not connect")
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_from_another_process_arrive_intact() {
    let path = socket_path("send");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let region = conformance::region(64);
    let mut child = spawn("send", &path);
    let mut target = accept(&listener, &region).await;
    std::fs::remove_file(&path).unwrap();

    let arrived = receive_all(&mut target, None).await;
    assert_eq!(arrived, FRAMES);
    let stats = target.stats();
    assert_eq!(stats.delivered, FRAMES);

    let status = child.wait().unwrap();
    assert!(status.success(), "the writer child failed: {status}");
    let stdout = child.stdout.take().unwrap();
    let sent = BufReader::new(stdout)
        .lines()
        .map(|l| l.unwrap())
        // libtest prints "test child_entry ... " without a newline first.
        .find_map(|l| l.find("SENT ").map(|at| l[at..].to_string()))
        .expect("the child reports what it sent");
    assert!(sent.starts_with(&format!("SENT {FRAMES} ")), "{sent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_killed_mid_stream_leaves_only_complete_writes() {
    let path = socket_path("kill");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let region = conformance::region(64);
    let child = spawn("send-until-killed", &path);
    let pid = child.id();
    let mut target = accept(&listener, &region).await;
    std::fs::remove_file(&path).unwrap();

    let child = std::sync::Arc::new(std::sync::Mutex::new(child));
    let killer = {
        let child = std::sync::Arc::clone(&child);
        Box::new(move || {
            // Child::kill sends SIGKILL. The writer is streaming: it has credit again the
            // moment the target took the last batch.
            child.lock().unwrap().kill().unwrap();
        })
    };
    let arrived = receive_all(&mut target, Some((20, killer))).await;
    assert!(arrived >= 20, "{arrived}");
    assert!(
        matches!(
            target.incoming(&mut Vec::new()).await,
            Err(TransportError::Disconnected)
        ),
        "the end is reported for good"
    );
    let status = child.lock().unwrap().wait().unwrap();
    assert!(!status.success());

    // The dead writer's handle on the target's region held an owner slot (and nothing else).
    let report = region.reclaim_dead_owners().unwrap();
    assert_eq!(report.dead_pids, vec![pid]);
    assert_eq!((report.allocations, report.blocks), (0, 0));
}
