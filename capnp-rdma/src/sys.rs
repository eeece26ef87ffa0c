//! Every call into the operating system lives here, behind owning types.
//!
//! [`Mapping`] owns a shared memory mapping and unmaps it on drop; file descriptors are
//! `OwnedFd`/`File`. The rest of the crate never calls `libc` directly.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// A `MAP_SHARED` read-write mapping of a file descriptor, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access the crate makes to it goes through
// atomics or through the block-ownership protocol of the region (a block is written only by the
// holder of its allocation), never through thread-affine state.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` hands out only raw pointers and atomics.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0, shared and writable.
    pub(crate) fn map_shared(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh mapping at an address the kernel chooses cannot alias any Rust object;
        // the arguments are valid (fd is open, len > 0), and failure is reported as MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Self { ptr, len })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn advise(&self, advice: libc::c_int) -> io::Result<()> {
        // SAFETY: the range is exactly this mapping, which stays mapped while `self` lives;
        // madvise does not change the contents for the advices used here.
        let rc = unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, advice) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Faults every page in for writing, without changing contents.
    ///
    /// Uses `MADV_POPULATE_WRITE`; on kernels without it, touches each page with an atomic
    /// read-modify-write of zero, which is safe even while other processes use the memory.
    pub(crate) fn prefault(&self, page_size: usize) -> io::Result<()> {
        match self.advise(libc::MADV_POPULATE_WRITE) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let mut offset = 0;
                while offset < self.len {
                    // SAFETY: `offset < len`, so the byte is inside the mapping; AtomicU8 has
                    // alignment 1; the mapping outlives this reference.
                    let byte = unsafe {
                        &*self
                            .ptr
                            .as_ptr()
                            .add(offset)
                            .cast::<std::sync::atomic::AtomicU8>()
                    };
                    byte.fetch_add(0, std::sync::atomic::Ordering::Relaxed);
                    offset += page_size;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Asks for transparent huge pages on this range (best effort).
    pub(crate) fn advise_huge(&self) -> io::Result<()> {
        self.advise(libc::MADV_HUGEPAGE)
    }

    /// Locks the mapping in memory.
    pub(crate) fn lock(&self) -> io::Result<()> {
        // SAFETY: the range is exactly this mapping.
        let rc = unsafe { libc::mlock(self.ptr.as_ptr().cast(), self.len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and no reference into the mapping
        // outlives `self` (every user holds the Arc that owns this Mapping).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn owned_fd(rc: libc::c_int) -> io::Result<OwnedFd> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: `rc` is a descriptor the kernel just returned to us and nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(rc) })
    }
}

/// An anonymous memory file (`memfd_create`), optionally backed by hugetlbfs pages.
pub(crate) fn memfd(name: &str, huge_2m: bool) -> io::Result<File> {
    let name = cstring(name)?;
    let mut flags = libc::MFD_CLOEXEC;
    if huge_2m {
        // MFD_HUGE_2MB = 21 << MFD_HUGE_SHIFT
        flags |= libc::MFD_HUGETLB | (21 << 26);
    }
    // SAFETY: `name` is a valid NUL-terminated string; flags are valid memfd flags.
    owned_fd(unsafe { libc::memfd_create(name.as_ptr(), flags) }).map(File::from)
}

/// Opens (or creates) a POSIX shared memory object by name.
pub(crate) fn shm_open(name: &str, create: bool) -> io::Result<File> {
    let name = cstring(&format!("/{}", name.trim_start_matches('/')))?;
    let mut flags = libc::O_RDWR | libc::O_CLOEXEC;
    if create {
        flags |= libc::O_CREAT | libc::O_EXCL;
    }
    // SAFETY: `name` is a valid NUL-terminated string; mode is a plain permission mask.
    owned_fd(unsafe { libc::shm_open(name.as_ptr(), flags, 0o600) }).map(File::from)
}

/// Removes a POSIX shared memory object's name.
pub(crate) fn shm_unlink(name: &str) -> io::Result<()> {
    let name = cstring(&format!("/{}", name.trim_start_matches('/')))?;
    // SAFETY: `name` is a valid NUL-terminated string.
    if unsafe { libc::shm_unlink(name.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reserves backing store for `len` bytes so a later write cannot hit SIGBUS.
pub(crate) fn fallocate(file: &File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on an open descriptor.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The soft RLIMIT_MEMLOCK in bytes (`None` = unlimited).
pub(crate) fn memlock_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return None;
    }
    (lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

/// The system page size.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// This process's id.
pub(crate) fn pid() -> u32 {
    std::process::id()
}

/// Start time of process `pid` in clock ticks since boot (field 22 of /proc/PID/stat), which
/// together with the pid names one process even after the pid is reused.
pub(crate) fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3; field 22 is the 20th field from here.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// Waits while `word == expected`, for at most `timeout`, on a futex that may be shared
/// between processes (the word lives in a `MAP_SHARED` mapping).
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `word` is a live, aligned u32 for the duration of the call; a shared (non-private)
    // FUTEX_WAIT only reads it. Spurious returns are fine: callers re-check their condition.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes every waiter on `word` (in any process).
pub(crate) fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: `word` is a live, aligned u32; FUTEX_WAKE does not access memory beyond it.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

/// Lowers the calling thread's scheduling priority (nice +10) so background work yields to
/// the threads on the frame path when cores are scarce. Best effort.
pub(crate) fn lower_thread_priority() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: plain syscall; PRIO_PROCESS with a thread id adjusts only that thread on Linux.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}

/// A non-blocking, close-on-exec eventfd with a counter of 0.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with valid flags; the result is checked by `owned_fd`.
    owned_fd(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
}

/// Adds `n` to an eventfd's counter (wakes a reader). `WouldBlock` if the counter would
/// overflow, which only happens when the reader has not read for 2^64 - 2 wake-ups.
pub(crate) fn eventfd_write(fd: BorrowedFd<'_>, n: u64) -> io::Result<()> {
    let bytes = n.to_ne_bytes();
    // SAFETY: `bytes` is a live 8-byte buffer for the duration of the call; an eventfd takes
    // exactly 8-byte writes.
    let rc = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    if rc == 8 {
        Ok(())
    } else if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Err(io::Error::other("short eventfd write"))
    }
}

/// Reads and resets an eventfd's counter (`WouldBlock` when it is 0 on a non-blocking fd).
pub(crate) fn eventfd_read(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    // SAFETY: `bytes` is a live, writable 8-byte buffer for the duration of the call.
    let rc = unsafe { libc::read(fd.as_raw_fd(), bytes.as_mut_ptr().cast(), bytes.len()) };
    if rc == 8 {
        Ok(u64::from_ne_bytes(bytes))
    } else if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Err(io::Error::other("short eventfd read"))
    }
}

/// Room for the control message of at most this many descriptors.
const MAX_PASSED_FDS: usize = 8;
/// A control-message buffer, aligned for `cmsghdr` (u64 alignment covers it on Linux).
type CmsgBuf = [u64; 8];

/// Sends `data` on a connected Unix stream socket with `fds` attached (SCM_RIGHTS), without
/// blocking and without SIGPIPE. Returns the bytes sent; the descriptors travel with the first
/// byte, so a caller finishing a short send sends the rest with no descriptors.
pub(crate) fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_PASSED_FDS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let raw: Vec<libc::c_int> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let fd_bytes = std::mem::size_of_val(raw.as_slice());
    let mut cmsg: CmsgBuf = [0; 8];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes as libc::c_uint) } as usize;
        debug_assert!(space <= std::mem::size_of::<CmsgBuf>());
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `cmsg`, aligned for cmsghdr and at least CMSG_SPACE of
        // the descriptor bytes long (MAX_PASSED_FDS ints fit in 64 bytes), so the first header
        // and its data lie inside the buffer; nothing else references `cmsg` meanwhile.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&msg);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(fd_bytes as libc::c_uint) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(header),
                fd_bytes,
            );
        }
    }
    // SAFETY: `msg` points at `iov` (over `data`, only read) and `cmsg`, all live for the
    // call; the descriptors are open (borrowed) and the kernel duplicates them.
    let rc = unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &msg,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// What [`recv_with_fds`] received.
#[derive(Debug)]
pub(crate) struct Received {
    /// Bytes read into the buffer (0 at end of stream).
    pub(crate) len: usize,
    /// Descriptors that came with them (close-on-exec).
    pub(crate) fds: Vec<OwnedFd>,
    /// The sender attached more descriptors (or control data) than there was room for; the
    /// kernel closed the ones that did not fit.
    pub(crate) truncated: bool,
}

/// Receives from a Unix stream socket without blocking, taking up to `max_fds` descriptors
/// (SCM_RIGHTS) that came with the bytes.
pub(crate) fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<Received> {
    let max_fds = max_fds.min(MAX_PASSED_FDS);
    let mut cmsg: CmsgBuf = [0; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
    let space =
        unsafe { libc::CMSG_SPACE((max_fds * std::mem::size_of::<libc::c_int>()) as libc::c_uint) }
            as usize;
    msg.msg_controllen = space.min(std::mem::size_of::<CmsgBuf>()) as _;
    // SAFETY: `msg` points at `iov` (over `buf`, exclusively borrowed) and `cmsg`, both live
    // for the call and no longer than msg_iov/msg_control say.
    let rc = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: after a successful recvmsg the kernel has filled `cmsg` with msg_controllen
    // bytes of well-formed control messages; the CMSG_* macros walk only those bytes.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(header);
                let bytes = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / std::mem::size_of::<libc::c_int>() {
                    let fd = std::ptr::read_unaligned(data.cast::<libc::c_int>().add(i));
                    // Each descriptor is new in this process and owned by nobody else.
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    Ok(Received {
        len: rc as usize,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Whether the peer of a connected stream socket has closed its end (or the connection
/// failed), without consuming data or blocking. `false` while it is open, even if data is
/// waiting.
pub(crate) fn peer_closed(sock: BorrowedFd<'_>) -> bool {
    let mut byte = 0u8;
    // SAFETY: `byte` is a live one-byte buffer; MSG_PEEK leaves the data in the socket.
    let rc = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match rc {
        0 => true,
        n if n > 0 => false,
        _ => {
            let e = io::Error::last_os_error();
            !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            )
        }
    }
}

/// Shuts down a connected socket in the given direction(s); the peer reads end-of-stream.
pub(crate) fn shutdown(sock: BorrowedFd<'_>, how: std::net::Shutdown) -> io::Result<()> {
    let how = match how {
        std::net::Shutdown::Read => libc::SHUT_RD,
        std::net::Shutdown::Write => libc::SHUT_WR,
        std::net::Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: plain syscall on an open descriptor.
    if unsafe { libc::shutdown(sock.as_raw_fd(), how) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
