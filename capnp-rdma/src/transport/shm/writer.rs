//! The writing end: copies into the mapped target region (or nothing, for a payload already at
//! its destination there), pushes to the ring, wakes the target only when it sleeps.

use super::hello::{recv_hello, Hello, HELLO_FDS};
use super::ring::{Ring, RingEntry};
use super::WriterStats;
use crate::framing::OutboundMessage;
use crate::region::{OpenOptions, Region, RegionError};
use crate::sys;
use crate::transport::{
    check_post, payload_slices, Completion, Payload, RemoteRegion, SendError, TransportError,
    Writer,
};
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::UnixStream;

fn region_error(e: RegionError) -> TransportError {
    match e {
        RegionError::Io { op, source } => TransportError::Io { op, source },
        other => TransportError::Protocol(format!("the region passed with the hello: {other}")),
    }
}

struct Pending<P> {
    id: u64,
    seq: u64,
    payload: P,
}

/// The writing end over shared memory.
pub struct ShmWriter<P: Payload = OutboundMessage> {
    local: Region,
    /// This process's handle on the target's region (its own owner slot).
    target: Region,
    remote: RemoteRegion,
    window: usize,
    ring: Ring,
    ring_file: File,
    /// Next sequence number to push.
    head: u64,
    eventfd: OwnedFd,
    stream: UnixStream,
    /// The target is gone (or broke the protocol): nothing more is posted.
    gone: bool,
    next_id: u64,
    pending: VecDeque<Pending<P>>,
    stats: WriterStats,
}

impl<P: Payload> std::fmt::Debug for ShmWriter<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmWriter")
            .field("remote", &self.remote)
            .field("head", &self.head)
            .field("in_flight", &self.pending.len())
            .field("gone", &self.gone)
            .finish()
    }
}

impl<P: Payload> ShmWriter<P> {
    /// Connects to the target listening at `path`, maps its region and ring, and learns the
    /// range it grants. Payloads come from `local`, or from the target's region itself
    /// ([`ShmWriter::target_region`]).
    pub async fn connect(path: impl AsRef<Path>, local: &Region) -> Result<Self, TransportError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(TransportError::io("connect"))?;
        let (buf, got, fds) = recv_hello(&stream).await?;
        if got == 0 {
            return Err(TransportError::Disconnected);
        }
        let hello = Hello::decode(&buf[..got])?;
        let [region_fd, ring_fd, eventfd]: [OwnedFd; HELLO_FDS] =
            fds.try_into().map_err(|fds: Vec<OwnedFd>| {
                TransportError::Protocol(format!(
                    "hello came with {} descriptors, {HELLO_FDS} expected",
                    fds.len()
                ))
            })?;
        let target = Region::open_fd(region_fd, &OpenOptions::default()).map_err(region_error)?;
        if target.id() != hello.remote.region_id {
            return Err(TransportError::Protocol(format!(
                "the region passed is {:#x}, the hello names {:#x}",
                target.id(),
                hello.remote.region_id
            )));
        }
        target
            .check_range(hello.remote.offset, hello.remote.len)
            .map_err(|e| TransportError::Protocol(format!("granted range: {e}")))?;
        let ring_file = File::from(ring_fd);
        let ring_dup = ring_file
            .try_clone()
            .map_err(TransportError::io("dup ring"))?;
        let ring = Ring::open(ring_dup, hello.ring_capacity).map_err(TransportError::Protocol)?;
        Ok(Self {
            local: local.clone(),
            target,
            remote: hello.remote,
            window: hello.window as usize,
            ring,
            ring_file,
            head: 0,
            eventfd,
            stream,
            gone: false,
            next_id: 0,
            pending: VecDeque::new(),
            stats: WriterStats::default(),
        })
    }

    /// This process's handle on the target's region. A producer that builds its messages here
    /// (and sends an entry to the offset it already occupies) is not copied at all: build with
    /// a [`SlotMessage`](crate::slot::SlotMessage) in a slot of the grant, post its
    /// [`SlotPayload`](crate::slot::SlotPayload) to the slot's offset. Payloads may come from
    /// this region as well as from the writer's own.
    pub fn target_region(&self) -> &Region {
        &self.target
    }

    /// The notification ring's memfd (layout in [`ring`](super::ring)), for tools that
    /// inspect it.
    pub fn ring_fd(&self) -> BorrowedFd<'_> {
        self.ring_file.as_fd()
    }

    /// Counters.
    pub fn stats(&self) -> WriterStats {
        self.stats
    }

    /// Waits until the window has room for another write: the target has taken enough
    /// notifications off the ring (polled with a back-off: spins, yields, then 1 ms sleeps).
    /// Returns at once if the room is held by uncollected completions instead — collect them
    /// with [`Writer::completions`]. `Err(Disconnected)` once the target is gone.
    pub async fn ready(&mut self) -> Result<(), TransportError> {
        let mut round = 0u32;
        loop {
            self.check_peer()?;
            let used = self.occupancy()?;
            if used < self.window as u64 || self.pending.len() >= self.window {
                return Ok(());
            }
            round += 1;
            if round <= 64 {
                std::hint::spin_loop();
            } else if round <= 1024 {
                tokio::task::yield_now().await;
            } else {
                if sys::peer_closed(self.stream.as_fd()) {
                    self.end();
                    return Err(TransportError::Disconnected);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    /// Notifications published and not yet taken by the target.
    fn occupancy(&mut self) -> Result<u64, TransportError> {
        self.ring.occupancy(self.head).map_err(|msg| {
            self.end();
            TransportError::Protocol(msg)
        })
    }

    /// Err once the target is gone, judging by what the runtime already knows about the
    /// socket (no system call unless it has reported it readable).
    fn check_peer(&mut self) -> Result<(), TransportError> {
        if self.gone {
            return Err(TransportError::Disconnected);
        }
        let mut buf = [0u8; 16];
        match self.stream.try_read(&mut buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(())
            }
            Ok(0) | Err(_) => {
                self.end();
                Err(TransportError::Disconnected)
            }
            Ok(_) => {
                self.end();
                Err(TransportError::Protocol(
                    "the target sent bytes on the control socket".into(),
                ))
            }
        }
    }

    /// Stops writing for good and closes our end, which tells a dropped target that its
    /// blocks are safe to recycle.
    fn end(&mut self) {
        self.gone = true;
        let _ = sys::shutdown(self.stream.as_fd(), Shutdown::Both);
    }

    /// Copies the payload's entries back to back to `remote_offset` in the target's region;
    /// returns the bytes copied and whether every entry was already in place.
    fn copy(&self, payload: &P, remote_offset: u64) -> (u64, bool) {
        let same_region = payload.region().id() == self.target.id();
        let mut dst_offset = remote_offset;
        let mut copied = 0u64;
        let mut in_place = !payload.entries().is_empty();
        for (entry, src) in payload.entries().iter().zip(payload_slices(payload)) {
            let len = u64::from(entry.len);
            let dst = self.target.data_ptr(dst_offset);
            if same_region && entry.offset == dst_offset {
                // Already at its destination.
            } else if same_region {
                // SAFETY: both ranges lie in the target region's data area (the source was
                // checked in the writer's region, which is this region under another
                // handle; the destination in the grant, which connect checked against the
                // region), and both pointers come from this process's one mapping of it, so
                // `copy` (memmove) is exact even if they overlap. No reference is formed;
                // the target reads the destination only after the notification is pushed.
                unsafe {
                    std::ptr::copy(self.target.data_ptr(entry.offset), dst, entry.len as usize)
                };
                copied += len;
                in_place = false;
            } else {
                // SAFETY: the destination `dst_offset..+len` lies in the grant (check_post)
                // and the grant in the target region's data area (checked at connect), so it
                // is inside our mapping of it; the source is a live slice of a different
                // region (another id, another memfd), so the two cannot overlap. The write
                // goes through a raw pointer derived from the mapping, never a `&mut`; the
                // target reads these bytes only after the notification is pushed.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
                copied += len;
                in_place = false;
            }
            dst_offset += len;
        }
        (copied, in_place)
    }

    /// Wakes the target if it sleeps on the eventfd (the only system call of a post).
    fn wake(&mut self) {
        if self.ring.needs_wake() {
            self.stats.wakes_sent += 1;
            // WouldBlock only means the counter is already huge: the target is awake anyway.
            let _ = sys::eventfd_write(self.eventfd.as_fd(), 1);
        }
    }
}

impl<P: Payload> Writer for ShmWriter<P> {
    type Payload = P;

    fn remote(&self) -> RemoteRegion {
        self.remote
    }

    fn window(&self) -> usize {
        self.window
    }

    fn in_flight(&self) -> usize {
        self.pending.len()
    }

    fn post_write(
        &mut self,
        payload: P,
        remote_offset: u64,
        imm: u32,
    ) -> Result<u64, SendError<P>> {
        if let Err(error) = self.check_peer() {
            return Err(SendError { payload, error });
        }
        let used = match self.occupancy() {
            Ok(used) => used as usize,
            Err(error) => return Err(SendError { payload, error }),
        };
        let credit = (self.pending.len().max(used), self.window);
        // A payload built in the target's region (a `SlotMessage` in a slot of the grant, say)
        // is checked against that region: its entries are in place, or moved within it.
        let home = if payload.region().id() == self.target.id() {
            &self.target
        } else {
            &self.local
        };
        if let Err(error) = check_post(&payload, home, &self.remote, remote_offset, credit) {
            // A target that is gone never frees its slots: ask the socket itself before
            // reporting a full window.
            let error = match error {
                TransportError::WindowFull(_) if sys::peer_closed(self.stream.as_fd()) => {
                    self.end();
                    TransportError::Disconnected
                }
                other => other,
            };
            return Err(SendError { payload, error });
        }
        let (copied, in_place) = self.copy(&payload, remote_offset);
        let seq = self.head;
        self.ring.push(&RingEntry {
            imm,
            offset: remote_offset,
            len: payload.total_len(),
            seq,
        });
        self.head += 1;
        self.wake();
        self.stats.writes += 1;
        self.stats.bytes_copied += copied;
        self.stats.zero_copy_writes += u64::from(in_place);
        let id = self.next_id;
        self.next_id += 1;
        self.pending.push_back(Pending { id, seq, payload });
        Ok(id)
    }

    async fn completions(&mut self, out: &mut Vec<Completion<P>>) -> Result<usize, TransportError> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        // Every pending write finished in post_write. If the target is gone, the ones it never
        // took off the ring were never seen: they fail.
        let gone = self.check_peer().is_err();
        let taken = self.ring.tail().load(Ordering::Acquire);
        let n = self.pending.len();
        out.extend(self.pending.drain(..).map(|p| Completion {
            id: p.id,
            payload: p.payload,
            status: if gone && p.seq >= taken {
                Err(TransportError::Disconnected)
            } else {
                Ok(())
            },
        }));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::super::hello::send_hello;
    use super::*;
    use crate::RegionOptions;
    use tokio::net::UnixListener;

    fn region() -> Region {
        Region::create(&RegionOptions::memfd(4 << 20).block_size(64 << 10)).unwrap()
    }

    fn socket_path(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("capnp-rdma-shm-unit-{tag}-{}", std::process::id()))
    }

    /// A peer that passes a different region than its HELLO names is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn region_id_must_match_the_hello() {
        let path = socket_path("id");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let named = region();
        let passed = region();
        let named_id = named.id();
        let peer = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (_ring, ring_file) = Ring::create(4).unwrap();
            let eventfd = sys::eventfd().unwrap();
            let hello = Hello {
                remote: RemoteRegion {
                    region_id: named_id,
                    rkey: 0,
                    base: 0,
                    offset: passed.geometry().data_offset,
                    len: 65536,
                },
                window: 4,
                ring_capacity: 4,
            };
            let fds = [passed.fd(), ring_file.as_fd(), eventfd.as_fd()];
            send_hello(&stream, &hello.encode(), &fds).await.unwrap();
            stream.readable().await.unwrap(); // until the writer hangs up
        });
        let err = ShmWriter::<OutboundMessage>::connect(&path, &named)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, TransportError::Protocol(m) if m.contains("hello names")),
            "{err:?}"
        );
        peer.await.unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}
