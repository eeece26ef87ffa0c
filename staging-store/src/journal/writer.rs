//! Appending to the journal: one `write(2)` per record, `fdatasync` as the [`SyncPolicy`] says,
//! and compaction (the live records rewritten to a new file renamed over the old one).

use super::format::{encode_record, Record};
use super::{io_err, JournalError, TMP_FILE};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// When [`Journal::append`] calls `fdatasync`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Never: survives process crashes, not power failures (see the [module docs](super)).
    Never,
    /// After each [`Record::Sealed`] (which makes every earlier record durable too).
    #[default]
    Seal,
    /// After every record.
    Always,
}

/// The journal: an open, locked, append-only file (see the [module docs](super)).
pub struct Journal {
    pub(super) dir: PathBuf,
    pub(super) path: PathBuf,
    /// The directory, open for `flock` (held while the journal lives) and `fsync`.
    pub(super) dir_file: File,
    pub(super) file: File,
    pub(super) sync: SyncPolicy,
    pub(super) buf: Vec<u8>,
    pub(super) len: u64,
    pub(super) poisoned: bool,
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

pub(super) fn open_append(path: &Path) -> Result<File, JournalError> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(io_err("open journal", path))
}

impl Journal {
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
            SyncPolicy::Seal => record.seals(),
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
