//! The data connection of a tcp client: frame bytes, never through the control connection.
//!
//! ```text
//!  client ─▶ store   ATTACH  "SSDA" | version u32 | session u64 | token u64            (24 B)
//!  client ─▶ store   PUT     "SSDP" | 0 u32 | object u64 | at u64 | len u64            (32 B)
//!                            + len bytes, read by the store straight into the grant
//!  store  ─▶ client  DELIVER "SSDD" | subscription u32 | reference u64 | seq u64
//!                            | len u64 | sealed ns u64 | crc u32 | has crc u32        (48 B)
//!                            + len bytes, written from the region (the frame's lease is
//!                              held until they are sent)
//! ```
//!
//! A PUT is checked against the object's grant (this session's, unsealed, `at + len` inside)
//! before a byte of it is read; a PUT that fails the check is answered with a `notice` on the
//! control connection and its bytes are read and discarded, so the connection stays usable.
//! A header with a bad magic, or a length beyond anything the store could hold, ends the data
//! connection (and with it the seals waiting for its bytes).
//!
//! Both ends move a frame's bytes with [`read_body`] and [`write_with_header`]: one vectored
//! write of header and bytes, and a receive low-water mark so that the reader is woken once
//! per megabytes, not once per segment.

use crate::proto::Delivery;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// The most a reader waits for before it is woken (the receive low-water mark's cap; the
/// kernel grows the receive buffer to fit it). Measured with `frame-bench store` (store-tcp,
/// 1080p, 3 runs each): 256 KiB, 512 KiB, 1 MiB and 2 MiB gave 910-1075, 970-1034,
/// 1019-1052 and 892-957 frames/s, and 1 MiB the least CPU per frame.
const MAX_LOWAT: usize = 1 << 20;

/// Sets the socket's receive low-water mark: readiness (and a wake-up) only once `bytes` are
/// queued, or the connection ends.
fn set_rcvlowat(fd: std::os::fd::RawFd, bytes: usize) -> io::Result<()> {
    set_socket_int(fd, libc::SO_RCVLOWAT, bytes)
}

fn set_socket_int(fd: std::os::fd::RawFd, option: libc::c_int, value: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fd` is an open socket the caller borrows for this call; the option value points
    // at a live c_int and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Fills `dst` from the connection. While more than one segment is missing, the kernel is
/// asked to wake this reader only when all of it (up to 1 MiB) has arrived, so a
/// frame costs a few wake-ups and large copies instead of one per segment. The mark is back
/// at one byte when this returns.
pub async fn read_body(rd: &mut OwnedReadHalf, dst: &mut [u8]) -> io::Result<()> {
    let fd = rd.as_ref().as_raw_fd();
    let mut filled = 0;
    let mut lowat = 1;
    let result = async {
        while filled < dst.len() {
            let want = (dst.len() - filled).min(MAX_LOWAT);
            if want != lowat {
                set_rcvlowat(fd, want)?;
                lowat = want;
            }
            match rd.read(&mut dst[filled..]).await? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => filled += n,
            }
        }
        Ok(())
    }
    .await;
    if lowat != 1 {
        set_rcvlowat(fd, 1)?;
    }
    result
}

/// Writes `header` and `bytes` as one stream of bytes, in as few system calls as the socket
/// allows (the header does not leave as a segment of its own).
pub async fn write_with_header(
    wr: &mut OwnedWriteHalf,
    header: &[u8],
    bytes: &[u8],
) -> io::Result<()> {
    let (mut header, mut bytes) = (header, bytes);
    while !header.is_empty() {
        let n = wr
            .write_vectored(&[IoSlice::new(header), IoSlice::new(bytes)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_header = n.min(header.len());
        header = &header[from_header..];
        bytes = &bytes[n - from_header..];
    }
    wr.write_all(bytes).await
}

/// ATTACH header length.
pub const ATTACH_LEN: usize = 24;
/// PUT header length.
pub const PUT_LEN: usize = 32;
/// DELIVER header length.
pub const DELIVER_LEN: usize = 48;

const ATTACH_MAGIC: [u8; 4] = *b"SSDA";
const PUT_MAGIC: [u8; 4] = *b"SSDP";
const DELIVER_MAGIC: [u8; 4] = *b"SSDD";

/// Why a data header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DataError {
    /// Wrong magic: not a data connection, or out of step.
    #[error("bad magic {0:?}")]
    BadMagic([u8; 4]),
    /// Unknown version or reserved bits set.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// Fewer bytes than a header.
    #[error("short header: {0} bytes")]
    Short(usize),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn check(b: &[u8], len: usize, magic: [u8; 4]) -> Result<(), DataError> {
    if b.len() < len {
        return Err(DataError::Short(b.len()));
    }
    let got: [u8; 4] = b[..4].try_into().expect("4 bytes");
    if got != magic {
        return Err(DataError::BadMagic(got));
    }
    Ok(())
}

/// The first message of a data connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attach {
    /// Session from the welcome.
    pub session: u64,
    /// Token from the welcome.
    pub token: u64,
}

impl Attach {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; ATTACH_LEN] {
        let mut b = [0u8; ATTACH_LEN];
        b[..4].copy_from_slice(&ATTACH_MAGIC);
        b[4..8].copy_from_slice(&crate::proto::VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.session.to_le_bytes());
        b[16..24].copy_from_slice(&self.token.to_le_bytes());
        b
    }

    /// Decodes untrusted bytes.
    pub fn decode(b: &[u8]) -> Result<Self, DataError> {
        check(b, ATTACH_LEN, ATTACH_MAGIC)?;
        if u32_at(b, 4) != crate::proto::VERSION {
            return Err(DataError::Unsupported("data protocol version"));
        }
        Ok(Self {
            session: u64_at(b, 8),
            token: u64_at(b, 16),
        })
    }
}

/// Bytes for an object's grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Put {
    /// Object from the grant.
    pub object: u64,
    /// Offset from the grant's start.
    pub at: u64,
    /// Bytes that follow.
    pub len: u64,
}

impl Put {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; PUT_LEN] {
        let mut b = [0u8; PUT_LEN];
        b[..4].copy_from_slice(&PUT_MAGIC);
        b[8..16].copy_from_slice(&self.object.to_le_bytes());
        b[16..24].copy_from_slice(&self.at.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes untrusted bytes (the grant is checked by the store afterwards).
    pub fn decode(b: &[u8]) -> Result<Self, DataError> {
        check(b, PUT_LEN, PUT_MAGIC)?;
        if u32_at(b, 4) != 0 {
            return Err(DataError::Unsupported("reserved PUT flags"));
        }
        Ok(Self {
            object: u64_at(b, 8),
            at: u64_at(b, 16),
            len: u64_at(b, 24),
        })
    }
}

/// Encodes a delivery's header.
pub fn encode_deliver(d: &Delivery) -> [u8; DELIVER_LEN] {
    let mut b = [0u8; DELIVER_LEN];
    b[..4].copy_from_slice(&DELIVER_MAGIC);
    b[4..8].copy_from_slice(&d.subscription.to_le_bytes());
    b[8..16].copy_from_slice(&d.reference.to_le_bytes());
    b[16..24].copy_from_slice(&d.seq.to_le_bytes());
    b[24..32].copy_from_slice(&d.len.to_le_bytes());
    b[32..40].copy_from_slice(&d.sealed_nanos.to_le_bytes());
    b[40..44].copy_from_slice(&d.checksum.unwrap_or(0).to_le_bytes());
    b[44..48].copy_from_slice(&u32::from(d.checksum.is_some()).to_le_bytes());
    b
}

/// Decodes a delivery's header from untrusted bytes (`offset` is 0: the bytes follow).
pub fn decode_deliver(b: &[u8]) -> Result<Delivery, DataError> {
    check(b, DELIVER_LEN, DELIVER_MAGIC)?;
    let has_checksum = match u32_at(b, 44) {
        0 => false,
        1 => true,
        _ => return Err(DataError::Unsupported("checksum flag")),
    };
    // Without the flag the checksum field must be 0 (as `encode_deliver` writes it): a value
    // there would be silently dropped, and the header would not be canonical (found by the
    // `store_control` fuzz target).
    if !has_checksum && u32_at(b, 40) != 0 {
        return Err(DataError::Unsupported("a checksum without its flag"));
    }
    Ok(Delivery {
        subscription: u32_at(b, 4),
        reference: u64_at(b, 8),
        seq: u64_at(b, 16),
        offset: 0,
        len: u64_at(b, 24),
        sealed_nanos: u64_at(b, 32),
        checksum: has_checksum.then(|| u32_at(b, 40)),
    })
}

/// Fuzz entry point: every data-connection decoder on arbitrary bytes; what decodes
/// re-encodes to the same bytes. Must never panic.
#[doc(hidden)]
pub fn fuzz_decode(data: &[u8]) {
    if let Ok(a) = Attach::decode(data) {
        assert_eq!(&a.encode()[..], &data[..ATTACH_LEN]);
    }
    if let Ok(p) = Put::decode(data) {
        assert_eq!(&p.encode()[..], &data[..PUT_LEN]);
    }
    if let Ok(d) = decode_deliver(data) {
        assert_eq!(&encode_deliver(&d)[..], &data[..DELIVER_LEN]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_reject_garbage() {
        let a = Attach {
            session: 3,
            token: 0xfeed,
        };
        assert_eq!(Attach::decode(&a.encode()), Ok(a));
        let p = Put {
            object: 9,
            at: 16,
            len: 1 << 40,
        };
        assert_eq!(Put::decode(&p.encode()), Ok(p));
        let d = Delivery {
            reference: 4,
            subscription: 2,
            seq: 77,
            offset: 0,
            len: 3_110_400,
            checksum: Some(12),
            sealed_nanos: 5,
        };
        assert_eq!(decode_deliver(&encode_deliver(&d)), Ok(d));
        assert_eq!(Put::decode(&[0; 31]), Err(DataError::Short(31)));
        assert!(matches!(
            Put::decode(&a.encode()),
            Err(DataError::BadMagic(_)) | Err(DataError::Short(_))
        ));
        let mut bad = p.encode();
        bad[4] = 1;
        assert!(matches!(Put::decode(&bad), Err(DataError::Unsupported(_))));
        for i in 0..64u8 {
            let mut bytes = encode_deliver(&d).to_vec();
            bytes[usize::from(i) % DELIVER_LEN] ^= i.wrapping_mul(37) | 1;
            fuzz_decode(&bytes);
        }
    }
}
