//! System `raw-tcp`: the ceiling for the `tcp` backend. A plain tokio `TcpStream` pair on
//! loopback moves the same bytes per frame (each message's wire bytes, pre-copied into a
//! `Vec`), with no header and no region.
//!
//! ```text
//!  sender task: admit ── write_all(frame seq % (window+1)) ──▶ receiver task: read_exact into
//!  ack task:    credit += 1 ◀── 8-byte ack (seq, LE) ◀──────── slot seq % window, check, ack
//! ```
//!
//! The ack travels back after the frame was checked, like the tcp backend's ACK, so the sender
//! keeps `window` frames in flight by the same rule. Its frames queue in the sender task, not
//! behind a `post_write`: a frame's clock starts when its `write_all` starts, so raw-tcp's
//! latency is one frame's trip, while a backend's includes the frames queued ahead of it in
//! the window. Compare the two on frames/s.

use super::pump::{self, Flow, Measured, Receipts, STALL};
use super::TransportBenchError;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> TransportBenchError {
    move |source| TransportBenchError::Io { what, source }
}

/// Runs one (raw-tcp, frame) measurement: `sources` are the messages' wire bytes.
pub(super) async fn run(
    sources: Vec<Vec<u8>>,
    flow: Arc<Flow>,
    receipts: Receipts,
) -> Result<Measured, TransportBenchError> {
    let (listener, addr) = super::loopback_listener().await?;
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let client = client.map_err(io("connect"))?;
    let (server, _) = server.map_err(io("accept"))?;
    client.set_nodelay(true).map_err(io("set_nodelay"))?;
    server.set_nodelay(true).map_err(io("set_nodelay"))?;
    let (acks, wire) = client.into_split();

    let len = sources.first().map_or(0, Vec::len);
    // Writing frames and reading acks share one task, as in the tcp backend's writer.
    let sender = tokio::spawn(async move {
        tokio::try_join!(
            send(wire, sources, Arc::clone(&flow)),
            read_acks(acks, Arc::clone(&flow))
        )
    });
    let receiver = tokio::spawn(receive(server, receipts, len));
    let (_, receipts) = pump::join(sender, receiver).await?;
    Measured::from(&receipts)
}

async fn send(
    mut wire: OwnedWriteHalf,
    sources: Vec<Vec<u8>>,
    flow: Arc<Flow>,
) -> Result<OwnedWriteHalf, TransportBenchError> {
    let mut seq = 0u64;
    loop {
        let last = flow.admit(seq).await?;
        let source = &sources[(seq % sources.len() as u64) as usize];
        flow.started(seq);
        wire.write_all(source).await.map_err(io("write frame"))?;
        seq += 1;
        if last {
            return Ok(wire);
        }
        tokio::task::yield_now().await; // as the backends' sender does (pump::send)
    }
}

async fn read_acks(mut acks: OwnedReadHalf, flow: Arc<Flow>) -> Result<(), TransportBenchError> {
    let mut next = 0u64;
    let mut ack = [0u8; 8];
    while next < flow.total() {
        tokio::time::timeout(STALL, acks.read_exact(&mut ack))
            .await
            .map_err(|_| TransportBenchError::Stalled("acks"))?
            .map_err(io("read ack"))?;
        let seq = u64::from_le_bytes(ack);
        if seq != next {
            return Err(TransportBenchError::mismatch(
                seq,
                format!("ack for frame {seq}, expected {next}"),
            ));
        }
        flow.release();
        next += 1;
    }
    Ok(())
}

async fn receive(
    mut stream: TcpStream,
    mut receipts: Receipts,
    len: usize,
) -> Result<Receipts, TransportBenchError> {
    let window = receipts.window();
    let mut slots: Vec<Vec<u8>> = (0..window).map(|_| vec![0u8; len]).collect();
    while !receipts.finished() {
        let seq = receipts.next();
        let slot = &mut slots[(seq % window as u64) as usize];
        tokio::time::timeout(STALL, stream.read_exact(slot))
            .await
            .map_err(|_| TransportBenchError::Stalled("frames"))?
            .map_err(io("read frame"))?;
        receipts
            .arrived(seq, slot)
            .map_err(|what| TransportBenchError::mismatch(seq, what))?;
        stream
            .write_all(&seq.to_le_bytes())
            .await
            .map_err(io("write ack"))?;
    }
    Ok(receipts)
}
