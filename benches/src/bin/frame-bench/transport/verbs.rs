//! System `verbs`: `capnp_rdma::transport::verbs`, both queue pairs in this process on one RDMA
//! device (`CAPNP_RDMA_DEVICE` etc., see `VerbsOptions::from_env`). Each message goes out as one
//! `ibv_post_send` (its four entries fit `max_send_sge`), an RDMA WRITE with immediate into the
//! target's slot; the set-up exchange runs over TCP on loopback.
//!
//! Without a device the system is skipped with the reason, never a panic.

use super::pump::{self, Measured};
use super::{Case, TransportBenchError};
use capnp_rdma::framing::OutboundMessage;
use capnp_rdma::transport::verbs::{VerbsDevice, VerbsOptions, VerbsTarget, VerbsWriter};
use capnp_rdma::transport::TransportError;
use std::sync::Arc;

/// Opens the RDMA device the environment selects; the error says why there is none.
pub(super) fn open() -> Result<VerbsDevice, String> {
    VerbsDevice::open(&VerbsOptions::from_env()).map_err(|e| match e {
        TransportError::NoDevice(why) => format!("no RDMA device: {why}"),
        other => format!("no usable RDMA device: {other}"),
    })
}

/// Runs one (verbs, frame) measurement on `device`.
pub(super) async fn run(device: &VerbsDevice, case: Case) -> Result<Measured, TransportBenchError> {
    let Case {
        messages,
        sender_region,
        target_region,
        stride,
        flow,
        receipts,
    } = case;
    let options = VerbsOptions {
        window: flow.in_flight() as u32,
        ..VerbsOptions::from_env()
    };
    let local = Arc::new(
        device
            .register(&sender_region)
            .map_err(TransportBenchError::connect)?,
    );
    let remote = Arc::new(
        device
            .register(&target_region)
            .map_err(TransportBenchError::connect)?,
    );
    let lease = target_region.lease(stride * flow.in_flight() as u64)?;
    let (listener, addr) = super::loopback_listener().await?;
    let target_options = options.clone();
    let (writer, target) = pump::pair(
        async move { VerbsTarget::accept(&listener, &remote, lease, &target_options).await },
        VerbsWriter::<OutboundMessage>::connect(addr, &local, &options),
    )
    .await?;

    let sender = tokio::spawn(pump::send(writer, messages, flow, stride));
    let receiver = tokio::spawn(pump::receive(target, receipts, stride));
    let ((writer, payloads), (target, receipts)) = pump::join(sender, receiver).await?;
    // The QPs first (no DMA after them), then the payloads and registrations.
    drop(writer);
    drop(target);
    drop(payloads);
    Measured::from(&receipts)
}
