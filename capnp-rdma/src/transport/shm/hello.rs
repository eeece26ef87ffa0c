//! The HELLO a target sends when a writer connects, and the descriptors passed with it.

use super::ring::MAX_CAPACITY;
use crate::sys;
use crate::transport::wire::{hello_prefix, put_hello_prefix, u32_at};
use crate::transport::{RemoteRegion, TransportError};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use tokio::io::Interest;
use tokio::net::UnixStream;

const HELLO_MAGIC: u32 = u32::from_le_bytes(*b"CRSH");
const VERSION: u32 = 1;
/// Bytes of a HELLO.
pub const HELLO_LEN: usize = 40;
/// Descriptors sent with the HELLO: region memfd, ring memfd, eventfd.
pub const HELLO_FDS: usize = 3;

/// The connection parameters a target announces (the descriptors travel alongside).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The target's region and granted range.
    pub remote: RemoteRegion,
    /// Most writes in flight.
    pub window: u32,
    /// Entries in the notification ring (a power of two, at least `window`).
    pub ring_capacity: u32,
}

impl Hello {
    /// Encodes the HELLO message.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        put_hello_prefix(&mut b, HELLO_MAGIC, VERSION, &self.remote, self.window);
        b[36..40].copy_from_slice(&self.ring_capacity.to_le_bytes());
        b
    }

    /// Decodes and checks a HELLO from untrusted bytes.
    pub fn decode(b: &[u8]) -> Result<Self, TransportError> {
        let (remote, window) = hello_prefix(b, HELLO_LEN, HELLO_MAGIC, VERSION, "shm")?;
        let ring_capacity = u32_at(b, 36);
        if !ring_capacity.is_power_of_two() || ring_capacity > MAX_CAPACITY {
            return Err(TransportError::Protocol(format!(
                "ring capacity {ring_capacity} is not a power of two up to {MAX_CAPACITY}"
            )));
        }
        if ring_capacity < window {
            return Err(TransportError::Protocol(format!(
                "ring of {ring_capacity} entries for a window of {window}"
            )));
        }
        Ok(Self {
            remote,
            window,
            ring_capacity,
        })
    }
}

/// Sends the HELLO with its descriptors (attached to the first byte).
pub(super) async fn send_hello(
    stream: &UnixStream,
    hello: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), TransportError> {
    let mut sent = 0;
    while sent < hello.len() {
        let attach: &[BorrowedFd<'_>] = if sent == 0 { fds } else { &[] };
        let n = stream
            .async_io(Interest::WRITABLE, || {
                sys::send_with_fds(stream.as_fd(), &hello[sent..], attach)
            })
            .await
            .map_err(TransportError::io("send hello"))?;
        if n == 0 {
            return Err(TransportError::Disconnected);
        }
        sent += n;
    }
    Ok(())
}

/// Reads up to a HELLO's bytes (fewer at end-of-stream) and the descriptors that came with
/// them.
pub(super) async fn recv_hello(
    stream: &UnixStream,
) -> Result<([u8; HELLO_LEN], usize, Vec<OwnedFd>), TransportError> {
    let mut buf = [0u8; HELLO_LEN];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < HELLO_LEN {
        let received = stream
            .async_io(Interest::READABLE, || {
                sys::recv_with_fds(stream.as_fd(), &mut buf[got..], HELLO_FDS + 1)
            })
            .await
            .map_err(TransportError::io("read hello"))?;
        fds.extend(received.fds);
        if received.truncated || fds.len() > HELLO_FDS {
            return Err(TransportError::Protocol(
                "more descriptors than a hello carries".into(),
            ));
        }
        if received.len == 0 {
            break;
        }
        got += received.len;
    }
    Ok((buf, got, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_refuses_nonsense() {
        let hello = Hello {
            remote: RemoteRegion {
                region_id: 0xfeed,
                rkey: 0,
                base: 0,
                offset: 4096,
                len: 1 << 20,
            },
            window: 8,
            ring_capacity: 8,
        };
        assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
        for (at, value) in [(0, 0u32), (4, 9), (32, 0), (36, 12), (36, 4)] {
            let mut b = hello.encode();
            b[at..at + 4].copy_from_slice(&value.to_le_bytes());
            let e = Hello::decode(&b).unwrap_err();
            assert!(matches!(e, TransportError::Protocol(_)), "{at}: {e:?}");
        }
        assert!(Hello::decode(&hello.encode()[..39]).is_err());
    }
}
