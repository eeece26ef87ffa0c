//! The client library: connect to a store, write frames, read them.
//!
//! ```text
//!  Client::connect("unix:/run/staging-store.sock")  ── shm: the store's memfd arrives with the
//!                                                       welcome; grants and frames are read
//!                                                       and written in place
//!  Client::connect("store-host:7070")               ── verbs when this host has an RDMA
//!                                                       device and the store offers RDMA
//!                                                       (serve --verbs): one RDMA WRITE into
//!                                                       the grant, one RDMA READ per
//!                                                       delivery, no store CPU per byte;
//!                                                       else tcp
//!  Client::connect("tcp:store-host:7070")           ── tcp: a data connection carries bytes
//!  Client::connect("verbs:store-host:7070")         ── verbs, or an error saying why not
//!
//!  producer: create(stream, size) ─▶ Grant ─▶ write in place (shm) / put over data (tcp) /
//!            RDMA WRITE (verbs) ─▶ seal ─▶ seq
//!  consumer: subscribe(stream, consumer, cursor, window) ─▶ next() ─▶ FrameRef (bytes in
//!            place, received, or read by RDMA) ─▶ release (or drop)
//! ```
//!
//! The transport follows from the address: a Unix socket means the store is on this host, so
//! shm; a TCP address means verbs when both sides have an RDMA device, else tcp (a `tcp:` or
//! `verbs:` prefix decides instead). Requests are pipelined: any number of calls may be in flight
//! from any number of tasks; a background task reads the store's messages and wakes each
//! caller. Dropping the last handle closes the connection, and the store then drops everything
//! the session held.
//!
//! ```no_run
//! # async fn demo() -> Result<(), staging_store::client::ClientError> {
//! use staging_store::client::Client;
//! use staging_store::proto::{Cursor, StreamConfig};
//!
//! let producer = Client::connect("unix:/tmp/staging-store.sock", "decoder").await?;
//! producer.create_stream("cam0", StreamConfig::default(), true).await?;
//! let seq = producer.put("cam0", &framed_bytes()).await?;
//!
//! let consumer = Client::connect("unix:/tmp/staging-store.sock", "encoder").await?;
//! let mut frames = consumer.subscribe("cam0", "encoder", Cursor::Resume, 4).await?;
//! let frame = frames.next().await?;
//! assert_eq!(frame.seq(), seq);
//! let message = frame.read(&Default::default())?; // a capnp reader over the bytes, in place
//! # let _ = message;
//! frame.release().await?;
//! # Ok(()) }
//! # fn framed_bytes() -> Vec<u8> { Vec::new() }
//! ```

use crate::data::{self, Attach, Put};
use crate::proto::{
    self, decode_server_message, encode_request, Body, Cursor, Delivery, ErrorCode, Grant,
    MessageBuf, Reply, Request, ServerMessage, StoreError, StoreStat, StreamConfig, StreamStat,
    Subscribed, Transport, Welcome,
};
use capnp::message::Reader;
use capnp_rdma::reader::{read_framed, InPlaceSegments, ReadError, ReadOptions};
use capnp_rdma::transport::verbs::rc::{RcConnection, RcRegion};
use capnp_rdma::transport::verbs::{VerbsDevice, VerbsOptions};
use capnp_rdma::transport::TransportError;
use capnp_rdma::{BlockLease, OpenOptions, Region, RegionOptions};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The store answered with an error.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The connection failed or closed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The store broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The connection is closed.
    #[error("the connection to the store is closed")]
    Closed,
    /// The address is not `unix:PATH`, a path, `tcp:HOST:PORT` or `HOST:PORT`.
    #[error("bad store address {0:?}")]
    BadAddress(String),
    /// The frame's bytes are not a readable message.
    #[error("reading the frame: {0}")]
    Read(#[from] ReadError),
    /// Mapping the store's region failed.
    #[error("mapping the store's region: {0}")]
    Region(#[from] capnp_rdma::RegionError),
    /// The frame does not fit the grant (or the grant is not writable here).
    #[error("{0}")]
    Grant(String),
    /// RDMA (verbs clients): no device, the handshake, or an RDMA WRITE/READ failed.
    #[error("RDMA: {0}")]
    Rdma(#[from] TransportError),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> ClientError {
    move |source| ClientError::Io { what, source }
}

type Waiter = oneshot::Sender<Result<Reply, StoreError>>;

/// Where a received frame's bytes live.
enum Bytes {
    /// In the store's region, mapped here.
    Shared(Region),
    /// Received on the data connection (8-byte aligned).
    Owned(Vec<capnp::Word>),
    /// Read by RDMA into this client's region (verbs).
    Leased(BlockLease),
}

/// What the reader tasks hand a subscription: a frame (its bytes, for tcp), or the end of the
/// subscription with the number of frames it was delivered in all.
type Incoming = Result<(Delivery, Option<Vec<capnp::Word>>), (StoreError, u64)>;

struct Inner {
    writer: mpsc::UnboundedSender<Vec<u8>>,
    waiters: Mutex<HashMap<u64, Waiter>>,
    subscriptions: Mutex<HashMap<u32, mpsc::UnboundedSender<Incoming>>>,
    early: Mutex<HashMap<u32, Vec<Incoming>>>,
    /// tcp: bytes of gets, by reference, waiting for (or waited for by) the caller.
    got_bytes: Mutex<HashMap<u64, GotBytes>>,
    next_id: AtomicU64,
    welcome: Welcome,
    transport: Transport,
    region: Option<Region>,
    data: Option<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
    notices: Mutex<Vec<StoreError>>,
    /// tcp: receive buffers of dropped frames, read into again by the next deliveries (memory
    /// already mapped and faulted in, not zeroed again per frame).
    spare: Mutex<Vec<Vec<capnp::Word>>>,
    /// verbs: the RC connection to the store's region and this client's registered region.
    verbs: std::sync::OnceLock<Verbs>,
    /// tcp: a region of this client's own that in-place messages are built in (made on first
    /// use).
    local: std::sync::OnceLock<Region>,
    /// Subscriptions this client closed: deliveries still on their way to them are released.
    closed_subscriptions: Mutex<std::collections::HashSet<u32>>,
}

/// Bytes of a verbs client's own registered region (frames on their way in and out), unless
/// `STAGING_STORE_VERBS_STAGING_BYTES` says otherwise: enough for a window of 4K frames.
const VERBS_STAGING_BYTES: u64 = 256 << 20;

/// Bytes of a tcp client's own region for in-place messages (made on its first `InPlace`): a
/// lease lives only from `create` to the PUT at the seal, so five 4K frames built at once.
const TCP_STAGING_BYTES: u64 = 64 << 20;

fn verbs_staging_bytes() -> u64 {
    std::env::var("STAGING_STORE_VERBS_STAGING_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(VERBS_STAGING_BYTES)
}

/// `len` bytes at `at` lie inside `grant` (checked here for writes the store cannot see).
fn fits(grant: &Grant, at: u64, len: u64) -> Result<(), ClientError> {
    if at.checked_add(len).is_none_or(|end| end > grant.len) {
        return Err(ClientError::Grant(format!(
            "{len} bytes at {at} do not fit the grant of {} bytes",
            grant.len
        )));
    }
    Ok(())
}

/// A verbs client's side of RDMA.
struct Verbs {
    connection: RcConnection,
    staging: RcRegion,
}

impl Verbs {
    /// Writes `bytes` into the store's region at `remote_offset`, through a lease of this
    /// client's region (one copy here, one RDMA WRITE, no store CPU).
    async fn write(&self, bytes: &[u8], remote_offset: u64) -> Result<(), ClientError> {
        let mut lease = self.staging.region().lease(bytes.len() as u64)?;
        lease.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
        self.connection
            .write(&[(lease.offset(), bytes.len() as u64)], remote_offset)
            .await?;
        Ok(())
    }

    /// Reads `len` bytes of the store's region at `remote_offset` into a lease of this
    /// client's region (one RDMA READ).
    async fn read(&self, remote_offset: u64, len: u64) -> Result<BlockLease, ClientError> {
        let lease = self.staging.region().lease(len.max(1))?;
        self.connection
            .read(remote_offset, len, lease.offset())
            .await?;
        Ok(lease)
    }
}

/// Receive buffers a client keeps for reuse.
const SPARE_BUFFERS: usize = 8;

impl Inner {
    /// A buffer of `words` words: a spare one of that size, or new (zeroed) memory.
    fn buffer(&self, words: usize) -> Vec<capnp::Word> {
        let mut spare = self.spare.lock().expect("not poisoned");
        match spare.iter().rposition(|b| b.len() == words) {
            Some(at) => spare.swap_remove(at),
            None => {
                drop(spare);
                capnp::Word::allocate_zeroed_vec(words)
            }
        }
    }

    /// Keeps `buffer` for a later delivery (the oldest spare goes when there are enough).
    fn give_back(&self, buffer: Vec<capnp::Word>) {
        if buffer.is_empty() {
            return;
        }
        let mut spare = self.spare.lock().expect("not poisoned");
        if spare.len() == SPARE_BUFFERS {
            spare.remove(0);
        }
        spare.push(buffer);
    }
}

enum GotBytes {
    Arrived(Vec<capnp::Word>),
    Waiting(oneshot::Sender<Vec<capnp::Word>>),
}

/// A connection to a store. Cheap to clone; every clone shares the connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("transport", &self.inner.transport)
            .field("session", &self.inner.welcome.session)
            .finish()
    }
}

enum Addr {
    Unix(String),
    /// `tcp:`: a data connection; `verbs:`: RDMA, required; neither: RDMA when there is a
    /// device here and the store offers it, else a data connection.
    Tcp(String, Remote),
}

/// How a remote client moves bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Remote {
    Tcp,
    Verbs,
    Auto,
}

fn parse_addr(addr: &str) -> Result<Addr, ClientError> {
    if let Some(path) = addr.strip_prefix("unix:") {
        return Ok(Addr::Unix(path.to_owned()));
    }
    if let Some(hostport) = addr.strip_prefix("tcp:") {
        return Ok(Addr::Tcp(hostport.to_owned(), Remote::Tcp));
    }
    if let Some(hostport) = addr.strip_prefix("verbs:") {
        return Ok(Addr::Tcp(hostport.to_owned(), Remote::Verbs));
    }
    if addr.starts_with('/') || addr.starts_with('.') {
        return Ok(Addr::Unix(addr.to_owned()));
    }
    if addr
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        return Ok(Addr::Tcp(addr.to_owned(), Remote::Auto));
    }
    Err(ClientError::BadAddress(addr.to_owned()))
}

async fn read_message(
    read: &mut (impl AsyncReadExt + Unpin),
    buf: &mut MessageBuf,
) -> Result<Option<ServerMessage>, ClientError> {
    loop {
        if let Some(m) = buf.next_message() {
            let bytes = m.map_err(|e| ClientError::Protocol(e.to_string()))?;
            return decode_server_message(bytes)
                .map(Some)
                .map_err(|e| ClientError::Protocol(e.to_string()));
        }
        let n = read
            .read(buf.spare())
            .await
            .map_err(io_err("reading from the store"))?;
        if n == 0 {
            return Ok(None);
        }
        buf.filled(n);
    }
}

fn hello(client: &str, transport: Transport) -> Vec<u8> {
    let mut out = Vec::new();
    encode_request(
        &Request {
            id: 0,
            body: Body::Hello {
                version: proto::VERSION,
                client: client.chars().take(proto::MAX_NAME_BYTES).collect(),
                transport,
            },
        },
        &mut out,
    );
    out
}

fn welcome_of(message: Option<ServerMessage>) -> Result<Welcome, ClientError> {
    match message {
        Some(ServerMessage::Response(proto::Response {
            result: Ok(Reply::Welcome(w)),
            ..
        })) => Ok(w),
        Some(ServerMessage::Response(proto::Response { result: Err(e), .. })) => Err(e.into()),
        Some(other) => Err(ClientError::Protocol(format!(
            "expected a welcome, got {other:?}"
        ))),
        None => Err(ClientError::Closed),
    }
}

/// A second socket to the store (same host as the control connection `control`, at `port`)
/// that has shown the session's ATTACH header: a tcp client's data connection, or a verbs
/// client's RDMA handshake.
async fn attached(
    control: &TcpStream,
    welcome: &Welcome,
    port: u16,
    what: &'static str,
) -> Result<TcpStream, ClientError> {
    let peer = control.peer_addr().map_err(io_err("the store's address"))?;
    let mut socket = TcpStream::connect((peer.ip(), port))
        .await
        .map_err(|source| ClientError::Io {
            what: "connecting to the store",
            source: io::Error::new(source.kind(), format!("{what}: {source}")),
        })?;
    let _ = socket.set_nodelay(true);
    let attach = Attach {
        session: welcome.session,
        token: welcome.token,
    };
    socket
        .write_all(&attach.encode())
        .await
        .map_err(|source| ClientError::Io {
            what: "attaching to the session",
            source: io::Error::new(source.kind(), format!("{what}: {source}")),
        })?;
    Ok(socket)
}

impl Client {
    /// Connects to the store at `addr` and says hello as `name`. `unix:PATH` or a path: shm
    /// (same host, frames read and written in place). `HOST:PORT`: RDMA when this host has a
    /// device (`CAPNP_RDMA_DEVICE`, or the first) and the store offers it, else tcp.
    /// `tcp:HOST:PORT`: tcp. `verbs:HOST:PORT`: RDMA or an error.
    pub async fn connect(addr: &str, name: &str) -> Result<Client, ClientError> {
        match parse_addr(addr)? {
            Addr::Unix(path) => Self::connect_unix(&path, name).await,
            Addr::Tcp(hostport, remote) => Self::connect_remote(&hostport, name, remote).await,
        }
    }

    async fn connect_remote(
        hostport: &str,
        name: &str,
        remote: Remote,
    ) -> Result<Client, ClientError> {
        let mut stream = TcpStream::connect(hostport)
            .await
            .map_err(io_err("connecting to the store"))?;
        let _ = stream.set_nodelay(true);
        let mut buf = MessageBuf::new(proto::MAX_SERVER_MESSAGE_BYTES);
        if remote != Remote::Tcp {
            let options = VerbsOptions::from_env();
            match VerbsDevice::open(&options) {
                Ok(device) => {
                    stream
                        .write_all(&hello(name, Transport::Verbs))
                        .await
                        .map_err(io_err("sending hello"))?;
                    match welcome_of(read_message(&mut stream, &mut buf).await?) {
                        Ok(welcome) => {
                            return Self::attach_verbs(stream, buf, welcome, &device, &options)
                                .await
                        }
                        // The store offers no RDMA: tcp on the same connection.
                        Err(ClientError::Store(e))
                            if e.code == ErrorCode::Unsupported && remote == Remote::Auto => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(e) if remote == Remote::Verbs => return Err(e.into()),
                Err(_) => {}
            }
        }
        Self::connect_tcp(stream, buf, name).await
    }

    /// A verbs session: the region of this client (registered with its device) and an RC
    /// connection to the store's, set up over a socket to the store's handshake port that
    /// first shows the session's token.
    async fn attach_verbs(
        stream: TcpStream,
        buf: MessageBuf,
        welcome: Welcome,
        device: &VerbsDevice,
        options: &VerbsOptions,
    ) -> Result<Client, ClientError> {
        let staging = Region::create(&RegionOptions::memfd(verbs_staging_bytes()))?;
        let staging = RcRegion::register(device, &staging)?;
        let handshake = attached(&stream, &welcome, welcome.verbs_port, "RDMA handshake").await?;
        let connection = RcConnection::handshake(handshake, &staging, options).await?;
        let (read, write) = stream.into_split();
        let client = Self::start(read, write, buf, welcome, Transport::Verbs, None, None);
        client
            .inner
            .verbs
            .set(Verbs {
                connection,
                staging,
            })
            .map_err(|_| ClientError::Protocol("RDMA attached twice".into()))?;
        Ok(client)
    }

    async fn connect_unix(path: &str, name: &str) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(io_err("connecting to the store's Unix socket"))?;
        stream
            .try_write(&hello(name, Transport::Shm))
            .map_err(io_err("sending hello"))?;
        // The welcome arrives with the region's descriptor.
        let mut buf = MessageBuf::new(proto::MAX_SERVER_MESSAGE_BYTES);
        let mut fd = None;
        let welcome = loop {
            if let Some(m) = buf.next_message() {
                let bytes = m.map_err(|e| ClientError::Protocol(e.to_string()))?;
                let message = decode_server_message(bytes)
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
                break welcome_of(Some(message))?;
            }
            let (n, fds) = capnp_rdma::fdpass::recv_with_fds(&stream, buf.spare(), 1)
                .await
                .map_err(io_err("reading the welcome"))?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            buf.filled(n);
            if let Some(f) = fds.into_iter().next() {
                fd = Some(f);
            }
        };
        let fd = fd.ok_or_else(|| {
            ClientError::Protocol("the welcome came without the region's descriptor".into())
        })?;
        let region = Region::open_fd(
            fd,
            &OpenOptions {
                prefault: true,
                ..OpenOptions::default()
            },
        )?;
        if region.id() != welcome.region_id {
            return Err(ClientError::Protocol(
                "the descriptor is not the region the welcome names".into(),
            ));
        }
        let (read, write) = stream.into_split();
        Ok(Self::start(
            read,
            write,
            buf,
            welcome,
            Transport::Shm,
            Some(region),
            None,
        ))
    }

    async fn connect_tcp(
        mut stream: TcpStream,
        mut buf: MessageBuf,
        name: &str,
    ) -> Result<Client, ClientError> {
        stream
            .write_all(&hello(name, Transport::Tcp))
            .await
            .map_err(io_err("sending hello"))?;
        let welcome = welcome_of(read_message(&mut stream, &mut buf).await?)?;
        let data = attached(&stream, &welcome, welcome.data_port, "data connection").await?;
        let (data_read, data_write) = data.into_split();
        let (read, write) = stream.into_split();
        let client = Self::start(
            read,
            write,
            buf,
            welcome,
            Transport::Tcp,
            None,
            Some(data_write),
        );
        tokio::spawn(data_reader(Arc::downgrade(&client.inner), data_read));
        Ok(client)
    }

    fn start(
        read: impl AsyncReadExt + Unpin + Send + 'static,
        mut write: impl AsyncWriteExt + Unpin + Send + 'static,
        buf: MessageBuf,
        welcome: Welcome,
        transport: Transport,
        region: Option<Region>,
        data: Option<tokio::net::tcp::OwnedWriteHalf>,
    ) -> Client {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while let Some(first) = rx.recv().await {
                batch.clear();
                batch.extend_from_slice(&first);
                while let Ok(more) = rx.try_recv() {
                    batch.extend_from_slice(&more);
                }
                if write.write_all(&batch).await.is_err() {
                    return;
                }
            }
            let _ = write.shutdown().await;
        });
        let inner = Arc::new(Inner {
            writer: tx,
            waiters: Mutex::new(HashMap::new()),
            subscriptions: Mutex::new(HashMap::new()),
            early: Mutex::new(HashMap::new()),
            got_bytes: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            welcome,
            transport,
            region,
            data: data.map(tokio::sync::Mutex::new),
            notices: Mutex::new(Vec::new()),
            spare: Mutex::new(Vec::new()),
            verbs: std::sync::OnceLock::new(),
            local: std::sync::OnceLock::new(),
            closed_subscriptions: Mutex::new(std::collections::HashSet::new()),
        });
        tokio::spawn(control_reader(Arc::downgrade(&inner), read, buf));
        Client { inner }
    }

    /// How this client moves bytes.
    pub fn transport(&self) -> Transport {
        self.inner.transport
    }

    /// A verbs client's completion-queue counters (completions, polls, sleeps on the channel):
    /// its RDMA WRITEs and READs complete here, not at the store. `None` for shm and tcp.
    pub fn rdma_poll_stats(&self) -> Option<capnp_rdma::transport::verbs::PollStats> {
        self.inner.verbs.get().map(|v| v.connection.poll_stats())
    }

    /// What the store said at hello.
    pub fn welcome(&self) -> &Welcome {
        &self.inner.welcome
    }

    /// The store's region, mapped (shm clients).
    pub fn region(&self) -> Option<&Region> {
        self.inner.region.as_ref()
    }

    /// Errors the store reported outside any request (e.g. a refused data write).
    pub fn take_notices(&self) -> Vec<StoreError> {
        std::mem::take(&mut *self.inner.notices.lock().expect("not poisoned"))
    }

    fn send(
        &self,
        body: Body,
        wait: bool,
    ) -> Result<Option<oneshot::Receiver<Result<Reply, StoreError>>>, ClientError> {
        // Id 0: no answer unless the request fails (then a notice).
        let id = if wait {
            self.inner.next_id.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        let rx = if wait {
            let (tx, rx) = oneshot::channel();
            self.inner
                .waiters
                .lock()
                .expect("not poisoned")
                .insert(id, tx);
            Some(rx)
        } else {
            None
        };
        let mut bytes = Vec::with_capacity(64);
        encode_request(&Request { id, body }, &mut bytes);
        self.inner
            .writer
            .send(bytes)
            .map_err(|_| ClientError::Closed)?;
        Ok(rx)
    }

    /// Sends a request and waits for its answer.
    pub async fn call(&self, body: Body) -> Result<Reply, ClientError> {
        let rx = self.send(body, true)?.expect("asked to wait");
        match rx.await {
            Ok(result) => result.map_err(ClientError::Store),
            Err(_) => Err(ClientError::Closed),
        }
    }

    /// Creates a stream (`exist_ok`: succeed if it exists).
    pub async fn create_stream(
        &self,
        name: &str,
        config: StreamConfig,
        exist_ok: bool,
    ) -> Result<(), ClientError> {
        self.call(Body::CreateStream {
            name: name.to_owned(),
            config,
            exist_ok,
        })
        .await
        .map(drop)
    }

    /// Deletes a stream.
    pub async fn delete_stream(&self, name: &str) -> Result<(), ClientError> {
        self.call(Body::DeleteStream(name.to_owned()))
            .await
            .map(drop)
    }

    /// A writable grant of at least `size` bytes for the next frame of `stream` (may wait
    /// for room, as the stream's policy says).
    pub async fn create(&self, stream: &str, size: u64) -> Result<Grant, ClientError> {
        self.create_with(stream, size, false).await
    }

    /// Like [`Client::create`]; `dirty_ok`: this client overwrites every byte it will seal, so
    /// the grant need not be zeroed (the store may reuse a freed frame's blocks as they are,
    /// which saves zeroing the frame). Honoured for shm clients only.
    pub async fn create_with(
        &self,
        stream: &str,
        size: u64,
        dirty_ok: bool,
    ) -> Result<Grant, ClientError> {
        match self
            .call(Body::Create {
                stream: stream.to_owned(),
                size,
                dirty_ok,
            })
            .await?
        {
            Reply::Granted(g) => Ok(g),
            other => Err(unexpected(other)),
        }
    }

    /// The bytes of a grant, writable (shm clients).
    ///
    /// The grant is this client's alone until sealed or aborted: the store gives its blocks
    /// to nobody else and reads them only at seal.
    ///
    /// # Safety
    /// At most one slice of a grant may be alive at a time (across every clone of this
    /// client), and none after the grant is sealed or aborted.
    #[allow(clippy::mut_from_ref)] // exclusivity is the caller's obligation (# Safety)
    pub unsafe fn grant_bytes(&self, grant: &Grant) -> Result<&mut [u8], ClientError> {
        let region = self.inner.region.as_ref().ok_or_else(|| {
            ClientError::Grant("grants are writable in place only over shm".into())
        })?;
        region.check_range(grant.offset, grant.len)?;
        // SAFETY: the range lies in the mapping (checked); the store granted it to this
        // session only, and it is not sealed yet, so no one else reads or writes it. Callers
        // must not hold two slices of one grant at once (each call is for one grant write).
        Ok(unsafe {
            std::slice::from_raw_parts_mut(
                region.as_ptr().cast_mut().add(grant.offset as usize),
                grant.len as usize,
            )
        })
    }

    /// The RDMA side of a verbs client.
    fn verbs(&self) -> Result<&Verbs, ClientError> {
        self.inner
            .verbs
            .get()
            .ok_or_else(|| ClientError::Grant("not a verbs client".into()))
    }

    /// The region of this client's own that messages for remote grants are built in: the
    /// registered one (verbs), or a private one made on first use (tcp). shm clients build in
    /// the store's region itself ([`region`](Self::region)).
    pub(crate) fn staging_region(&self) -> Result<Region, ClientError> {
        match self.inner.transport {
            Transport::Verbs => Ok(self.verbs()?.staging.region().clone()),
            Transport::Tcp => {
                if let Some(region) = self.inner.local.get() {
                    return Ok(region.clone());
                }
                let region = Region::create(&RegionOptions::memfd(TCP_STAGING_BYTES))?;
                // Two first uses at once: one region is kept, the other dropped.
                let _ = self.inner.local.set(region);
                Ok(self.inner.local.get().expect("just set").clone())
            }
            Transport::Shm => Err(ClientError::Grant(
                "an shm client builds in the store's region".into(),
            )),
        }
    }

    /// Sends `len` bytes of [`staging_region`](Self::staging_region) at `local_offset` into
    /// the grant at `at`: one RDMA WRITE straight from the registered region (verbs, no copy
    /// here), or a PUT on the data connection (tcp).
    ///
    /// # Safety
    /// Nobody writes `local_offset .. local_offset + len` of the staging region until this
    /// returns (the caller holds the lease that covers it).
    pub(crate) async unsafe fn write_staged(
        &self,
        grant: &Grant,
        at: u64,
        local_offset: u64,
        len: u64,
    ) -> Result<(), ClientError> {
        fits(grant, at, len)?;
        if self.inner.transport == Transport::Verbs {
            self.verbs()?
                .connection
                .write(&[(local_offset, len)], grant.offset + at)
                .await?;
            return Ok(());
        }
        let region = self.staging_region()?;
        // SAFETY: in the staging region (`bytes` checks the range), and the caller guarantees
        // that nobody writes it while this slice lives.
        let bytes = unsafe { region.bytes(local_offset, len) }?;
        self.write_grant(grant, at, bytes).await
    }

    /// A delivered frame's bytes, read by RDMA into this client's region (verbs). On failure
    /// the reference is given back.
    async fn fetch(&self, delivery: &Delivery) -> Result<Bytes, ClientError> {
        match self.verbs()?.read(delivery.offset, delivery.len).await {
            Ok(lease) => Ok(Bytes::Leased(lease)),
            Err(e) => {
                let _ = self.release_nowait(delivery.reference);
                Err(e)
            }
        }
    }

    /// Sends `bytes` into the grant at `at`: over the data connection (tcp clients, which
    /// fill a grant from its start without gaps), or with one RDMA WRITE (verbs clients).
    pub async fn write_grant(
        &self,
        grant: &Grant,
        at: u64,
        bytes: &[u8],
    ) -> Result<(), ClientError> {
        if self.inner.transport == Transport::Verbs {
            // The store cannot see RDMA writes: keep them inside the grant here.
            fits(grant, at, bytes.len() as u64)?;
            return self.verbs()?.write(bytes, grant.offset + at).await;
        }
        let data =
            self.inner.data.as_ref().ok_or_else(|| {
                ClientError::Grant("no data connection (shm writes in place)".into())
            })?;
        let mut w = data.lock().await;
        let header = Put {
            object: grant.object,
            at,
            len: bytes.len() as u64,
        }
        .encode();
        data::write_with_header(&mut w, &header, bytes)
            .await
            .map_err(io_err("writing a PUT"))?;
        Ok(())
    }

    /// Makes `len` bytes at `offset` (inside the grant) readable as the stream's next frame.
    pub async fn seal(
        &self,
        grant: &Grant,
        offset: u64,
        len: u64,
        checksum: Option<u32>,
    ) -> Result<u64, ClientError> {
        match self
            .call(Body::Seal {
                object: grant.object,
                offset,
                len,
                checksum,
            })
            .await?
        {
            Reply::Sealed(seq) => Ok(seq),
            other => Err(unexpected(other)),
        }
    }

    /// Gives up a grant.
    pub async fn abort(&self, grant: &Grant) -> Result<(), ClientError> {
        self.call(Body::Abort(grant.object)).await.map(drop)
    }

    /// Writes one framed message (standard Cap'n Proto stream framing) as the stream's next
    /// frame: create, copy into the grant (shm) or send it (tcp), seal. Returns its sequence
    /// number. Builds the checksum when the store or `checksum` asks for one.
    pub async fn put_with(
        &self,
        stream: &str,
        framed: &[u8],
        checksum: bool,
    ) -> Result<u64, ClientError> {
        // The whole message is copied into the grant: it need not be zeroed first.
        let grant = self.create_with(stream, framed.len() as u64, true).await?;
        let crc =
            (checksum || self.inner.welcome.checksums).then(|| crate::journal::frame_crc(framed));
        let written = match self.inner.transport {
            Transport::Shm => {
                // SAFETY: the only slice of this fresh grant, dropped before the seal.
                unsafe { self.grant_bytes(&grant) }?[..framed.len()].copy_from_slice(framed);
                Ok(())
            }
            Transport::Tcp | Transport::Verbs => self.write_grant(&grant, 0, framed).await,
        };
        if let Err(e) = written {
            let _ = self.abort(&grant).await;
            return Err(e);
        }
        self.seal(&grant, grant.offset, framed.len() as u64, crc)
            .await
    }

    /// [`Client::put_with`] with a checksum only if the store requires one.
    pub async fn put(&self, stream: &str, framed: &[u8]) -> Result<u64, ClientError> {
        self.put_with(stream, framed, false).await
    }

    /// One sealed frame (the newest when `seq` is `None`), held until released.
    pub async fn get(&self, stream: &str, seq: Option<u64>) -> Result<FrameRef, ClientError> {
        let delivery = match self
            .call(Body::Get {
                stream: stream.to_owned(),
                seq,
            })
            .await?
        {
            Reply::Got(d) => d,
            other => return Err(unexpected(other)),
        };
        let bytes = match self.inner.transport {
            Transport::Shm => Bytes::Shared(self.inner.region.clone().expect("shm has a region")),
            Transport::Verbs => self.fetch(&delivery).await?,
            Transport::Tcp => {
                let rx = {
                    let mut got = self.inner.got_bytes.lock().expect("not poisoned");
                    match got.remove(&delivery.reference) {
                        Some(GotBytes::Arrived(words)) => Ok(words),
                        _ => {
                            let (tx, rx) = oneshot::channel();
                            got.insert(delivery.reference, GotBytes::Waiting(tx));
                            Err(rx)
                        }
                    }
                };
                match rx {
                    Ok(words) => Bytes::Owned(words),
                    Err(rx) => Bytes::Owned(rx.await.map_err(|_| ClientError::Closed)?),
                }
            }
        };
        Ok(FrameRef::new(self.clone(), delivery, bytes))
    }

    /// Subscribes to a stream as `consumer` (empty: anonymous), from `from`, with at most
    /// `window` frames held at once.
    pub async fn subscribe(
        &self,
        stream: &str,
        consumer: &str,
        from: Cursor,
        window: u32,
    ) -> Result<Subscription, ClientError> {
        let reply = self
            .call(Body::Subscribe {
                stream: stream.to_owned(),
                consumer: consumer.to_owned(),
                from,
                window,
            })
            .await?;
        let Reply::Subscribed(Subscribed {
            subscription,
            from_seq,
        }) = reply
        else {
            return Err(unexpected(reply));
        };
        let (rx, early) = {
            // Same lock order as `route_incoming`: deliveries that arrived before this point
            // were parked under the id, later ones go to the channel.
            let mut subs = self.inner.subscriptions.lock().expect("not poisoned");
            let (tx, rx) = mpsc::unbounded_channel();
            subs.insert(subscription, tx);
            let early = self
                .inner
                .early
                .lock()
                .expect("not poisoned")
                .remove(&subscription)
                .unwrap_or_default();
            (rx, early)
        };
        Ok(Subscription {
            client: self.clone(),
            id: subscription,
            from_seq,
            rx,
            early: early.into(),
            closed: false,
            received: 0,
            ended: None,
        })
    }

    /// Drops a reference (and acknowledges a subscription's frame), waiting for the answer.
    pub async fn release(&self, reference: u64) -> Result<(), ClientError> {
        self.call(Body::Release(reference)).await.map(drop)
    }

    /// Gives up a grant without waiting for the answer.
    pub fn abort_nowait(&self, grant: &Grant) -> Result<(), ClientError> {
        self.send(Body::Abort(grant.object), false).map(drop)
    }

    /// Drops a reference without waiting for the answer (errors are reported as notices).
    pub fn release_nowait(&self, reference: u64) -> Result<(), ClientError> {
        self.send(Body::Release(reference), false).map(drop)
    }

    /// Store-wide counters.
    pub async fn stat(&self) -> Result<StoreStat, ClientError> {
        match self.call(Body::Stat).await? {
            Reply::Stat(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Every stream's state.
    pub async fn streams(&self) -> Result<Vec<StreamStat>, ClientError> {
        match self.call(Body::Streams).await? {
            Reply::Streams(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// One stream's state.
    pub async fn stream_stat(&self, name: &str) -> Result<StreamStat, ClientError> {
        match self.call(Body::StreamStat(name.to_owned())).await? {
            Reply::StreamStat(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(reply: Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {reply:?}"))
}

fn route_incoming(inner: &Arc<Inner>, subscription: u32, item: Incoming) {
    let subs = inner.subscriptions.lock().expect("not poisoned");
    match subs.get(&subscription) {
        Some(tx) => {
            let _ = tx.send(item);
        }
        // Sent before the store saw this client's unsubscribe: nobody will take it.
        None if inner
            .closed_subscriptions
            .lock()
            .expect("not poisoned")
            .contains(&subscription) =>
        {
            drop(subs);
            if let Ok((delivery, _)) = item {
                let _ = (Client {
                    inner: Arc::clone(inner),
                })
                .release_nowait(delivery.reference);
            }
        }
        // A delivery can overtake the `subscribed` answer's waiter: keep it for `subscribe`.
        None => inner
            .early
            .lock()
            .expect("not poisoned")
            .entry(subscription)
            .or_default()
            .push(item),
    }
}

async fn control_reader(
    inner: std::sync::Weak<Inner>,
    mut read: impl AsyncReadExt + Unpin,
    mut buf: MessageBuf,
) {
    loop {
        let message = match read_message(&mut read, &mut buf).await {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => break,
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match message {
            ServerMessage::Response(r) => {
                let waiter = inner.waiters.lock().expect("not poisoned").remove(&r.id);
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(r.result);
                    }
                    None => {
                        if let Err(e) = r.result {
                            inner.notices.lock().expect("not poisoned").push(e);
                        }
                    }
                }
            }
            ServerMessage::Delivery(d) => route_incoming(&inner, d.subscription, Ok((d, None))),
            ServerMessage::Ended {
                subscription,
                reason,
                delivered,
            } => route_incoming(&inner, subscription, Err((reason, delivered))),
            ServerMessage::Notice(e) => inner.notices.lock().expect("not poisoned").push(e),
        }
    }
    // The connection is gone: every waiter learns it (dropping the senders).
    if let Some(inner) = inner.upgrade() {
        inner.waiters.lock().expect("not poisoned").clear();
        inner.subscriptions.lock().expect("not poisoned").clear();
        inner.got_bytes.lock().expect("not poisoned").clear();
    }
}

async fn data_reader(inner: std::sync::Weak<Inner>, mut read: tokio::net::tcp::OwnedReadHalf) {
    let mut header = [0u8; data::DELIVER_LEN];
    loop {
        if read.read_exact(&mut header).await.is_err() {
            break;
        }
        let Ok(delivery) = data::decode_deliver(&header) else {
            break;
        };
        let region_limit = inner.upgrade().map_or(0, |i| i.welcome.region_bytes);
        if delivery.len > region_limit {
            break;
        }
        let Some(mut words) = inner
            .upgrade()
            .map(|i| i.buffer(delivery.len.div_ceil(8) as usize))
        else {
            return;
        };
        let bytes = &mut capnp::Word::words_to_bytes_mut(&mut words)[..delivery.len as usize];
        if data::read_body(&mut read, bytes).await.is_err() {
            break;
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if delivery.subscription == 0 {
            let mut got = inner.got_bytes.lock().expect("not poisoned");
            match got.remove(&delivery.reference) {
                Some(GotBytes::Waiting(tx)) => {
                    let _ = tx.send(words);
                }
                _ => {
                    got.insert(delivery.reference, GotBytes::Arrived(words));
                }
            }
        } else {
            route_incoming(&inner, delivery.subscription, Ok((delivery, Some(words))));
        }
    }
    if let Some(inner) = inner.upgrade() {
        inner.subscriptions.lock().expect("not poisoned").clear();
        inner.got_bytes.lock().expect("not poisoned").clear();
    }
}

/// A subscription's frames, in order.
pub struct Subscription {
    client: Client,
    id: u32,
    from_seq: u64,
    rx: mpsc::UnboundedReceiver<Incoming>,
    early: std::collections::VecDeque<Incoming>,
    closed: bool,
    /// Frames taken with `next`.
    received: u64,
    /// The store ended it: why, and after how many frames.
    ended: Option<(StoreError, u64)>,
}

impl Subscription {
    /// Its id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The first frame it delivers.
    pub fn from_seq(&self) -> u64 {
        self.from_seq
    }

    /// The next frame (waits for one). `Err(Closed)` when the connection ends; a store error
    /// when the subscription ended (its stream was deleted).
    pub async fn next(&mut self) -> Result<FrameRef, ClientError> {
        let (delivery, words) = loop {
            // Ended once every frame it was delivered is here (over tcp, frames travel on
            // the data connection and may come after the control connection's `ended`).
            if let Some((reason, delivered)) = &self.ended {
                if self.received >= *delivered {
                    return Err(ClientError::Store(reason.clone()));
                }
            }
            let item = match self.early.pop_front() {
                Some(item) => item,
                None => match self.rx.recv().await {
                    Some(item) => item,
                    None => return Err(ClientError::Closed),
                },
            };
            match item {
                Ok(frame) => break frame,
                Err(end) => self.ended = Some(end),
            }
        };
        self.received += 1;
        let bytes =
            match (words, self.client.inner.transport) {
                (Some(words), _) => Bytes::Owned(words),
                (None, Transport::Verbs) => self.client.fetch(&delivery).await?,
                (None, _) => Bytes::Shared(self.client.inner.region.clone().ok_or_else(|| {
                    ClientError::Protocol("shm delivery without a region".into())
                })?),
            };
        Ok(FrameRef::new(self.client.clone(), delivery, bytes))
    }

    /// Ends the subscription; frames it delivered and that are not released go back to the
    /// stream (a durable consumer gets them again when it resumes).
    pub async fn close(mut self) -> Result<(), ClientError> {
        let queued = self.detach();
        let result = self.client.call(Body::Unsubscribe(self.id)).await.map(drop);
        self.release_queued(queued);
        result
    }

    /// Stops routing deliveries here (later ones are released as they arrive) and takes the
    /// ones queued and never handed out.
    fn detach(&mut self) -> Vec<Delivery> {
        self.closed = true;
        let inner = &self.client.inner;
        inner
            .subscriptions
            .lock()
            .expect("not poisoned")
            .remove(&self.id);
        inner
            .closed_subscriptions
            .lock()
            .expect("not poisoned")
            .insert(self.id);
        self.rx.close();
        let mut queued: Vec<Delivery> = self.early.drain(..).flatten().map(|(d, _)| d).collect();
        while let Ok(item) = self.rx.try_recv() {
            queued.extend(item.ok().map(|(d, _)| d));
        }
        queued
    }

    /// Gives frames that were never handed out back to the store (after the unsubscribe:
    /// unacknowledged, so a durable consumer gets them again when it resumes).
    fn release_queued(&self, queued: Vec<Delivery>) {
        for delivery in queued {
            let _ = self.client.release_nowait(delivery.reference);
        }
    }
}

impl Drop for Subscription {
    /// Unsubscribes without waiting: the store stops delivering, and frames delivered but
    /// not yet taken with `next` go back to it (a durable consumer gets them again when it
    /// resumes). Frames already taken stay valid until released or dropped.
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let queued = self.detach();
        let _ = self.client.send(Body::Unsubscribe(self.id), false);
        self.release_queued(queued);
    }
}

/// A frame held by this client: its bytes stay valid (and its blocks allocated) until it is
/// released or dropped (dropping releases without waiting).
pub struct FrameRef {
    client: Client,
    delivery: Delivery,
    bytes: Bytes,
    released: bool,
}

impl std::fmt::Debug for FrameRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameRef")
            .field("delivery", &self.delivery)
            .finish()
    }
}

impl FrameRef {
    fn new(client: Client, delivery: Delivery, bytes: Bytes) -> Self {
        Self {
            client,
            delivery,
            bytes,
            released: false,
        }
    }

    /// Its sequence number in the stream.
    pub fn seq(&self) -> u64 {
        self.delivery.seq
    }

    /// What the store said about it.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// The frame: one Cap'n Proto message in standard stream framing.
    pub fn bytes(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Shared(region) => {
                // SAFETY: the frame is sealed (nobody writes it) and this reference keeps its
                // blocks allocated until it is released, which consumes or drops `self`.
                unsafe { region.bytes(self.delivery.offset, self.delivery.len) }.unwrap_or_default()
            }
            Bytes::Owned(words) => {
                &capnp::Word::words_to_bytes(words)[..self.delivery.len as usize]
            }
            Bytes::Leased(lease) => &lease.as_slice()[..self.delivery.len as usize],
        }
    }

    /// Reads the message in place (bounds-checked).
    pub fn read(&self, options: &ReadOptions) -> Result<Reader<InPlaceSegments<'_>>, ClientError> {
        Ok(read_framed(self.bytes(), options)?.0)
    }

    /// Verifies the seal's checksum, if it has one.
    pub fn verify(&self) -> bool {
        self.delivery
            .checksum
            .is_none_or(|crc| crate::journal::frame_crc(self.bytes()) == crc)
    }

    /// Releases it and waits for the store's answer.
    pub async fn release(mut self) -> Result<(), ClientError> {
        self.released = true;
        self.client.release(self.delivery.reference).await
    }
}

impl Drop for FrameRef {
    fn drop(&mut self) {
        if !self.released {
            let _ = self.client.release_nowait(self.delivery.reference);
        }
        if let Bytes::Owned(words) = &mut self.bytes {
            self.client.inner.give_back(std::mem::take(words));
        }
    }
}
