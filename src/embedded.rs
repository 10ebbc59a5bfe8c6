//! embedded (being written).
