//! RC queue pairs: creation with their completion queue, and the INIT → RTR → RTS (and error)
//! state changes towards a peer.

use super::cq::HybridCq;
use super::device::{device_err, VerbsDevice};
use super::handshake::Endpoint;
use crate::transport::TransportError;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::CompletionChannel;
use sideway::ibverbs::queue_pair::{BasicQueuePair, QueuePair, QueuePairAttribute, QueuePairState};
use sideway::ibverbs::AccessFlags;
use std::sync::Arc;

fn random_psn() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    (std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        & 0x00ff_ffff) as u32
}

/// A connected RC queue pair with its CQ.
pub(super) struct Qp {
    // Drop order: the QP goes first (no more DMA), then the CQ (acked), then the rest.
    pub(super) qp: BasicQueuePair,
    pub(super) cq: HybridCq,
    pub(super) psn: u32,
}

pub(super) fn create_qp(
    dev: &VerbsDevice,
    send_wr: u32,
    recv_wr: u32,
    max_spin: u32,
) -> Result<Qp, TransportError> {
    let access = AccessFlags::LocalWrite | AccessFlags::RemoteWrite;
    create_qp_with(dev, send_wr, recv_wr, max_spin, access)
}

/// [`create_qp`] with the remote access rights the QP grants its peer.
pub(super) fn create_qp_with(
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

pub(super) fn connect_qp(
    dev: &VerbsDevice,
    qp: &mut Qp,
    peer: &Endpoint,
) -> Result<(), TransportError> {
    connect_qp_to(dev, qp, (peer.qpn, peer.psn, peer.gid), (0, 0))
}

/// Moves `qp` to RTR and RTS towards the peer's `(qpn, psn, gid)`. The last argument is
/// `(responder, initiator)`: RDMA READs this QP serves at once for the peer
/// (`max_dest_rd_atomic`) and issues at once itself (`max_rd_atomic`); 0 for write-only QPs.
pub(super) fn connect_qp_to(
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
pub(super) fn to_error_state(qp: &mut BasicQueuePair) {
    let mut attr = QueuePairAttribute::new();
    attr.setup_state(QueuePairState::Error);
    let _ = qp.modify(&attr);
}
