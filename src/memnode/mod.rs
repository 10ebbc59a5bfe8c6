//! memnode (being written).
