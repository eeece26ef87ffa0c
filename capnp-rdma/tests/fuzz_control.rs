//! The transports' control decoders (what the fuzz target `control` exercises) under valid,
//! mutated and random input: typed errors, never a panic, and never a write header accepted
//! outside the granted range.

use capnp_rdma::transport::tcp::{decode_ack, Hello, WriteHeader, HELLO_LEN};
use capnp_rdma::transport::{fuzz_decode_control, RemoteRegion, TransportError};
use proptest::prelude::*;

fn grant(offset: u64, len: u64) -> RemoteRegion {
    RemoteRegion {
        region_id: 7,
        rkey: 0,
        base: 0,
        offset,
        len,
    }
}

#[test]
fn valid_messages_round_trip() {
    let hello = Hello {
        remote: grant(4096, 1 << 20),
        window: 8,
    };
    assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
    let h = WriteHeader {
        imm: 3,
        offset: 8192,
        len: 100,
        id: 9,
    };
    assert_eq!(WriteHeader::decode(&h.encode(), &hello.remote).unwrap(), h);
}

#[test]
fn hostile_messages_are_typed_errors() {
    let hello = Hello {
        remote: grant(u64::MAX - 10, 100),
        window: 8,
    }
    .encode();
    assert!(
        matches!(Hello::decode(&hello), Err(TransportError::Protocol(_))),
        "range overflows"
    );
    let zero_window = Hello {
        remote: grant(0, 10),
        window: 0,
    }
    .encode();
    assert!(matches!(
        Hello::decode(&zero_window),
        Err(TransportError::Protocol(_))
    ));
    assert!(matches!(
        Hello::decode(&[0u8; 10]),
        Err(TransportError::Protocol(_))
    ));
    let g = grant(4096, 4096);
    for (offset, len) in [(0, 1), (4096, 4097), (8192, 1), (u64::MAX, 2), (4095, 2)] {
        let h = WriteHeader {
            imm: 0,
            offset,
            len,
            id: 1,
        }
        .encode();
        assert!(matches!(
            WriteHeader::decode(&h, &g),
            Err((1, TransportError::OutOfRange { .. }))
        ));
    }
    assert!(decode_ack(&[0xff; 16]).is_err());
    assert!(decode_ack(&[0; 3]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        fuzz_decode_control(&data);
    }

    #[test]
    fn mutated_valid_messages_never_escape_the_grant(
        offset in 0u64..1 << 40, len in 0u64..1 << 40, flips in proptest::collection::vec((0usize..HELLO_LEN + 32, any::<u8>()), 0..6)
    ) {
        let mut data = Hello { remote: grant(offset, len), window: 4 }.encode().to_vec();
        data.extend_from_slice(&WriteHeader { imm: 1, offset, len: len / 2, id: 5 }.encode());
        for (at, x) in flips {
            data[at] ^= x;
        }
        fuzz_decode_control(&data);
    }
}
