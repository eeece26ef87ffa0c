//! Behaviour of `capnp_rdma::bitmap` against a `Vec<bool>` model (proptest), plus a
//! multi-threaded stress test that detects overlapping allocations through an owner array.
// Under `--cfg loom` the bitmap is built on loom's atomics, which only work inside a loom
// model: `tests/loom_bitmap.rs` covers that configuration.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicU64, Ordering};

use capnp_rdma::bitmap::{BitmapError, BlockBitmap, OwnedBitmap};
use proptest::prelude::*;

/// The obvious implementation: a vector of "in use" flags.
struct Model {
    used: Vec<bool>,
}

impl Model {
    fn new(blocks: u64) -> Self {
        Self {
            used: vec![false; blocks as usize],
        }
    }

    fn count(&self) -> u64 {
        self.used.iter().filter(|&&u| u).count() as u64
    }

    fn is_free(&self, start: u64, k: u64) -> bool {
        self.used[start as usize..(start + k) as usize]
            .iter()
            .all(|&u| !u)
    }

    fn has_run(&self, k: u64) -> bool {
        let blocks = self.used.len() as u64;
        k <= blocks && (0..=blocks - k).any(|s| self.is_free(s, k))
    }

    fn longest_run(&self) -> u64 {
        let (mut best, mut run) = (0, 0);
        for &u in &self.used {
            run = if u { 0 } else { run + 1 };
            best = best.max(run);
        }
        best
    }

    fn set(&mut self, start: u64, k: u64, value: bool) {
        for flag in &mut self.used[start as usize..(start + k) as usize] {
            *flag = value;
        }
    }
}

/// One step of a random schedule. Indices are reduced modulo what exists when the step runs.
#[derive(Debug, Clone)]
enum Op {
    Allocate(u64),
    Free(usize),
    DoubleFree(usize),
    Claim(u64, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..=80).prop_map(Op::Allocate),
        3 => any::<usize>().prop_map(Op::Free),
        1 => any::<usize>().prop_map(Op::DoubleFree),
        1 => (any::<u64>(), 1u64..=70).prop_map(|(s, k)| Op::Claim(s, k)),
    ]
}

fn check_counts(bitmap: &BlockBitmap<'_>, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(bitmap.used(), model.count());
    prop_assert_eq!(bitmap.count_used(), model.count());
    prop_assert_eq!(bitmap.free_blocks(), bitmap.blocks() - model.count());
    Ok(())
}

fn check_bits(bitmap: &BlockBitmap<'_>, model: &Model) -> Result<(), TestCaseError> {
    for (block, &used) in model.used.iter().enumerate() {
        prop_assert_eq!(bitmap.is_allocated(block as u64), used, "block {}", block);
    }
    prop_assert!(!bitmap.is_allocated(bitmap.blocks()));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn matches_the_model(blocks in 1u64..=300, ops in prop::collection::vec(op(), 1..120)) {
        // Caller-provided storage, as in a region, so the raw words can be inspected; it
        // starts as garbage to check that `format` initialises everything.
        let words: Vec<AtomicU64> = (0..BlockBitmap::words_for(blocks))
            .map(|_| AtomicU64::new(0x5a5a_5a5a_5a5a_5a5a))
            .collect();
        let (hint, used) = (AtomicU64::new(blocks * 7), AtomicU64::new(3));
        let bitmap = BlockBitmap::new(&words, &hint, &used, blocks).unwrap();
        bitmap.format();
        let mut model = Model::new(blocks);
        let mut live: Vec<(u64, u64)> = Vec::new();
        let mut freed: Vec<(u64, u64)> = Vec::new();

        for op in ops {
            match op {
                Op::Allocate(k) => match bitmap.allocate(k) {
                    Ok(start) => {
                        prop_assert!(k <= blocks);
                        prop_assert!(start + k <= blocks, "run {}+{} past the end", start, k);
                        prop_assert!(model.is_free(start, k), "run {}+{} overlaps", start, k);
                        model.set(start, k, true);
                        live.push((start, k));
                    }
                    Err(BitmapError::InvalidLength { requested, blocks: b }) => {
                        prop_assert_eq!((requested, b), (k, blocks));
                        prop_assert!(k > blocks);
                    }
                    Err(BitmapError::Exhausted { requested, largest_free_run }) => {
                        prop_assert_eq!(requested, k);
                        prop_assert!(!model.has_run(k), "false Exhausted for {}", k);
                        prop_assert_eq!(largest_free_run, model.longest_run());
                    }
                    Err(e) => prop_assert!(false, "unexpected {e:?}"),
                },
                Op::Free(i) if !live.is_empty() => {
                    let (start, k) = live.swap_remove(i % live.len());
                    prop_assert_eq!(bitmap.free(start, k), Ok(()));
                    model.set(start, k, false);
                    freed.push((start, k));
                }
                Op::DoubleFree(i) if !freed.is_empty() => {
                    let (start, k) = freed[i % freed.len()];
                    let result = bitmap.free(start, k);
                    let first_free = (start..start + k).find(|&b| !model.used[b as usize]);
                    if let Some(block) = first_free {
                        // Not (or only partly) reused since: rejected at the first free block,
                        // and nothing changes (checked below).
                        prop_assert_eq!(result, Err(BitmapError::NotAllocated { block }));
                    } else {
                        // Entirely reused: indistinguishable from a legitimate free. Undo it by
                        // claiming the run back so the model stays in step.
                        prop_assert_eq!(result, Ok(()));
                        prop_assert_eq!(bitmap.claim(start, k), Ok(()));
                    }
                }
                Op::Claim(s, k) => {
                    let start = s % (blocks + 8); // mostly in range, sometimes not
                    let result = bitmap.claim(start, k);
                    if start + k > blocks {
                        prop_assert_eq!(
                            result,
                            Err(BitmapError::OutOfRange { start, len: k, blocks })
                        );
                    } else if model.is_free(start, k) {
                        prop_assert_eq!(result, Ok(()));
                        model.set(start, k, true);
                        live.push((start, k));
                    } else {
                        let first_used = (start..start + k).find(|&b| model.used[b as usize]);
                        prop_assert_eq!(result, Err(BitmapError::Conflict {
                            block: first_used.unwrap_or(u64::MAX),
                        }));
                    }
                }
                Op::Free(_) | Op::DoubleFree(_) => {}
            }
            check_counts(&bitmap, &model)?;
            check_bits(&bitmap, &model)?;
        }

        for (start, k) in live.drain(..) {
            prop_assert_eq!(bitmap.free(start, k), Ok(()));
        }
        prop_assert_eq!(bitmap.used(), 0);
        prop_assert_eq!(bitmap.count_used(), 0);
        prop_assert_eq!(bitmap.largest_free_run(), blocks);
        // Every word is back to padding only: the whole bitmap is one run again.
        let last = words.len() - 1;
        for (w, word) in words.iter().enumerate() {
            let padding = if w == last && blocks % 64 != 0 { !0u64 << (blocks % 64) } else { 0 };
            prop_assert_eq!(word.load(Ordering::Relaxed), padding, "word {}", w);
        }
        prop_assert_eq!(bitmap.allocate(blocks), Ok(0));
        prop_assert_eq!(bitmap.free(0, blocks), Ok(()));
    }

    /// First fit from the hint: the result is the first fitting run at or after the hint, or,
    /// failing that, the first one before it.
    #[test]
    fn first_fit_from_the_hint(
        blocks in 1u64..=300,
        prefill in prop::collection::vec((any::<u64>(), 1u64..=40), 0..20),
        k in 1u64..=100,
    ) {
        let owned = OwnedBitmap::new(blocks);
        let bitmap = owned.view();
        let mut model = Model::new(blocks);
        for (s, len) in prefill {
            let start = s % blocks;
            let len = len.min(blocks - start);
            if bitmap.claim(start, len).is_ok() {
                model.set(start, len, true);
            }
        }
        // Move the hint somewhere by a successful allocate + free (the hint stays put).
        let hint = match bitmap.allocate(1) {
            Ok(b) => {
                prop_assert_eq!(bitmap.free(b, 1), Ok(()));
                if b + 1 >= blocks { 0 } else { b + 1 }
            }
            Err(_) => 0,
        };
        let fits = |s: u64| s + k <= blocks && model.is_free(s, k);
        let expected = (hint..blocks).find(|&s| fits(s)).or_else(|| (0..hint).find(|&s| fits(s)));
        match (bitmap.allocate(k), expected) {
            (Ok(got), Some(want)) => prop_assert_eq!(got, want),
            (Err(BitmapError::Exhausted { .. }), None) => {}
            (Err(BitmapError::InvalidLength { .. }), None) => prop_assert!(k > blocks),
            (got, want) => prop_assert!(false, "got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn format_sets_padding_and_errors_are_reported() {
    let words: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0xdead_beef)).collect();
    let (hint, used) = (AtomicU64::new(77), AtomicU64::new(5));
    let bitmap = BlockBitmap::new(&words, &hint, &used, 130).unwrap();
    bitmap.format();
    assert_eq!(words[0].load(Ordering::Relaxed), 0);
    assert_eq!(words[1].load(Ordering::Relaxed), 0);
    assert_eq!(words[2].load(Ordering::Relaxed), !0b11);
    assert_eq!(
        (bitmap.used(), bitmap.count_used(), bitmap.blocks()),
        (0, 0, 130)
    );
    assert_eq!(bitmap.largest_free_run(), 130);

    assert_eq!(
        bitmap.allocate(0),
        Err(BitmapError::InvalidLength {
            requested: 0,
            blocks: 130
        })
    );
    assert_eq!(
        bitmap.allocate(131),
        Err(BitmapError::InvalidLength {
            requested: 131,
            blocks: 130
        })
    );
    assert_eq!(
        bitmap.free(129, 2),
        Err(BitmapError::OutOfRange {
            start: 129,
            len: 2,
            blocks: 130
        })
    );
    assert_eq!(
        bitmap.claim(u64::MAX, 2),
        Err(BitmapError::OutOfRange {
            start: u64::MAX,
            len: 2,
            blocks: 130
        })
    );
    assert_eq!(bitmap.allocate(130), Ok(0));
    assert_eq!(
        bitmap.allocate(1),
        Err(BitmapError::Exhausted {
            requested: 1,
            largest_free_run: 0
        })
    );
    assert_eq!(bitmap.free(0, 130), Ok(()));
    assert_eq!(words[2].load(Ordering::Relaxed), !0b11);
    assert_eq!(
        BlockBitmap::new(&words, &hint, &used, 200).unwrap_err(),
        BitmapError::Geometry {
            words: 3,
            blocks: 200
        }
    );
}

#[test]
fn double_free_does_not_clear_a_neighbours_bits() {
    let owned = OwnedBitmap::new(200);
    let bitmap = owned.view();
    let a = bitmap.allocate(70).unwrap(); // 0..70
    bitmap.free(a, 70).unwrap();
    // Someone else now owns 66 and 67 (word 1). The stale free of 0..70 covers word 0 (all
    // free) and word 1 (partly owned by someone else).
    bitmap.claim(66, 2).unwrap();
    assert_eq!(
        bitmap.free(a, 70),
        Err(BitmapError::NotAllocated { block: 0 })
    );
    bitmap.claim(0, 64).unwrap(); // word 0 reused too: now word 1 is the one with free bits
    assert_eq!(
        bitmap.free(a, 70),
        Err(BitmapError::NotAllocated { block: 64 })
    );
    assert!(bitmap.is_allocated(66) && bitmap.is_allocated(67) && bitmap.is_allocated(0));
    assert_eq!(bitmap.used(), 66);
    assert_eq!(bitmap.count_used(), 66);
}

#[test]
fn threads_never_share_a_block() {
    const BLOCKS: u64 = 1000;
    const THREADS: u64 = 4;
    const ROUNDS: usize = 20_000;
    let owned = OwnedBitmap::new(BLOCKS);
    let bitmap = owned.view();
    let owners: Vec<AtomicU64> = (0..BLOCKS).map(|_| AtomicU64::new(0)).collect();

    std::thread::scope(|scope| {
        for id in 1..=THREADS {
            let owners = &owners;
            scope.spawn(move || {
                // A small xorshift generator: deterministic per thread, no dependency.
                let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ id;
                let mut next = move || {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state
                };
                let mut mine: Vec<(u64, u64)> = Vec::new();
                let mut exhausted = 0u32;
                for _ in 0..ROUNDS {
                    if mine.is_empty() || (mine.len() < 12 && next() % 2 == 0) {
                        let k = 1 + next() % 48;
                        match bitmap.allocate(k) {
                            Ok(start) => {
                                for block in start..start + k {
                                    let tagged = owners[block as usize].compare_exchange(
                                        0,
                                        id,
                                        Ordering::Relaxed,
                                        Ordering::Relaxed,
                                    );
                                    assert_eq!(tagged, Ok(0), "block {block} handed out twice");
                                }
                                mine.push((start, k));
                            }
                            Err(BitmapError::Exhausted { .. }) => exhausted += 1,
                            Err(e) => panic!("unexpected {e:?}"),
                        }
                    } else {
                        let (start, k) = mine.swap_remove(next() as usize % mine.len());
                        for block in start..start + k {
                            let cleared = owners[block as usize].compare_exchange(
                                id,
                                0,
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                            );
                            assert_eq!(cleared, Ok(id), "block {block} changed owner");
                        }
                        bitmap.free(start, k).unwrap();
                    }
                }
                for (start, k) in mine {
                    for block in start..start + k {
                        owners[block as usize].store(0, Ordering::Relaxed);
                    }
                    bitmap.free(start, k).unwrap();
                }
                exhausted
            });
        }
    });
    assert_eq!(bitmap.used(), 0);
    assert_eq!(bitmap.count_used(), 0);
    assert_eq!(bitmap.largest_free_run(), BLOCKS);
}
