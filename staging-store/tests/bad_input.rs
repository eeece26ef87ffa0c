//! Clients that get things wrong, by mistake or on purpose: every mistake is a typed error
//! (or a notice, or the end of that one connection), and nobody else notices.

mod common;

use common::{connect, failed, framed, memory_store, producer_of, stamp, start, subscribe, within};
use staging_store::client::Client;
use staging_store::proto::{
    self, decode_server_message, encode_request, Body, Cursor, ErrorCode, FullPolicy, Grant,
    MessageBuf, Reply, Request, Response, ServerMessage, StoreError, StreamConfig, Transport,
};
use staging_store::store::{Store, StoreOptions};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// Keeps a few consumed frames, so gets find them after their consumers are done.
const RETAIN: StreamConfig = StreamConfig {
    max_frames: 0,
    max_bytes: 0,
    retain_frames: 4,
    on_full: FullPolicy::Block,
    block_timeout_ms: 0,
    checksums: false,
    max_frame_bytes: 0,
};

trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

/// A control connection driven by hand (blocking, every read with a deadline).
struct Raw {
    sock: Box<dyn ReadWrite>,
    buf: MessageBuf,
}

impl Raw {
    fn unix(path: &std::path::Path) -> Self {
        let s = std::os::unix::net::UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Self::new(Box::new(s))
    }

    fn tcp(addr: std::net::SocketAddr) -> Self {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Self::new(Box::new(s))
    }

    fn new(sock: Box<dyn ReadWrite>) -> Self {
        Self {
            sock,
            buf: MessageBuf::new(proto::MAX_SERVER_MESSAGE_BYTES),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).unwrap();
    }

    fn request(&mut self, id: u64, body: Body) {
        let mut bytes = Vec::new();
        encode_request(&Request { id, body }, &mut bytes);
        self.send(&bytes);
    }

    /// The next message from the store, `None` once it closed the connection.
    fn recv(&mut self) -> Option<ServerMessage> {
        loop {
            if let Some(m) = self.buf.next_message() {
                return Some(decode_server_message(m.unwrap()).unwrap());
            }
            match self.sock.read(self.buf.spare()) {
                Ok(0) => return None,
                Ok(n) => self.buf.filled(n),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("reading from the store: {e} (it did not answer in 5 s?)"),
            }
        }
    }

    fn response(&mut self, id: u64) -> Result<Reply, StoreError> {
        match self.recv() {
            Some(ServerMessage::Response(Response { id: got, result })) => {
                assert_eq!(got, id);
                result
            }
            other => panic!("expected the response to {id}, got {other:?}"),
        }
    }

    /// The store sends a `protocol` notice and closes the connection.
    fn expect_protocol_close(&mut self) -> String {
        let message = match self.recv() {
            Some(ServerMessage::Notice(StoreError {
                code: ErrorCode::Protocol,
                message,
            })) => message,
            other => panic!("expected a protocol notice, got {other:?}"),
        };
        assert!(self.recv().is_none(), "the store must close the connection");
        message
    }
}

fn hello(transport: Transport) -> Body {
    Body::Hello {
        version: proto::VERSION,
        client: "raw".into(),
        transport,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_objects_references_streams_and_names() {
    let store = start("bad-unknown", || memory_store(16 << 20));
    let c = connect(&store.unix(), "c").await;
    let other = connect(&store.unix(), "other").await;
    c.create_stream("s", RETAIN, false).await.unwrap();
    let frame = framed(64, 32, 0);
    let len = frame.len() as u64;

    // Objects nobody granted.
    let seal = |object| Body::Seal {
        object,
        offset: 0,
        len: 8,
        checksum: None,
        releases: Vec::new(),
    };
    assert_eq!(failed(c.call(seal(999)).await), ErrorCode::UnknownObject);
    assert_eq!(
        failed(c.call(Body::Abort(999)).await),
        ErrorCode::UnknownObject
    );
    // Someone else's grant.
    let g = c.create("s", len).await.unwrap();
    assert_eq!(
        failed(other.seal(&g, g.offset, len, None).await),
        ErrorCode::UnknownObject
    );
    assert_eq!(failed(other.abort(&g).await), ErrorCode::UnknownObject);
    // An aborted grant is gone.
    c.abort(&g).await.unwrap();
    assert_eq!(failed(c.abort(&g).await), ErrorCode::UnknownObject);
    assert_eq!(
        failed(c.seal(&g, g.offset, len, None).await),
        ErrorCode::UnknownObject
    );
    // A sealed object is not writable any more.
    let g = c.create("s", len).await.unwrap();
    // SAFETY: the only slice of this grant, dropped before it is sealed or aborted.
    unsafe { c.grant_bytes(&g) }.unwrap()[..frame.len()].copy_from_slice(&frame);
    assert_eq!(c.seal(&g, g.offset, len, None).await.unwrap(), 0);
    assert_eq!(
        failed(c.seal(&g, g.offset, len, None).await),
        ErrorCode::NotWritable
    );
    assert_eq!(failed(c.abort(&g).await), ErrorCode::NotWritable);

    // References: released twice, never given, another session's.
    let got = c.get("s", Some(0)).await.unwrap();
    let reference = got.delivery().reference;
    assert_eq!(
        failed(other.release(reference).await),
        ErrorCode::UnknownReference
    );
    got.release().await.unwrap();
    assert_eq!(
        failed(c.release(reference).await),
        ErrorCode::UnknownReference
    );
    assert_eq!(
        failed(c.release(123_456).await),
        ErrorCode::UnknownReference
    );
    // A batch with one bad reference releases the good ones and reports the bad one.
    let g1 = c.get("s", Some(0)).await.unwrap();
    let g2 = c.get("s", Some(0)).await.unwrap();
    let refs = vec![g1.delivery().reference, 777, g2.delivery().reference];
    std::mem::forget((g1, g2)); // released by the batch below (no release on drop)
    assert_eq!(
        failed(c.call(Body::ReleaseMany(refs.clone())).await),
        ErrorCode::UnknownReference
    );
    assert_eq!(
        failed(c.call(Body::ReleaseMany(refs[..1].to_vec())).await),
        ErrorCode::UnknownReference,
        "released by the batch"
    );
    assert_eq!(
        failed(c.call(Body::Unsubscribe(42)).await),
        ErrorCode::BadRequest
    );

    // Streams that do not exist, names that cannot exist, streams that do.
    assert_eq!(failed(c.create("nope", 10).await), ErrorCode::UnknownStream);
    assert_eq!(failed(c.get("nope", None).await), ErrorCode::UnknownStream);
    assert_eq!(
        failed(c.subscribe("nope", "", Cursor::Oldest, 1).await),
        ErrorCode::UnknownStream
    );
    assert_eq!(
        failed(c.delete_stream("nope").await),
        ErrorCode::UnknownStream
    );
    assert_eq!(
        failed(c.stream_stat("nope").await),
        ErrorCode::UnknownStream
    );
    for bad in ["", "white space", "semi;colon", "é"] {
        assert_eq!(
            failed(c.create_stream(bad, StreamConfig::default(), false).await),
            ErrorCode::BadRequest,
            "{bad:?}"
        );
    }
    assert_eq!(
        failed(c.subscribe("s", "bad name", Cursor::Oldest, 1).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        failed(c.create_stream("s", RETAIN, false).await),
        ErrorCode::StreamExists
    );
    c.create_stream("s", StreamConfig::default(), true)
        .await
        .unwrap();

    // None of it cost anything: one frame in the stream, nothing else alive.
    let s = c.stat().await.unwrap();
    assert_eq!((s.objects, s.seals, s.aborted_writes), (1, 1, 1));
    // Every refusal above was counted.
    assert_eq!(s.errors, 25);
    assert_eq!(c.put("s", &framed(64, 32, 1)).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_creates_are_too_large_and_a_full_region_is_region_full() {
    // Big enough that zeroing half of it takes the region's scrubber a while.
    let store = start("bad-size", || memory_store(128 << 20));
    let c = connect(&store.tcp(), "c").await;
    let region = c.welcome().region_bytes;
    c.create_stream(
        "s",
        StreamConfig {
            on_full: FullPolicy::Reject,
            ..Default::default()
        },
        false,
    )
    .await
    .unwrap();
    c.create_stream(
        "small",
        StreamConfig {
            max_frame_bytes: 4096,
            ..Default::default()
        },
        false,
    )
    .await
    .unwrap();
    c.create_stream(
        "bytes",
        StreamConfig {
            max_bytes: 8192,
            ..Default::default()
        },
        false,
    )
    .await
    .unwrap();
    for size in [region, region + 1, u64::MAX, 0] {
        assert_eq!(
            failed(c.create("s", size).await),
            ErrorCode::TooLarge,
            "{size}"
        );
    }
    assert_eq!(failed(c.create("small", 4097).await), ErrorCode::TooLarge);
    assert_eq!(failed(c.create("bytes", 8193).await), ErrorCode::TooLarge);
    let g = c.create("small", 4096).await.unwrap();
    c.abort(&g).await.unwrap();
    let s = c.stat().await.unwrap();
    assert_eq!((s.objects, s.blocks_in_use, s.creates), (0, 0, 1));
    // Fits the region but not what is left of it: refused at once (reject policy). Once the
    // first one is aborted the room is back at once, even though the region's scrubber is
    // still zeroing its 64 MiB.
    let half = s.blocks_total / 2 * s.block_bytes + s.block_bytes;
    let big = c.create("s", half).await.unwrap();
    assert_eq!(failed(c.create("s", half).await), ErrorCode::RegionFull);
    c.abort(&big).await.unwrap();
    let again = c.create("s", half).await.unwrap();
    c.abort(&again).await.unwrap();
    assert_eq!(c.stream_stat("s").await.unwrap().rejected_creates, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seals_outside_the_grant_or_of_anything_but_one_framed_message() {
    let store = start("bad-seal", || memory_store(16 << 20));
    let c = connect(&store.unix(), "shm").await;
    let t = connect(&store.tcp(), "tcp").await;
    c.create_stream("s", RETAIN, false).await.unwrap();
    let mut sub = t.subscribe("s", "watch", Cursor::Oldest, 8).await.unwrap();
    let frame = framed(64, 32, 0);
    let len = frame.len() as u64;
    let g = c.create("s", len).await.unwrap();
    assert!(g.offset >= 8 && g.len >= len);
    let end = g.offset + g.len;
    for (offset, seal_len) in [
        (g.offset - 8, 16),
        (g.offset, g.len + 8),
        (end - 8, 16),
        (end, 8),
        (g.offset, 4),
        (g.offset, 0),
        (u64::MAX - 4, 8),
        (g.offset, u64::MAX),
        (0, 8),
    ] {
        assert_eq!(
            failed(c.seal(&g, offset, seal_len, None).await),
            ErrorCode::OutOfGrant,
            "seal of {seal_len} at {offset}"
        );
    }
    // Bytes that are not a framed message, or not exactly one.
    // SAFETY: the only slice of this grant, dropped before it is sealed or aborted.
    let bytes = unsafe { c.grant_bytes(&g) }.unwrap();
    bytes[..64].fill(0xff);
    assert_eq!(
        failed(c.seal(&g, g.offset, 64, None).await),
        ErrorCode::BadFrame
    );
    // SAFETY: the only slice of this grant, dropped before it is sealed or aborted.
    let bytes = unsafe { c.grant_bytes(&g) }.unwrap();
    bytes[..frame.len()].copy_from_slice(&frame);
    for wrong in [len - 8, len + 8, 8] {
        assert_eq!(
            failed(c.seal(&g, g.offset, wrong, None).await),
            ErrorCode::BadFrame,
            "seal of {wrong} bytes of a {len}-byte message"
        );
    }
    // None of that sealed anything; the grant is still good.
    assert_eq!(c.stream_stat("s").await.unwrap().next_seq, 0);
    assert_eq!(c.seal(&g, g.offset, len, None).await.unwrap(), 0);
    let f = within(sub.next()).await.unwrap();
    assert_eq!((f.seq(), f.bytes()), (0, &frame[..]));
    f.release().await.unwrap();

    // Over tcp, the same checks.
    let g = t.create("s", len).await.unwrap();
    t.write_grant(&g, 0, &frame).await.unwrap();
    assert_eq!(
        failed(t.seal(&g, g.offset + 8, len - 8, None).await),
        ErrorCode::BadFrame
    );
    assert_eq!(
        failed(t.seal(&g, g.offset, g.len + 1, None).await),
        ErrorCode::OutOfGrant
    );
    assert_eq!(t.seal(&g, g.offset, len, None).await.unwrap(), 1);

    // Checksums: a stream that needs them refuses a seal without one.
    c.create_stream(
        "crc",
        StreamConfig {
            checksums: true,
            ..RETAIN
        },
        false,
    )
    .await
    .unwrap();
    let g = c.create("crc", len).await.unwrap();
    // SAFETY: the only slice of this grant, dropped before it is sealed or aborted.
    unsafe { c.grant_bytes(&g) }.unwrap()[..frame.len()].copy_from_slice(&frame);
    assert_eq!(
        failed(c.seal(&g, g.offset, len, None).await),
        ErrorCode::ChecksumRequired
    );
    let crc = staging_store::journal::frame_crc(&frame);
    assert_eq!(c.seal(&g, g.offset, len, Some(crc)).await.unwrap(), 0);
    let got = c.get("crc", Some(0)).await.unwrap();
    assert_eq!(got.delivery().checksum, Some(crc));
    assert!(got.verify());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifying_store_refuses_a_wrong_checksum() {
    let store = start("bad-crc", || {
        let region =
            capnp_rdma::Region::create(&capnp_rdma::RegionOptions::memfd(16 << 20)).unwrap();
        Store::new(
            region,
            StoreOptions {
                verify_checksums: true,
                ..Default::default()
            },
            None,
        )
    });
    let c = connect(&store.unix(), "c").await;
    c.create_stream("s", RETAIN, false).await.unwrap();
    let frame = framed(64, 32, 0);
    let g = c.create("s", frame.len() as u64).await.unwrap();
    // SAFETY: the only slice of this grant, dropped before it is sealed or aborted.
    unsafe { c.grant_bytes(&g) }.unwrap()[..frame.len()].copy_from_slice(&frame);
    let crc = staging_store::journal::frame_crc(&frame);
    assert_eq!(
        failed(
            c.seal(&g, g.offset, frame.len() as u64, Some(crc ^ 1))
                .await
        ),
        ErrorCode::ChecksumMismatch
    );
    assert_eq!(
        c.seal(&g, g.offset, frame.len() as u64, Some(crc))
            .await
            .unwrap(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_hello_are_refused() {
    let store = start("bad-hello", || memory_store(16 << 20));
    let mut raw = Raw::tcp(store.bound.tcp.unwrap());
    let before = [
        Body::Stat,
        Body::Streams,
        Body::Get {
            stream: "s".into(),
            seq: None,
        },
        Body::CreateStream {
            name: "s".into(),
            config: StreamConfig::default(),
            exist_ok: true,
        },
        Body::Release(1),
        Body::Abort(1),
    ];
    for (id, body) in before.into_iter().enumerate() {
        let id = id as u64 + 1;
        raw.request(id, body);
        let e = raw.response(id).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest, "{e}");
    }
    // A hello the store cannot accept, then one it can.
    raw.request(
        10,
        Body::Hello {
            version: proto::VERSION + 1,
            client: "future".into(),
            transport: Transport::Tcp,
        },
    );
    assert_eq!(raw.response(10).unwrap_err().code, ErrorCode::Unsupported);
    raw.request(11, hello(Transport::Shm));
    assert_eq!(
        raw.response(11).unwrap_err().code,
        ErrorCode::Unsupported,
        "shm over TCP"
    );
    raw.request(12, hello(Transport::Tcp));
    let Ok(Reply::Welcome(w)) = raw.response(12) else {
        panic!("expected a welcome")
    };
    assert_eq!(
        (w.version, w.data_port),
        (proto::VERSION, store.bound.data.unwrap().port())
    );
    raw.request(13, hello(Transport::Tcp));
    assert_eq!(raw.response(13).unwrap_err().code, ErrorCode::BadRequest);
    raw.request(14, Body::Stat);
    let Ok(Reply::Stat(s)) = raw.response(14) else {
        panic!("expected stat")
    };
    // 6 refusals before hello, 2 refused hellos, a second hello.
    assert_eq!(s.errors, 9);
    assert_eq!(s.streams, 0, "the create before hello did nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_put_outside_its_grant_is_a_notice_and_the_data_connection_survives() {
    let store = start("bad-put", || memory_store(16 << 20));
    let c = connect(&store.tcp(), "tcp").await;
    let watcher = connect(&store.unix(), "watch").await;
    c.create_stream("s", RETAIN, false).await.unwrap();
    let mut sub = subscribe(&watcher, "s", "w", Cursor::Oldest, 8).await;
    let frame = framed(64, 32, 0);
    let g = c.create("s", frame.len() as u64).await.unwrap();
    // Past the end, wrapping around, someone else's (nobody's) object.
    c.write_grant(&g, g.len, &frame[..16]).await.unwrap();
    c.write_grant(&g, g.len - 8, &frame[..16]).await.unwrap();
    c.write_grant(&g, u64::MAX - 7, &frame[..16]).await.unwrap();
    let nobody = Grant { object: 9999, ..g };
    c.write_grant(&nobody, 0, &frame).await.unwrap();
    // The good write after them lands, and the seal waits for it.
    c.write_grant(&g, 0, &frame).await.unwrap();
    assert_eq!(
        c.seal(&g, g.offset, frame.len() as u64, None)
            .await
            .unwrap(),
        0
    );
    // The notices were sent before the seal's answer (same connection, in order).
    let codes: Vec<ErrorCode> = c.take_notices().into_iter().map(|e| e.code).collect();
    assert_eq!(
        codes,
        [
            ErrorCode::OutOfGrant,
            ErrorCode::OutOfGrant,
            ErrorCode::OutOfGrant,
            ErrorCode::UnknownObject
        ]
    );
    // A write into a sealed object is refused too.
    c.write_grant(&g, 0, &frame).await.unwrap();
    // And the connection goes on: a whole put, its bytes intact.
    let frame1 = framed(64, 32, 1);
    assert_eq!(c.put("s", &frame1).await.unwrap(), 1);
    let codes: Vec<ErrorCode> = c.take_notices().into_iter().map(|e| e.code).collect();
    assert_eq!(codes, [ErrorCode::NotWritable]);
    for (seq, bytes) in [(0, &frame), (1, &frame1)] {
        let f = within(sub.next()).await.unwrap();
        assert_eq!((f.seq(), f.bytes()), (seq, &bytes[..]));
        assert_eq!(stamp(f.bytes()), seq);
    }
    let s = c.stat().await.unwrap();
    assert_eq!((s.seals, s.objects), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_control_connection_closes_that_connection_only() {
    let store = start("bad-garbage", || memory_store(16 << 20));
    let (producer, consumer, mut sub) = bystanders(&store).await;
    let mut seq = 0;
    put_and_get(&producer, &consumer, &mut sub, &mut seq).await;

    // A well-framed message that is not a request (a struct pointer to nowhere).
    let not_a_request: Vec<u8> = [0u32, 2, 0x7fff_fff0, 0, 0, 0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let garbage: [(&str, Vec<u8>); 4] = [
        ("0xff bytes", vec![0xff; 64]),
        ("text", b"GET / HTTP/1.1\r\nHost: store\r\n\r\n".to_vec()),
        ("not a request", not_a_request),
        ("too many segments", {
            let mut v = 1000u32.to_le_bytes().to_vec();
            v.extend([0u8; 4004]);
            v
        }),
    ];
    let mut closed = 0;
    for (what, bytes) in &garbage {
        for unix in [true, false] {
            let mut raw = if unix {
                Raw::unix(store.bound.unix.as_ref().unwrap())
            } else {
                Raw::tcp(store.bound.tcp.unwrap())
            };
            if !unix {
                // Garbage after a proper hello, too.
                raw.request(1, hello(Transport::Tcp));
                assert!(matches!(raw.response(1), Ok(Reply::Welcome(_))));
            }
            raw.send(bytes);
            let why = raw.expect_protocol_close();
            assert!(!why.is_empty(), "{what}");
            closed += 1;
            // Everybody else carries on.
            put_and_get(&producer, &consumer, &mut sub, &mut seq).await;
        }
    }
    // The store let go of every closed session.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = producer.stat().await.unwrap();
        if s.sessions == 2 {
            assert_eq!(s.seals, seq);
            break;
        }
        assert!(Instant::now() < deadline, "{} sessions left", s.sessions);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let metrics = scrape_protocol_errors(store.bound.metrics.unwrap());
    assert_eq!(metrics, closed);
}

/// A full put by `producer`, delivered to `sub` and read back with a get by `consumer`.
/// The clients that must not notice a bad one: an shm producer and a tcp consumer subscribed
/// to stream "s" (which keeps a few frames).
async fn bystanders(
    store: &common::TestStore,
) -> (Client, Client, staging_store::client::Subscription) {
    let producer = producer_of(store, "s", RETAIN).await;
    let consumer = connect(&store.tcp(), "consumer").await;
    let sub = subscribe(&consumer, "s", "c", Cursor::Oldest, 4).await;
    (producer, consumer, sub)
}

async fn put_and_get(
    producer: &Client,
    consumer: &Client,
    sub: &mut staging_store::client::Subscription,
    seq: &mut u64,
) {
    let bytes = framed(64, 32, *seq);
    assert_eq!(within(producer.put("s", &bytes)).await.unwrap(), *seq);
    let f = within(sub.next()).await.unwrap();
    assert_eq!((f.seq(), f.bytes()), (*seq, &bytes[..]));
    f.release().await.unwrap();
    let g = within(consumer.get("s", Some(*seq))).await.unwrap();
    assert_eq!(g.bytes(), &bytes[..]);
    g.release().await.unwrap();
    *seq += 1;
}

fn scrape_protocol_errors(addr: std::net::SocketAddr) -> u64 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix("staging_store_protocol_errors_total "))
        .expect("the metric")
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_declared_length_is_refused_before_anything_is_buffered() {
    let store = start("bad-huge", || memory_store(16 << 20));
    let c = connect(&store.unix(), "c").await;
    let words = |ws: &[u32]| -> Vec<u8> { ws.iter().flat_map(|w| w.to_le_bytes()).collect() };
    let headers = [
        // One segment of 2^31 - 1 words (16 GiB).
        words(&[0, 0x7fff_ffff]),
        // Just over the 64 KiB request limit.
        words(&[0, (proto::MAX_REQUEST_BYTES / 8) as u32]),
        // Two segments whose sum is over the limit (each alone is under it).
        words(&[1, 0x1000, 0x1000, 0]),
        // Four billion segments.
        words(&[0xffff_fffe, 1]),
    ];
    for (i, header) in headers.iter().enumerate() {
        for unix in [true, false] {
            let mut raw = if unix {
                Raw::unix(store.bound.unix.as_ref().unwrap())
            } else {
                Raw::tcp(store.bound.tcp.unwrap())
            };
            let started = Instant::now();
            // Only the header: a store that waited for (or allocated) the body would not
            // answer at all.
            raw.send(header);
            let why = raw.expect_protocol_close();
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "header {i}: closed after {:?}",
                started.elapsed()
            );
            if (1..3).contains(&i) {
                assert!(why.contains("exceeds the limit"), "header {i}: {why}");
            }
        }
    }
    // A message exactly at the limit is read (and refused as garbage only once it is whole).
    let mut raw = Raw::unix(store.bound.unix.as_ref().unwrap());
    let body_words = (proto::MAX_REQUEST_BYTES / 8 - 1) as u32;
    let mut message = words(&[0, body_words]);
    message.resize(proto::MAX_REQUEST_BYTES, 0xee);
    raw.send(&message[..message.len() - 8]);
    raw.send(&message[message.len() - 8..]);
    raw.expect_protocol_close();
    // The store is fine.
    c.create_stream("s", RETAIN, false).await.unwrap();
    assert_eq!(c.put("s", &framed(64, 32, 0)).await.unwrap(), 0);
    assert_eq!(c.stat().await.unwrap().errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_data_connection_ends_only_that_data_connection() {
    use staging_store::data::{Attach, Put};
    let store = start("bad-data", || memory_store(16 << 20));
    let c = connect(&store.tcp(), "c").await;
    c.create_stream("s", RETAIN, false).await.unwrap();
    let data = store.bound.data.unwrap();
    let closed = |mut s: std::net::TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the store to close the data connection, got {other:?}"),
        }
    };
    // Not an attach; an attach with the wrong token.
    let mut s = std::net::TcpStream::connect(data).unwrap();
    s.write_all(&[0xab; 24]).unwrap();
    closed(s);
    let mut s = std::net::TcpStream::connect(data).unwrap();
    let w = c.welcome();
    s.write_all(
        &Attach {
            session: w.session,
            token: w.token ^ 1,
        }
        .encode(),
    )
    .unwrap();
    closed(s);
    // A real session's data connection that sends a PUT larger than the region.
    let mut raw = Raw::tcp(store.bound.tcp.unwrap());
    raw.request(1, hello(Transport::Tcp));
    let Ok(Reply::Welcome(w)) = raw.response(1) else {
        panic!("expected a welcome")
    };
    let mut s = std::net::TcpStream::connect(data).unwrap();
    s.write_all(
        &Attach {
            session: w.session,
            token: w.token,
        }
        .encode(),
    )
    .unwrap();
    s.write_all(
        &Put {
            object: 1,
            at: 0,
            len: 1 << 40,
        }
        .encode(),
    )
    .unwrap();
    closed(s);
    // The real client's own data connection was never disturbed.
    let frame = framed(64, 32, 0);
    assert_eq!(c.put("s", &frame).await.unwrap(), 0);
    let got = c.get("s", Some(0)).await.unwrap();
    assert_eq!(got.bytes(), &frame[..]);
    raw.request(2, Body::Stat);
    assert!(matches!(raw.response(2), Ok(Reply::Stat(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_id_0_is_answered_only_when_it_fails() {
    let store = start("bad-quiet", || memory_store(16 << 20));
    let mut raw = Raw::tcp(store.bound.tcp.unwrap());
    raw.request(0, hello(Transport::Tcp));
    let Ok(Reply::Welcome(_)) = raw.response(0) else {
        panic!("a hello is always answered")
    };
    // Succeeds: no answer. Fails: a notice (not a response), in order.
    raw.request(
        0,
        Body::CreateStream {
            name: "s".into(),
            config: RETAIN,
            exist_ok: false,
        },
    );
    raw.request(0, Body::Release(42));
    raw.request(
        0,
        Body::CreateStream {
            name: "s".into(),
            config: RETAIN,
            exist_ok: false,
        },
    );
    raw.request(7, Body::Streams);
    match raw.recv() {
        Some(ServerMessage::Notice(e)) => assert_eq!(e.code, ErrorCode::UnknownReference),
        other => panic!("expected a notice for the release, got {other:?}"),
    }
    match raw.recv() {
        Some(ServerMessage::Notice(e)) => assert_eq!(e.code, ErrorCode::StreamExists),
        other => panic!("expected a notice for the second create, got {other:?}"),
    }
    let Ok(Reply::Streams(streams)) = raw.response(7) else {
        panic!("expected the streams")
    };
    assert_eq!(streams.len(), 1, "the first create happened, unanswered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_connection_that_never_attaches_is_closed_after_10_s() {
    let store = start("bad-silent-data", || memory_store(16 << 20));
    let (producer, consumer, mut sub) = bystanders(&store).await;
    // Connections to the data port that say nothing, and one that stops mid-header.
    let data = store.bound.data.unwrap();
    let started = Instant::now();
    let mut silent: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(data).unwrap())
        .collect();
    silent[2].write_all(b"SSDA\x01\x00").unwrap();
    // Meanwhile the store serves everybody else.
    let mut seq = 0;
    for _ in 0..3 {
        put_and_get(&producer, &consumer, &mut sub, &mut seq).await;
    }
    tokio::task::block_in_place(|| {
        for s in &mut silent {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut byte = [0u8; 1];
            // Closed by the store (end of stream or reset), not by the read timeout.
            match s.read(&mut byte) {
                Ok(0) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                other => panic!("expected the store to close it, got {other:?}"),
            }
        }
    });
    let waited = started.elapsed();
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(20)).contains(&waited),
        "closed after {waited:?}"
    );
    put_and_get(&producer, &consumer, &mut sub, &mut seq).await;
}
