//! Hand-encoded Cap'n Proto wire words and stream framing, for tests that build messages
//! capnp's builder would never produce (shared by the reader and fuzz-corpus tests).

#![allow(dead_code, unreachable_pub)]

use capnp::Word;

/// `bytes` copied into 8-byte aligned storage.
pub fn aligned(bytes: &[u8]) -> Vec<Word> {
    let mut words = Word::allocate_zeroed_vec(bytes.len().div_ceil(8));
    Word::words_to_bytes_mut(&mut words)[..bytes.len()].copy_from_slice(bytes);
    words
}

pub fn struct_ptr(offset: i32, data_words: u16, ptr_words: u16) -> u64 {
    u64::from((offset as u32) << 2) | u64::from(data_words) << 32 | u64::from(ptr_words) << 48
}

/// `element_size`: 2 = byte, 6 = pointer, 7 = inline composite (`count` = word count).
pub fn list_ptr(offset: i32, element_size: u8, count: u32) -> u64 {
    u64::from((offset as u32) << 2 | 1) | u64::from(element_size) << 32 | u64::from(count) << 35
}

/// The tag word of an inline composite list.
pub fn tag(elements: u32, data_words: u16, ptr_words: u16) -> u64 {
    u64::from(elements << 2) | u64::from(data_words) << 32 | u64::from(ptr_words) << 48
}

pub fn far_ptr(double: bool, pad_word: u32, segment: u32) -> u64 {
    u64::from(pad_word << 3 | u32::from(double) << 2 | 2) | u64::from(segment) << 32
}

pub fn table(count_field: u32, lengths: &[u32]) -> Vec<u8> {
    let mut out = count_field.to_le_bytes().to_vec();
    for length in lengths {
        out.extend_from_slice(&length.to_le_bytes());
    }
    out.resize(out.len().div_ceil(8) * 8, 0);
    out
}

pub fn frame(segments: &[Vec<u64>]) -> Vec<u8> {
    let lengths: Vec<u32> = segments.iter().map(|s| s.len() as u32).collect();
    let mut out = table(segments.len() as u32 - 1, &lengths);
    for word in segments.iter().flatten() {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out
}

/// A `Frame` struct (6 data words, 2 pointers) with the given format, planes and metadata
/// pointers, as the words after a root pointer at word 0.
pub fn frame_root(format: u16, planes: u64, metadata: u64) -> Vec<u64> {
    vec![
        struct_ptr(0, 6, 2),
        1,
        2,
        3,
        0,
        4 | 2 << 32,
        u64::from(format),
        planes,
        metadata,
    ]
}
