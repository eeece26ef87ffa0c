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
//!
//! # Layout
//!
//! ```text
//!  addr.rs          connect.rs                                  mod.rs
//!  parse the    ──▶ hello ─▶ welcome ─▶ map the memfd (shm)  ──▶ Client: its clones share one
//!  address          (one per transport)  data connection (tcp)    Inner (waiters, subscriptions,
//!                                        register + RC (verbs)    buffers, the RDMA side)
//!
//!  calls.rs         create / seal / put / get / release … ─▶ writer task ───────▶ store
//!  grant_write.rs   a grant's bytes: in place, PUT on the data connection, RDMA WRITE
//!  routing.rs       answers, deliveries, ends, notices ◀─ control reader task ◀─ store
//!  tcp.rs           frame bytes of subscriptions, gets ◀─ data reader task ◀──── store
//!  verbs.rs         RDMA WRITE into grants, RDMA READ of deliveries (own staging region)
//!  subscription.rs  Subscription::next ─▶ frame_ref.rs: FrameRef (bytes, read, release)
//! ```

mod addr;
mod calls;
mod connect;
mod frame_ref;
mod grant_write;
mod routing;
mod subscription;
mod tcp;
mod verbs;

pub use frame_ref::FrameRef;
pub use subscription::Subscription;

use crate::proto::{Delivery, Reply, StoreError, Transport, Welcome};
use capnp_rdma::reader::ReadError;
use capnp_rdma::transport::TransportError;
use capnp_rdma::Region;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use tcp::GotBytes;
use tokio::sync::{mpsc, oneshot};
use verbs::Verbs;

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
    /// A request the store would refuse as malformed, not sent.
    #[error("{what} of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// What.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// RDMA (verbs clients): no device, the handshake, or an RDMA WRITE/READ failed.
    #[error("RDMA: {0}")]
    Rdma(#[from] TransportError),
}

impl ClientError {
    /// True when this is the end of a stream: a subscription delivered every frame of a
    /// stream its producer ended (or a create on an ended stream).
    pub fn is_end_of_stream(&self) -> bool {
        matches!(self, Self::Store(e) if e.code == crate::proto::ErrorCode::EndOfStream)
    }
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> ClientError {
    move |source| ClientError::Io { what, source }
}

type Waiter = oneshot::Sender<Result<Reply, StoreError>>;

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

impl Client {
    /// How this client moves bytes.
    pub fn transport(&self) -> Transport {
        self.inner.transport
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
}
