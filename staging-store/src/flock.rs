//! Exclusive advisory locks (`flock(2)`) that say which store owns a resource: the journal
//! directory ([`crate::journal`]) and a Unix socket path ([`crate::socket_lock`]).
//!
//! The lock belongs to the open file: it is held until the last descriptor of that open file
//! is closed, which the kernel does when the process dies however it dies (`kill -9`
//! included). A crashed store leaves nothing that has to be cleaned up by hand.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Takes an exclusive lock on `file` without waiting: `Ok(true)` when this open file now holds
/// it (until it is closed), `Ok(false)` when another open file holds it.
pub(crate) fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    loop {
        // SAFETY: flock only reads the descriptor number of a file we borrow for the whole
        // call; it touches no memory of this process.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(err),
        }
    }
}
