//! # farpool-rdma
//!
//! One-sided READ, WRITE, compare-and-swap and fetch-and-add on a remote memory region,
//! behind one [`Transport`] trait, with these backends:
//!
//! - [`soft`]: the same operations over TCP. The memory node runs a small engine
//!   ([`soft::SoftServer`]) that applies operations to its [`Region`] directly; requests are
//!   pipelined with fixed little-endian binary frames.
//! - [`shm`]: a same-host region shared by mapping a file in `/dev/shm`; operations are
//!   memcpy and CPU atomics. **Trusted mode**: a client that maps the region can touch all
//!   of it; the access check runs in the client library and catches bugs, not attackers.
//! - `verbs` (cargo feature `verbs`): RDMA RC queue pairs through libibverbs, loaded at
//!   run time; see the `verbs` module.
//!
//! Every backend promises exactly what RDMA RC promises and no more: aligned 8-byte
//! atomics are atomic with respect to each other; larger reads and writes may tear.
//!
//! Access control follows RDMA memory windows: the region is cut into fixed-size blocks,
//! each with an epoch and keys ([`AccessTable`]); an operation names a key and an epoch and
//! may touch only the one block the key was derived for.

#![warn(missing_docs)]

pub mod access;
pub mod buf;
pub mod error;
pub mod op;
pub mod region;
pub mod shm;
pub mod soft;
pub mod transport;
#[cfg(feature = "verbs")]
pub mod verbs;

pub use access::AccessTable;
pub use buf::LocalBuf;
pub use error::{Error, OpError, TransportError, VerbsError};
pub use op::{finish_batch, Op, OpCode, OpKind, OpStatus, RKey, RemoteAddr};
pub use region::{Region, RegionOptions};
pub use transport::{Transport, TransportKind};
