//! The staging store's systems: `control`, `store-shm`, `store-tcp`.
//!
//! The store runs as a process of its own (this binary re-executed as the hidden
//! `frame-bench store-server`, on a current-thread runtime: one core), so its CPU time is
//! measured apart, as Redis's is. The producer and the consumer are clients in this process:
//!
//! ```text
//!  store-shm  producer: create(stream, len, dirtyOk) ─▶ grant in the shared region. When the
//!                       grant still holds one of this stream's frames (the store names it:
//!                       "buffer age"), only the stamp changes and only the stamp is written,
//!                       as Redis's producer restamps its one buffer; otherwise the framed
//!                       message is copied in whole. Stamp i, seal
//!             consumer: delivery (offset, len) ─▶ read_frame + check in place (no copy) ─▶ release
//!  store-shm-rewrite    the same, but the producer copies every byte of every frame into its
//!                       grant (as a decoder writing each frame's pixels would)
//!  store-tcp  producer: create ─▶ PUT header + bytes on the data connection (the store reads
//!                       them straight into the grant) ─▶ seal
//!             consumer: DELIVER header + bytes on the data connection into aligned memory ─▶
//!                       check ─▶ release
//!  control    tiny framed messages: create, seal, get, release = 4 operations, from many
//!             tasks at once over one shm connection
//! ```
//!
//! The consumer subscribes as a durable consumer with a window of `in_flight` frames, so the
//! store holds each frame until the consumer has checked and released it.

use super::flow::{guarded, run_sides, Flow, Layout, Measured, Receipts, STALL};
use super::frames::FrameTemplate;
use super::{Case, StoreBenchError};
use capnp::Word;
use staging_store::client::{Client, ClientError, FrameRef};
use staging_store::proto::{Cursor, FullPolicy, StreamConfig};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Flags of the hidden `frame-bench store-server`.
#[derive(Debug, clap::Args)]
pub(crate) struct ServerArgs {
    /// Unix socket to listen on.
    #[arg(long)]
    unix: std::path::PathBuf,
    /// Region size in bytes.
    #[arg(long)]
    region_bytes: u64,
    /// Block size in bytes.
    #[arg(long, default_value_t = 64 << 10)]
    block_bytes: u64,
}

/// Runs a store until stdin closes (the benchmark that started it ends or dies).
pub(crate) fn serve(args: &ServerArgs) -> Result<(), StoreBenchError> {
    let region = capnp_rdma::Region::create(
        &capnp_rdma::RegionOptions::memfd(args.region_bytes).block_size(args.block_bytes),
    )?;
    let store = staging_store::store::Store::new(region, Default::default(), None);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StoreBenchError::io("tokio runtime"))?;
    let local = tokio::task::LocalSet::new();
    // Ends when the parent closes our stdin (or dies).
    let (eof_tx, eof_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        let _ = eof_tx.send(());
    });
    let listen = staging_store::server::Listen {
        unix: Some(args.unix.clone()),
        tcp: Some("127.0.0.1:0".parse().expect("a socket address")),
        data: None,
        metrics: None,
        verbs: None,
    };
    local
        .block_on(&runtime, async move {
            staging_store::server::serve(
                store,
                listen,
                |bound| {
                    println!(
                        "ready {} {}",
                        bound
                            .unix
                            .as_ref()
                            .map_or(String::new(), |p| p.display().to_string()),
                        bound.tcp.map_or(String::new(), |a| a.to_string())
                    );
                },
                async {
                    let _ = eof_rx.await;
                },
            )
            .await
        })
        .map(drop)
        .map_err(|e| StoreBenchError::io("store server")(std::io::Error::other(e.to_string())))
}

/// A store server process, stopped when dropped.
struct StoreProcess {
    child: Child,
    unix: String,
    tcp: String,
    dir: std::path::PathBuf,
}

impl StoreProcess {
    fn start(region_bytes: u64, block_bytes: u64) -> Result<Self, StoreBenchError> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("frame-bench-store-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(StoreBenchError::io("store temp dir"))?;
        let exe = std::env::current_exe().map_err(StoreBenchError::io("current_exe"))?;
        let mut child = Command::new(exe)
            .args(["store-server", "--unix"])
            .arg(dir.join("store.sock"))
            .args(["--region-bytes", &region_bytes.to_string()])
            .args(["--block-bytes", &block_bytes.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(StoreBenchError::io("starting the store server"))?;
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(StoreBenchError::io("waiting for the store server"))?;
        let mut words = line.split_whitespace();
        let (Some("ready"), Some(unix), Some(tcp)) = (words.next(), words.next(), words.next())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(StoreBenchError::Setup("the store server did not start"));
        };
        Ok(Self {
            unix: format!("unix:{unix}"),
            tcp: format!("tcp:{tcp}"),
            child,
            dir,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for StoreProcess {
    fn drop(&mut self) {
        // Closing stdin stops it gracefully; kill it if it does not stop.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn client_err(what: &'static str) -> impl FnOnce(ClientError) -> StoreBenchError {
    move |e| StoreBenchError::io(what)(std::io::Error::other(e.to_string()))
}

fn region_for(case: &Case) -> u64 {
    // Every frame in flight, twice over, plus room for the scrubber to lag behind.
    let frame = case.template.wire_len() as u64;
    (frame * (case.in_flight as u64 * 2 + 8)).max(64 << 20)
}

fn runtime() -> Result<tokio::runtime::Runtime, StoreBenchError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StoreBenchError::io("tokio runtime"))
}

/// How the producer gets each frame into the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Producer {
    /// shm, writing only what differs from the frame its grant still holds (if any).
    ShmRepaint,
    /// shm, writing every byte.
    ShmRewrite,
    /// tcp: PUT on the data connection.
    Tcp,
}

/// `store-shm`: producer → staging store → consumer, frames handed over in shared memory.
/// Target: >= 20x Redis frames/s at 1080p.
pub(crate) fn run_store_shm(case: &Case) -> Result<Measured, StoreBenchError> {
    run_store(case, Producer::ShmRepaint)
}

/// `store-shm-rewrite`: `store-shm` with every byte of every frame written by the producer.
pub(crate) fn run_store_shm_rewrite(case: &Case) -> Result<Measured, StoreBenchError> {
    run_store(case, Producer::ShmRewrite)
}

/// `store-tcp`: producer → staging store → consumer, frames over loopback TCP.
/// Target: >= 1.5x Redis frames/s at 1080p.
pub(crate) fn run_store_tcp(case: &Case) -> Result<Measured, StoreBenchError> {
    run_store(case, Producer::Tcp)
}

fn run_store(case: &Case, how: Producer) -> Result<Measured, StoreBenchError> {
    run_store_with(case, how, LAYOUT)
}

/// The client layout of `store-shm` and `store-tcp`: one thread, as Redis's clients. Two
/// threads measured on the 2-core machine kind (1080p, 3 runs each, same runs' Redis as
/// the yardstick): store-shm 27-31x Redis on either layout, store-tcp 0.96-1.20x on two
/// threads against 1.17-1.24x on one: the clients then compete with the server for the
/// second core.
const LAYOUT: Layout = Layout::OneThread;

fn run_store_with(case: &Case, how: Producer, layout: Layout) -> Result<Measured, StoreBenchError> {
    let server = StoreProcess::start(region_for(case), 64 << 10)?;
    let addr = if how == Producer::Tcp {
        server.tcp.clone()
    } else {
        server.unix.clone()
    };
    let flow = Flow::new(case.plan, case.in_flight, Some(server.pid()));
    let in_flight = case.in_flight as u32;
    let config = StreamConfig {
        max_frames: in_flight + 1,
        on_full: FullPolicy::Block,
        block_timeout_ms: STALL.as_millis() as u32,
        ..StreamConfig::default()
    };
    // Each side connects on its own runtime; whichever comes first creates the stream.
    let connect = |name: &'static str| {
        let addr = addr.clone();
        async move {
            let client = Client::connect(&addr, name)
                .await
                .map_err(client_err("connecting"))?;
            client
                .create_stream("bench", config, true)
                .await
                .map_err(client_err("creating the stream"))?;
            Ok::<_, StoreBenchError>(client)
        }
    };
    // The first frame waits for the subscription (a frame no consumer holds is not kept).
    let (subscribed, ready) = tokio::sync::oneshot::channel::<()>();
    let producer = {
        let (flow, template, connect) = (&flow, &case.template, connect("frame-bench producer"));
        guarded(flow, async move {
            let client = connect.await?;
            ready.await.map_err(|_| StoreBenchError::Aborted)?;
            produce(&client, template, flow, how).await
        })
    };
    let consumer = {
        let (flow, template, connect) = (&flow, &case.template, connect("frame-bench consumer"));
        guarded(flow, async move {
            let client = connect.await?;
            let subscription = client
                .subscribe("bench", "checker", Cursor::Oldest, in_flight)
                .await
                .map_err(client_err("subscribing"))?;
            let _ = subscribed.send(());
            consume(subscription, template, flow).await
        })
    };
    let (whole, receipts) = run_sides(&flow, layout, producer, consumer)?;
    let mut measured = Measured::from(&receipts)?;
    measured.whole_writes = Some(whole);
    drop(server);
    Ok(measured)
}

/// Stores every frame; returns how many measured frames the producer wrote whole (shm: the
/// others were repainted, only their stamp written; tcp: every frame is sent whole).
async fn produce(
    client: &Client,
    template: &FrameTemplate,
    flow: &Flow,
    how: Producer,
) -> Result<u64, StoreBenchError> {
    match how {
        Producer::Tcp => produce_tcp(client, template, flow).await,
        Producer::ShmRepaint => produce_shm(client, template, flow, false).await,
        Producer::ShmRewrite => produce_shm(client, template, flow, true).await,
    }
}

/// A `dirtyOk` grant of `len` bytes for the next frame of the bench stream.
async fn create_dirty(
    client: &Client,
    len: usize,
) -> Result<staging_store::proto::Grant, StoreBenchError> {
    tokio::time::timeout(STALL, client.create_with("bench", len as u64, true))
        .await
        .map_err(|_| StoreBenchError::Stalled("the store to grant"))?
        .map_err(client_err("create"))
}

fn check_sealed(sealed: Result<u64, ClientError>, seq: u64) -> Result<(), StoreBenchError> {
    let sealed = sealed.map_err(client_err("seal"))?;
    if sealed != seq {
        return Err(StoreBenchError::mismatch(
            seq,
            format!("the store sealed it as frame {sealed}"),
        ));
    }
    Ok(())
}

/// tcp: each frame is the one message, stamped in place per frame as Redis's producer does,
/// sent into a grant on the data connection (`create`, PUT, `seal`). The producer does not
/// wait for a seal's answer (it comes once the store has read every byte) before it asks
/// for the next grant and sends the next frame: seals are answered in the background, and
/// the credit keeps at most `in_flight` frames unchecked.
async fn produce_tcp(
    client: &Client,
    template: &FrameTemplate,
    flow: &Flow,
) -> Result<u64, StoreBenchError> {
    let len = template.wire_len();
    let mut message = template.copy();
    let mut seals = std::collections::VecDeque::new();
    let mut seq = 0u64;
    loop {
        let last = flow.admit(seq).await?;
        flow.started(seq);
        // Every byte is sent: the grant need not be zeroed.
        let grant = create_dirty(client, len).await?;
        let bytes = Word::words_to_bytes_mut(&mut message);
        template.stamp(bytes, seq)?;
        client
            .write_grant(&grant, 0, &bytes[..len])
            .await
            .map_err(client_err("PUT"))?;
        let c = client.clone();
        seals.push_back((
            seq,
            tokio::spawn(async move {
                tokio::time::timeout(STALL, c.seal(&grant, grant.offset, len as u64, None)).await
            }),
        ));
        // Answers that are in: checked in order.
        while let Some((_, seal)) = seals.front() {
            if !(last || seal.is_finished()) {
                break;
            }
            let (sealed_seq, seal) = seals.pop_front().expect("front");
            let sealed = seal
                .await
                .map_err(|e| StoreBenchError::Thread(e.to_string()))?
                .map_err(|_| StoreBenchError::Stalled("the store to seal"))?;
            check_sealed(sealed, sealed_seq)?;
        }
        if last {
            return Ok((seq + 1).saturating_sub(flow.plan().warmup));
        }
        seq += 1;
    }
}

/// shm: frames written in their grants. The seal of frame i and the create of frame i + 1 go
/// out together (one write, one wake-up of the store): the producer never waits for a seal's
/// answer before it asks for the next grant.
async fn produce_shm(
    client: &Client,
    template: &FrameTemplate,
    flow: &Flow,
    rewrite: bool,
) -> Result<u64, StoreBenchError> {
    let len = template.wire_len();
    let create = |seq: u64| async move {
        let last = flow.admit(seq).await?;
        flow.started(seq);
        // Either every byte is written or only the stamp changes: the grant need not be
        // zeroed, and a grant of freed blocks says which frame they still hold.
        let grant = create_dirty(client, len).await?;
        Ok::<_, StoreBenchError>((grant, last))
    };
    let (mut grant, mut last) = create(0).await?;
    let mut whole = 0;
    let mut seq = 0u64;
    loop {
        // SAFETY: the only slice of this fresh grant, dropped before the seal.
        let bytes = unsafe { client.grant_bytes(&grant) }.map_err(client_err("grant"))?;
        // Every frame of this stream is the template stamped with its seq (this producer is
        // its only writer): one held at the grant's start differs only in the stamp.
        let holds_a_frame = grant
            .previous
            .is_some_and(|p| p.offset == grant.offset && p.len == len as u64);
        if rewrite || !holds_a_frame {
            bytes[..len].copy_from_slice(template.bytes());
            whole += u64::from(seq >= flow.plan().warmup);
        }
        template.stamp(&mut bytes[..len], seq)?;
        let seal = async {
            let sealed =
                tokio::time::timeout(STALL, client.seal(&grant, grant.offset, len as u64, None))
                    .await
                    .map_err(|_| StoreBenchError::Stalled("the store to seal"))?;
            check_sealed(sealed, seq)
        };
        if last {
            seal.await?;
            return Ok(whole);
        }
        let ((), next) = tokio::try_join!(seal, create(seq + 1))?;
        (grant, last) = next;
        seq += 1;
    }
}

async fn consume(
    mut subscription: staging_store::client::Subscription,
    template: &FrameTemplate,
    flow: &Arc<Flow>,
) -> Result<Receipts, StoreBenchError> {
    let mut receipts = Receipts::new(flow);
    while !receipts.finished() {
        let frame: FrameRef = tokio::time::timeout(STALL, subscription.next())
            .await
            .map_err(|_| StoreBenchError::Stalled("a delivery"))?
            .map_err(client_err("delivery"))?;
        let seq = receipts.next();
        if frame.seq() != seq {
            return Err(StoreBenchError::mismatch(
                seq,
                format!("frame {} delivered", frame.seq()),
            ));
        }
        template
            .check(frame.bytes(), seq, flow.full_check(seq))
            .map_err(|what| StoreBenchError::mismatch(seq, what))?;
        receipts
            .checked(seq)
            .map_err(|what| StoreBenchError::mismatch(seq, what))?;
        // Dropping the reference releases it (without waiting for the answer).
        drop(frame);
        flow.release();
    }
    Ok(receipts)
}

/// Tiny framed message for `control`.
fn tiny_message() -> Vec<u8> {
    let mut message = capnp::message::Builder::new_default();
    let mut root: capnp_rdma::frame_capnp::frame::Builder<'_> = message.init_root();
    root.set_sequence(1);
    capnp::serialize::write_message_to_words(&message)
}

/// `control`: the store's control path alone (operations that move no pixels), run once per
/// `frame-bench store` run. `Measured::frames` counts operations; the report prints ops/s.
pub(crate) fn run_control(case: &Case) -> Result<Measured, StoreBenchError> {
    const TASKS: usize = 64;
    const RETAIN: u32 = 4096;
    let server = StoreProcess::start(512 << 20, 4 << 10)?;
    let quick = case.plan.check_all;
    let per_task: u64 = if quick { 50 } else { 2500 };
    let pid = server.pid();
    let addr = server.unix.clone();
    let tiny = tiny_message();
    let (ops, elapsed, cpu, server_cpu, samples) = runtime()?.block_on(async {
        let client = Client::connect(&addr, "frame-bench control")
            .await
            .map_err(client_err("connecting"))?;
        client
            .create_stream(
                "control",
                StreamConfig {
                    retain_frames: RETAIN,
                    max_frames: RETAIN * 2,
                    ..StreamConfig::default()
                },
                false,
            )
            .await
            .map_err(client_err("creating the stream"))?;
        let cycle = |client: Client, tiny: Vec<u8>| async move {
            let grant = client.create("control", tiny.len() as u64).await?;
            // SAFETY: the only slice of this fresh grant, dropped before the seal.
            unsafe { client.grant_bytes(&grant) }?[..tiny.len()].copy_from_slice(&tiny);
            let seq = client
                .seal(&grant, grant.offset, tiny.len() as u64, None)
                .await?;
            let frame = client.get("control", Some(seq)).await?;
            frame.release().await?;
            Ok::<(), ClientError>(())
        };
        // Warm up.
        for _ in 0..200 {
            cycle(client.clone(), tiny.clone())
                .await
                .map_err(client_err("warm-up"))?;
        }
        let cpu0 = capnp_rdma_benches::process_cpu_time();
        let server0 = super::flow::server_cpu_time(pid);
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..TASKS {
            let (client, tiny) = (client.clone(), tiny.clone());
            set.spawn(async move {
                let mut samples = Vec::with_capacity(per_task as usize);
                for _ in 0..per_task {
                    let t = Instant::now();
                    cycle(client.clone(), tiny.clone()).await?;
                    samples.push(t.elapsed().as_nanos() as u64);
                }
                Ok::<Vec<u64>, ClientError>(samples)
            });
        }
        let mut samples = Vec::new();
        while let Some(done) = set.join_next().await {
            samples.extend(
                done.map_err(|e| StoreBenchError::Thread(e.to_string()))?
                    .map_err(client_err("control cycle"))?,
            );
        }
        let elapsed = start.elapsed();
        let cpu = capnp_rdma_benches::process_cpu_time().saturating_sub(cpu0);
        let server_cpu = match (server0, super::flow::server_cpu_time(pid)) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        Ok::<_, StoreBenchError>((
            TASKS as u64 * per_task * 4,
            elapsed,
            cpu,
            server_cpu,
            samples,
        ))
    })?;
    drop(server);
    Ok(Measured::control(ops, elapsed, cpu, server_cpu, &samples))
}
