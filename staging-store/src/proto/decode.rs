//! The bounds-checked decoder: framed bytes from an untrusted peer to a [`Request`] (the
//! store), a [`ServerMessage`] (clients) or a [`StreamConfig`] (the journal), within the
//! bounds of `limits.rs`; every failure is a typed [`ProtoError`].

use super::limits::{
    read_options, read_options_for, ListBudget, MAX_CONSUMER_STATE, MAX_NAME_BYTES,
    MAX_RELEASE_BATCH, MAX_SERVER_MESSAGE_BYTES, REQUEST_TRAVERSAL_CAP_WORDS, TRAVERSAL_FACTOR,
};
use super::{
    Body, ConsumerStat, Cursor, Delivery, ErrorCode, FullPolicy, Grant, PreviousFrame, Reply,
    Request, Response, ServerMessage, StoreError, StoreStat, StreamConfig, StreamStat, Subscribed,
    Transport, Welcome,
};
use crate::store_capnp as schema;
use capnp_rdma::reader::{read_framed, ReadError};

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The framing is wrong.
    #[error("framing: {0}")]
    Framing(#[from] ReadError),
    /// The message exceeds the limit.
    #[error("message of {bytes} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Declared size.
        bytes: u64,
        /// Limit.
        limit: usize,
    },
    /// The content is not a valid message of the schema.
    #[error("content: {0}")]
    Capnp(#[from] capnp::Error),
    /// A field is out of bounds.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

impl From<capnp::NotInSchema> for ProtoError {
    fn from(_: capnp::NotInSchema) -> Self {
        Self::Invalid("enum or union value not in the schema")
    }
}

/// Decodes one framed request (`bytes` must be 8-byte aligned and hold exactly the message).
pub fn decode_request(bytes: &[u8]) -> Result<Request, ProtoError> {
    let options = read_options_for(bytes, REQUEST_TRAVERSAL_CAP_WORDS);
    let (message, used) = read_framed(bytes, &options)?;
    let mut budget = ListBudget::new(used);
    let root: schema::request::Reader<'_> = message.get_root()?;
    use schema::request::Which as W;
    let body = match root.which()? {
        W::Hello(h) => {
            let h = h?;
            Body::Hello {
                version: h.get_version(),
                client: name(h.get_client()?)?,
                transport: match h.get_transport()? {
                    schema::Transport::Shm => Transport::Shm,
                    schema::Transport::Tcp => Transport::Tcp,
                    schema::Transport::Verbs => Transport::Verbs,
                },
            }
        }
        W::CreateStream(c) => {
            let c = c?;
            Body::CreateStream {
                name: name(c.get_name()?)?,
                config: config_from(c.get_config()?)?,
                exist_ok: c.get_exist_ok(),
            }
        }
        W::DeleteStream(n) => Body::DeleteStream(name(n?)?),
        W::Create(c) => {
            let c = c?;
            Body::Create {
                stream: name(c.get_stream()?)?,
                size: c.get_size(),
                dirty_ok: c.get_dirty_ok(),
            }
        }
        W::Seal(s) => {
            let s = s?;
            Body::Seal {
                object: s.get_object(),
                offset: s.get_offset(),
                len: s.get_len(),
                checksum: s.get_has_checksum().then(|| s.get_checksum()),
                releases: u64_list(s.get_releases()?, &mut budget, "seal releases")?,
            }
        }
        W::Abort(object) => Body::Abort(object),
        W::Subscribe(s) => {
            let s = s?;
            use schema::cursor::Which as C;
            let from = match s.get_from()?.which()? {
                C::Resume(()) => Cursor::Resume,
                C::Oldest(()) => Cursor::Oldest,
                C::Latest(()) => Cursor::Latest,
                C::Seq(n) => Cursor::Seq(n),
            };
            Body::Subscribe {
                stream: name(s.get_stream()?)?,
                consumer: name(s.get_consumer()?)?,
                from,
                window: s.get_window(),
            }
        }
        W::Unsubscribe(id) => Body::Unsubscribe(id),
        W::Get(g) => {
            let g = g?;
            Body::Get {
                stream: name(g.get_stream()?)?,
                seq: (!g.get_latest()).then(|| g.get_seq()),
            }
        }
        W::Release(r) => Body::Release(r),
        W::ReleaseMany(list) => Body::ReleaseMany(u64_list(list?, &mut budget, "releaseMany")?),
        W::Stat(()) => Body::Stat,
        W::Streams(()) => Body::Streams,
        W::StreamStat(n) => Body::StreamStat(name(n?)?),
        W::EndStream(n) => Body::EndStream(name(n?)?),
        W::Commit(c) => {
            let c = c?;
            let state = c.get_state()?;
            if state.len() > MAX_CONSUMER_STATE {
                return Err(ProtoError::Invalid("commit state longer than 4096 bytes"));
            }
            Body::Commit {
                subscription: c.get_subscription(),
                references: u64_list(c.get_references()?, &mut budget, "commit references")?,
                state: state.to_vec(),
            }
        }
    };
    Ok(Request {
        id: root.get_id(),
        body,
    })
}

/// Decodes one framed server message (`bytes` 8-byte aligned, exactly the message).
pub fn decode_server_message(bytes: &[u8]) -> Result<ServerMessage, ProtoError> {
    let options = read_options_for(
        bytes,
        (MAX_SERVER_MESSAGE_BYTES / 8) as u64 * TRAVERSAL_FACTOR,
    );
    let (message, used) = read_framed(bytes, &options)?;
    let mut budget = ListBudget::new(used);
    let root: schema::server_message::Reader<'_> = message.get_root()?;
    use schema::server_message::Which as M;
    Ok(match root.which()? {
        M::Response(r) => {
            let r = r?;
            use schema::response::Which as R;
            let result = match r.which()? {
                R::Error(e) => Err(error_from(e?)?),
                R::Ok(()) => Ok(Reply::Ok),
                R::Welcome(w) => {
                    let w = w?;
                    Ok(Reply::Welcome(Welcome {
                        version: w.get_version(),
                        session: w.get_session(),
                        token: w.get_token(),
                        region_id: w.get_region_id(),
                        region_bytes: w.get_region_bytes(),
                        block_bytes: w.get_block_bytes(),
                        data_port: w.get_data_port(),
                        verbs_port: w.get_verbs_port(),
                        checksums: w.get_checksums(),
                    }))
                }
                R::Granted(g) => {
                    let g = g?;
                    Ok(Reply::Granted(Grant {
                        object: g.get_object(),
                        offset: g.get_offset(),
                        len: g.get_len(),
                        previous: g.get_has_previous().then(|| PreviousFrame {
                            seq: g.get_previous_seq(),
                            offset: g.get_previous_offset(),
                            len: g.get_previous_len(),
                        }),
                        stream_id: g.get_stream_id(),
                        seq: g.get_seq(),
                    }))
                }
                R::Sealed(seq) => Ok(Reply::Sealed(seq)),
                R::Subscribed(s) => {
                    let s = s?;
                    Ok(Reply::Subscribed(Subscribed {
                        subscription: s.get_subscription(),
                        from_seq: s.get_from_seq(),
                        state: {
                            let state = s.get_state()?;
                            if state.len() > MAX_CONSUMER_STATE {
                                return Err(ProtoError::Invalid(
                                    "consumer state longer than 4096 bytes",
                                ));
                            }
                            state.to_vec()
                        },
                    }))
                }
                R::Got(d) => Ok(Reply::Got(delivery_from(d?))),
                R::Stat(s) => Ok(Reply::Stat(store_stat_from(s?))),
                R::Streams(list) => {
                    let list = list?;
                    budget.take(list.len())?;
                    let mut out = Vec::with_capacity(list.len() as usize);
                    for s in list.iter() {
                        out.push(stream_stat_from(s, &mut budget)?);
                    }
                    Ok(Reply::Streams(out))
                }
                R::StreamStat(s) => Ok(Reply::StreamStat(stream_stat_from(s?, &mut budget)?)),
            };
            ServerMessage::Response(Response {
                id: r.get_id(),
                result,
            })
        }
        M::Delivery(d) => ServerMessage::Delivery(delivery_from(d?)),
        M::Ended(e) => {
            let e = e?;
            ServerMessage::Ended {
                subscription: e.get_subscription(),
                reason: error_from(e.get_reason()?)?,
                delivered: e.get_delivered(),
            }
        }
        M::Notice(e) => ServerMessage::Notice(error_from(e?)?),
    })
}

/// Decodes [`encode_config`](super::encode_config)'s output.
pub fn decode_config(bytes: &[u8]) -> Result<StreamConfig, ProtoError> {
    let words = aligned_copy(bytes);
    let (message, _) = read_framed(capnp::Word::words_to_bytes(&words), &read_options())?;
    config_from(message.get_root()?)
}

pub(super) fn aligned_copy(bytes: &[u8]) -> Vec<capnp::Word> {
    let mut words = capnp::Word::allocate_zeroed_vec(bytes.len().div_ceil(8));
    capnp::Word::words_to_bytes_mut(&mut words)[..bytes.len()].copy_from_slice(bytes);
    words
}

/// A list of references, at most [`MAX_RELEASE_BATCH`] long and within the message's budget.
fn u64_list(
    list: capnp::primitive_list::Reader<'_, u64>,
    budget: &mut ListBudget,
    what: &'static str,
) -> Result<Vec<u64>, ProtoError> {
    if list.len() as usize > MAX_RELEASE_BATCH {
        return Err(ProtoError::Invalid(match what {
            "releaseMany" => "releaseMany longer than 4096",
            _ => "reference list longer than 4096",
        }));
    }
    budget.take(list.len())?;
    Ok(list.iter().collect())
}

fn name(reader: capnp::text::Reader<'_>) -> Result<String, ProtoError> {
    let s = reader
        .to_str()
        .map_err(|_| ProtoError::Invalid("name is not UTF-8"))?;
    if s.len() > MAX_NAME_BYTES {
        return Err(ProtoError::Invalid("name longer than 255 bytes"));
    }
    Ok(s.to_owned())
}

fn config_from(r: schema::stream_config::Reader<'_>) -> Result<StreamConfig, ProtoError> {
    Ok(StreamConfig {
        max_frames: r.get_max_frames(),
        max_bytes: r.get_max_bytes(),
        retain_frames: r.get_retain_frames(),
        on_full: match r.get_on_full()? {
            schema::FullPolicy::Block => FullPolicy::Block,
            schema::FullPolicy::Reject => FullPolicy::Reject,
            schema::FullPolicy::DropOldest => FullPolicy::DropOldest,
        },
        block_timeout_ms: r.get_block_timeout_ms(),
        checksums: r.get_checksums(),
        max_frame_bytes: r.get_max_frame_bytes(),
    })
}

fn delivery_from(r: schema::delivery::Reader<'_>) -> Delivery {
    Delivery {
        reference: r.get_reference(),
        subscription: r.get_subscription(),
        seq: r.get_seq(),
        offset: r.get_offset(),
        len: r.get_len(),
        checksum: r.get_has_checksum().then(|| r.get_checksum()),
        sealed_nanos: r.get_sealed_nanos(),
    }
}

fn error_from(r: schema::error::Reader<'_>) -> Result<StoreError, ProtoError> {
    Ok(StoreError {
        code: ErrorCode::from_schema(r.get_code()?),
        message: r
            .get_message()?
            .to_str()
            .map_err(|_| ProtoError::Invalid("error message is not UTF-8"))?
            .to_owned(),
    })
}

fn stream_stat_from(
    r: schema::stream_stat::Reader<'_>,
    budget: &mut ListBudget,
) -> Result<StreamStat, ProtoError> {
    let list = r.get_consumers()?;
    budget.take(list.len())?;
    let mut consumers = Vec::with_capacity(list.len() as usize);
    for c in list.iter() {
        consumers.push(ConsumerStat {
            name: name(c.get_name()?)?,
            durable: c.get_durable(),
            attached: c.get_attached(),
            committed: c.get_committed(),
            outstanding: c.get_outstanding(),
        });
    }
    Ok(StreamStat {
        name: name(r.get_name()?)?,
        config: config_from(r.get_config()?)?,
        first_seq: r.get_first_seq(),
        next_seq: r.get_next_seq(),
        frames: r.get_frames(),
        bytes: r.get_bytes(),
        unconsumed_frames: r.get_unconsumed_frames(),
        writing: r.get_writing(),
        consumers,
        sealed_total: r.get_sealed_total(),
        dropped_total: r.get_dropped_total(),
        blocked_creates: r.get_blocked_creates(),
        rejected_creates: r.get_rejected_creates(),
        ended: r.get_ended(),
        id: r.get_id(),
    })
}

fn store_stat_from(r: schema::store_stat::Reader<'_>) -> StoreStat {
    StoreStat {
        region_bytes: r.get_region_bytes(),
        block_bytes: r.get_block_bytes(),
        blocks_total: r.get_blocks_total(),
        blocks_in_use: r.get_blocks_in_use(),
        objects: r.get_objects(),
        sessions: r.get_sessions(),
        streams: r.get_streams(),
        creates: r.get_creates(),
        seals: r.get_seals(),
        gets: r.get_gets(),
        deliveries: r.get_deliveries(),
        releases: r.get_releases(),
        reclaimed_references: r.get_reclaimed_references(),
        aborted_writes: r.get_aborted_writes(),
        errors: r.get_errors(),
        recovered_frames: r.get_recovered_frames(),
        corrupt_frames: r.get_corrupt_frames(),
        recycled_grants: r.get_recycled_grants(),
    }
}

impl ErrorCode {
    fn from_schema(code: schema::ErrorCode) -> Self {
        use schema::ErrorCode as S;
        match code {
            S::BadRequest => Self::BadRequest,
            S::UnknownStream => Self::UnknownStream,
            S::UnknownObject => Self::UnknownObject,
            S::UnknownReference => Self::UnknownReference,
            S::StreamExists => Self::StreamExists,
            S::StreamFull => Self::StreamFull,
            S::Timeout => Self::Timeout,
            S::TooLarge => Self::TooLarge,
            S::RegionFull => Self::RegionFull,
            S::NotWritable => Self::NotWritable,
            S::OutOfGrant => Self::OutOfGrant,
            S::BadFrame => Self::BadFrame,
            S::ChecksumMismatch => Self::ChecksumMismatch,
            S::ChecksumRequired => Self::ChecksumRequired,
            S::FrameGone => Self::FrameGone,
            S::ConsumerBusy => Self::ConsumerBusy,
            S::Unsupported => Self::Unsupported,
            S::ShuttingDown => Self::ShuttingDown,
            S::Protocol => Self::Protocol,
            S::DataNotLanded => Self::DataNotLanded,
            S::Persistence => Self::Persistence,
            S::EndOfStream => Self::EndOfStream,
        }
    }
}
