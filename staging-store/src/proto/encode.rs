//! Rust values to framed bytes: [`encode_request`] (clients), [`encode_server_message`] (the
//! store) and [`encode_config`] (the journal), each in standard Cap'n Proto stream framing.

use super::{
    Body, Cursor, Delivery, ErrorCode, FullPolicy, Reply, Request, ServerMessage, StoreError,
    StoreStat, StreamConfig, StreamStat, Transport,
};
use crate::store_capnp as schema;
use capnp::message::{Builder, HeapAllocator};

/// Appends `request`, framed, to `out`.
pub fn encode_request(request: &Request, out: &mut Vec<u8>) {
    let mut message = Builder::new(HeapAllocator::new().first_segment_words(64));
    let mut root: schema::request::Builder<'_> = message.init_root();
    root.set_id(request.id);
    match &request.body {
        Body::Hello {
            version,
            client,
            transport,
        } => {
            let mut h = root.init_hello();
            h.set_version(*version);
            h.set_client(client.as_str());
            h.set_transport(match transport {
                Transport::Shm => schema::Transport::Shm,
                Transport::Tcp => schema::Transport::Tcp,
                Transport::Verbs => schema::Transport::Verbs,
            });
        }
        Body::CreateStream {
            name,
            config,
            exist_ok,
        } => {
            let mut c = root.init_create_stream();
            c.set_name(name.as_str());
            config_to(config, c.reborrow().init_config());
            c.set_exist_ok(*exist_ok);
        }
        Body::DeleteStream(name) => root.set_delete_stream(name.as_str()),
        Body::Create {
            stream,
            size,
            dirty_ok,
        } => {
            let mut c = root.init_create();
            c.set_stream(stream.as_str());
            c.set_size(*size);
            c.set_dirty_ok(*dirty_ok);
        }
        Body::Seal {
            object,
            offset,
            len,
            checksum,
            releases,
        } => {
            let mut s = root.init_seal();
            s.set_object(*object);
            s.set_offset(*offset);
            s.set_len(*len);
            s.set_has_checksum(checksum.is_some());
            s.set_checksum(checksum.unwrap_or(0));
            if !releases.is_empty() {
                u64_list(releases, s.init_releases(releases.len() as u32));
            }
        }
        Body::Abort(object) => root.set_abort(*object),
        Body::Subscribe {
            stream,
            consumer,
            from,
            window,
        } => {
            let mut s = root.init_subscribe();
            s.set_stream(stream.as_str());
            s.set_consumer(consumer.as_str());
            s.set_window(*window);
            let mut f = s.init_from();
            match from {
                Cursor::Resume => f.set_resume(()),
                Cursor::Oldest => f.set_oldest(()),
                Cursor::Latest => f.set_latest(()),
                Cursor::Seq(n) => f.set_seq(*n),
            }
        }
        Body::Unsubscribe(id) => root.set_unsubscribe(*id),
        Body::Get { stream, seq } => {
            let mut g = root.init_get();
            g.set_stream(stream.as_str());
            g.set_latest(seq.is_none());
            g.set_seq(seq.unwrap_or(0));
        }
        Body::Release(r) => root.set_release(*r),
        Body::ReleaseMany(refs) => u64_list(refs, root.init_release_many(refs.len() as u32)),
        Body::Stat => root.set_stat(()),
        Body::Streams => root.set_streams(()),
        Body::StreamStat(name) => root.set_stream_stat(name.as_str()),
        Body::EndStream(name) => root.set_end_stream(name.as_str()),
        Body::Commit {
            subscription,
            references,
            state,
        } => {
            let mut c = root.init_commit();
            c.set_subscription(*subscription);
            c.set_state(state);
            u64_list(references, c.init_references(references.len() as u32));
        }
    }
    append_framed(&message, out);
}

fn u64_list(values: &[u64], mut list: capnp::primitive_list::Builder<'_, u64>) {
    for (i, v) in values.iter().enumerate() {
        list.set(i as u32, *v);
    }
}

/// Appends `message`, framed, to `out`.
pub fn encode_server_message(message: &ServerMessage, out: &mut Vec<u8>) {
    let mut builder = Builder::new(HeapAllocator::new().first_segment_words(64));
    let root: schema::server_message::Builder<'_> = builder.init_root();
    match message {
        ServerMessage::Response(response) => {
            let mut r = root.init_response();
            r.set_id(response.id);
            match &response.result {
                Err(e) => error_to(e, r.init_error()),
                Ok(Reply::Ok) => r.set_ok(()),
                Ok(Reply::Welcome(w)) => {
                    let mut b = r.init_welcome();
                    b.set_version(w.version);
                    b.set_session(w.session);
                    b.set_token(w.token);
                    b.set_region_id(w.region_id);
                    b.set_region_bytes(w.region_bytes);
                    b.set_block_bytes(w.block_bytes);
                    b.set_data_port(w.data_port);
                    b.set_verbs_port(w.verbs_port);
                    b.set_checksums(w.checksums);
                }
                Ok(Reply::Granted(g)) => {
                    let mut b = r.init_granted();
                    b.set_object(g.object);
                    b.set_offset(g.offset);
                    b.set_len(g.len);
                    if let Some(p) = g.previous {
                        b.set_has_previous(true);
                        b.set_previous_seq(p.seq);
                        b.set_previous_offset(p.offset);
                        b.set_previous_len(p.len);
                    }
                    b.set_stream_id(g.stream_id);
                    b.set_seq(g.seq);
                }
                Ok(Reply::Sealed(seq)) => r.set_sealed(*seq),
                Ok(Reply::Subscribed(s)) => {
                    let mut b = r.init_subscribed();
                    b.set_subscription(s.subscription);
                    b.set_from_seq(s.from_seq);
                    b.set_state(&s.state);
                }
                Ok(Reply::Got(d)) => delivery_to(d, r.init_got()),
                Ok(Reply::Stat(s)) => store_stat_to(s, r.init_stat()),
                Ok(Reply::Streams(list)) => {
                    let mut l = r.init_streams(list.len() as u32);
                    for (i, s) in list.iter().enumerate() {
                        stream_stat_to(s, l.reborrow().get(i as u32));
                    }
                }
                Ok(Reply::StreamStat(s)) => stream_stat_to(s, r.init_stream_stat()),
            }
        }
        ServerMessage::Delivery(d) => delivery_to(d, root.init_delivery()),
        ServerMessage::Ended {
            subscription,
            reason,
            delivered,
        } => {
            let mut e = root.init_ended();
            e.set_subscription(*subscription);
            e.set_delivered(*delivered);
            error_to(reason, e.init_reason());
        }
        ServerMessage::Notice(e) => error_to(e, root.init_notice()),
    }
    append_framed(&builder, out);
}

/// Encodes a stream configuration on its own (the journal stores it this way).
pub fn encode_config(config: &StreamConfig) -> Vec<u8> {
    let mut message = Builder::new_default();
    config_to(config, message.init_root());
    capnp::serialize::write_message_to_words(&message)
}

fn append_framed(message: &Builder<HeapAllocator>, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail.
    let _ = capnp::serialize::write_message(&mut *out, message);
}

fn config_to(c: &StreamConfig, mut b: schema::stream_config::Builder<'_>) {
    b.set_max_frames(c.max_frames);
    b.set_max_bytes(c.max_bytes);
    b.set_retain_frames(c.retain_frames);
    b.set_on_full(match c.on_full {
        FullPolicy::Block => schema::FullPolicy::Block,
        FullPolicy::Reject => schema::FullPolicy::Reject,
        FullPolicy::DropOldest => schema::FullPolicy::DropOldest,
    });
    b.set_block_timeout_ms(c.block_timeout_ms);
    b.set_checksums(c.checksums);
    b.set_max_frame_bytes(c.max_frame_bytes);
}

fn delivery_to(d: &Delivery, mut b: schema::delivery::Builder<'_>) {
    b.set_reference(d.reference);
    b.set_subscription(d.subscription);
    b.set_seq(d.seq);
    b.set_offset(d.offset);
    b.set_len(d.len);
    b.set_has_checksum(d.checksum.is_some());
    b.set_checksum(d.checksum.unwrap_or(0));
    b.set_sealed_nanos(d.sealed_nanos);
}

fn error_to(e: &StoreError, mut b: schema::error::Builder<'_>) {
    b.set_code(e.code.to_schema());
    b.set_message(e.message.as_str());
}

fn stream_stat_to(s: &StreamStat, mut b: schema::stream_stat::Builder<'_>) {
    b.set_name(s.name.as_str());
    config_to(&s.config, b.reborrow().init_config());
    b.set_first_seq(s.first_seq);
    b.set_next_seq(s.next_seq);
    b.set_frames(s.frames);
    b.set_bytes(s.bytes);
    b.set_unconsumed_frames(s.unconsumed_frames);
    b.set_writing(s.writing);
    b.set_sealed_total(s.sealed_total);
    b.set_dropped_total(s.dropped_total);
    b.set_blocked_creates(s.blocked_creates);
    b.set_rejected_creates(s.rejected_creates);
    b.set_ended(s.ended);
    b.set_id(s.id);
    let mut consumers = b.init_consumers(s.consumers.len() as u32);
    for (i, c) in s.consumers.iter().enumerate() {
        let mut cb = consumers.reborrow().get(i as u32);
        cb.set_name(c.name.as_str());
        cb.set_durable(c.durable);
        cb.set_attached(c.attached);
        cb.set_committed(c.committed);
        cb.set_outstanding(c.outstanding);
    }
}

fn store_stat_to(s: &StoreStat, mut b: schema::store_stat::Builder<'_>) {
    b.set_region_bytes(s.region_bytes);
    b.set_block_bytes(s.block_bytes);
    b.set_blocks_total(s.blocks_total);
    b.set_blocks_in_use(s.blocks_in_use);
    b.set_objects(s.objects);
    b.set_sessions(s.sessions);
    b.set_streams(s.streams);
    b.set_creates(s.creates);
    b.set_seals(s.seals);
    b.set_gets(s.gets);
    b.set_deliveries(s.deliveries);
    b.set_releases(s.releases);
    b.set_reclaimed_references(s.reclaimed_references);
    b.set_aborted_writes(s.aborted_writes);
    b.set_errors(s.errors);
    b.set_recovered_frames(s.recovered_frames);
    b.set_corrupt_frames(s.corrupt_frames);
    b.set_recycled_grants(s.recycled_grants);
}

impl ErrorCode {
    fn to_schema(self) -> schema::ErrorCode {
        use schema::ErrorCode as S;
        match self {
            Self::BadRequest => S::BadRequest,
            Self::UnknownStream => S::UnknownStream,
            Self::UnknownObject => S::UnknownObject,
            Self::UnknownReference => S::UnknownReference,
            Self::StreamExists => S::StreamExists,
            Self::StreamFull => S::StreamFull,
            Self::Timeout => S::Timeout,
            Self::TooLarge => S::TooLarge,
            Self::RegionFull => S::RegionFull,
            Self::NotWritable => S::NotWritable,
            Self::OutOfGrant => S::OutOfGrant,
            Self::BadFrame => S::BadFrame,
            Self::ChecksumMismatch => S::ChecksumMismatch,
            Self::ChecksumRequired => S::ChecksumRequired,
            Self::FrameGone => S::FrameGone,
            Self::ConsumerBusy => S::ConsumerBusy,
            Self::Unsupported => S::Unsupported,
            Self::ShuttingDown => S::ShuttingDown,
            Self::Protocol => S::Protocol,
            Self::DataNotLanded => S::DataNotLanded,
            Self::Persistence => S::Persistence,
            Self::EndOfStream => S::EndOfStream,
        }
    }
}
