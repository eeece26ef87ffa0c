//! The TCP backend against the transport conformance suite, plus what only TCP can be sent:
//! hostile bytes on the socket.

mod conformance;

use capnp_rdma::framing::OutboundMessage;
use capnp_rdma::transport::tcp::{TcpOptions, TcpTarget, TcpWriter, WriteHeader, HELLO_LEN};
use capnp_rdma::transport::{Target, TransportError};
use capnp_rdma::{BlockLease, Region};
use conformance::Backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Tcp;

impl Backend for Tcp {
    type W = TcpWriter<OutboundMessage>;
    type T = TcpTarget;

    async fn connect(&self, local: &Region, lease: BlockLease, window: u32) -> (Self::W, Self::T) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            TcpTarget::accept(&listener, lease, &TcpOptions { window }).await
        });
        let writer = TcpWriter::connect(addr, local).await.unwrap();
        (writer, accept.await.unwrap().unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_and_immediates() {
    conformance::ordering_and_immediates(&Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_is_enforced() {
    conformance::window_is_enforced(&Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_tiny() {
    conformance::large_and_tiny(&Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_entries() {
    conformance::many_entries(&Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_is_rejected() {
    conformance::out_of_range_is_rejected(&Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_disconnect_mid_stream() {
    conformance::peer_disconnect_mid_stream(&Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_disconnect() {
    conformance::writer_disconnect(&Tcp).await;
}

/// A hostile writer that ignores the granted range is refused before any byte lands, and the
/// target reports it instead of announcing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_rejects_out_of_range_header_from_a_raw_socket() {
    let remote = conformance::region(16);
    let lease = remote.lease(1 << 20).unwrap();
    let granted_end = lease.offset() + lease.len();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let target =
        tokio::spawn(
            async move { TcpTarget::accept(&listener, lease, &TcpOptions::default()).await },
        );
    let mut raw = TcpStream::connect(addr).await.unwrap();
    let mut hello = [0u8; HELLO_LEN];
    raw.read_exact(&mut hello).await.unwrap();
    let mut target = target.await.unwrap().unwrap();
    let header = WriteHeader {
        imm: 1,
        offset: granted_end - 8,
        len: 64,
        id: 77,
    };
    raw.write_all(&header.encode()).await.unwrap();
    raw.write_all(&[0xAA; 64]).await.unwrap();
    let mut ack = [0u8; 16];
    raw.read_exact(&mut ack).await.unwrap();
    let (id, status) = capnp_rdma::transport::tcp::decode_ack(&ack).unwrap();
    assert_eq!((id, status), (77, 1), "rejected as out of range");
    let mut out = Vec::new();
    let err = target.incoming(&mut out).await.unwrap_err();
    assert!(matches!(err, TransportError::OutOfRange { .. }), "{err:?}");
    assert!(out.is_empty());
    // Nothing landed past the grant (the bytes after it are still zero).
    // SAFETY: nobody writes there.
    let after = unsafe { remote.bytes(granted_end - 8, 8) }.unwrap();
    assert_eq!(after, &[0u8; 8]);
}

/// Garbage instead of a header, and a payload cut short, are never announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_truncated_payloads_are_not_announced() {
    for garbage in [true, false] {
        let remote = conformance::region(16);
        let lease = remote.lease(1 << 20).unwrap();
        let offset = lease.offset();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = tokio::spawn(async move {
            TcpTarget::accept(&listener, lease, &TcpOptions::default()).await
        });
        let mut raw = TcpStream::connect(addr).await.unwrap();
        let mut hello = [0u8; HELLO_LEN];
        raw.read_exact(&mut hello).await.unwrap();
        let mut target = target.await.unwrap().unwrap();
        if garbage {
            raw.write_all(&[0x5A; 32]).await.unwrap();
        } else {
            let header = WriteHeader {
                imm: 1,
                offset,
                len: 4096,
                id: 1,
            };
            raw.write_all(&header.encode()).await.unwrap();
            raw.write_all(&[1u8; 100]).await.unwrap();
        }
        drop(raw);
        let mut out = Vec::new();
        let err = target.incoming(&mut out).await.unwrap_err();
        assert!(out.is_empty(), "nothing announced");
        if garbage {
            assert!(matches!(err, TransportError::Protocol(_)), "{err:?}");
        } else {
            assert!(matches!(err, TransportError::Disconnected), "{err:?}");
        }
    }
}

/// A peer that is not a capnp-rdma target is refused with a typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_foreign_server_is_a_protocol_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\nnot a capnp-rdma peer")
            .await
            .unwrap();
    });
    let local = conformance::region(8);
    let err = TcpWriter::<OutboundMessage>::connect(addr, &local)
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Protocol(_)), "{err:?}");
}
