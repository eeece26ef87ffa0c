//! The server: sockets around the [`Store`] state machine, on one thread.
//!
//! ```text
//!  Unix listener ─┐                         ┌─ per connection: reader task ─▶ Store::handle
//!  TCP listener ──┼─▶ control connections ──┤                  writer task ◀─ encoded replies,
//!                 │                         │                               deliveries (+ memfd
//!                 │                         │                               with an shm welcome)
//!  data listener ─┴─▶ data connections ─────┴─ PUT: read straight into the grant (begin/end_put)
//!                                              DELIVER: header + bytes written from the region
//!  timer task: Store::expire at the next blocked create's deadline
//!  metrics listener: GET /metrics (Prometheus text)
//! ```
//!
//! Everything runs on a current-thread runtime in a `LocalSet`: the store is one
//! `RefCell`, each request is handled to completion, replies for a batch of requests leave in
//! one write. A connection that sends garbage gets a `notice` and is closed; its session's
//! references and grants are dropped as for any disconnect, and every other client carries on.

use crate::data::{self, Attach, Put};
use crate::metrics::{self, MetricsSnapshot};
use crate::proto::{
    self, decode_request, encode_server_message, ErrorCode, MessageBuf, Reply, Response,
    ServerMessage, StoreError, StoreStat, Transport,
};
use crate::socket_lock::{SocketClaim, SocketLockError};
use crate::store::{Out, SessionId, Store};
use capnp_rdma::transport::verbs::rc::{RcConnection, RcRegion};
use capnp_rdma::transport::verbs::{VerbsDevice, VerbsOptions};
use capnp_rdma::BlockLease;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{mpsc, Notify};

/// Where the server listens.
#[derive(Clone, Debug, Default)]
pub struct Listen {
    /// Unix socket for local clients (shm).
    pub unix: Option<PathBuf>,
    /// TCP address for remote clients' control connections.
    pub tcp: Option<SocketAddr>,
    /// TCP address for remote clients' data connections (port 0: any free port).
    pub data: Option<SocketAddr>,
    /// TCP address of the Prometheus endpoint.
    pub metrics: Option<SocketAddr>,
    /// TCP address of the RDMA handshake listener: verbs clients connect their RC queue pair
    /// there and move bytes with one-sided RDMA. Needs an RDMA device
    /// ([`VerbsOptions::from_env`]); the region is registered with it once.
    pub verbs: Option<SocketAddr>,
}

/// Addresses actually bound (ports resolved).
#[derive(Clone, Debug, Default)]
pub struct Bound {
    /// Unix socket path.
    pub unix: Option<PathBuf>,
    /// Control TCP address.
    pub tcp: Option<SocketAddr>,
    /// Data TCP address.
    pub data: Option<SocketAddr>,
    /// Metrics address.
    pub metrics: Option<SocketAddr>,
    /// RDMA handshake address.
    pub verbs: Option<SocketAddr>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener could not be bound.
    #[error("binding {what} {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Where.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// Verbs was asked for and the RDMA device could not be opened or the region not
    /// registered.
    #[error("RDMA (--verbs): {0}")]
    Verbs(capnp_rdma::transport::TransportError),
    /// The Unix socket path is another store's (or could not be claimed).
    #[error(transparent)]
    Socket(#[from] SocketLockError),
}

pub use crate::metrics::IoCounters;

enum WriteItem {
    Bytes(Vec<u8>),
    WithRegionFd(Vec<u8>),
}

struct Conn {
    control: mpsc::UnboundedSender<WriteItem>,
    /// A verbs client's RC connection to the region: dropped (its queue pair destroyed, so
    /// no RDMA from it lands any more) before the session's grants are freed.
    verbs: Option<RcConnection>,
    data: Option<mpsc::UnboundedSender<(proto::Delivery, Arc<BlockLease>)>>,
    /// Deliveries produced before the data connection attached.
    backlog: Vec<(proto::Delivery, Arc<BlockLease>)>,
    local: bool,
}

struct Shared {
    store: Store,
    conns: HashMap<SessionId, Conn>,
    pending: HashMap<SessionId, Vec<u8>>,
    io: IoCounters,
    timer: Rc<Notify>,
}

impl Shared {
    /// What the metrics endpoint renders, as things are now.
    fn metrics_snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            stat: self.store.stat_now(),
            blocks: self.store.blocks(),
            region: self.store.region().stats(),
            streams: self.store.stream_stats(),
            io: self.io,
        }
    }

    /// Encodes what the store produced and hands it to the connections' writers, then wakes
    /// the timer task if creates wait (one may have just been parked, or the earliest
    /// deadline changed).
    fn route(&mut self, outs: Vec<Out>) {
        self.send_outs(outs);
        if self.store.next_deadline(Instant::now()).is_some() {
            self.timer.notify_one();
        }
    }

    /// [`Shared::route`] without waking the timer: for the timer task itself, which re-reads
    /// the deadline on its next turn anyway. (Waking itself would leave a permit that makes
    /// its next `notified()` ready at once: a loop that never yields, starving every
    /// connection for as long as a create waits.)
    fn send_outs(&mut self, outs: Vec<Out>) {
        for out in outs {
            match out {
                Out::Message(sid, message) => {
                    let Some(local) = self.conns.get(&sid).map(|c| c.local) else {
                        continue;
                    };
                    if local && is_welcome(&message) {
                        let mut bytes = Vec::new();
                        encode_server_message(&message, &mut bytes);
                        self.flush_one(sid);
                        if let Some(conn) = self.conns.get(&sid) {
                            let _ = conn.control.send(WriteItem::WithRegionFd(bytes));
                        }
                        continue;
                    }
                    encode_server_message(&message, self.pending.entry(sid).or_default());
                }
                Out::Data(sid, delivery, hold) => {
                    let Some(conn) = self.conns.get_mut(&sid) else {
                        continue;
                    };
                    match &conn.data {
                        Some(tx) => {
                            let _ = tx.send((delivery, hold));
                        }
                        None => conn.backlog.push((delivery, hold)),
                    }
                }
            }
        }
        let sids: Vec<SessionId> = self.pending.keys().copied().collect();
        for sid in sids {
            self.flush_one(sid);
        }
    }

    fn flush_one(&mut self, sid: SessionId) {
        if let Some(bytes) = self.pending.remove(&sid) {
            if let Some(conn) = self.conns.get(&sid) {
                let _ = conn.control.send(WriteItem::Bytes(bytes));
            }
        }
    }
}

fn is_welcome(message: &ServerMessage) -> bool {
    matches!(
        message,
        ServerMessage::Response(Response {
            result: Ok(Reply::Welcome(_)),
            ..
        })
    )
}

/// A control connection's socket.
enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Sock {
    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let r = match self {
                Sock::Unix(s) => {
                    s.readable().await?;
                    s.try_read(buf)
                }
                Sock::Tcp(s) => {
                    s.readable().await?;
                    s.try_read(buf)
                }
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let r = match self {
                Sock::Unix(s) => {
                    s.writable().await?;
                    s.try_write(buf)
                }
                Sock::Tcp(s) => {
                    s.writable().await?;
                    s.try_write(buf)
                }
            };
            match r {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn shutdown(&self) {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Sock::Unix(s) => s.as_raw_fd(),
            Sock::Tcp(s) => s.as_raw_fd(),
        };
        // SAFETY: shutdown(2) on a descriptor this socket owns; it changes no memory.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

/// Runs the server until `shutdown` resolves, then closes the store ([`Store::close`]: with
/// persistence, sealed frames stay in the region file) and returns its final counters.
///
/// Must run inside a [`tokio::task::LocalSet`] on a current-thread runtime. `ready` receives
/// the bound addresses once every listener is up.
pub async fn serve(
    store: Store,
    listen: Listen,
    ready: impl FnOnce(&Bound),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<StoreStat, ServeError> {
    let bind =
        |what: &'static str, addr: String| move |source| ServeError::Bind { what, addr, source };
    let mut bound = Bound::default();
    // Held until the end: keeps other stores off the path (see `socket_lock`).
    let mut unix_claim = None;
    let unix = match &listen.unix {
        Some(path) => {
            let (claim, l) = SocketClaim::bind(path).await?;
            unix_claim = Some(claim);
            bound.unix = Some(path.clone());
            Some(l)
        }
        None => None,
    };
    let tcp = match listen.tcp {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(bind("control tcp", addr.to_string()))?;
            bound.tcp = l.local_addr().ok();
            Some(l)
        }
        None => None,
    };
    let data = match listen
        .data
        .or_else(|| listen.tcp.map(|a| SocketAddr::new(a.ip(), 0)))
    {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(bind("data tcp", addr.to_string()))?;
            bound.data = l.local_addr().ok();
            Some(l)
        }
        None => None,
    };
    let metrics_listener = match listen.metrics {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(bind("metrics", addr.to_string()))?;
            bound.metrics = l.local_addr().ok();
            Some(l)
        }
        None => None,
    };
    let verbs = match listen.verbs {
        Some(addr) => {
            let options = VerbsOptions::from_env();
            let device = VerbsDevice::open(&options).map_err(ServeError::Verbs)?;
            let region = RcRegion::register(&device, store.region()).map_err(ServeError::Verbs)?;
            let l = TcpListener::bind(addr)
                .await
                .map_err(bind("verbs handshake", addr.to_string()))?;
            bound.verbs = l.local_addr().ok();
            tracing::info!(device = device.name(), "RDMA: region registered");
            Some((l, region, options))
        }
        None => None,
    };
    let mut store = store;
    store.set_data_port(bound.data.map_or(0, |a| a.port()));
    store.set_verbs_port(bound.verbs.map_or(0, |a| a.port()));
    let timer = Rc::new(Notify::new());
    let shared = Rc::new(RefCell::new(Shared {
        store,
        conns: HashMap::new(),
        pending: HashMap::new(),
        io: IoCounters::default(),
        timer: Rc::clone(&timer),
    }));
    // Poll the shutdown future once before announcing readiness: one that installs a signal
    // handler on its first poll (the CLI's SIGTERM/SIGINT) then has it in place, so a signal
    // sent as soon as "ready" is seen stops the server cleanly instead of killing it.
    let mut shutdown = std::pin::pin!(shutdown);
    let stop_at_once = tokio::select! {
        biased;
        () = &mut shutdown => true,
        () = std::future::ready(()) => false,
    };
    ready(&bound);
    tracing::info!(?bound, "staging-store serving");

    let mut tasks = tokio::task::JoinSet::new();
    if let Some(l) = unix {
        let shared = Rc::clone(&shared);
        tasks.spawn_local(async move {
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        tokio::task::spawn_local(control_conn(
                            Rc::clone(&shared),
                            Sock::Unix(s),
                            true,
                        ));
                    }
                    Err(e) => tracing::warn!(error = %e, "unix accept"),
                }
            }
        });
    }
    if let Some(l) = tcp {
        let shared = Rc::clone(&shared);
        tasks.spawn_local(async move {
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        let _ = s.set_nodelay(true);
                        tokio::task::spawn_local(control_conn(
                            Rc::clone(&shared),
                            Sock::Tcp(s),
                            false,
                        ));
                    }
                    Err(e) => tracing::warn!(error = %e, "tcp accept"),
                }
            }
        });
    }
    if let Some(l) = data {
        let shared = Rc::clone(&shared);
        tasks.spawn_local(async move {
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        tokio::task::spawn_local(data_conn(Rc::clone(&shared), s));
                    }
                    Err(e) => tracing::warn!(error = %e, "data accept"),
                }
            }
        });
    }
    if let Some((l, region, options)) = verbs {
        let shared = Rc::clone(&shared);
        tasks.spawn_local(async move {
            let (region, options) = (Rc::new(region), Rc::new(options));
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        tokio::task::spawn_local(verbs_conn(
                            Rc::clone(&shared),
                            s,
                            Rc::clone(&region),
                            Rc::clone(&options),
                        ));
                    }
                    Err(e) => tracing::warn!(error = %e, "verbs accept"),
                }
            }
        });
    }
    if let Some(l) = metrics_listener {
        let shared = Rc::clone(&shared);
        tasks.spawn_local(metrics::serve(l, move || {
            shared.borrow().metrics_snapshot()
        }));
    }
    {
        let shared = Rc::clone(&shared);
        tasks.spawn_local(async move {
            loop {
                let deadline = shared.borrow().store.next_deadline(Instant::now());
                match deadline {
                    Some(d) => {
                        tokio::select! {
                            _ = tokio::time::sleep_until(d.into()) => {}
                            _ = timer.notified() => {}
                        }
                    }
                    None => timer.notified().await,
                }
                let mut sh = shared.borrow_mut();
                let mut outs = Vec::new();
                sh.store.expire(Instant::now(), &mut outs);
                sh.send_outs(outs);
            }
        });
    }

    if !stop_at_once {
        shutdown.await;
    }
    tracing::info!("shutting down");
    tasks.shutdown().await;
    // Tell every client, then end every session (references and grants dropped).
    let sessions: Vec<SessionId> = shared.borrow().conns.keys().copied().collect();
    {
        let mut sh = shared.borrow_mut();
        let mut outs = Vec::new();
        for sid in &sessions {
            outs.push(Out::Message(
                *sid,
                ServerMessage::Notice(StoreError::new(
                    ErrorCode::ShuttingDown,
                    "the store is shutting down",
                )),
            ));
        }
        sh.route(outs);
        for sid in sessions {
            let mut outs = Vec::new();
            let conn = sh.conns.remove(&sid);
            drop(conn);
            sh.store.disconnect(sid, Instant::now(), &mut outs);
        }
    }
    // Give writers a moment to flush the notices.
    tokio::task::yield_now().await;
    // Removes the socket if it is still the one this store bound, then frees the path.
    drop(unix_claim);
    let stat = shared.borrow_mut().store.close(Instant::now());
    Ok(stat)
}

async fn control_conn(shared: Rc<RefCell<Shared>>, sock: Sock, local: bool) {
    let sock = Rc::new(sock);
    let (tx, rx) = mpsc::unbounded_channel();
    let sid = {
        let mut sh = shared.borrow_mut();
        sh.io.connections += 1;
        let sid = sh.store.open_session(local);
        sh.conns.insert(
            sid,
            Conn {
                control: tx,
                verbs: None,
                data: None,
                backlog: Vec::new(),
                local,
            },
        );
        sid
    };
    let writer = tokio::task::spawn_local(control_writer(Rc::clone(&sock), rx, Rc::clone(&shared)));
    let mut buf = MessageBuf::new(proto::MAX_REQUEST_BYTES);
    'read: loop {
        let n = match sock.read(buf.spare()).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.filled(n);
        let mut sh = shared.borrow_mut();
        let sh = &mut *sh;
        let now = Instant::now();
        let mut outs = Vec::new();
        loop {
            let request = match buf.next_message() {
                None => break,
                Some(Ok(bytes)) => decode_request(bytes),
                Some(Err(e)) => Err(e),
            };
            match request {
                Ok(request) => {
                    sh.io.requests += 1;
                    sh.store
                        .handle(sid, request, now, SystemTime::now(), &mut outs);
                }
                Err(e) => {
                    sh.io.protocol_errors += 1;
                    tracing::warn!(session = sid, error = %e, "closing a connection that broke the protocol");
                    outs.push(Out::Message(
                        sid,
                        ServerMessage::Notice(StoreError::new(ErrorCode::Protocol, e.to_string())),
                    ));
                    sh.route(outs);
                    break 'read;
                }
            }
        }
        sh.route(outs);
    }
    {
        let mut sh = shared.borrow_mut();
        let mut outs = Vec::new();
        // First the connection: dropping the sender ends the writer once it has sent what is
        // queued, and dropping a verbs client's queue pair stops its RDMA before the grants it
        // was writing are freed.
        let conn = sh.conns.remove(&sid);
        drop(conn);
        sh.store.disconnect(sid, Instant::now(), &mut outs);
        sh.pending.remove(&sid);
        sh.route(outs);
    }
    let _ = writer.await;
    sock.shutdown();
}

async fn control_writer(
    sock: Rc<Sock>,
    mut rx: mpsc::UnboundedReceiver<WriteItem>,
    shared: Rc<RefCell<Shared>>,
) {
    let mut batch = Vec::new();
    while let Some(item) = rx.recv().await {
        let result = match item {
            WriteItem::Bytes(bytes) => {
                batch.clear();
                batch.extend_from_slice(&bytes);
                while let Ok(WriteItem::Bytes(more)) = rx.try_recv() {
                    batch.extend_from_slice(&more);
                }
                sock.write_all(&batch).await
            }
            WriteItem::WithRegionFd(bytes) => match &*sock {
                Sock::Unix(s) => {
                    let fd = {
                        let sh = shared.borrow();
                        sh.store.region().fd().try_clone_to_owned()
                    };
                    match fd {
                        Ok(fd) => {
                            use std::os::fd::AsFd;
                            capnp_rdma::fdpass::send_with_fds(s, &bytes, &[fd.as_fd()]).await
                        }
                        Err(e) => Err(e),
                    }
                }
                Sock::Tcp(_) => sock.write_all(&bytes).await,
            },
        };
        if result.is_err() {
            sock.shutdown();
            return;
        }
    }
}

/// How long a data or RDMA-handshake connection may take to show its ATTACH header.
const ATTACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The ATTACH header a data or RDMA-handshake connection starts with, if it arrives whole and
/// well-formed within [`ATTACH_TIMEOUT`] (a connection that sends nothing does not hold a
/// task forever).
async fn read_attach(from: &mut (impl AsyncReadExt + Unpin)) -> Option<Attach> {
    let mut header = [0u8; data::ATTACH_LEN];
    match tokio::time::timeout(ATTACH_TIMEOUT, from.read_exact(&mut header)).await {
        Ok(Ok(_)) => Attach::decode(&header).ok(),
        _ => None,
    }
}

/// A verbs client's RDMA handshake: ATTACH (its session and token), then the RC handshake
/// over the same socket, which stays open as the connection's liveness signal. The queue
/// pair is kept with the session's connection and goes with it.
async fn verbs_conn(
    shared: Rc<RefCell<Shared>>,
    mut stream: TcpStream,
    region: Rc<RcRegion>,
    options: Rc<VerbsOptions>,
) {
    let _ = stream.set_nodelay(true);
    let Some(attach) = read_attach(&mut stream).await else {
        return;
    };
    let sid = attach.session;
    {
        let sh = shared.borrow();
        let attached = sh.conns.get(&sid).is_some_and(|c| c.verbs.is_some());
        if attached || !sh.store.check_token(sid, attach.token, Transport::Verbs) {
            return;
        }
    }
    let handshake = RcConnection::handshake(stream, &region, &options);
    let connection = match tokio::time::timeout(ATTACH_TIMEOUT * 3, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::warn!(session = sid, error = %e, "RDMA handshake failed");
            return;
        }
        Err(_) => {
            tracing::warn!(session = sid, "RDMA handshake timed out");
            return;
        }
    };
    let mut sh = shared.borrow_mut();
    // The session may have ended (or attached another queue pair) meanwhile: then this one
    // is dropped here.
    if let Some(conn) = sh.conns.get_mut(&sid) {
        if conn.verbs.is_none() {
            conn.verbs = Some(connection);
            sh.io.verbs_connections += 1;
        }
    }
}

/// A tcp client's data connection: PUTs in, DELIVERs out.
async fn data_conn(shared: Rc<RefCell<Shared>>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    let Some(attach) = read_attach(&mut rd).await else {
        return;
    };
    let sid = attach.session;
    let (tx, rx) = mpsc::unbounded_channel();
    {
        let mut sh = shared.borrow_mut();
        if !sh.store.check_token(sid, attach.token, Transport::Tcp) {
            return;
        }
        let Some(conn) = sh.conns.get_mut(&sid) else {
            return;
        };
        if conn.data.is_some() {
            return;
        }
        for item in conn.backlog.drain(..) {
            let _ = tx.send(item);
        }
        conn.data = Some(tx);
    }
    let writer = tokio::task::spawn_local(data_writer(wr, rx, Rc::clone(&shared)));
    let why = data_reader(&shared, sid, &mut rd).await;
    {
        let mut sh = shared.borrow_mut();
        let mut outs = Vec::new();
        sh.store.data_failed(sid, &why, &mut outs);
        if let Some(conn) = sh.conns.get_mut(&sid) {
            conn.data = None;
        }
        sh.route(outs);
    }
    writer.abort();
}

async fn data_reader(
    shared: &Rc<RefCell<Shared>>,
    sid: SessionId,
    rd: &mut tokio::net::tcp::OwnedReadHalf,
) -> String {
    let mut header = [0u8; data::PUT_LEN];
    let mut scratch = vec![0u8; 1 << 16];
    loop {
        if let Err(e) = rd.read_exact(&mut header).await {
            return e.to_string();
        }
        let put = match Put::decode(&header) {
            Ok(p) => p,
            Err(e) => return e.to_string(),
        };
        let begun = {
            let mut sh = shared.borrow_mut();
            let region_bytes = sh.store.region().len();
            if put.len > region_bytes {
                return format!("a PUT of {} bytes is larger than the region", put.len);
            }
            let r = sh.store.begin_put(sid, put.object, put.at, put.len);
            if let Err(e) = &r {
                sh.io.data_rejected += 1;
                sh.route(vec![Out::Message(sid, ServerMessage::Notice(e.clone()))]);
            }
            r
        };
        match begun {
            Ok((offset, lease)) => {
                // SAFETY: `begin_put` checked `offset..offset + len` lies in this session's
                // unsealed grant, whose blocks `lease` keeps allocated while we write; the
                // store reads no grant byte before `end_put` (a seal waits for it) and gives
                // grants to no one else, so this is the only access. The pointer comes from
                // the region's writable shared mapping.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        lease.region().as_ptr().cast_mut().add(offset as usize),
                        put.len as usize,
                    )
                };
                let result = data::read_body(rd, dst).await;
                drop(lease);
                let mut sh = shared.borrow_mut();
                let mut outs = Vec::new();
                let landed = result.is_ok().then_some(put.at + put.len);
                if landed.is_some() {
                    sh.io.data_bytes_in += put.len;
                }
                sh.store
                    .end_put(sid, put.object, landed, SystemTime::now(), &mut outs);
                sh.route(outs);
                if let Err(e) = result {
                    return e.to_string();
                }
            }
            Err(_) => {
                // Keep the connection in step: read and discard the refused bytes.
                let mut left = put.len;
                while left > 0 {
                    let n = left.min(scratch.len() as u64) as usize;
                    if let Err(e) = rd.read_exact(&mut scratch[..n]).await {
                        return e.to_string();
                    }
                    left -= n as u64;
                }
            }
        }
    }
}

async fn data_writer(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<(proto::Delivery, Arc<BlockLease>)>,
    shared: Rc<RefCell<Shared>>,
) {
    while let Some((delivery, lease)) = rx.recv().await {
        let header = data::encode_deliver(&delivery);
        // SAFETY: the frame is sealed: nobody writes its bytes any more, and `lease` keeps its
        // blocks allocated until they are sent.
        let bytes = match unsafe { lease.region().bytes(delivery.offset, delivery.len) } {
            Ok(b) => b,
            Err(_) => return,
        };
        if data::write_with_header(&mut wr, &header, bytes)
            .await
            .is_err()
        {
            return;
        }
        shared.borrow_mut().io.data_bytes_out += delivery.len;
        drop(lease);
    }
}
