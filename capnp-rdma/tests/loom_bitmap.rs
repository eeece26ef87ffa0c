//! Loom models of the lock-free block bitmap: every interleaving of
//! concurrent allocate/free on runs that span words, with rollback, and the data handoff that
//! the `Release` free / `Acquire` claim pairing must make race-free.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p capnp-rdma --test loom_bitmap --release`.
//! The search is exhaustive (a few seconds); `LOOM_MAX_PREEMPTIONS=N` bounds it.
#![cfg(loom)]

use capnp_rdma::bitmap::{BitmapError, OwnedBitmap};
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;

/// Explores every interleaving (the models are small: all of them take a few seconds in
/// release mode); `LOOM_MAX_PREEMPTIONS=N` bounds the search if they grow.
fn check(model: impl Fn() + Sync + Send + 'static) {
    loom::model::Builder::new().check(model);
}

/// A bitmap of `blocks` blocks with everything in use except the given runs.
fn only_free(blocks: u64, free: &[(u64, u64)]) -> Arc<OwnedBitmap> {
    let owned = Arc::new(OwnedBitmap::new(blocks));
    let bitmap = owned.view();
    bitmap.claim(0, blocks).expect("fresh bitmap is free");
    for &(start, len) in free {
        bitmap.free(start, len).expect("was claimed above");
    }
    owned
}

fn assert_consistent(owned: &OwnedBitmap, expected_used: u64) {
    let bitmap = owned.view();
    assert_eq!(bitmap.used(), expected_used);
    assert_eq!(bitmap.count_used(), expected_used);
}

fn spawn_allocate(
    owned: &Arc<OwnedBitmap>,
    k: u64,
) -> thread::JoinHandle<Result<u64, BitmapError>> {
    let owned = Arc::clone(owned);
    thread::spawn(move || owned.view().allocate(k))
}

/// (1a) Two threads race for runs in the only free stretch, 60..72, which straddles the word
/// boundary: both first try the crossing run 60..66. Usually the loser then finds 66..72; but
/// if the loser held word 0's part (60..64) while the winner looked, the winner lands on a
/// later run such as 64..70, and after the loser's rollback no run of 6 is left. Either way
/// the runs handed out are disjoint, the counts match, and an `Exhausted` is only returned
/// when no run of 6 exists.
#[test]
fn two_allocations_around_a_word_boundary() {
    check(|| {
        let owned = only_free(128, &[(60, 12)]);
        let a = spawn_allocate(&owned, 6);
        let b = spawn_allocate(&owned, 6);
        let results = [a.join().unwrap(), b.join().unwrap()];
        let bitmap = owned.view();
        let mut runs: Vec<u64> = Vec::new();
        for result in &results {
            match result {
                Ok(start) => {
                    assert!((60..=66).contains(start), "run {start}..+6 was not free");
                    runs.push(*start);
                }
                Err(BitmapError::Exhausted { requested: 6, .. }) => {
                    assert!(bitmap.largest_free_run() < 6, "{results:?} with a run left");
                }
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        assert!(!runs.is_empty(), "nobody got a run: {results:?}");
        if let [x, y] = runs[..] {
            assert!(x.abs_diff(y) >= 6, "overlapping runs {results:?}");
        }
        for block in 60..72 {
            let owned_by_a_run = runs.iter().any(|&s| (s..s + 6).contains(&block));
            assert_eq!(bitmap.is_allocated(block), owned_by_a_run, "block {block}");
        }
        assert_consistent(&owned, 116 + 6 * runs.len() as u64);
    });
}

/// (1b) Every free run crosses a word boundary (three words, two boundaries): both threads
/// get one of the two crossing runs, never the same one.
#[test]
fn two_allocations_that_must_span_words() {
    check(|| {
        let owned = only_free(192, &[(60, 8), (124, 8)]);
        let a = spawn_allocate(&owned, 8);
        let b = spawn_allocate(&owned, 8);
        let mut got = [a.join().unwrap().unwrap(), b.join().unwrap().unwrap()];
        got.sort_unstable();
        assert_eq!(got, [60, 124]);
        assert_consistent(&owned, 192);
    });
}

/// (2) Free of a run racing an allocation next to it. The freeing thread scrubs its blocks
/// (non-atomic writes) before freeing; whoever gets them next reads them. Loom reports a data
/// race unless the free (`Release`) happens before the claim (`Acquire`) that takes them.
fn free_races_allocate(k: u64) {
    check(move || {
        // In use: everything but 64..68. The run being freed is 60..64.
        let owned = only_free(128, &[(64, 4)]);
        let cells: Arc<Vec<UnsafeCell<u64>>> = Arc::new(
            (60..68)
                .map(|b| UnsafeCell::new(if b < 64 { 0xdead } else { 0 }))
                .collect(),
        );

        let freer = {
            let (owned, cells) = (Arc::clone(&owned), Arc::clone(&cells));
            thread::spawn(move || {
                for cell in &cells[..4] {
                    // SAFETY: blocks 60..64 belong to this thread until it frees them below.
                    cell.with_mut(|p| unsafe { *p = 0 });
                }
                owned.view().free(60, 4)
            })
        };
        let allocator = {
            let (owned, cells) = (Arc::clone(&owned), Arc::clone(&cells));
            thread::spawn(move || {
                let start = owned.view().allocate(k)?;
                for cell in &cells[(start - 60) as usize..(start - 60 + k) as usize] {
                    // SAFETY: the blocks are this thread's since `allocate` returned them; loom
                    // checks that the previous owner's writes happen before these accesses.
                    let old = cell.with(|p| unsafe { *p });
                    assert_eq!(old, 0, "block handed over unscrubbed");
                    // SAFETY: as above.
                    cell.with_mut(|p| unsafe { *p = 1 });
                }
                Ok(start)
            })
        };
        assert_eq!(freer.join().unwrap(), Ok(()));
        let got = allocator.join().unwrap();
        match (k, got) {
            (4, Ok(start)) => {
                assert!(start == 60 || start == 64, "got {start}");
                assert_consistent(&owned, 124);
            }
            (8, Ok(start)) => {
                assert_eq!(start, 60);
                assert_consistent(&owned, 128);
            }
            // Ran before the free: 64..68 alone is too short.
            (8, Err(BitmapError::Exhausted { requested: 8, .. })) => assert_consistent(&owned, 120),
            other => panic!("unexpected {other:?}"),
        }
    });
}

#[test]
fn free_races_allocate_of_the_neighbouring_run() {
    free_races_allocate(4);
}

#[test]
fn free_races_allocate_across_the_freed_run() {
    free_races_allocate(8);
}

/// (3a) Two threads race for the only run, asking for the same length: exactly one wins.
#[test]
fn race_for_the_only_run() {
    check(|| {
        let owned = only_free(128, &[(60, 8)]);
        let a = spawn_allocate(&owned, 8);
        let b = spawn_allocate(&owned, 8);
        let results = [a.join().unwrap(), b.join().unwrap()];
        let wins = results.iter().filter(|r| r == &&Ok(60)).count();
        let losses = results
            .iter()
            .filter(|r| matches!(r, Err(BitmapError::Exhausted { requested: 8, .. })))
            .count();
        assert_eq!((wins, losses), (1, 1), "{results:?}");
        assert_consistent(&owned, 128);
    });
}

/// (3b) Rollback: A needs all of 60..68 (words 0 and 1), B needs 4 and starts at the hint (64).
/// When B takes 64..68 while A holds 60..64, A must roll word 0 back. Exactly one of them
/// succeeds and the bitmap then holds exactly the winner's bits.
#[test]
fn race_with_rollback_leaves_only_the_winners_bits() {
    check(|| {
        let owned = Arc::new(OwnedBitmap::new(128));
        {
            let bitmap = owned.view();
            bitmap.claim(0, 60).unwrap();
            assert_eq!(bitmap.allocate(4), Ok(60)); // moves the hint to 64
            bitmap.free(60, 4).unwrap();
            bitmap.claim(68, 60).unwrap();
        }
        let a = spawn_allocate(&owned, 8);
        let b = spawn_allocate(&owned, 4);
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        let bitmap = owned.view();
        match (a, b) {
            (Ok(60), Err(BitmapError::Exhausted { requested: 4, .. })) => {
                assert!((60..68).all(|block| bitmap.is_allocated(block)));
                assert_consistent(&owned, 128);
            }
            (Err(BitmapError::Exhausted { requested: 8, .. }), Ok(b)) => {
                assert_eq!(b, 64, "B starts at the hint");
                for block in 60..68 {
                    let mine = (b..b + 4).contains(&block);
                    assert_eq!(bitmap.is_allocated(block), mine, "block {block}");
                }
                assert_consistent(&owned, 124);
            }
            other => panic!("not exactly one winner: {other:?}"),
        }
    });
}
