//! Fuzzes the transports' control decoders: the shm HELLO, the tcp HELLO, WRITE header and ACK, and the verbs
//! endpoint exchange. Any panic is a bug.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    capnp_rdma::transport::fuzz_decode_control(data);
});
