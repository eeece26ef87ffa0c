//! The control protocol: Rust types for `schemas/store.capnp`, their encoding, and the
//! bounds-checked decoding of untrusted bytes.
//!
//! ```text
//!  control connection (Unix or TCP socket), each direction a sequence of framed messages
//!  ┌──────────────┬────────────────┬─────────────┬────────────────┬──────
//!  │ u32 segs - 1 │ u32 words × n  │ (pad to 8)  │ segments …     │ next message …
//!  └──────────────┴────────────────┴─────────────┴────────────────┴──────
//!   client ─▶ store: Request { id, hello | create | seal | get | subscribe | release | … }
//!   store ─▶ client: ServerMessage { response { id, result } | delivery | ended | notice }
//! ```
//!
//! Decoding never trusts a length: [`MessageBuf`] rejects a message larger than its limit
//! before buffering it, the decoders read with a traversal limit of a few times the message's
//! own size, the lists of a message may not declare more elements, all together, than it has
//! words (so a few hundred bytes cannot claim millions of zero-sized elements), names are
//! bounded, and every error is a typed [`ProtoError`]. [`fuzz_decode`] runs the whole path on
//! arbitrary bytes.

use crate::store_capnp as schema;
use capnp::message::{Builder, HeapAllocator, ReaderOptions};
use capnp_rdma::reader::{read_framed, ReadError, ReadOptions, SegmentTable};

/// Protocol version spoken by this crate.
pub const VERSION: u32 = 1;
/// Largest control message a store accepts from a client.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Largest control message a client accepts from a store (stream listings can be long).
pub const MAX_SERVER_MESSAGE_BYTES: usize = 16 << 20;
/// Longest stream or consumer name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Most references in one `releaseMany`.
pub const MAX_RELEASE_BATCH: usize = 4096;
/// Most segments a control message may have.
const MAX_SEGMENTS: u32 = 16;

/// How a client moves frame bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// Same host: the region is mapped by the client.
    Shm,
    /// Any host: bytes travel on a data connection.
    Tcp,
    /// Hosts with RDMA devices: the client writes and reads the store's region with
    /// one-sided RDMA (trusted peers: the connection reaches the whole region).
    Verbs,
}

/// What a full stream does to the next create.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FullPolicy {
    /// The create waits up to the stream's block timeout for consumers to release frames.
    #[default]
    Block,
    /// The create fails at once with [`ErrorCode::StreamFull`].
    Reject,
    /// The oldest unconsumed frame leaves the stream (consumers skip it).
    DropOldest,
}

/// Per-stream limits and policies. Zero fields take their defaults ([`StreamConfig::normalized`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// Most frames sealed or being written that some consumer has not released (0: 64).
    pub max_frames: u32,
    /// Most bytes of such frames (0: only the region bounds them).
    pub max_bytes: u64,
    /// Frames every consumer released that stay readable for replay and `get`.
    pub retain_frames: u32,
    /// What happens to a create when the stream is full.
    pub on_full: FullPolicy,
    /// How long a blocked create waits, in milliseconds (0: 1000).
    pub block_timeout_ms: u32,
    /// Every seal must carry a CRC-32C of the frame.
    pub checksums: bool,
    /// Largest create in bytes (0: only the region bounds it).
    pub max_frame_bytes: u64,
}

impl StreamConfig {
    /// Default for `max_frames`.
    pub const DEFAULT_MAX_FRAMES: u32 = 64;
    /// Default for `block_timeout_ms`.
    pub const DEFAULT_BLOCK_TIMEOUT_MS: u32 = 1000;

    /// The configuration with defaults filled in.
    pub fn normalized(mut self) -> Self {
        if self.max_frames == 0 {
            self.max_frames = Self::DEFAULT_MAX_FRAMES;
        }
        if self.block_timeout_ms == 0 {
            self.block_timeout_ms = Self::DEFAULT_BLOCK_TIMEOUT_MS;
        }
        self
    }
}

/// Where a subscription starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cursor {
    /// A durable consumer's saved position; the oldest retained frame for a new consumer.
    Resume,
    /// The oldest retained frame.
    Oldest,
    /// Only frames sealed from now on.
    Latest,
    /// Frame `seq` (or the oldest retained one if it is gone).
    Seq(u64),
}

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// First request of a connection.
    Hello {
        /// Protocol version.
        version: u32,
        /// Client name for logs.
        client: String,
        /// How this client moves bytes.
        transport: Transport,
    },
    /// Creates a stream.
    CreateStream {
        /// Stream name.
        name: String,
        /// Its configuration.
        config: StreamConfig,
        /// Succeed if it exists.
        exist_ok: bool,
    },
    /// Deletes a stream and every frame in it (held references stay valid until released).
    DeleteStream(String),
    /// A writable grant for the next frame of a stream.
    Create {
        /// Stream name.
        stream: String,
        /// Bytes needed.
        size: u64,
        /// The grant need not be zeroed (the client overwrites what it seals; shm only).
        dirty_ok: bool,
    },
    /// Makes a grant's bytes readable.
    Seal {
        /// Object id from the grant.
        object: u64,
        /// Region offset of the frame's first byte.
        offset: u64,
        /// Frame length.
        len: u64,
        /// CRC-32C of the frame's bytes.
        checksum: Option<u32>,
    },
    /// Gives up an unsealed grant.
    Abort(u64),
    /// Subscribes to a stream.
    Subscribe {
        /// Stream name.
        stream: String,
        /// Durable consumer name, or empty.
        consumer: String,
        /// Where to start.
        from: Cursor,
        /// Most deliveries held at once (0: 4).
        window: u32,
    },
    /// Ends a subscription; its unreleased deliveries are released without acknowledging.
    Unsubscribe(u32),
    /// One sealed frame: the newest (`None`) or frame `seq`.
    Get {
        /// Stream name.
        stream: String,
        /// Which frame.
        seq: Option<u64>,
    },
    /// Drops a reference (and acknowledges a subscription's frame).
    Release(u64),
    /// Drops several references.
    ReleaseMany(Vec<u64>),
    /// Store-wide counters.
    Stat,
    /// Every stream's state.
    Streams,
    /// One stream's state.
    StreamStat(String),
}

/// A request with its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Chosen by the client; echoed in the response.
    pub id: u64,
    /// What is asked.
    pub body: Body,
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// Malformed or not allowed in this state (e.g. before hello).
    BadRequest,
    /// No such stream.
    UnknownStream,
    /// No such object (or not this client's).
    UnknownObject,
    /// No such reference (or already released).
    UnknownReference,
    /// The stream already exists.
    StreamExists,
    /// The stream is full and its policy is `reject`.
    StreamFull,
    /// A blocked create waited its whole timeout.
    Timeout,
    /// Larger than the stream or the region allows.
    TooLarge,
    /// The region has no room and the stream's policy does not wait.
    RegionFull,
    /// The object is not writable (already sealed or aborted).
    NotWritable,
    /// A seal or a data write outside the object's grant.
    OutOfGrant,
    /// The sealed bytes are not one framed Cap'n Proto message.
    BadFrame,
    /// The checksum does not match the bytes.
    ChecksumMismatch,
    /// The stream needs checksums and the seal has none.
    ChecksumRequired,
    /// The frame left the stream (or never existed).
    FrameGone,
    /// The durable consumer is attached to another subscription.
    ConsumerBusy,
    /// Not supported by this store or transport.
    Unsupported,
    /// The store is shutting down.
    ShuttingDown,
    /// The peer broke the protocol.
    Protocol,
    /// A tcp object's bytes have not all arrived.
    DataNotLanded,
    /// The store could not record the operation durably.
    Persistence,
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
        }
    }

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
        }
    }
}

/// A typed error the store returns.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct StoreError {
    /// What kind.
    pub code: ErrorCode,
    /// Details for humans.
    pub message: String,
}

impl StoreError {
    /// An error of `code` with `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The store's answer to `hello`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Welcome {
    /// Protocol version.
    pub version: u32,
    /// Session id.
    pub session: u64,
    /// Secret for the data connection of a tcp client.
    pub token: u64,
    /// Region id.
    pub region_id: u64,
    /// Region size.
    pub region_bytes: u64,
    /// Block size.
    pub block_bytes: u64,
    /// TCP port of the data listener (0: none).
    pub data_port: u16,
    /// Seals must carry checksums.
    pub checksums: bool,
    /// TCP port of the RDMA handshake listener (verbs clients; 0: none).
    pub verbs_port: u16,
}

/// A writable grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Object id.
    pub object: u64,
    /// Region offset of the grant.
    pub offset: u64,
    /// Grant length (whole blocks).
    pub len: u64,
    /// The frame of the same stream whose bytes the grant still holds, as sealed (shm
    /// `dirtyOk` grants only): a producer may repaint only what changed since that frame.
    pub previous: Option<PreviousFrame>,
}

/// A freed frame whose bytes a new grant still holds exactly as they were sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreviousFrame {
    /// Its sequence number in the grant's stream.
    pub seq: u64,
    /// Region offset of its first byte (inside the grant).
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// A frame handed to a client, held until released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Reference to release.
    pub reference: u64,
    /// Subscription (0 for a get).
    pub subscription: u32,
    /// Frame sequence number in its stream.
    pub seq: u64,
    /// Region offset of the frame.
    pub offset: u64,
    /// Frame length.
    pub len: u64,
    /// CRC-32C from the seal.
    pub checksum: Option<u32>,
    /// Seal time, Unix ns.
    pub sealed_nanos: u64,
}

/// A new subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subscribed {
    /// Its id.
    pub subscription: u32,
    /// First frame it will deliver.
    pub from_seq: u64,
}

/// One consumer of a stream.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ConsumerStat {
    /// Name (anonymous consumers get a generated one).
    pub name: String,
    /// Survives disconnects.
    pub durable: bool,
    /// Has a live subscription.
    pub attached: bool,
    /// Every frame before this one is released.
    pub committed: u64,
    /// Deliveries held.
    pub outstanding: u32,
}

/// One stream's state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StreamStat {
    /// Name.
    pub name: String,
    /// Configuration.
    pub config: StreamConfig,
    /// Oldest retained frame.
    pub first_seq: u64,
    /// One past the newest frame.
    pub next_seq: u64,
    /// Frames retained.
    pub frames: u32,
    /// Their bytes.
    pub bytes: u64,
    /// Frames some consumer has not released.
    pub unconsumed_frames: u32,
    /// Grants not yet sealed.
    pub writing: u32,
    /// Consumers.
    pub consumers: Vec<ConsumerStat>,
    /// Frames ever sealed.
    pub sealed_total: u64,
    /// Frames dropped by `dropOldest`.
    pub dropped_total: u64,
    /// Creates that had to wait.
    pub blocked_creates: u64,
    /// Creates refused (full, timed out).
    pub rejected_creates: u64,
}

/// Store-wide state and counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub struct StoreStat {
    /// Region size.
    pub region_bytes: u64,
    /// Block size.
    pub block_bytes: u64,
    /// Blocks in the region.
    pub blocks_total: u64,
    /// Blocks allocated.
    pub blocks_in_use: u64,
    /// Objects (grants and frames) alive.
    pub objects: u64,
    /// Connected clients.
    pub sessions: u32,
    /// Streams.
    pub streams: u32,
    /// Grants handed out.
    pub creates: u64,
    /// Frames sealed.
    pub seals: u64,
    /// Gets answered.
    pub gets: u64,
    /// Subscription deliveries.
    pub deliveries: u64,
    /// References released by clients.
    pub releases: u64,
    /// References dropped because their client went away.
    pub reclaimed_references: u64,
    /// Grants never sealed (aborted, or their writer went away).
    pub aborted_writes: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Frames recovered from the persistence directory at start.
    pub recovered_frames: u64,
    /// Frames found corrupt at recovery and dropped.
    pub corrupt_frames: u64,
    /// Grants served from a freed frame's blocks without zeroing.
    pub recycled_grants: u64,
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Done.
    Ok,
    /// Answer to hello.
    Welcome(Welcome),
    /// Answer to create.
    Granted(Grant),
    /// Answer to seal: the frame's sequence number.
    Sealed(u64),
    /// Answer to subscribe.
    Subscribed(Subscribed),
    /// Answer to get.
    Got(Delivery),
    /// Answer to stat.
    Stat(StoreStat),
    /// Answer to streams.
    Streams(Vec<StreamStat>),
    /// Answer to streamStat.
    StreamStat(StreamStat),
}

/// The answer to the request `id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// Its outcome.
    pub result: Result<Reply, StoreError>,
}

/// What the store sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerMessage {
    /// An answer.
    Response(Response),
    /// A frame for a subscription (shm clients).
    Delivery(Delivery),
    /// A subscription ended on the store's initiative.
    Ended {
        /// Which.
        subscription: u32,
        /// Why.
        reason: StoreError,
        /// Frames it was delivered in all (a tcp client's may still be on the data connection).
        delivered: u64,
    },
    /// An error outside any request.
    Notice(StoreError),
}

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

/// Most words a request (or a journal's configuration) may read through pointers.
const REQUEST_TRAVERSAL_CAP_WORDS: u64 = 64 << 10;

fn read_options() -> ReadOptions {
    ReadOptions {
        // Control messages are small: a request reads at most its own size a few times over.
        traversal_limit_words: Some(REQUEST_TRAVERSAL_CAP_WORDS),
        nesting_limit: 16,
        max_segments: MAX_SEGMENTS,
    }
}

/// The traversal limit allows this many times the message's own words (honest decoding reads
/// each object once)...
const TRAVERSAL_FACTOR: u64 = 4;
/// ...plus this many, for the smallest messages.
const TRAVERSAL_SLACK_WORDS: u64 = 64;

/// [`read_options`] for decoding `bytes`: the traversal limit is [`TRAVERSAL_FACTOR`] times the
/// message's words plus [`TRAVERSAL_SLACK_WORDS`], and at most `cap` words.
fn read_options_for(bytes: &[u8], cap: u64) -> ReadOptions {
    let words = (bytes.len() as u64).div_ceil(8);
    let mut options = read_options();
    options.traversal_limit_words = Some(
        words
            .saturating_mul(TRAVERSAL_FACTOR)
            .saturating_add(TRAVERSAL_SLACK_WORDS)
            .min(cap),
    );
    options
}

/// How many list elements one decode may still turn into Rust values.
///
/// Starts at the message's size in words: every element of every list in the schema costs an
/// honest encoder at least one word of its own (`UInt64`s are 8 bytes, `StreamStat` and
/// `ConsumerStat` have data and pointer sections), so no honest message holds more elements, in
/// all its lists together, than it has words. A dishonest one can declare far more at no cost (a
/// list of zero-sized structs is a tag word and a count; many list pointers may share one
/// list): [`ListBudget::take`] refuses such a list before anything is allocated or iterated.
struct ListBudget {
    remaining: u64,
}

impl ListBudget {
    /// The budget of a message of `bytes` bytes.
    fn new(bytes: usize) -> Self {
        Self {
            remaining: (bytes as u64).div_ceil(8),
        }
    }

    /// Takes `len` elements (a list about to be decoded), or fails if the message could not
    /// honestly hold them.
    fn take(&mut self, len: u32) -> Result<(), ProtoError> {
        let len = u64::from(len);
        if len > self.remaining {
            return Err(ProtoError::Invalid(
                "list declares more elements than the message has words",
            ));
        }
        self.remaining -= len;
        Ok(())
    }
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

/// Encodes a stream configuration on its own (the journal stores it this way).
pub fn encode_config(config: &StreamConfig) -> Vec<u8> {
    let mut message = Builder::new_default();
    config_to(config, message.init_root());
    capnp::serialize::write_message_to_words(&message)
}

/// Decodes [`encode_config`]'s output.
pub fn decode_config(bytes: &[u8]) -> Result<StreamConfig, ProtoError> {
    let words = aligned_copy(bytes);
    let (message, _) = read_framed(capnp::Word::words_to_bytes(&words), &read_options())?;
    config_from(message.get_root()?)
}

fn aligned_copy(bytes: &[u8]) -> Vec<capnp::Word> {
    let mut words = capnp::Word::allocate_zeroed_vec(bytes.len().div_ceil(8));
    capnp::Word::words_to_bytes_mut(&mut words)[..bytes.len()].copy_from_slice(bytes);
    words
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
        W::ReleaseMany(list) => {
            let list = list?;
            if list.len() as usize > MAX_RELEASE_BATCH {
                return Err(ProtoError::Invalid("releaseMany longer than 4096"));
            }
            budget.take(list.len())?;
            Body::ReleaseMany(list.iter().collect())
        }
        W::Stat(()) => Body::Stat,
        W::Streams(()) => Body::Streams,
        W::StreamStat(n) => Body::StreamStat(name(n?)?),
    };
    Ok(Request {
        id: root.get_id(),
        body,
    })
}

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
        } => {
            let mut s = root.init_seal();
            s.set_object(*object);
            s.set_offset(*offset);
            s.set_len(*len);
            s.set_has_checksum(checksum.is_some());
            s.set_checksum(checksum.unwrap_or(0));
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
        Body::ReleaseMany(refs) => {
            let mut list = root.init_release_many(refs.len() as u32);
            for (i, r) in refs.iter().enumerate() {
                list.set(i as u32, *r);
            }
        }
        Body::Stat => root.set_stat(()),
        Body::Streams => root.set_streams(()),
        Body::StreamStat(name) => root.set_stream_stat(name.as_str()),
    }
    append_framed(&message, out);
}

fn append_framed(message: &Builder<HeapAllocator>, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail.
    let _ = capnp::serialize::write_message(&mut *out, message);
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

fn error_to(e: &StoreError, mut b: schema::error::Builder<'_>) {
    b.set_code(e.code.to_schema());
    b.set_message(e.message.as_str());
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
    })
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
                }
                Ok(Reply::Sealed(seq)) => r.set_sealed(*seq),
                Ok(Reply::Subscribed(s)) => {
                    let mut b = r.init_subscribed();
                    b.set_subscription(s.subscription);
                    b.set_from_seq(s.from_seq);
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
                    }))
                }
                R::Sealed(seq) => Ok(Reply::Sealed(seq)),
                R::Subscribed(s) => {
                    let s = s?;
                    Ok(Reply::Subscribed(Subscribed {
                        subscription: s.get_subscription(),
                        from_seq: s.get_from_seq(),
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

/// A receive buffer that splits a byte stream into framed messages, 8-byte aligned, without
/// copying each one out.
///
/// Bytes are read into [`MessageBuf::spare`] and committed with [`MessageBuf::filled`];
/// [`MessageBuf::next_message`] yields each complete message in place. A message whose table
/// declares more than `limit` bytes is an error before any of its body is buffered.
#[derive(Debug)]
pub struct MessageBuf {
    words: Vec<capnp::Word>,
    start: usize,
    end: usize,
    limit: usize,
}

impl MessageBuf {
    /// An empty buffer for messages of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            words: capnp::Word::allocate_zeroed_vec(8192),
            start: 0,
            end: 0,
            limit,
        }
    }

    fn bytes(&self) -> &[u8] {
        capnp::Word::words_to_bytes(&self.words)
    }

    /// Room to read into: at least 4 KiB (the buffer grows or compacts as needed).
    pub fn spare(&mut self) -> &mut [u8] {
        let capacity = self.words.len() * 8;
        if capacity - self.end < 4096 {
            if self.start > 0 {
                // Move the unread bytes to the front (keeps 8-byte alignment: start is a
                // message boundary, and messages are whole words).
                let (start, end) = (self.start, self.end);
                capnp::Word::words_to_bytes_mut(&mut self.words).copy_within(start..end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if capacity - self.end < 4096 {
                self.words
                    .resize(self.words.len() * 2, capnp::word(0, 0, 0, 0, 0, 0, 0, 0));
            }
        }
        let end = self.end;
        &mut capnp::Word::words_to_bytes_mut(&mut self.words)[end..]
    }

    /// Commits `n` bytes read into [`MessageBuf::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.words.len() * 8);
    }

    /// Bytes buffered and not yet returned as messages.
    pub fn pending(&self) -> usize {
        self.end - self.start
    }

    /// The next complete message, if the buffer holds one; `Err` if the stream is broken (the
    /// connection must then be closed: framing cannot be resynchronised).
    pub fn next_message(&mut self) -> Option<Result<&[u8], ProtoError>> {
        let available = &self.bytes()[self.start..self.end];
        if available.len() < 8 {
            return None;
        }
        let table = match SegmentTable::parse(available, MAX_SEGMENTS) {
            Ok(table) => table,
            Err(ReadError::Truncated { .. }) => return None,
            Err(e) => return Some(Err(e.into())),
        };
        let len = table.message_bytes();
        if len > self.limit as u64 {
            return Some(Err(ProtoError::TooLarge {
                bytes: len,
                limit: self.limit,
            }));
        }
        let len = len as usize;
        if available.len() < len {
            if self.words.len() * 8 < len + 4096 {
                let words = (len + 4096).div_ceil(8).next_power_of_two();
                self.words
                    .resize(words, capnp::word(0, 0, 0, 0, 0, 0, 0, 0));
            }
            return None;
        }
        let start = self.start;
        self.start += len;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Some(Ok(&self.bytes()[start..start + len]))
    }
}

/// Options for reading a control message (exposed for the fuzz target and tests).
pub fn reader_options() -> ReaderOptions {
    read_options().capnp_options(0)
}

/// Fuzz entry point: feeds arbitrary bytes through [`MessageBuf`] in uneven chunks and decodes
/// every message as a request and as a server message, re-encoding what decodes and checking
/// it decodes to the same value. Must never panic.
#[doc(hidden)]
pub fn fuzz_decode(data: &[u8]) {
    for limit in [MAX_REQUEST_BYTES, 64] {
        let mut buf = MessageBuf::new(limit);
        let mut fed = 0;
        let mut chunk = 1;
        'feed: while fed < data.len() {
            let n = chunk.min(data.len() - fed);
            buf.spare()[..n].copy_from_slice(&data[fed..fed + n]);
            buf.filled(n);
            fed += n;
            chunk = chunk * 3 + 1;
            loop {
                match buf.next_message() {
                    None => break,
                    Some(Err(_)) => break 'feed,
                    Some(Ok(bytes)) => {
                        let bytes = bytes.to_vec();
                        check_round_trip(&bytes);
                    }
                }
            }
        }
    }
    let words = aligned_copy(data);
    check_round_trip(capnp::Word::words_to_bytes(&words));
    let _ = decode_config(data);
}

fn check_round_trip(bytes: &[u8]) {
    let words = aligned_copy(bytes);
    let bytes = capnp::Word::words_to_bytes(&words);
    if let Ok(request) = decode_request(bytes) {
        let mut out = Vec::new();
        encode_request(&request, &mut out);
        let again = decode_request(capnp::Word::words_to_bytes(&aligned_copy(&out)))
            .expect("a re-encoded request decodes");
        assert_eq!(again, request);
    }
    if let Ok(message) = decode_server_message(bytes) {
        let mut out = Vec::new();
        encode_server_message(&message, &mut out);
        let again = decode_server_message(capnp::Word::words_to_bytes(&aligned_copy(&out)))
            .expect("a re-encoded server message decodes");
        assert_eq!(again, message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(request: Request) {
        let mut out = Vec::new();
        encode_request(&request, &mut out);
        let mut buf = MessageBuf::new(MAX_REQUEST_BYTES);
        buf.spare()[..out.len()].copy_from_slice(&out);
        buf.filled(out.len());
        let bytes = buf.next_message().unwrap().unwrap();
        assert_eq!(decode_request(bytes).unwrap(), request);
        assert!(buf.next_message().is_none());
    }

    #[test]
    fn every_request_round_trips() {
        let bodies = vec![
            Body::Hello {
                version: 1,
                client: "decoder".into(),
                transport: Transport::Tcp,
            },
            Body::CreateStream {
                name: "cam0".into(),
                config: StreamConfig {
                    max_frames: 3,
                    on_full: FullPolicy::DropOldest,
                    checksums: true,
                    ..StreamConfig::default()
                },
                exist_ok: true,
            },
            Body::DeleteStream("cam0".into()),
            Body::Create {
                stream: "cam0".into(),
                size: 3 << 20,
                dirty_ok: true,
            },
            Body::Seal {
                object: 7,
                offset: 65536,
                len: 100,
                checksum: Some(0xdead_beef),
            },
            Body::Seal {
                object: 7,
                offset: 65536,
                len: 100,
                checksum: None,
            },
            Body::Abort(9),
            Body::Subscribe {
                stream: "cam0".into(),
                consumer: "enc".into(),
                from: Cursor::Seq(42),
                window: 8,
            },
            Body::Subscribe {
                stream: "cam0".into(),
                consumer: String::new(),
                from: Cursor::Latest,
                window: 0,
            },
            Body::Unsubscribe(3),
            Body::Get {
                stream: "cam0".into(),
                seq: None,
            },
            Body::Get {
                stream: "cam0".into(),
                seq: Some(0),
            },
            Body::Release(11),
            Body::ReleaseMany(vec![1, 2, 3]),
            Body::Stat,
            Body::Streams,
            Body::StreamStat("cam0".into()),
        ];
        for (id, body) in bodies.into_iter().enumerate() {
            round_trip(Request {
                id: id as u64,
                body,
            });
        }
    }

    #[test]
    fn split_and_concatenated_messages_are_found() {
        let mut stream = Vec::new();
        for id in 0..50 {
            encode_request(
                &Request {
                    id,
                    body: Body::Release(id * 3),
                },
                &mut stream,
            );
        }
        let mut buf = MessageBuf::new(MAX_REQUEST_BYTES);
        let mut got = Vec::new();
        for chunk in stream.chunks(7) {
            buf.spare()[..chunk.len()].copy_from_slice(chunk);
            buf.filled(chunk.len());
            while let Some(m) = buf.next_message() {
                got.push(decode_request(m.unwrap()).unwrap().id);
            }
        }
        assert_eq!(got, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn oversized_and_garbage_are_typed_errors() {
        let mut buf = MessageBuf::new(1024);
        // One segment of 1 Mi words.
        let header = [0u32.to_le_bytes(), (1u32 << 20).to_le_bytes()].concat();
        buf.spare()[..8].copy_from_slice(&header);
        buf.filled(8);
        assert!(matches!(
            buf.next_message(),
            Some(Err(ProtoError::TooLarge { .. }))
        ));
        let mut buf = MessageBuf::new(1024);
        buf.spare()[..8].copy_from_slice(&[0xff; 8]);
        buf.filled(8);
        assert!(matches!(
            buf.next_message(),
            Some(Err(ProtoError::Framing(_)))
        ));
        // A well-framed message that is not a request.
        let words = aligned_copy(&[0, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
        assert!(decode_request(capnp::Word::words_to_bytes(&words)).is_err());
    }

    #[test]
    fn long_names_are_rejected() {
        let mut out = Vec::new();
        encode_request(
            &Request {
                id: 1,
                body: Body::DeleteStream("x".repeat(300)),
            },
            &mut out,
        );
        let words = aligned_copy(&out);
        assert!(matches!(
            decode_request(capnp::Word::words_to_bytes(&words)),
            Err(ProtoError::Invalid(_))
        ));
    }

    #[test]
    fn server_messages_round_trip() {
        let messages = vec![
            ServerMessage::Response(Response {
                id: 1,
                result: Err(StoreError::new(ErrorCode::StreamFull, "full")),
            }),
            ServerMessage::Response(Response {
                id: 2,
                result: Ok(Reply::Granted(Grant {
                    object: 1,
                    offset: 2,
                    len: 3,
                    previous: None,
                })),
            }),
            ServerMessage::Response(Response {
                id: 3,
                result: Ok(Reply::Granted(Grant {
                    object: 4,
                    offset: 4096,
                    len: 8192,
                    previous: Some(PreviousFrame {
                        seq: 7,
                        offset: 4104,
                        len: 8000,
                    }),
                })),
            }),
            ServerMessage::Delivery(Delivery {
                reference: 5,
                subscription: 1,
                seq: 9,
                offset: 4096,
                len: 8,
                checksum: Some(3),
                sealed_nanos: 77,
            }),
            ServerMessage::Ended {
                subscription: 4,
                reason: StoreError::new(ErrorCode::UnknownStream, "deleted"),
                delivered: 12,
            },
            ServerMessage::Response(Response {
                id: 3,
                result: Ok(Reply::Streams(vec![StreamStat {
                    name: "a".into(),
                    config: StreamConfig::default().normalized(),
                    first_seq: 1,
                    next_seq: 5,
                    frames: 4,
                    bytes: 100,
                    unconsumed_frames: 2,
                    writing: 1,
                    consumers: vec![ConsumerStat {
                        name: "enc".into(),
                        durable: true,
                        attached: false,
                        committed: 3,
                        outstanding: 0,
                    }],
                    sealed_total: 5,
                    dropped_total: 0,
                    blocked_creates: 1,
                    rejected_creates: 0,
                }])),
            }),
        ];
        for m in messages {
            let mut out = Vec::new();
            encode_server_message(&m, &mut out);
            let words = aligned_copy(&out);
            assert_eq!(
                decode_server_message(capnp::Word::words_to_bytes(&words)).unwrap(),
                m
            );
        }
    }
}
