//! The RDMA verbs backend: one-sided operations on RC queue pairs (feature `verbs`).
//!
//! Built on `sideway`, which loads libibverbs at run time: one binary runs on hosts with
//! and without RDMA, and says clearly when there is no device ([`crate::VerbsError`]).
//!
//! - The memory node runs a [`VerbsServer`]: it registers its whole [`crate::Region`] as
//!   one memory region (not one per block: Soft-RoCE allows only about 2,000 MRs), listens
//!   on a TCP side channel, and for every connection request creates an RC queue pair,
//!   moves it through INIT, RTR and RTS, and answers with its QPN, PSN, GID, LID, MTU, the
//!   region's rkey (or the memory-window flag), base address and geometry ([`wire`]).
//! - Clients use [`VerbsTransport`], which implements [`crate::Transport`]: a batch is
//!   posted with one doorbell per window (one `ibv_wr_complete`/`ibv_post_send` call),
//!   only the last work request of a window is signaled, small writes go inline, and
//!   operation buffers that do not come from [`crate::Transport::alloc_buf`] go through a
//!   registered bounce buffer.
//!
//! # Access control
//!
//! The client checks each operation against the block geometry (one block, in the
//! region, aligned atomics, size limit) before posting it. Where the device has type-2
//! memory windows, the device enforces grants too: the region's memory region allows no
//! remote access, and each grant is a window the memory node binds, on the client's
//! queue pair, to exactly its block, and invalidates when the block's grant changes
//! (the [`crate::AccessTable`] tells the endpoint), so a stale or guessed rkey fails with
//! a remote access error ([`Isolation::MemoryWindows`]). Devices without windows get the
//! region's rkey, a **trusted mode** like [`crate::shm`] that catches bugs, not attackers
//! ([`Isolation::RegionKey`], logged). Soft-RoCE enforces a window's validity, key, queue
//! pair and rights but not its bounds (see `docs/RDMA.md`).
//!
//! # Atomics
//!
//! Remote CAS and FAA operate on the u64 in the memory node's native byte order (what
//! rxe and x86 hosts do), so on x86 they agree with the little-endian words of the soft
//! and shm backends; the conformance suite checks exactly that.

mod client;
mod device;
mod server;
mod window;
pub mod wire;

pub use client::{VerbsClientConfig, VerbsTransport};
pub use device::{device_names, DeviceConfig, DeviceInfo};
pub use server::{Isolation, VerbsServer, VerbsServerConfig};
