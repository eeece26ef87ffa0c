//! Systems `shm` and `shm-copy`: `capnp_rdma::transport::shm`, writer and target in this
//! process. The writer maps the target's region (passed over a Unix socket) and pushes one
//! notification per write onto the shared ring; the target polls the ring (then sleeps on an
//! eventfd).
//!
//! ```text
//!  shm       frames built in place, once per slot, untimed: SlotMessage in slot i of the
//!            target's grant (through ShmWriter::target_region), FrameWriter, pixels, finish
//!            write seq = post_write(slot seq % window's payload, to slot seq % window)
//!                      = check + ring push (+ eventfd only if the target sleeps); 0 bytes copied
//!  shm-copy  frames in the sender's own region (as for tcp and verbs)
//!            write seq = post_write(message seq % (window+1), slot seq % window)
//!                      = check + one memcpy per entry into the slot + ring push
//! ```
//!
//! `shm` is the zero-copy hand-off a producer gets when it builds its frames where the target
//! reads them; `shm-copy` is what any other producer gets. Both report the writer's counters
//! (`copied B/fr`), and `shm` fails the run if a single byte was copied. Neither stamps frames
//! per write: like every system here, they send pre-built frames (see frames.rs).

use super::frames::InPlaceSet;
use super::pump::{self, Flow, Measured, Receipts};
use super::{Case, TransportBenchError};
use crate::roundtrip::FrameSize;
use capnp_rdma::framing::OutboundMessage;
use capnp_rdma::transport::shm::{ShmOptions, ShmTarget, ShmWriter};
use capnp_rdma::transport::{Payload, Writer};
use capnp_rdma::{Region, RegionOptions};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
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

/// A connected pair: the target grants `window` slots of `stride` bytes of `target_region`.
async fn connect<P: Payload>(
    target_region: &Region,
    local: &Region,
    stride: u64,
    window: usize,
) -> Result<(ShmWriter<P>, ShmTarget), TransportBenchError> {
    let lease = target_region.lease(stride * window as u64)?;
    let path = socket_path();
    let _ = std::fs::remove_file(&path.0);
    let listener = UnixListener::bind(&path.0).map_err(|source| TransportBenchError::Io {
        what: "bind",
        source,
    })?;
    let options = ShmOptions {
        window: window as u32,
        ..ShmOptions::default()
    };
    pump::pair(
        async move { ShmTarget::accept(&listener, lease, &options).await },
        ShmWriter::<P>::connect(&path.0, local),
    )
    .await
}

/// Runs the stream and returns what it measured, with the writer's counters.
async fn stream<P: Payload>(
    writer: ShmWriter<P>,
    target: ShmTarget,
    payloads: Vec<P>,
    flow: Arc<Flow>,
    receipts: Receipts,
    stride: u64,
) -> Result<Measured, TransportBenchError> {
    let sender = tokio::spawn(pump::send(writer, payloads, flow, stride));
    let receiver = tokio::spawn(pump::receive(target, receipts, stride));
    let ((writer, payloads), (target, receipts)) = pump::join(sender, receiver).await?;
    let stats = writer.stats();
    // The writer first: a target dropped before it keeps its lease until the writer closes.
    drop(writer);
    drop(target);
    drop(payloads);
    let mut measured = Measured::from(&receipts)?;
    measured.shm_writer = Some(stats);
    Ok(measured)
}

/// Runs one (shm-copy, frame) measurement: messages from the sender's region, copied.
pub(super) async fn run_copy(case: Case) -> Result<Measured, TransportBenchError> {
    let Case {
        messages,
        sender_region,
        target_region,
        stride,
        flow,
        receipts,
    } = case;
    let window = flow.in_flight();
    let (writer, target) =
        connect::<OutboundMessage>(&target_region, &sender_region, stride, window).await?;
    stream(writer, target, messages, flow, receipts, stride).await
}

/// Runs one (shm, frame) measurement: frames built in place in the target's grant, handed
/// over without a copy. Returns the measurement and the bytes of one write.
pub(super) async fn run_in_place(
    size: FrameSize,
    flow: Arc<Flow>,
) -> Result<(Measured, u64), TransportBenchError> {
    let window = flow.in_flight();
    let stride = InPlaceSet::capacity(size)?.next_multiple_of(4096);
    let target_region = Region::create(&RegionOptions::memfd(stride * window as u64 + (16 << 20)))?;
    // The writer's own region stays empty: every payload is in the target's.
    let local = Region::create(&RegionOptions::memfd(4 << 20))?;
    let (writer, target) = connect(&target_region, &local, stride, window).await?;
    let base = writer.remote().offset;
    // SAFETY: the slots are the target's grant (a fresh lease: zeroed), which it keeps until
    // the writer is gone (dropped before the target in `stream`, and the payloads with it);
    // only these messages write them, and the target reads a slot only after a write to it
    // was announced.
    let set = unsafe { InPlaceSet::build(size, writer.target_region(), base, stride, window) }?;
    let wire_bytes = set.expect.len();
    let receipts = Receipts::new(&flow, &Arc::new(set.expect));
    let measured = stream(writer, target, set.payloads, flow, receipts, stride).await?;
    match measured.shm_writer {
        Some(stats) if stats.bytes_copied == 0 && stats.zero_copy_writes == stats.writes => {
            Ok((measured, wire_bytes))
        }
        _ => Err(TransportBenchError::Setup(
            "an in-place frame was copied: not every write was a zero-copy hand-off",
        )),
    }
}
