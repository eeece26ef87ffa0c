//! The `store_control` fuzz target's entry points (`proto::fuzz_decode`, `data::fuzz_decode`)
//! run in every `cargo test` over a few hundred generated inputs: every kind of request and
//! server message, validly encoded, then truncated, bit-flipped, spliced and concatenated; the
//! data connection's headers likewise. Also replays `fuzz/corpus/store_control/` when it
//! exists (drop a crash file there after fixing it).
//!
//! `STORE_CONTROL_SEEDS=DIR cargo test -p staging-store --test fuzz_seeds -- --ignored` writes
//! the generated inputs to DIR, a starting corpus for `cargo fuzz run store_control DIR`.

use staging_store::data::{self, Attach, Put};
use staging_store::proto::{
    self, decode_request, decode_server_message, encode_request, encode_server_message, Body,
    ConsumerStat, Cursor, Delivery, ErrorCode, FullPolicy, Grant, PreviousFrame, Reply, Request,
    Response, ServerMessage, StoreError, StoreStat, StreamConfig, StreamStat, Subscribed,
    Transport, Welcome,
};

/// xorshift64: deterministic, so a failing input can be found again.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Small, boundary or any value.
    fn num(&mut self) -> u64 {
        match self.below(4) {
            0 => self.below(16),
            1 => [0, 1, u64::from(u32::MAX), u64::MAX, 1 << 40][self.below(5) as usize],
            _ => self.next(),
        }
    }

    fn name(&mut self) -> String {
        let len = match self.below(5) {
            0 => 0,
            1 => proto::MAX_NAME_BYTES,
            _ => 1 + self.below(20) as usize,
        };
        (0..len)
            .map(|_| b"abcXYZ09._-/:"[self.below(13) as usize] as char)
            .collect()
    }

    fn config(&mut self) -> StreamConfig {
        StreamConfig {
            max_frames: self.num() as u32,
            max_bytes: self.num(),
            retain_frames: self.num() as u32,
            on_full: [
                FullPolicy::Block,
                FullPolicy::Reject,
                FullPolicy::DropOldest,
            ][self.below(3) as usize],
            block_timeout_ms: self.num() as u32,
            checksums: self.below(2) == 0,
            max_frame_bytes: self.num(),
        }
    }

    fn opt_crc(&mut self) -> Option<u32> {
        (self.below(2) == 0).then(|| self.next() as u32)
    }

    fn body(&mut self, kind: u64) -> Body {
        match kind {
            0 => Body::Hello {
                version: self.num() as u32,
                client: self.name(),
                transport: match self.below(3) {
                    0 => Transport::Shm,
                    1 => Transport::Tcp,
                    _ => Transport::Verbs,
                },
            },
            1 => Body::CreateStream {
                name: self.name(),
                config: self.config(),
                exist_ok: self.below(2) == 0,
            },
            2 => Body::DeleteStream(self.name()),
            3 => Body::Create {
                stream: self.name(),
                size: self.num(),
                dirty_ok: self.below(2) == 0,
            },
            4 => Body::Seal {
                object: self.num(),
                offset: self.num(),
                len: self.num(),
                checksum: self.opt_crc(),
                releases: (0..self.below(5)).map(|_| self.num()).collect(),
            },
            5 => Body::Abort(self.num()),
            6 => Body::Subscribe {
                stream: self.name(),
                consumer: self.name(),
                from: match self.below(4) {
                    0 => Cursor::Resume,
                    1 => Cursor::Oldest,
                    2 => Cursor::Latest,
                    _ => Cursor::Seq(self.num()),
                },
                window: self.num() as u32,
            },
            7 => Body::Unsubscribe(self.num() as u32),
            8 => Body::Get {
                stream: self.name(),
                seq: (self.below(2) == 0).then(|| self.num()),
            },
            9 => Body::Release(self.num()),
            10 => Body::ReleaseMany((0..self.below(40)).map(|_| self.num()).collect()),
            11 => Body::Stat,
            12 => Body::Streams,
            13 => Body::EndStream(self.name()),
            14 => Body::Commit {
                subscription: self.num() as u32,
                references: (0..self.below(5)).map(|_| self.num()).collect(),
                state: (0..self.below(64)).map(|_| self.num() as u8).collect(),
            },
            _ => Body::StreamStat(self.name()),
        }
    }

    fn delivery(&mut self) -> Delivery {
        Delivery {
            reference: self.num(),
            subscription: self.num() as u32,
            seq: self.num(),
            offset: self.num(),
            len: self.num(),
            checksum: self.opt_crc(),
            sealed_nanos: self.num(),
        }
    }

    fn error(&mut self) -> StoreError {
        let codes = [
            ErrorCode::BadRequest,
            ErrorCode::StreamFull,
            ErrorCode::Timeout,
            ErrorCode::OutOfGrant,
            ErrorCode::FrameGone,
            ErrorCode::Persistence,
        ];
        StoreError::new(codes[self.below(6) as usize], self.name())
    }

    fn stream_stat(&mut self) -> StreamStat {
        StreamStat {
            name: self.name(),
            config: self.config(),
            first_seq: self.num(),
            next_seq: self.num(),
            frames: self.num() as u32,
            bytes: self.num(),
            unconsumed_frames: self.num() as u32,
            writing: self.num() as u32,
            consumers: (0..self.below(4))
                .map(|_| ConsumerStat {
                    name: self.name(),
                    durable: self.below(2) == 0,
                    attached: self.below(2) == 0,
                    committed: self.num(),
                    outstanding: self.num() as u32,
                })
                .collect(),
            sealed_total: self.num(),
            dropped_total: self.num(),
            blocked_creates: self.num(),
            rejected_creates: self.num(),
            ended: self.below(2) == 0,
            id: self.num(),
        }
    }

    fn server_message(&mut self, kind: u64) -> ServerMessage {
        let id = self.num();
        let result = match kind {
            0 => Err(self.error()),
            1 => Ok(Reply::Ok),
            2 => Ok(Reply::Welcome(Welcome {
                version: self.num() as u32,
                session: self.num(),
                token: self.next(),
                region_id: self.next(),
                region_bytes: self.num(),
                block_bytes: self.num(),
                data_port: self.num() as u16,
                checksums: self.below(2) == 0,
                verbs_port: self.num() as u16,
            })),
            3 => Ok(Reply::Granted(Grant {
                object: self.num(),
                offset: self.num(),
                len: self.num(),
                previous: (self.below(2) == 0).then(|| PreviousFrame {
                    seq: self.num(),
                    offset: self.num(),
                    len: self.num(),
                }),
                stream_id: self.num(),
                seq: self.num(),
            })),
            4 => Ok(Reply::Sealed(self.num())),
            5 => Ok(Reply::Subscribed(Subscribed {
                subscription: self.num() as u32,
                from_seq: self.num(),
                state: (0..self.below(40)).map(|_| self.num() as u8).collect(),
            })),
            6 => Ok(Reply::Got(self.delivery())),
            7 => Ok(Reply::Stat(StoreStat {
                region_bytes: self.num(),
                blocks_in_use: self.num(),
                seals: self.num(),
                corrupt_frames: self.num(),
                ..StoreStat::default()
            })),
            8 => Ok(Reply::Streams(
                (0..self.below(3)).map(|_| self.stream_stat()).collect(),
            )),
            9 => Ok(Reply::StreamStat(self.stream_stat())),
            10 => return ServerMessage::Delivery(self.delivery()),
            11 => {
                return ServerMessage::Ended {
                    subscription: self.num() as u32,
                    reason: self.error(),
                    delivered: self.num(),
                }
            }
            _ => return ServerMessage::Notice(self.error()),
        };
        ServerMessage::Response(Response { id, result })
    }
}

/// An 8-byte aligned copy (what the store's receive buffer hands the decoder).
fn aligned(bytes: &[u8]) -> Vec<capnp::Word> {
    let mut words = capnp::Word::allocate_zeroed_vec(bytes.len().div_ceil(8));
    capnp::Word::words_to_bytes_mut(&mut words)[..bytes.len()].copy_from_slice(bytes);
    words
}

/// Every generated input, valid ones first. Valid encodings are checked to decode to what was
/// encoded on the way.
fn seeds() -> Vec<Vec<u8>> {
    let mut rng = Rng(0x05ee_d0f5_704e);
    let mut valid = Vec::new();
    for round in 0..3 {
        for kind in 0..16 {
            let request = Request {
                id: rng.num(),
                body: rng.body(kind),
            };
            let mut bytes = Vec::new();
            encode_request(&request, &mut bytes);
            let words = aligned(&bytes);
            let decoded = decode_request(capnp::Word::words_to_bytes(&words));
            // Names over the limit or bodies the decoder refuses are fine; what decodes must
            // be what was sent.
            if let Ok(decoded) = decoded {
                assert_eq!(decoded, request, "round {round} kind {kind}");
            } else {
                assert!(
                    matches!(&request.body, Body::ReleaseMany(r) if r.len() > proto::MAX_RELEASE_BATCH),
                    "a valid request failed to decode: {request:?}"
                );
            }
            valid.push(bytes);
        }
        for kind in 0..13 {
            let message = rng.server_message(kind);
            let mut bytes = Vec::new();
            encode_server_message(&message, &mut bytes);
            let words = aligned(&bytes);
            let decoded = decode_server_message(capnp::Word::words_to_bytes(&words)).unwrap();
            assert_eq!(decoded, message, "round {round} kind {kind}");
            valid.push(bytes);
        }
        valid.push(
            Attach {
                session: rng.num(),
                token: rng.next(),
            }
            .encode()
            .to_vec(),
        );
        valid.push(
            Put {
                object: rng.num(),
                at: rng.num(),
                len: rng.num(),
            }
            .encode()
            .to_vec(),
        );
        let deliver = data::encode_deliver(&rng.delivery());
        valid.push(deliver.to_vec());
        // A checksum value without its flag (a header that once decoded non-canonically).
        let mut odd = deliver;
        odd[44..48].copy_from_slice(&0u32.to_le_bytes());
        odd[40..44].copy_from_slice(&(1 + rng.next() as u32 % 1000).to_le_bytes());
        valid.push(odd.to_vec());
    }
    let mut all = valid.clone();
    // Several requests back to back, as on a connection.
    all.push(valid.iter().take(14).flatten().copied().collect());
    for (i, seed) in valid.iter().enumerate() {
        // Truncated: in the segment table, in the body, one byte short.
        for cut in [4, 8, seed.len() / 2, seed.len().saturating_sub(1)] {
            if cut < seed.len() {
                all.push(seed[..cut].to_vec());
            }
        }
        // Bit flips and overwritten words.
        for _ in 0..3 {
            let mut m = seed.clone();
            let at = rng.below(m.len() as u64) as usize;
            m[at] ^= 1 << rng.below(8);
            all.push(m);
        }
        let mut m = seed.clone();
        let at = rng.below(m.len() as u64) as usize & !3;
        let word = [0u32, 1, 0xffff_ffff, 0x7fff_ffff][rng.below(4) as usize];
        let end = (at + 4).min(m.len());
        m[at..end].copy_from_slice(&word.to_le_bytes()[..end - at]);
        all.push(m);
        // Spliced onto the next seed, and a seed followed by garbage.
        let other = &valid[(i + 1) % valid.len()];
        let mut m = seed[..seed.len() / 2].to_vec();
        m.extend_from_slice(&other[other.len() / 2..]);
        all.push(m);
        let mut m = seed.clone();
        m.extend((0..16).map(|_| rng.next() as u8));
        all.push(m);
    }
    // Plain garbage of assorted sizes.
    for len in [0, 1, 7, 8, 9, 24, 32, 48, 100, 4096] {
        all.push((0..len).map(|_| rng.next() as u8).collect());
    }
    all
}

#[test]
fn generated_seeds_never_panic_the_decoders() {
    let seeds = seeds();
    assert!(seeds.len() >= 300, "{} seeds", seeds.len());
    for seed in &seeds {
        proto::fuzz_decode(seed);
        data::fuzz_decode(seed);
    }
}

#[test]
fn the_checked_in_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/store_control");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return; // no corpus checked in
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        proto::fuzz_decode(&bytes);
        data::fuzz_decode(&bytes);
    }
}

#[test]
#[ignore = "writes the generated seeds to $STORE_CONTROL_SEEDS, for cargo fuzz"]
fn write_seeds() {
    let dir = std::env::var("STORE_CONTROL_SEEDS").expect("STORE_CONTROL_SEEDS=DIR");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, seed) in seeds().iter().enumerate() {
        std::fs::write(
            std::path::Path::new(&dir).join(format!("seed-{i:04}")),
            seed,
        )
        .unwrap();
    }
}

/// `bytes` (a framed single-segment message whose encoder allocated an empty struct list
/// last) with that list's tag word rewritten to declare `count` zero-sized structs: no data,
/// no pointers. The list pointer's word count stays 0, exactly what `count` elements of zero
/// words take, so capnp's own bounds checks accept the list: a message of a few dozen words
/// claims up to 2^30 - 1 elements.
fn with_zero_sized_list(mut bytes: Vec<u8>, count: u32) -> Vec<u8> {
    assert!(count < 1 << 30, "the tag's element count has 30 bits");
    let at = bytes.len() - 8;
    let tag = u64::from_le_bytes(bytes[at..].try_into().unwrap());
    assert_eq!(
        tag as u32, 0,
        "the last word is the tag of an empty struct list"
    );
    assert_ne!(tag >> 32, 0, "whose elements have a size");
    bytes[at..].copy_from_slice(&u64::from(count << 2).to_le_bytes());
    bytes
}

fn response(result: Reply) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode_server_message(
        &ServerMessage::Response(Response {
            id: 1,
            result: Ok(result),
        }),
        &mut bytes,
    );
    bytes
}

/// How a decode ended, short (a wrongly accepted list would print millions of elements).
fn outcome(result: &Result<ServerMessage, proto::ProtoError>) -> String {
    match result {
        Ok(ServerMessage::Response(Response {
            result: Ok(Reply::Streams(list)),
            ..
        })) => format!("decoded {} streams", list.len()),
        Ok(ServerMessage::Response(Response {
            result: Ok(Reply::StreamStat(stat)),
            ..
        })) => format!("decoded {} consumers", stat.consumers.len()),
        Ok(_) => "decoded something else".into(),
        Err(e) => format!("{e:?}"),
    }
}

fn empty_stream_stat() -> StreamStat {
    StreamStat {
        name: "cam0".into(),
        config: StreamConfig::default().normalized(),
        first_seq: 0,
        next_seq: 0,
        frames: 0,
        bytes: 0,
        unconsumed_frames: 0,
        writing: 0,
        consumers: Vec::new(),
        sealed_total: 0,
        dropped_total: 0,
        blocked_creates: 0,
        rejected_creates: 0,
        ended: false,
        id: 0,
    }
}

/// A `streams` reply, and a `streamStat` reply's consumers, of a few hundred bytes declaring
/// up to 2^30 - 1 zero-sized elements: the decoder refuses the list (more elements than the
/// message has words) before allocating or iterating, instead of building millions of
/// `StreamStat`s or `ConsumerStat`s (the `store_control` fuzzer's out-of-memory).
#[test]
fn zero_sized_struct_lists_longer_than_the_message_are_refused() {
    let lists: [(&str, Vec<u8>); 2] = [
        ("streams", response(Reply::Streams(Vec::new()))),
        (
            "consumers",
            response(Reply::StreamStat(empty_stream_stat())),
        ),
    ];
    for (what, message) in lists {
        let words = message.len() as u32 / 8;
        assert!(words < 64, "{what}: {words} words");
        // Within the bound the crafted list is well formed and decodes (so what fails below
        // fails for its length alone).
        let bytes = with_zero_sized_list(message.clone(), 2);
        let decoded = decode_server_message(capnp::Word::words_to_bytes(&aligned(&bytes)))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let ServerMessage::Response(Response {
            result: Ok(reply), ..
        }) = decoded
        else {
            panic!("{what}: {decoded:?}");
        };
        match reply {
            Reply::Streams(list) => assert_eq!(list.len(), 2),
            Reply::StreamStat(stat) => assert_eq!(stat.consumers.len(), 2),
            other => panic!("{what}: {other:?}"),
        }
        // One more element than the message has words: the list bound refuses it.
        let bytes = with_zero_sized_list(message.clone(), words + 1);
        let result = decode_server_message(capnp::Word::words_to_bytes(&aligned(&bytes)));
        assert!(
            matches!(result, Err(proto::ProtoError::Invalid(_))),
            "{what}: {}",
            outcome(&result)
        );
        // Millions (under the old fixed traversal limit of 8 Mi words, which let the fuzzer's
        // input through) and the most a tag can declare: refused at once, by the list bound
        // or by the traversal limit relative to the message's size.
        for count in [4 << 20, (1 << 30) - 1] {
            let bytes = with_zero_sized_list(message.clone(), count);
            assert!(bytes.len() < 512, "{what}: {} bytes", bytes.len());
            let started = std::time::Instant::now();
            let result = decode_server_message(capnp::Word::words_to_bytes(&aligned(&bytes)));
            let took = started.elapsed();
            assert!(
                matches!(
                    result,
                    Err(proto::ProtoError::Invalid(_) | proto::ProtoError::Capnp(_))
                ),
                "{what} of {count}: {}",
                outcome(&result)
            );
            assert!(
                took < std::time::Duration::from_secs(1),
                "{what} of {count}: took {took:?}"
            );
            proto::fuzz_decode(&bytes);
        }
    }
}

/// The list bound and the traversal limit leave honest messages alone: a `releaseMany` of the
/// most references allowed, and a long `streams` reply whose streams all have consumers.
#[test]
fn honest_long_lists_still_decode() {
    let request = Request {
        id: 7,
        body: Body::ReleaseMany((0..proto::MAX_RELEASE_BATCH as u64).collect()),
    };
    let mut bytes = Vec::new();
    encode_request(&request, &mut bytes);
    assert_eq!(
        decode_request(capnp::Word::words_to_bytes(&aligned(&bytes))).unwrap(),
        request
    );
    let streams: Vec<StreamStat> = (0..2000)
        .map(|i| StreamStat {
            name: format!("stream-{i}"),
            consumers: (0..3)
                .map(|c| ConsumerStat {
                    name: String::new(),
                    durable: c == 0,
                    attached: true,
                    committed: i,
                    outstanding: c,
                })
                .collect(),
            ..empty_stream_stat()
        })
        .collect();
    let message = ServerMessage::Response(Response {
        id: 8,
        result: Ok(Reply::Streams(streams)),
    });
    let mut bytes = Vec::new();
    encode_server_message(&message, &mut bytes);
    assert_eq!(
        decode_server_message(capnp::Word::words_to_bytes(&aligned(&bytes))).unwrap(),
        message
    );
}
