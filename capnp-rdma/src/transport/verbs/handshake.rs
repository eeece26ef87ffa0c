//! The set-up exchange between a [`VerbsWriter`](super::VerbsWriter) and a
//! [`VerbsTarget`](super::VerbsTarget) over TCP: each side's queue pair number, PSN and GID, and
//! the target's grant and window ([`Endpoint`], 88 bytes each way), then the target's ready
//! byte. The socket stays open afterwards as the liveness signal ([`peer_gone`]).

use crate::transport::{RemoteRegion, TransportError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};

/// Connection parameters exchanged over TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Endpoint {
    pub(super) qpn: u32,
    pub(super) psn: u32,
    pub(super) gid: [u8; 16],
    pub(super) remote: RemoteRegion,
    pub(super) window: u32,
}

pub(super) const ENDPOINT_MAGIC: u32 = u32::from_le_bytes(*b"CRDV");
const ENDPOINT_LEN: usize = 88;
pub(super) const READY: u8 = 0x52;

impl Endpoint {
    fn encode(&self) -> [u8; ENDPOINT_LEN] {
        let mut b = [0u8; ENDPOINT_LEN];
        b[0..4].copy_from_slice(&ENDPOINT_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[8..12].copy_from_slice(&self.qpn.to_le_bytes());
        b[12..16].copy_from_slice(&self.psn.to_le_bytes());
        b[16..32].copy_from_slice(&self.gid);
        b[32..40].copy_from_slice(&self.remote.region_id.to_le_bytes());
        b[40..44].copy_from_slice(&self.remote.rkey.to_le_bytes());
        b[44..48].copy_from_slice(&self.window.to_le_bytes());
        b[48..56].copy_from_slice(&self.remote.base.to_le_bytes());
        b[56..64].copy_from_slice(&self.remote.offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.remote.len.to_le_bytes());
        b
    }

    fn decode(b: &[u8; ENDPOINT_LEN]) -> Result<Self, TransportError> {
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(v)
        };
        if u32_at(0) != ENDPOINT_MAGIC || u32_at(4) != 1 {
            return Err(TransportError::Protocol(
                "not a capnp-rdma verbs peer (or another version)".into(),
            ));
        }
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[16..32]);
        let remote = RemoteRegion {
            region_id: u64_at(32),
            rkey: u32_at(40),
            base: u64_at(48),
            offset: u64_at(56),
            len: u64_at(64),
        };
        if remote.offset.checked_add(remote.len).is_none() || u32_at(8) > 0x00ff_ffff {
            return Err(TransportError::Protocol("bad endpoint".into()));
        }
        Ok(Self {
            qpn: u32_at(8),
            psn: u32_at(12) & 0x00ff_ffff,
            gid,
            remote,
            window: u32_at(44),
        })
    }
}

/// Decodes an endpoint from arbitrary bytes (fuzzing).
pub(crate) fn fuzz_decode_endpoint(data: &[u8]) {
    if let Some(bytes) = data.get(..ENDPOINT_LEN) {
        let mut buf = [0u8; ENDPOINT_LEN];
        buf.copy_from_slice(bytes);
        if let Ok(e) = Endpoint::decode(&buf) {
            assert!(e.remote.offset.checked_add(e.remote.len).is_some());
            assert_eq!(Endpoint::decode(&e.encode()).ok(), Some(e));
        }
    }
}

/// Sends our endpoint and decodes the peer's.
pub(super) async fn exchange(
    stream: &mut TcpStream,
    mine: &Endpoint,
) -> Result<Endpoint, TransportError> {
    Endpoint::decode(&swap(stream, &mine.encode()).await?)
}

/// Sends `mine` and reads the peer's message of the same length.
pub(super) async fn swap<const N: usize>(
    stream: &mut TcpStream,
    mine: &[u8; N],
) -> Result<[u8; N], TransportError> {
    stream
        .write_all(mine)
        .await
        .map_err(TransportError::io("send endpoint"))?;
    let mut buf = [0u8; N];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(TransportError::io("read endpoint"))?;
    Ok(buf)
}

/// Opens the set-up socket to `addr` (no Nagle delay).
pub(super) async fn dial(addr: impl ToSocketAddrs) -> Result<TcpStream, TransportError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(TransportError::io("connect"))?;
    stream
        .set_nodelay(true)
        .map_err(TransportError::io("set_nodelay"))?;
    Ok(stream)
}

/// Accepts the next set-up socket on `listener` (no Nagle delay).
pub(super) async fn answer(listener: &TcpListener) -> Result<TcpStream, TransportError> {
    let (stream, _) = listener
        .accept()
        .await
        .map_err(TransportError::io("accept"))?;
    stream
        .set_nodelay(true)
        .map_err(TransportError::io("set_nodelay"))?;
    Ok(stream)
}

/// Resolves when the peer closes the set-up socket (or it fails).
pub(super) async fn peer_gone(stream: &mut TcpStream) {
    let mut b = [0u8; 64];
    loop {
        match stream.read(&mut b).await {
            Ok(0) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}
