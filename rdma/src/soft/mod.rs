//! The soft backend: one-sided operations over TCP.
//!
//! The memory node runs a [`SoftServer`], a small software "NIC" that applies READ,
//! WRITE, compare-and-swap and fetch-and-add to its [`crate::Region`] after checking each
//! against the [`crate::AccessTable`]. Clients use [`SoftTransport`], which implements
//! [`crate::Transport`].
//!
//! The wire format ([`frame`]) is fixed little-endian binary: a 12/20-byte preamble per
//! connection, then 40-byte request headers (plus payload) and 16-byte response headers
//! (plus payload). Requests are pipelined: a client sends many before reading any
//! response, and every response carries its request's id. It is specified in
//! `docs/PROTOCOL.md`, section "Data plane: soft transport frames".
//!
//! # Guarantees
//!
//! Exactly those of RDMA RC and no more: aligned 8-byte atomics are atomic with respect
//! to each other (and to those of other connections and of shm clients); READ and WRITE
//! are not atomic and may be observed torn. The server happens to apply one connection's
//! requests in order, but clients must not rely on it (a batch's operations may complete
//! in any order, as on verbs).
//!
//! # Misbehaving peers
//!
//! Operation-level problems (bounds, keys, epochs, alignment, a READ over
//! `max_op_bytes`) get an error status and the connection carries on. Protocol-level
//! problems (bad preamble, malformed header, unknown operation code, WRITE over
//! `max_op_bytes`, EOF inside a frame) close that connection only, after sending any
//! status already due. The server never panics on input and keeps serving every other
//! connection.

pub mod frame;

mod client;
mod server;

pub use client::{SoftClientConfig, SoftTransport};
pub use frame::FrameError;
pub use server::{GrantCheck, SoftServer, SoftServerConfig, SoftServerStats};
