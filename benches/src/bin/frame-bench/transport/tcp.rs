//! System `tcp`: `capnp_rdma::transport::tcp` on loopback. The writer sends each message's
//! entries as one vectored write behind a 32-byte header; the target reads them straight into
//! its granted slot and acknowledges.

use super::pump::{self, Measured};
use super::{Case, TransportBenchError};
use capnp_rdma::framing::OutboundMessage;
use capnp_rdma::transport::tcp::{TcpOptions, TcpTarget, TcpWriter};

/// Runs one (tcp, frame) measurement.
pub(super) async fn run(case: Case) -> Result<Measured, TransportBenchError> {
    let Case {
        messages,
        sender_region,
        target_region,
        stride,
        shared,
        receipts,
    } = case;
    let lease = target_region.lease(stride * shared.window() as u64)?;
    let (listener, addr) = super::loopback_listener().await?;
    let options = TcpOptions {
        window: shared.window() as u32,
    };
    let accept = tokio::spawn(async move { TcpTarget::accept(&listener, lease, &options).await });
    let writer = TcpWriter::<OutboundMessage>::connect(addr, &sender_region)
        .await
        .map_err(TransportBenchError::connect)?;
    let target = accept
        .await
        .map_err(TransportBenchError::Task)?
        .map_err(TransportBenchError::connect)?;

    let sender = tokio::spawn(pump::send(writer, messages, shared, stride));
    let receiver = tokio::spawn(pump::receive(target, receipts, stride));
    let ((writer, payloads), (target, receipts)) = pump::join(sender, receiver).await?;
    drop((writer, target, payloads));
    Measured::from(&receipts)
}
