//! Passing descriptors (a region's memfd) over a Unix socket with `SCM_RIGHTS`, for services
//! that hand their region to local clients (the staging store does).
//!
//! ```no_run
//! # async fn demo(stream: tokio::net::UnixStream, region: capnp_rdma::Region) -> std::io::Result<()> {
//! use std::os::fd::AsFd;
//! // Server: the message and the region's descriptor travel together.
//! capnp_rdma::fdpass::send_with_fds(&stream, b"welcome", &[region.fd()]).await?;
//! // Client: bytes and whatever descriptors came with them.
//! let mut buf = [0u8; 64];
//! let (n, fds) = capnp_rdma::fdpass::recv_with_fds(&stream, &mut buf, 1).await?;
//! # let _ = (n, fds, stream.as_fd());
//! # Ok(()) }
//! ```

use crate::sys;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// Sends all of `data` with `fds` attached to its first byte.
pub async fn send_with_fds(
    stream: &UnixStream,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let mut sent = 0;
    while sent < data.len() {
        let attach: &[BorrowedFd<'_>] = if sent == 0 { fds } else { &[] };
        let n = stream
            .async_io(Interest::WRITABLE, || {
                sys::send_with_fds(stream.as_fd(), &data[sent..], attach)
            })
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        sent += n;
    }
    Ok(())
}

/// Receives some bytes (0 at end of stream) and up to `max_fds` descriptors that came with
/// them. More descriptors than that is an error (the kernel closed the extra ones).
pub async fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let received = stream
        .async_io(Interest::READABLE, || {
            sys::recv_with_fds(stream.as_fd(), buf, max_fds)
        })
        .await?;
    if received.truncated || received.fds.len() > max_fds {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the peer attached more descriptors than expected",
        ));
    }
    Ok((received.len, received.fds))
}
