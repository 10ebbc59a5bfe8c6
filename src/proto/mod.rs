//! Control-plane protocol: messages between clients, memory nodes and the controller.
//!
//! Transport: TCP, frames of `u32` little-endian length followed by a `bincode` body
//! ([`frame`]). The first frame on every connection is a [`Hello`] naming the protocol
//! version and the peer's role; the controller answers with [`Welcome`] or closes the
//! connection with a [`Response::Error`].
//!
//! Clients then send [`Request`]s in [`Envelope`]s and get one [`Response`] per request
//! id. Memory nodes and the controller exchange one-way [`NodeMsg`] and [`ControllerMsg`]
//! messages.

pub mod frame;
pub mod grant;
pub mod key;
pub mod msg;
pub mod path;
pub mod token;

pub use grant::{derive_key, BlockGrant, BlockId, Endpoint, Replication, Secret, WireTransport};
pub use key::{ClusterKey, KeyError};
pub use msg::*;
pub use path::{PathError, PoolPath};
pub use token::{Scope, Token, TokenError};

/// Version of the control protocol spoken by this build.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest control frame accepted (bytes).
pub const MAX_FRAME: usize = 16 << 20;
