//! Batched operations of [`Kv`](super::Kv).
