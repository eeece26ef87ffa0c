//! The journal: record round trips, torn tails, corruption, compaction, the decoder's limits,
//! and the fuzz entry point over generated and mutated seeds.

use proptest::prelude::*;
use staging_store::journal::{
    classify, decode_all, encode_record, frame_crc, frame_crc_append, fuzz_decode, DecodeError,
    Journal, JournalError, Record, Stop, SyncPolicy, Tail, MAX_BODY_BYTES, MAX_CONFIG_BYTES,
    MAX_NAME_BYTES, MAX_STATE_BYTES,
};
use std::path::{Path, PathBuf};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::hash::{BuildHasher, Hasher};
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let dir = std::env::temp_dir().join(format!(
            "staging-store-journal-{tag}-{}-{r:x}",
            std::process::id()
        ));
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn journal_file(dir: &Path) -> PathBuf {
    dir.join("journal")
}

fn every_kind() -> Vec<Record> {
    vec![
        Record::StreamCreated {
            name: "camera-1".into(),
            config: vec![1, 2, 3, 0, 255],
        },
        Record::StreamCreated {
            name: "ünïcødé-ストリーム".into(),
            config: vec![],
        },
        Record::Sealed {
            stream: "camera-1".into(),
            seq: 7,
            lease_offset: 1 << 20,
            lease_len: 3 << 16,
            data_offset: (1 << 20) + 256,
            data_len: 3_110_400,
            crc32c: 0xdead_beef,
            unix_nanos: 1_700_000_000_123_456_789,
        },
        Record::Sealed {
            stream: String::new(),
            seq: u64::MAX,
            lease_offset: u64::MAX,
            lease_len: 0,
            data_offset: 0,
            data_len: u64::MAX,
            crc32c: u32::MAX,
            unix_nanos: 0,
        },
        Record::Freed {
            stream: "camera-1".into(),
            seq: 7,
        },
        Record::Cursor {
            stream: "camera-1".into(),
            consumer: "encoder".into(),
            next_seq: 8,
        },
        Record::ConsumerDeleted {
            stream: "camera-1".into(),
            consumer: "encoder".into(),
        },
        Record::StreamDeleted {
            name: "camera-1".into(),
        },
        Record::StreamCreated {
            name: "n".repeat(MAX_NAME_BYTES),
            config: vec![0xab; MAX_CONFIG_BYTES],
        },
        Record::Cursor {
            stream: "s".repeat(MAX_NAME_BYTES),
            consumer: "c".repeat(MAX_NAME_BYTES),
            next_seq: 0,
        },
        Record::Ended {
            stream: "camera-1".into(),
        },
        Record::ConsumerState {
            stream: "camera-1".into(),
            consumer: "sink".into(),
            next_seq: 9,
            state: vec![0x5a; MAX_STATE_BYTES],
        },
        Record::Group(vec![
            Record::Sealed {
                stream: "out".into(),
                seq: 3,
                lease_offset: 65536,
                lease_len: 65536,
                data_offset: 65536,
                data_len: 4096,
                crc32c: 1,
                unix_nanos: 2,
            },
            Record::Cursor {
                stream: "in".into(),
                consumer: "filter".into(),
                next_seq: 4,
            },
        ]),
        Record::Group(Vec::new()),
    ]
}

fn encoded(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        encode_record(r, &mut out).unwrap();
    }
    out
}

/// Framed length of each record, cumulative: `ends[i]` is where record `i` ends.
fn ends(records: &[Record]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for r in records {
        encode_record(r, &mut buf).unwrap();
        out.push(buf.len() as u64);
    }
    out
}

fn open(dir: &Path) -> (Journal, staging_store::journal::Recovered) {
    Journal::open(dir, SyncPolicy::Never).unwrap()
}

#[test]
fn every_record_kind_round_trips_through_the_file() {
    let tmp = TempDir::new("kinds");
    let records = every_kind();
    for policy in [SyncPolicy::Never, SyncPolicy::Seal, SyncPolicy::Always] {
        let _ = std::fs::remove_dir_all(&tmp.0);
        {
            let (mut journal, recovered) = Journal::open(&tmp.0, policy).unwrap();
            assert_eq!(recovered.records, vec![]);
            assert_eq!(journal.len_bytes(), 0);
            for r in &records {
                journal.append(r).unwrap();
            }
            assert_eq!(
                journal.len_bytes(),
                std::fs::metadata(journal_file(&tmp.0)).unwrap().len()
            );
            journal.sync().unwrap();
        }
        let (journal, recovered) = open(&tmp.0);
        assert_eq!(recovered.records, records);
        assert_eq!(recovered.torn_tail_bytes, 0);
        assert_eq!(recovered.corrupt, None);
        assert_eq!(journal.len_bytes(), *ends(&records).last().unwrap());
    }
    // The pure decoder agrees with the file.
    let bytes = std::fs::read(journal_file(&tmp.0)).unwrap();
    assert_eq!(bytes, encoded(&records));
    let (decoded, stop) = decode_all(&bytes);
    assert_eq!(decoded, records);
    assert_eq!(
        stop,
        Stop {
            offset: bytes.len() as u64,
            error: None
        }
    );
}

#[test]
fn the_format_is_as_documented() {
    let mut out = Vec::new();
    encode_record(
        &Record::Freed {
            stream: "ab".into(),
            seq: 0x0102_0304_0506_0708,
        },
        &mut out,
    )
    .unwrap();
    let body = [4u8, 2, 0, b'a', b'b', 8, 7, 6, 5, 4, 3, 2, 1];
    assert_eq!(&out[..4], &(body.len() as u32).to_le_bytes());
    assert_eq!(&out[4..8], &frame_crc(&body).to_le_bytes());
    assert_eq!(&out[8..], &body);
}

#[test]
fn too_long_fields_are_typed_errors_on_append_and_on_decode() {
    let tmp = TempDir::new("long");
    let (mut journal, _) = open(&tmp.0);
    let long = "x".repeat(MAX_NAME_BYTES + 1);
    let cases = [
        Record::StreamCreated {
            name: long.clone(),
            config: vec![],
        },
        Record::StreamCreated {
            name: "ok".into(),
            config: vec![0; MAX_CONFIG_BYTES + 1],
        },
        Record::StreamDeleted { name: long.clone() },
        Record::Freed {
            stream: long.clone(),
            seq: 1,
        },
        Record::Cursor {
            stream: "ok".into(),
            consumer: long.clone(),
            next_seq: 1,
        },
        Record::ConsumerDeleted {
            stream: "ok".into(),
            consumer: "y".repeat(70_000),
        },
    ];
    for record in &cases {
        match journal.append(record) {
            Err(JournalError::TooLong { len, max, .. }) => assert!(len > max),
            other => panic!("expected TooLong, got {other:?}"),
        }
        let mut buf = vec![9];
        assert!(encode_record(record, &mut buf).is_err());
        assert_eq!(buf, vec![9], "a failed encode leaves the buffer as it was");
    }
    assert_eq!(journal.len_bytes(), 0, "nothing was written");
    journal
        .append(&Record::StreamDeleted {
            name: "x".repeat(MAX_NAME_BYTES),
        })
        .unwrap();

    // Hand-made records with overlong fields but valid framing and CRC.
    let framed = |body: Vec<u8>| {
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&frame_crc(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    };
    let mut name256 = vec![2u8];
    name256.extend_from_slice(&256u16.to_le_bytes());
    name256.extend_from_slice(&[b'x'; 256]);
    let mut config4097 = vec![1u8, 1, 0, b'x'];
    config4097.extend_from_slice(&4097u16.to_le_bytes());
    config4097.extend_from_slice(&[0; 4097]);
    for (body, field) in [(name256, "stream name"), (config4097, "stream config")] {
        let (records, stop) = decode_all(&framed(body));
        assert!(records.is_empty());
        match stop.error {
            Some(DecodeError::TooLong { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected TooLong, got {other:?}"),
        }
    }
}

#[test]
fn malformed_bodies_are_typed_errors() {
    let framed = |body: &[u8]| {
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&frame_crc(body).to_le_bytes());
        out.extend_from_slice(body);
        out
    };
    let err = |bytes: &[u8]| decode_all(bytes).1.error.unwrap();
    assert_eq!(err(&framed(&[99])), DecodeError::UnknownKind { kind: 99 });
    assert!(matches!(
        err(&framed(&[4, 1, 0, b's', 1, 2])),
        DecodeError::FieldTruncated { field: "seq" }
    ));
    assert!(matches!(
        err(&framed(&[2, 2, 0, 0xff, 0xfe])),
        DecodeError::NotUtf8 { .. }
    ));
    assert_eq!(
        err(&framed(&[2, 1, 0, b's', 0])),
        DecodeError::TrailingBytes { bytes: 1 }
    );
    // Length fields: 0, just over the cap, 4 GiB (must not allocate it).
    for len in [0u32, MAX_BODY_BYTES as u32 + 1, u32::MAX] {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[1; 12]);
        assert_eq!(err(&bytes), DecodeError::BadLength { len });
    }
    let mut bytes = framed(&[2, 1, 0, b's']);
    bytes[5] ^= 1;
    assert!(matches!(err(&bytes), DecodeError::BadCrc { .. }));
    assert!(matches!(
        err(&bytes[..5]),
        DecodeError::PartialHeader { available: 5 }
    ));
    assert!(matches!(
        err(&framed(&[2, 1, 0, b's'])[..10]),
        DecodeError::PartialBody {
            len: 4,
            available: 2
        }
    ));
}

#[test]
fn a_torn_tail_is_cut_off_and_later_appends_are_readable() {
    let tmp = TempDir::new("torn");
    let records = every_kind();
    let ends = ends(&records);
    let full = encoded(&records);
    let last_start = ends[ends.len() - 2] as usize;
    // Every cut inside the last record, from "no header byte" to "one body byte missing".
    for cut in last_start + 1..full.len() {
        let _ = std::fs::remove_dir_all(&tmp.0);
        std::fs::create_dir_all(&tmp.0).unwrap();
        std::fs::write(journal_file(&tmp.0), &full[..cut]).unwrap();
        let (mut journal, recovered) = open(&tmp.0);
        assert_eq!(recovered.records, records[..records.len() - 1], "cut {cut}");
        assert_eq!(recovered.torn_tail_bytes, (cut - last_start) as u64);
        assert_eq!(recovered.corrupt, None);
        assert_eq!(journal.len_bytes(), last_start as u64);
        assert_eq!(
            std::fs::metadata(journal_file(&tmp.0)).unwrap().len(),
            last_start as u64,
            "the file itself was truncated"
        );
        let extra = Record::Freed {
            stream: "after".into(),
            seq: cut as u64,
        };
        journal.append(&extra).unwrap();
        drop(journal);
        let (_, recovered) = open(&tmp.0);
        let mut expected = records[..records.len() - 1].to_vec();
        expected.push(extra);
        assert_eq!(recovered.records, expected);
        assert_eq!(recovered.torn_tail_bytes, 0);
    }
}

#[test]
fn a_bad_crc_on_the_last_record_and_a_zeroed_tail_are_torn() {
    let tmp = TempDir::new("torn-crc");
    std::fs::create_dir_all(&tmp.0).unwrap();
    let records = every_kind();
    let ends = ends(&records);
    let mut bytes = encoded(&records);
    let n = bytes.len();
    bytes[n - 1] ^= 0x40; // the last record's body never fully reached the disk
    std::fs::write(journal_file(&tmp.0), &bytes).unwrap();
    let (_, recovered) = open(&tmp.0);
    assert_eq!(recovered.records, records[..records.len() - 1]);
    assert_eq!(recovered.torn_tail_bytes, n as u64 - ends[ends.len() - 2]);
    assert_eq!(recovered.corrupt, None);

    // The file grew but the data of the last appends was lost: zeroes, several records long.
    let mut bytes = encoded(&records);
    bytes.extend_from_slice(&[0; 300]);
    std::fs::write(journal_file(&tmp.0), &bytes).unwrap();
    let (_, recovered) = open(&tmp.0);
    assert_eq!(recovered.records, records);
    assert_eq!(recovered.torn_tail_bytes, 300);
    assert_eq!(recovered.corrupt, None);
}

#[test]
fn a_corrupt_middle_record_stops_replay_and_is_preserved() {
    let tmp = TempDir::new("corrupt");
    std::fs::create_dir_all(&tmp.0).unwrap();
    let records = every_kind();
    let ends = ends(&records);
    let mut bytes = encoded(&records);
    // Flip a body byte of record 2: its CRC fails and 7 intact records follow.
    let at = ends[1] as usize + 8 + 3;
    bytes[at] ^= 0x01;
    std::fs::write(journal_file(&tmp.0), &bytes).unwrap();
    let (mut journal, recovered) = open(&tmp.0);
    assert_eq!(recovered.records, records[..2]);
    assert_eq!(recovered.torn_tail_bytes, 0);
    let corrupt = recovered.corrupt.expect("corruption reported");
    assert_eq!(corrupt.offset, ends[1]);
    assert!(matches!(corrupt.reason, DecodeError::BadCrc { .. }));
    assert_eq!(corrupt.discarded_bytes, bytes.len() as u64 - ends[1]);
    assert_eq!(corrupt.records_after, records.len() as u64 - 3);
    assert_eq!(
        std::fs::read(&corrupt.preserved_as).unwrap(),
        bytes,
        "the damaged file is kept as it was"
    );
    assert_eq!(journal.len_bytes(), ends[1]);
    // Appends after recovery are replayed next time: the journal was cut at the bad record.
    let extra = Record::StreamDeleted {
        name: "camera-1".into(),
    };
    journal.append(&extra).unwrap();
    drop(journal);
    let (_, recovered) = open(&tmp.0);
    assert_eq!(recovered.records, [&records[..2], &[extra][..]].concat());
    assert_eq!(recovered.corrupt, None);
}

#[test]
fn other_corruptions_are_not_mistaken_for_torn_tails() {
    let records = every_kind();
    let ends = ends(&records);
    let good = encoded(&records);

    // A length field overwritten in the middle: nothing after it can be found.
    let mut bytes = good.clone();
    let at = ends[2] as usize;
    bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let (decoded, stop) = decode_all(&bytes);
    assert_eq!(decoded, records[..3]);
    assert_eq!(
        classify(&bytes, &stop),
        Tail::Corrupt {
            bytes: bytes.len() as u64 - ends[2],
            records_after: 0
        }
    );

    // A whole, CRC-valid last record of an unknown kind was written by something else: corrupt,
    // not torn, even at the end.
    let mut bytes = good.clone();
    let body = [42u8, 1, 2, 3];
    bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&frame_crc(&body).to_le_bytes());
    bytes.extend_from_slice(&body);
    let (decoded, stop) = decode_all(&bytes);
    assert_eq!(decoded, records);
    assert_eq!(stop.error, Some(DecodeError::UnknownKind { kind: 42 }));
    assert_eq!(
        classify(&bytes, &stop),
        Tail::Corrupt {
            bytes: 12,
            records_after: 0
        }
    );

    // A zeroed hole in the middle (a lost page) with records after it.
    let mut bytes = good;
    let hole = ends[0] as usize..ends[2] as usize;
    bytes[hole].fill(0);
    let (decoded, stop) = decode_all(&bytes);
    assert_eq!(decoded, records[..1]);
    assert!(matches!(classify(&bytes, &stop), Tail::Corrupt { .. }));
}

#[test]
fn compaction_keeps_exactly_the_live_records() {
    let tmp = TempDir::new("compact");
    let (mut journal, _) = Journal::open(&tmp.0, SyncPolicy::Seal).unwrap();
    journal
        .append(&Record::StreamCreated {
            name: "s".into(),
            config: b"{}".to_vec(),
        })
        .unwrap();
    for seq in 0..500u64 {
        journal
            .append(&Record::Sealed {
                stream: "s".into(),
                seq,
                lease_offset: seq << 16,
                lease_len: 1 << 16,
                data_offset: seq << 16,
                data_len: 1000,
                crc32c: seq as u32,
                unix_nanos: seq,
            })
            .unwrap();
        journal
            .append(&Record::Cursor {
                stream: "s".into(),
                consumer: "c".into(),
                next_seq: seq + 1,
            })
            .unwrap();
        if seq >= 3 {
            journal
                .append(&Record::Freed {
                    stream: "s".into(),
                    seq: seq - 3,
                })
                .unwrap();
        }
    }
    let before = journal.len_bytes();
    let live: Vec<Record> = {
        let recovered = decode_all(&std::fs::read(journal_file(&tmp.0)).unwrap()).0;
        // The live state: the stream, the three frames not freed, the last cursor.
        let mut live = vec![recovered[0].clone()];
        live.extend(
            recovered
                .iter()
                .filter(|r| matches!(r, Record::Sealed { seq, .. } if *seq >= 497))
                .cloned(),
        );
        live.push(
            recovered
                .iter()
                .rev()
                .find(|r| matches!(r, Record::Cursor { .. }))
                .unwrap()
                .clone(),
        );
        live
    };
    assert_eq!(live.len(), 5);
    journal.compact(live.clone()).unwrap();
    assert_eq!(journal.len_bytes(), encoded(&live).len() as u64);
    assert!(journal.len_bytes() < before / 50);
    assert!(!tmp.0.join("journal.tmp").exists());
    // Appends after compaction go to the new file.
    let extra = Record::Freed {
        stream: "s".into(),
        seq: 497,
    };
    journal.append(&extra).unwrap();
    drop(journal);
    let (journal, recovered) = open(&tmp.0);
    assert_eq!(
        recovered.records,
        [&live[..], &[extra.clone()][..]].concat()
    );
    assert_eq!(recovered.torn_tail_bytes, 0);
    assert_eq!(recovered.corrupt, None);

    // Compacting to nothing, and a compaction interrupted before its rename (a stale
    // journal.tmp) are harmless.
    let mut journal = journal;
    journal.compact(Vec::new()).unwrap();
    assert_eq!(journal.len_bytes(), 0);
    journal.append(&extra).unwrap();
    drop(journal);
    std::fs::write(tmp.0.join("journal.tmp"), b"half a snapshot").unwrap();
    let (_, recovered) = open(&tmp.0);
    assert_eq!(recovered.records, vec![extra]);
    assert!(!tmp.0.join("journal.tmp").exists());

    // A record that cannot be encoded fails the compaction and leaves the journal as it was.
    let (mut journal, _) = open(&tmp.0);
    let len = journal.len_bytes();
    let bad = Record::StreamDeleted {
        name: "z".repeat(1000),
    };
    assert!(matches!(
        journal.compact(vec![live[0].clone(), bad]),
        Err(JournalError::TooLong { .. })
    ));
    assert_eq!(journal.len_bytes(), len);
    assert!(!tmp.0.join("journal.tmp").exists());
    drop(journal);
    assert_eq!(open(&tmp.0).1.records.len(), 1);
}

#[test]
fn one_journal_per_directory() {
    let tmp = TempDir::new("lock");
    let (journal, _) = open(&tmp.0);
    match Journal::open(&tmp.0, SyncPolicy::Never) {
        Err(JournalError::Locked { dir }) => assert_eq!(dir, tmp.0),
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(journal);
    let _reopened = open(&tmp.0);
}

#[test]
fn io_errors_name_the_path_and_the_operation() {
    let tmp = TempDir::new("io");
    std::fs::create_dir_all(&tmp.0).unwrap();
    let file = tmp.0.join("not-a-dir");
    std::fs::write(&file, b"").unwrap();
    match Journal::open(&file, SyncPolicy::Never) {
        Err(e @ JournalError::Io { .. }) => {
            let text = e.to_string();
            assert!(text.contains("not-a-dir"), "{text}");
        }
        other => panic!("expected Io, got {other:?}"),
    }
}

#[test]
fn frame_crc_is_crc32c() {
    // The standard check value of CRC-32C (Castagnoli).
    assert_eq!(frame_crc(b"123456789"), 0xE306_9283);
    assert_eq!(frame_crc(b""), 0);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    let (a, b) = data.split_at(12_345);
    assert_eq!(frame_crc_append(frame_crc(a), b), frame_crc(&data));
}

// ---------------------------------------------------------------------------------------------
// Property tests and the fuzz entry point.

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9._-]{0,12}",
        "\\PC{0,40}".prop_filter("fits", |s: &String| s.len() <= MAX_NAME_BYTES),
        Just("m".repeat(MAX_NAME_BYTES)),
    ]
}

fn record() -> impl Strategy<Value = Record> {
    prop_oneof![
        (name(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(name, config)| Record::StreamCreated { name, config }),
        name().prop_map(|name| Record::StreamDeleted { name }),
        (
            name(),
            any::<u64>(),
            any::<[u64; 5]>(),
            any::<u32>(),
            any::<u64>()
        )
            .prop_map(|(stream, seq, [a, b, c, d, _], crc32c, unix_nanos)| {
                Record::Sealed {
                    stream,
                    seq,
                    lease_offset: a,
                    lease_len: b,
                    data_offset: c,
                    data_len: d,
                    crc32c,
                    unix_nanos,
                }
            }),
        (name(), any::<u64>()).prop_map(|(stream, seq)| Record::Freed { stream, seq }),
        (name(), name(), any::<u64>()).prop_map(|(stream, consumer, next_seq)| {
            Record::Cursor {
                stream,
                consumer,
                next_seq,
            }
        }),
        (name(), name())
            .prop_map(|(stream, consumer)| Record::ConsumerDeleted { stream, consumer }),
        name().prop_map(|stream| Record::Ended { stream }),
        (
            name(),
            name(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(
                |(stream, consumer, next_seq, state)| Record::ConsumerState {
                    stream,
                    consumer,
                    next_seq,
                    state,
                }
            ),
    ]
}

/// Any record, groups of leaf records included.
fn any_record() -> impl Strategy<Value = Record> {
    prop_oneof![
        4 => record(),
        1 => prop::collection::vec(record(), 0..4).prop_map(Record::Group),
    ]
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Set { at: usize, byte: u8 },
    Truncate { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
    LengthField { record: usize, len: u32 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..32).prop_map(|(at, len)| Mutation::Remove { at, len }),
        (
            any::<usize>(),
            prop_oneof![
                Just(0u32),
                Just(MAX_BODY_BYTES as u32),
                Just(MAX_BODY_BYTES as u32 + 1),
                Just(u32::MAX),
                any::<u32>()
            ]
        )
            .prop_map(|(record, len)| Mutation::LengthField { record, len }),
    ]
}

fn apply(bytes: &mut Vec<u8>, ends: &[u64], m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let n = bytes.len();
    match m {
        Mutation::Flip { at, bit } => bytes[at % n] ^= 1 << bit,
        Mutation::Set { at, byte } => bytes[at % n] = *byte,
        Mutation::Truncate { at } => bytes.truncate(at % n),
        Mutation::Insert { at, bytes: b } => {
            let at = at % (n + 1);
            bytes.splice(at..at, b.iter().copied());
        }
        Mutation::Remove { at, len } => {
            let at = at % n;
            bytes.drain(at..(at + len).min(n));
        }
        Mutation::LengthField { record, len } => {
            let start = match record % (ends.len() + 1) {
                0 => 0,
                i => ends[i - 1] as usize,
            };
            if start + 4 <= n {
                bytes[start..start + 4].copy_from_slice(&len.to_le_bytes());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_record_sequences_round_trip(records in prop::collection::vec(any_record(), 0..40)) {
        let bytes = encoded(&records);
        let (decoded, stop) = decode_all(&bytes);
        prop_assert_eq!(&decoded, &records);
        prop_assert_eq!(stop, Stop { offset: bytes.len() as u64, error: None });
        fuzz_decode(&bytes);
    }

    #[test]
    fn random_mutations_never_panic(
        records in prop::collection::vec(any_record(), 1..12),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let ends = ends(&records);
        let mut bytes = encoded(&records);
        for m in &mutations {
            apply(&mut bytes, &ends, m);
        }
        fuzz_decode(&bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        fuzz_decode(&bytes);
    }
}

#[test]
fn random_record_sequences_round_trip_through_the_file() {
    let tmp = TempDir::new("prop-file");
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(32));
    runner
        .run(&prop::collection::vec(any_record(), 0..30), |records| {
            let _ = std::fs::remove_dir_all(&tmp.0);
            {
                let (mut journal, _) = open(&tmp.0);
                for r in &records {
                    journal.append(r).unwrap();
                }
            }
            let (_, recovered) = open(&tmp.0);
            prop_assert_eq!(recovered.records, records);
            Ok(())
        })
        .unwrap();
}

/// xorshift64*, deterministic seeds without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A few hundred inputs for `fuzz_decode` (and the cargo-fuzz `journal` target's corpus):
/// valid journals, every cut of one, bit flips, length-field extremes, and random mutations.
fn seeds() -> Vec<Vec<u8>> {
    let records = every_kind();
    let ends = ends(&records);
    let full = encoded(&records);
    let mut seeds = vec![Vec::new(), full.clone()];
    for r in &records {
        seeds.push(encoded(std::slice::from_ref(r)));
    }
    let first = ends[0] as usize;
    for cut in 0..first {
        seeds.push(full[..cut].to_vec());
    }
    for bit in 0..(first * 8).min(200) {
        let mut s = full[..first].to_vec();
        s[bit / 8] ^= 1 << (bit % 8);
        seeds.push(s);
    }
    for len in [
        0u32,
        1,
        8,
        MAX_BODY_BYTES as u32,
        MAX_BODY_BYTES as u32 + 1,
        u32::MAX,
    ] {
        let mut s = full.clone();
        s[ends[1] as usize..ends[1] as usize + 4].copy_from_slice(&len.to_le_bytes());
        seeds.push(s);
        let mut header = len.to_le_bytes().to_vec();
        header.extend_from_slice(&[0; 4]);
        seeds.push(header);
    }
    let mut zero_tail = full.clone();
    zero_tail.extend_from_slice(&[0; 64]);
    seeds.push(zero_tail);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..200 {
        let mut s = full.clone();
        for _ in 0..1 + rng.below(4) {
            let m = match rng.below(6) {
                0 => Mutation::Flip {
                    at: rng.below(usize::MAX),
                    bit: rng.below(8) as u8,
                },
                1 => Mutation::Set {
                    at: rng.below(usize::MAX),
                    byte: rng.next() as u8,
                },
                2 => Mutation::Truncate {
                    at: rng.below(usize::MAX),
                },
                3 => Mutation::Insert {
                    at: rng.below(usize::MAX),
                    bytes: (0..1 + rng.below(8)).map(|_| rng.next() as u8).collect(),
                },
                4 => Mutation::Remove {
                    at: rng.below(usize::MAX),
                    len: 1 + rng.below(16),
                },
                _ => Mutation::LengthField {
                    record: rng.below(ends.len() + 1),
                    len: rng.next() as u32,
                },
            };
            apply(&mut s, &ends, &m);
        }
        seeds.push(s);
    }
    for _ in 0..50 {
        let len = rng.below(300);
        seeds.push((0..len).map(|_| rng.next() as u8).collect());
    }
    seeds
}

#[test]
fn fuzz_entry_point_holds_on_generated_and_mutated_seeds() {
    let seeds = seeds();
    assert!(seeds.len() >= 300, "{}", seeds.len());
    let mut outcomes = [0usize; 3];
    for seed in &seeds {
        fuzz_decode(seed);
        let (_, stop) = decode_all(seed);
        outcomes[match classify(seed, &stop) {
            Tail::Clean => 0,
            Tail::Torn { .. } => 1,
            Tail::Corrupt { .. } => 2,
        }] += 1;
    }
    // The seeds exercise every outcome.
    assert!(outcomes.iter().all(|&n| n > 10), "{outcomes:?}");
}

/// Writes the seeds as a cargo-fuzz corpus: `JOURNAL_SEED_DIR=/tmp/journal-corpus cargo test -p
/// staging-store --test journal -- --ignored write_fuzz_seeds`.
#[test]
#[ignore = "writes files; run by hand to seed the fuzzer"]
fn write_fuzz_seeds() {
    let dir = PathBuf::from(std::env::var("JOURNAL_SEED_DIR").expect("JOURNAL_SEED_DIR"));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, seed) in seeds().iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:04}")), seed).unwrap();
    }
}

/// A group is one record: decoded whole or not at all, never nested, and its torn tail drops
/// every record in it.
#[test]
fn a_group_is_replayed_whole_or_not_at_all() {
    let group = Record::Group(vec![
        Record::Ended { stream: "a".into() },
        Record::ConsumerState {
            stream: "a".into(),
            consumer: "c".into(),
            next_seq: 1,
            state: b"x".to_vec(),
        },
    ]);
    let mut bytes = encoded(&[Record::Ended { stream: "z".into() }]);
    let before = bytes.len();
    encode_record(&group, &mut bytes).unwrap();
    let (records, stop) = decode_all(&bytes);
    assert_eq!(records.len(), 2);
    assert_eq!(records[1], group);
    assert_eq!(stop.error, None);
    for cut in before + 1..bytes.len() {
        let (records, stop) = decode_all(&bytes[..cut]);
        assert_eq!(records.len(), 1, "cut at {cut}: nothing of the group");
        assert_eq!(stop.offset, before as u64);
    }
    let nested = Record::Group(vec![group]);
    assert!(
        encode_record(&nested, &mut Vec::new()).is_err(),
        "groups do not nest"
    );
}
