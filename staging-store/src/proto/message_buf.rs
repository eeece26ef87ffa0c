//! [`MessageBuf`]: cuts the byte stream of a connection into framed messages, in place.
//!
//! ```text
//!  socket ─read into─▶ spare() ─filled(n)─▶ [ msg │ msg │ part of a msg … ]
//!                                            start            end
//!  next_message() ─▶ the first whole msg, in place (8-byte aligned), start moves past it;
//!                    a table declaring more than the limit ─▶ ProtoError::TooLarge
//! ```

use super::limits::MAX_SEGMENTS;
use super::ProtoError;
use capnp_rdma::reader::{ReadError, SegmentTable};

/// A receive buffer that splits a byte stream into framed messages, 8-byte aligned, without
/// copying each one out.
///
/// Bytes are read into [`MessageBuf::spare`] and committed with [`MessageBuf::filled`];
/// [`MessageBuf::next_message`] yields each complete message in place. A message whose table
/// declares more than `limit` bytes is an error before any of its body is buffered.
#[derive(Debug)]
pub struct MessageBuf {
    words: Vec<capnp::Word>,
    start: usize,
    end: usize,
    limit: usize,
}

impl MessageBuf {
    /// An empty buffer for messages of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            words: capnp::Word::allocate_zeroed_vec(8192),
            start: 0,
            end: 0,
            limit,
        }
    }

    fn bytes(&self) -> &[u8] {
        capnp::Word::words_to_bytes(&self.words)
    }

    /// Room to read into: at least 4 KiB (the buffer grows or compacts as needed).
    pub fn spare(&mut self) -> &mut [u8] {
        let capacity = self.words.len() * 8;
        if capacity - self.end < 4096 {
            if self.start > 0 {
                // Move the unread bytes to the front (keeps 8-byte alignment: start is a
                // message boundary, and messages are whole words).
                let (start, end) = (self.start, self.end);
                capnp::Word::words_to_bytes_mut(&mut self.words).copy_within(start..end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if capacity - self.end < 4096 {
                self.words
                    .resize(self.words.len() * 2, capnp::word(0, 0, 0, 0, 0, 0, 0, 0));
            }
        }
        let end = self.end;
        &mut capnp::Word::words_to_bytes_mut(&mut self.words)[end..]
    }

    /// Commits `n` bytes read into [`MessageBuf::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.words.len() * 8);
    }

    /// Bytes buffered and not yet returned as messages.
    pub fn pending(&self) -> usize {
        self.end - self.start
    }

    /// The next complete message, if the buffer holds one; `Err` if the stream is broken (the
    /// connection must then be closed: framing cannot be resynchronised).
    pub fn next_message(&mut self) -> Option<Result<&[u8], ProtoError>> {
        let available = &self.bytes()[self.start..self.end];
        if available.len() < 8 {
            return None;
        }
        let table = match SegmentTable::parse(available, MAX_SEGMENTS) {
            Ok(table) => table,
            Err(ReadError::Truncated { .. }) => return None,
            Err(e) => return Some(Err(e.into())),
        };
        let len = table.message_bytes();
        if len > self.limit as u64 {
            return Some(Err(ProtoError::TooLarge {
                bytes: len,
                limit: self.limit,
            }));
        }
        let len = len as usize;
        if available.len() < len {
            if self.words.len() * 8 < len + 4096 {
                let words = (len + 4096).div_ceil(8).next_power_of_two();
                self.words
                    .resize(words, capnp::word(0, 0, 0, 0, 0, 0, 0, 0));
            }
            return None;
        }
        let start = self.start;
        self.start += len;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Some(Ok(&self.bytes()[start..start + len]))
    }
}
