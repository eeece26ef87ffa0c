//! [`fuzz_decode`]: the whole receive path (framing, decoding, re-encoding) on arbitrary
//! bytes, for the fuzz targets and the seed tests.

use super::decode::aligned_copy;
use super::{
    decode_config, decode_request, decode_server_message, encode_request, encode_server_message,
    MessageBuf, MAX_REQUEST_BYTES,
};

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
