//! Streams: their retained frames, their consumers' cursors, and retention (consumed frames
//! kept for replay up to `retain_frames`).

use super::backpressure::Parked;
use super::objects::{Frame, State};
use super::{err, respond_err, valid_name, Out, SessionId, Store, MAX_STREAMS};
use crate::journal::Record;
use crate::proto::{ErrorCode, Reply, ServerMessage, StoreError, StreamConfig};
use std::collections::{BTreeSet, HashMap, VecDeque};

#[derive(Debug)]
pub(super) struct Consumer {
    pub(super) durable: bool,
    pub(super) committed: u64,
    /// Released frames at or after `committed` (out-of-order releases).
    pub(super) acked: BTreeSet<u64>,
    pub(super) attached: Option<(SessionId, u32)>,
    /// What the consumer committed with its cursor (`commit`), returned when it resumes.
    pub(super) state: Vec<u8>,
}

#[derive(Debug)]
pub(super) struct Stream {
    pub(super) config: StreamConfig,
    /// Retained frames, in increasing `seq` (gaps only after recovery dropped corrupt frames).
    pub(super) frames: VecDeque<Frame>,
    pub(super) next_seq: u64,
    pub(super) writing: u32,
    pub(super) writing_bytes: u64,
    pub(super) consumers: HashMap<String, Consumer>,
    pub(super) parked: VecDeque<Parked>,
    pub(super) sealed_total: u64,
    pub(super) dropped_total: u64,
    pub(super) blocked_creates: u64,
    pub(super) rejected_creates: u64,
    /// Its producer ended it: no frame follows `next_seq - 1`.
    pub(super) ended: bool,
}

impl Stream {
    pub(super) fn new(config: StreamConfig) -> Self {
        Self {
            config,
            frames: VecDeque::new(),
            next_seq: 0,
            writing: 0,
            writing_bytes: 0,
            consumers: HashMap::new(),
            parked: VecDeque::new(),
            sealed_total: 0,
            dropped_total: 0,
            blocked_creates: 0,
            rejected_creates: 0,
            ended: false,
        }
    }

    pub(super) fn first_seq(&self) -> u64 {
        self.frames.front().map_or(self.next_seq, |f| f.seq)
    }

    /// Every frame before this one has been released by every consumer.
    pub(super) fn boundary(&self) -> u64 {
        self.consumers
            .values()
            .map(|c| c.committed)
            .min()
            .unwrap_or(self.next_seq)
    }

    pub(super) fn index_of(&self, seq: u64) -> usize {
        self.frames.partition_point(|f| f.seq < seq)
    }

    pub(super) fn unconsumed(&self) -> (u32, u64) {
        let from = self.index_of(self.boundary());
        let bytes = self.frames.range(from..).map(|f| f.bytes).sum();
        ((self.frames.len() - from) as u32, bytes)
    }

    pub(super) fn is_full(&self, size: u64) -> bool {
        let (frames, bytes) = self.unconsumed();
        frames + self.writing >= self.config.max_frames
            || (self.config.max_bytes > 0
                && bytes + self.writing_bytes + size > self.config.max_bytes)
    }
}

impl Store {
    pub(super) fn create_stream(
        &mut self,
        name: String,
        config: StreamConfig,
        exist_ok: bool,
    ) -> Result<Reply, StoreError> {
        if !valid_name(&name) {
            return Err(err(
                ErrorCode::BadRequest,
                "stream names are 1-255 bytes of [A-Za-z0-9._-/:]",
            ));
        }
        if self.streams.contains_key(&name) {
            return if exist_ok {
                Ok(Reply::Ok)
            } else {
                Err(err(
                    ErrorCode::StreamExists,
                    format!("stream {name:?} exists"),
                ))
            };
        }
        if self.streams.len() >= MAX_STREAMS {
            return Err(err(ErrorCode::TooLarge, "too many streams"));
        }
        let config = config.normalized();
        self.journal(Record::StreamCreated {
            name: name.clone(),
            config: crate::proto::encode_config(&config),
        })?;
        self.streams.insert(name, Stream::new(config));
        Ok(Reply::Ok)
    }

    pub(super) fn delete_stream(
        &mut self,
        name: &str,
        out: &mut Vec<Out>,
    ) -> Result<Reply, StoreError> {
        if !self.streams.contains_key(name) {
            return Err(err(ErrorCode::UnknownStream, format!("no stream {name:?}")));
        }
        self.journal(Record::StreamDeleted {
            name: name.to_owned(),
        })?;
        let stream = &self.streams[name];
        let attached: Vec<(SessionId, u32)> = stream
            .consumers
            .values()
            .filter_map(|c| c.attached)
            .collect();
        let parked: Vec<(SessionId, u64)> = stream
            .parked
            .iter()
            .map(|p| (p.session, p.request))
            .collect();
        for (session, sub) in attached {
            let delivered = self
                .sessions
                .get(&session)
                .and_then(|s| s.subscriptions.get(&sub))
                .map_or(0, |s| s.delivered);
            // Frames the consumers hold stay valid until released (see `Body::DeleteStream`).
            self.end_subscription(session, sub, true, out);
            out.push(Out::Message(
                session,
                ServerMessage::Ended {
                    subscription: sub,
                    reason: err(ErrorCode::UnknownStream, format!("stream {name:?} deleted")),
                    delivered,
                },
            ));
        }
        for (session, request) in parked {
            self.stat.errors += 1;
            out.push(respond_err(
                session,
                request,
                err(ErrorCode::UnknownStream, format!("stream {name:?} deleted")),
            ));
        }
        // Grants being written for the stream can never become its frames: drop them as an
        // abort would (later seals get `unknownObject`). Kept, an old grant would be sealed
        // into a new stream of the same name, whose `writing` count it was never part of.
        let writing: Vec<(SessionId, u64)> = self
            .objects
            .iter()
            .filter_map(|(&id, o)| match o.state {
                State::Writing { session, .. } if o.stream == name => Some((session, id)),
                _ => None,
            })
            .collect();
        for (session, object) in writing {
            self.drop_writing(session, object, out);
        }
        let stream = self.streams.remove(name).expect("looked up above");
        self.waiting.remove(name);
        for frame in stream.frames {
            // Deleted with the stream: no `Freed` records (the StreamDeleted covers them).
            self.unref(frame.object);
        }
        // A stream created later under this name is another stream: its grants must not name
        // these frames.
        self.recycled.forget(name);
        Ok(Reply::Ok)
    }

    /// Ends a stream after its last sealed frame: creates waiting for room fail, and every
    /// consumer that has been delivered everything is told (the others once they have).
    pub(super) fn end_stream(
        &mut self,
        name: &str,
        out: &mut Vec<Out>,
    ) -> Result<Reply, StoreError> {
        let Some(stream) = self.streams.get(name) else {
            return Err(err(ErrorCode::UnknownStream, format!("no stream {name:?}")));
        };
        if stream.ended {
            return Ok(Reply::Ok);
        }
        self.journal(Record::Ended {
            stream: name.to_owned(),
        })?;
        let stream = self.streams.get_mut(name).expect("looked up above");
        stream.ended = true;
        let parked: Vec<Parked> = stream.parked.drain(..).collect();
        self.waiting.remove(name);
        for p in parked {
            self.stat.errors += 1;
            out.push(respond_err(
                p.session,
                p.request,
                err(ErrorCode::EndOfStream, format!("stream {name:?} has ended")),
            ));
        }
        self.pump(name, out);
        Ok(Reply::Ok)
    }

    /// Frees consumed frames beyond the stream's retention.
    pub(super) fn trim(&mut self, stream_name: &str) {
        loop {
            let Some(stream) = self.streams.get_mut(stream_name) else {
                return;
            };
            let boundary = stream.boundary();
            let consumed = stream.index_of(boundary);
            if consumed <= stream.config.retain_frames as usize {
                return;
            }
            let frame = stream.frames.pop_front().expect("consumed > 0");
            let _ = self.journal(Record::Freed {
                stream: stream_name.to_owned(),
                seq: frame.seq,
            });
            self.unref(frame.object);
        }
    }
}
