//! Fuzzes `capnp_rdma::reader`: arbitrary bytes as a framed message (or several back to back),
//! read in place and traversed completely, as a `Frame` and untyped. Any panic is a bug.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    capnp_rdma::reader::fuzz_read_framed(data);
});
