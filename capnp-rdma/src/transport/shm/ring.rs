//! The notification ring: a single-producer single-consumer queue of fixed capacity in a
//! memfd both processes map, with the wake-up flag next to it. No I/O: the eventfd and the
//! socket are the caller's business.
//!
//! ```text
//!  offset   0  header     magic "CRSR" u32 | version u32 | capacity u32 | entry bytes u32
//!  offset 128  head       AtomicU64  next sequence number the writer will push   (writer)
//!  offset 256  tail       AtomicU64  next sequence number the target will take   (target)
//!  offset 384  consumer_sleeping AtomicU32  1 while the target waits on the eventfd
//!  offset 512  entries    capacity × 32 bytes; entry `seq` lives in slot `seq % capacity`:
//!              word 0  imm (low 32 bits; the high 32 bits are zero)
//!              word 1  offset in the target's region
//!              word 2  length in bytes
//!              word 3  seq (the entry's own sequence number)
//! ```
//!
//! Every word is an atomic accessed only atomically by both sides. `head`, `tail` and the flag
//! sit on separate 128-byte lines (the adjacent-line prefetcher pairs 64-byte lines), so the
//! producer's and the consumer's stores never share a line. The writer stores an entry's
//! words (relaxed) and then `head` (release); the target reads `head` (acquire) and then the
//! words, so an entry — and every byte the writer copied before pushing it — is visible before
//! it is taken. Both sides treat what the other wrote as untrusted: the target checks each
//! entry's sequence number and range, the writer checks the target's `tail`.

use crate::sys::{self, Mapping};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// `"CRSR"`: the first word of a ring.
pub const RING_MAGIC: u32 = u32::from_le_bytes(*b"CRSR");
/// Layout version of the ring.
pub const RING_VERSION: u32 = 1;
/// Offset of the writer's `head` (AtomicU64).
pub const HEAD_OFFSET: usize = 128;
/// Offset of the target's `tail` (AtomicU64).
pub const TAIL_OFFSET: usize = 256;
/// Offset of the `consumer_sleeping` flag (AtomicU32).
pub const SLEEPING_OFFSET: usize = 384;
/// Offset of the first entry.
pub const ENTRIES_OFFSET: usize = 512;
/// Bytes of one entry (four u64 words).
pub const ENTRY_BYTES: usize = 32;
/// Largest ring capacity (entries).
pub const MAX_CAPACITY: u32 = 1 << 16;

/// Bytes of a ring of `capacity` entries.
pub const fn ring_bytes(capacity: u32) -> usize {
    ENTRIES_OFFSET + capacity as usize * ENTRY_BYTES
}

/// One notification, as the writer pushes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingEntry {
    /// The writer's immediate.
    pub imm: u32,
    /// Where the bytes are in the target's region.
    pub offset: u64,
    /// How many bytes.
    pub len: u64,
    /// The entry's sequence number (0, 1, 2, ... per connection).
    pub seq: u64,
}

impl RingEntry {
    /// The entry's four words, as stored in its slot.
    pub fn encode(&self) -> [u64; 4] {
        [u64::from(self.imm), self.offset, self.len, self.seq]
    }

    /// An entry from the four words of a slot (untrusted: the caller checks it).
    pub fn decode(words: [u64; 4]) -> Result<Self, &'static str> {
        let imm = u32::try_from(words[0]).map_err(|_| "reserved bits of a ring entry are set")?;
        Ok(Self {
            imm,
            offset: words[1],
            len: words[2],
            seq: words[3],
        })
    }
}

/// A mapped ring (either side's view).
#[derive(Debug)]
pub(crate) struct Ring {
    map: Mapping,
    capacity: u32,
}

impl Ring {
    /// Creates a ring of `capacity` entries (a power of two, at most [`MAX_CAPACITY`]) in a
    /// new memfd, and returns it with the memfd to pass to the writer.
    pub(crate) fn create(capacity: u32) -> io::Result<(Self, File)> {
        if !capacity.is_power_of_two() || capacity > MAX_CAPACITY {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let file = sys::memfd("capnp-rdma-ring", false)?;
        let len = ring_bytes(capacity);
        file.set_len(len as u64)?;
        sys::fallocate(&file, len as u64)?;
        let ring = Self {
            map: Mapping::map_shared(file.as_fd(), len)?,
            capacity,
        };
        // A fresh memfd is all zeroes: head = tail = 0, nobody sleeping. Write the header.
        ring.word32(0).store(RING_MAGIC, Ordering::Relaxed);
        ring.word32(4).store(RING_VERSION, Ordering::Relaxed);
        ring.word32(8).store(capacity, Ordering::Relaxed);
        ring.word32(12).store(ENTRY_BYTES as u32, Ordering::Release);
        Ok((ring, file))
    }

    /// Maps a ring received from a target that announced `capacity` entries, checking that
    /// the memfd is large enough and its header matches before any entry is touched.
    pub(crate) fn open(file: File, capacity: u32) -> Result<Self, String> {
        if !capacity.is_power_of_two() || capacity > MAX_CAPACITY {
            return Err(format!(
                "ring capacity {capacity} is not a power of two up to {MAX_CAPACITY}"
            ));
        }
        let len = ring_bytes(capacity);
        let actual = file
            .metadata()
            .map_err(|e| format!("fstat of the ring: {e}"))?
            .len();
        if actual < len as u64 {
            return Err(format!("ring memfd holds {actual} bytes, {len} needed"));
        }
        let map =
            Mapping::map_shared(file.as_fd(), len).map_err(|e| format!("mapping the ring: {e}"))?;
        let ring = Self { map, capacity };
        let header = [0, 4, 8, 12].map(|at| ring.word32(at).load(Ordering::Acquire));
        if header != [RING_MAGIC, RING_VERSION, capacity, ENTRY_BYTES as u32] {
            return Err(format!("bad ring header {header:x?}"));
        }
        Ok(ring)
    }

    fn word32(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset % 4 == 0 && offset + 4 <= self.map.len());
        // SAFETY: every caller passes a fixed offset inside the header (< ENTRIES_OFFSET <=
        // the mapping's length, checked at create/open), 4-aligned from the page-aligned
        // mapping; both sides only ever access these bytes as AtomicU32. The reference
        // borrows `self`, which owns the mapping.
        unsafe { &*self.map.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    fn word64(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset % 8 == 0 && offset + 8 <= self.map.len());
        // SAFETY: callers pass HEAD/TAIL_OFFSET or a word of a slot `< capacity`, all inside
        // the ring_bytes(capacity) mapping (length checked at create/open) and 8-aligned from
        // the page-aligned mapping; both sides only access these bytes as AtomicU64. The
        // reference borrows `self`, which owns the mapping.
        unsafe { &*self.map.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    /// The writer's `head`.
    pub(crate) fn head(&self) -> &AtomicU64 {
        self.word64(HEAD_OFFSET)
    }

    /// The target's `tail`.
    pub(crate) fn tail(&self) -> &AtomicU64 {
        self.word64(TAIL_OFFSET)
    }

    /// 1 while the target waits on the eventfd.
    fn consumer_sleeping(&self) -> &AtomicU32 {
        self.word32(SLEEPING_OFFSET)
    }

    /// Target side, with the ring found empty at `seq`: sets `consumer_sleeping` and checks
    /// the ring once more. True: sleep (the writer will see the flag and wake us). False: an
    /// entry arrived in between (its writer may have missed the flag); the flag is cleared.
    pub(crate) fn prepare_sleep(&self, seq: u64) -> bool {
        let flag = self.consumer_sleeping();
        flag.store(1, Ordering::Relaxed);
        // Pairs with the fence in `needs_wake`: of "target stores the flag, then reads head"
        // and "writer stores head, then reads the flag", at least one sees the other's store.
        fence(Ordering::SeqCst);
        if self.has_entry(seq) {
            flag.store(0, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Target side: awake again.
    pub(crate) fn awake(&self) {
        self.consumer_sleeping().store(0, Ordering::Relaxed);
    }

    /// Writer side, after a push: whether the target sleeps and must be woken. Claims the
    /// wake-up (clears the flag), so one sleep costs one wake-up however many writes follow;
    /// while the target is awake this is a fence and a load, no store.
    pub(crate) fn needs_wake(&self) -> bool {
        fence(Ordering::SeqCst);
        let flag = self.consumer_sleeping();
        flag.load(Ordering::Relaxed) != 0 && flag.swap(0, Ordering::Relaxed) != 0
    }

    fn slot_word(&self, seq: u64, word: usize) -> &AtomicU64 {
        let slot = (seq & u64::from(self.capacity - 1)) as usize; // < capacity
        self.word64(ENTRIES_OFFSET + slot * ENTRY_BYTES + word * 8)
    }

    /// Writer side: stores `entry` in its slot and publishes it by moving `head` to
    /// `entry.seq + 1` (release). The caller has checked there is room (`seq - tail <
    /// capacity`) and pushes sequence numbers in order.
    pub(crate) fn push(&self, entry: &RingEntry) {
        for (i, w) in entry.encode().into_iter().enumerate() {
            self.slot_word(entry.seq, i).store(w, Ordering::Relaxed);
        }
        self.head().store(entry.seq + 1, Ordering::Release);
    }

    /// Target side: the raw words of entry `seq` (untrusted), if the writer has published it.
    /// `Err` when `head` is impossible (more than `capacity` entries ahead of `seq`, or behind
    /// it).
    pub(crate) fn peek(&self, seq: u64) -> Result<Option<[u64; 4]>, String> {
        let head = self.head().load(Ordering::Acquire);
        let ahead = head.wrapping_sub(seq);
        if ahead == 0 {
            return Ok(None);
        }
        if ahead > u64::from(self.capacity) {
            return Err(format!(
                "ring head {head} is not within {} entries after {seq}",
                self.capacity
            ));
        }
        Ok(Some(
            [0, 1, 2, 3].map(|i| self.slot_word(seq, i).load(Ordering::Relaxed)),
        ))
    }

    /// Whether the writer has published an entry at or after `seq` (no checks).
    pub(crate) fn has_entry(&self, seq: u64) -> bool {
        self.head().load(Ordering::Acquire) != seq
    }

    /// Target side: frees every slot before `seq` for the writer.
    pub(crate) fn release_until(&self, seq: u64) {
        self.tail().store(seq, Ordering::Release);
    }

    /// Writer side: entries published (`head`) and not yet taken, by the target's `tail`
    /// (untrusted). `Err` when `tail` is impossible (ahead of `head` or further behind than
    /// the capacity).
    pub(crate) fn occupancy(&self, head: u64) -> Result<u64, String> {
        let tail = self.tail().load(Ordering::Acquire);
        let used = head.wrapping_sub(tail);
        if used > u64::from(self.capacity) {
            return Err(format!("ring tail {tail} is impossible for head {head}"));
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    fn reopen(file: &File, capacity: u32) -> Result<Ring, String> {
        let fd: OwnedFd = file.as_fd().try_clone_to_owned().unwrap();
        Ring::open(File::from(fd), capacity)
    }

    #[test]
    fn entries_round_trip_between_two_mappings() {
        let (target, file) = Ring::create(4).unwrap();
        let writer = reopen(&file, 4).unwrap();
        assert_eq!(target.peek(0), Ok(None));
        for seq in 0..10u64 {
            let e = RingEntry {
                imm: seq as u32 + 7,
                offset: seq * 100,
                len: 64,
                seq,
            };
            assert_eq!(writer.occupancy(seq), Ok(0));
            writer.push(&e);
            assert_eq!(writer.occupancy(seq + 1), Ok(1));
            let words = target.peek(seq).unwrap().unwrap();
            assert_eq!(RingEntry::decode(words), Ok(e));
            target.release_until(seq + 1);
        }
    }

    fn entry(seq: u64) -> RingEntry {
        RingEntry {
            imm: 1,
            offset: 0,
            len: 0,
            seq,
        }
    }

    /// The two interleavings of "target goes to sleep" and "writer pushes": a push the writer
    /// made without seeing the flag is caught by the target's re-check, and a target that
    /// announced its sleep first is woken, once.
    #[test]
    fn a_push_racing_the_target_to_sleep_is_never_lost() {
        let (target, file) = Ring::create(4).unwrap();
        let writer = reopen(&file, 4).unwrap();
        assert!(!target.has_entry(0), "the target finds the ring empty");
        writer.push(&entry(0)); // ... and the writer pushes before the flag is set
        assert!(!writer.needs_wake(), "nobody sleeps yet");
        assert!(
            !target.prepare_sleep(0),
            "so the target must see the entry and stay up"
        );
        assert!(!writer.needs_wake(), "the flag was withdrawn");
        target.release_until(1);

        assert!(target.prepare_sleep(1), "empty: the target sleeps");
        writer.push(&entry(1));
        assert!(writer.needs_wake(), "the writer wakes the sleeper");
        writer.push(&entry(2));
        assert!(!writer.needs_wake(), "one wake-up per sleep");
        target.awake();
        assert!(!writer.needs_wake());
    }

    #[test]
    fn impossible_head_and_tail_are_errors() {
        let (target, file) = Ring::create(4).unwrap();
        let writer = reopen(&file, 4).unwrap();
        writer.head().store(5, Ordering::Release);
        assert!(target.peek(0).is_err(), "5 entries ahead in a ring of 4");
        target.tail().store(9, Ordering::Release);
        assert!(writer.occupancy(5).is_err(), "tail ahead of head");
    }

    #[test]
    fn reserved_bits_and_bad_headers_are_refused() {
        assert!(RingEntry::decode([1 << 32, 0, 0, 0]).is_err());
        let (_ring, file) = Ring::create(8).unwrap();
        assert!(reopen(&file, 16).is_err(), "memfd too small for 16");
        assert!(
            reopen(&file, 4).is_err(),
            "capacity differs from the header"
        );
        assert!(reopen(&file, 6).is_err(), "not a power of two");
        assert!(reopen(&file, 8).is_ok());
    }
}
