//! The control protocol: Rust types for `schemas/store.capnp`, their encoding, and the
//! bounds-checked decoding of untrusted bytes.
//!
//! ```text
//!  client                                                      store
//!    │ ── Request { id, hello(version, name, transport) } ──────▶ │ (shm: + the region's memfd)
//!    │ ◀─ Response { id, welcome } ────────────────────────────── │
//!    │ ── Request { id, create(stream, size) } ─────────────────▶ │
//!    │ ◀─ Response { id, granted(object, offset, len) } ───────── │ the bytes go into the grant:
//!    │ ── Request { id, seal(object, offset, len, crc) } ───────▶ │ in place, PUT or RDMA WRITE
//!    │ ◀─ Response { id, sealed(seq) } ────────────────────────── │
//!    │ ── Request { id, subscribe(stream, consumer, from) } ────▶ │
//!    │ ◀─ Response { id, subscribed } ─────────────────────────── │
//!    │ ◀─ Delivery { reference, seq, offset, len } ────────────── │ unasked (tcp: deliveries come
//!    │ ◀─ Ended { subscription, reason }, Notice ──────────────── │ on the data connection)
//!    │ ── Request { id, release(reference) } ───────────────────▶ │ id 0: answered only on failure
//!
//!  each direction of the control connection (Unix or TCP socket): framed messages
//!  ┌──────────────┬────────────────┬─────────────┬────────────────┬──────
//!  │ u32 segs - 1 │ u32 words × n  │ (pad to 8)  │ segments …     │ next message …
//!  └──────────────┴────────────────┴─────────────┴────────────────┴──────
//!  sending:   Request / ServerMessage ─▶ encode_request / encode_server_message ─▶ bytes
//!  receiving: bytes ─▶ MessageBuf (size limit) ─▶ decode_request / decode_server_message
//! ```
//!
//! - `requests.rs`: what a client asks ([`Request`], [`Body`]) and what it carries
//!   ([`StreamConfig`], [`Cursor`], [`Transport`]).
//! - `replies.rs`: what the store answers and sends unasked ([`ServerMessage`], [`Reply`],
//!   [`StoreError`], grants, deliveries, stats).
//! - `encode.rs`: Rust values to framed bytes; `decode.rs`: framed bytes to Rust values;
//!   `limits.rs`: the bounds decoding enforces; `message_buf.rs`: [`MessageBuf`], which cuts a
//!   byte stream into messages; `fuzz.rs`: [`fuzz_decode`].
//!
//! Decoding never trusts a length: [`MessageBuf`] rejects a message larger than its limit
//! before buffering it, the decoders read with a traversal limit of a few times the message's
//! own size, the lists of a message may not declare more elements, all together, than it has
//! words (so a few hundred bytes cannot claim millions of zero-sized elements), names are
//! bounded, and every error is a typed [`ProtoError`]. [`fuzz_decode`] runs the whole path on
//! arbitrary bytes.

mod decode;
mod encode;
mod fuzz;
mod limits;
mod message_buf;
mod replies;
mod requests;
#[cfg(test)]
mod tests;

pub use decode::{decode_config, decode_request, decode_server_message, ProtoError};
pub use encode::{encode_config, encode_request, encode_server_message};
#[doc(hidden)]
pub use fuzz::fuzz_decode;
pub use limits::{
    reader_options, MAX_CONSUMER_STATE, MAX_NAME_BYTES, MAX_RELEASE_BATCH, MAX_REQUEST_BYTES,
    MAX_SERVER_MESSAGE_BYTES,
};
pub use message_buf::MessageBuf;
pub use replies::{
    ConsumerStat, Delivery, ErrorCode, Grant, PreviousFrame, Reply, Response, ServerMessage,
    StoreError, StoreStat, StreamStat, Subscribed, Welcome,
};
pub use requests::{Body, Cursor, FullPolicy, Request, StreamConfig, Transport};

/// Protocol version spoken by this crate.
pub const VERSION: u32 = 1;

/// A stream's id: the 64-bit FNV-1a hash of its name, the same in every store and across
/// restarts (what frames carry in their `streamId`).
pub fn stream_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
