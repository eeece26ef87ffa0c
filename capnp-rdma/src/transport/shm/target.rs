//! The receiving end: takes notifications off the ring, checks them, sleeps on the eventfd.

use super::hello::{send_hello, Hello};
use super::ring::{Ring, RingEntry, MAX_CAPACITY};
use super::{ShmOptions, TargetStats};
use crate::region::{BlockLease, Region};
use crate::sys;
use crate::transport::{Incoming, Landed, RemoteRegion, Target, TransportError};
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};

/// How the target's connection stands.
#[derive(Debug)]
enum State {
    Open,
    /// The writer closed its end; deliver what is in the ring, then report it.
    WriterGone,
    /// Ended with this error, not reported yet.
    Failed(TransportError),
    /// Ended and reported.
    Done,
}

/// The receiving end over shared memory: owns the granted range of its region.
#[derive(Debug)]
pub struct ShmTarget {
    /// `Some` until dropped (Drop may hand it to a task that waits for the writer).
    lease: Option<BlockLease>,
    /// `Some` until dropped, likewise.
    stream: Option<UnixStream>,
    region: Region,
    granted: RemoteRegion,
    ring: Ring,
    /// Next sequence number to take.
    tail: u64,
    eventfd: AsyncFd<OwnedFd>,
    spin_polls: u32,
    state: State,
    stats: TargetStats,
}

impl ShmTarget {
    /// Accepts one writer on `listener` and grants it the whole of `lease`.
    pub async fn accept(
        listener: &UnixListener,
        lease: BlockLease,
        options: &ShmOptions,
    ) -> Result<Self, TransportError> {
        let (stream, _) = listener
            .accept()
            .await
            .map_err(TransportError::io("accept"))?;
        Self::serve(stream, lease, options).await
    }

    /// Runs the target side on an accepted stream, granting the whole of `lease`.
    pub async fn serve(
        stream: UnixStream,
        lease: BlockLease,
        options: &ShmOptions,
    ) -> Result<Self, TransportError> {
        let window = options.window.clamp(1, MAX_CAPACITY);
        let capacity = options
            .ring_capacity
            .max(window)
            .next_power_of_two()
            .min(MAX_CAPACITY);
        let (ring, ring_file) =
            Ring::create(capacity).map_err(TransportError::io("create ring"))?;
        let eventfd = sys::eventfd().map_err(TransportError::io("eventfd"))?;
        let region = lease.region().clone();
        let granted = RemoteRegion {
            region_id: region.id(),
            rkey: 0,
            base: 0,
            offset: lease.offset(),
            len: lease.len(),
        };
        let hello = Hello {
            remote: granted,
            window,
            ring_capacity: capacity,
        };
        send_hello(
            &stream,
            &hello.encode(),
            &[region.fd(), ring_file.as_fd(), eventfd.as_fd()],
        )
        .await?;
        // SAFETY: the OwnedFd is an open eventfd that the AsyncFd owns from here on: it is
        // closed only when the AsyncFd drops it, and its raw value never changes.
        let eventfd = unsafe { AsyncFd::register_with_interest(eventfd, Interest::READABLE) }
            .map_err(|e| TransportError::io("register eventfd")(e.into()))?;
        Ok(Self {
            lease: Some(lease),
            stream: Some(stream),
            region,
            granted,
            ring,
            tail: 0,
            eventfd,
            spin_polls: options.spin_polls,
            state: State::Open,
            stats: TargetStats::default(),
        })
    }

    /// The lease holding the granted range.
    pub fn lease(&self) -> &BlockLease {
        // Invariant: `lease` is only taken in Drop.
        self.lease
            .as_ref()
            .expect("the lease lives until the target is dropped")
    }

    /// Counters.
    pub fn stats(&self) -> TargetStats {
        self.stats
    }

    /// Takes every published entry, checking each; returns how many were announced. A bad
    /// entry ends the connection (state `Failed`) and is not announced.
    fn take(&mut self, out: &mut Vec<Incoming>) -> usize {
        let mut n = 0;
        loop {
            let entry = match self.ring.peek(self.tail) {
                Ok(None) => break,
                Ok(Some(words)) => self.check(words),
                Err(msg) => Err(TransportError::Protocol(msg)),
            };
            match entry {
                Ok(incoming) => {
                    out.push(incoming);
                    self.tail += 1;
                    n += 1;
                }
                Err(e) => {
                    self.fail(e);
                    break;
                }
            }
        }
        if n > 0 {
            self.ring.release_until(self.tail);
            self.stats.delivered += n as u64;
        }
        n
    }

    /// Checks an untrusted ring entry against the sequence and the grant.
    fn check(&self, words: [u64; 4]) -> Result<Incoming, TransportError> {
        let entry = RingEntry::decode(words).map_err(|m| TransportError::Protocol(m.into()))?;
        if entry.seq != self.tail {
            return Err(TransportError::Protocol(format!(
                "ring entry {} carries sequence number {}",
                self.tail, entry.seq
            )));
        }
        self.granted.check(entry.offset, entry.len)?;
        Ok(Incoming {
            imm: entry.imm,
            at: Some(Landed {
                offset: entry.offset,
                len: entry.len,
            }),
        })
    }

    /// Ends the connection: the writer reads end-of-stream and stops posting. Only the write
    /// direction is shut, so Drop can still wait for the writer to close its end.
    fn fail(&mut self, e: TransportError) {
        if let Some(stream) = &self.stream {
            let _ = sys::shutdown(stream.as_fd(), Shutdown::Write);
        }
        self.state = State::Failed(e);
    }

    /// Polls the ring up to `spin_polls` times; true once an entry is there.
    fn spin(&mut self) -> bool {
        for _ in 0..self.spin_polls {
            if self.ring.has_entry(self.tail) {
                return true;
            }
            self.stats.spins += 1;
            std::hint::spin_loop();
        }
        false
    }

    /// Sleeps until the writer pushes (and wakes us) or closes its end.
    async fn sleep(&mut self) -> Result<(), TransportError> {
        let Some(stream) = &self.stream else {
            return Err(TransportError::Disconnected);
        };
        if !self.ring.prepare_sleep(self.tail) {
            return Ok(()); // a write arrived meanwhile
        }
        self.stats.sleeps += 1;
        let woke = tokio::select! {
            r = wait_eventfd(&self.eventfd) => Woke::Eventfd(r),
            r = wait_readable(stream) => Woke::Socket(r),
        };
        self.ring.awake();
        match woke {
            Woke::Eventfd(Ok(())) => {
                self.stats.wakes += 1;
                Ok(())
            }
            Woke::Eventfd(Err(e)) => Err(TransportError::io("read eventfd")(e)),
            Woke::Socket(Ok(0)) => {
                self.state = State::WriterGone;
                Ok(())
            }
            Woke::Socket(Ok(_)) => {
                self.fail(TransportError::Protocol(
                    "the writer sent bytes on the control socket".into(),
                ));
                Ok(())
            }
            Woke::Socket(Err(e)) => match TransportError::io("watch writer")(e) {
                TransportError::Disconnected => {
                    self.state = State::WriterGone;
                    Ok(())
                }
                other => Err(other),
            },
        }
    }
}

enum Woke {
    Eventfd(io::Result<()>),
    Socket(io::Result<usize>),
}

/// Waits for the eventfd and resets its counter.
async fn wait_eventfd(fd: &AsyncFd<OwnedFd>) -> io::Result<()> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|fd| sys::eventfd_read(fd.as_fd())) {
            Ok(r) => return r.map(drop),
            Err(_would_block) => continue,
        }
    }
}

/// Waits until the socket is readable and reads (0 = end-of-stream).
async fn wait_readable(stream: &UnixStream) -> io::Result<usize> {
    let mut buf = [0u8; 16];
    loop {
        stream.readable().await?;
        match stream.try_read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

impl Drop for ShmTarget {
    fn drop(&mut self) {
        let (Some(stream), Some(lease)) = (self.stream.take(), self.lease.take()) else {
            return;
        };
        if matches!(self.state, State::WriterGone) {
            return; // the writer has closed its end: it copies nothing more
        }
        // Tell the writer, then keep the granted blocks until it has closed its end: a copy
        // it started before seeing the end-of-stream must not land in recycled blocks.
        let _ = sys::shutdown(stream.as_fd(), Shutdown::Write);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut buf = [0u8; 64];
                loop {
                    if stream.readable().await.is_err() {
                        break;
                    }
                    match stream.try_read(&mut buf) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Ok(n) if n > 0 => continue,
                        _ => break,
                    }
                }
                drop(lease);
            });
        }
        // Without a runtime the lease is released at once (documented on the module).
    }
}

impl Target for ShmTarget {
    fn region(&self) -> &Region {
        &self.region
    }

    fn granted(&self) -> RemoteRegion {
        self.granted
    }

    async fn incoming(&mut self, out: &mut Vec<Incoming>) -> Result<usize, TransportError> {
        loop {
            match std::mem::replace(&mut self.state, State::Done) {
                State::Failed(e) => return Err(e),
                State::Done => return Err(TransportError::Disconnected),
                open_or_gone => self.state = open_or_gone,
            }
            let n = self.take(out);
            if n > 0 {
                return Ok(n); // a failure found after them is reported next time
            }
            match self.state {
                State::Open => {}
                State::WriterGone => {
                    // Everything the writer pushed before closing was taken above.
                    self.state = State::Done;
                    return Err(TransportError::Disconnected);
                }
                State::Failed(_) | State::Done => continue,
            }
            if !self.spin() {
                self.sleep().await?;
            }
        }
    }
}
