//! Fuzzes the staging store's journal decoder: arbitrary bytes as a journal file, decoded
//! record by record, re-encoded (must give the same bytes), the tail classified as clean, torn
//! or corrupt, and a record appended after the valid prefix read back. Any panic is a bug.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    staging_store::journal::fuzz_decode(data);
});
