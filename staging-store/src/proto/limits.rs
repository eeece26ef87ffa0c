//! The bounds decoding enforces: message sizes, names, batches and segments, a traversal
//! limit scaled to each message's own size, and a budget of list elements per message.
//!
//! ```text
//!  bytes ─▶ MessageBuf: declared size ≤ limit, segments ≤ MAX_SEGMENTS
//!        ─▶ read_framed: traversal ≤ TRAVERSAL_FACTOR × words + slack (capped), nesting ≤ 16
//!        ─▶ decode: Σ list elements ≤ words (ListBudget), names ≤ MAX_NAME_BYTES,
//!                   releaseMany ≤ MAX_RELEASE_BATCH
//! ```

use super::ProtoError;
use capnp::message::ReaderOptions;
use capnp_rdma::reader::ReadOptions;

/// Largest control message a store accepts from a client.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Largest control message a client accepts from a store (stream listings can be long).
pub const MAX_SERVER_MESSAGE_BYTES: usize = 16 << 20;
/// Longest stream or consumer name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Largest consumer state a `commit` may record.
pub const MAX_CONSUMER_STATE: usize = 4096;
/// Most references in one `releaseMany` (and in a seal's or commit's releases).
pub const MAX_RELEASE_BATCH: usize = 4096;
/// Most segments a control message may have.
pub(super) const MAX_SEGMENTS: u32 = 16;

/// Most words a request (or a journal's configuration) may read through pointers.
pub(super) const REQUEST_TRAVERSAL_CAP_WORDS: u64 = 64 << 10;

pub(super) fn read_options() -> ReadOptions {
    ReadOptions {
        // Control messages are small: a request reads at most its own size a few times over.
        traversal_limit_words: Some(REQUEST_TRAVERSAL_CAP_WORDS),
        nesting_limit: 16,
        max_segments: MAX_SEGMENTS,
    }
}

/// The traversal limit allows this many times the message's own words (honest decoding reads
/// each object once)...
pub(super) const TRAVERSAL_FACTOR: u64 = 4;
/// ...plus this many, for the smallest messages.
const TRAVERSAL_SLACK_WORDS: u64 = 64;

/// [`read_options`] for decoding `bytes`: the traversal limit is [`TRAVERSAL_FACTOR`] times the
/// message's words plus [`TRAVERSAL_SLACK_WORDS`], and at most `cap` words.
pub(super) fn read_options_for(bytes: &[u8], cap: u64) -> ReadOptions {
    let words = (bytes.len() as u64).div_ceil(8);
    let mut options = read_options();
    options.traversal_limit_words = Some(
        words
            .saturating_mul(TRAVERSAL_FACTOR)
            .saturating_add(TRAVERSAL_SLACK_WORDS)
            .min(cap),
    );
    options
}

/// How many list elements one decode may still turn into Rust values.
///
/// Starts at the message's size in words: every element of every list in the schema costs an
/// honest encoder at least one word of its own (`UInt64`s are 8 bytes, `StreamStat` and
/// `ConsumerStat` have data and pointer sections), so no honest message holds more elements, in
/// all its lists together, than it has words. A dishonest one can declare far more at no cost (a
/// list of zero-sized structs is a tag word and a count; many list pointers may share one
/// list): [`ListBudget::take`] refuses such a list before anything is allocated or iterated.
pub(super) struct ListBudget {
    remaining: u64,
}

impl ListBudget {
    /// The budget of a message of `bytes` bytes.
    pub(super) fn new(bytes: usize) -> Self {
        Self {
            remaining: (bytes as u64).div_ceil(8),
        }
    }

    /// Takes `len` elements (a list about to be decoded), or fails if the message could not
    /// honestly hold them.
    pub(super) fn take(&mut self, len: u32) -> Result<(), ProtoError> {
        let len = u64::from(len);
        if len > self.remaining {
            return Err(ProtoError::Invalid(
                "list declares more elements than the message has words",
            ));
        }
        self.remaining -= len;
        Ok(())
    }
}

/// Options for reading a control message (exposed for the fuzz target and tests).
pub fn reader_options() -> ReaderOptions {
    read_options().capnp_options(0)
}
