//! Creates: a grant now, or — on a full stream or region — a wait ([`FullPolicy::Block`]),
//! a refusal ([`FullPolicy::Reject`]) or the oldest frames dropped
//! ([`FullPolicy::DropOldest`]).

use super::objects::{Object, State};
use super::{err, SessionId, Store};
use crate::journal::Record;
use crate::proto::{ErrorCode, FullPolicy, Grant, Reply, StoreError, Transport};
use capnp_rdma::RegionError;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(super) struct Parked {
    pub(super) session: SessionId,
    pub(super) request: u64,
    pub(super) size: u64,
    pub(super) dirty_ok: bool,
    pub(super) deadline: Instant,
}

impl Store {
    pub(super) fn create(
        &mut self,
        session: SessionId,
        request: u64,
        stream_name: String,
        size: u64,
        dirty_ok: bool,
        now: Instant,
    ) -> Result<Option<Reply>, StoreError> {
        let Some(stream) = self.streams.get_mut(&stream_name) else {
            return Err(err(
                ErrorCode::UnknownStream,
                format!("no stream {stream_name:?}"),
            ));
        };
        if stream.ended {
            return Err(err(
                ErrorCode::EndOfStream,
                format!("stream {stream_name:?} has ended: no frame follows its last"),
            ));
        }
        let data_bytes = self.region.geometry().block_count * self.region.block_size();
        if size == 0
            || size > data_bytes
            || (stream.config.max_frame_bytes > 0 && size > stream.config.max_frame_bytes)
            || (stream.config.max_bytes > 0 && size > stream.config.max_bytes)
        {
            return Err(err(
                ErrorCode::TooLarge,
                format!(
                    "create of {size} bytes: the stream takes 1..={} and the region has {data_bytes}",
                    stream.config.max_frame_bytes
                ),
            ));
        }
        // Creates that wait keep their order: a new one queues behind them.
        if !stream.parked.is_empty() {
            return self.park(session, request, stream_name, size, dirty_ok, now);
        }
        match self.try_create(session, &stream_name, size, dirty_ok) {
            Ok(grant) => Ok(Some(Reply::Granted(grant))),
            Err(e) if matches!(e.code, ErrorCode::StreamFull | ErrorCode::RegionFull) => {
                let stream = self.streams.get_mut(&stream_name).expect("exists");
                if stream.config.on_full == FullPolicy::Block {
                    self.park(session, request, stream_name, size, dirty_ok, now)
                } else {
                    stream.rejected_creates += 1;
                    Err(e)
                }
            }
            Err(e) => Err(e),
        }
    }

    fn park(
        &mut self,
        session: SessionId,
        request: u64,
        stream_name: String,
        size: u64,
        dirty_ok: bool,
        now: Instant,
    ) -> Result<Option<Reply>, StoreError> {
        let stream = self.streams.get_mut(&stream_name).expect("exists");
        stream.blocked_creates += 1;
        let deadline = now + Duration::from_millis(u64::from(stream.config.block_timeout_ms));
        stream.parked.push_back(Parked {
            session,
            request,
            size,
            dirty_ok,
            deadline,
        });
        self.waiting.insert(stream_name);
        Ok(None)
    }

    /// Grants `size` bytes now, or says why not (full stream, full region).
    pub(super) fn try_create(
        &mut self,
        session: SessionId,
        stream_name: &str,
        size: u64,
        dirty_ok: bool,
    ) -> Result<Grant, StoreError> {
        let stream = self.streams.get_mut(stream_name).expect("exists");
        if stream.is_full(size) {
            if stream.config.on_full == FullPolicy::DropOldest {
                self.drop_oldest(stream_name, size);
            }
            let stream = self.streams.get(stream_name).expect("exists");
            if stream.is_full(size) {
                return Err(err(
                    ErrorCode::StreamFull,
                    format!(
                        "stream {stream_name:?} holds {} unconsumed frames and {} being written (max {})",
                        stream.unconsumed().0,
                        stream.writing,
                        stream.config.max_frames
                    ),
                ));
            }
        }
        let local = self
            .sessions
            .get(&session)
            .is_some_and(|s| matches!(s.transport, Some(Transport::Shm | Transport::Verbs)));
        let (recycled, previous) = match dirty_ok
            .then(|| {
                self.recycled
                    .take(size, self.region.block_size(), stream_name)
            })
            .flatten()
        {
            // Only a shm client can repaint part of a grant; a tcp client's PUTs fill it.
            Some((lease, previous)) => (Some(lease), previous.filter(|_| local)),
            None => (None, None),
        };
        let leased = match recycled.map_or_else(|| self.region.lease(size), Ok) {
            // Room may be on its way back: blocks parked in the recycled pool, or released
            // blocks the region's scrubber has not zeroed yet (a frame freed or a grant aborted
            // a moment ago). Give the pool back, wait for the scrubber — only when the region
            // is otherwise full — and try once more, so that `regionFull` (a refusal at once
            // under `reject`) means the region really is full.
            Err(RegionError::Exhausted { .. }) => {
                self.recycled.clear();
                self.region.quiesce();
                self.region.lease(size)
            }
            other => other,
        };
        let lease = match leased {
            Ok(lease) => lease,
            Err(RegionError::Exhausted { .. }) => {
                let stats = self.region.stats();
                return Err(err(
                    ErrorCode::RegionFull,
                    format!(
                        "the region has {} free blocks of {} bytes, not {size} bytes in one run",
                        stats.free_blocks,
                        self.region.block_size()
                    ),
                ));
            }
            Err(e) => return Err(err(ErrorCode::RegionFull, e.to_string())),
        };
        let id = self.next_object;
        self.next_object += 1;
        let stream = self.streams.get_mut(stream_name).expect("exists");
        let grant = Grant {
            object: id,
            offset: lease.offset(),
            len: lease.len(),
            previous,
            stream_id: crate::proto::stream_id(stream_name),
            // Grants of one producer are sealed in order: this one follows those still open.
            seq: stream.next_seq + u64::from(stream.writing),
        };
        stream.writing += 1;
        stream.writing_bytes += lease.len();
        self.objects.insert(
            id,
            Object {
                lease: Arc::new(lease),
                stream: stream_name.to_owned(),
                state: State::Writing {
                    session,
                    landed_end: if local { grant.len } else { 0 },
                    putting: false,
                    pending_seal: None,
                },
                refs: 1,
            },
        );
        if let Some(s) = self.sessions.get_mut(&session) {
            s.writing.push(id);
        }
        self.stat.creates += 1;
        Ok(grant)
    }

    /// Drops frames from the front (retained ones first, then the oldest unconsumed) until a
    /// create of `size` fits, or nothing more can go.
    fn drop_oldest(&mut self, stream_name: &str, size: u64) {
        loop {
            let stream = self.streams.get_mut(stream_name).expect("exists");
            if !stream.is_full(size) {
                return;
            }
            let Some(frame) = stream.frames.pop_front() else {
                return;
            };
            let boundary = stream.boundary();
            if frame.seq >= boundary {
                stream.dropped_total += 1;
            }
            for c in stream.consumers.values_mut() {
                if c.committed <= frame.seq {
                    c.committed = frame.seq + 1;
                    while c.acked.remove(&c.committed) {
                        c.committed += 1;
                    }
                    c.acked.retain(|&s| s > frame.seq);
                }
            }
            let seq = frame.seq;
            let _ = self.journal(Record::Freed {
                stream: stream_name.to_owned(),
                seq,
            });
            self.unref(frame.object);
        }
    }
}
