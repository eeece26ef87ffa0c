//! What a client asks: [`Request`] and its [`Body`], and the values requests carry (a
//! stream's [`StreamConfig`] and [`FullPolicy`], a subscription's [`Cursor`], the client's
//! [`Transport`]).

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
    /// The create fails at once with [`ErrorCode::StreamFull`](super::ErrorCode::StreamFull).
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
        /// References released with the seal, in the same operation.
        releases: Vec<u64>,
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
    /// Ends a stream after its last sealed frame.
    EndStream(String),
    /// Releases references of one durable subscription and records the consumer's state
    /// with its cursor, in one operation.
    Commit {
        /// The subscription.
        subscription: u32,
        /// References of it to release.
        references: Vec<u64>,
        /// The consumer's state (at most [`MAX_CONSUMER_STATE`](super::MAX_CONSUMER_STATE)
        /// bytes).
        state: Vec<u8>,
    },
}

/// A request with its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Chosen by the client; echoed in the response.
    pub id: u64,
    /// What is asked.
    pub body: Body,
}
