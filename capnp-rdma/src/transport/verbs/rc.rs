//! One-sided RDMA between two registered regions over a reliable connection (RC): the building
//! block for a store that lets clients move frame bytes in and out of its region without its CPU
//! touching them.
//!
//! ```text
//!  producer / consumer                                        store
//!  RcRegion (one MR: local write, remote write, remote read)  RcRegion (the same, registered once)
//!  RC QP ── INIT ── RTR ── RTS                                 RC QP ── INIT ── RTR ── RTS
//!        ◀── TCP: qpn, psn, gid, read depth, region (id, rkey, base, data area) ──▶
//!        ◀──────────────────────────── ready ──────────────────────────────────▶
//!  write(&[(offset, len); n], remote_offset):
//!    ONE ibv_post_send: RDMA WRITE, num_sge = n ≤ max_send_sge ──▶ store region[remote_offset..]
//!  read(remote_offset, len, local_offset):
//!    ONE ibv_post_send: RDMA READ ◀── store region[remote_offset..]
//!  completions: hybrid CQ polling (spin, arm, re-poll, sleep on the channel fd), shared
//!  by every task with an operation in flight       the store's CPU sees no completion at all
//! ```
//!
//! Each side of an [`RcConnection`] may write into and read from the other side's region, so the
//! same type serves both ends; a store typically only accepts connections (with an
//! [`RcListener`]) and keeps them while its clients move bytes. Ranges are offsets into the
//! regions; every remote range is checked against the data area the peer advertised and every
//! local range against the data area of our own region before anything is posted (a typed error
//! otherwise, and the connection stays usable).
//!
//! # Trust model
//!
//! The registration behind an [`RcRegion`] gives every connected peer remote **write and read
//! access to the whole registered region**, header and allocation tables included: the checks
//! described above protect a well-behaved peer from its own mistakes, but a hostile peer can
//! post work requests of its own with the rkey it was given. That is the same trust a shared
//! memory client gets by mapping the region. Only accept connections from trusted peers (for
//! example on a private network, behind an authenticated control channel).
//!
//! Which bytes a peer may write or read, and when, is the application's protocol (a store grants
//! an offset to a producer and delivers one to a consumer); this module moves bytes and reports
//! when the NIC is done with them.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use capnp_rdma::transport::verbs::rc::{RcConnection, RcListener, RcRegion};
//! use capnp_rdma::transport::verbs::{VerbsDevice, VerbsOptions};
//! use capnp_rdma::{Region, RegionOptions};
//!
//! let options = VerbsOptions::from_env();
//! let device = VerbsDevice::open(&options)?;
//!
//! // The store: its region, registered once, offered to every client.
//! let store = Region::create(&RegionOptions::memfd(1 << 30))?;
//! let store = RcRegion::register(&device, &store)?;
//! let listener = RcListener::bind("0.0.0.0:7000", &store, &options).await?;
//! tokio::spawn(async move {
//!     while let Ok(client) = listener.accept().await {
//!         // Nothing to do per frame: keep the connection until the client leaves.
//!         tokio::spawn(async move { client.closed().await });
//!     }
//! });
//!
//! // A producer: the decoder wrote a 1080p I420 frame as three planes in its own region.
//! let mine = RcRegion::register(&device, &Region::create(&RegionOptions::memfd(64 << 20))?)?;
//! let planes = mine.region().lease(4 << 20)?;
//! let (y, u, v) = (planes.offset(), planes.offset() + 2_073_600, planes.offset() + 2_592_000);
//! let store = RcConnection::connect("store.local:7000", &mine, &options).await?;
//! let granted = store.peer().offset; // an offset the store granted (its control protocol)
//! store
//!     .write(&[(y, 2_073_600), (u, 518_400), (v, 518_400)], granted)
//!     .await?;
//! // A consumer reads a delivered frame into its own region the same way.
//! store.read(granted, 3_110_400, planes.offset()).await?;
//! println!("{:?}", store.poll_stats());
//! # Ok(())
//! # }
//! ```

use super::cq::{HybridCq, Wc, WC_SUCCESS};
use super::device::device_err;
use super::handshake::{answer, dial, peer_gone, swap, ENDPOINT_MAGIC, READY};
use super::qp::{connect_qp_to, create_qp_with, to_error_state, Qp};
use super::{PollStats, RegisteredRegion, VerbsDevice, VerbsOptions};
use crate::region::Region;
use crate::transport::{RemoteRegion, TransportError};
use rdma_mummy_sys::ibv_sge;
use rdma_mummy_sys::ibv_wc_status::{IBV_WC_RETRY_EXC_ERR, IBV_WC_WR_FLUSH_ERR};
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair, SetScatterGatherEntry, WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

/// Largest byte count of one work request (the InfiniBand limit on a message, 2^31).
const MAX_MESSAGE: u64 = 1 << 31;
/// Most RDMA READs a QP serves (or issues) at once, when the device allows more.
const MAX_READ_DEPTH: i32 = 16;

/// A region registered once for one-sided access by RC peers: local write, remote write and
/// remote read over all of it (see the [trust model](self#trust-model)).
///
/// The registration is an ordinary [`RegisteredRegion`] as well
/// ([`registered`](Self::registered)), so the same memory registration also serves
/// [`VerbsWriter`](super::VerbsWriter) and [`VerbsTarget`](super::VerbsTarget).
#[derive(Clone)]
pub struct RcRegion {
    registered: Arc<RegisteredRegion>,
}

impl std::fmt::Debug for RcRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RcRegion")
            .field("registered", &self.registered)
            .finish()
    }
}

impl RcRegion {
    /// Registers the whole of `region` with `device`, for local write, remote write and remote
    /// read. Registration pins the memory: see [`VerbsDevice::register`] about `RLIMIT_MEMLOCK`.
    pub fn register(device: &VerbsDevice, region: &Region) -> Result<Self, TransportError> {
        let access = AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead;
        let registered = device.register_with(region, access)?;
        Ok(Self {
            registered: Arc::new(registered),
        })
    }

    /// The registration (usable by the two-sided verbs transport too).
    pub fn registered(&self) -> &Arc<RegisteredRegion> {
        &self.registered
    }

    /// The region.
    pub fn region(&self) -> &Region {
        self.registered.region()
    }

    /// What a peer learns about this region: its data area, as offsets from its base address.
    fn advertised(&self) -> RemoteRegion {
        let region = self.region();
        let data_offset = region.geometry().data_offset;
        RemoteRegion {
            region_id: region.id(),
            rkey: self.registered.rkey(),
            base: region.as_ptr() as u64,
            offset: data_offset,
            len: region.len() - data_offset,
        }
    }
}

/// What each side of an RC connection tells the other over TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RcEndpoint {
    qpn: u32,
    psn: u32,
    gid: [u8; 16],
    /// RDMA READs this side serves at once (its `max_dest_rd_atomic`); 0 = none.
    read_depth: u32,
    /// The data area of this side's registered region.
    region: RemoteRegion,
}

/// Not the two-sided endpoint's `CRDV`: the two handshakes cannot be mistaken for each other.
const RC_MAGIC: u32 = u32::from_le_bytes(*b"CRRC");
const RC_VERSION: u32 = 1;
const RC_ENDPOINT_LEN: usize = 72;

/// Reads little-endian fields off the front of a byte slice, bounds-checked.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], TransportError> {
        let (head, rest) = self
            .0
            .split_at_checked(N)
            .ok_or_else(|| TransportError::Protocol("short RC endpoint".into()))?;
        self.0 = rest;
        let mut out = [0u8; N];
        out.copy_from_slice(head);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, TransportError> {
        self.take().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, TransportError> {
        self.take().map(u64::from_le_bytes)
    }
}

impl RcEndpoint {
    fn encode(&self) -> [u8; RC_ENDPOINT_LEN] {
        let r = &self.region;
        let fields: [&[u8]; 11] = [
            &RC_MAGIC.to_le_bytes(),
            &RC_VERSION.to_le_bytes(),
            &self.qpn.to_le_bytes(),
            &self.psn.to_le_bytes(),
            &self.gid,
            &r.region_id.to_le_bytes(),
            &r.rkey.to_le_bytes(),
            &self.read_depth.to_le_bytes(),
            &r.base.to_le_bytes(),
            &r.offset.to_le_bytes(),
            &r.len.to_le_bytes(),
        ];
        let mut out = [0u8; RC_ENDPOINT_LEN];
        let mut at = 0;
        for field in fields {
            out[at..at + field.len()].copy_from_slice(field);
            at += field.len();
        }
        debug_assert_eq!(at, RC_ENDPOINT_LEN);
        out
    }

    /// Decodes the first [`RC_ENDPOINT_LEN`] bytes of `bytes`; anything malformed is a
    /// [`TransportError::Protocol`].
    fn decode(bytes: &[u8]) -> Result<Self, TransportError> {
        let mut f = Fields(bytes);
        let (magic, version) = (f.u32()?, f.u32()?);
        if magic == ENDPOINT_MAGIC {
            return Err(TransportError::Protocol(
                "the peer speaks the two-sided verbs handshake, not RC".into(),
            ));
        }
        if magic != RC_MAGIC || version != RC_VERSION {
            return Err(TransportError::Protocol(
                "not a capnp-rdma RC peer (or another version)".into(),
            ));
        }
        let (qpn, psn, gid) = (f.u32()?, f.u32()?, f.take::<16>()?);
        let (region_id, rkey, read_depth) = (f.u64()?, f.u32()?, f.u32()?);
        let (base, offset, len) = (f.u64()?, f.u64()?, f.u64()?);
        let bad = |what: &str| Err(TransportError::Protocol(format!("bad RC endpoint: {what}")));
        if qpn > 0x00ff_ffff || psn > 0x00ff_ffff {
            return bad("QPN or PSN wider than 24 bits");
        }
        if read_depth > u32::from(u8::MAX) {
            return bad("read depth above 255");
        }
        // Every remote address is formed as base + offset: none of them may overflow.
        if offset
            .checked_add(len)
            .and_then(|end| base.checked_add(end))
            .is_none()
        {
            return bad("region range overflows");
        }
        Ok(Self {
            qpn,
            psn,
            gid,
            read_depth,
            region: RemoteRegion {
                region_id,
                rkey,
                base,
                offset,
                len,
            },
        })
    }
}

/// Decodes an RC endpoint from arbitrary bytes (fuzzing): never panics, and whatever decodes
/// re-encodes to itself with a range whose addresses cannot overflow.
pub(crate) fn fuzz_decode_rc_endpoint(data: &[u8]) {
    if let Ok(e) = RcEndpoint::decode(data) {
        let r = e.region;
        assert!(r.base.checked_add(r.offset + r.len).is_some());
        assert_eq!(RcEndpoint::decode(&e.encode()).ok(), Some(e));
    }
}

/// Completion statuses by work-request id, for the operations a task is waiting for.
type Slots = Mutex<HashMap<u64, Option<u32>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A task's claim on one work request's completion; dropping it (also by cancelling the
/// operation's future) forgets the id, so a late completion is discarded.
struct Waiter<'a> {
    slots: &'a Slots,
    id: u64,
}

impl<'a> Waiter<'a> {
    fn new(slots: &'a Slots, id: u64) -> Self {
        lock(slots).insert(id, None);
        Self { slots, id }
    }

    fn status(&self) -> Option<u32> {
        lock(self.slots).get(&self.id).copied().flatten()
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        lock(self.slots).remove(&self.id);
    }
}

fn status_result(status: u32) -> Result<(), TransportError> {
    match status {
        WC_SUCCESS => Ok(()),
        IBV_WC_WR_FLUSH_ERR | IBV_WC_RETRY_EXC_ERR => Err(TransportError::Disconnected),
        s => Err(TransportError::Device(format!(
            "work completion status {s}"
        ))),
    }
}

#[derive(Clone, Copy)]
enum Op {
    Write,
    Read,
}

/// An RC queue pair connected to one peer, for RDMA WRITE and READ between the two registered
/// regions. Operations take `&self`: several tasks may have operations in flight at once (up to
/// [`VerbsOptions::window`]; further ones wait for a slot), and whichever of them polls the
/// completion queue hands every completion to the task that waits for it.
pub struct RcConnection {
    // Drop order: the QP first (no more DMA into or out of the region), then its CQ, then the
    // registration (and with it the region's mapping).
    qp: Mutex<BasicQueuePair>,
    cq: tokio::sync::Mutex<HybridCq>,
    slots: Slots,
    /// Free send-queue slots; a permit comes back when its completion is polled.
    free: Semaphore,
    next_id: AtomicU64,
    stats: Mutex<PollStats>,
    /// Becomes true when the peer closes the set-up socket (watched by `watcher`, which owns
    /// the socket; aborting it closes the socket).
    gone: watch::Receiver<bool>,
    watcher: JoinHandle<()>,
    /// The QP was moved to the error state (the peer is gone).
    failed: AtomicBool,
    max_sge: usize,
    /// RDMA READs this side may have outstanding (0: the peer serves none).
    read_depth: u8,
    peer: RemoteRegion,
    local: RcRegion,
}

impl std::fmt::Debug for RcConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RcConnection")
            .field("local", &self.local)
            .field("peer", &self.peer)
            .field("max_sge", &self.max_sge)
            .finish()
    }
}

/// Accepts [`RcConnection`]s to one registered region (the store's side).
pub struct RcListener {
    listener: TcpListener,
    region: RcRegion,
    options: VerbsOptions,
}

impl std::fmt::Debug for RcListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RcListener")
            .field("addr", &self.listener.local_addr().ok())
            .field("region", &self.region)
            .finish()
    }
}

impl RcListener {
    /// Listens on `addr` and offers `region` to every peer that connects.
    pub async fn bind(
        addr: impl ToSocketAddrs,
        region: &RcRegion,
        options: &VerbsOptions,
    ) -> Result<Self, TransportError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(TransportError::io("bind"))?;
        Ok(Self::from_listener(listener, region, options))
    }

    /// Offers `region` to every peer that connects on `listener`.
    pub fn from_listener(listener: TcpListener, region: &RcRegion, options: &VerbsOptions) -> Self {
        Self {
            listener,
            region: region.clone(),
            options: options.clone(),
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.listener
            .local_addr()
            .map_err(TransportError::io("local_addr"))
    }

    /// Accepts the next peer and sets its connection up. The handshake runs inside: a server
    /// that must not wait for a slow peer accepts the socket itself and runs
    /// [`RcConnection::handshake`] in a task of its own.
    pub async fn accept(&self) -> Result<RcConnection, TransportError> {
        let stream = answer(&self.listener).await?;
        RcConnection::handshake(stream, &self.region, &self.options).await
    }
}

impl RcConnection {
    /// Connects to an [`RcListener`] at `addr`, offering `region` to the peer.
    pub async fn connect(
        addr: impl ToSocketAddrs,
        region: &RcRegion,
        options: &VerbsOptions,
    ) -> Result<Self, TransportError> {
        Self::handshake(dial(addr).await?, region, options).await
    }

    /// Sets a connection up over an established TCP `stream` (either end; the peer runs the
    /// same handshake): creates the QP, exchanges QPN, PSN, GID, read depth and region with the
    /// peer, moves the QP to RTS and waits until the peer's is there too.
    pub async fn handshake(
        mut stream: TcpStream,
        region: &RcRegion,
        options: &VerbsOptions,
    ) -> Result<Self, TransportError> {
        let dev = region.registered.device().clone();
        let attr = dev
            .inner
            .ctx
            .query_device()
            .map_err(|e| device_err("query device", e))?;
        let depth = |max: i32| max.clamp(0, MAX_READ_DEPTH) as u8;
        let serves = depth(attr.max_qp_rd_atom());
        let window = options.window.max(1);
        let access = AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead;
        let mut qp = create_qp_with(&dev, window, 1, options.max_spin, access)?;
        let mine = RcEndpoint {
            qpn: qp.qp.qp_number(),
            psn: qp.psn,
            gid: dev.inner.gid.raw,
            read_depth: u32::from(serves),
            region: region.advertised(),
        };
        let peer = RcEndpoint::decode(&swap(&mut stream, &mine.encode()).await?)?;
        let issues = depth(attr.max_qp_init_rd_atom()).min(peer.read_depth as u8);
        connect_qp_to(
            &dev,
            &mut qp,
            (peer.qpn, peer.psn, peer.gid),
            (serves, issues),
        )?;
        // Neither side posts before both QPs are ready to receive.
        if swap(&mut stream, &[READY]).await? != [READY] {
            return Err(TransportError::Protocol("peer did not confirm".into()));
        }
        let Qp { qp, cq, psn: _ } = qp;
        // The socket stays open for the connection's life: its closing is how each side learns
        // that the other is gone (a vanished peer's QP does not reliably make our work
        // requests fail).
        let (tell, gone) = watch::channel(false);
        let watcher = tokio::spawn(async move {
            peer_gone(&mut stream).await;
            let _ = tell.send(true);
        });
        Ok(Self {
            qp: Mutex::new(qp),
            stats: Mutex::new(cq.stats()),
            cq: tokio::sync::Mutex::new(cq),
            slots: Mutex::new(HashMap::new()),
            free: Semaphore::new(window as usize),
            next_id: AtomicU64::new(1),
            gone,
            watcher,
            failed: AtomicBool::new(false),
            max_sge: dev.max_send_sge() as usize,
            read_depth: issues,
            peer: peer.region,
            local: region.clone(),
        })
    }

    /// The peer's region as it advertised it: id, rkey, base address, and its data area
    /// (`offset`, `len`), which every remote range must lie in.
    pub fn peer(&self) -> RemoteRegion {
        self.peer
    }

    /// Our registered region.
    pub fn region(&self) -> &RcRegion {
        &self.local
    }

    /// Most `(offset, len)` entries one [`write`](Self::write) takes (the device's
    /// `max_send_sge`).
    pub fn max_sge(&self) -> usize {
        self.max_sge
    }

    /// Polling counters of the connection's CQ, as of the last batch of completions polled.
    /// Only operations this side posts complete here: a peer that only serves RDMA sees none.
    pub fn poll_stats(&self) -> PollStats {
        *lock(&self.stats)
    }

    /// Resolves when the peer closes the set-up socket (it went away), or the socket fails.
    pub async fn closed(&self) {
        // An error means the watcher is gone, which happens only when the connection drops.
        let _ = self.gone.clone().wait_for(|gone| *gone).await;
    }

    /// Moves the QP to the error state once the peer is gone, so that everything posted
    /// completes (flushed) instead of waiting for a peer that will not answer.
    fn fail(&self) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            to_error_state(&mut lock(&self.qp));
        }
    }

    /// Writes the concatenation of `local` — `(offset, len)` ranges of our region, at most
    /// [`max_sge`](Self::max_sge) of them — to the peer's region at `remote_offset`, as ONE RDMA
    /// WRITE with a scatter-gather list, and waits for its completion: then every byte is in
    /// the peer's memory (RC acknowledges a write only once it has been placed).
    ///
    /// Refused before anything is posted: more entries than `max_sge`
    /// ([`TransportError::TooManyEntries`]), a local range outside our data area
    /// ([`TransportError::ForeignPayload`]), a remote range outside the peer's
    /// ([`TransportError::OutOfRange`]), more than 2 GiB ([`TransportError::Device`]). A work
    /// completion with an error status is a [`TransportError::Device`] (the QP is then in the
    /// error state, and later operations fail with [`TransportError::Disconnected`]).
    ///
    /// If the future is dropped before it completes, the write may still happen.
    pub async fn write(
        &self,
        local: &[(u64, u64)],
        remote_offset: u64,
    ) -> Result<(), TransportError> {
        if local.len() > self.max_sge {
            return Err(TransportError::TooManyEntries {
                entries: local.len(),
                max: self.max_sge,
            });
        }
        let sges = local
            .iter()
            .filter(|&&(_, len)| len > 0)
            .map(|&(offset, len)| self.local_sge(offset, len))
            .collect::<Result<Vec<_>, _>>()?;
        let total = sges.iter().map(|sge| u64::from(sge.length)).sum();
        self.run(Op::Write, remote_offset, total, &sges).await
    }

    /// Reads `len` bytes of the peer's region at `remote_offset` into our region at
    /// `local_offset` with ONE RDMA READ, and waits until they are there.
    ///
    /// Refused before anything is posted: a local range outside our data area
    /// ([`TransportError::ForeignPayload`]), a remote range outside the peer's
    /// ([`TransportError::OutOfRange`]), more than 2 GiB ([`TransportError::Device`]), a peer
    /// whose device serves no RDMA READ ([`TransportError::Rejected`]). Completion errors as
    /// for [`write`](Self::write).
    ///
    /// If the future is dropped before it completes, the bytes may still land.
    pub async fn read(
        &self,
        remote_offset: u64,
        len: u64,
        local_offset: u64,
    ) -> Result<(), TransportError> {
        if self.read_depth == 0 {
            return Err(TransportError::Rejected(
                "the peer's device serves no RDMA READ".into(),
            ));
        }
        let sges = match len {
            0 => Vec::new(),
            _ => vec![self.local_sge(local_offset, len)?],
        };
        self.run(Op::Read, remote_offset, len, &sges).await
    }

    /// The scatter-gather entry for `len` bytes at `offset` of our region, checked.
    fn local_sge(&self, offset: u64, len: u64) -> Result<ibv_sge, TransportError> {
        let region = self.local.region();
        region
            .check_range(offset, len)
            .map_err(|_| TransportError::ForeignPayload("local range outside the data area"))?;
        let length = u32::try_from(len).map_err(|_| too_long(len))?;
        Ok(ibv_sge {
            addr: region.as_ptr() as u64 + offset,
            length,
            lkey: self.local.registered.mr.lkey(),
        })
    }

    /// Checks the remote range, posts one signaled work request and waits for its completion.
    async fn run(
        &self,
        op: Op,
        remote_offset: u64,
        total: u64,
        sges: &[ibv_sge],
    ) -> Result<(), TransportError> {
        if total > MAX_MESSAGE {
            return Err(too_long(total));
        }
        self.peer.check(remote_offset, total)?;
        if total == 0 {
            return Ok(());
        }
        if *self.gone.borrow() || self.failed.load(Ordering::Acquire) {
            return Err(TransportError::Disconnected);
        }
        // A send-queue slot, given back when the completion is polled (by whichever task polls
        // it), so a cancelled operation keeps its slot until the NIC is done with it.
        self.free
            .acquire()
            .await
            .map_err(|_| TransportError::Disconnected)?
            .forget();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let waiter = Waiter::new(&self.slots, id);
        let posted = {
            let mut qp = lock(&self.qp);
            let mut guard = qp.start_post_send();
            let wr = guard.construct_wr(id, WorkRequestFlags::Signaled);
            // `check` above keeps remote_offset + total inside the advertised range, and decode
            // made sure base + offset + len cannot overflow.
            let remote_addr = self.peer.base + remote_offset;
            let buffer = match op {
                Op::Write => wr.setup_write(self.peer.rkey, remote_addr),
                Op::Read => wr.setup_read(self.peer.rkey, remote_addr),
            };
            // SAFETY: every sge lies in the data area of our registered region (`local_sge`
            // checked it) under this MR's lkey; the memory stays mapped and registered until the
            // QP is gone (the connection holds the registration and drops the QP first), so the
            // NIC never touches unregistered memory, even if this future is dropped. The sges
            // add up to `total`, which `check` kept inside the peer's advertised data area.
            unsafe { buffer.setup_sge_list(sges) };
            guard.post()
        };
        if let Err(e) = posted {
            self.free.add_permits(1);
            return Err(device_err("ibv_post_send", e));
        }
        self.complete(&waiter).await
    }

    /// Waits until `waiter`'s completion has been polled, polling the CQ while no other task
    /// does and handing the completions it finds to their waiters.
    async fn complete(&self, waiter: &Waiter<'_>) -> Result<(), TransportError> {
        let mut wcs: Vec<Wc> = Vec::new();
        loop {
            if let Some(status) = waiter.status() {
                return status_result(status);
            }
            // Queued behind the task that polls; it may deliver ours meanwhile.
            let mut cq = self.cq.lock().await;
            if let Some(status) = waiter.status() {
                return status_result(status);
            }
            wcs.clear();
            let mut gone = self.gone.clone();
            if self.failed.load(Ordering::Acquire) {
                // Flushed completions come without delay.
                cq.wait(&mut wcs).await?;
            } else {
                tokio::select! {
                    r = cq.wait(&mut wcs) => r.map(drop)?,
                    _ = gone.wait_for(|gone| *gone) => {
                        self.fail();
                        continue;
                    }
                }
            }
            *lock(&self.stats) = cq.stats();
            let mut slots = lock(&self.slots);
            for wc in &wcs {
                self.free.add_permits(1);
                if let Some(slot) = slots.get_mut(&wc.wr_id) {
                    *slot = Some(wc.status);
                }
            }
        }
    }
}

impl Drop for RcConnection {
    fn drop(&mut self) {
        // Closes the set-up socket (the peer learns we are gone) once the task is cancelled.
        self.watcher.abort();
    }
}

fn too_long(len: u64) -> TransportError {
    TransportError::Device(format!(
        "{len} bytes in one work request: at most {MAX_MESSAGE}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> RcEndpoint {
        RcEndpoint {
            qpn: 0x12_3456,
            psn: 0xab_cdef,
            gid: [7; 16],
            read_depth: 16,
            region: RemoteRegion {
                region_id: 99,
                rkey: 0xdead_beef,
                base: 0x7f00_0000_0000,
                offset: 1 << 20,
                len: 1 << 30,
            },
        }
    }

    #[test]
    fn endpoint_round_trips() {
        let e = endpoint();
        assert_eq!(RcEndpoint::decode(&e.encode()).unwrap(), e);
        fuzz_decode_rc_endpoint(&e.encode());
    }

    #[test]
    fn hostile_endpoints_are_protocol_errors() {
        let e = endpoint();
        let mut bad = Vec::new();
        // Truncated at every length.
        for n in 0..RC_ENDPOINT_LEN {
            bad.push(e.encode()[..n].to_vec());
        }
        // The two-sided endpoint's magic, another version.
        let mut b = e.encode();
        b[0..4].copy_from_slice(&ENDPOINT_MAGIC.to_le_bytes());
        bad.push(b.to_vec());
        let mut b = e.encode();
        b[4] = 2;
        bad.push(b.to_vec());
        for wrong in [
            RcEndpoint { qpn: 1 << 24, ..e },
            RcEndpoint { psn: 1 << 24, ..e },
            RcEndpoint {
                read_depth: 256,
                ..e
            },
            RcEndpoint {
                region: RemoteRegion {
                    offset: u64::MAX - 10,
                    ..e.region
                },
                ..e
            },
            RcEndpoint {
                region: RemoteRegion {
                    base: u64::MAX - (1 << 20),
                    ..e.region
                },
                ..e
            },
        ] {
            bad.push(wrong.encode().to_vec());
        }
        for b in &bad {
            assert!(
                matches!(RcEndpoint::decode(b), Err(TransportError::Protocol(_))),
                "{b:?}"
            );
            fuzz_decode_rc_endpoint(b);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic byte stream (the fuzz target explores further).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut data = RcEndpoint::encode(&endpoint()).to_vec();
        for round in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x as usize) % data.len();
            data[at] ^= (x >> 32) as u8;
            if round % 1000 == 0 {
                data = RcEndpoint::encode(&endpoint()).to_vec();
            }
            fuzz_decode_rc_endpoint(&data);
            fuzz_decode_rc_endpoint(&data[..(x as usize >> 40) % (data.len() + 1)]);
        }
    }
}
