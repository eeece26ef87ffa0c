//! The store's state machine: streams, objects, references and sessions. No I/O: the server
//! feeds it requests and events and sends what it returns.
//!
//! ```text
//!            create ──▶ Writing (granted blocks, owned by one session)
//!                          │ seal (framing + checksum checked)      │ abort / writer gone
//!                          ▼                                        ▼
//!   stream: [ retained … | unconsumed … ] ◀── Sealed(seq)        blocks freed
//!                │ get / delivery: +1 reference per holder
//!                ▼
//!   release (or the holder disconnects): −1 ── last reference ──▶ blocks freed
//! ```
//!
//! - **An object** is a run of region blocks ([`BlockLease`]) with a reference count: one for
//!   its place in the stream, one per delivery or get a client holds. Its blocks are free
//!   exactly when the count reaches zero (a server task still sending its bytes holds the
//!   lease a little longer, so blocks are never reused under a send): back in the region, or,
//!   for a sealed frame, in the store's recycled pool, from which the next `dirtyOk` create
//!   of that size takes them without a zeroing pass and is told which frame of its stream
//!   they still hold ("buffer age"). The pool goes back to the region whenever the region
//!   runs short, and `stat`/metrics count its blocks as free.
//! - **Sessions** are connections. Everything a session holds — grants being written,
//!   deliveries, gets, subscriptions — is dropped when it disconnects ([`Store::disconnect`]):
//!   no leases with timeouts, and a grant that was never sealed is never readable.
//! - **Consumers** of a stream have a cursor, `committed`: every frame before it has been
//!   released. A named (durable) consumer keeps its cursor across disconnects; frames at or
//!   after the slowest consumer's cursor are *unconsumed* and count against the stream's
//!   `max_frames`/`max_bytes`. Unconsumed frames are never freed, except by a stream that
//!   opted into [`FullPolicy::DropOldest`]. Consumed frames stay for replay up to
//!   `retain_frames`.
//! - **Backpressure**: a create on a full stream (or a full region) waits ([`FullPolicy::Block`],
//!   answered by a later call when room appears or by [`Store::expire`] at its deadline), fails
//!   ([`FullPolicy::Reject`]) or drops the oldest frames ([`FullPolicy::DropOldest`]).

use crate::journal::{self, Journal, Record};
use crate::proto::{
    Body, ConsumerStat, Cursor, Delivery, ErrorCode, FullPolicy, Grant, PreviousFrame, Reply,
    Request, Response, ServerMessage, StoreError, StoreStat, StreamConfig, StreamStat, Subscribed,
    Transport, Welcome, VERSION,
};
use capnp_rdma::reader::SegmentTable;
use capnp_rdma::{BlockLease, Region, RegionError};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// A connection's id.
pub type SessionId = u64;

/// Default subscription window.
pub const DEFAULT_WINDOW: u32 = 4;
/// Most streams a store holds.
pub const MAX_STREAMS: usize = 4096;
/// Most subscriptions per session.
pub const MAX_SUBSCRIPTIONS: usize = 1024;
/// Largest subscription window.
pub const MAX_WINDOW: u32 = 1024;

/// How a store behaves.
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    /// Seals must carry checksums (set when persisting).
    pub checksums_required: bool,
    /// The store recomputes every checksum at seal (costs a pass over the frame).
    pub verify_checksums: bool,
    /// TCP port of the data listener, told to clients.
    pub data_port: u16,
    /// TCP port of the RDMA handshake listener, told to clients (0: no verbs).
    pub verbs_port: u16,
}

/// Something the server must send.
#[derive(Debug)]
pub enum Out {
    /// A control message to a session.
    Message(SessionId, ServerMessage),
    /// A frame's bytes for a tcp session's data connection. `hold` keeps the blocks alive
    /// until they are sent.
    Data(SessionId, Delivery, Arc<BlockLease>),
}

#[derive(Debug)]
enum State {
    Writing {
        session: SessionId,
        /// Bytes from the grant's start known to be written (tcp: landed on the data
        /// connection; shm: the whole grant, the client writes in place).
        landed_end: u64,
        /// A data-connection write into the grant is in progress (tcp).
        putting: bool,
        /// A seal that arrived before its bytes (tcp).
        pending_seal: Option<(u64, Body)>,
    },
    Sealed {
        seq: u64,
        offset: u64,
        len: u64,
        checksum: Option<u32>,
        sealed_nanos: u64,
    },
}

#[derive(Debug)]
struct Object {
    lease: Arc<BlockLease>,
    stream: String,
    state: State,
    refs: u32,
}

#[derive(Clone, Copy, Debug)]
struct Frame {
    seq: u64,
    object: u64,
    bytes: u64,
}

#[derive(Debug)]
struct Consumer {
    durable: bool,
    committed: u64,
    /// Released frames at or after `committed` (out-of-order releases).
    acked: BTreeSet<u64>,
    attached: Option<(SessionId, u32)>,
}

#[derive(Debug)]
struct Parked {
    session: SessionId,
    request: u64,
    size: u64,
    dirty_ok: bool,
    deadline: Instant,
}

#[derive(Debug)]
struct Stream {
    config: StreamConfig,
    /// Retained frames, in increasing `seq` (gaps only after recovery dropped corrupt frames).
    frames: VecDeque<Frame>,
    next_seq: u64,
    writing: u32,
    writing_bytes: u64,
    consumers: HashMap<String, Consumer>,
    parked: VecDeque<Parked>,
    sealed_total: u64,
    dropped_total: u64,
    blocked_creates: u64,
    rejected_creates: u64,
}

impl Stream {
    fn new(config: StreamConfig) -> Self {
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
        }
    }

    fn first_seq(&self) -> u64 {
        self.frames.front().map_or(self.next_seq, |f| f.seq)
    }

    /// Every frame before this one has been released by every consumer.
    fn boundary(&self) -> u64 {
        self.consumers
            .values()
            .map(|c| c.committed)
            .min()
            .unwrap_or(self.next_seq)
    }

    fn index_of(&self, seq: u64) -> usize {
        self.frames.partition_point(|f| f.seq < seq)
    }

    fn unconsumed(&self) -> (u32, u64) {
        let from = self.index_of(self.boundary());
        let bytes = self.frames.range(from..).map(|f| f.bytes).sum();
        ((self.frames.len() - from) as u32, bytes)
    }

    fn is_full(&self, size: u64) -> bool {
        let (frames, bytes) = self.unconsumed();
        frames + self.writing >= self.config.max_frames
            || (self.config.max_bytes > 0
                && bytes + self.writing_bytes + size > self.config.max_bytes)
    }
}

#[derive(Debug)]
struct Held {
    object: u64,
    stream: String,
    subscription: u32,
    seq: u64,
}

#[derive(Debug)]
struct Subscription {
    stream: String,
    consumer: String,
    window: u32,
    outstanding: u32,
    next: u64,
    /// Frames delivered in all.
    delivered: u64,
}

#[derive(Debug)]
struct Session {
    transport: Option<Transport>,
    local: bool,
    client: String,
    token: u64,
    writing: Vec<u64>,
    held: HashMap<u64, Held>,
    subscriptions: HashMap<u32, Subscription>,
    next_reference: u64,
    next_subscription: u32,
}

/// The store's state. See the [module docs](self).
pub struct Store {
    region: Region,
    options: StoreOptions,
    journal: Option<Journal>,
    streams: HashMap<String, Stream>,
    objects: HashMap<u64, Object>,
    sessions: HashMap<SessionId, Session>,
    next_object: u64,
    next_session: SessionId,
    /// Streams with parked creates.
    waiting: BTreeSet<String>,
    stat: StoreStat,
    closed: bool,
    recycled: Recycled,
}

/// Blocks of freed frames kept un-zeroed for `dirtyOk` creates of the same size: a producer
/// that overwrites its whole frame does not pay for zeroing (the region's scrubber would
/// otherwise clear every freed frame before its blocks can be granted again). Each entry
/// remembers the frame it held, so a grant from the same stream can say what its bytes are.
#[derive(Default)]
struct Recycled {
    by_len: HashMap<u64, Vec<(BlockLease, Freed)>>,
    bytes: u64,
    reused: u64,
}

/// Where the region's blocks are ([`Store::blocks`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCounts {
    /// Allocated in the region's bitmap: the three below.
    pub allocated: u64,
    /// Held by frames, grants and sends in flight: back in the region when their last
    /// reference goes.
    pub held: u64,
    /// Freed frames' blocks kept un-zeroed for `dirtyOk` creates (the store's free list;
    /// given back to the region when it runs short).
    pub recycled: u64,
    /// Released, waiting for the scrubber to zero them.
    pub scrubbing: u64,
}

/// The frame a recycled lease held, as it was sealed.
struct Freed {
    stream: String,
    frame: PreviousFrame,
}

impl Recycled {
    /// Blocks for `size` bytes, preferring a frame of `stream` (whose bytes are then named).
    fn take(
        &mut self,
        size: u64,
        block: u64,
        stream: &str,
    ) -> Option<(BlockLease, Option<PreviousFrame>)> {
        let len = size.max(1).div_ceil(block) * block;
        let leases = self.by_len.get_mut(&len)?;
        // The most recently freed frame of this stream, else the most recently freed one.
        let at = leases
            .iter()
            .rposition(|(_, freed)| freed.stream == stream)
            .or_else(|| leases.len().checked_sub(1))?;
        let (lease, freed) = leases.remove(at);
        self.bytes -= lease.len();
        self.reused += 1;
        let previous = (freed.stream == stream).then_some(freed.frame);
        Some((lease, previous))
    }

    fn put(&mut self, lease: BlockLease, freed: Freed, cap: u64) {
        if self.bytes + lease.len() <= cap {
            self.bytes += lease.len();
            self.by_len
                .entry(lease.len())
                .or_default()
                .push((lease, freed));
        }
    }

    /// Keeps the blocks but no longer ties them to `stream` (deleted).
    fn forget(&mut self, stream: &str) {
        for (_, freed) in self.by_len.values_mut().flatten() {
            if freed.stream == stream {
                freed.stream.clear();
            }
        }
    }

    fn clear(&mut self) {
        self.by_len.clear();
        self.bytes = 0;
    }
}

fn err(code: ErrorCode, message: impl Into<String>) -> StoreError {
    StoreError::new(code, message)
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= crate::proto::MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:".contains(&b))
}

/// A random 64-bit token (from the kernel's generator).
fn random_token() -> u64 {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
        Ok(()) => u64::from_le_bytes(bytes),
        // Never reached on Linux; still unpredictable enough to catch a wrong session.
        Err(_) => now_nanos().wrapping_mul(0x9e37_79b9_7f4a_7c15),
    }
}

impl Store {
    /// A store over `region` (empty: no streams).
    pub fn new(region: Region, options: StoreOptions, journal: Option<Journal>) -> Self {
        let geo = region.geometry();
        let stat = StoreStat {
            region_bytes: region.len(),
            block_bytes: region.block_size(),
            blocks_total: geo.block_count,
            ..StoreStat::default()
        };
        Self {
            region,
            options,
            journal,
            streams: HashMap::new(),
            objects: HashMap::new(),
            sessions: HashMap::new(),
            next_object: 1,
            next_session: 1,
            waiting: BTreeSet::new(),
            stat,
            closed: false,
            recycled: Recycled::default(),
        }
    }

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
            cursors: HashMap<String, u64>,
        }
        let mut folded: HashMap<String, Folded> = HashMap::new();
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
                            f.cursors.insert(consumer, next_seq);
                        }
                    }
                }
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
            for (consumer, committed) in f.cursors {
                stream.consumers.insert(
                    consumer,
                    Consumer {
                        durable: true,
                        committed,
                        acked: BTreeSet::new(),
                        attached: None,
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

    /// Sets the RDMA handshake port told to verbs clients in the welcome (0: no verbs).
    pub fn set_verbs_port(&mut self, port: u16) {
        self.options.verbs_port = port;
    }

    /// Sets the data listener's port (told to tcp clients at hello).
    pub fn set_data_port(&mut self, port: u16) {
        self.options.data_port = port;
    }

    /// Ends every session and closes the store. With persistence, every retained frame's
    /// blocks stay allocated in the region file and the journal is compacted to the live
    /// state, so a restart recovers them; without, the blocks are freed. Requests after this
    /// fail with `shuttingDown`. Returns the final counters.
    pub fn close(&mut self) -> StoreStat {
        let now = Instant::now();
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
                    records.push(Record::Cursor {
                        stream: name.clone(),
                        consumer: consumer.clone(),
                        next_seq: c.committed,
                    });
                }
            }
        }
        records
    }

    /// The region.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Store-wide state and counters.
    pub fn stat(&self) -> StoreStat {
        // `blocksInUse` is what live objects (and sends still in flight) hold, so that a
        // frame's blocks are seen back exactly when its last reference goes. Two things would
        // blur that: released blocks stay allocated in the region until its background scrubber
        // has zeroed them — wait for it (bounded: this thread queues no release meanwhile) —
        // and the recycled pool keeps freed frames' blocks for `dirtyOk` creates — they are the
        // store's free list, not held by anything, so they do not count.
        self.region.quiesce();
        self.stat_now()
    }

    /// [`Store::stat`] without waiting for the scrubber: `blocks_in_use` may still count
    /// blocks the scrubber is about to take (for metrics, which must not stall the server).
    pub fn stat_now(&self) -> StoreStat {
        let mut stat = self.stat;
        stat.blocks_in_use = self.blocks().held;
        stat.objects = self.objects.len() as u64;
        stat.sessions = self.sessions.len() as u32;
        stat.streams = self.streams.len() as u32;
        stat.recycled_grants = self.recycled.reused;
        stat
    }

    /// Where the region's blocks are now, without waiting for the scrubber (a gauge for
    /// metrics; [`Store::stat`] waits, so its `blocks_in_use` is exact).
    pub fn blocks(&self) -> BlockCounts {
        let block = self.region.block_size();
        let region = self.region.stats();
        let recycled = self.recycled.bytes / block;
        let scrubbing = region.scrub_pending.div_ceil(block);
        BlockCounts {
            allocated: region.blocks_in_use,
            recycled,
            scrubbing,
            held: region
                .blocks_in_use
                .saturating_sub(recycled)
                .saturating_sub(scrubbing),
        }
    }

    /// Every stream's state, sorted by name.
    pub fn stream_stats(&self) -> Vec<StreamStat> {
        let mut names: Vec<&String> = self.streams.keys().collect();
        names.sort();
        names
            .into_iter()
            .filter_map(|n| self.stream_stat(n))
            .collect()
    }

    /// One stream's state.
    pub fn stream_stat(&self, name: &str) -> Option<StreamStat> {
        let s = self.streams.get(name)?;
        let (unconsumed_frames, _) = s.unconsumed();
        let mut consumers: Vec<ConsumerStat> = s
            .consumers
            .iter()
            .map(|(name, c)| ConsumerStat {
                name: name.clone(),
                durable: c.durable,
                attached: c.attached.is_some(),
                committed: c.committed,
                outstanding: c
                    .attached
                    .and_then(|(sid, sub)| {
                        self.sessions
                            .get(&sid)?
                            .subscriptions
                            .get(&sub)
                            .map(|s| s.outstanding)
                    })
                    .unwrap_or(0),
            })
            .collect();
        consumers.sort_by(|a, b| a.name.cmp(&b.name));
        Some(StreamStat {
            name: name.to_owned(),
            config: s.config,
            first_seq: s.first_seq(),
            next_seq: s.next_seq,
            frames: s.frames.len() as u32,
            bytes: s.frames.iter().map(|f| f.bytes).sum(),
            unconsumed_frames,
            writing: s.writing,
            consumers,
            sealed_total: s.sealed_total,
            dropped_total: s.dropped_total,
            blocked_creates: s.blocked_creates,
            rejected_creates: s.rejected_creates,
        })
    }

    /// Opens a session for a new connection (`local`: a Unix socket, which may use shm).
    pub fn open_session(&mut self, local: bool) -> SessionId {
        let id = self.next_session;
        self.next_session += 1;
        self.sessions.insert(
            id,
            Session {
                transport: None,
                local,
                client: String::new(),
                token: random_token(),
                writing: Vec::new(),
                held: HashMap::new(),
                subscriptions: HashMap::new(),
                next_reference: 1,
                next_subscription: 1,
            },
        );
        id
    }

    /// Whether `token` is the secret of `session`, which said hello with `transport`: what a
    /// tcp client's data connection or a verbs client's RDMA handshake must show.
    pub fn check_token(&self, session: SessionId, token: u64, transport: Transport) -> bool {
        self.sessions
            .get(&session)
            .is_some_and(|s| s.transport == Some(transport) && s.token == token)
    }

    /// The client name a session gave in its hello.
    pub fn client_name(&self, session: SessionId) -> Option<&str> {
        self.sessions.get(&session).map(|s| s.client.as_str())
    }

    /// Handles one request; what to send goes to `out` (nothing yet for a create that waits).
    pub fn handle(
        &mut self,
        session: SessionId,
        request: Request,
        now: Instant,
        out: &mut Vec<Out>,
    ) {
        let id = request.id;
        // The response goes before whatever the request caused (deliveries, other sessions'
        // grants), so a client sees `subscribed` before the subscription's first frame.
        let at = out.len();
        // Id 0 asks for no answer on success (a hello is always answered: its answer is the
        // welcome).
        let quiet = id == 0 && !matches!(request.body, Body::Hello { .. });
        let result = match self.dispatch(session, request, now, out) {
            Ok(None) => return,
            Ok(Some(_)) if quiet => return,
            Ok(Some(reply)) => Ok(reply),
            Err(e) if quiet => {
                self.stat.errors += 1;
                out.insert(at, Out::Message(session, ServerMessage::Notice(e)));
                return;
            }
            Err(e) => {
                self.stat.errors += 1;
                Err(e)
            }
        };
        out.insert(
            at,
            Out::Message(session, ServerMessage::Response(Response { id, result })),
        );
    }

    fn dispatch(
        &mut self,
        session: SessionId,
        request: Request,
        now: Instant,
        out: &mut Vec<Out>,
    ) -> Result<Option<Reply>, StoreError> {
        if self.closed {
            return Err(err(ErrorCode::ShuttingDown, "the store is closed"));
        }
        let Some(s) = self.sessions.get(&session) else {
            return Err(err(ErrorCode::BadRequest, "no such session"));
        };
        let transport = s.transport;
        match (&request.body, transport) {
            (Body::Hello { .. }, None) => {}
            (Body::Hello { .. }, Some(_)) => {
                return Err(err(ErrorCode::BadRequest, "hello was already said"))
            }
            (_, None) => {
                return Err(err(
                    ErrorCode::BadRequest,
                    "the first request must be hello",
                ))
            }
            _ => {}
        }
        match request.body {
            Body::Hello {
                version,
                client,
                transport,
            } => self.hello(session, version, client, transport).map(Some),
            Body::CreateStream {
                name,
                config,
                exist_ok,
            } => self.create_stream(name, config, exist_ok).map(Some),
            Body::DeleteStream(name) => self.delete_stream(&name, out).map(Some),
            Body::Create {
                stream,
                size,
                dirty_ok,
            } => self.create(session, request.id, stream, size, dirty_ok, now),
            body @ Body::Seal { .. } => self.seal(session, request.id, body, out),
            Body::Abort(object) => self.abort(session, object, out).map(Some),
            Body::Subscribe {
                stream,
                consumer,
                from,
                window,
            } => self
                .subscribe(session, stream, consumer, from, window, out)
                .map(Some),
            Body::Unsubscribe(sub) => self.unsubscribe(session, sub, out).map(Some),
            Body::Get { stream, seq } => self.get(session, &stream, seq, out).map(Some),
            Body::Release(reference) => {
                let r = self.release(session, reference, true, out);
                self.after_change(now, out);
                r.map(|()| Some(Reply::Ok))
            }
            Body::ReleaseMany(refs) => {
                let mut first_error = None;
                for reference in refs {
                    if let Err(e) = self.release(session, reference, true, out) {
                        first_error.get_or_insert(e);
                    }
                }
                self.after_change(now, out);
                match first_error {
                    None => Ok(Some(Reply::Ok)),
                    Some(e) => Err(e),
                }
            }
            Body::Stat => Ok(Some(Reply::Stat(self.stat()))),
            Body::Streams => Ok(Some(Reply::Streams(self.stream_stats()))),
            Body::StreamStat(name) => self
                .stream_stat(&name)
                .map(|s| Some(Reply::StreamStat(s)))
                .ok_or_else(|| err(ErrorCode::UnknownStream, format!("no stream {name:?}"))),
        }
    }

    fn hello(
        &mut self,
        session: SessionId,
        version: u32,
        client: String,
        transport: Transport,
    ) -> Result<Reply, StoreError> {
        if version != VERSION {
            return Err(err(
                ErrorCode::Unsupported,
                format!("protocol version {version}; this store speaks {VERSION}"),
            ));
        }
        let s = self
            .sessions
            .get_mut(&session)
            .expect("checked by dispatch");
        if transport == Transport::Shm && !s.local {
            return Err(err(
                ErrorCode::Unsupported,
                "shm needs a local (Unix socket) connection",
            ));
        }
        if transport == Transport::Tcp && self.options.data_port == 0 {
            return Err(err(
                ErrorCode::Unsupported,
                "this store has no data listener for tcp clients (serve --listen-tcp)",
            ));
        }
        if transport == Transport::Verbs && self.options.verbs_port == 0 {
            return Err(err(
                ErrorCode::Unsupported,
                "this store offers no RDMA (serve --verbs)",
            ));
        }
        s.transport = Some(transport);
        s.client = client;
        Ok(Reply::Welcome(Welcome {
            version: VERSION,
            session,
            token: s.token,
            region_id: self.region.id(),
            region_bytes: self.region.len(),
            block_bytes: self.region.block_size(),
            data_port: self.options.data_port,
            checksums: self.options.checksums_required,
            verbs_port: self.options.verbs_port,
        }))
    }

    fn journal(&mut self, record: Record) -> Result<(), StoreError> {
        match &mut self.journal {
            None => Ok(()),
            Some(j) => j
                .append(&record)
                .map_err(|e| err(ErrorCode::Persistence, e.to_string())),
        }
    }

    fn create_stream(
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

    fn delete_stream(&mut self, name: &str, out: &mut Vec<Out>) -> Result<Reply, StoreError> {
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

    fn create(
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
    fn try_create(
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
        let grant = Grant {
            object: id,
            offset: lease.offset(),
            len: lease.len(),
            previous,
        };
        let stream = self.streams.get_mut(stream_name).expect("exists");
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

    fn seal(
        &mut self,
        session: SessionId,
        request: u64,
        body: Body,
        out: &mut Vec<Out>,
    ) -> Result<Option<Reply>, StoreError> {
        let Body::Seal {
            object,
            offset,
            len,
            checksum,
        } = body
        else {
            unreachable!("dispatch passes seals only")
        };
        let obj = self.owned_writing(session, object)?;
        let lease_offset = obj.lease.offset();
        let lease_len = obj.lease.len();
        if offset < lease_offset
            || len < 8
            || offset
                .checked_add(len)
                .is_none_or(|end| end > lease_offset + lease_len)
        {
            return Err(err(
                ErrorCode::OutOfGrant,
                format!(
                    "seal of {len} bytes at {offset}: the grant is {lease_len} bytes at {lease_offset}"
                ),
            ));
        }
        if let State::Writing {
            landed_end,
            pending_seal,
            putting,
            ..
        } = &mut obj.state
        {
            if *putting || offset + len > lease_offset + *landed_end {
                // A tcp seal that overtook its bytes: answered when they land.
                if pending_seal.is_some() {
                    return Err(err(
                        ErrorCode::BadRequest,
                        "object already has a seal pending",
                    ));
                }
                *pending_seal = Some((request, body));
                return Ok(None);
            }
        }
        self.finish_seal(session, object, offset, len, checksum, out)
            .map(|seq| Some(Reply::Sealed(seq)))
    }

    fn owned_writing(
        &mut self,
        session: SessionId,
        object: u64,
    ) -> Result<&mut Object, StoreError> {
        match self.objects.get_mut(&object) {
            Some(o) => match &o.state {
                State::Writing { session: owner, .. } if *owner == session => Ok(o),
                State::Writing { .. } => Err(err(
                    ErrorCode::UnknownObject,
                    format!("object {object} is not this client's"),
                )),
                State::Sealed { .. } => Err(err(
                    ErrorCode::NotWritable,
                    format!("object {object} is already sealed"),
                )),
            },
            None => Err(err(
                ErrorCode::UnknownObject,
                format!("no object {object} (never granted, aborted, or freed)"),
            )),
        }
    }

    fn finish_seal(
        &mut self,
        session: SessionId,
        object: u64,
        offset: u64,
        len: u64,
        checksum: Option<u32>,
        out: &mut Vec<Out>,
    ) -> Result<u64, StoreError> {
        let obj = self.objects.get(&object).expect("checked by the caller");
        let stream_name = obj.stream.clone();
        let Some(stream) = self.streams.get(&stream_name) else {
            return Err(err(
                ErrorCode::UnknownStream,
                format!("stream {stream_name:?} was deleted"),
            ));
        };
        // SAFETY: the range lies in the object's grant (checked by `seal`), whose blocks this
        // store owns; its writer has asked to seal, so it no longer writes them (a client that
        // still did would only corrupt its own frame, which the framing and checksum checks
        // and the consumers' bounds-checked reader then see).
        let bytes = unsafe { self.region.bytes(offset, len) }
            .map_err(|e| err(ErrorCode::OutOfGrant, e.to_string()))?;
        match SegmentTable::parse(bytes, 512) {
            Ok(table) if table.message_bytes() == len => {}
            Ok(table) => {
                return Err(err(
                    ErrorCode::BadFrame,
                    format!(
                        "the segment table describes {} bytes, the seal {len}",
                        table.message_bytes()
                    ),
                ))
            }
            Err(e) => return Err(err(ErrorCode::BadFrame, e.to_string())),
        }
        if checksum.is_none() && (stream.config.checksums || self.options.checksums_required) {
            return Err(err(
                ErrorCode::ChecksumRequired,
                "this stream (or store) needs a CRC-32C with every seal",
            ));
        }
        if let (Some(expected), true) = (checksum, self.options.verify_checksums) {
            let actual = journal::frame_crc(bytes);
            if actual != expected {
                return Err(err(
                    ErrorCode::ChecksumMismatch,
                    format!("seal says CRC-32C {expected:#010x}, the bytes have {actual:#010x}"),
                ));
            }
        }
        let seq = stream.next_seq;
        let sealed_nanos = now_nanos();
        let lease = &self.objects[&object].lease;
        self.journal(Record::Sealed {
            stream: stream_name.clone(),
            seq,
            lease_offset: lease.offset(),
            lease_len: lease.len(),
            data_offset: offset,
            data_len: len,
            crc32c: checksum.unwrap_or(0),
            unix_nanos: sealed_nanos,
        })?;
        let obj = self.objects.get_mut(&object).expect("exists");
        obj.state = State::Sealed {
            seq,
            offset,
            len,
            checksum,
            sealed_nanos,
        };
        let bytes = obj.lease.len();
        if let Some(s) = self.sessions.get_mut(&session) {
            s.writing.retain(|&o| o != object);
        }
        let stream = self.streams.get_mut(&stream_name).expect("exists");
        stream.writing -= 1;
        stream.writing_bytes -= bytes;
        stream.next_seq += 1;
        stream.sealed_total += 1;
        stream.frames.push_back(Frame { seq, object, bytes });
        self.stat.seals += 1;
        self.pump(&stream_name, out);
        self.trim(&stream_name);
        Ok(seq)
    }

    /// Starts a tcp session's write of `len` bytes at `at` (from the grant's start) of
    /// `object`: checked against the grant before a byte is read. Returns the region offset to
    /// write at and the lease to hold while writing. A seal waits until [`Store::end_put`].
    pub fn begin_put(
        &mut self,
        session: SessionId,
        object: u64,
        at: u64,
        len: u64,
    ) -> Result<(u64, Arc<BlockLease>), StoreError> {
        let obj = self
            .objects
            .get_mut(&object)
            .ok_or_else(|| err(ErrorCode::UnknownObject, format!("no object {object}")))?;
        let grant = obj.lease.len();
        match &mut obj.state {
            State::Writing {
                session: owner,
                putting,
                landed_end,
                ..
            } if *owner == session => {
                if at.checked_add(len).is_none_or(|end| end > grant) {
                    return Err(err(
                        ErrorCode::OutOfGrant,
                        format!("write of {len} bytes at {at}: the grant is {grant} bytes"),
                    ));
                }
                // Writes fill the grant from its start without gaps, so everything below
                // `landed_end` was written by this client: a grant of reused blocks never
                // seals a stale byte.
                if at > *landed_end {
                    return Err(err(
                        ErrorCode::OutOfGrant,
                        format!(
                            "write at {at}: writes fill a grant from its start without gaps, \
                             and the bytes written so far end at {landed_end}"
                        ),
                    ));
                }
                *putting = true;
            }
            State::Writing { .. } => {
                return Err(err(ErrorCode::UnknownObject, "not this client's object"))
            }
            State::Sealed { .. } => {
                return Err(err(ErrorCode::NotWritable, "object already sealed"))
            }
        }
        Ok((obj.lease.offset() + at, Arc::clone(&obj.lease)))
    }

    /// Ends a write begun with [`Store::begin_put`]: `landed` is the end (from the grant's
    /// start) of the bytes it wrote, `None` if it failed. Answers a seal that was waiting.
    pub fn end_put(
        &mut self,
        session: SessionId,
        object: u64,
        landed: Option<u64>,
        out: &mut Vec<Out>,
    ) {
        let Some(obj) = self.objects.get_mut(&object) else {
            return;
        };
        let lease_offset = obj.lease.offset();
        let State::Writing {
            session: owner,
            landed_end,
            putting,
            pending_seal,
        } = &mut obj.state
        else {
            return;
        };
        if *owner != session {
            return;
        }
        *putting = false;
        if let Some(end) = landed {
            *landed_end = (*landed_end).max(end);
        }
        let ready = matches!(pending_seal, Some((_, Body::Seal { offset, len, .. }))
            if *offset + *len <= lease_offset + *landed_end);
        if !ready {
            return;
        }
        let Some((
            request,
            Body::Seal {
                offset,
                len,
                checksum,
                ..
            },
        )) = pending_seal.take()
        else {
            return;
        };
        let result = self
            .finish_seal(session, object, offset, len, checksum, out)
            .map(Reply::Sealed);
        if result.is_err() {
            self.stat.errors += 1;
        }
        out.push(Out::Message(
            session,
            ServerMessage::Response(Response {
                id: request,
                result,
            }),
        ));
    }

    /// A tcp session's data connection failed: seals waiting for bytes fail.
    pub fn data_failed(&mut self, session: SessionId, why: &str, out: &mut Vec<Out>) {
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        for object in s.writing.clone() {
            if let Some(Object {
                state: State::Writing { pending_seal, .. },
                ..
            }) = self.objects.get_mut(&object)
            {
                if let Some((request, _)) = pending_seal.take() {
                    self.stat.errors += 1;
                    out.push(respond_err(
                        session,
                        request,
                        err(ErrorCode::DataNotLanded, format!("data connection: {why}")),
                    ));
                }
            }
        }
    }

    fn abort(
        &mut self,
        session: SessionId,
        object: u64,
        out: &mut Vec<Out>,
    ) -> Result<Reply, StoreError> {
        self.owned_writing(session, object)?;
        self.drop_writing(session, object, out);
        Ok(Reply::Ok)
    }

    fn drop_writing(&mut self, session: SessionId, object: u64, out: &mut Vec<Out>) {
        let Some(obj) = self.objects.get_mut(&object) else {
            return;
        };
        if let State::Writing { pending_seal, .. } = &mut obj.state {
            if let Some((request, _)) = pending_seal.take() {
                self.stat.errors += 1;
                out.push(respond_err(
                    session,
                    request,
                    err(ErrorCode::NotWritable, "aborted"),
                ));
            }
        }
        let obj = &self.objects[&object];
        let (stream_name, bytes) = (obj.stream.clone(), obj.lease.len());
        if let Some(stream) = self.streams.get_mut(&stream_name) {
            stream.writing -= 1;
            stream.writing_bytes -= bytes;
        }
        if let Some(s) = self.sessions.get_mut(&session) {
            s.writing.retain(|&o| o != object);
        }
        self.stat.aborted_writes += 1;
        self.unref(object);
    }

    fn subscribe(
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
            },
        );
        if durable {
            self.journal(Record::Cursor {
                stream: stream_name.clone(),
                consumer: name,
                next_seq: from_seq,
            })?;
        }
        self.pump(&stream_name, out);
        Ok(Reply::Subscribed(Subscribed {
            subscription: sub,
            from_seq,
        }))
    }

    fn unsubscribe(
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
    fn end_subscription(
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

    fn get(
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
    fn release(
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

    /// Drops one reference of `object`; the last one frees its blocks. (A frame's `Freed`
    /// record was appended when it left its stream, before this can happen.)
    fn unref(&mut self, object: u64) {
        let Some(obj) = self.objects.get_mut(&object) else {
            return;
        };
        obj.refs -= 1;
        if obj.refs > 0 {
            return;
        }
        // The lease goes; a server task still sending the bytes holds its own clone. Blocks of
        // a frame nobody else holds are kept for the next `dirtyOk` create of that size.
        let obj = self.objects.remove(&object).expect("present");
        if let (
            Ok(lease),
            State::Sealed {
                seq, offset, len, ..
            },
        ) = (Arc::try_unwrap(obj.lease), obj.state)
        {
            let freed = Freed {
                stream: obj.stream,
                frame: PreviousFrame { seq, offset, len },
            };
            self.recycled.put(lease, freed, self.region.len() / 4);
        }
    }

    /// Hands each attached consumer of the stream the frames its window allows.
    fn pump(&mut self, stream_name: &str, out: &mut Vec<Out>) {
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
                    let next = stream.next_seq;
                    let s = self.sessions.get_mut(&session).expect("present");
                    let subscription = s.subscriptions.get_mut(&sub).expect("present");
                    subscription.next = subscription.next.max(next);
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

    /// Frees consumed frames beyond the stream's retention.
    fn trim(&mut self, stream_name: &str) {
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

    /// Retries waiting creates after something changed (references released, frames freed).
    fn after_change(&mut self, now: Instant, out: &mut Vec<Out>) {
        let names: Vec<String> = self.waiting.iter().cloned().collect();
        for name in names {
            loop {
                let Some(stream) = self.streams.get_mut(&name) else {
                    self.waiting.remove(&name);
                    break;
                };
                let Some(parked) = stream.parked.pop_front() else {
                    self.waiting.remove(&name);
                    break;
                };
                if parked.deadline <= now {
                    self.time_out(&name, parked, out);
                    continue;
                }
                if !self.sessions.contains_key(&parked.session) {
                    continue;
                }
                match self.try_create(parked.session, &name, parked.size, parked.dirty_ok) {
                    Ok(grant) => out.push(Out::Message(
                        parked.session,
                        ServerMessage::Response(Response {
                            id: parked.request,
                            result: Ok(Reply::Granted(grant)),
                        }),
                    )),
                    Err(e) if matches!(e.code, ErrorCode::StreamFull | ErrorCode::RegionFull) => {
                        self.streams
                            .get_mut(&name)
                            .expect("exists")
                            .parked
                            .push_front(parked);
                        break;
                    }
                    Err(e) => {
                        self.stat.errors += 1;
                        out.push(respond_err(parked.session, parked.request, e));
                    }
                }
            }
        }
    }

    fn time_out(&mut self, name: &str, parked: Parked, out: &mut Vec<Out>) {
        self.stat.errors += 1;
        if let Some(stream) = self.streams.get_mut(name) {
            stream.rejected_creates += 1;
        }
        out.push(respond_err(
            parked.session,
            parked.request,
            err(
                ErrorCode::Timeout,
                format!("stream {name:?} stayed full for the whole block timeout"),
            ),
        ));
    }

    /// Answers waiting creates whose deadline has passed (and retries the others).
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Out>) {
        self.after_change(now, out);
        let names: Vec<String> = self.waiting.iter().cloned().collect();
        for name in names {
            let Some(stream) = self.streams.get_mut(&name) else {
                continue;
            };
            let (expired, kept): (Vec<Parked>, Vec<Parked>) =
                stream.parked.drain(..).partition(|p| p.deadline <= now);
            stream.parked = kept.into();
            if stream.parked.is_empty() {
                self.waiting.remove(&name);
            }
            for parked in expired {
                self.time_out(&name, parked, out);
            }
        }
    }

    /// The earliest deadline of a waiting create.
    pub fn next_deadline(&self) -> Option<Instant> {
        // Creates waiting for region space are retried often: the scrubber frees blocks
        // without telling the store.
        if !self.waiting.is_empty() {
            let soon = Instant::now() + Duration::from_millis(2);
            return Some(
                self.waiting
                    .iter()
                    .filter_map(|n| self.streams.get(n))
                    .flat_map(|s| s.parked.iter().map(|p| p.deadline))
                    .min()
                    .map_or(soon, |d| d.min(soon)),
            );
        }
        self.waiting
            .iter()
            .filter_map(|n| self.streams.get(n))
            .flat_map(|s| s.parked.iter().map(|p| p.deadline))
            .min()
    }

    /// A connection ended: everything its session held is dropped, its grants that were
    /// never sealed are freed, its subscriptions detach.
    pub fn disconnect(&mut self, session: SessionId, now: Instant, out: &mut Vec<Out>) {
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        let subs: Vec<u32> = s.subscriptions.keys().copied().collect();
        let writing = s.writing.clone();
        for sub in subs {
            self.end_subscription(session, sub, false, out);
        }
        let held: Vec<u64> = self.sessions[&session].held.keys().copied().collect();
        for reference in held {
            let _ = self.release(session, reference, false, out);
        }
        for object in writing {
            self.drop_writing(session, object, out);
        }
        for stream in self.streams.values_mut() {
            stream.parked.retain(|p| p.session != session);
        }
        self.sessions.remove(&session);
        // Messages for the session that just left are pointless.
        out.retain(|o| match o {
            Out::Message(s, _) | Out::Data(s, _, _) => *s != session,
        });
        self.after_change(now, out);
    }
}

fn respond_err(session: SessionId, request: u64, e: StoreError) -> Out {
    Out::Message(
        session,
        ServerMessage::Response(Response {
            id: request,
            result: Err(e),
        }),
    )
}
