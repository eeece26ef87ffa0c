//! Zero-copy reader (being written).
