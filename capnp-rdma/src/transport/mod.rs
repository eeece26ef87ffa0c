//! Transports: put a message's scatter-gather entries into a peer's region with one write.
//!
//! Every backend has the same semantics, checked by one conformance suite
//! (`tests/transport_conformance.rs`):
//!
//! ```text
//!  writer (owns payloads until completion)               target (owns the granted range)
//!  ┌─────────────────────────────┐   one write of n entries  ┌──────────────────────────────┐
//!  │ post_write(payload, off, imm)│ ────────────────────────▶ │ region[off .. off+len]       │
//!  │ completions() ◀── payload   │ ◀──── completion ──────── │ incoming() -> imm (+ where)  │
//!  └─────────────────────────────┘                           └──────────────────────────────┘
//! ```
//!
//! - A connection has two ends: a [`Writer`] that posts writes and a [`Target`] that grants a
//!   range of its region and is told, with the 32-bit immediate, when a write has fully landed.
//!   A peer that wants both directions opens two connections.
//! - `post_write(payload, remote_offset, imm)`: the payload's entries land contiguously at
//!   `remote_offset` in the granted range; the target learns of it only after every byte is
//!   there. Nothing half-written is ever announced.
//! - The payload (and with it the blocks its entries point to) is owned by the in-flight write
//!   and comes back in its [`Completion`], successful or not; a write that cannot be posted
//!   comes back at once in a [`SendError`]. Nothing is freed under an operation.
//! - A write outside the granted range is never sent: the writer rejects it, and the target
//!   checks again (and drops a connection that tries).
//! - At most `window` writes are in flight per connection; completions arrive in order, in
//!   batches.
//!
//! Backends: [`tcp`] (any host) and [`shm`] (same host: the writer copies straight into the
//! target's shared region and notifies it through a lock-free ring; a message built in place
//! there with a [`SlotMessage`](crate::slot::SlotMessage) is not copied at all).

pub mod shm;
pub mod tcp;
#[cfg(feature = "verbs")]
pub mod verbs;
mod wire;

use crate::framing::{OutboundMessage, Sge};
use crate::region::{BlockLease, Region};
use std::io;

/// The part of a peer's region a writer may write, learned when the connection is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRegion {
    /// The peer region's id ([`Region::id`]).
    pub region_id: u64,
    /// Remote key of the peer's memory registration (0 for transports without one).
    pub rkey: u32,
    /// Address of the peer region's first byte in the peer's address space as the NIC sees it
    /// (0 for transports that work with offsets only).
    pub base: u64,
    /// First offset of the granted range within the peer region.
    pub offset: u64,
    /// Length of the granted range.
    pub len: u64,
}

impl RemoteRegion {
    /// Checks that `len` bytes at `offset` lie inside the granted range.
    pub fn check(&self, offset: u64, len: u64) -> Result<(), TransportError> {
        let end = offset.checked_add(len);
        match end {
            Some(end) if offset >= self.offset && end <= self.offset + self.len => Ok(()),
            _ => Err(TransportError::OutOfRange {
                offset,
                len,
                granted_offset: self.offset,
                granted_len: self.len,
            }),
        }
    }
}

/// Why a transport operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The write would fall outside the range the target granted.
    #[error("write of {len} bytes at {offset} is outside the granted range {granted_offset}+{granted_len}")]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Start of the granted range.
        granted_offset: u64,
        /// Length of the granted range.
        granted_len: u64,
    },
    /// `window` writes are already in flight: wait for completions first.
    #[error("{0} writes in flight: the window is full")]
    WindowFull(usize),
    /// The payload's entries are not in the writer's registered region.
    #[error("payload entries are not in the writer's region: {0}")]
    ForeignPayload(&'static str),
    /// The payload has more entries than the transport can send in one write.
    #[error("payload has {entries} entries, the transport takes at most {max}")]
    TooManyEntries {
        /// Entries in the payload.
        entries: usize,
        /// The limit.
        max: usize,
    },
    /// The peer went away (or the connection was closed) before the write completed.
    #[error("peer disconnected")]
    Disconnected,
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer rejected the write.
    #[error("peer rejected the write: {0}")]
    Rejected(String),
    /// The RDMA device refused an operation.
    #[error("RDMA device: {0}")]
    Device(String),
    /// No RDMA device is available (or none matches the selection).
    #[error("no RDMA device: {0}")]
    NoDevice(String),
    /// An operating-system or device error.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
}

impl TransportError {
    pub(crate) fn io(op: &'static str) -> impl FnOnce(io::Error) -> TransportError {
        move |source| match source.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => TransportError::Disconnected,
            _ => TransportError::Io { op, source },
        }
    }
}

/// Something a writer can send: scatter-gather entries inside a region, kept valid for as
/// long as the value lives.
///
/// # Safety
/// While the value lives, the bytes described by `entries()` must lie inside `region()` and
/// must not be written by anyone (transports read them from other threads, or a NIC does).
pub unsafe trait Payload: Send + Sync + 'static {
    /// The region the entries point into.
    fn region(&self) -> &Region;
    /// The entries, in order.
    fn entries(&self) -> &[Sge];

    /// Total bytes.
    fn total_len(&self) -> u64 {
        self.entries().iter().map(|e| u64::from(e.len)).sum()
    }
}

// SAFETY: the entries point into segments of the builder the message owns and never mutates
// after framing, or into its own scratch lease.
unsafe impl Payload for OutboundMessage {
    fn region(&self) -> &Region {
        OutboundMessage::region(self)
    }

    fn entries(&self) -> &[Sge] {
        OutboundMessage::entries(self)
    }
}

/// Raw bytes in a lease: the first `len` bytes of it as one entry.
#[derive(Debug)]
pub struct LeasePayload {
    lease: BlockLease,
    entry: [Sge; 1],
}

impl LeasePayload {
    /// Sends the first `len` bytes of `lease` (at most its length, at most 4 GiB - 1).
    pub fn new(lease: BlockLease, len: u32) -> Self {
        let len = u64::from(len).min(lease.len()) as u32;
        let entry = [Sge {
            offset: lease.offset(),
            len,
        }];
        Self { lease, entry }
    }

    /// The lease back.
    pub fn into_lease(self) -> BlockLease {
        self.lease
    }
}

// SAFETY: the entry lies inside the lease, which this value owns; the lease gives out mutable
// access only through `into_lease`, which consumes the payload.
unsafe impl Payload for LeasePayload {
    fn region(&self) -> &Region {
        self.lease.region()
    }

    fn entries(&self) -> &[Sge] {
        &self.entry
    }
}

/// The bytes of each entry of `payload`, in order.
pub(crate) fn payload_slices<P: Payload>(payload: &P) -> impl Iterator<Item = &[u8]> {
    payload.entries().iter().map(move |e| {
        // SAFETY: the Payload contract: the entries lie in the region and nobody writes them
        // while the payload lives; the region was checked when the write was posted.
        unsafe { payload.region().bytes(e.offset, u64::from(e.len)) }.unwrap_or_default()
    })
}

/// Every check a write passes before it is posted: the payload lies in the writer's region
/// (`local`), its destination in the granted range, and the window has room
/// (`(in_flight, window)`).
pub(crate) fn check_post<P: Payload>(
    payload: &P,
    local: &Region,
    remote: &RemoteRegion,
    remote_offset: u64,
    (in_flight, window): (usize, usize),
) -> Result<(), TransportError> {
    check_payload(payload, local)?;
    remote.check(remote_offset, payload.total_len())?;
    if in_flight >= window {
        return Err(TransportError::WindowFull(in_flight));
    }
    Ok(())
}

/// Checks that a payload's entries lie inside the writer's region (`local`: the shm writer
/// passes the target's region instead for a payload built there).
pub(crate) fn check_payload<P: Payload>(payload: &P, local: &Region) -> Result<(), TransportError> {
    if payload.region().id() != local.id() {
        return Err(TransportError::ForeignPayload("region id differs"));
    }
    for e in payload.entries() {
        local
            .check_range(e.offset, u64::from(e.len))
            .map_err(|_| TransportError::ForeignPayload("entry outside the region's data area"))?;
    }
    Ok(())
}

/// A write that could not be posted, with its payload handed back.
#[derive(Debug)]
pub struct SendError<P> {
    /// The payload, untouched.
    pub payload: P,
    /// Why.
    pub error: TransportError,
}

/// The end of a posted write.
#[derive(Debug)]
pub struct Completion<P> {
    /// The id `post_write` returned.
    pub id: u64,
    /// The payload, handed back.
    pub payload: P,
    /// `Ok` when every byte landed and the target was notified.
    pub status: Result<(), TransportError>,
}

/// A write that has fully landed in the target's region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Incoming {
    /// The writer's immediate: in the application's protocol, which slot was written.
    pub imm: u32,
    /// Where the bytes landed, when the transport learns it (tcp and shm do; an RDMA WRITE
    /// with immediate tells the target only the immediate).
    pub at: Option<Landed>,
}

/// Where a write landed in the target's region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Landed {
    /// Offset in the target's region.
    pub offset: u64,
    /// Bytes written.
    pub len: u64,
}

/// The writing end of a connection.
#[allow(async_fn_in_trait)]
pub trait Writer {
    /// What the writer sends.
    type Payload: Payload;

    /// The range the target granted.
    fn remote(&self) -> RemoteRegion;

    /// Most writes in flight at once.
    fn window(&self) -> usize;

    /// Writes posted and not yet returned by [`Writer::completions`].
    fn in_flight(&self) -> usize;

    /// Posts a write of `payload`'s entries to `remote_offset` in the target's region, with
    /// `imm` delivered to the target after the last byte. Does not wait.
    fn post_write(
        &mut self,
        payload: Self::Payload,
        remote_offset: u64,
        imm: u32,
    ) -> Result<u64, SendError<Self::Payload>>;

    /// Waits until at least one posted write has finished (returns at once if some have), and
    /// appends every finished one to `out`, in posting order. Returns how many were added;
    /// `Ok(0)` only when nothing is in flight.
    async fn completions(
        &mut self,
        out: &mut Vec<Completion<Self::Payload>>,
    ) -> Result<usize, TransportError>;
}

/// The receiving end of a connection.
#[allow(async_fn_in_trait)]
pub trait Target {
    /// The local region.
    fn region(&self) -> &Region;

    /// The range granted to the writer, as the writer sees it.
    fn granted(&self) -> RemoteRegion;

    /// Waits until at least one write has fully landed and appends the landed writes to `out`,
    /// in order. `Err(Disconnected)` once the writer is gone and everything it completed has
    /// been delivered.
    async fn incoming(&mut self, out: &mut Vec<Incoming>) -> Result<usize, TransportError>;
}

/// Fuzz entry point: feeds `data` to every decoder of bytes a transport peer sends (the tcp
/// HELLO, WRITE header and ACK; the shm HELLO; the verbs endpoint exchange). Must never panic.
#[doc(hidden)]
pub fn fuzz_decode_control(data: &[u8]) {
    let _ = shm::Hello::decode(data);
    let _ = tcp::Hello::decode(data);
    let _ = tcp::decode_ack(data);
    let granted = match tcp::Hello::decode(data) {
        Ok(hello) => hello.remote,
        Err(_) => RemoteRegion {
            region_id: 1,
            rkey: 0,
            base: 0,
            offset: 4096,
            len: 1 << 20,
        },
    };
    for start in [0usize, tcp::HELLO_LEN] {
        if let Some(rest) = data.get(start..) {
            if let Ok(h) = tcp::WriteHeader::decode(rest, &granted) {
                assert!(
                    h.offset >= granted.offset && h.offset + h.len <= granted.offset + granted.len
                );
            }
        }
    }
    #[cfg(feature = "verbs")]
    verbs::fuzz_decode_endpoint(data);
    #[cfg(feature = "verbs")]
    verbs::rc::fuzz_decode_rc_endpoint(data);
}
