//! System `shm`: `capnp_rdma::transport::shm`, writer and target in this process. The writer
//! maps the target's region (passed over a Unix socket), copies each message's entries into
//! the granted slot and pushes a notification onto the shared ring; the target polls the ring
//! (then sleeps on an eventfd).
//!
//! The messages live in the sender's own region, as for every other system, so each write is
//! one copy of the frame. (The backend's zero-copy path — a producer that builds its message
//! inside the target's region, at its destination — is not what this benchmark measures.)

use super::pump::{self, Measured};
use super::{Case, TransportBenchError};
use capnp_rdma::framing::OutboundMessage;
use capnp_rdma::transport::shm::{ShmOptions, ShmTarget, ShmWriter};
use std::sync::atomic::{AtomicU32, Ordering};
use tokio::net::UnixListener;

/// Removes the socket file when dropped.
struct SocketPath(std::path::PathBuf);

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn socket_path() -> SocketPath {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    SocketPath(
        std::env::temp_dir().join(format!("frame-bench-shm-{}-{n}.sock", std::process::id())),
    )
}

/// Runs one (shm, frame) measurement.
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
    let path = socket_path();
    let _ = std::fs::remove_file(&path.0);
    let listener = UnixListener::bind(&path.0).map_err(|source| TransportBenchError::Io {
        what: "bind",
        source,
    })?;
    let options = ShmOptions {
        window: shared.window() as u32,
        ..ShmOptions::default()
    };
    let accept = tokio::spawn(async move { ShmTarget::accept(&listener, lease, &options).await });
    let writer = ShmWriter::<OutboundMessage>::connect(&path.0, &sender_region)
        .await
        .map_err(TransportBenchError::connect)?;
    let target = accept
        .await
        .map_err(TransportBenchError::Task)?
        .map_err(TransportBenchError::connect)?;

    let sender = tokio::spawn(pump::send(writer, messages, shared, stride));
    let receiver = tokio::spawn(pump::receive(target, receipts, stride));
    let ((writer, payloads), (target, receipts)) = pump::join(sender, receiver).await?;
    // The writer first: a target dropped before it keeps its lease until the writer closes.
    drop(writer);
    drop(target);
    drop(payloads);
    Measured::from(&receipts)
}
