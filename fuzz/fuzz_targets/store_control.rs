//! Fuzzes the staging store's wire decoders: arbitrary bytes as a control connection (framed
//! requests and server messages, fed in uneven chunks, each decoded one re-encoded and decoded
//! again to the same value) and as data-connection headers (ATTACH, PUT, DELIVER: what decodes
//! re-encodes to the same bytes). Any panic is a bug.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    staging_store::proto::fuzz_decode(data);
    staging_store::data::fuzz_decode(data);
});
