//! System `redis`: the same frames through a Redis server on loopback (the baseline).
//!
//! ```text
//!  producer connection                       redis-server          consumer connection
//!  writer: admit(i) ─ stamp i into plane 0 ─ SET frame:i <framed message> ──▶
//!  reader: +OK (in order) ── tells the consumer (in-process channel, free) ──┐
//!                                                                            ▼
//!                                            ◀── GET frame:i ─────── writer: GET / DEL
//!                                            ── $N <bytes> ──▶ reader: into 8-byte aligned memory,
//!                                                               read_frame in place, check stamp == i,
//!                                                               release the credit, queue DEL frame:i
//!                                            ── :1 ──────────▶ reader: DEL acknowledged
//! ```
//!
//! Each run starts its own `redis-server` ([`RedisServer`]: a free loopback port, no
//! persistence, one I/O thread, a temporary directory) and kills it afterwards. Both
//! connections pipeline: their writer and reader halves are separate tasks, so up to
//! `in_flight` SETs (and GETs) are on the wire at once. Only data movement is measured: the
//! SET acknowledgement reaches the consumer through an in-process channel, not through Redis
//! (no keyspace notifications, no polling). The producer writes each SET as one vectored write
//! (the header, the message in place, CRLF); the consumer reads each GET reply's payload
//! straight into its aligned buffer (beyond a read-ahead of at most 4 KiB) and reads the frame
//! there. A frame's latency runs from the start of its SET to the end of the consumer's check.
//!
//! Client threads: producer and consumer share one thread (a current-thread tokio runtime):
//! on a 2-core machine redis-server needs a core of its own. Two client threads
//! ([`Layout::TwoThreads`], kept for re-measuring; the tests run both) gave Redis no more
//! frames/s on the 2-core CI machine kind (1080p, 8 alternating runs each: median 396 vs 411
//! frames/s for one thread) and cost more client CPU per frame (cross-thread wake-ups).

use super::flow::{guarded, run_sides as run_clients, Flow, Layout, Measured, Receipts, STALL};
use super::frames::FrameTemplate;
use super::resp::{Key, Reply, RespError, RespReader, RespWriter};
use super::{Case, StoreBenchError};
use capnp::Word;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// How long `redis-server` gets to answer PING after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The key of frame `seq`.
fn key(seq: u64) -> Key {
    Key::new("frame:", seq)
}

/// A `redis-server` of our own on a free loopback port; killed, reaped and its directory
/// removed on drop.
#[derive(Debug)]
pub(crate) struct RedisServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

/// Where `redis-server` is: on PATH, else `/usr/bin/redis-server`.
fn find_redis() -> Result<PathBuf, StoreBenchError> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("redis-server"))
        .find(|p| executable(p));
    on_path
        .or_else(|| Some(PathBuf::from("/usr/bin/redis-server")).filter(|p| executable(p)))
        .ok_or(StoreBenchError::RedisMissing)
}

/// A loopback port nobody listened on a moment ago (bound, read, released).
fn free_port() -> Result<u16, StoreBenchError> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(StoreBenchError::io("bind"))?;
    Ok(listener
        .local_addr()
        .map_err(StoreBenchError::io("local_addr"))?
        .port())
}

/// A new empty directory under the system temp directory.
fn temp_dir() -> Result<PathBuf, StoreBenchError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("frame-bench-redis-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => continue,
            Err(e) => return Err(StoreBenchError::io("creating redis-server's directory")(e)),
        }
    }
}

impl RedisServer {
    /// Starts a server and waits until it answers PING (at most 10 s). The port is picked
    /// free just before the server binds it; if another process takes it in between, the
    /// start is retried on another port (three tries).
    pub(crate) fn start() -> Result<Self, StoreBenchError> {
        let binary = find_redis()?;
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::start_on(&binary, free_port()?) {
                Err(StoreBenchError::RedisStart { log, .. })
                    if tries < 3 && log.contains("Address already in use") =>
                {
                    continue
                }
                other => return other,
            }
        }
    }

    fn start_on(binary: &Path, port: u16) -> Result<Self, StoreBenchError> {
        let dir = temp_dir()?;
        let log = match std::fs::File::create(dir.join("redis.log")) {
            Ok(log) => log,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(StoreBenchError::io("creating redis-server's log")(e));
            }
        };
        let spawned = log.try_clone().and_then(|stderr| {
            Command::new(binary)
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--save", ""])
                .args(["--appendonly", "no"])
                .args(["--daemonize", "no"])
                .arg("--dir")
                .arg(&dir)
                .args(["--protected-mode", "yes"])
                .args(["--io-threads", "1"])
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(stderr)
                .spawn()
        });
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(StoreBenchError::RedisStart {
                    what: format!("could not be started ({}): {e}", binary.display()),
                    log: String::new(),
                });
            }
        };
        // From here on, Drop kills the child and removes the directory.
        let mut server = Self { child, port, dir };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&mut self) -> Result<(), StoreBenchError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(StoreBenchError::RedisStart {
                    what: format!("exited ({status}) before answering PING"),
                    log: self.log(),
                });
            }
            if ping(self.addr()).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StoreBenchError::RedisStart {
                    what: format!(
                        "did not answer PING on {} within {READY_TIMEOUT:?}",
                        self.addr()
                    ),
                    log: self.log(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server's address.
    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The server's process id (for its CPU time).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The end of what the server printed (stdout and stderr).
    pub(crate) fn log(&self) -> String {
        let text = std::fs::read(self.dir.join("redis.log"))
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_else(|e| format!("(no log: {e})"));
        let keep = text.len().saturating_sub(4000);
        let start = (keep..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_string()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One blocking PING: `Ok` on `+PONG`.
fn ping(addr: SocketAddr) -> std::io::Result<()> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(b"*1\r\n$4\r\nPING\r\n")?;
    let mut reply = [0u8; 64];
    let mut len = 0;
    while !reply[..len].ends_with(b"\r\n") && len < reply.len() {
        let n = stream.read(&mut reply[len..])?;
        if n == 0 {
            break;
        }
        len += n;
    }
    if &reply[..len] == b"+PONG\r\n" {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "PING answered {:?}",
            String::from_utf8_lossy(&reply[..len])
        )))
    }
}

/// The layout `frame-bench store` uses for Redis.
const LAYOUT: Layout = Layout::OneThread;

/// Runs one (redis, frame) measurement against a fresh redis-server.
pub(crate) fn run_redis(case: &Case) -> Result<Measured, StoreBenchError> {
    run_with(case, LAYOUT)
}

/// What the consumer's writer sends.
#[derive(Debug, Clone, Copy)]
enum Request {
    /// The producer's SET of this frame was acknowledged.
    Get(u64),
    /// The consumer checked this frame.
    Del(u64),
}

/// Runs `case` with the clients placed as `layout` says.
pub(crate) fn run_with(case: &Case, layout: Layout) -> Result<Measured, StoreBenchError> {
    run_sides(case, Arc::clone(&case.template), layout)
}

/// Runs `case`; the consumer checks against `expect` (the case's template, except in tests).
fn run_sides(
    case: &Case,
    expect: Arc<FrameTemplate>,
    layout: Layout,
) -> Result<Measured, StoreBenchError> {
    let server = RedisServer::start()?;
    let addr = server.addr();
    let flow = Flow::new(case.plan, case.in_flight, Some(server.pid()));
    let (requests, requests_rx) = mpsc::unbounded_channel();
    let producer = {
        let (flow, template, requests) = (
            Arc::clone(&flow),
            Arc::clone(&case.template),
            requests.clone(),
        );
        async move { guarded(&flow, producer(addr, template, Arc::clone(&flow), requests)).await }
    };
    let consumer = {
        let (flow, template) = (Arc::clone(&flow), expect);
        async move {
            guarded(
                &flow,
                consumer(addr, template, Arc::clone(&flow), requests_rx, requests),
            )
            .await
        }
    };
    let ((), receipts) = run_clients(&flow, layout, producer, consumer)?;
    let measured = Measured::from(&receipts)?;
    drop(server);
    Ok(measured)
}

async fn connect(addr: SocketAddr) -> Result<(OwnedReadHalf, OwnedWriteHalf), StoreBenchError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(StoreBenchError::io("connecting to redis-server"))?;
    stream
        .set_nodelay(true)
        .map_err(StoreBenchError::io("set_nodelay"))?;
    Ok(stream.into_split())
}

fn stalled<T>(what: &'static str) -> impl FnOnce(T) -> StoreBenchError {
    move |_| StoreBenchError::Stalled(what)
}

/// The producer: SETs on one connection, acknowledgements read on its other half.
async fn producer(
    addr: SocketAddr,
    template: Arc<FrameTemplate>,
    flow: Arc<Flow>,
    requests: mpsc::UnboundedSender<Request>,
) -> Result<(), StoreBenchError> {
    let (read, write) = connect(addr).await?;
    tokio::try_join!(
        produce(RespWriter::new(write), &template, &flow),
        acknowledgements(RespReader::new(read), &flow, requests),
    )?;
    Ok(())
}

async fn produce(
    mut writer: RespWriter<OwnedWriteHalf>,
    template: &FrameTemplate,
    flow: &Flow,
) -> Result<(), StoreBenchError> {
    let mut message = template.copy();
    let mut seq = 0u64;
    loop {
        let last = flow.admit(seq).await?;
        let bytes = Word::words_to_bytes_mut(&mut message);
        template.stamp(bytes, seq)?;
        flow.started(seq);
        tokio::time::timeout(STALL, writer.set(key(seq).as_bytes(), bytes))
            .await
            .map_err(stalled("redis-server to take a SET"))?
            .map_err(StoreBenchError::resp("SET"))?;
        seq += 1;
        if last {
            return Ok(());
        }
        // As a producer waiting for its next frame: let the other tasks run.
        tokio::task::yield_now().await;
    }
}

async fn acknowledgements(
    mut reader: RespReader<OwnedReadHalf>,
    flow: &Flow,
    requests: mpsc::UnboundedSender<Request>,
) -> Result<(), StoreBenchError> {
    let mut seq = 0u64;
    while seq < flow.total() {
        let reply = tokio::time::timeout(STALL, reader.reply(&mut []))
            .await
            .map_err(stalled("a SET acknowledgement"))?
            .map_err(StoreBenchError::resp("SET reply"))?;
        reply
            .expect_simple("OK")
            .map_err(StoreBenchError::resp("SET reply"))?;
        requests
            .send(Request::Get(seq))
            .map_err(|_| StoreBenchError::Aborted)?;
        seq += 1;
    }
    Ok(())
}

/// The consumer: GETs and DELs on one connection, replies read and frames checked on its
/// other half.
async fn consumer(
    addr: SocketAddr,
    template: Arc<FrameTemplate>,
    flow: Arc<Flow>,
    requests: mpsc::UnboundedReceiver<Request>,
    deletes: mpsc::UnboundedSender<Request>,
) -> Result<Receipts, StoreBenchError> {
    let (read, write) = connect(addr).await?;
    let ((), receipts) = tokio::try_join!(
        send_requests(RespWriter::new(write), requests, &flow),
        replies(RespReader::new(read), &template, &flow, deletes),
    )?;
    Ok(receipts)
}

async fn send_requests(
    mut writer: RespWriter<OwnedWriteHalf>,
    mut requests: mpsc::UnboundedReceiver<Request>,
    flow: &Flow,
) -> Result<(), StoreBenchError> {
    let mut deleted = 0u64;
    while deleted < flow.total() {
        let Some(first) = requests.recv().await else {
            return Err(StoreBenchError::Aborted);
        };
        // Everything pending goes out in one write.
        let mut next = Some(first);
        while let Some(request) = next {
            match request {
                Request::Get(seq) => writer.queue(&[b"GET", key(seq).as_bytes()]),
                Request::Del(seq) => {
                    writer.queue(&[b"DEL", key(seq).as_bytes()]);
                    deleted = seq + 1;
                }
            }
            next = requests.try_recv().ok();
        }
        tokio::time::timeout(STALL, writer.flush())
            .await
            .map_err(stalled("redis-server to take a GET"))?
            .map_err(StoreBenchError::resp("GET/DEL"))?;
    }
    Ok(())
}

async fn replies(
    mut reader: RespReader<OwnedReadHalf>,
    template: &FrameTemplate,
    flow: &Arc<Flow>,
    deletes: mpsc::UnboundedSender<Request>,
) -> Result<Receipts, StoreBenchError> {
    // 8-byte aligned, so the frame is read where it lands; one word more than the frame, so a
    // longer value reaches the check (and fails it) rather than the reader's size limit.
    let mut landing = Word::allocate_zeroed_vec(template.wire_len() / 8 + 1);
    let landing = Word::words_to_bytes_mut(&mut landing);
    let mut receipts = Receipts::new(flow);
    let mut deleted = 0u64;
    while deleted < flow.total() {
        let reply = tokio::time::timeout(STALL, reader.reply(landing))
            .await
            .map_err(stalled("a GET or DEL reply"))?
            .map_err(StoreBenchError::resp("GET/DEL reply"))?;
        match reply {
            Reply::Bulk(len) => {
                let seq = receipts.next();
                template
                    .check(&landing[..len], seq, flow.full_check(seq))
                    .map_err(|what| StoreBenchError::mismatch(seq, what))?;
                receipts
                    .checked(seq)
                    .map_err(|what| StoreBenchError::mismatch(seq, what))?;
                flow.release();
                deletes
                    .send(Request::Del(seq))
                    .map_err(|_| StoreBenchError::Aborted)?;
            }
            Reply::Integer(1) => deleted += 1,
            Reply::Nil => {
                return Err(StoreBenchError::mismatch(
                    receipts.next(),
                    "GET found no value".to_string(),
                ))
            }
            other => {
                return Err(StoreBenchError::resp("GET/DEL reply")(
                    RespError::Unexpected {
                        expected: "a bulk reply to GET or :1 to DEL",
                        got: other.describe(),
                    },
                ))
            }
        }
    }
    Ok(receipts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roundtrip::FrameSize;
    use crate::store::flow::Plan;

    /// A server, or `None` (with a note) when redis-server is not installed.
    fn server() -> Option<RedisServer> {
        match RedisServer::start() {
            Ok(server) => Some(server),
            Err(StoreBenchError::RedisMissing) => {
                eprintln!("note: redis-server is not installed (ci/deps installs it); skipped");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_framed_1080p_frame_round_trips_through_redis() {
        let Some(server) = server() else { return };
        let template = FrameTemplate::build(FrameSize::P1080).unwrap();
        block_on(async {
            let (read, write) = connect(server.addr()).await.unwrap();
            let (mut reader, mut writer) = (RespReader::new(read), RespWriter::new(write));
            let mut message = template.copy();
            let bytes = Word::words_to_bytes_mut(&mut message);
            template.stamp(bytes, 1234).unwrap();
            // Pipelined: SET, GET, DEL, GET before reading any reply.
            writer.set(key(1234).as_bytes(), bytes).await.unwrap();
            writer.queue(&[b"GET", key(1234).as_bytes()]);
            writer.queue(&[b"DEL", key(1234).as_bytes()]);
            writer.queue(&[b"GET", key(1234).as_bytes()]);
            writer.flush().await.unwrap();

            let mut landing = Word::allocate_zeroed_vec(template.wire_len() / 8);
            let landing = Word::words_to_bytes_mut(&mut landing);
            reader
                .reply(landing)
                .await
                .unwrap()
                .expect_simple("OK")
                .unwrap();
            assert_eq!(
                reader.reply(landing).await.unwrap(),
                Reply::Bulk(template.wire_len())
            );
            template.check(landing, 1234, true).unwrap();
            assert!(template.check(landing, 1235, false).is_err());
            assert_eq!(reader.reply(landing).await.unwrap(), Reply::Integer(1));
            assert_eq!(reader.reply(landing).await.unwrap(), Reply::Nil);

            // A server error is typed; a reply larger than the buffer too.
            writer.queue(&[b"NOSUCHCOMMAND"]);
            writer.set(b"big", bytes).await.unwrap();
            writer.queue(&[b"GET", b"big"]);
            writer.flush().await.unwrap();
            assert!(matches!(
                reader.reply(landing).await,
                Err(RespError::Server(e)) if e.contains("unknown command")
            ));
            reader
                .reply(landing)
                .await
                .unwrap()
                .expect_simple("OK")
                .unwrap();
            let mut small = [0u8; 100];
            assert!(matches!(
                reader.reply(&mut small).await,
                Err(RespError::TooLarge { capacity: 100, .. })
            ));
        });
        let pid = server.pid();
        let dir = server.dir.clone();
        assert!(crate::store::flow::server_cpu_time(pid).is_some());
        drop(server);
        assert!(!dir.exists(), "the server's directory is removed");
    }

    /// Whether redis-server is installed; a note when it is not (the test is skipped).
    fn redis_installed() -> bool {
        let found = find_redis().is_ok();
        if !found {
            eprintln!("note: redis-server is not installed (ci/deps installs it); skipped");
        }
        found
    }

    /// A 720p case of `template` with 2 frames in flight: `warmup` frames, then exactly
    /// `frames` measured ones.
    fn case_720p(template: &Arc<FrameTemplate>, warmup: u64, frames: u64, check_all: bool) -> Case {
        Case {
            size: FrameSize::P720,
            template: Arc::clone(template),
            plan: Plan {
                warmup,
                min_frames: frames,
                min_time: Duration::ZERO,
                max_frames: frames,
                check_all,
            },
            in_flight: 2,
        }
    }

    #[test]
    fn redis_streams_checked_frames_in_both_layouts() {
        if !redis_installed() {
            return;
        }
        let template = Arc::new(FrameTemplate::build(FrameSize::P720).unwrap());
        for layout in [Layout::OneThread, Layout::TwoThreads] {
            let case = case_720p(&template, 3, 6, true);
            let measured = run_with(&case, layout).unwrap_or_else(|e| panic!("{layout:?}: {e}"));
            let timed = measured.timed;
            assert_eq!((timed.frames, timed.warmup), (6, 3), "{layout:?}");
            assert!(timed.latency.median_ns > 0.0);
            assert!(timed.server_cpu.is_some());
        }
    }

    /// The consumer expects another frame than the producer stores: the run fails with the
    /// first frame, on either layout, and both sides stop.
    #[test]
    fn a_wrong_frame_fails_the_run() {
        if !redis_installed() {
            return;
        }
        let sent = Arc::new(FrameTemplate::build(FrameSize::P720).unwrap());
        let expected = Arc::new(FrameTemplate::build(FrameSize::P1080).unwrap());
        for layout in [Layout::OneThread, Layout::TwoThreads] {
            let case = case_720p(&sent, 2, 4, false);
            let err = run_sides(&case, Arc::clone(&expected), layout).unwrap_err();
            assert!(
                matches!(err, StoreBenchError::Mismatch { seq: 0, .. }),
                "{layout:?}: {err}"
            );
        }
    }
}
