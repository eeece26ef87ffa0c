//! One store per Unix socket path: a store never takes over a path another live store serves,
//! still replaces the socket a crashed store left behind, and on its way out removes only the
//! socket it bound itself.
//!
//! ```text
//!  SocketClaim::bind(P)
//!   1. open P.lock, flock(LOCK_EX | LOCK_NB) ── another store holds it ──▶ Locked (its pid,
//!      (held for the store's lifetime; the kernel                          read from P.lock)
//!       drops it when the process dies, even by kill -9)
//!   2. write this store's pid into P.lock
//!   3. P exists?  a socket that accepts a connection ────────────────────▶ Served (peer pid)
//!                 a socket that refuses it (its store is gone) ─▶ unlink it
//!                 anything else ─────────────────────────────────────────▶ NotASocket
//!   4. bind P, remember its (device, inode)
//!   ... serve ...
//!   drop: unlink P if it is still that (device, inode), unlink P.lock, close it (lock freed)
//! ```
//!
//! The lock makes two stores racing for one path exact: exactly one gets it. The connection
//! probe of step 3 only runs once the lock is held, for a socket whose owner holds no lock (a
//! process that does not take it).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use tokio::net::{UnixListener, UnixStream};

/// Why a store could not claim its Unix socket path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketLockError {
    /// Another store holds the path's lock: it is running and serves the path.
    #[error(
        "unix socket {} is in use by another running store{} (it holds {}); not taking it over",
        path.display(),
        pid_note(*pid),
        lock.display()
    )]
    Locked {
        /// The socket path.
        path: PathBuf,
        /// The lock file beside it.
        lock: PathBuf,
        /// The other store's process id, as it wrote it into the lock file (`None` if the file
        /// holds none yet).
        pid: Option<u32>,
    },
    /// The socket at the path accepted a connection: some process serves it.
    #[error(
        "unix socket {} is served by another process{} (a connection to it succeeded); not taking it over",
        path.display(),
        pid_note(*pid)
    )]
    Served {
        /// The socket path.
        path: PathBuf,
        /// The serving process's id, from the connection's peer credentials when the kernel
        /// gives them.
        pid: Option<u32>,
    },
    /// Something other than a socket is at the path; it is not removed.
    #[error("{} exists and is not a socket; not replacing it", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A system call failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file it was done to.
        path: PathBuf,
        /// The system error.
        source: io::Error,
    },
}

fn pid_note(pid: Option<u32>) -> String {
    pid.map_or_else(String::new, |pid| format!(", pid {pid}"))
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SocketLockError + 'a {
    move |source| SocketLockError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// (device, inode): which file a path names.
type FileId = (u64, u64);

fn file_id(m: &fs::Metadata) -> FileId {
    (m.dev(), m.ino())
}

/// What is at `path` now, without following a symlink (`None`: nothing).
fn id_at(path: &Path) -> io::Result<Option<FileId>> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(file_id(&m))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A Unix socket path this store owns, with the listener bound there: the lock beside the
/// socket is held while this lives. Dropping it removes the socket (if it is still the one
/// bound here) and the lock file, then frees the lock.
#[derive(Debug)]
pub struct SocketClaim {
    path: PathBuf,
    lock_path: PathBuf,
    /// Open (and locked) for as long as the claim lives.
    lock: File,
    /// The socket bound at `path` (`None` until it is: a claim that fails before then only
    /// removes its lock file).
    socket_id: Option<FileId>,
}

impl SocketClaim {
    /// Claims `path` and binds a listener there (see the module docs): refuses with
    /// [`SocketLockError::Locked`] or [`SocketLockError::Served`] when another store serves
    /// the path, replaces a socket whose store is gone.
    pub async fn bind(path: &Path) -> Result<(SocketClaim, UnixListener), SocketLockError> {
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let lock = lock(path, &lock_path)?;
        // From here on, a failure drops `claim`, which removes the lock file again.
        let mut claim = SocketClaim {
            path: path.to_owned(),
            lock_path,
            lock,
            socket_id: None,
        };
        clear_stale(path).await?;
        let listener = UnixListener::bind(path).map_err(io_err("bind", path))?;
        let socket_id = id_at(path).map_err(io_err("stat bound socket", path))?;
        if socket_id.is_none() {
            return Err(io_err("stat bound socket", path)(
                io::ErrorKind::NotFound.into(),
            ));
        }
        claim.socket_id = socket_id;
        Ok((claim, listener))
    }
}

/// Opens and locks `lock_path` (creating it), and writes this process's id into it.
fn lock(path: &Path, lock_path: &Path) -> Result<File, SocketLockError> {
    loop {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(lock_path)
            .map_err(io_err("open lock file", lock_path))?;
        if !crate::flock::try_lock_exclusive(&file).map_err(io_err("flock", lock_path))? {
            let mut text = String::new();
            let pid = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(SocketLockError::Locked {
                path: path.to_owned(),
                lock: lock_path.to_owned(),
                pid,
            });
        }
        // A store stopping removes its lock file while it still holds the lock: if that
        // happened between our open and our flock, the lock we hold guards a file no longer
        // at the path, and a third store could lock a new one. Only a lock on the file the
        // path names counts.
        let held = file_id(
            &file
                .metadata()
                .map_err(io_err("stat lock file", lock_path))?,
        );
        if id_at(lock_path).map_err(io_err("stat lock file", lock_path))? != Some(held) {
            continue;
        }
        let pid = format!("{}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
            .map_err(io_err("write pid to lock file", lock_path))?;
        return Ok(file);
    }
}

/// Removes a socket at `path` that no process serves any more; refuses one that answers and
/// anything that is not a socket. The caller holds the path's lock.
async fn clear_stale(path: &Path) -> Result<(), SocketLockError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("stat", path)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketLockError::NotASocket {
            path: path.to_owned(),
        });
    }
    match UnixStream::connect(path).await {
        Ok(stream) => {
            let pid = stream
                .peer_cred()
                .ok()
                .and_then(|c| c.pid())
                .and_then(|p| u32::try_from(p).ok());
            Err(SocketLockError::Served {
                path: path.to_owned(),
                pid,
            })
        }
        // A full backlog: a listener is there, just slow to accept.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(SocketLockError::Served {
            path: path.to_owned(),
            pid: None,
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => match fs::remove_file(path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "replaced a stale socket (its store is gone)");
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove stale socket", path)(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("connect to the existing socket", path)(e)),
    }
}

impl Drop for SocketClaim {
    fn drop(&mut self) {
        // The lock is still held here: no store that takes it can bind the path or lock a new
        // lock file meanwhile.
        match (self.socket_id, id_at(&self.path)) {
            (None, _) => {}
            (Some(ours), Ok(Some(id))) if id == ours => {
                if let Err(e) = fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "removing the socket");
                }
            }
            (Some(_), Ok(Some(_))) => tracing::warn!(
                path = %self.path.display(),
                "another process bound the socket path after this store; leaving its socket"
            ),
            (Some(_), Ok(None)) => {}
            (Some(_), Err(e)) => {
                tracing::warn!(path = %self.path.display(), error = %e, "checking the socket")
            }
        }
        let held = self.lock.metadata().map(|m| file_id(&m)).ok();
        if held.is_some() && id_at(&self.lock_path).ok().flatten() == held {
            let _ = fs::remove_file(&self.lock_path);
        }
        // `self.lock` closes after this: the lock is freed.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "staging-store-socket-lock-{tag}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn a_second_claim_is_refused_with_the_holders_pid_until_the_first_is_dropped() {
        let dir = dir("second");
        let path = dir.join("s.sock");
        let (first, _listener) = SocketClaim::bind(&path).await.unwrap();
        match SocketClaim::bind(&path).await {
            Err(SocketLockError::Locked { path: p, lock, pid }) => {
                assert_eq!(p, path);
                assert_eq!(lock, dir.join("s.sock.lock"));
                assert_eq!(pid, Some(std::process::id()));
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        assert!(path.exists(), "the refused claim left the socket alone");
        drop(first);
        assert!(!path.exists() && !dir.join("s.sock.lock").exists());
        let (_again, _l) = SocketClaim::bind(&path).await.unwrap();
        let _ = fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_socket_nobody_serves_is_replaced_and_one_that_answers_is_not() {
        let dir = dir("stale");
        let path = dir.join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a dropped listener leaves its socket file");
        let (claim, _l) = SocketClaim::bind(&path).await.unwrap();
        drop(claim);

        // A listener that takes no lock: found by connecting to it.
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        match SocketClaim::bind(&path).await {
            Err(SocketLockError::Served { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected Served, got {other:?}"),
        }
        drop(live);
        let _ = fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_is_left_alone() {
        let dir = dir("file");
        let path = dir.join("s.sock");
        fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            SocketClaim::bind(&path).await,
            Err(SocketLockError::NotASocket { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), b"not a socket");
        assert!(
            !dir.join("s.sock.lock").exists(),
            "a failed claim removes its lock file"
        );
        let _ = fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_socket_bound_by_someone_else_after_this_store_survives_its_drop() {
        let dir = dir("replaced");
        let path = dir.join("s.sock");
        let (claim, _l) = SocketClaim::bind(&path).await.unwrap();
        fs::remove_file(&path).unwrap();
        let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(claim);
        assert!(path.exists(), "the other process's socket is still there");
        drop(other);
        let _ = fs::remove_dir_all(dir);
    }
}
