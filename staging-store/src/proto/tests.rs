//! Round trips of every message and the decoder's refusals.

use super::decode::aligned_copy;
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
            releases: Vec::new(),
        },
        Body::Seal {
            object: 7,
            offset: 65536,
            len: 100,
            checksum: None,
            releases: Vec::new(),
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
                stream_id: 0,
                seq: 0,
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
                stream_id: 0x1234_5678_9abc_def0,
                seq: 11,
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

                ended: false,

                id: 0,
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
