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
        flow,
        receipts,
    } = case;
    let lease = target_region.lease(stride * flow.in_flight() as u64)?;
    let (listener, addr) = super::loopback_listener().await?;
    let options = TcpOptions {
        window: flow.in_flight() as u32,
    };
    let (writer, target) = pump::pair(
        async move { TcpTarget::accept(&listener, lease, &options).await },
        TcpWriter::<OutboundMessage>::connect(addr, &sender_region),
    )
    .await?;

    let sender = tokio::spawn(pump::send(writer, messages, flow, stride));
    let receiver = tokio::spawn(pump::receive(target, receipts, stride));
    let ((writer, payloads), (target, receipts)) = pump::join(sender, receiver).await?;
    drop((writer, target, payloads));
    Measured::from(&receipts)
}
