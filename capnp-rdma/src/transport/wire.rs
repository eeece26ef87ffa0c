//! Little-endian fields of the transports' control messages, and the HELLO prefix the tcp and
//! shm targets share:
//!
//! ```text
//!  0 magic u32 | 4 version u32 | 8 region id u64 | 16 granted offset u64 | 24 granted len u64 | 32 window u32
//! ```

use super::{RemoteRegion, TransportError};

/// Bytes of the shared HELLO prefix.
pub(crate) const HELLO_PREFIX_LEN: usize = 36;

/// The u32 at `at` (the caller checked the length).
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The u64 at `at` (the caller checked the length).
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Writes the HELLO prefix into the start of `b`.
pub(crate) fn put_hello_prefix(
    b: &mut [u8],
    magic: u32,
    version: u32,
    remote: &RemoteRegion,
    window: u32,
) {
    b[0..4].copy_from_slice(&magic.to_le_bytes());
    b[4..8].copy_from_slice(&version.to_le_bytes());
    b[8..16].copy_from_slice(&remote.region_id.to_le_bytes());
    b[16..24].copy_from_slice(&remote.offset.to_le_bytes());
    b[24..32].copy_from_slice(&remote.len.to_le_bytes());
    b[32..36].copy_from_slice(&window.to_le_bytes());
}

/// Decodes and checks a HELLO prefix from untrusted bytes: `len` bytes expected in all, the
/// given magic (`peer` names the kind of peer in the error) and version, a granted range that
/// does not overflow, a window of at least 1. Returns the grant (rkey and base 0) and window.
pub(crate) fn hello_prefix(
    b: &[u8],
    len: usize,
    magic: u32,
    version: u32,
    peer: &str,
) -> Result<(RemoteRegion, u32), TransportError> {
    if b.len() >= 4 && u32_at(b, 0) != magic {
        return Err(TransportError::Protocol(format!(
            "not a capnp-rdma {peer} peer"
        )));
    }
    if b.len() < len.max(HELLO_PREFIX_LEN) {
        return Err(TransportError::Protocol(format!(
            "hello of {} bytes",
            b.len()
        )));
    }
    if u32_at(b, 4) != version {
        return Err(TransportError::Protocol(format!(
            "protocol version {} (this build speaks {version})",
            u32_at(b, 4)
        )));
    }
    let remote = RemoteRegion {
        region_id: u64_at(b, 8),
        rkey: 0,
        base: 0,
        offset: u64_at(b, 16),
        len: u64_at(b, 24),
    };
    if remote.offset.checked_add(remote.len).is_none() {
        return Err(TransportError::Protocol("granted range overflows".into()));
    }
    let window = u32_at(b, 32);
    if window == 0 {
        return Err(TransportError::Protocol("window of 0".into()));
    }
    Ok((remote, window))
}
