//! `staging-store`: the server and the commands an operator of it needs.
//!
//! ```text
//! staging-store serve [--config FILE] [--unix PATH] [--tcp ADDR] [--data ADDR] [--metrics ADDR]
//!                     [--verbs ADDR]
//!                     [--region-size SIZE] [--block-size SIZE] [--persist DIR] [--sync POLICY]
//!                     [--verify-checksums] [--huge-pages POLICY] [--mlock] [--stream SPEC]...
//! staging-store stat | streams [--json]
//! staging-store create-stream NAME [--max-frames N] [--max-bytes SIZE] [--retain N]
//!                     [--on-full block|reject|drop-oldest] [--block-timeout-ms MS] [--checksums]
//! staging-store delete-stream NAME
//! staging-store put STREAM FILE          (a framed Cap'n Proto message; - for stdin)
//! staging-store get STREAM [--seq N] [--out FILE]   (stdout by default)
//! staging-store drain STREAM [--consumer NAME] [--from oldest|latest|resume|SEQ] [--count N]
//!                     [--out-dir DIR] [--idle-ms MS]
//! ```
//! Every client command takes `--store ADDR` (or `STAGING_STORE_ADDR`).

use clap::{Args, Parser, Subcommand, ValueEnum};
use staging_store::client::{Client, ClientError};
use staging_store::journal::{Journal, SyncPolicy};
use staging_store::proto::{Cursor, FullPolicy, StreamConfig};
use staging_store::server::{self, Listen};
use staging_store::store::{Store, StoreOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// A staging store: owns a shared memory region and refcounts video frames between pipeline
/// operators. Producers write frames straight into blocks the store grants them; consumers
/// read them in place (same host, over shm) or receive them on a data connection (tcp).
#[derive(Debug, Parser)]
#[command(name = "staging-store", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the store until SIGTERM or SIGINT.
    Serve(ServeArgs),
    /// Store-wide counters.
    Stat(StatArgs),
    /// Every stream with its consumers.
    Streams(StatArgs),
    /// Create a stream.
    CreateStream(CreateStreamArgs),
    /// Delete a stream and its frames (frames clients hold stay valid until released).
    DeleteStream {
        #[command(flatten)]
        store: StoreAddr,
        /// Stream name.
        name: String,
    },
    /// Write a file holding one framed Cap'n Proto message as a stream's next frame.
    Put {
        #[command(flatten)]
        store: StoreAddr,
        /// Stream name.
        stream: String,
        /// The file (- for standard input).
        file: PathBuf,
    },
    /// Dump one frame as standard Cap'n Proto framing (any capnp reader can read it).
    Get {
        #[command(flatten)]
        store: StoreAddr,
        /// Stream name.
        stream: String,
        /// Frame sequence number (default: the newest).
        #[arg(long)]
        seq: Option<u64>,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Consume a stream's frames (releasing each), printing one line per frame.
    Drain(DrainArgs),
}

#[derive(Debug, Args)]
struct StoreAddr {
    /// The store: `unix:PATH` or a path (same host, shm), `tcp:HOST:PORT` or `HOST:PORT`.
    #[arg(
        long,
        env = "STAGING_STORE_ADDR",
        default_value = "unix:/tmp/staging-store.sock"
    )]
    store: String,
}

#[derive(Debug, Args)]
struct StatArgs {
    #[command(flatten)]
    store: StoreAddr,
    /// JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct StreamFlags {
    /// Most frames some consumer has not released (and grants being written); 0: 64.
    #[arg(long, default_value_t = 0)]
    max_frames: u32,
    /// Most bytes of such frames (e.g. 512MiB); 0: only the region bounds it.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    max_bytes: u64,
    /// Frames every consumer has released that stay readable for replay and `get`.
    #[arg(long, default_value_t = 8)]
    retain: u32,
    /// What a create on a full stream does.
    #[arg(long, value_enum, default_value_t = OnFull::Block)]
    on_full: OnFull,
    /// How long a blocked create waits; 0: 1000.
    #[arg(long, default_value_t = 0)]
    block_timeout_ms: u32,
    /// Every seal must carry a CRC-32C.
    #[arg(long)]
    checksums: bool,
    /// Largest frame (e.g. 16MiB); 0: only the region bounds it.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    max_frame_bytes: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
enum OnFull {
    /// Wait up to the block timeout for consumers.
    Block,
    /// Fail at once with streamFull.
    Reject,
    /// Drop the oldest frames (consumers skip them).
    DropOldest,
}

impl From<OnFull> for FullPolicy {
    fn from(p: OnFull) -> Self {
        match p {
            OnFull::Block => FullPolicy::Block,
            OnFull::Reject => FullPolicy::Reject,
            OnFull::DropOldest => FullPolicy::DropOldest,
        }
    }
}

impl StreamFlags {
    fn config(&self) -> StreamConfig {
        StreamConfig {
            max_frames: self.max_frames,
            max_bytes: self.max_bytes,
            retain_frames: self.retain,
            on_full: self.on_full.into(),
            block_timeout_ms: self.block_timeout_ms,
            checksums: self.checksums,
            max_frame_bytes: self.max_frame_bytes,
        }
    }
}

#[derive(Debug, Args)]
struct CreateStreamArgs {
    #[command(flatten)]
    store: StoreAddr,
    /// Stream name (1-255 bytes of A-Z a-z 0-9 . _ - / :).
    name: String,
    #[command(flatten)]
    flags: StreamFlags,
    /// Succeed if the stream exists.
    #[arg(long)]
    exist_ok: bool,
}

#[derive(Debug, Args)]
struct DrainArgs {
    #[command(flatten)]
    store: StoreAddr,
    /// Stream name.
    stream: String,
    /// Durable consumer name (its cursor survives); empty: anonymous.
    #[arg(long, default_value = "")]
    consumer: String,
    /// Where to start: oldest, latest, resume, or a sequence number.
    #[arg(long, default_value = "resume", value_parser = parse_cursor)]
    from: Cursor,
    /// Stop after this many frames.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long without a frame.
    #[arg(long, default_value_t = 1000)]
    idle_ms: u64,
    /// Save each frame as DIR/STREAM-SEQ.capnp.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML file with any of these options (flags and environment variables override it).
    #[arg(long, env = "STAGING_STORE_CONFIG")]
    config: Option<PathBuf>,
    /// Unix socket for clients on this host (they use shm). The store refuses to start if
    /// another running store serves it (a stale socket is replaced).
    #[arg(long, env = "STAGING_STORE_UNIX")]
    unix: Option<PathBuf>,
    /// TCP address for remote clients' control connections (they use tcp).
    #[arg(long, env = "STAGING_STORE_TCP")]
    tcp: Option<SocketAddr>,
    /// TCP address for remote clients' data connections (default: the --tcp address, any port).
    #[arg(long, env = "STAGING_STORE_DATA")]
    data: Option<SocketAddr>,
    /// TCP address of the Prometheus endpoint (GET /metrics).
    #[arg(long, env = "STAGING_STORE_METRICS")]
    metrics: Option<SocketAddr>,
    /// TCP address of the RDMA handshake listener: remote clients with an RDMA device then
    /// write and read frames with one-sided RDMA (no store CPU per byte). Registers the region
    /// with the device CAPNP_RDMA_DEVICE names (or the first); the store does not start if
    /// there is none. Verbs clients can reach the whole region: trusted networks only.
    #[arg(long, env = "STAGING_STORE_VERBS")]
    verbs: Option<SocketAddr>,
    /// Size of the staging region (e.g. 1GiB).
    #[arg(long, env = "STAGING_STORE_REGION_SIZE", value_parser = parse_size)]
    region_size: Option<u64>,
    /// Block size: a power of two from 4KiB to 2MiB.
    #[arg(long, env = "STAGING_STORE_BLOCK_SIZE", value_parser = parse_size)]
    block_size: Option<u64>,
    /// Persistence directory: the region is a file there, and a journal lets a restarted store
    /// recover every sealed frame (seals then need checksums).
    #[arg(long, env = "STAGING_STORE_PERSIST")]
    persist: Option<PathBuf>,
    /// When the journal is synced to disk: never (survives store crashes), seal, always.
    #[arg(long, value_enum, env = "STAGING_STORE_SYNC")]
    sync: Option<Sync>,
    /// Recompute every frame's checksum at seal (costs a pass over each frame).
    #[arg(long)]
    verify_checksums: bool,
    /// Huge pages for a memory region: off, prefer, require.
    #[arg(long, value_enum)]
    huge_pages: Option<Huge>,
    /// Lock the region in memory (needs RLIMIT_MEMLOCK).
    #[arg(long)]
    mlock: bool,
    /// A stream to create at start: NAME or NAME:key=value,... with keys max-frames,
    /// max-bytes, retain, on-full, block-timeout-ms, checksums, max-frame-bytes.
    #[arg(long = "stream", value_parser = parse_stream_spec)]
    streams: Vec<(String, StreamConfig)>,
    /// Log filter (tracing env-filter syntax), e.g. info or staging_store=debug.
    #[arg(long, env = "STAGING_STORE_LOG", default_value = "info")]
    log: String,
}

#[derive(Clone, Copy, Debug, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Sync {
    Never,
    Seal,
    Always,
}

#[derive(Clone, Copy, Debug, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Huge {
    Off,
    Prefer,
    Require,
}

/// The config file: the same options as the flags.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    unix: Option<PathBuf>,
    tcp: Option<SocketAddr>,
    data: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    verbs: Option<SocketAddr>,
    region_size: Option<String>,
    block_size: Option<String>,
    persist: Option<PathBuf>,
    sync: Option<Sync>,
    verify_checksums: bool,
    huge_pages: Option<Huge>,
    mlock: bool,
    streams: Vec<FileStream>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStream {
    name: String,
    #[serde(flatten)]
    config: StreamConfig,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(digits);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 64KiB"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB, GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_cursor(s: &str) -> Result<Cursor, String> {
    match s {
        "oldest" => Ok(Cursor::Oldest),
        "latest" => Ok(Cursor::Latest),
        "resume" => Ok(Cursor::Resume),
        n => n
            .parse()
            .map(Cursor::Seq)
            .map_err(|_| format!("{s:?}: use oldest, latest, resume or a sequence number")),
    }
}

fn parse_stream_spec(s: &str) -> Result<(String, StreamConfig), String> {
    let (name, rest) = s.split_once(':').unwrap_or((s, ""));
    let mut c = StreamConfig {
        retain_frames: 8,
        ..StreamConfig::default()
    };
    for kv in rest.split(',').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, "true"));
        let num = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("{k}={v}: not a number"))
        };
        match k {
            "max-frames" => c.max_frames = num(v)?,
            "max-bytes" => c.max_bytes = parse_size(v)?,
            "retain" => c.retain_frames = num(v)?,
            "block-timeout-ms" => c.block_timeout_ms = num(v)?,
            "max-frame-bytes" => c.max_frame_bytes = parse_size(v)?,
            "checksums" => c.checksums = v == "true",
            "on-full" => {
                c.on_full = match v {
                    "block" => FullPolicy::Block,
                    "reject" => FullPolicy::Reject,
                    "drop-oldest" => FullPolicy::DropOldest,
                    _ => return Err(format!("on-full={v}: use block, reject or drop-oldest")),
                }
            }
            _ => return Err(format!("unknown stream option {k:?}")),
        }
    }
    Ok((name.to_owned(), c))
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Region(#[from] capnp_rdma::RegionError),
    #[error(transparent)]
    Journal(#[from] staging_store::journal::JournalError),
    #[error(transparent)]
    Recover(#[from] staging_store::store::RecoverError),
    #[error(transparent)]
    Serve(#[from] server::ServeError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MainError {
    let what = what.into();
    move |source| MainError::Io { what, source }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        other => client_command(other),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("staging-store: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), MainError> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))?;
            toml::from_str(&text)
                .map_err(|e| MainError::Usage(format!("{}: {e}", path.display())))?
        }
        None => FileConfig::default(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .init();
    let size_of =
        |flag: Option<u64>, file: &Option<String>, default: u64| -> Result<u64, MainError> {
            match (flag, file) {
                (Some(v), _) => Ok(v),
                (None, Some(s)) => parse_size(s).map_err(MainError::Usage),
                (None, None) => Ok(default),
            }
        };
    let region_size = size_of(args.region_size, &file.region_size, 1 << 30)?;
    let block_size = size_of(args.block_size, &file.block_size, 64 << 10)?;
    let unix = args.unix.or(file.unix);
    let tcp = args.tcp.or(file.tcp);
    let listen = Listen {
        unix: unix.clone().or_else(|| {
            tcp.is_none()
                .then(|| PathBuf::from("/tmp/staging-store.sock"))
        }),
        tcp,
        data: args.data.or(file.data),
        metrics: args.metrics.or(file.metrics),
        verbs: args.verbs.or(file.verbs),
    };
    let persist = args.persist.or(file.persist);
    let huge = match args.huge_pages.or(file.huge_pages).unwrap_or(Huge::Off) {
        Huge::Off => capnp_rdma::HugePages::Off,
        Huge::Prefer => capnp_rdma::HugePages::Prefer,
        Huge::Require => capnp_rdma::HugePages::Require,
    };
    let mlock = args.mlock || file.mlock;
    let options = StoreOptions {
        checksums_required: persist.is_some(),
        verify_checksums: args.verify_checksums || file.verify_checksums,
        data_port: 0,
        verbs_port: 0,
    };
    let mut store = match &persist {
        None => {
            let region = capnp_rdma::Region::create(
                &capnp_rdma::RegionOptions::memfd(region_size)
                    .block_size(block_size)
                    .huge_pages(huge)
                    .mlock(mlock),
            )?;
            Store::new(region, options, None)
        }
        Some(dir) => {
            let sync = match args.sync.or(file.sync).unwrap_or(Sync::Seal) {
                Sync::Never => SyncPolicy::Never,
                Sync::Seal => SyncPolicy::Seal,
                Sync::Always => SyncPolicy::Always,
            };
            let (journal, recovered) = Journal::open(dir, sync)?;
            if let Some(c) = &recovered.corrupt {
                tracing::warn!(?c, "the journal had a corrupt record; replayed up to it");
            }
            let path = dir.join("region");
            let region = if path.exists() {
                capnp_rdma::Region::open_path(
                    &path,
                    &capnp_rdma::OpenOptions {
                        mlock,
                        ..capnp_rdma::OpenOptions::default()
                    },
                )?
            } else {
                capnp_rdma::Region::create(
                    &capnp_rdma::RegionOptions::file(path, region_size)
                        .block_size(block_size)
                        .mlock(mlock),
                )?
            };
            let (store, report) = Store::recover(region, options, journal, recovered.records)?;
            tracing::info!(
                streams = report.streams,
                frames = report.frames,
                corrupt = report.corrupt,
                reclaimed = %report.reclaimed,
                "recovered from {}",
                dir.display()
            );
            store
        }
    };
    let mut streams: Vec<(String, StreamConfig)> = file
        .streams
        .into_iter()
        .map(|s| (s.name, s.config))
        .collect();
    streams.extend(args.streams);
    for (name, config) in streams {
        let mut outs = Vec::new();
        let sid = store.open_session(true);
        let now = std::time::Instant::now();
        use staging_store::proto::{Body, Request, Transport};
        store.handle(
            sid,
            Request {
                id: 0,
                body: Body::Hello {
                    version: staging_store::proto::VERSION,
                    client: "serve --stream".into(),
                    transport: Transport::Shm,
                },
            },
            now,
            std::time::SystemTime::now(),
            &mut outs,
        );
        store.handle(
            sid,
            Request {
                id: 1,
                body: Body::CreateStream {
                    name: name.clone(),
                    config,
                    exist_ok: true,
                },
            },
            now,
            std::time::SystemTime::now(),
            &mut outs,
        );
        store.disconnect(sid, now, &mut outs);
        for out in outs {
            if let staging_store::store::Out::Message(
                _,
                staging_store::proto::ServerMessage::Response(staging_store::proto::Response {
                    result: Err(e),
                    ..
                }),
            ) = out
            {
                return Err(MainError::Usage(format!("--stream {name}: {e}")));
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("starting the runtime"))?;
    let local = tokio::task::LocalSet::new();
    let stat = local.block_on(&runtime, async move {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        server::serve(
            store,
            listen,
            |bound| {
                // One line on stdout for scripts and tests to wait on.
                println!(
                    "staging-store ready unix={} tcp={} data={} metrics={} verbs={}",
                    bound
                        .unix
                        .as_ref()
                        .map_or("-".into(), |p| p.display().to_string()),
                    bound.tcp.map_or("-".into(), |a| a.to_string()),
                    bound.data.map_or("-".into(), |a| a.to_string()),
                    bound.metrics.map_or("-".into(), |a| a.to_string()),
                    bound.verbs.map_or("-".into(), |a| a.to_string()),
                );
            },
            shutdown,
        )
        .await
    })?;
    tracing::info!(?stat, "stopped");
    Ok(())
}

fn client_command(command: Command) -> Result<(), MainError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("starting the runtime"))?;
    runtime.block_on(async move {
        match command {
            Command::Serve(_) => unreachable!("handled by main"),
            Command::Stat(a) => {
                let c = Client::connect(&a.store.store, "staging-store stat").await?;
                let s = c.stat().await?;
                if a.json {
                    println!("{}", serde_json::to_string(&s).unwrap_or_default());
                } else {
                    println!("region     {} bytes, blocks of {} bytes: {} of {} in use", s.region_bytes, s.block_bytes, s.blocks_in_use, s.blocks_total);
                    println!("objects    {}  sessions {}  streams {}", s.objects, s.sessions, s.streams);
                    println!("creates    {}  seals {}  gets {}  deliveries {}  releases {}", s.creates, s.seals, s.gets, s.deliveries, s.releases);
                    println!("reclaimed  {} references, {} aborted writes, {} errors", s.reclaimed_references, s.aborted_writes, s.errors);
                    println!("recovered  {} frames, {} corrupt", s.recovered_frames, s.corrupt_frames);
                }
            }
            Command::Streams(a) => {
                let c = Client::connect(&a.store.store, "staging-store streams").await?;
                let list = c.streams().await?;
                if a.json {
                    println!("{}", serde_json::to_string(&list).unwrap_or_default());
                } else {
                    for s in list {
                        println!(
                            "{}  frames {}..{} ({} retained, {} bytes, {} unconsumed, {} writing)  sealed {} dropped {} waits {} refusals {}",
                            s.name, s.first_seq, s.next_seq, s.frames, s.bytes, s.unconsumed_frames, s.writing,
                            s.sealed_total, s.dropped_total, s.blocked_creates, s.rejected_creates
                        );
                        for k in s.consumers {
                            println!(
                                "    consumer {}{}  committed {}  outstanding {}{}",
                                k.name,
                                if k.durable { " (durable)" } else { "" },
                                k.committed,
                                k.outstanding,
                                if k.attached { "" } else { "  detached" }
                            );
                        }
                    }
                }
            }
            Command::CreateStream(a) => {
                let c = Client::connect(&a.store.store, "staging-store create-stream").await?;
                c.create_stream(&a.name, a.flags.config(), a.exist_ok).await?;
            }
            Command::DeleteStream { store, name } => {
                let c = Client::connect(&store.store, "staging-store delete-stream").await?;
                c.delete_stream(&name).await?;
            }
            Command::Put { store, stream, file } => {
                let bytes = if file == Path::new("-") {
                    let mut v = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut v).map_err(io("reading stdin"))?;
                    v
                } else {
                    std::fs::read(&file).map_err(io(format!("reading {}", file.display())))?
                };
                let c = Client::connect(&store.store, "staging-store put").await?;
                let seq = c.put_with(&stream, &bytes, true).await?;
                println!("{stream} {seq}");
            }
            Command::Get { store, stream, seq, out } => {
                let c = Client::connect(&store.store, "staging-store get").await?;
                let frame = c.get(&stream, seq).await?;
                if !frame.verify() {
                    return Err(MainError::Usage(format!("frame {} failed its checksum", frame.seq())));
                }
                match out {
                    Some(path) => std::fs::write(&path, frame.bytes()).map_err(io(format!("writing {}", path.display())))?,
                    None => std::io::Write::write_all(&mut std::io::stdout(), frame.bytes()).map_err(io("writing stdout"))?,
                }
                eprintln!("{stream} frame {} ({} bytes)", frame.seq(), frame.bytes().len());
                frame.release().await?;
            }
            Command::Drain(a) => {
                let c = Client::connect(&a.store.store, "staging-store drain").await?;
                let mut sub = c.subscribe(&a.stream, &a.consumer, a.from, 8).await?;
                let mut n = 0u64;
                while a.count.is_none_or(|max| n < max) {
                    let next = tokio::time::timeout(Duration::from_millis(a.idle_ms), sub.next()).await;
                    let frame = match next {
                        Err(_) => break,
                        Ok(f) => f?,
                    };
                    let ok = frame.verify();
                    println!("{} {} {} {}", a.stream, frame.seq(), frame.bytes().len(), if ok { "ok" } else { "CHECKSUM-MISMATCH" });
                    if let Some(dir) = &a.out_dir {
                        let path = dir.join(format!("{}-{}.capnp", a.stream.replace('/', "_"), frame.seq()));
                        std::fs::write(&path, frame.bytes()).map_err(io(format!("writing {}", path.display())))?;
                    }
                    frame.release().await?;
                    n += 1;
                }
                sub.close().await?;
            }
        }
        Ok(())
    })
}
