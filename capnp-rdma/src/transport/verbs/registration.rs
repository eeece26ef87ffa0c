//! Memory registration: a whole region registered once with a device, for the NIC to read
//! from and write into ([`RegisteredRegion`]).

use super::device::{device_err, VerbsDevice};
use crate::region::Region;
use crate::transport::TransportError;
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::AccessFlags;
use std::sync::Arc;

impl VerbsDevice {
    /// Registers the whole of `region` once, for local and remote writes.
    pub fn register(&self, region: &Region) -> Result<RegisteredRegion, TransportError> {
        self.register_with(region, AccessFlags::LocalWrite | AccessFlags::RemoteWrite)
    }

    /// Registers the whole of `region` once with the given access rights.
    pub(super) fn register_with(
        &self,
        region: &Region,
        access: AccessFlags,
    ) -> Result<RegisteredRegion, TransportError> {
        // SAFETY: the mapping stays valid for as long as the registration: RegisteredRegion
        // holds a Region handle, which keeps the mapping alive, and drops the MR first.
        let mr = unsafe {
            self.inner
                .pd
                .reg_mr(region.as_ptr() as usize, region.len() as usize, access)
        }
        .map_err(|e| {
            let limit = crate::sys::memlock_limit()
                .map(|l| format!("{l} bytes"))
                .unwrap_or_else(|| "unlimited".into());
            device_err(
                &format!("register the region (on ENOMEM raise RLIMIT_MEMLOCK, now {limit})"),
                e,
            )
        })?;
        Ok(RegisteredRegion {
            mr,
            region: region.clone(),
            device: self.clone(),
        })
    }
}

/// A region registered with a device: one memory registration for all of it.
pub struct RegisteredRegion {
    // Drop order: deregister before the region handle (and its mapping) may go.
    pub(super) mr: Arc<MemoryRegion>,
    region: Region,
    device: VerbsDevice,
}

impl std::fmt::Debug for RegisteredRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisteredRegion")
            .field("region", &self.region.id())
            .field("rkey", &self.mr.rkey())
            .finish()
    }
}

impl RegisteredRegion {
    /// The region.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The device it is registered with.
    pub fn device(&self) -> &VerbsDevice {
        &self.device
    }

    /// The remote key peers use to write into it.
    pub fn rkey(&self) -> u32 {
        self.mr.rkey()
    }
}
