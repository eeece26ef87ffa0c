//! Deliveries and gets: subscriptions hand frames to consumers within their window, a get
//! hands one frame; each is a reference the client releases.

use super::objects::{Frame, State};
use super::streams::Consumer;
use super::{
    err, valid_name, Out, SessionId, Store, DEFAULT_WINDOW, MAX_SUBSCRIPTIONS, MAX_WINDOW,
};
use crate::journal::Record;
use crate::proto::{
    Cursor, Delivery, ErrorCode, Reply, ServerMessage, StoreError, Subscribed, Transport,
    MAX_CONSUMER_STATE,
};
use std::collections::BTreeSet;
use std::sync::Arc;

#[derive(Debug)]
pub(super) struct Held {
    pub(super) object: u64,
    pub(super) stream: String,
    pub(super) subscription: u32,
    pub(super) seq: u64,
}

#[derive(Debug)]
pub(super) struct Subscription {
    pub(super) stream: String,
    pub(super) consumer: String,
    pub(super) window: u32,
    pub(super) outstanding: u32,
    pub(super) next: u64,
    /// Frames delivered in all.
    pub(super) delivered: u64,
    /// The end of its stream was sent.
    pub(super) ended: bool,
}

impl Store {
    pub(super) fn subscribe(
        &mut self,
        session: SessionId,
        stream_name: String,
        consumer: String,
        from: Cursor,
        window: u32,
        out: &mut Vec<Out>,
    ) -> Result<Reply, StoreError> {
        let Some(stream) = self.streams.get_mut(&stream_name) else {
            return Err(err(
                ErrorCode::UnknownStream,
                format!("no stream {stream_name:?}"),
            ));
        };
        let s = self
            .sessions
            .get_mut(&session)
            .expect("checked by dispatch");
        if s.subscriptions.len() >= MAX_SUBSCRIPTIONS {
            return Err(err(ErrorCode::TooLarge, "too many subscriptions"));
        }
        let window = match window {
            0 => DEFAULT_WINDOW,
            w => w.min(MAX_WINDOW),
        };
        let sub = s.next_subscription;
        let durable = !consumer.is_empty();
        let name = if durable {
            if !valid_name(&consumer) {
                return Err(err(
                    ErrorCode::BadRequest,
                    "consumer names are 1-255 bytes of [A-Za-z0-9._-/:]",
                ));
            }
            consumer
        } else {
            format!("~{session}.{sub}")
        };
        let first = stream.first_seq();
        let resolve = |cursor: Cursor| match cursor {
            Cursor::Resume | Cursor::Oldest => first,
            Cursor::Latest => stream.next_seq,
            Cursor::Seq(n) => n.max(first),
        };
        let from_seq = match stream.consumers.get_mut(&name) {
            Some(c) if c.attached.is_some() => {
                return Err(err(
                    ErrorCode::ConsumerBusy,
                    format!("consumer {name:?} is attached to another subscription"),
                ))
            }
            Some(c) => {
                if from != Cursor::Resume {
                    c.committed = resolve(from);
                    c.acked.clear();
                }
                c.attached = Some((session, sub));
                c.committed
            }
            None => {
                let committed = resolve(from);
                stream.consumers.insert(
                    name.clone(),
                    Consumer {
                        durable,
                        committed,
                        acked: BTreeSet::new(),
                        attached: Some((session, sub)),
                        state: Vec::new(),
                    },
                );
                committed
            }
        };
        s.next_subscription += 1;
        s.subscriptions.insert(
            sub,
            Subscription {
                stream: stream_name.clone(),
                consumer: name.clone(),
                window,
                outstanding: 0,
                next: from_seq,
                delivered: 0,
                ended: false,
            },
        );
        if durable {
            self.journal(Record::Cursor {
                stream: stream_name.clone(),
                consumer: name.clone(),
                next_seq: from_seq,
            })?;
        }
        let state = if durable {
            self.streams[&stream_name].consumers[&name].state.clone()
        } else {
            Vec::new()
        };
        self.pump(&stream_name, out);
        Ok(Reply::Subscribed(Subscribed {
            subscription: sub,
            from_seq,
            state,
        }))
    }

    /// Releases `references` of durable subscription `sub` and records `state` with the
    /// consumer's cursor, in one operation (one journal record).
    pub(super) fn commit(
        &mut self,
        session: SessionId,
        sub: u32,
        references: Vec<u64>,
        state: Vec<u8>,
        out: &mut Vec<Out>,
    ) -> Result<Reply, StoreError> {
        if state.len() > MAX_CONSUMER_STATE {
            return Err(err(
                ErrorCode::TooLarge,
                format!(
                    "a consumer state of {} bytes (at most {MAX_CONSUMER_STATE})",
                    state.len()
                ),
            ));
        }
        let s = self.sessions.get(&session).expect("checked by dispatch");
        let Some(subscription) = s.subscriptions.get(&sub) else {
            return Err(err(ErrorCode::BadRequest, format!("no subscription {sub}")));
        };
        let (stream_name, consumer) = (subscription.stream.clone(), subscription.consumer.clone());
        let durable = self
            .streams
            .get(&stream_name)
            .and_then(|st| st.consumers.get(&consumer))
            .is_some_and(|c| c.durable);
        if !durable {
            return Err(err(
                ErrorCode::BadRequest,
                "only a named (durable) consumer commits a state",
            ));
        }
        self.check_releases(session, &references)?;
        if let Some(other) = references
            .iter()
            .find(|r| s.held.get(r).is_some_and(|h| h.subscription != sub))
        {
            return Err(err(
                ErrorCode::BadRequest,
                format!("reference {other} is not a delivery of subscription {sub}"),
            ));
        }
        self.grouped(|store| {
            for reference in references {
                store
                    .release(session, reference, true, out)
                    .expect("checked before the commit");
            }
            let Some(c) = store
                .streams
                .get_mut(&stream_name)
                .and_then(|st| st.consumers.get_mut(&consumer))
            else {
                return Err(err(ErrorCode::UnknownStream, "the stream went away"));
            };
            c.state = state;
            let record = Record::ConsumerState {
                stream: stream_name.clone(),
                consumer: consumer.clone(),
                next_seq: c.committed,
                state: c.state.clone(),
            };
            store.journal(record)?;
            Ok(Reply::Ok)
        })
    }

    pub(super) fn unsubscribe(
        &mut self,
        session: SessionId,
        sub: u32,
        out: &mut Vec<Out>,
    ) -> Result<Reply, StoreError> {
        let s = self.sessions.get(&session).expect("checked by dispatch");
        if !s.subscriptions.contains_key(&sub) {
            return Err(err(
                ErrorCode::BadRequest,
                format!("no subscription {sub} in this session"),
            ));
        }
        // Frames the client holds stay valid until it releases them (it may be reading them
        // in place); released after this, they are not acknowledged.
        self.end_subscription(session, sub, true, out);
        Ok(Reply::Ok)
    }

    /// Ends a subscription: its unreleased deliveries are dropped without acknowledging (a
    /// durable consumer gets them again when it resumes), and its consumer detaches (an
    /// anonymous one is removed).
    ///
    /// `keep_held`: the deliveries stay held instead — the client unsubscribed, or the store
    /// ended the subscription (its stream was deleted), and the client may still be reading
    /// them in place; they go when it releases them (unacknowledged: `release` copes with
    /// their subscription being gone) or disconnects.
    pub(super) fn end_subscription(
        &mut self,
        session: SessionId,
        sub: u32,
        keep_held: bool,
        out: &mut Vec<Out>,
    ) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(subscription) = s.subscriptions.remove(&sub) else {
            return;
        };
        let held: Vec<u64> = s
            .held
            .iter()
            .filter(|(_, h)| h.subscription == sub && !keep_held)
            .map(|(r, _)| *r)
            .collect();
        for reference in held {
            let _ = self.release(session, reference, false, out);
        }
        if let Some(stream) = self.streams.get_mut(&subscription.stream) {
            let remove = match stream.consumers.get_mut(&subscription.consumer) {
                Some(c) => {
                    c.attached = None;
                    !c.durable
                }
                None => false,
            };
            if remove {
                stream.consumers.remove(&subscription.consumer);
            }
            self.trim(&subscription.stream);
        }
    }

    pub(super) fn get(
        &mut self,
        session: SessionId,
        stream_name: &str,
        seq: Option<u64>,
        out: &mut Vec<Out>,
    ) -> Result<Reply, StoreError> {
        let Some(stream) = self.streams.get(stream_name) else {
            return Err(err(
                ErrorCode::UnknownStream,
                format!("no stream {stream_name:?}"),
            ));
        };
        let frame = match seq {
            None => stream.frames.back(),
            Some(seq) => stream
                .frames
                .get(stream.index_of(seq))
                .filter(|f| f.seq == seq),
        };
        let Some(frame) = frame.copied() else {
            return Err(err(
                ErrorCode::FrameGone,
                format!(
                    "stream {stream_name:?} holds frames {}..{}",
                    stream.first_seq(),
                    stream.next_seq
                ),
            ));
        };
        let delivery = self.hold(session, stream_name, frame, 0, out);
        self.stat.gets += 1;
        Ok(Reply::Got(delivery))
    }

    /// Gives `session` a reference to `frame`; a tcp session also gets the bytes.
    fn hold(
        &mut self,
        session: SessionId,
        stream_name: &str,
        frame: Frame,
        subscription: u32,
        out: &mut Vec<Out>,
    ) -> Delivery {
        let obj = self
            .objects
            .get_mut(&frame.object)
            .expect("frames point at live objects");
        obj.refs += 1;
        let State::Sealed {
            seq,
            offset,
            len,
            checksum,
            sealed_nanos,
        } = obj.state
        else {
            unreachable!("frames are sealed")
        };
        let s = self.sessions.get_mut(&session).expect("live session");
        let reference = s.next_reference;
        s.next_reference += 1;
        s.held.insert(
            reference,
            Held {
                object: frame.object,
                stream: stream_name.to_owned(),
                subscription,
                seq,
            },
        );
        let delivery = Delivery {
            reference,
            subscription,
            seq,
            offset,
            len,
            checksum,
            sealed_nanos,
        };
        if s.transport == Some(Transport::Tcp) {
            out.push(Out::Data(session, delivery, Arc::clone(&obj.lease)));
        }
        delivery
    }

    /// Drops `session`'s reference; `ack`: a subscription's frame counts as consumed.
    pub(super) fn release(
        &mut self,
        session: SessionId,
        reference: u64,
        ack: bool,
        out: &mut Vec<Out>,
    ) -> Result<(), StoreError> {
        let s = self.sessions.get_mut(&session).expect("live session");
        let Some(held) = s.held.remove(&reference) else {
            return Err(err(
                ErrorCode::UnknownReference,
                format!("no reference {reference} (never given, or already released)"),
            ));
        };
        if ack {
            self.stat.releases += 1;
        } else {
            self.stat.reclaimed_references += 1;
        }
        let mut journal_cursor = None;
        if held.subscription != 0 {
            if let Some(sub) = s.subscriptions.get_mut(&held.subscription) {
                sub.outstanding -= 1;
                let consumer_name = sub.consumer.clone();
                if ack {
                    if let Some(c) = self
                        .streams
                        .get_mut(&held.stream)
                        .and_then(|st| st.consumers.get_mut(&consumer_name))
                    {
                        let before = c.committed;
                        if held.seq == c.committed {
                            c.committed += 1;
                            while c.acked.remove(&c.committed) {
                                c.committed += 1;
                            }
                        } else if held.seq > c.committed {
                            c.acked.insert(held.seq);
                        }
                        if c.durable && c.committed != before {
                            journal_cursor = Some((consumer_name, c.committed));
                        }
                    }
                }
            }
        }
        if let Some((consumer, next_seq)) = journal_cursor {
            // A cursor that is not recorded only means a replay after a store restart
            // delivers a few frames again; the release itself stands.
            let _ = self.journal(Record::Cursor {
                stream: held.stream.clone(),
                consumer,
                next_seq,
            });
        }
        self.unref(held.object);
        if self.streams.contains_key(&held.stream) {
            self.trim(&held.stream);
            self.pump(&held.stream, out);
        }
        Ok(())
    }

    /// Hands each attached consumer of the stream the frames its window allows.
    pub(super) fn pump(&mut self, stream_name: &str, out: &mut Vec<Out>) {
        let Some(stream) = self.streams.get(stream_name) else {
            return;
        };
        let attached: Vec<(SessionId, u32)> = stream
            .consumers
            .values()
            .filter_map(|c| c.attached)
            .collect();
        for (session, sub) in attached {
            loop {
                let stream = &self.streams[stream_name];
                let Some(subscription) = self
                    .sessions
                    .get(&session)
                    .and_then(|s| s.subscriptions.get(&sub))
                else {
                    break;
                };
                if subscription.outstanding >= subscription.window {
                    break;
                }
                let consumer = &stream.consumers[&subscription.consumer];
                // The next frame not yet delivered and not already released (a resumed
                // durable consumer may have released later frames before it went away).
                let mut index = stream.index_of(subscription.next);
                while stream
                    .frames
                    .get(index)
                    .is_some_and(|f| consumer.acked.contains(&f.seq))
                {
                    index += 1;
                }
                let Some(frame) = stream.frames.get(index).copied() else {
                    let (next, ended) = (stream.next_seq, stream.ended);
                    let s = self.sessions.get_mut(&session).expect("present");
                    let subscription = s.subscriptions.get_mut(&sub).expect("present");
                    subscription.next = subscription.next.max(next);
                    if ended && !subscription.ended {
                        // Every frame of the ended stream has been delivered: the end follows
                        // them (a tcp client counts `delivered` to wait for the last ones).
                        subscription.ended = true;
                        let delivered = subscription.delivered;
                        out.push(Out::Message(
                            session,
                            ServerMessage::Ended {
                                subscription: sub,
                                reason: err(
                                    ErrorCode::EndOfStream,
                                    format!(
                                        "stream {stream_name:?} ended after frame {}",
                                        next.wrapping_sub(1)
                                    ),
                                ),
                                delivered,
                            },
                        ));
                    }
                    break;
                };
                let delivery = self.hold(session, stream_name, frame, sub, out);
                let s = self.sessions.get_mut(&session).expect("present");
                let subscription = s.subscriptions.get_mut(&sub).expect("present");
                subscription.outstanding += 1;
                subscription.delivered += 1;
                subscription.next = frame.seq + 1;
                self.stat.deliveries += 1;
                if s.transport != Some(Transport::Tcp) {
                    out.push(Out::Message(session, ServerMessage::Delivery(delivery)));
                }
            }
        }
    }
}
