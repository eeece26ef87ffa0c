//! The store's journal: an append-only file of what happened to streams and frames, replayed at
//! start-up to find every sealed frame again in the file-backed staging region.
//!
//! # File format
//!
//! `<dir>/journal` is a sequence of records and nothing else (no file header). All integers are
//! little-endian; a string is a `u16` byte length and that many bytes of UTF-8.
//!
//! ```text
//!  record:   0        4        8
//!            ┌────────┬────────┬──────────────────────────────────────────┐
//!            │ len    │ crc    │ body: len bytes (1 ..= 65536)            │  × N, back to back
//!            │ u32 LE │ u32 LE │  crc = crc32c(body)                      │
//!            └────────┴────────┴──────────────────────────────────────────┘
//!  body:     ┌──────┬────────────────────────────────────────────────────────┐
//!            │ kind │ fields of the kind, in this order, nothing after them  │
//!            │ u8   │                                                        │
//!            └──────┴────────────────────────────────────────────────────────┘
//!  kind 1  StreamCreated    name: str ≤ 255, config: u16 len + bytes ≤ 4096
//!  kind 2  StreamDeleted    name: str ≤ 255
//!  kind 3  Sealed           stream: str ≤ 255, seq u64, lease_offset u64, lease_len u64,
//!                           data_offset u64, data_len u64, crc32c u32, unix_nanos u64
//!  kind 4  Freed            stream: str ≤ 255, seq u64
//!  kind 5  Cursor           stream: str ≤ 255, consumer: str ≤ 255, next_seq u64
//!  kind 6  ConsumerDeleted  stream: str ≤ 255, consumer: str ≤ 255
//! ```
//!
//! The encoding is canonical: a body that decodes re-encodes to the same bytes (trailing bytes,
//! overlong strings, invalid UTF-8 and unknown kinds are rejected). A length field is checked
//! against the 64 KiB cap before anything is read or allocated, so arbitrary bytes never make
//! the decoder panic or allocate more than the input's size.
//!
//! # Crash semantics
//!
//! Each record is encoded into a reused buffer and written with **one `write(2)`** on a file
//! opened with `O_APPEND`; a failed or short write is cut off again (`ftruncate` to the previous
//! length), so a live journal never has garbage in the middle.
//!
//! - **Torn tail.** A crash (or power failure) during or shortly after an append can leave the
//!   last record incomplete: fewer than 8 header bytes, a body shorter than its length, a body
//!   that reaches the end of the file but fails its CRC (its pages never reached the disk), or a
//!   tail of zeroes (the file grew but its data was lost). [`Journal::open`] cuts such a tail
//!   off ([`Recovered::torn_tail_bytes`]) and appends continue after the last whole record. The
//!   records lost were never acknowledged as durable (see `SyncPolicy`), so nothing promised
//!   is lost.
//! - **Corruption.** Any other bad record — a CRC mismatch with more data after it, a length of 0
//!   or above 64 KiB followed by non-zero bytes, a body whose CRC matches but which does not
//!   decode — means the file was damaged (or written by something else). Replay **stops there**:
//!   records after a bad one are not trusted, because what they describe (a cursor, a freed
//!   frame) may depend on the one lost. The whole file is first copied to
//!   `journal.corrupt-<unix nanos>` for inspection, then the journal is truncated to the records
//!   before the bad one, and [`Recovered::corrupt`] says where, why, how many bytes were set
//!   aside and how many intact records followed the bad one. Truncating (rather than keeping the
//!   file as is) matters: records appended after a bad one would otherwise never be replayed.
//!   Replay therefore always yields a **prefix** of the records appended.
//! - **`Freed` before reuse.** The store must append a frame's `Freed` record *before* its
//!   blocks can be reused (before the lease is dropped). Because replay only ever yields a
//!   prefix, a later `Sealed` record describing a new frame in the same blocks is then never
//!   replayed without the `Freed` that ended the old one; the other order could bring back, after
//!   a crash, an old `Sealed` record pointing at blocks that now hold (or are being written with)
//!   another frame. Recovery still checks each frame's bytes against its [`frame_crc`] and the
//!   adopted lease against `lease_len`, and rejects what does not match.
//! - **[`SyncPolicy`]** decides what survives a power failure or kernel crash (a process crash,
//!   `kill -9` included, loses nothing that `append` returned: the page cache has it).
//!   `Never` leaves write-back to the kernel: the tail since its last write-back may be lost.
//!   `Seal` calls `fdatasync` after each `Sealed` record, which makes it *and every record
//!   before it* durable: an acknowledged frame survives, and so does the `Freed` of any frame whose
//!   blocks it reuses; cursor moves and deletions since the last seal may be lost (consumers see
//!   frames again: at-least-once). `Always` syncs after every record. The frame's bytes live in
//!   the region file, not here: sync them first (`Region::sync_data`) for the frame, not only its
//!   record, to survive a power failure; otherwise its CRC check rejects it at recovery.
//! - **Compaction** ([`Journal::compact`]) writes the live records to `journal.tmp`, syncs it,
//!   renames it over `journal` and syncs the directory: a crash leaves either the old or the new
//!   journal, both describing the same live state. A stale `journal.tmp` is removed at open.
//!
//! One process at a time: [`Journal::open`] takes an exclusive `flock` on the directory.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Bytes of a record header: body length and CRC.
pub const HEADER_BYTES: usize = 8;
/// Largest body a record may have (bigger length fields are corruption, never allocated).
pub const MAX_BODY_BYTES: usize = 64 << 10;
/// Longest stream or consumer name, in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest stream configuration blob.
pub const MAX_CONFIG_BYTES: usize = 4096;

const KIND_STREAM_CREATED: u8 = 1;
const KIND_STREAM_DELETED: u8 = 2;
const KIND_SEALED: u8 = 3;
const KIND_FREED: u8 = 4;
const KIND_CURSOR: u8 = 5;
const KIND_CONSUMER_DELETED: u8 = 6;

const JOURNAL_FILE: &str = "journal";
const TMP_FILE: &str = "journal.tmp";

/// One journal record.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Record {
    /// A stream was created.
    StreamCreated {
        /// Stream name (≤ 255 bytes).
        name: String,
        /// The stream's configuration in the store's own encoding; opaque here (≤ 4096 bytes).
        config: Vec<u8>,
    },
    /// A stream was deleted (with its frames and consumers).
    StreamDeleted {
        /// Stream name.
        name: String,
    },
    /// A frame was sealed: its bytes are complete in the region and it is readable.
    Sealed {
        /// Stream name.
        stream: String,
        /// The frame's sequence number in the stream.
        seq: u64,
        /// Region offset of the kept allocation holding the frame (what `Region::adopt` takes).
        lease_offset: u64,
        /// Length of that allocation in bytes.
        lease_len: u64,
        /// Region offset of the frame's first byte (inside the allocation).
        data_offset: u64,
        /// Length of the frame in bytes.
        data_len: u64,
        /// [`frame_crc`] of the frame's bytes.
        crc32c: u32,
        /// When it was sealed, in nanoseconds since the Unix epoch.
        unix_nanos: u64,
    },
    /// The frame left the stream; its blocks may be reused once this record is appended.
    Freed {
        /// Stream name.
        stream: String,
        /// The frame's sequence number.
        seq: u64,
    },
    /// A consumer's position: the next sequence number it will read.
    Cursor {
        /// Stream name.
        stream: String,
        /// Consumer name (≤ 255 bytes).
        consumer: String,
        /// Next sequence number to deliver.
        next_seq: u64,
    },
    /// A consumer was removed from a stream.
    ConsumerDeleted {
        /// Stream name.
        stream: String,
        /// Consumer name.
        consumer: String,
    },
}

impl Record {
    /// The stream the record is about.
    pub fn stream(&self) -> &str {
        match self {
            Record::StreamCreated { name, .. } | Record::StreamDeleted { name } => name,
            Record::Sealed { stream, .. }
            | Record::Freed { stream, .. }
            | Record::Cursor { stream, .. }
            | Record::ConsumerDeleted { stream, .. } => stream,
        }
    }

    /// The kind byte that starts the record's body.
    pub fn kind(&self) -> u8 {
        match self {
            Record::StreamCreated { .. } => KIND_STREAM_CREATED,
            Record::StreamDeleted { .. } => KIND_STREAM_DELETED,
            Record::Sealed { .. } => KIND_SEALED,
            Record::Freed { .. } => KIND_FREED,
            Record::Cursor { .. } => KIND_CURSOR,
            Record::ConsumerDeleted { .. } => KIND_CONSUMER_DELETED,
        }
    }
}

/// When [`Journal::append`] calls `fdatasync`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Never: survives process crashes, not power failures (see the module docs).
    Never,
    /// After each [`Record::Sealed`] (which makes every earlier record durable too).
    #[default]
    Seal,
    /// After every record.
    Always,
}

/// Why a journal operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// A system call failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The system error.
        source: io::Error,
    },
    /// A field is longer than the format allows; nothing was written.
    #[error("{field} is {len} bytes, longer than the {max} a journal record allows")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Another process (or another `Journal` in this one) has the directory open.
    #[error("journal directory {} is locked by another store", dir.display())]
    Locked {
        /// The directory.
        dir: PathBuf,
    },
    /// A write or sync failed and the journal could not be brought back to a known state (the
    /// failed record could not be cut off, or `fdatasync` failed and the kernel may have dropped
    /// the dirty pages); appends are refused. Reopen the journal (replay finds what made it to
    /// the file), or [`Journal::compact`].
    #[error("journal {} is unusable after an earlier failure; reopen it", path.display())]
    Poisoned {
        /// The journal file.
        path: PathBuf,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Why decoding stopped before the end of the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer than 8 bytes left: not even a header.
    #[error("{available} bytes left, less than a record header")]
    PartialHeader {
        /// Bytes left.
        available: u64,
    },
    /// The length field is 0 or above [`MAX_BODY_BYTES`].
    #[error("record length {len} is not in 1..={MAX_BODY_BYTES}")]
    BadLength {
        /// The length field.
        len: u32,
    },
    /// The body is longer than what is left of the input.
    #[error("record of {len} bytes, only {available} left")]
    PartialBody {
        /// The length field.
        len: u32,
        /// Body bytes left.
        available: u64,
    },
    /// The body's CRC does not match the header's.
    #[error("crc32c {computed:#010x} of the body, header says {stored:#010x}")]
    BadCrc {
        /// The header's CRC.
        stored: u32,
        /// The body's.
        computed: u32,
    },
    /// The kind byte is none of the known kinds.
    #[error("unknown record kind {kind}")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
    },
    /// The body ends inside a field.
    #[error("body ends inside field {field}")]
    FieldTruncated {
        /// Which field.
        field: &'static str,
    },
    /// A string or blob is longer than the format allows.
    #[error("{field} is {len} bytes, more than {max}")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A string is not UTF-8.
    #[error("{field} is not UTF-8")]
    NotUtf8 {
        /// Which field.
        field: &'static str,
    },
    /// Bytes after the last field of the kind.
    #[error("{bytes} bytes after the last field")]
    TrailingBytes {
        /// How many.
        bytes: usize,
    },
}

/// Where and why [`decode_all`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stop {
    /// Bytes of whole, valid records before the stop (the input's length when `error` is `None`).
    pub offset: u64,
    /// Why decoding stopped there; `None` at the end of the input.
    pub error: Option<DecodeError>,
}

/// What the bytes from a [`Stop`] to the end of the input are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tail {
    /// Nothing: the input ended with a whole record.
    Clean,
    /// An append that did not complete: cut it off.
    Torn {
        /// Bytes from the stop to the end.
        bytes: u64,
    },
    /// Damage: replay stops here.
    Corrupt {
        /// Bytes from the stop to the end.
        bytes: u64,
        /// Whole, valid records that follow the bad one back to back (0 when its length field
        /// cannot be trusted to find the next one).
        records_after: u64,
    },
}

/// Corruption found by [`Journal::open`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptAt {
    /// Offset of the bad record (= bytes of records replayed).
    pub offset: u64,
    /// What is wrong with it.
    pub reason: DecodeError,
    /// Bytes from the bad record to the end of the file, cut off the journal.
    pub discarded_bytes: u64,
    /// Intact records that followed the bad one back to back, not replayed.
    pub records_after: u64,
    /// Where the file was copied, as it was, before it was truncated.
    pub preserved_as: PathBuf,
}

/// What [`Journal::open`] replayed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Every record up to the end, a torn tail or the first corrupt record, in append order.
    pub records: Vec<Record>,
    /// Bytes of an incomplete last append that were cut off (0 if none).
    pub torn_tail_bytes: u64,
    /// Corruption that stopped replay, if any.
    pub corrupt: Option<CorruptAt>,
}

// ---------------------------------------------------------------------------------------------
// Encoding.

fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), JournalError> {
    if len > max {
        return Err(JournalError::TooLong { field, len, max });
    }
    Ok(())
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Callers checked the length against a limit below u16::MAX.
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_name(out: &mut Vec<u8>, field: &'static str, name: &str) -> Result<(), JournalError> {
    check_len(field, name.len(), MAX_NAME_BYTES)?;
    put_bytes(out, name.as_bytes());
    Ok(())
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn encode_body(record: &Record, out: &mut Vec<u8>) -> Result<(), JournalError> {
    out.push(record.kind());
    match record {
        Record::StreamCreated { name, config } => {
            put_name(out, "stream name", name)?;
            check_len("stream config", config.len(), MAX_CONFIG_BYTES)?;
            put_bytes(out, config);
        }
        Record::StreamDeleted { name } => put_name(out, "stream name", name)?,
        Record::Sealed {
            stream,
            seq,
            lease_offset,
            lease_len,
            data_offset,
            data_len,
            crc32c,
            unix_nanos,
        } => {
            put_name(out, "stream name", stream)?;
            for v in [*seq, *lease_offset, *lease_len, *data_offset, *data_len] {
                put_u64(out, v);
            }
            out.extend_from_slice(&crc32c.to_le_bytes());
            put_u64(out, *unix_nanos);
        }
        Record::Freed { stream, seq } => {
            put_name(out, "stream name", stream)?;
            put_u64(out, *seq);
        }
        Record::Cursor {
            stream,
            consumer,
            next_seq,
        } => {
            put_name(out, "stream name", stream)?;
            put_name(out, "consumer name", consumer)?;
            put_u64(out, *next_seq);
        }
        Record::ConsumerDeleted { stream, consumer } => {
            put_name(out, "stream name", stream)?;
            put_name(out, "consumer name", consumer)?;
        }
    }
    Ok(())
}

/// Appends `record`, framed (header and body), to `out`. On error `out` is left as it was.
pub fn encode_record(record: &Record, out: &mut Vec<u8>) -> Result<(), JournalError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_BYTES]);
    if let Err(e) = encode_body(record, out) {
        out.truncate(start);
        return Err(e);
    }
    let body = &out[start + HEADER_BYTES..];
    // Names and config are capped, so every body is far below MAX_BODY_BYTES.
    debug_assert!(body.len() <= MAX_BODY_BYTES);
    let len = (body.len() as u32).to_le_bytes();
    let crc = crc32c::crc32c(body).to_le_bytes();
    out[start..start + 4].copy_from_slice(&len);
    out[start + 4..start + 8].copy_from_slice(&crc);
    Ok(())
}

/// CRC-32C (Castagnoli, hardware accelerated where the CPU has it) of a frame's bytes, as
/// recorded in [`Record::Sealed`].
pub fn frame_crc(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Continues a [`frame_crc`] over more bytes, for a frame stored in several pieces:
/// `frame_crc_append(frame_crc(a), b) == frame_crc(a ++ b)`.
pub fn frame_crc_append(crc: u32, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, bytes)
}

// ---------------------------------------------------------------------------------------------
// Decoding.

/// A bounds-checked reader over one record body.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError::FieldTruncated { field });
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, field)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, field)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn bytes(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let b = self.take(2, field)?;
        let len = usize::from(u16::from_le_bytes([b[0], b[1]]));
        if len > max {
            return Err(DecodeError::TooLong { field, len, max });
        }
        self.take(len, field)
    }

    fn name(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes(field, MAX_NAME_BYTES)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::NotUtf8 { field })
    }

    fn finish(self) -> Result<(), DecodeError> {
        match self.rest.len() {
            0 => Ok(()),
            bytes => Err(DecodeError::TrailingBytes { bytes }),
        }
    }
}

fn decode_body(body: &[u8]) -> Result<Record, DecodeError> {
    let (&kind, rest) = body
        .split_first()
        .ok_or(DecodeError::FieldTruncated { field: "kind" })?;
    let mut f = Fields { rest };
    let record = match kind {
        KIND_STREAM_CREATED => Record::StreamCreated {
            name: f.name("stream name")?,
            config: f.bytes("stream config", MAX_CONFIG_BYTES)?.to_vec(),
        },
        KIND_STREAM_DELETED => Record::StreamDeleted {
            name: f.name("stream name")?,
        },
        KIND_SEALED => Record::Sealed {
            stream: f.name("stream name")?,
            seq: f.u64("seq")?,
            lease_offset: f.u64("lease_offset")?,
            lease_len: f.u64("lease_len")?,
            data_offset: f.u64("data_offset")?,
            data_len: f.u64("data_len")?,
            crc32c: f.u32("crc32c")?,
            unix_nanos: f.u64("unix_nanos")?,
        },
        KIND_FREED => Record::Freed {
            stream: f.name("stream name")?,
            seq: f.u64("seq")?,
        },
        KIND_CURSOR => Record::Cursor {
            stream: f.name("stream name")?,
            consumer: f.name("consumer name")?,
            next_seq: f.u64("next_seq")?,
        },
        KIND_CONSUMER_DELETED => Record::ConsumerDeleted {
            stream: f.name("stream name")?,
            consumer: f.name("consumer name")?,
        },
        kind => return Err(DecodeError::UnknownKind { kind }),
    };
    f.finish()?;
    Ok(record)
}

/// Decodes the record at the start of `bytes`: the record and its framed length.
fn decode_one(bytes: &[u8]) -> Result<(Record, usize), DecodeError> {
    if bytes.len() < HEADER_BYTES {
        return Err(DecodeError::PartialHeader {
            available: bytes.len() as u64,
        });
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    let stored = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if len == 0 || len as usize > MAX_BODY_BYTES {
        return Err(DecodeError::BadLength { len });
    }
    let available = bytes.len() - HEADER_BYTES;
    if len as usize > available {
        return Err(DecodeError::PartialBody {
            len,
            available: available as u64,
        });
    }
    let body = &bytes[HEADER_BYTES..HEADER_BYTES + len as usize];
    let computed = crc32c::crc32c(body);
    if computed != stored {
        return Err(DecodeError::BadCrc { stored, computed });
    }
    Ok((decode_body(body)?, HEADER_BYTES + len as usize))
}

/// Decodes records from the start of `bytes` until the end or the first bad record. Pure and
/// bounds-checked: any input is safe, and nothing is allocated beyond the records themselves
/// (which are smaller than the input).
pub fn decode_all(bytes: &[u8]) -> (Vec<Record>, Stop) {
    let mut records = Vec::new();
    let mut offset = 0usize;
    while offset < bytes.len() {
        match decode_one(&bytes[offset..]) {
            Ok((record, used)) => {
                records.push(record);
                offset += used;
            }
            Err(error) => {
                return (
                    records,
                    Stop {
                        offset: offset as u64,
                        error: Some(error),
                    },
                )
            }
        }
    }
    (
        records,
        Stop {
            offset: offset as u64,
            error: None,
        },
    )
}

/// Decides whether what follows `stop` in `bytes` is a torn append or corruption (see the
/// module docs): a partial header or body, a bad CRC on a record that ends exactly at the end
/// of the input, or nothing but zeroes is torn; anything else is corrupt.
pub fn classify(bytes: &[u8], stop: &Stop) -> Tail {
    let Some(error) = stop.error else {
        return Tail::Clean;
    };
    let rest = bytes.get(stop.offset as usize..).unwrap_or_default();
    let tail_bytes = rest.len() as u64;
    if rest.iter().all(|&b| b == 0) {
        return Tail::Torn { bytes: tail_bytes };
    }
    // The bad record's framed length, when its header can be trusted that far (decoding checked
    // the length before the CRC, and the CRC before the body).
    let framed = rest
        .get(..4)
        .map(|b| HEADER_BYTES + u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize);
    match error {
        DecodeError::PartialHeader { .. } | DecodeError::PartialBody { .. } => {
            return Tail::Torn { bytes: tail_bytes }
        }
        DecodeError::BadCrc { .. } if framed == Some(rest.len()) => {
            return Tail::Torn { bytes: tail_bytes }
        }
        _ => {}
    }
    // Corrupt. Count the intact records that follow the bad one back to back, to say what
    // replay leaves out; a bad length gives no way to find the next record.
    let mut records_after = 0;
    if !matches!(error, DecodeError::BadLength { .. }) {
        let mut next = framed.and_then(|n| rest.get(n..)).unwrap_or_default();
        while let Ok((_, used)) = decode_one(next) {
            records_after += 1;
            next = &next[used..];
        }
    }
    Tail::Corrupt {
        bytes: tail_bytes,
        records_after,
    }
}

/// Fuzzing entry point: decodes arbitrary bytes and checks the decoder's invariants — no panic,
/// the records re-encode to exactly the bytes they were decoded from, the valid prefix decodes
/// cleanly on its own, every record round-trips alone, and the tail classification is
/// consistent. Panics when an invariant does not hold.
#[doc(hidden)]
pub fn fuzz_decode(data: &[u8]) {
    let (records, stop) = decode_all(data);
    let offset = usize::try_from(stop.offset).expect("offset within the input");
    assert!(offset <= data.len());
    assert_eq!(stop.error.is_none(), offset == data.len(), "{stop:?}");

    let mut encoded = Vec::with_capacity(offset);
    for record in &records {
        encode_record(record, &mut encoded).expect("a decoded record re-encodes");
    }
    assert_eq!(
        encoded.as_slice(),
        &data[..offset],
        "re-encoding is not canonical"
    );

    let (again, clean) = decode_all(&data[..offset]);
    assert_eq!(again, records);
    assert_eq!(
        clean,
        Stop {
            offset: stop.offset,
            error: None
        }
    );

    let mut one = Vec::new();
    for record in &records {
        one.clear();
        encode_record(record, &mut one).expect("re-encodes");
        let (decoded, used) = decode_one(&one).expect("round trip");
        assert_eq!((&decoded, used), (record, one.len()));
    }

    match (classify(data, &stop), stop.error) {
        (Tail::Clean, None) => {}
        (Tail::Clean, Some(e)) => panic!("stopped with {e} but classified clean"),
        (_, None) => panic!("clean input classified as a bad tail"),
        (Tail::Torn { bytes }, Some(_)) | (Tail::Corrupt { bytes, .. }, Some(_)) => {
            assert_eq!(bytes, data.len() as u64 - stop.offset);
        }
    }

    // Appending a valid record to the valid prefix is read back (what `open` relies on after
    // cutting a tail off).
    let mut extended = data[..offset].to_vec();
    let probe = Record::Freed {
        stream: "s".into(),
        seq: records.len() as u64,
    };
    encode_record(&probe, &mut extended).expect("encodes");
    let (with_probe, end) = decode_all(&extended);
    assert!(end.error.is_none());
    assert_eq!(with_probe.last(), Some(&probe));
    assert_eq!(with_probe.len(), records.len() + 1);
}

// ---------------------------------------------------------------------------------------------
// The journal file.

/// The journal: an open, locked, append-only file (see the module docs).
pub struct Journal {
    dir: PathBuf,
    path: PathBuf,
    /// The directory, open for `flock` (held while the journal lives) and `fsync`.
    dir_file: File,
    file: File,
    sync: SyncPolicy,
    buf: Vec<u8>,
    len: u64,
    poisoned: bool,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("sync", &self.sync)
            .field("len", &self.len)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

fn lock_dir(dir_file: &File, dir: &Path) -> Result<(), JournalError> {
    match crate::flock::try_lock_exclusive(dir_file) {
        Ok(true) => Ok(()),
        Ok(false) => Err(JournalError::Locked {
            dir: dir.to_owned(),
        }),
        Err(e) => Err(io_err("flock", dir)(e)),
    }
}

fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn open_append(path: &Path) -> Result<File, JournalError> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(io_err("open journal", path))
}

impl Journal {
    /// Opens (creating `dir` and the file if absent) and replays the journal in `dir`: cuts off
    /// a torn tail, and on corruption preserves a copy of the file and cuts it off at the bad
    /// record (see the module docs). Takes an exclusive lock on `dir` for the journal's life.
    pub fn open(dir: &Path, sync: SyncPolicy) -> Result<(Journal, Recovered), JournalError> {
        std::fs::create_dir_all(dir).map_err(io_err("create journal directory", dir))?;
        let dir_file = File::open(dir).map_err(io_err("open journal directory", dir))?;
        lock_dir(&dir_file, dir)?;
        let path = dir.join(JOURNAL_FILE);
        let tmp = dir.join(TMP_FILE);
        match std::fs::remove_file(&tmp) {
            Ok(()) => tracing::info!(path = %tmp.display(), "removed an unfinished compaction"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove stale compaction file", &tmp)(e)),
        }
        let existed = path.exists();
        let mut file = open_append(&path)?;
        if !existed {
            dir_file
                .sync_all()
                .map_err(io_err("fsync journal directory", dir))?;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(io_err("read journal", &path))?;

        let (records, stop) = decode_all(&bytes);
        let mut recovered = Recovered {
            records,
            ..Recovered::default()
        };
        match classify(&bytes, &stop) {
            Tail::Clean => {}
            Tail::Torn { bytes: torn } => {
                tracing::warn!(
                    path = %path.display(),
                    offset = stop.offset,
                    bytes = torn,
                    reason = ?stop.error,
                    "cutting off a torn journal tail"
                );
                file.set_len(stop.offset)
                    .map_err(io_err("truncate torn journal tail", &path))?;
                file.sync_data()
                    .map_err(io_err("fdatasync journal", &path))?;
                recovered.torn_tail_bytes = torn;
            }
            Tail::Corrupt {
                bytes: discarded_bytes,
                records_after,
            } => {
                let preserved_as = dir.join(format!("{JOURNAL_FILE}.corrupt-{}", unix_nanos()));
                let mut copy = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&preserved_as)
                    .map_err(io_err("create copy of corrupt journal", &preserved_as))?;
                copy.write_all(&bytes)
                    .and_then(|()| copy.sync_all())
                    .map_err(io_err("write copy of corrupt journal", &preserved_as))?;
                dir_file
                    .sync_all()
                    .map_err(io_err("fsync journal directory", dir))?;
                file.set_len(stop.offset)
                    .map_err(io_err("truncate corrupt journal", &path))?;
                file.sync_data()
                    .map_err(io_err("fdatasync journal", &path))?;
                let reason = stop.error.expect("a corrupt tail has a decode error");
                tracing::error!(
                    path = %path.display(),
                    offset = stop.offset,
                    %reason,
                    discarded_bytes,
                    records_after,
                    preserved_as = %preserved_as.display(),
                    "journal is corrupt: replay stops at the bad record"
                );
                recovered.corrupt = Some(CorruptAt {
                    offset: stop.offset,
                    reason,
                    discarded_bytes,
                    records_after,
                    preserved_as,
                });
            }
        }
        let journal = Journal {
            dir: dir.to_owned(),
            path,
            dir_file,
            file,
            sync,
            buf: Vec::with_capacity(512),
            len: stop.offset,
            poisoned: false,
        };
        Ok((journal, recovered))
    }

    /// Appends one record with one `write(2)`, then syncs as the [`SyncPolicy`] says. On error
    /// nothing of the record stays in the file (a partial write is cut off again); if that
    /// cannot be ensured, or `fdatasync` fails, the journal refuses further appends
    /// ([`JournalError::Poisoned`]).
    pub fn append(&mut self, record: &Record) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        self.buf.clear();
        encode_record(record, &mut self.buf)?;
        if let Err(e) = write_once(&self.file, &self.buf) {
            if self.file.set_len(self.len).is_err() {
                self.poisoned = true;
            }
            return Err(io_err("append to journal", &self.path)(e));
        }
        self.len += self.buf.len() as u64;
        let sync = match self.sync {
            SyncPolicy::Never => false,
            SyncPolicy::Seal => matches!(record, Record::Sealed { .. }),
            SyncPolicy::Always => true,
        };
        if sync {
            self.sync()?;
        }
        Ok(())
    }

    /// `fdatasync`s the journal now: every record appended so far is durable when it returns.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        self.file.sync_data().map_err(|e| {
            // After a failed fdatasync the kernel may have dropped the dirty pages and a retry
            // could "succeed" without them: trust nothing more this handle writes.
            self.poisoned = true;
            io_err("fdatasync journal", &self.path)(e)
        })
    }

    /// Bytes in the journal file.
    pub fn len_bytes(&self) -> u64 {
        self.len
    }

    /// The journal file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sync policy.
    pub fn sync_policy(&self) -> SyncPolicy {
        self.sync
    }

    /// Replaces the journal with `live` (the records that describe the current state, in
    /// replay order): written to `journal.tmp`, fsynced, renamed over `journal`, and the
    /// directory fsynced. A failure before the rename leaves the old journal in place and in
    /// use. A successful compaction also clears [`JournalError::Poisoned`].
    pub fn compact(&mut self, live: impl IntoIterator<Item = Record>) -> Result<(), JournalError> {
        let tmp = self.dir.join(TMP_FILE);
        let written = match write_snapshot(&tmp, live) {
            Ok(written) => written,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if let Err(e) = std::fs::rename(&tmp, &self.path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err("rename compacted journal", &self.path)(e));
        }
        // `self.file` is the old, now unlinked, file: nothing may be appended to it any more.
        match open_append(&self.path) {
            Ok(file) => {
                self.file = file;
                self.len = written;
                self.poisoned = false;
            }
            Err(e) => {
                self.poisoned = true;
                return Err(e);
            }
        }
        self.dir_file
            .sync_all()
            .map_err(io_err("fsync journal directory", &self.dir))
    }
}

/// One `write(2)` for a whole record; a short write (possible on a full disk) is continued,
/// and an error returned as is.
fn write_once(mut file: &File, bytes: &[u8]) -> io::Result<()> {
    let mut written = 0;
    while written < bytes.len() {
        match file.write(&bytes[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_snapshot(tmp: &Path, live: impl IntoIterator<Item = Record>) -> Result<u64, JournalError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(io_err("create compacted journal", tmp))?;
    let mut buf = Vec::with_capacity(64 << 10);
    let mut written = 0u64;
    for record in live {
        encode_record(&record, &mut buf)?;
        if buf.len() >= 1 << 20 {
            file.write_all(&buf)
                .map_err(io_err("write compacted journal", tmp))?;
            written += buf.len() as u64;
            buf.clear();
        }
    }
    file.write_all(&buf)
        .map_err(io_err("write compacted journal", tmp))?;
    written += buf.len() as u64;
    file.sync_all()
        .map_err(io_err("fsync compacted journal", tmp))?;
    Ok(written)
}
