//! Owner slots and the allocation table: who holds which blocks, so that the blocks of a
//! process that died (kill -9 included) can be found and reclaimed.
//!
//! Each process handle claims a slot (`FREE → REGISTERING → LIVE`) recording its pid and the
//! process start time from `/proc/PID/stat`; the pair identifies the process even after its pid
//! is reused. Each allocation writes a [`TableEntry`] (owner slot, length) into the table entry of
//! its first block. A reclaimer moves a dead owner's slot to `RECLAIMING` with a CAS (so only
//! one reclaimer acts), zeroes and frees every allocation recorded for it, then frees the slot.

use super::{Core, RegionError};
use crate::sys;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const FREE: u32 = 0;
const REGISTERING: u32 = 1;
const LIVE: u32 = 2;
const RECLAIMING: u32 = 3;

/// One owner slot, 32 bytes, in shared memory.
#[repr(C)]
pub(crate) struct OwnerSlot {
    state: AtomicU32,
    pid: AtomicU32,
    start_time: AtomicU64,
    _reserved: [AtomicU64; 2],
}

const _: () = assert!(std::mem::size_of::<OwnerSlot>() as u64 == super::layout::OWNER_SLOT_BYTES);

/// An allocation-table entry: set on the first block of each allocation, zero elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TableEntry {
    pub(crate) owner: u16,
    pub(crate) blocks: u64,
}

const TAG: u64 = 1 << 63;
const LEN_BITS: u32 = 40;
const LEN_MASK: u64 = (1 << LEN_BITS) - 1;

impl TableEntry {
    pub(crate) fn new(owner: u16, blocks: u64) -> Self {
        Self { owner, blocks }
    }

    pub(crate) fn to_bits(self) -> u64 {
        TAG | (u64::from(self.owner) << LEN_BITS) | (self.blocks & LEN_MASK)
    }

    pub(crate) fn from_bits(bits: u64) -> Option<Self> {
        (bits & TAG != 0).then_some(Self {
            owner: ((bits >> LEN_BITS) & 0xffff) as u16,
            blocks: bits & LEN_MASK,
        })
    }
}

/// What [`Region::reclaim_dead_owners`](super::Region::reclaim_dead_owners) did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    /// Pids of the dead owners whose slots were reclaimed.
    pub dead_pids: Vec<u32>,
    /// Allocations freed.
    pub allocations: u64,
    /// Blocks freed.
    pub blocks: u64,
}

/// What [`Region::audit`](super::Region::audit) found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Audit {
    /// (slot, pid, live allocations in the table) for every occupied owner slot.
    pub owners: Vec<(u16, u32, u64)>,
    /// Blocks covered by allocation-table entries.
    pub table_blocks: u64,
    /// Blocks the bitmap marks used.
    pub bitmap_blocks: u64,
}

impl Audit {
    /// Blocks marked used that no allocation covers.
    pub fn orphaned_blocks(&self) -> u64 {
        self.bitmap_blocks.saturating_sub(self.table_blocks)
    }
}

fn is_alive(pid: u32, start_time: u64) -> bool {
    match sys::process_start_time(pid) {
        Some(t) => start_time == 0 || t == start_time,
        None => false,
    }
}

/// Claims a free owner slot for this process, first reclaiming slots of dead processes if none
/// is free.
pub(crate) fn claim_slot(core: &Core) -> Result<u16, RegionError> {
    let pid = sys::pid();
    let start_time = sys::process_start_time(pid).unwrap_or(0);
    for attempt in 0..2 {
        for (i, slot) in core.owners().iter().enumerate() {
            if slot
                .state
                .compare_exchange(FREE, REGISTERING, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                slot.pid.store(pid, Ordering::Relaxed);
                slot.start_time.store(start_time, Ordering::Relaxed);
                slot.state.store(LIVE, Ordering::Release);
                return Ok(i as u16); // OWNER_SLOTS <= 65536
            }
        }
        if attempt == 0 {
            reclaim_dead(core, u16::MAX)?;
        }
    }
    Err(RegionError::NoOwnerSlot(core.geo.owner_slots))
}

/// Frees this handle's slot if it holds no allocations (a leaked allocation keeps the slot
/// occupied, so a reclaimer can free it once this process is gone).
pub(crate) fn release_slot(core: &Core, owner: u16) {
    let slot = &core.owners()[usize::from(owner)];
    // Allocations are not counted per owner on the hot path (the counter's cache line would
    // bounce between the allocating thread and the scrubber): scan the table once, here.
    if allocations(core).all(|(_, entry)| entry.owner != owner) {
        slot.pid.store(0, Ordering::Relaxed);
        slot.start_time.store(0, Ordering::Relaxed);
        slot.state.store(FREE, Ordering::Release);
    }
}

/// Every allocation recorded in the table, as (first block, entry), in block order.
fn allocations(core: &Core) -> impl Iterator<Item = (u64, TableEntry)> + '_ {
    let table = core.table();
    let mut block = 0u64;
    std::iter::from_fn(move || {
        while block < core.geo.block_count {
            let at = block;
            match TableEntry::from_bits(table[at as usize].load(Ordering::Acquire)) {
                Some(entry) if entry.blocks > 0 => {
                    block += entry.blocks;
                    return Some((at, entry));
                }
                _ => block += 1,
            }
        }
        None
    })
}

pub(crate) fn reclaim_dead(core: &Core, me: u16) -> Result<ReclaimReport, RegionError> {
    let mut report = ReclaimReport::default();
    for (i, slot) in core.owners().iter().enumerate() {
        let state = slot.state.load(Ordering::Acquire);
        if i == usize::from(me) || !(state == LIVE || state == REGISTERING) {
            continue;
        }
        let pid = slot.pid.load(Ordering::Relaxed);
        if pid == 0 || is_alive(pid, slot.start_time.load(Ordering::Relaxed)) {
            continue;
        }
        if slot
            .state
            .compare_exchange(state, RECLAIMING, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            continue; // another reclaimer got it
        }
        let owner = i as u16;
        for (block, entry) in allocations(core).filter(|(_, e)| e.owner == owner) {
            // SAFETY: the owner is dead, so nothing references these bytes, and the
            // RECLAIMING state makes us the only reclaimer of this allocation.
            unsafe { core.zero(block, entry.blocks * core.geo.block_size) };
            core.free_zeroed(block, entry.blocks)?;
            report.allocations += 1;
            report.blocks += entry.blocks;
        }
        report.dead_pids.push(pid);
        slot.pid.store(0, Ordering::Relaxed);
        slot.start_time.store(0, Ordering::Relaxed);
        slot.state.store(FREE, Ordering::Release);
    }
    Ok(report)
}

pub(crate) fn audit(core: &Core) -> Audit {
    let mut audit = Audit {
        bitmap_blocks: core.bitmap().count_used(),
        ..Audit::default()
    };
    let mut per_owner = vec![0u64; core.geo.owner_slots as usize];
    for (_, entry) in allocations(core) {
        audit.table_blocks += entry.blocks;
        if let Some(n) = per_owner.get_mut(usize::from(entry.owner)) {
            *n += 1;
        }
    }
    for (i, slot) in core.owners().iter().enumerate() {
        if slot.state.load(Ordering::Acquire) != FREE {
            audit
                .owners
                .push((i as u16, slot.pid.load(Ordering::Relaxed), per_owner[i]));
        }
    }
    audit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_entry_round_trips() {
        for &(owner, blocks) in &[(0u16, 1u64), (255, 16384), (7, (1 << 40) - 1)] {
            let e = TableEntry::new(owner, blocks);
            assert_eq!(TableEntry::from_bits(e.to_bits()), Some(e));
        }
        assert_eq!(TableEntry::from_bits(0), None);
    }

    #[test]
    fn own_process_is_alive_and_bogus_pid_is_not() {
        let pid = sys::pid();
        let t = sys::process_start_time(pid).unwrap();
        assert!(is_alive(pid, t));
        assert!(
            !is_alive(pid, t + 1),
            "a different start time means a reused pid"
        );
        assert!(!is_alive(u32::MAX - 1, 0));
    }
}
