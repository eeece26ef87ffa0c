//! Persistence: rebuilding a store from its journal and region file, the live state as
//! journal records, and closing (which keeps retained frames for the next start).

use super::objects::{Frame, Object, State};
use super::streams::{Consumer, Stream};
use super::{SessionId, Store, StoreOptions};
use crate::journal::{self, Journal, Record};
use crate::proto::{StoreStat, StreamConfig};
use capnp_rdma::reader::SegmentTable;
use capnp_rdma::{BlockLease, Region};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

/// What [`Store::recover`] found.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    /// Streams restored.
    pub streams: usize,
    /// Frames restored.
    pub frames: u64,
    /// Frames dropped as corrupt.
    pub corrupt: u64,
    /// What reclaiming the previous store's other allocations freed.
    pub reclaimed: String,
}

/// Why a store could not be recovered.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// The journal is unreadable or could not be rewritten.
    #[error("journal: {0}")]
    Journal(String),
    /// The region file could not be reclaimed.
    #[error("region: {0}")]
    Region(String),
}

impl Store {
    /// Rebuilds a store from its persistence directory: `records` (replayed from `journal`)
    /// say which frames were sealed and not freed; each one's blocks are adopted from the
    /// region file and its bytes checked against the recorded CRC-32C. Frames that fail (a
    /// missing allocation, a wrong length, a checksum mismatch) are counted as corrupt and
    /// freed; every other allocation of the previous store is reclaimed. The journal is then
    /// compacted to the recovered state.
    pub fn recover(
        region: Region,
        options: StoreOptions,
        mut journal: Journal,
        records: Vec<Record>,
    ) -> Result<(Self, RecoveryReport), RecoverError> {
        struct Folded {
            config: StreamConfig,
            frames: std::collections::BTreeMap<u64, Record>,
            next_seq: u64,
            cursors: HashMap<String, (u64, Vec<u8>)>,
            ended: bool,
        }
        let mut folded: HashMap<String, Folded> = HashMap::new();
        // A group's records replay in order, as if appended one by one (the group only makes
        // them all-or-none on disk).
        let records = records.into_iter().flat_map(|record| match record {
            Record::Group(inner) => inner,
            other => vec![other],
        });
        for record in records {
            match record {
                Record::StreamCreated { name, config } => {
                    let config = crate::proto::decode_config(&config).map_err(|e| {
                        RecoverError::Journal(format!("stream {name:?} config: {e}"))
                    })?;
                    folded.insert(
                        name,
                        Folded {
                            config,
                            frames: Default::default(),
                            next_seq: 0,
                            cursors: HashMap::new(),
                            ended: false,
                        },
                    );
                }
                Record::StreamDeleted { name } => {
                    folded.remove(&name);
                }
                Record::Sealed {
                    ref stream, seq, ..
                } => {
                    if let Some(f) = folded.get_mut(stream) {
                        f.next_seq = f.next_seq.max(seq + 1);
                        f.frames.insert(seq, record);
                    }
                }
                Record::Freed { stream, seq } => {
                    if let Some(f) = folded.get_mut(&stream) {
                        f.frames.remove(&seq);
                    }
                }
                Record::Cursor {
                    stream,
                    consumer,
                    next_seq,
                } => {
                    if let Some(f) = folded.get_mut(&stream) {
                        if consumer.is_empty() {
                            f.next_seq = f.next_seq.max(next_seq);
                        } else {
                            // A plain cursor move keeps the state last committed.
                            let state = f.cursors.remove(&consumer).map(|c| c.1);
                            f.cursors
                                .insert(consumer, (next_seq, state.unwrap_or_default()));
                        }
                    }
                }
                Record::ConsumerState {
                    stream,
                    consumer,
                    next_seq,
                    state,
                } => {
                    if let Some(f) = folded.get_mut(&stream) {
                        f.cursors.insert(consumer, (next_seq, state));
                    }
                }
                Record::Ended { stream } => {
                    if let Some(f) = folded.get_mut(&stream) {
                        f.ended = true;
                    }
                }
                Record::Group(_) => unreachable!("groups are flattened above"),
                Record::ConsumerDeleted { stream, consumer } => {
                    if let Some(f) = folded.get_mut(&stream) {
                        f.cursors.remove(&consumer);
                    }
                }
            }
        }
        let mut store = Store::new(region, options, None);
        let mut report = RecoveryReport::default();
        let mut names: Vec<String> = folded.keys().cloned().collect();
        names.sort();
        for name in names {
            let f = folded.remove(&name).expect("listed");
            let mut stream = Stream::new(f.config);
            stream.next_seq = f.next_seq;
            for (seq, record) in f.frames {
                let Record::Sealed {
                    lease_offset,
                    lease_len,
                    data_offset,
                    data_len,
                    crc32c,
                    unix_nanos,
                    ..
                } = record
                else {
                    continue;
                };
                match store.adopt_frame(lease_offset, lease_len, data_offset, data_len, crc32c) {
                    Ok(lease) => {
                        let id = store.next_object;
                        store.next_object += 1;
                        let bytes = lease.len();
                        store.objects.insert(
                            id,
                            Object {
                                lease: Arc::new(lease),
                                stream: name.clone(),
                                state: State::Sealed {
                                    seq,
                                    offset: data_offset,
                                    len: data_len,
                                    checksum: Some(crc32c),
                                    sealed_nanos: unix_nanos,
                                },
                                refs: 1,
                            },
                        );
                        stream.frames.push_back(Frame {
                            seq,
                            object: id,
                            bytes,
                        });
                        report.frames += 1;
                    }
                    Err(why) => {
                        tracing::warn!(stream = %name, seq, %why, "dropping a corrupt frame");
                        report.corrupt += 1;
                    }
                }
            }
            stream.ended = f.ended;
            for (consumer, (committed, state)) in f.cursors {
                stream.consumers.insert(
                    consumer,
                    Consumer {
                        durable: true,
                        committed,
                        acked: BTreeSet::new(),
                        attached: None,
                        state,
                    },
                );
            }
            report.streams += 1;
            store.streams.insert(name, stream);
        }
        let reclaimed = store
            .region
            .reclaim_dead_owners()
            .map_err(|e| RecoverError::Region(e.to_string()))?;
        report.reclaimed = format!("{reclaimed:?}");
        store.stat.recovered_frames = report.frames;
        store.stat.corrupt_frames = report.corrupt;
        journal
            .compact(store.snapshot())
            .map_err(|e| RecoverError::Journal(e.to_string()))?;
        store.journal = Some(journal);
        Ok((store, report))
    }

    /// Adopts a recorded frame's blocks and checks them; `Err` says why it is not usable.
    fn adopt_frame(
        &self,
        lease_offset: u64,
        lease_len: u64,
        data_offset: u64,
        data_len: u64,
        crc32c: u32,
    ) -> Result<BlockLease, String> {
        let lease = self.region.adopt(lease_offset).map_err(|e| e.to_string())?;
        if lease.len() != lease_len
            || data_offset < lease_offset
            || data_offset + data_len > lease_offset + lease_len
        {
            return Err(format!(
                "the allocation at {lease_offset} is {} bytes, the journal says {lease_len} holding {data_len} at {data_offset}",
                lease.len()
            ));
        }
        let data = &lease.as_slice()[(data_offset - lease_offset) as usize..][..data_len as usize];
        let actual = journal::frame_crc(data);
        if actual != crc32c {
            return Err(format!(
                "CRC-32C {actual:#010x}, the journal says {crc32c:#010x}"
            ));
        }
        if SegmentTable::parse(data, 512)
            .map(|t| t.message_bytes())
            .ok()
            != Some(data_len)
        {
            return Err("the bytes are not one framed message".into());
        }
        Ok(lease)
    }

    /// Ends every session and closes the store. With persistence, every retained frame's
    /// blocks stay allocated in the region file and the journal is compacted to the live
    /// state, so a restart recovers them; without, the blocks are freed. Requests after this
    /// fail with `shuttingDown`. Returns the final counters. `now` is the current time (the
    /// sessions' disconnects retry waiting creates).
    pub fn close(&mut self, now: Instant) -> StoreStat {
        let sessions: Vec<SessionId> = self.sessions.keys().copied().collect();
        for sid in sessions {
            let mut outs = Vec::new();
            self.disconnect(sid, now, &mut outs);
        }
        let stat = self.stat();
        self.closed = true;
        if self.journal.is_some() {
            let snapshot = self.snapshot();
            if let Some(j) = &mut self.journal {
                if let Err(e) = j.compact(snapshot) {
                    tracing::error!(error = %e, "compacting the journal at close");
                }
            }
            for (_, obj) in self.objects.drain() {
                if let (State::Sealed { .. }, Ok(lease)) = (&obj.state, Arc::try_unwrap(obj.lease))
                {
                    lease.keep();
                }
            }
        }
        self.streams.clear();
        self.objects.clear();
        self.recycled.clear();
        stat
    }

    /// The live state as journal records: streams, their retained frames, durable cursors.
    fn snapshot(&self) -> Vec<Record> {
        let mut records = Vec::new();
        let mut names: Vec<&String> = self.streams.keys().collect();
        names.sort();
        for name in names {
            let stream = &self.streams[name];
            records.push(Record::StreamCreated {
                name: name.clone(),
                config: crate::proto::encode_config(&stream.config),
            });
            for frame in &stream.frames {
                let obj = &self.objects[&frame.object];
                if let State::Sealed {
                    seq,
                    offset,
                    len,
                    checksum,
                    sealed_nanos,
                } = obj.state
                {
                    records.push(Record::Sealed {
                        stream: name.clone(),
                        seq,
                        lease_offset: obj.lease.offset(),
                        lease_len: obj.lease.len(),
                        data_offset: offset,
                        data_len: len,
                        crc32c: checksum.unwrap_or(0),
                        unix_nanos: sealed_nanos,
                    });
                }
            }
            // The stream's own position (an empty consumer name), so numbering continues
            // after a restart even when no frame is retained.
            records.push(Record::Cursor {
                stream: name.clone(),
                consumer: String::new(),
                next_seq: stream.next_seq,
            });
            for (consumer, c) in &stream.consumers {
                if c.durable {
                    records.push(Record::ConsumerState {
                        stream: name.clone(),
                        consumer: consumer.clone(),
                        next_seq: c.committed,
                        state: c.state.clone(),
                    });
                }
            }
            if stream.ended {
                records.push(Record::Ended {
                    stream: name.clone(),
                });
            }
        }
        records
    }
}
