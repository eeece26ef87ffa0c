//! The verbs backend: real RDMA (RoCE, InfiniBand, or Soft-RoCE), through `sideway`.
//!
//! ```text
//!  writer                                                   target
//!  RegisteredRegion (one MR for the whole region)           RegisteredRegion, BlockLease = grant
//!  RC QP ── INIT ── RTR ── RTS                              RC QP ── INIT ── RTR ── RTS
//!          ◀──── TCP: qpn, psn, gid ↔ qpn, psn, gid, rkey, base, grant, window ────▶
//!                                                           pre-posted receives (window)
//!  post_write: ONE ibv_post_send:
//!    [WRITE (≤ max_sge sges)] → … → [WRITE_WITH_IMM (≤ max_sge sges), signaled]
//!  completions: hybrid CQ polling (cq.rs)                   incoming: hybrid CQ polling,
//!                                                           receives replenished
//! ```
//!
//! A message whose entries fit the device's `max_send_sge` goes out as a single
//! `IBV_WR_RDMA_WRITE_WITH_IMM` work request with `num_sge = n`; a longer one as a chain of
//! unsignaled RDMA WRITEs ending in the immediate-carrying one, all in one `ibv_post_send`.
//! RC delivers in order, so the target's receive completion (with the immediate) means every
//! byte of the message is in place.
//!
//! The TCP socket used for the set-up stays open: it is how each side learns that the other is
//! gone. When the target goes away the writer moves its QP to the error state, so every posted
//! work request completes (flushed) before its payload is handed back — a payload is never
//! released while the NIC may still read it.
//!
//! [`Incoming::at`](super::Incoming) is `None` here: an RDMA WRITE with immediate tells the target
//! the immediate, not the address; the immediate names the slot in the application's protocol.

mod cq;
pub mod rc;

pub use cq::PollStats;

use super::{
    check_post, Completion, Incoming, Payload, RemoteRegion, SendError, Target, TransportError,
    Writer,
};
use crate::framing::OutboundMessage;
use crate::region::{BlockLease, Region};
use cq::{HybridCq, Wc, WC_RECV_RDMA_WITH_IMM, WC_SUCCESS};
use rdma_mummy_sys::ibv_sge;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::CompletionChannel;
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, Mtu};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair, QueuePairAttribute, QueuePairState,
    SetScatterGatherEntry, WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};

/// How to pick and use an RDMA device.
#[derive(Clone, Debug)]
pub struct VerbsOptions {
    /// Device name (e.g. `mlx5_0`, `rxe0`); `None` = the first device.
    pub device: Option<String>,
    /// Port number (1-based).
    pub port: u8,
    /// GID index; `None` = the GID of `ip` if given, else the first RoCE v2 IPv4-mapped GID
    /// among the first 16, else 0.
    pub gid_index: Option<u32>,
    /// Select the device, port GID and index by the IPv4 address the GID maps (RoCE v2):
    /// the first device (or the named one) with a GID `::ffff:ip` on `port`.
    pub ip: Option<std::net::Ipv4Addr>,
    /// Most writes in flight per connection (the target announces it).
    pub window: u32,
    /// Most empty polls before the poller arms the CQ and sleeps (adaptive below this).
    pub max_spin: u32,
}

impl Default for VerbsOptions {
    fn default() -> Self {
        Self {
            device: None,
            port: 1,
            gid_index: None,
            ip: None,
            window: 16,
            max_spin: 256,
        }
    }
}

impl VerbsOptions {
    /// Defaults overridden by `CAPNP_RDMA_DEVICE`, `CAPNP_RDMA_PORT`, `CAPNP_RDMA_GID_INDEX`
    /// and `CAPNP_RDMA_IP`.
    pub fn from_env() -> Self {
        let mut o = Self::default();
        if let Ok(d) = std::env::var("CAPNP_RDMA_DEVICE") {
            o.device = Some(d);
        }
        if let Some(p) = std::env::var("CAPNP_RDMA_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
        {
            o.port = p;
        }
        if let Some(ip) = std::env::var("CAPNP_RDMA_IP")
            .ok()
            .and_then(|ip| ip.parse().ok())
        {
            o.ip = Some(ip);
        }
        if let Some(g) = std::env::var("CAPNP_RDMA_GID_INDEX")
            .ok()
            .and_then(|g| g.parse().ok())
        {
            o.gid_index = Some(g);
        }
        o
    }
}

fn device_err(what: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::Device(format!("{what}: {e}"))
}

struct DeviceInner {
    ctx: Arc<DeviceContext>,
    pd: Arc<ProtectionDomain>,
    name: String,
    port: u8,
    gid: Gid,
    gid_index: u32,
    mtu: Mtu,
    max_send_sge: u32,
    max_qp_wr: u32,
}

/// An opened RDMA device: context, protection domain, port and GID.
#[derive(Clone)]
pub struct VerbsDevice {
    inner: Arc<DeviceInner>,
}

impl std::fmt::Debug for VerbsDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsDevice")
            .field("name", &self.inner.name)
            .field("port", &self.inner.port)
            .field("gid_index", &self.inner.gid_index)
            .field("max_send_sge", &self.inner.max_send_sge)
            .finish()
    }
}

impl VerbsDevice {
    /// Opens the device `options` selects. No device at all (including a kernel without RDMA
    /// support, where the device list fails with ENOSYS) is [`TransportError::NoDevice`].
    pub fn open(options: &VerbsOptions) -> Result<Self, TransportError> {
        let list = DeviceList::new().map_err(|e| {
            TransportError::NoDevice(format!(
                "cannot list RDMA devices ({e:?}); is rdma-core installed and an RDMA driver \
                 (e.g. rdma_rxe for Soft-RoCE) loaded?"
            ))
        })?;
        let mapped = |ip: std::net::Ipv4Addr| {
            let mut raw = [0u8; 16];
            raw[10] = 0xff;
            raw[11] = 0xff;
            raw[12..].copy_from_slice(&ip.octets());
            raw
        };
        let roce_v2_ipv4 = |g: &Gid| g.raw[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
        let mut chosen = None;
        let mut seen = Vec::new();
        for device in list.iter() {
            let name = device.name();
            seen.push(name.clone());
            if options.device.as_ref().is_some_and(|want| *want != name) {
                continue;
            }
            let ctx = device.open().map_err(|e| device_err("open device", e))?;
            let gid_index = match (options.gid_index, options.ip) {
                (Some(i), _) => Some(i),
                (None, Some(ip)) => (0..16u32).find(|&i| {
                    ctx.query_gid(options.port, i)
                        .is_ok_and(|g| g.raw == mapped(ip))
                }),
                (None, None) => Some(
                    (0..16u32)
                        .find(|&i| {
                            ctx.query_gid(options.port, i)
                                .is_ok_and(|g| roce_v2_ipv4(&g))
                        })
                        .unwrap_or(0),
                ),
            };
            if let Some(gid_index) = gid_index {
                chosen = Some((name, ctx, gid_index));
                break;
            }
        }
        let (name, ctx, gid_index) = chosen.ok_or_else(|| {
            TransportError::NoDevice(match (&options.device, options.ip) {
                (_, Some(ip)) => format!(
                    "no device has a GID for {ip} on port {}; devices: {seen:?}",
                    options.port
                ),
                (Some(name), None) => format!("no device named {name}; devices: {seen:?}"),
                (None, None) => "the RDMA device list is empty".into(),
            })
        })?;
        let attr = ctx
            .query_device()
            .map_err(|e| device_err("query device", e))?;
        let port = ctx
            .query_port(options.port)
            .map_err(|e| device_err("query port", e))?;
        let gid = ctx
            .query_gid(options.port, gid_index)
            .map_err(|e| device_err("query gid", e))?;
        let pd = ctx.alloc_pd().map_err(|e| device_err("allocate PD", e))?;
        Ok(Self {
            inner: Arc::new(DeviceInner {
                mtu: port.active_mtu(),
                max_send_sge: u32::try_from(attr.max_sge()).unwrap_or(1).max(1),
                max_qp_wr: u32::try_from(attr.max_qp_wr()).unwrap_or(1).max(1),
                ctx,
                pd,
                name,
                port: options.port,
                gid,
                gid_index,
            }),
        })
    }

    /// The GID index in use.
    pub fn gid_index(&self) -> u32 {
        self.inner.gid_index
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Scatter-gather entries one send work request may carry.
    pub fn max_send_sge(&self) -> u32 {
        self.inner.max_send_sge
    }

    /// Registers the whole of `region` once, for local and remote writes.
    pub fn register(&self, region: &Region) -> Result<RegisteredRegion, TransportError> {
        self.register_with(region, AccessFlags::LocalWrite | AccessFlags::RemoteWrite)
    }

    /// Registers the whole of `region` once with the given access rights.
    fn register_with(
        &self,
        region: &Region,
        access: AccessFlags,
    ) -> Result<RegisteredRegion, TransportError> {
        // SAFETY: the mapping stays valid for as long as the registration: RegisteredRegion
        // holds a Region handle, which keeps the mapping alive, and drops the MR first.
        let mr = unsafe {
            self.inner
                .pd
                .reg_mr(region.as_ptr() as usize, region.len() as usize, access)
        }
        .map_err(|e| {
            let limit = crate::sys::memlock_limit()
                .map(|l| format!("{l} bytes"))
                .unwrap_or_else(|| "unlimited".into());
            device_err(
                &format!("register the region (on ENOMEM raise RLIMIT_MEMLOCK, now {limit})"),
                e,
            )
        })?;
        Ok(RegisteredRegion {
            mr,
            region: region.clone(),
            device: self.clone(),
        })
    }
}

/// A region registered with a device: one memory registration for all of it.
pub struct RegisteredRegion {
    // Drop order: deregister before the region handle (and its mapping) may go.
    mr: Arc<MemoryRegion>,
    region: Region,
    device: VerbsDevice,
}

impl std::fmt::Debug for RegisteredRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisteredRegion")
            .field("region", &self.region.id())
            .field("rkey", &self.mr.rkey())
            .finish()
    }
}

impl RegisteredRegion {
    /// The region.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The device it is registered with.
    pub fn device(&self) -> &VerbsDevice {
        &self.device
    }

    /// The remote key peers use to write into it.
    pub fn rkey(&self) -> u32 {
        self.mr.rkey()
    }
}

/// Connection parameters exchanged over TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Endpoint {
    qpn: u32,
    psn: u32,
    gid: [u8; 16],
    remote: RemoteRegion,
    window: u32,
}

const ENDPOINT_MAGIC: u32 = u32::from_le_bytes(*b"CRDV");
const ENDPOINT_LEN: usize = 88;
const READY: u8 = 0x52;

impl Endpoint {
    fn encode(&self) -> [u8; ENDPOINT_LEN] {
        let mut b = [0u8; ENDPOINT_LEN];
        b[0..4].copy_from_slice(&ENDPOINT_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[8..12].copy_from_slice(&self.qpn.to_le_bytes());
        b[12..16].copy_from_slice(&self.psn.to_le_bytes());
        b[16..32].copy_from_slice(&self.gid);
        b[32..40].copy_from_slice(&self.remote.region_id.to_le_bytes());
        b[40..44].copy_from_slice(&self.remote.rkey.to_le_bytes());
        b[44..48].copy_from_slice(&self.window.to_le_bytes());
        b[48..56].copy_from_slice(&self.remote.base.to_le_bytes());
        b[56..64].copy_from_slice(&self.remote.offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.remote.len.to_le_bytes());
        b
    }

    fn decode(b: &[u8; ENDPOINT_LEN]) -> Result<Self, TransportError> {
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(v)
        };
        if u32_at(0) != ENDPOINT_MAGIC || u32_at(4) != 1 {
            return Err(TransportError::Protocol(
                "not a capnp-rdma verbs peer (or another version)".into(),
            ));
        }
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[16..32]);
        let remote = RemoteRegion {
            region_id: u64_at(32),
            rkey: u32_at(40),
            base: u64_at(48),
            offset: u64_at(56),
            len: u64_at(64),
        };
        if remote.offset.checked_add(remote.len).is_none() || u32_at(8) > 0x00ff_ffff {
            return Err(TransportError::Protocol("bad endpoint".into()));
        }
        Ok(Self {
            qpn: u32_at(8),
            psn: u32_at(12) & 0x00ff_ffff,
            gid,
            remote,
            window: u32_at(44),
        })
    }
}

/// Decodes an endpoint from arbitrary bytes (fuzzing).
pub(crate) fn fuzz_decode_endpoint(data: &[u8]) {
    if let Some(bytes) = data.get(..ENDPOINT_LEN) {
        let mut buf = [0u8; ENDPOINT_LEN];
        buf.copy_from_slice(bytes);
        if let Ok(e) = Endpoint::decode(&buf) {
            assert!(e.remote.offset.checked_add(e.remote.len).is_some());
            assert_eq!(Endpoint::decode(&e.encode()).ok(), Some(e));
        }
    }
}

fn random_psn() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    (std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        & 0x00ff_ffff) as u32
}

/// A connected RC queue pair with its CQ.
struct Qp {
    // Drop order: the QP goes first (no more DMA), then the CQ (acked), then the rest.
    qp: BasicQueuePair,
    cq: HybridCq,
    psn: u32,
}

fn create_qp(
    dev: &VerbsDevice,
    send_wr: u32,
    recv_wr: u32,
    max_spin: u32,
) -> Result<Qp, TransportError> {
    let access = AccessFlags::LocalWrite | AccessFlags::RemoteWrite;
    create_qp_with(dev, send_wr, recv_wr, max_spin, access)
}

/// [`create_qp`] with the remote access rights the QP grants its peer.
fn create_qp_with(
    dev: &VerbsDevice,
    send_wr: u32,
    recv_wr: u32,
    max_spin: u32,
    access: AccessFlags,
) -> Result<Qp, TransportError> {
    let d = &dev.inner;
    let channel =
        CompletionChannel::new(&d.ctx).map_err(|e| device_err("create completion channel", e))?;
    let cqe = (send_wr + recv_wr + 1).min(65_535);
    let cq = d
        .ctx
        .create_cq_builder()
        .setup_cqe(cqe)
        .setup_comp_channel(&channel, 0)
        .build()
        .map_err(|e| device_err("create CQ", e))?;
    let mut builder = d.pd.create_qp_builder();
    let generic = sideway::ibverbs::completion::GenericCompletionQueue::from(Arc::clone(&cq));
    let mut qp = builder
        .setup_max_send_wr(send_wr.min(d.max_qp_wr))
        .setup_max_recv_wr(recv_wr.min(d.max_qp_wr))
        .setup_max_send_sge(d.max_send_sge)
        .setup_max_recv_sge(1)
        .setup_send_cq(generic.clone())
        .setup_recv_cq(generic)
        .build()
        .map_err(|e| device_err("create QP", e))?;
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::Init)
        .setup_pkey_index(0)
        .setup_port(d.port)
        .setup_access_flags(access);
    qp.modify(&attr).map_err(|e| device_err("QP to INIT", e))?;
    Ok(Qp {
        qp,
        cq: HybridCq::new(cq, channel, max_spin)?,
        psn: random_psn(),
    })
}

fn connect_qp(dev: &VerbsDevice, qp: &mut Qp, peer: &Endpoint) -> Result<(), TransportError> {
    connect_qp_to(dev, qp, (peer.qpn, peer.psn, peer.gid), (0, 0))
}

/// Moves `qp` to RTR and RTS towards the peer's `(qpn, psn, gid)`. The last argument is
/// `(responder, initiator)`: RDMA READs this QP serves at once for the peer
/// (`max_dest_rd_atomic`) and issues at once itself (`max_rd_atomic`); 0 for write-only QPs.
fn connect_qp_to(
    dev: &VerbsDevice,
    qp: &mut Qp,
    (qpn, psn, gid): (u32, u32, [u8; 16]),
    (responder, initiator): (u8, u8),
) -> Result<(), TransportError> {
    let d = &dev.inner;
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::ReadyToReceive)
        .setup_path_mtu(d.mtu)
        .setup_dest_qp_num(qpn)
        .setup_rq_psn(psn)
        .setup_max_dest_read_atomic(responder)
        .setup_min_rnr_timer(12);
    let mut ah = AddressHandleAttribute::new();
    ah.setup_dest_lid(0)
        .setup_port(d.port)
        .setup_service_level(0)
        .setup_grh_src_gid_index(d.gid_index as u8)
        .setup_grh_dest_gid(&Gid { raw: gid })
        .setup_grh_hop_limit(64);
    attr.setup_address_vector(&ah);
    qp.qp
        .modify(&attr)
        .map_err(|e| device_err("QP to RTR", e))?;
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::ReadyToSend)
        .setup_sq_psn(qp.psn)
        .setup_timeout(14)
        .setup_retry_cnt(7)
        .setup_rnr_retry(7)
        .setup_max_read_atomic(initiator);
    qp.qp
        .modify(&attr)
        .map_err(|e| device_err("QP to RTS", e))?;
    Ok(())
}

/// Moves `qp` to the error state: every posted work request completes (flushed).
fn to_error_state(qp: &mut BasicQueuePair) {
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::Error);
    let _ = qp.modify(&attr);
}

async fn exchange(stream: &mut TcpStream, mine: &Endpoint) -> Result<Endpoint, TransportError> {
    Endpoint::decode(&swap(stream, &mine.encode()).await?)
}

/// Sends `mine` and reads the peer's message of the same length.
async fn swap<const N: usize>(
    stream: &mut TcpStream,
    mine: &[u8; N],
) -> Result<[u8; N], TransportError> {
    stream
        .write_all(mine)
        .await
        .map_err(TransportError::io("send endpoint"))?;
    let mut buf = [0u8; N];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(TransportError::io("read endpoint"))?;
    Ok(buf)
}

/// Opens the set-up socket to `addr` (no Nagle delay).
async fn dial(addr: impl ToSocketAddrs) -> Result<TcpStream, TransportError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(TransportError::io("connect"))?;
    stream
        .set_nodelay(true)
        .map_err(TransportError::io("set_nodelay"))?;
    Ok(stream)
}

/// Accepts the next set-up socket on `listener` (no Nagle delay).
async fn answer(listener: &TcpListener) -> Result<TcpStream, TransportError> {
    let (stream, _) = listener
        .accept()
        .await
        .map_err(TransportError::io("accept"))?;
    stream
        .set_nodelay(true)
        .map_err(TransportError::io("set_nodelay"))?;
    Ok(stream)
}

/// Resolves when the peer closes the set-up socket (or it fails).
async fn peer_gone(stream: &mut TcpStream) {
    let mut b = [0u8; 64];
    loop {
        match stream.read(&mut b).await {
            Ok(0) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

/// The writing end over verbs.
pub struct VerbsWriter<P: Payload = OutboundMessage> {
    // Drop order: the QP first (no DMA from payloads after it), then the payloads.
    qp: Qp,
    in_flight: VecDeque<(u64, P)>,
    local: Arc<RegisteredRegion>,
    remote: RemoteRegion,
    window: usize,
    next_id: u64,
    stream: TcpStream,
    peer_gone: bool,
    wcs: Vec<Wc>,
}

impl<P: Payload> std::fmt::Debug for VerbsWriter<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsWriter")
            .field("remote", &self.remote)
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

/// Most work requests one message may need: 511 segments + the table, `max_send_sge` each.
fn max_chain(max_sge: u32) -> u32 {
    512u32.div_ceil(max_sge.max(1)) + 1
}

impl<P: Payload> VerbsWriter<P> {
    /// Connects to a [`VerbsTarget`] listening at `addr`; payloads must come from `local`.
    pub async fn connect(
        addr: impl ToSocketAddrs,
        local: &Arc<RegisteredRegion>,
        options: &VerbsOptions,
    ) -> Result<Self, TransportError> {
        let dev = local.device().clone();
        let mut stream = dial(addr).await?;
        let send_wr = options.window.max(1) * max_chain(dev.max_send_sge());
        let mut qp = create_qp(&dev, send_wr, 1, options.max_spin)?;
        let mine = Endpoint {
            qpn: qp.qp.qp_number(),
            psn: qp.psn,
            gid: dev.inner.gid.raw,
            remote: RemoteRegion {
                region_id: local.region().id(),
                rkey: 0,
                base: 0,
                offset: 0,
                len: 0,
            },
            window: 0,
        };
        let peer = exchange(&mut stream, &mine).await?;
        if peer.window == 0 {
            return Err(TransportError::Protocol(
                "target announced a window of 0".into(),
            ));
        }
        connect_qp(&dev, &mut qp, &peer)?;
        let mut ready = [0u8; 1];
        stream
            .read_exact(&mut ready)
            .await
            .map_err(TransportError::io("wait for target"))?;
        if ready[0] != READY {
            return Err(TransportError::Protocol("target did not confirm".into()));
        }
        Ok(Self {
            qp,
            in_flight: VecDeque::new(),
            local: Arc::clone(local),
            remote: peer.remote,
            window: peer.window.min(options.window.max(1)) as usize,
            next_id: 1,
            stream,
            peer_gone: false,
            wcs: Vec::new(),
        })
    }

    /// Polling counters of the send CQ.
    pub fn poll_stats(&self) -> PollStats {
        self.qp.cq.stats()
    }

    fn post(
        &mut self,
        payload: &P,
        remote_offset: u64,
        imm: u32,
        id: u64,
    ) -> Result<(), TransportError> {
        let base = self.local.region().as_ptr() as u64;
        let lkey = self.local.mr.lkey();
        let sges: Vec<ibv_sge> = payload
            .entries()
            .iter()
            .map(|e| ibv_sge {
                addr: base + e.offset,
                length: e.len,
                lkey,
            })
            .collect();
        let max = self.local.device().max_send_sge() as usize;
        let chunks: Vec<&[ibv_sge]> = sges.chunks(max).collect();
        let mut guard = self.qp.qp.start_post_send();
        let mut remote_addr = self.remote.base + remote_offset;
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let flags = if last {
                WorkRequestFlags::Signaled
            } else {
                WorkRequestFlags::none()
            };
            let wr = guard.construct_wr(id, flags);
            let buffer = if last {
                wr.setup_write_imm(self.remote.rkey, remote_addr, imm.to_be())
            } else {
                wr.setup_write(self.remote.rkey, remote_addr)
            };
            // SAFETY: every sge lies in the registered region (check_post verified the entries
            // against the region) under this MR's lkey, and the payload that owns those bytes
            // is kept in `in_flight` until the work request completes.
            unsafe { buffer.setup_sge_list(chunk) };
            remote_addr += chunk.iter().map(|s| u64::from(s.length)).sum::<u64>();
        }
        guard.post().map_err(|e| device_err("ibv_post_send", e))
    }

    fn fail_all(
        &mut self,
        out: &mut Vec<Completion<P>>,
        error: impl Fn() -> TransportError,
    ) -> usize {
        let n = self.in_flight.len();
        for (id, payload) in self.in_flight.drain(..) {
            out.push(Completion {
                id,
                payload,
                status: Err(error()),
            });
        }
        n
    }
}

impl<P: Payload> Writer for VerbsWriter<P> {
    type Payload = P;

    fn remote(&self) -> RemoteRegion {
        self.remote
    }

    fn window(&self) -> usize {
        self.window
    }

    fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn post_write(
        &mut self,
        payload: P,
        remote_offset: u64,
        imm: u32,
    ) -> Result<u64, SendError<P>> {
        if self.peer_gone {
            return Err(SendError {
                payload,
                error: TransportError::Disconnected,
            });
        }
        if let Err(error) = check_post(
            &payload,
            self.local.region(),
            &self.remote,
            remote_offset,
            (self.in_flight.len(), self.window),
        ) {
            return Err(SendError { payload, error });
        }
        let id = self.next_id;
        if let Err(error) = self.post(&payload, remote_offset, imm, id) {
            return Err(SendError { payload, error });
        }
        self.next_id += 1;
        self.in_flight.push_back((id, payload));
        Ok(id)
    }

    async fn completions(&mut self, out: &mut Vec<Completion<P>>) -> Result<usize, TransportError> {
        if self.in_flight.is_empty() {
            return Ok(0);
        }
        let mut wcs = std::mem::take(&mut self.wcs);
        wcs.clear();
        let waited = if self.peer_gone {
            self.qp.cq.wait(&mut wcs).await.map(Some)
        } else {
            tokio::select! {
                r = self.qp.cq.wait(&mut wcs) => r.map(Some),
                () = peer_gone(&mut self.stream) => Ok(None),
            }
        };
        let result = match waited {
            Ok(Some(_)) => {
                let mut n = 0;
                for wc in &wcs {
                    // Unsignaled requests only complete on error, with the same id as the
                    // message's last request; pop everything up to this id.
                    while let Some(&(front, _)) = self.in_flight.front() {
                        if front > wc.wr_id {
                            break;
                        }
                        let (id, payload) = self.in_flight.pop_front().expect("front exists");
                        let status = if wc.status == WC_SUCCESS && id == wc.wr_id {
                            Ok(())
                        } else if wc.status == WC_SUCCESS {
                            Err(TransportError::Protocol(format!(
                                "completion for {} skipped {id}",
                                wc.wr_id
                            )))
                        } else {
                            Err(TransportError::Device(format!(
                                "work completion status {}",
                                wc.status
                            )))
                        };
                        out.push(Completion {
                            id,
                            payload,
                            status,
                        });
                        n += 1;
                    }
                }
                Ok(n)
            }
            Ok(None) => {
                // The target is gone. Flush the send queue so the NIC lets go of every
                // payload, then hand them back as they complete.
                self.peer_gone = true;
                to_error_state(&mut self.qp.qp);
                Ok(0)
            }
            Err(e) => {
                to_error_state(&mut self.qp.qp);
                let n = self.fail_all(out, || TransportError::Disconnected);
                self.wcs = wcs;
                return if n > 0 { Ok(n) } else { Err(e) };
            }
        };
        self.wcs = wcs;
        result
    }
}

/// The receiving end over verbs: owns the granted range; the writer's NIC writes into it.
pub struct VerbsTarget {
    // Drop order: the QP first (no more remote writes), then the grant.
    qp: Qp,
    posted: u32,
    window: u32,
    stream: TcpStream,
    granted: RemoteRegion,
    done: bool,
    wcs: Vec<Wc>,
    lease: BlockLease,
    _registration: Arc<RegisteredRegion>,
}

impl std::fmt::Debug for VerbsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsTarget")
            .field("granted", &self.granted)
            .finish()
    }
}

impl VerbsTarget {
    /// Accepts one writer on `listener` and grants it `lease`, which must come from the
    /// registered region.
    pub async fn accept(
        listener: &TcpListener,
        registration: &Arc<RegisteredRegion>,
        lease: BlockLease,
        options: &VerbsOptions,
    ) -> Result<Self, TransportError> {
        if lease.region().id() != registration.region().id() {
            return Err(TransportError::ForeignPayload(
                "the lease is not in the registered region",
            ));
        }
        let mut stream = answer(listener).await?;
        let dev = registration.device().clone();
        let window = options.window.max(1);
        let recv_wr = window * 2;
        let mut qp = create_qp(&dev, 1, recv_wr, options.max_spin)?;
        let granted = RemoteRegion {
            region_id: registration.region().id(),
            rkey: registration.rkey(),
            base: registration.region().as_ptr() as u64,
            offset: lease.offset(),
            len: lease.len(),
        };
        let mine = Endpoint {
            qpn: qp.qp.qp_number(),
            psn: qp.psn,
            gid: dev.inner.gid.raw,
            remote: granted,
            window,
        };
        let peer = exchange(&mut stream, &mine).await?;
        connect_qp(&dev, &mut qp, &peer)?;
        let mut target = Self {
            qp,
            posted: 0,
            window: recv_wr,
            stream,
            granted,
            done: false,
            wcs: Vec::new(),
            lease,
            _registration: Arc::clone(registration),
        };
        target.replenish()?;
        target
            .stream
            .write_all(&[READY])
            .await
            .map_err(TransportError::io("confirm"))?;
        Ok(target)
    }

    /// Polling counters of the receive CQ.
    pub fn poll_stats(&self) -> PollStats {
        self.qp.cq.stats()
    }

    /// The lease holding the granted range.
    pub fn lease(&self) -> &BlockLease {
        &self.lease
    }

    /// Posts receives (no scatter-gather entries: RDMA WRITE with immediate consumes a receive
    /// only for its immediate) until `window` are outstanding.
    fn replenish(&mut self) -> Result<(), TransportError> {
        if self.posted >= self.window {
            return Ok(());
        }
        let mut guard = self.qp.qp.start_post_recv();
        for _ in self.posted..self.window {
            guard.construct_wr(0);
        }
        guard.post().map_err(|e| device_err("ibv_post_recv", e))?;
        self.posted = self.window;
        Ok(())
    }
}

impl Target for VerbsTarget {
    fn region(&self) -> &Region {
        self.lease.region()
    }

    fn granted(&self) -> RemoteRegion {
        self.granted
    }

    async fn incoming(&mut self, out: &mut Vec<Incoming>) -> Result<usize, TransportError> {
        if self.done {
            return Err(TransportError::Disconnected);
        }
        let mut wcs = std::mem::take(&mut self.wcs);
        wcs.clear();
        // Completions that already arrived are delivered before a disconnect is reported.
        let polled = self.qp.cq.poll_once(&mut wcs)?;
        let waited = if polled > 0 {
            Ok(Some(polled))
        } else {
            tokio::select! {
                r = self.qp.cq.wait(&mut wcs) => r.map(Some),
                () = peer_gone(&mut self.stream) => Ok(None),
            }
        };
        let result = match waited {
            Ok(Some(_)) => {
                let mut n = 0;
                let mut error = None;
                for wc in &wcs {
                    self.posted = self.posted.saturating_sub(1);
                    if wc.status != WC_SUCCESS {
                        error.get_or_insert(TransportError::Device(format!(
                            "receive completion status {}",
                            wc.status
                        )));
                    } else if wc.opcode == WC_RECV_RDMA_WITH_IMM {
                        out.push(Incoming {
                            imm: wc.imm,
                            at: None,
                        });
                        n += 1;
                    }
                }
                match error {
                    Some(e) => {
                        self.done = true;
                        if n > 0 {
                            Ok(n)
                        } else {
                            Err(e)
                        }
                    }
                    None => self.replenish().map(|()| n),
                }
            }
            Ok(None) => {
                // Deliver anything that landed before the writer left, then report it.
                let mut n = 0;
                while self.qp.cq.poll_once(&mut wcs)? > 0 {}
                for wc in &wcs {
                    if wc.status == WC_SUCCESS && wc.opcode == WC_RECV_RDMA_WITH_IMM {
                        out.push(Incoming {
                            imm: wc.imm,
                            at: None,
                        });
                        n += 1;
                    }
                }
                self.done = true;
                if n > 0 {
                    Ok(n)
                } else {
                    Err(TransportError::Disconnected)
                }
            }
            Err(e) => {
                self.done = true;
                Err(e)
            }
        };
        self.wcs = wcs;
        result
    }
}
