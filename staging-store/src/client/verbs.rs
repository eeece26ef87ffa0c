//! A verbs client's data path: its own registered staging region and an RC connection to
//! the store's region; one RDMA WRITE into a grant, one RDMA READ per delivery, no store CPU
//! per byte.

use super::frame_ref::Bytes;
use super::{Client, ClientError};
use crate::proto::Delivery;
use capnp_rdma::transport::verbs::rc::{RcConnection, RcRegion};
use capnp_rdma::BlockLease;

/// Bytes of a verbs client's own registered region (frames on their way in and out), unless
/// `STAGING_STORE_VERBS_STAGING_BYTES` says otherwise: enough for a window of 4K frames.
const VERBS_STAGING_BYTES: u64 = 256 << 20;

pub(super) fn verbs_staging_bytes() -> u64 {
    std::env::var("STAGING_STORE_VERBS_STAGING_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(VERBS_STAGING_BYTES)
}

/// A verbs client's side of RDMA.
pub(super) struct Verbs {
    pub(super) connection: RcConnection,
    pub(super) staging: RcRegion,
}

impl Verbs {
    /// Writes `bytes` into the store's region at `remote_offset`, through a lease of this
    /// client's region (one copy here, one RDMA WRITE, no store CPU).
    pub(super) async fn write(&self, bytes: &[u8], remote_offset: u64) -> Result<(), ClientError> {
        let mut lease = self.staging.region().lease(bytes.len() as u64)?;
        lease.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
        self.connection
            .write(&[(lease.offset(), bytes.len() as u64)], remote_offset)
            .await?;
        Ok(())
    }

    /// Reads `len` bytes of the store's region at `remote_offset` into a lease of this
    /// client's region (one RDMA READ).
    pub(super) async fn read(
        &self,
        remote_offset: u64,
        len: u64,
    ) -> Result<BlockLease, ClientError> {
        let lease = self.staging.region().lease(len.max(1))?;
        self.connection
            .read(remote_offset, len, lease.offset())
            .await?;
        Ok(lease)
    }
}

impl Client {
    /// A verbs client's completion-queue counters (completions, polls, sleeps on the channel):
    /// its RDMA WRITEs and READs complete here, not at the store. `None` for shm and tcp.
    pub fn rdma_poll_stats(&self) -> Option<capnp_rdma::transport::verbs::PollStats> {
        self.inner.verbs.get().map(|v| v.connection.poll_stats())
    }

    /// The RDMA side of a verbs client.
    pub(super) fn verbs(&self) -> Result<&Verbs, ClientError> {
        self.inner
            .verbs
            .get()
            .ok_or_else(|| ClientError::Grant("not a verbs client".into()))
    }

    /// A delivered frame's bytes, read by RDMA into this client's region (verbs). On failure
    /// the reference is given back.
    pub(super) async fn fetch(&self, delivery: &Delivery) -> Result<Bytes, ClientError> {
        match self.verbs()?.read(delivery.offset, delivery.len).await {
            Ok(lease) => Ok(Bytes::Leased(lease)),
            Err(e) => {
                let _ = self.release_nowait(delivery.reference);
                Err(e)
            }
        }
    }
}
