@0xd3a1c5e7f2b40619;
# The staging-store control protocol.
#
# A client talks to the store over one control connection (a Unix socket on the same host, TCP
# otherwise). Each direction is a sequence of Cap'n Proto messages in standard stream framing:
# the client sends `Request`s, the store sends `ServerMessage`s. Requests carry an id chosen by
# the client and are answered in order of arrival, except that a `create` on a full stream whose
# policy is `block` is answered when room appears (or its deadline passes); clients may keep
# many requests in flight. Frame bytes never travel on this connection:
#
# - shm clients (same host): the store's `Welcome` carries the region's memfd (SCM_RIGHTS);
#   producers write into their grant and consumers read deliveries in place.
# - tcp clients: a second TCP connection (the data connection, see `staging_store::data`)
#   carries each grant's bytes to the store and each delivery's bytes to the consumer.

enum Transport {
  shm @0;
  tcp @1;
  # Remote, both hosts with an RDMA device: the client moves bytes itself with one-sided RDMA
  # WRITE (into its grant) and READ (from its deliveries) on an RC connection to the store's
  # registered region. Trusted peers only: the connection can reach the whole region.
  verbs @2;
}

enum FullPolicy {
  # The producer's create waits (up to `blockTimeoutMs`) until consumers release frames.
  block @0;
  # The producer's create fails at once with `streamFull`.
  reject @1;
  # The oldest unconsumed frame leaves the stream to make room (consumers skip it). Only for
  # streams that are configured to allow losing frames.
  dropOldest @2;
}

struct StreamConfig {
  # Most frames sealed (or being written) that some consumer has not released yet. 0: 64.
  maxFrames @0 :UInt32;
  # Most bytes of such frames. 0: no limit but the region.
  maxBytes @1 :UInt64;
  # Frames every consumer has released that stay readable for replay and `get`.
  retainFrames @2 :UInt32;
  onFull @3 :FullPolicy;
  # How long a blocked create waits. 0: 1000 ms.
  blockTimeoutMs @4 :UInt32;
  # Every seal must carry a CRC-32C of the frame's bytes.
  checksums @5 :Bool;
  # Largest create, in bytes. 0: no limit but the region.
  maxFrameBytes @6 :UInt64;
}

struct Request {
  # Echoed in the response. 0: the client wants no answer when the request succeeds (a
  # failure still comes back, as a notice), e.g. releases it does not wait for. A hello is
  # always answered.
  id @0 :UInt64;
  union {
    hello @1 :Hello;
    createStream @2 :CreateStream;
    deleteStream @3 :Text;
    # A writable grant of at least `size` bytes for the next frame of `stream`.
    create @4 :Create;
    # Makes an object's bytes `[offset, offset + len)` of its grant readable as the stream's
    # next frame. They must be one Cap'n Proto message in stream framing.
    seal @5 :Seal;
    # Gives up a grant that was never sealed.
    abort @6 :UInt64;
    subscribe @7 :Subscribe;
    unsubscribe @8 :UInt32;
    # One sealed frame, held until released.
    get @9 :Get;
    # Drops the reference of a delivery or a get. For a subscription, also acknowledges the
    # frame: a durable consumer's cursor moves past it.
    release @10 :UInt64;
    stat @11 :Void;
    streams @12 :Void;
    streamStat @13 :Text;
    # Several references at once (same semantics as `release` for each).
    releaseMany @14 :List(UInt64);
    # Ends a stream after its last sealed frame: no frame can be created or sealed in it any
    # more, and every consumer (also one that subscribes later) gets every frame, then an
    # `ended` with code `endOfStream`. Ending an ended stream succeeds.
    endStream @15 :Text;
    # Releases (and acknowledges) references of one durable subscription and records the
    # consumer's state with its cursor, in one operation: a sink's output position travels with
    # the frames it wrote.
    commit @16 :Commit;
  }
}

struct Hello {
  # Protocol version: 1.
  version @0 :UInt32;
  # Free-form client name, for logs and stats.
  client @1 :Text;
  transport @2 :Transport;
}

struct CreateStream {
  name @0 :Text;
  config @1 :StreamConfig;
  # Succeed if the stream already exists (with any configuration).
  existOk @2 :Bool;
}

struct Create {
  stream @0 :Text;
  size @1 :UInt64;
  # The client overwrites every byte it seals, so the grant need not be zeroed: the store may
  # hand it blocks of a frame it just freed (skipping a zeroing pass). A tcp client's PUTs fill
  # a grant from its start without gaps, so no stale byte is ever sealed.
  dirtyOk @2 :Bool;
}

struct Seal {
  object @0 :UInt64;
  # Offset of the frame's first byte in the region (inside the object's grant).
  offset @1 :UInt64;
  len @2 :UInt64;
  hasChecksum @3 :Bool;
  checksum @4 :UInt32;
  # References released (and acknowledged) in the same operation as the seal: a filter's
  # output frame and the input it came from commit together. Checked before anything
  # happens: if one is not this session's, nothing is sealed or released.
  releases @5 :List(UInt64);
}

struct Commit {
  subscription @0 :UInt32;
  # References of that subscription to release (may be empty: only the state changes).
  references @1 :List(UInt64);
  # The consumer's state (at most 4096 bytes), returned by `subscribed` when it resumes.
  state @2 :Data;
}

struct Cursor {
  union {
    # A durable consumer's saved position (the oldest retained frame for a new consumer).
    resume @0 :Void;
    oldest @1 :Void;
    # Only frames sealed from now on.
    latest @2 :Void;
    seq @3 :UInt64;
  }
}

struct Subscribe {
  stream @0 :Text;
  # A named consumer is durable: its cursor survives disconnects (and store restarts with
  # persistence), and frames it has not released hold the stream's backpressure. An empty name
  # is an anonymous consumer that ends with its subscription.
  consumer @1 :Text;
  from @2 :Cursor;
  # Most deliveries held (not released) at once. 0: 4.
  window @3 :UInt32;
}

struct Get {
  stream @0 :Text;
  # The newest sealed frame when `latest`, else frame `seq`.
  latest @1 :Bool;
  seq @2 :UInt64;
}

enum ErrorCode {
  badRequest @0;
  unknownStream @1;
  unknownObject @2;
  unknownReference @3;
  streamExists @4;
  streamFull @5;
  timeout @6;
  tooLarge @7;
  regionFull @8;
  notWritable @9;
  outOfGrant @10;
  badFrame @11;
  checksumMismatch @12;
  checksumRequired @13;
  frameGone @14;
  consumerBusy @15;
  unsupported @16;
  shuttingDown @17;
  protocol @18;
  dataNotLanded @19;
  # The store could not record the operation durably (persistence directory).
  persistence @20;
  # The stream has ended: a subscription's last message, or a create/seal after the end.
  endOfStream @21;
}

struct Error {
  code @0 :ErrorCode;
  message @1 :Text;
}

struct Welcome {
  version @0 :UInt32;
  session @1 :UInt64;
  # For the data connection of a tcp client: proves it belongs to this session.
  token @2 :UInt64;
  regionId @3 :UInt64;
  regionBytes @4 :UInt64;
  blockBytes @5 :UInt64;
  # TCP port of the data listener (tcp clients).
  dataPort @6 :UInt16;
  # Seals must carry checksums (the store persists frames).
  checksums @7 :Bool;
  # TCP port of the RDMA (RC) handshake listener (verbs clients).
  verbsPort @8 :UInt16;
}

struct Grant {
  object @0 :UInt64;
  offset @1 :UInt64;
  len @2 :UInt64;
  # Set when a `dirtyOk` grant of a shm client reuses the blocks of a frame of the same stream
  # that has since been freed, and those blocks still hold that frame's bytes exactly as they
  # were sealed ("buffer age"): a producer that knows what it wrote into frame `previousSeq`
  # may repaint only what changed since, instead of every byte.
  hasPrevious @3 :Bool;
  previousSeq @4 :UInt64;
  # Region offset and length of that frame's bytes.
  previousOffset @5 :UInt64;
  previousLen @6 :UInt64;
  # The stream's id (a stable hash of its name) and the sequence number this frame gets if
  # the stream's grants are sealed in the order they were granted (one producer): what the
  # producer writes into the frame's own bytes.
  streamId @7 :UInt64;
  seq @8 :UInt64;
}

struct Delivery {
  # Release this reference when done with the frame.
  reference @0 :UInt64;
  # 0 for a `get`.
  subscription @1 :UInt32;
  seq @2 :UInt64;
  offset @3 :UInt64;
  len @4 :UInt64;
  hasChecksum @5 :Bool;
  checksum @6 :UInt32;
  # When the frame was sealed (Unix time, ns).
  sealedNanos @7 :UInt64;
}

struct Subscribed {
  subscription @0 :UInt32;
  # The first frame that will be delivered.
  fromSeq @1 :UInt64;
  # The durable consumer's state as last committed (empty if never).
  state @2 :Data;
}

struct StreamStat {
  name @0 :Text;
  config @1 :StreamConfig;
  # The oldest retained frame and one past the newest.
  firstSeq @2 :UInt64;
  nextSeq @3 :UInt64;
  frames @4 :UInt32;
  bytes @5 :UInt64;
  unconsumedFrames @6 :UInt32;
  writing @7 :UInt32;
  consumers @8 :List(ConsumerStat);
  sealedTotal @9 :UInt64;
  droppedTotal @10 :UInt64;
  blockedCreates @11 :UInt64;
  rejectedCreates @12 :UInt64;
  # Its producer ended it (`endStream`).
  ended @13 :Bool;
  # Its id, as in grants.
  id @14 :UInt64;
}

struct ConsumerStat {
  name @0 :Text;
  durable @1 :Bool;
  attached @2 :Bool;
  # Every frame before this one has been released.
  committed @3 :UInt64;
  outstanding @4 :UInt32;
}

struct StoreStat {
  regionBytes @0 :UInt64;
  blockBytes @1 :UInt64;
  blocksTotal @2 :UInt64;
  blocksInUse @3 :UInt64;
  objects @4 :UInt64;
  sessions @5 :UInt32;
  streams @6 :UInt32;
  # Counters since the store started.
  creates @7 :UInt64;
  seals @8 :UInt64;
  gets @9 :UInt64;
  deliveries @10 :UInt64;
  releases @11 :UInt64;
  reclaimedReferences @12 :UInt64;
  abortedWrites @13 :UInt64;
  errors @14 :UInt64;
  recoveredFrames @15 :UInt64;
  corruptFrames @16 :UInt64;
  # Grants served from a freed frame's blocks without zeroing (`dirtyOk` creates).
  recycledGrants @17 :UInt64;
}

struct Response {
  id @0 :UInt64;
  union {
    error @1 :Error;
    ok @2 :Void;
    welcome @3 :Welcome;
    granted @4 :Grant;
    sealed @5 :UInt64;
    subscribed @6 :Subscribed;
    got @7 :Delivery;
    stat @8 :StoreStat;
    streams @9 :List(StreamStat);
    streamStat @10 :StreamStat;
  }
}

struct ServerMessage {
  union {
    response @0 :Response;
    # A frame for a subscription of an shm client (tcp clients get theirs on the data
    # connection).
    delivery @1 :Delivery;
    # A subscription ended without being asked to (its stream was deleted).
    ended @2 :Ended;
    # Something went wrong outside any request (e.g. on the data connection).
    notice @3 :Error;
  }
}

struct Ended {
  subscription @0 :UInt32;
  reason @1 :Error;
  # Frames the subscription was delivered in all. A tcp client's frames travel on its data
  # connection, so some may arrive after this message: the subscription ends once it has them.
  delivered @2 :UInt64;
}
