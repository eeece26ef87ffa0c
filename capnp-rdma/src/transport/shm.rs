//! The shared-memory backend: writer and target on the same host, one copy (or none).
//!
//! The target passes its region's memfd to the writer, which maps it and copies each write's
//! entries straight into the granted range; a notification ring in a second shared memfd
//! carries `(imm, offset, len, seq)` to the target, and an eventfd wakes the target only when
//! it has gone to sleep. A Unix socket sets the connection up and then only tells each side
//! when the other is gone.
//!
//! A producer that builds its message in the grant itself, where it is to land (a
//! [`SlotMessage`](crate::slot::SlotMessage) in a slot of [`ShmWriter::target_region`]), is
//! not copied at all: the write is the ring notification (see *In place* below).
//!
//! ```text
//!  setup (Unix socket)
//!  target                                                              writer
//!  accept ◀──────────────────────────── connect ──────────────────── ShmWriter::connect(path)
//!  HELLO  magic "CRSH" | version u32 | region id u64 | offset u64 | len u64
//!         | window u32 | ring capacity u32                                      (40 bytes)
//!         + SCM_RIGHTS [region memfd, ring memfd, eventfd] ──────────▶ Region::open_fd, map ring
//!
//!  one write
//!  writer process                                    target process (maps the same pages)
//!  post_write ─ check_post (region, grant, window)
//!             ─ memcpy each entry ─────────────────▶ region[off .. off+len]
//!               (none for an entry already there: built in place)
//!             ─ push (imm, off, len, seq), release ▶ ring ──▶ incoming(): acquire head,
//!             ─ eventfd write, only if the target          check seq and range, announce
//!               has set consumer_sleeping ─────────▶ wakes it
//!  window credit: head - tail ◀─────────────────────────────── tail += n (release)
//!  the socket carries nothing more: end-of-stream = the peer is gone
//! ```
//!
//! The ring's layout is drawn in [`ring`].
//!
//! ## In place
//! ```text
//!  writer process: ShmWriter::target_region() = its own mapping of the target's region
//!  ┌ grant (granted range of the target's region) ──────────────────────────────────────────┐
//!  │ slot 0: [table | segment 0: root, header, Y, U, V]  slot 1: [ ... ]  ...                │
//!  └──▲───────────────────────────────────────────────────────────────────────────────────┘
//!     │ SlotMessage::new(target_region, slot, len); init_frame; plane_mut ◀─ pixels
//!     │ into_payload(): one entry (slot, framed len): standard stream framing, contiguous
//!  post_write(payload, slot, imm): entry already at its destination → nothing copied;
//!     push (imm, slot, len, seq) ─▶ ring ─▶ target: incoming(), read_frame(slot bytes)
//! ```
//! - The writer takes payloads from its own region or from the target's
//!   ([`ShmWriter::target_region`]; the other backends take only their own). An entry of the
//!   target's region that already sits at its destination is not copied
//!   ([`WriterStats::zero_copy_writes`], [`WriterStats::bytes_copied`]); one elsewhere in that
//!   region is moved with one `memmove`.
//! - [`SlotMessage`](crate::slot::SlotMessage) builds a message contiguously in a slot:
//!   the 8-byte one-segment table, then segment 0 holding the whole message, so the framed
//!   message is one entry. [`frame_capacity`](crate::slot::SlotMessage::frame_capacity) sizes
//!   a slot for a frame exactly; a message that outgrows its slot is an
//!   [`Overflow`](crate::slot::SlotError::Overflow) at `finish`, never a copy.
//! - Who writes the slot when: the producer builds the message, then posts it; the target
//!   reads the slot once the write is announced; the producer must not build in that slot
//!   again until the target is done with it (the application's protocol: credits, acks), and
//!   the slot must be zero again before the next message is built there (capnp's contract;
//!   whoever recycles it zeroes it).
//! - Measured with `frame-bench transport` (systems `shm` and `shm-copy`): the hand-off costs
//!   the same for any frame size, where copying costs a frame-sized `memcpy`.
//!
//! ```
//! use capnp_rdma::frame::{FrameSpec, FrameView, PixelFormat};
//! use capnp_rdma::reader::{read_frame, ReadOptions};
//! use capnp_rdma::slot::{SlotMessage, SlotPayload};
//! use capnp_rdma::transport::shm::{ShmOptions, ShmTarget, ShmWriter};
//! use capnp_rdma::transport::{Target, Writer};
//! use capnp_rdma::{Region, RegionOptions};
//!
//! # let runtime = tokio::runtime::Builder::new_multi_thread()
//! #     .worker_threads(2)
//! #     .enable_all()
//! #     .build()
//! #     .unwrap();
//! # runtime.block_on(async {
//! # let dir = std::env::temp_dir().join(format!("capnp-rdma-shm-slot-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! # let path = dir.join("target.sock");
//! let spec = FrameSpec::new(PixelFormat::I420, 1280, 720);
//! let slot_len = SlotMessage::frame_capacity(&spec).unwrap();
//! let target_region = Region::create(&RegionOptions::memfd(16 << 20)).unwrap();
//! let grant = target_region.lease(slot_len).unwrap(); // one slot
//! let listener = tokio::net::UnixListener::bind(&path).unwrap();
//! let accept = tokio::spawn(async move {
//!     ShmTarget::accept(&listener, grant, &ShmOptions::default()).await
//! });
//! let local = Region::create(&RegionOptions::memfd(4 << 20)).unwrap();
//! let mut writer = ShmWriter::<SlotPayload>::connect(&path, &local).await.unwrap();
//! let mut target = accept.await.unwrap().unwrap();
//!
//! // Build the frame where the target will read it.
//! let slot = writer.remote().offset;
//! // SAFETY: the grant is fresh (zeroed), only this message writes the slot, and the target
//! // reads it only once the write is announced.
//! let mut message = unsafe { SlotMessage::new(writer.target_region(), slot, slot_len) }.unwrap();
//! message.init_frame(&spec).unwrap().plane_mut(0).unwrap().fill(16);
//! let payload = message.into_payload().unwrap();
//! writer.post_write(payload, slot, 1).map_err(|e| e.error).unwrap();
//! assert_eq!((writer.stats().zero_copy_writes, writer.stats().bytes_copied), (1, 0));
//!
//! let mut landed = Vec::new();
//! target.incoming(&mut landed).await.unwrap();
//! let at = landed[0].at.unwrap();
//! // SAFETY: the writer does not write the slot again.
//! let bytes = unsafe { target.region().bytes(at.offset, at.len) }.unwrap();
//! let (frame, _) = read_frame(bytes, &ReadOptions::default()).unwrap();
//! assert_eq!(FrameView::new(&frame).unwrap().plane(0).unwrap()[0], 16);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # });
//! ```
//!
//! ## Semantics
//! - **A write** passes [`check_post`](super) on the writer (payload in the writer's region
//!   or the target's, destination in the grant, window), then its entries are copied back to
//!   back to `remote_offset`, one `memcpy` each (none for an entry already at its
//!   destination, see *In place*), and its notification is pushed with release ordering.
//!   The target announces an entry only after reading it with acquire ordering, so nothing
//!   half-written is ever announced.
//! - **Completions.** A write is finished when `post_write` returns: its bytes are in place and
//!   the target notified. [`completions`](super::Writer::completions) therefore never waits;
//!   it hands the payloads back in order. The window counts both uncollected completions and
//!   notifications the target has not taken with `incoming()` (the ring's `tail` is the
//!   credit), so a writer that outruns its target gets
//!   [`WindowFull`](super::TransportError::WindowFull); [`ShmWriter::ready`] waits for credit
//!   by polling `tail` with a short back-off (spin, yield, then 1 ms sleeps).
//! - **Waking.** `incoming()` polls the ring [`ShmOptions::spin_polls`] times, then sets
//!   `consumer_sleeping`, re-checks the ring (a write pushed in between is not missed), and
//!   awaits the eventfd. The writer writes the eventfd only when it finds the flag set (and
//!   clears it), so a busy target costs the writer no system call.
//! - **Disconnects.** The target gone (end-of-stream on the socket, seen in `post_write` and
//!   `completions`) makes uncollected writes whose notification it never took complete with
//!   `Err(Disconnected)`, and later posts fail with `Disconnected`, payload handed back. The
//!   writer gone: the target first delivers everything already in the ring, then reports
//!   `Disconnected`. A target dropped while its writer may still be writing keeps the granted
//!   lease (in a task on the current tokio runtime) until the writer has seen the disconnect
//!   and closed its end, so blocks are never recycled under a late copy. (A target dropped
//!   outside any runtime releases the lease at once; a writer that never posts or collects
//!   again after the target is gone holds it until the writer is dropped.)
//! - **Trust.** Both peers map the target's region: a writer can write anything anywhere in
//!   it. The grant is enforced on the writer and every ring entry is checked again by the
//!   target (sequence number, reserved bits, range; a bad entry ends the connection with a
//!   typed error and is not announced), which catches bugs, not malice. Use shm only between
//!   trusted processes on one host; across a trust boundary use the [`tcp`](super::tcp)
//!   backend. The writer's handle on the target's region takes one of its owner slots
//!   ([`owner_slot`](crate::Region::owner_slot)) until the writer is dropped; a killed
//!   writer's slot is freed by [`reclaim_dead_owners`](crate::Region::reclaim_dead_owners).
//!
//! ## Example
//! ```
//! use capnp_rdma::transport::shm::{ShmOptions, ShmTarget, ShmWriter};
//! use capnp_rdma::transport::{LeasePayload, Target, Writer};
//! use capnp_rdma::{Region, RegionOptions};
//!
//! let runtime = tokio::runtime::Builder::new_multi_thread()
//!     .worker_threads(2)
//!     .enable_all()
//!     .build()
//!     .unwrap();
//! runtime.block_on(async {
//!     let dir = std::env::temp_dir().join(format!("capnp-rdma-shm-doc-{}", std::process::id()));
//!     std::fs::create_dir_all(&dir).unwrap();
//!     let path = dir.join("target.sock");
//!     let listener = tokio::net::UnixListener::bind(&path).unwrap();
//!
//!     // The target grants 1 MiB of its region.
//!     let target_region = Region::create(&RegionOptions::memfd(4 << 20)).unwrap();
//!     let grant = target_region.lease(1 << 20).unwrap();
//!     let accept = tokio::spawn(async move {
//!         ShmTarget::accept(&listener, grant, &ShmOptions::default()).await
//!     });
//!
//!     // The writer sends a few bytes from its own region.
//!     let local = Region::create(&RegionOptions::memfd(4 << 20)).unwrap();
//!     let mut writer = ShmWriter::<LeasePayload>::connect(&path, &local).await.unwrap();
//!     let mut target = accept.await.unwrap().unwrap();
//!     let mut lease = local.lease(64).unwrap();
//!     lease.as_mut_slice()[..5].copy_from_slice(b"hello");
//!     let at = writer.remote().offset;
//!     writer.post_write(LeasePayload::new(lease, 5), at, 42).map_err(|e| e.error).unwrap();
//!
//!     let mut landed = Vec::new();
//!     target.incoming(&mut landed).await.unwrap();
//!     let place = landed[0].at.unwrap(); // shm reports where each write landed
//!     assert_eq!((landed[0].imm, place.offset, place.len), (42, at, 5));
//!     // SAFETY: the writer does not write this range again.
//!     let bytes = unsafe { target.region().bytes(place.offset, place.len) }.unwrap();
//!     assert_eq!(bytes, b"hello");
//!
//!     let mut done = Vec::new();
//!     writer.completions(&mut done).await.unwrap();
//!     assert!(done[0].status.is_ok());
//!     std::fs::remove_dir_all(&dir).unwrap();
//! });
//! ```

mod hello;
pub mod ring;
mod target;
mod writer;

pub use hello::{Hello, HELLO_FDS, HELLO_LEN};
pub use target::ShmTarget;
pub use writer::ShmWriter;

/// Tuning of shm connections (the target's choice; the writer learns it from the HELLO).
#[derive(Clone, Copy, Debug)]
pub struct ShmOptions {
    /// Most writes in flight (default 16, at most [`ring::MAX_CAPACITY`]).
    pub window: u32,
    /// Ring entries; rounded up to a power of two of at least `window` (default 0: just
    /// enough for the window).
    pub ring_capacity: u32,
    /// Times `incoming()` polls an empty ring before it sleeps on the eventfd (default 200).
    /// Polling holds the executor thread: keep it small unless the target has a core to
    /// itself.
    pub spin_polls: u32,
}

impl Default for ShmOptions {
    fn default() -> Self {
        Self {
            window: 16,
            ring_capacity: 0,
            spin_polls: 200,
        }
    }
}

/// Counters of a target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TargetStats {
    /// Writes announced by `incoming()`.
    pub delivered: u64,
    /// Polls of an empty ring before a write arrived or the target went to sleep.
    pub spins: u64,
    /// Times the target slept on the eventfd.
    pub sleeps: u64,
    /// Times the eventfd woke it.
    pub wakes: u64,
}

/// Counters of a writer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriterStats {
    /// Writes posted.
    pub writes: u64,
    /// Bytes copied into the target's region.
    pub bytes_copied: u64,
    /// Writes whose every entry already sat at its destination: nothing copied.
    pub zero_copy_writes: u64,
    /// Eventfd writes (system calls) made to wake a sleeping target.
    pub wakes_sent: u64,
}
