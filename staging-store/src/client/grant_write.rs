//! A grant's bytes, per transport: writable in place (shm, [`Client::grant_bytes`]), sent on
//! the data connection (tcp) or with one RDMA WRITE (verbs) ([`Client::write_grant`]), and
//! the client's own staging region that in-place messages for remote grants are built in.

use super::{io_err, Client, ClientError};
use crate::data::{self, Put};
use crate::proto::{Grant, Transport};
use capnp_rdma::{Region, RegionOptions};

/// Bytes of a tcp client's own region for in-place messages (made on its first `InPlace`): a
/// lease lives only from `create` to the PUT at the seal, so five 4K frames built at once.
const TCP_STAGING_BYTES: u64 = 64 << 20;

/// `len` bytes at `at` lie inside `grant` (checked here for writes the store cannot see).
fn fits(grant: &Grant, at: u64, len: u64) -> Result<(), ClientError> {
    if at.checked_add(len).is_none_or(|end| end > grant.len) {
        return Err(ClientError::Grant(format!(
            "{len} bytes at {at} do not fit the grant of {} bytes",
            grant.len
        )));
    }
    Ok(())
}

impl Client {
    /// The bytes of a grant, writable (shm clients).
    ///
    /// The grant is this client's alone until sealed or aborted: the store gives its blocks
    /// to nobody else and reads them only at seal.
    ///
    /// # Safety
    /// At most one slice of a grant may be alive at a time (across every clone of this
    /// client), and none after the grant is sealed or aborted.
    #[allow(clippy::mut_from_ref)] // exclusivity is the caller's obligation (# Safety)
    pub unsafe fn grant_bytes(&self, grant: &Grant) -> Result<&mut [u8], ClientError> {
        let region = self.inner.region.as_ref().ok_or_else(|| {
            ClientError::Grant("grants are writable in place only over shm".into())
        })?;
        region.check_range(grant.offset, grant.len)?;
        // SAFETY: the range lies in the mapping (checked); the store granted it to this
        // session only, and it is not sealed yet, so no one else reads or writes it. Callers
        // must not hold two slices of one grant at once (each call is for one grant write).
        Ok(unsafe {
            std::slice::from_raw_parts_mut(
                region.as_ptr().cast_mut().add(grant.offset as usize),
                grant.len as usize,
            )
        })
    }

    /// The region of this client's own that messages for remote grants are built in: the
    /// registered one (verbs), or a private one made on first use (tcp). shm clients build in
    /// the store's region itself ([`region`](Self::region)).
    pub(crate) fn staging_region(&self) -> Result<Region, ClientError> {
        match self.inner.transport {
            Transport::Verbs => Ok(self.verbs()?.staging.region().clone()),
            Transport::Tcp => {
                if let Some(region) = self.inner.local.get() {
                    return Ok(region.clone());
                }
                let region = Region::create(&RegionOptions::memfd(TCP_STAGING_BYTES))?;
                // Two first uses at once: one region is kept, the other dropped.
                let _ = self.inner.local.set(region);
                Ok(self.inner.local.get().expect("just set").clone())
            }
            Transport::Shm => Err(ClientError::Grant(
                "an shm client builds in the store's region".into(),
            )),
        }
    }

    /// Sends `len` bytes of [`staging_region`](Self::staging_region) at `local_offset` into
    /// the grant at `at`: one RDMA WRITE straight from the registered region (verbs, no copy
    /// here), or a PUT on the data connection (tcp).
    ///
    /// # Safety
    /// Nobody writes `local_offset .. local_offset + len` of the staging region until this
    /// returns (the caller holds the lease that covers it).
    pub(crate) async unsafe fn write_staged(
        &self,
        grant: &Grant,
        at: u64,
        local_offset: u64,
        len: u64,
    ) -> Result<(), ClientError> {
        fits(grant, at, len)?;
        if self.inner.transport == Transport::Verbs {
            self.verbs()?
                .connection
                .write(&[(local_offset, len)], grant.offset + at)
                .await?;
            return Ok(());
        }
        let region = self.staging_region()?;
        // SAFETY: in the staging region (`bytes` checks the range), and the caller guarantees
        // that nobody writes it while this slice lives.
        let bytes = unsafe { region.bytes(local_offset, len) }?;
        self.write_grant(grant, at, bytes).await
    }

    /// Sends `bytes` into the grant at `at`: over the data connection (tcp clients, which
    /// fill a grant from its start without gaps), or with one RDMA WRITE (verbs clients).
    pub async fn write_grant(
        &self,
        grant: &Grant,
        at: u64,
        bytes: &[u8],
    ) -> Result<(), ClientError> {
        if self.inner.transport == Transport::Verbs {
            // The store cannot see RDMA writes: keep them inside the grant here.
            fits(grant, at, bytes.len() as u64)?;
            return self.verbs()?.write(bytes, grant.offset + at).await;
        }
        let data =
            self.inner.data.as_ref().ok_or_else(|| {
                ClientError::Grant("no data connection (shm writes in place)".into())
            })?;
        let mut w = data.lock().await;
        let header = Put {
            object: grant.object,
            at,
            len: bytes.len() as u64,
        }
        .encode();
        data::write_with_header(&mut w, &header, bytes)
            .await
            .map_err(io_err("writing a PUT"))?;
        Ok(())
    }
}
