//! Reading the journal back at start-up: the directory lock, replay, and what to do with a bad
//! tail (a torn append is cut off; corruption is preserved in a copy, then cut off).

use super::format::{
    decode_all, decode_one, encode_record, DecodeError, Record, Stop, HEADER_BYTES,
};
use super::writer::{open_append, Journal, SyncPolicy};
use super::{io_err, JournalError, JOURNAL_FILE, TMP_FILE};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

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

/// Decides whether what follows `stop` in `bytes` is a torn append or corruption (see the
/// [module docs](super)): a partial header or body, a bad CRC on a record that ends exactly at
/// the end of the input, or nothing but zeroes is torn; anything else is corrupt.
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

impl Journal {
    /// Opens (creating `dir` and the file if absent) and replays the journal in `dir`: cuts off
    /// a torn tail, and on corruption preserves a copy of the file and cuts it off at the bad
    /// record (see the [module docs](super)). Takes an exclusive lock on `dir` for the
    /// journal's life.
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
}
