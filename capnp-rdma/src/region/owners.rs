//! Owner slots and the allocation table: who holds which blocks, so that the blocks of a
//! process that died (kill -9 included) can be found and reclaimed, and so that allocations kept
//! across a restart can be adopted by the next process.
//!
//! Each process handle claims a slot (`FREE → REGISTERING → LIVE`) recording its pid and the
//! process start time from `/proc/PID/stat`; the pair identifies the process even after its pid
//! is reused. Each allocation writes a [`TableEntry`] (owner slot, length, kept flag) into the
//! table entry of its first block.
//!
//! ```text
//!            claim_slot                 release_slot (graceful close)
//!  FREE ──▶ REGISTERING ──▶ LIVE ──┬──▶ FREE        no allocations left
//!   ▲                              ├──▶ LIVE        leaked (forgotten) allocations: the slot stays
//!   │                              │                claimed until the process is gone
//!   │                              └──▶ DETACHED    only kept allocations left: nobody claims them
//!   │                                               any more; adoptable at once
//!   └──── RECLAIMING ◀── locked by a reclaimer (frees everything, then FREE) or an adopter
//!                        (moves one allocation to itself, then restores the previous state)
//! ```
//!
//! A slot's occupant is *not alive* when it is `LIVE`/`REGISTERING` with a pid whose process is
//! gone (or has another start time), `DETACHED`, or `FREE` while table entries still name it.
//!
//! **Locking.** Reclaimers and adopters lock a slot by moving it to `RECLAIMING` with a CAS, and
//! only then read its pid and decide whether the occupant is alive: a slot can be freed and
//! claimed again by a live process between a check and a CAS, so a check made before the lock
//! proves nothing. A locker that finds the occupant alive restores the state at once. The owner
//! itself leaves `REGISTERING` and `LIVE` with a CAS too, waiting while a locker holds its slot,
//! so a lock is never overwritten. Table entries of a locked, not-alive slot change only under
//! that lock: an adopter rewrites one entry to its own slot, a reclaimer clears each entry with a
//! CAS before zeroing and freeing its blocks, so the two never both act on one allocation.
//!
//! Table entry bits: `63` tag (entry present), `62` kept (see
//! [`BlockLease::keep`](super::BlockLease::keep)), `40..56` owner slot, `0..40` length in blocks.
//! Entries of earlier builds never have bit 62 set, so the layout version is unchanged.

use super::{Core, RegionError};
use crate::sys;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const FREE: u32 = 0;
const REGISTERING: u32 = 1;
const LIVE: u32 = 2;
/// Locked by a reclaimer or an adopter.
const RECLAIMING: u32 = 3;
/// Closed gracefully with kept allocations; claimed by no process.
const DETACHED: u32 = 4;

/// How long a slot's owner waits for a locker to give its slot back (a locker that finds the
/// owner alive does so at once; one that died while holding the lock never will).
const LOCK_WAIT: Duration = Duration::from_secs(1);

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
    /// Kept past its lease ([`BlockLease::keep`](super::BlockLease::keep)): it survives the
    /// owner's graceful close.
    pub(crate) kept: bool,
}

const TAG: u64 = 1 << 63;
const KEPT: u64 = 1 << 62;
const LEN_BITS: u32 = 40;
const LEN_MASK: u64 = (1 << LEN_BITS) - 1;

impl TableEntry {
    pub(crate) fn new(owner: u16, blocks: u64) -> Self {
        Self {
            owner,
            blocks,
            kept: false,
        }
    }

    pub(crate) fn to_bits(self) -> u64 {
        TAG | if self.kept { KEPT } else { 0 }
            | (u64::from(self.owner) << LEN_BITS)
            | (self.blocks & LEN_MASK)
    }

    pub(crate) fn from_bits(bits: u64) -> Option<Self> {
        (bits & TAG != 0).then_some(Self {
            owner: ((bits >> LEN_BITS) & 0xffff) as u16,
            blocks: bits & LEN_MASK,
            kept: bits & KEPT != 0,
        })
    }
}

/// What [`Region::reclaim_dead_owners`](super::Region::reclaim_dead_owners) did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    /// Pids of the dead owners whose slots were reclaimed.
    pub dead_pids: Vec<u32>,
    /// Pids recorded in slots that were closed gracefully with kept allocations
    /// ([`BlockLease::keep`](super::BlockLease::keep)) and freed here with whatever of them had
    /// not been [adopted](super::Region::adopt).
    pub detached_pids: Vec<u32>,
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

/// Moves this process's own slot from `from` to `to`, waiting while a locker holds it. Lockers
/// that find us alive give the slot back at once; after [`LOCK_WAIT`] the locker is presumed dead
/// and the state is stored regardless.
fn own_transition(slot: &OwnerSlot, from: u32, to: u32) {
    let mut deadline = None;
    loop {
        match slot
            .state
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return,
            Err(RECLAIMING) => {
                let deadline = *deadline.get_or_insert_with(|| Instant::now() + LOCK_WAIT);
                if Instant::now() >= deadline {
                    slot.state.store(to, Ordering::Release);
                    return;
                }
                std::thread::yield_now();
            }
            Err(other) => {
                debug_assert!(false, "own slot in state {other}, expected {from}");
                slot.state.store(to, Ordering::Release);
                return;
            }
        }
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
                own_transition(slot, REGISTERING, LIVE);
                return Ok(i as u16); // OWNER_SLOTS <= 65536
            }
        }
        if attempt == 0 {
            // Only dead processes: kept allocations of detached slots wait for an explicit
            // adopt or reclaim.
            reclaim(core, u16::MAX, Scope::DeadProcesses)?;
        }
    }
    Err(RegionError::NoOwnerSlot(core.geo.owner_slots))
}

/// Gives up this handle's slot at close. With no allocations left the slot is freed; with only
/// kept allocations it becomes `DETACHED` (claimed by nobody, so they can be adopted at once);
/// a leaked allocation keeps the slot `LIVE`, so a reclaimer frees it once this process is gone.
pub(crate) fn release_slot(core: &Core, owner: u16) {
    let slot = &core.owners()[usize::from(owner)];
    // Allocations are not counted per owner on the hot path (the counter's cache line would
    // bounce between the allocating thread and the scrubber): scan the table once, here.
    let (mut kept, mut leaked) = (false, false);
    for (_, entry) in allocations(core).filter(|(_, e)| e.owner == owner) {
        if entry.kept {
            kept = true;
        } else {
            leaked = true;
        }
    }
    if leaked {
        return;
    }
    if kept {
        // The pid stays, for diagnostics (`audit`, `ReclaimReport::detached_pids`).
        own_transition(slot, LIVE, DETACHED);
    } else {
        slot.pid.store(0, Ordering::Relaxed);
        slot.start_time.store(0, Ordering::Relaxed);
        own_transition(slot, LIVE, FREE);
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

/// Who held a slot when it was locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Occupant {
    /// A process that is gone.
    Dead(u32),
    /// Closed gracefully with kept allocations (the pid it had).
    Detached(u32),
    /// Nobody (a free slot that table entries still name).
    Unclaimed,
}

/// A slot held in `RECLAIMING` by this reclaimer or adopter.
struct SlotLock<'a> {
    slot: &'a OwnerSlot,
    prev: u32,
    occupant: Occupant,
}

impl SlotLock<'_> {
    /// Gives the slot back in the state it had.
    fn restore(self) {
        self.slot.state.store(self.prev, Ordering::Release);
    }

    /// Frees the slot (its allocations are gone).
    fn free(self) {
        self.slot.pid.store(0, Ordering::Relaxed);
        self.slot.start_time.store(0, Ordering::Relaxed);
        self.slot.state.store(FREE, Ordering::Release);
    }
}

/// Why a slot could not be locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LockFailure {
    /// A live process holds it (or is claiming it): its pid, 0 while unknown.
    Alive(u32),
    /// Another reclaimer or adopter holds it.
    Busy,
    /// Its state is not one the caller asked for.
    NotEligible,
}

/// Which slots a lock attempt may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Eligible {
    detached: bool,
    free: bool,
}

/// Locks `slot` if its occupant is not alive; the occupant is judged *after* the lock is taken.
fn lock_not_alive(slot: &OwnerSlot, eligible: Eligible) -> Result<SlotLock<'_>, LockFailure> {
    loop {
        let prev = slot.state.load(Ordering::Acquire);
        match prev {
            LIVE | REGISTERING => {
                // Fast path without the lock: "alive" needs no confirmation (nothing is done on
                // it), only "dead" does.
                let pid = slot.pid.load(Ordering::Relaxed);
                if pid == 0 || is_alive(pid, slot.start_time.load(Ordering::Relaxed)) {
                    return Err(LockFailure::Alive(pid));
                }
            }
            DETACHED if eligible.detached => {}
            FREE if eligible.free => {}
            RECLAIMING => return Err(LockFailure::Busy),
            _ => return Err(LockFailure::NotEligible),
        }
        if slot
            .state
            .compare_exchange(prev, RECLAIMING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            continue; // the state moved under us: judge it again
        }
        let pid = slot.pid.load(Ordering::Relaxed);
        let occupant = match prev {
            DETACHED => Occupant::Detached(pid),
            FREE => Occupant::Unclaimed,
            // pid 0: a claimer between winning the slot and recording itself.
            _ if pid == 0 || is_alive(pid, slot.start_time.load(Ordering::Relaxed)) => {
                slot.state.store(prev, Ordering::Release);
                return Err(LockFailure::Alive(pid));
            }
            _ => Occupant::Dead(pid),
        };
        return Ok(SlotLock {
            slot,
            prev,
            occupant,
        });
    }
}

/// Which owners a reclaim frees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Only processes that died.
    DeadProcesses,
    /// Every owner that is not alive: dead processes, detached slots (kept allocations nobody
    /// adopted) and entries naming free or nonexistent slots.
    NotAlive,
}

/// Zeroes and frees every allocation of the owners `scope` selects (except `me`), then frees
/// their slots. One scan of the table, after locking every candidate slot.
pub(crate) fn reclaim(core: &Core, me: u16, scope: Scope) -> Result<ReclaimReport, RegionError> {
    let all = scope == Scope::NotAlive;
    let slots = core.owners();
    let mut locks: Vec<Option<SlotLock<'_>>> = slots
        .iter()
        .enumerate()
        .map(|(i, slot)| {
            if i == usize::from(me) {
                return None;
            }
            let eligible = Eligible {
                detached: all,
                free: false, // free slots are locked below, only if an entry names them
            };
            lock_not_alive(slot, eligible).ok()
        })
        .collect();
    let mut report = ReclaimReport::default();
    let mut first_error = None;
    let table = core.table();
    for (block, entry) in allocations(core) {
        let owner = usize::from(entry.owner);
        let ours = match locks.get(owner) {
            Some(Some(_)) => true,
            // A free slot that an entry still names: lock it so nobody claims it meanwhile.
            Some(None) if all && owner != usize::from(me) => {
                let eligible = Eligible {
                    detached: false,
                    free: true,
                };
                match lock_not_alive(&slots[owner], eligible) {
                    Ok(lock) => {
                        locks[owner] = Some(lock);
                        true
                    }
                    Err(_) => false,
                }
            }
            Some(None) => false,
            None => all, // names no slot at all
        };
        if !ours || block + entry.blocks > core.geo.block_count {
            continue; // a corrupt length is left alone: freeing it could free others' blocks
        }
        // Take the entry first: an adopter (of an unlocked, slot-less entry) or a concurrent
        // change makes the CAS fail and we leave the allocation alone.
        if table[block as usize]
            .compare_exchange(entry.to_bits(), 0, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            continue;
        }
        // SAFETY: the owner is not alive, so nothing references these bytes, and clearing the
        // table entry made us the only one who may free this allocation; its bits stay set (no
        // one else can allocate the blocks) until `free_claimed`.
        unsafe { core.zero(block, entry.blocks * core.geo.block_size) };
        match core.free_claimed(block, entry.blocks) {
            Ok(()) => {
                report.allocations += 1;
                report.blocks += entry.blocks;
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    for lock in locks.into_iter().flatten() {
        match lock.occupant {
            Occupant::Dead(pid) => report.dead_pids.push(pid),
            Occupant::Detached(pid) => report.detached_pids.push(pid),
            Occupant::Unclaimed => {}
        }
        lock.free();
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// Why [`adopt`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AdoptError {
    /// No allocation starts at the block.
    NoAllocation,
    /// The entry is inconsistent with the region.
    Corrupt(&'static str),
    /// The owner slot (and its pid) is held by a live process.
    Alive(u16, u32),
    /// Another reclaimer or adopter held the slot for longer than [`LOCK_WAIT`].
    Busy(u16),
}

/// Moves the allocation starting at `first` from an owner that is not alive to `me`; returns its
/// length in blocks.
pub(crate) fn adopt(core: &Core, me: u16, first: u64) -> Result<u64, AdoptError> {
    let table = core.table();
    let entry_word = &table[first as usize];
    let mut deadline = None;
    loop {
        let bits = entry_word.load(Ordering::Acquire);
        let entry = match TableEntry::from_bits(bits) {
            Some(entry) if entry.blocks > 0 => entry,
            _ => return Err(AdoptError::NoAllocation),
        };
        if first + entry.blocks > core.geo.block_count {
            return Err(AdoptError::Corrupt("allocation runs past the data area"));
        }
        let bitmap = core.bitmap();
        if !(first..first + entry.blocks).all(|b| bitmap.is_allocated(b)) {
            return Err(AdoptError::Corrupt(
                "the bitmap marks blocks of the allocation free",
            ));
        }
        if entry.owner == me {
            return Err(AdoptError::Alive(me, sys::pid()));
        }
        let mine = TableEntry::new(me, entry.blocks).to_bits();
        let Some(slot) = core.owners().get(usize::from(entry.owner)) else {
            // The entry names no slot: nobody can lock it, the CAS alone decides.
            if entry_word
                .compare_exchange(bits, mine, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(entry.blocks);
            }
            continue;
        };
        let eligible = Eligible {
            detached: true,
            free: true,
        };
        match lock_not_alive(slot, eligible) {
            Ok(lock) => {
                // Under the lock the entry can only have changed before we took it (adopted or
                // reclaimed by the previous holder): judge it again if so.
                let moved = entry_word
                    .compare_exchange(bits, mine, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok();
                lock.restore();
                if moved {
                    return Ok(entry.blocks);
                }
            }
            Err(LockFailure::Alive(pid)) => return Err(AdoptError::Alive(entry.owner, pid)),
            Err(LockFailure::Busy) => {
                let deadline = *deadline.get_or_insert_with(|| Instant::now() + LOCK_WAIT);
                if Instant::now() >= deadline {
                    return Err(AdoptError::Busy(entry.owner));
                }
                std::thread::yield_now();
            }
            Err(LockFailure::NotEligible) => {
                // A state this build does not know: not ours to take.
                return Err(AdoptError::Alive(
                    entry.owner,
                    slot.pid.load(Ordering::Relaxed),
                ));
            }
        }
    }
}

/// Marks this handle's allocation at `first` as kept (see
/// [`BlockLease::keep`](super::BlockLease::keep)).
pub(crate) fn mark_kept(core: &Core, me: u16, first: u64, blocks: u64) {
    let current = TableEntry::new(me, blocks);
    let kept = TableEntry {
        kept: true,
        ..current
    };
    let swapped = core.table()[first as usize].compare_exchange(
        current.to_bits(),
        kept.to_bits(),
        Ordering::AcqRel,
        Ordering::Relaxed,
    );
    debug_assert!(swapped.is_ok(), "keeping an allocation that is not ours");
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
            let kept = TableEntry { kept: true, ..e };
            assert_eq!(TableEntry::from_bits(kept.to_bits()), Some(kept));
            assert_ne!(kept.to_bits(), e.to_bits());
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
