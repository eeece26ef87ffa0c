//! The store's state machine: streams, objects, references and sessions. No I/O: the server
//! feeds it requests and events and sends what it returns.
//!
//! Time comes in as a parameter: `now: Instant` for waits and deadlines, `wall: SystemTime`
//! for the time of day a seal stamps on its frame.
//!
//! Each file of this folder is one part of the state machine (all of them `impl Store`):
//!
//! - `mod.rs`: the [`Store`] itself, its options and what it sends ([`Out`]), and
//!   [`Store::handle`], which dispatches each request to the files below.
//! - `sessions.rs`: connections — hello, tokens, and what a disconnect drops.
//! - `streams.rs`: streams and their consumers' cursors — create, delete, retention.
//! - `backpressure.rs`: creates — a grant now, a wait, a refusal, or the oldest frames dropped.
//! - `deadlines.rs`: waiting creates — retried when room appears, answered at their deadline.
//! - `objects.rs`: an object's life — writing, tcp PUTs, seal, abort, the last reference.
//! - `recycled.rs`: freed frames' blocks kept for `dirtyOk` creates, and [`BlockCounts`].
//! - `subscriptions.rs`: deliveries and gets — subscribe, window, release.
//! - `recovery.rs`: persistence — recover from the journal, snapshot, close.
//! - `stats.rs`: counters and per-stream state for `stat` and metrics.
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
//!
//! [`FullPolicy::Block`]: crate::proto::FullPolicy::Block
//! [`FullPolicy::Reject`]: crate::proto::FullPolicy::Reject
//! [`FullPolicy::DropOldest`]: crate::proto::FullPolicy::DropOldest

use crate::journal::{Journal, Record};
use crate::proto::{
    Body, Delivery, ErrorCode, Reply, Request, Response, ServerMessage, StoreError, StoreStat,
};
use capnp_rdma::{BlockLease, Region};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

mod backpressure;
mod deadlines;
mod objects;
mod recovery;
mod recycled;
mod sessions;
mod stats;
mod streams;
mod subscriptions;

pub use recovery::{RecoverError, RecoveryReport};
pub use recycled::BlockCounts;

use objects::Object;
use recycled::Recycled;
use sessions::Session;
use streams::Stream;

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
    /// While one operation's records are gathered into a [`Record::Group`] (see
    /// [`Store::grouped`]).
    group: Option<Vec<Record>>,
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
            group: None,
        }
    }

    /// Sets the RDMA handshake port told to verbs clients in the welcome (0: no verbs).
    pub fn set_verbs_port(&mut self, port: u16) {
        self.options.verbs_port = port;
    }

    /// Sets the data listener's port (told to tcp clients at hello).
    pub fn set_data_port(&mut self, port: u16) {
        self.options.data_port = port;
    }

    /// The region.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Handles one request; what to send goes to `out` (nothing yet for a create that waits).
    /// `now` times waits (a create's block timeout); `wall` is the time of day a seal stamps
    /// on its frame.
    pub fn handle(
        &mut self,
        session: SessionId,
        request: Request,
        now: Instant,
        wall: SystemTime,
        out: &mut Vec<Out>,
    ) {
        let id = request.id;
        // The response goes before whatever the request caused (deliveries, other sessions'
        // grants), so a client sees `subscribed` before the subscription's first frame.
        let at = out.len();
        // Id 0 asks for no answer on success (a hello is always answered: its answer is the
        // welcome).
        let quiet = id == 0 && !matches!(request.body, Body::Hello { .. });
        let result = match self.dispatch(session, request, now, wall, out) {
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
        wall: SystemTime,
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
            body @ Body::Seal { .. } => self.seal(session, request.id, body, wall, out),
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
            Body::EndStream(name) => self.end_stream(&name, out).map(Some),
            Body::Commit {
                subscription,
                references,
                state,
            } => {
                let r = self.commit(session, subscription, references, state, out);
                self.after_change(now, out);
                r.map(Some)
            }
        }
    }

    /// Runs `operation` with its journal records gathered into one [`Record::Group`], appended
    /// at its end: on disk, all of them or none. `Freed` records are appended after the group
    /// (a frame's blocks are only reused by a later operation, and a `Freed` alone must never
    /// survive a crash that loses the releases which allowed it).
    ///
    /// The operation's own checks come first and fail before anything changes; if the group
    /// cannot be appended (the disk failed), what the operation did stands in memory and the
    /// caller gets the `persistence` error: the store keeps serving, and only that operation's
    /// durability is lost.
    fn grouped<T>(
        &mut self,
        operation: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.group = Some(Vec::new());
        let result = operation(self);
        let records = self.group.take().unwrap_or_default();
        let (freed, mut records): (Vec<Record>, Vec<Record>) = records
            .into_iter()
            .partition(|r| matches!(r, Record::Freed { .. }));
        // Only the last position of each consumer matters.
        let mut seen = std::collections::HashSet::new();
        records.reverse();
        records.retain(|r| match r {
            Record::Cursor {
                stream, consumer, ..
            }
            | Record::ConsumerState {
                stream, consumer, ..
            } => seen.insert((stream.clone(), consumer.clone())),
            _ => true,
        });
        records.reverse();
        let mut appended = Ok(());
        match records.len() {
            0 => {}
            1 => appended = self.append(&records[0]),
            _ => {
                for chunk in records.chunks(crate::journal::MAX_GROUP_RECORDS) {
                    let r = self.append(&Record::Group(chunk.to_vec()));
                    appended = appended.and(r);
                }
            }
        }
        for record in &freed {
            let r = self.append(record);
            appended = appended.and(r);
        }
        let value = result?;
        appended.map(|()| value)
    }

    fn append(&mut self, record: &Record) -> Result<(), StoreError> {
        match &mut self.journal {
            None => Ok(()),
            Some(j) => j
                .append(record)
                .map_err(|e| err(ErrorCode::Persistence, e.to_string())),
        }
    }

    fn journal(&mut self, record: Record) -> Result<(), StoreError> {
        if self.journal.is_some() {
            if let Some(group) = &mut self.group {
                group.push(record);
                return Ok(());
            }
        }
        self.append(&record)
    }
}

fn err(code: ErrorCode, message: impl Into<String>) -> StoreError {
    StoreError::new(code, message)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= crate::proto::MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:".contains(&b))
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

/// `wall` as nanoseconds since the Unix epoch (0 before it).
fn unix_nanos(wall: SystemTime) -> u64 {
    wall.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
