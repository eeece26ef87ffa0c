//! The verbs backend: real RDMA (RoCE, InfiniBand, or Soft-RoCE), through `sideway`.
//!
//! This module owns the RDMA device (`device.rs`: options, opening, the port and GID), the
//! memory registration of a whole region (`registration.rs`), RC queue pairs and their state
//! changes (`qp.rs`), the set-up exchange over TCP (`handshake.rs`), and the two ends of the
//! [`Writer`](super::Writer)/[`Target`](super::Target) transport (`writer.rs`, `target.rs`).
//! [`rc`] builds one-sided RDMA between two regions on the same pieces; `cq.rs` polls the
//! completions of both.
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
mod device;
mod handshake;
mod qp;
pub mod rc;
mod registration;
mod target;
mod writer;

pub use cq::PollStats;
pub use device::{VerbsDevice, VerbsOptions};
pub(crate) use handshake::fuzz_decode_endpoint;
pub use registration::RegisteredRegion;
pub use target::VerbsTarget;
pub use writer::VerbsWriter;
