//! The store's journal: an append-only file of what happened to streams and frames, replayed at
//! start-up to find every sealed frame again in the file-backed staging region.
//!
//! This module owns `<dir>/journal` and the lock on `<dir>`: the records and their bytes on disk
//! (`format.rs`), appending, syncing and compaction (`writer.rs`), and replay at start-up with
//! its torn-tail and corruption handling (`recovery.rs`).
//!
//! ```text
//!  Store: append(&Record)                           Store: compact(live records)
//!    │ writer                                         │ writer
//!    ▼                                                ▼
//!  encode_record (format): header + body            write journal.tmp, fsync it,
//!  one write(2) with O_APPEND; cut off on failure   rename it over journal, fsync <dir>
//!  fdatasync as the SyncPolicy says                   │
//!    │                                                │
//!    ▼                                                ▼
//!  ═══════════════════════ <dir>/journal: records back to back ═══════════════════════
//!    │ Journal::open reads it whole
//!    ▼ recovery: flock on <dir>, a stale journal.tmp removed
//!  decode_all (format) ─▶ classify the tail: clean
//!                                            torn    ─▶ cut off
//!                                            corrupt ─▶ copied to journal.corrupt-<ns>, cut off
//!    │
//!    ▼
//!  Recovered { records: a prefix of those appended, torn_tail_bytes, corrupt } ─▶ Store
//! ```
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
//!  kind 7  Ended            stream: str ≤ 255
//!  kind 8  ConsumerState    stream: str ≤ 255, consumer: str ≤ 255, next_seq u64,
//!                           state: u16 len + bytes ≤ 4096
//!  kind 9  Group            count u8 ≤ 64, then per record: u32 len + a body of kinds 1-8
//!                           (one operation's records: replayed all or none)
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

mod format;
mod recovery;
mod writer;

pub use format::{
    decode_all, encode_record, frame_crc, frame_crc_append, DecodeError, Record, Stop,
    HEADER_BYTES, MAX_BODY_BYTES, MAX_CONFIG_BYTES, MAX_GROUP_RECORDS, MAX_NAME_BYTES,
    MAX_STATE_BYTES,
};
pub use recovery::{classify, fuzz_decode, CorruptAt, Recovered, Tail};
pub use writer::{Journal, SyncPolicy};

use std::io;
use std::path::{Path, PathBuf};

/// The journal's file name in its directory.
const JOURNAL_FILE: &str = "journal";
/// Where compaction writes the new journal before renaming it over the old one.
const TMP_FILE: &str = "journal.tmp";

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
