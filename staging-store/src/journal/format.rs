//! The records and their bytes on disk: framing (length and CRC-32C header), the canonical
//! body encoding of each kind, the bounds-checked decoder, and the CRC-32C the store keeps of
//! each frame's bytes. The layout is drawn in the [journal](super) docs.

use super::JournalError;

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
const KIND_ENDED: u8 = 7;
const KIND_CONSUMER_STATE: u8 = 8;
const KIND_GROUP: u8 = 9;

/// Largest consumer state a record holds.
pub const MAX_STATE_BYTES: usize = 4096;
/// Most records in a group.
pub const MAX_GROUP_RECORDS: usize = 64;

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
    /// The stream's producer ended it: no frame follows its last.
    Ended {
        /// Stream name.
        stream: String,
    },
    /// A consumer's position and the state it committed with it (a sink's output position).
    ConsumerState {
        /// Stream name.
        stream: String,
        /// Consumer name.
        consumer: String,
        /// Next sequence number to deliver.
        next_seq: u64,
        /// The state (≤ [`MAX_STATE_BYTES`]).
        state: Vec<u8>,
    },
    /// Records of one store operation, replayed all or none (one body, one CRC): a seal with
    /// the releases it carries, a commit's releases with the consumer's state. Not nested; at
    /// most [`MAX_GROUP_RECORDS`].
    Group(Vec<Record>),
}

impl Record {
    /// The stream the record is about.
    pub fn stream(&self) -> &str {
        match self {
            Record::StreamCreated { name, .. } | Record::StreamDeleted { name } => name,
            Record::Sealed { stream, .. }
            | Record::Freed { stream, .. }
            | Record::Cursor { stream, .. }
            | Record::ConsumerDeleted { stream, .. }
            | Record::Ended { stream }
            | Record::ConsumerState { stream, .. } => stream,
            Record::Group(records) => records.first().map_or("", Record::stream),
        }
    }

    /// True for a [`Record::Sealed`], or a group holding one (what `SyncPolicy::Seal` syncs).
    pub fn seals(&self) -> bool {
        match self {
            Record::Sealed { .. } => true,
            Record::Group(records) => records.iter().any(Record::seals),
            _ => false,
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
            Record::Ended { .. } => KIND_ENDED,
            Record::ConsumerState { .. } => KIND_CONSUMER_STATE,
            Record::Group(_) => KIND_GROUP,
        }
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
        Record::Ended { stream } => put_name(out, "stream name", stream)?,
        Record::ConsumerState {
            stream,
            consumer,
            next_seq,
            state,
        } => {
            put_name(out, "stream name", stream)?;
            put_name(out, "consumer name", consumer)?;
            put_u64(out, *next_seq);
            check_len("consumer state", state.len(), MAX_STATE_BYTES)?;
            put_bytes(out, state);
        }
        Record::Group(records) => {
            check_len("group", records.len(), MAX_GROUP_RECORDS)?;
            out.push(records.len() as u8);
            for record in records {
                if matches!(record, Record::Group(_)) {
                    return Err(JournalError::TooLong {
                        field: "group nesting",
                        len: 2,
                        max: 1,
                    });
                }
                let at = out.len();
                out.extend_from_slice(&[0; 4]);
                encode_body(record, out)?;
                let len = (out.len() - at - 4) as u32;
                out[at..at + 4].copy_from_slice(&len.to_le_bytes());
            }
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
    // Names, config and state are capped and groups hold at most MAX_GROUP_RECORDS records
    // (each under 5 KiB), so every body is below MAX_BODY_BYTES.
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
    decode_body_at(body, 0)
}

fn decode_body_at(body: &[u8], depth: u8) -> Result<Record, DecodeError> {
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
        KIND_ENDED => Record::Ended {
            stream: f.name("stream name")?,
        },
        KIND_CONSUMER_STATE => Record::ConsumerState {
            stream: f.name("stream name")?,
            consumer: f.name("consumer name")?,
            next_seq: f.u64("next_seq")?,
            state: f.bytes("consumer state", MAX_STATE_BYTES)?.to_vec(),
        },
        KIND_GROUP if depth == 0 => {
            let count = usize::from(f.take(1, "group count")?[0]);
            if count > MAX_GROUP_RECORDS {
                return Err(DecodeError::TooLong {
                    field: "group",
                    len: count,
                    max: MAX_GROUP_RECORDS,
                });
            }
            let mut records = Vec::with_capacity(count);
            for _ in 0..count {
                let len = f.u32("group record length")? as usize;
                let inner = f.take(len, "group record")?;
                records.push(decode_body_at(inner, depth + 1)?);
            }
            Record::Group(records)
        }
        kind => return Err(DecodeError::UnknownKind { kind }),
    };
    f.finish()?;
    Ok(record)
}

/// Decodes the record at the start of `bytes`: the record and its framed length.
pub(super) fn decode_one(bytes: &[u8]) -> Result<(Record, usize), DecodeError> {
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
