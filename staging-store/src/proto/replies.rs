//! What the store sends: [`ServerMessage`] (answers, and deliveries, ends and notices
//! nobody asked for), each answer's [`Reply`] or [`StoreError`], and the values they carry
//! (welcome, grant, delivery, stream and store statistics).

use super::StreamConfig;

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
    /// The stream has ended (a subscription's end, or a create or seal after it).
    EndOfStream,
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
    /// The stream's id (a stable hash of its name; [`stream_id`](super::stream_id)).
    pub stream_id: u64,
    /// The sequence number the frame gets if the stream's grants are sealed in the order they
    /// were granted (one producer): what a producer writes into the frame itself.
    pub seq: u64,
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribed {
    /// Its id.
    pub subscription: u32,
    /// First frame it will deliver.
    pub from_seq: u64,
    /// The durable consumer's state as last committed (empty if never).
    pub state: Vec<u8>,
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
    /// Its producer ended it.
    pub ended: bool,
    /// Its id, as in grants.
    pub id: u64,
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
