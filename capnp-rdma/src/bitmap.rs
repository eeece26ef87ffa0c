//! Block bitmap (being written).
