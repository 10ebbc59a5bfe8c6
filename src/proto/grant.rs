//! Block identities, grants and key derivation.
//!
//! The controller and each memory node share a 128-bit secret. The key for a block
//! epoch is a keyed SipHash over `(node, block, epoch, rights)`, so the memory node can
//! derive the keys for every block epoch itself and the controller never has to ship
//! keys to it; a client cannot forge a key without the secret, and a freed block's
//! keys die with its epoch.

use farpool_rdma::{RKey, RemoteAddr, TransportKind};
use serde::{Deserialize, Serialize};
use siphasher::sip::SipHasher24;
use std::hash::Hasher;

/// A 128-bit secret shared by the controller and memory nodes.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret(pub [u8; 16]);

impl Secret {
    /// A fresh random secret.
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Derives the key for `block` at `epoch` on `node`, read-write or read-only. Never 0.
pub fn derive_key(secret: &Secret, node: u32, block: u32, epoch: u32, writable: bool) -> u64 {
    let mut h = SipHasher24::new_with_key(&secret.0);
    h.write_u32(node);
    h.write_u32(block);
    h.write_u32(epoch);
    h.write_u8(u8::from(writable));
    match h.finish() {
        0 => 1,
        k => k,
    }
}

/// Identity of a block: memory node and block index in its region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockId {
    /// Memory node id (assigned by the controller at registration).
    pub node: u32,
    /// Block index in the node's region.
    pub index: u32,
}

impl std::fmt::Display for BlockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "n{}/b{}", self.node, self.index)
    }
}

/// How to reach a memory node's data plane.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// Memory node id.
    pub node: u32,
    /// Transport the node serves.
    pub transport: WireTransport,
    /// `host:port` of the soft data plane, or the shm file path.
    pub addr: String,
}

/// Serializable mirror of [`TransportKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WireTransport {
    /// TCP soft transport.
    Soft,
    /// Same-host shared memory.
    Shm,
    /// RDMA verbs.
    Verbs,
}

impl From<TransportKind> for WireTransport {
    fn from(k: TransportKind) -> Self {
        match k {
            TransportKind::Soft => Self::Soft,
            TransportKind::Shm => Self::Shm,
            TransportKind::Verbs => Self::Verbs,
        }
    }
}

impl From<WireTransport> for TransportKind {
    fn from(k: WireTransport) -> Self {
        match k {
            WireTransport::Soft => Self::Soft,
            WireTransport::Shm => Self::Shm,
            WireTransport::Verbs => Self::Verbs,
        }
    }
}

/// A capability for one block: where it is, which epoch, which key, which rights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockGrant {
    /// The block.
    pub block: BlockId,
    /// How to reach its memory node.
    pub endpoint: Endpoint,
    /// Byte offset of the block in the node's region.
    pub offset: u64,
    /// Block length in bytes.
    pub len: u64,
    /// Block epoch the grant is valid for.
    pub epoch: u32,
    /// Access key.
    pub key: u64,
    /// Whether the key allows writes and atomics.
    pub writable: bool,
    /// The other copies of a replicated block (`None`: the block has one copy).
    pub replication: Option<Box<Replication>>,
}

/// The replica set of a replicated block, carried by the grant of its primary copy
/// (the first live copy: reads and atomics go there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replication {
    /// The replica group's id (stable while copies come and go); used to refresh
    /// the grant with [`crate::proto::Request::Refresh`].
    pub group: u64,
    /// Copies wanted.
    pub copies: u8,
    /// The block's stable identity: its first copy at allocation, which
    /// [`crate::client::BlockHandle::id`] reports and which names the block in frees
    /// and in ids stored in the pool even after that copy was lost and replaced.
    pub origin: BlockId,
    /// Grants for the other copies, each with whether it is in sync (`false`: a new
    /// copy being filled by re-replication, to be written but never read).
    pub others: Vec<(BlockGrant, bool)>,
}

impl BlockGrant {
    /// The remote address of byte `offset` of this block.
    pub fn remote(&self, offset: u64) -> RemoteAddr {
        RemoteAddr::new(
            self.offset + offset,
            RKey {
                key: self.key,
                epoch: self.epoch,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_by_every_input() {
        let s = Secret([7; 16]);
        let k = derive_key(&s, 1, 2, 3, true);
        assert_ne!(k, derive_key(&s, 2, 2, 3, true));
        assert_ne!(k, derive_key(&s, 1, 3, 3, true));
        assert_ne!(k, derive_key(&s, 1, 2, 4, true));
        assert_ne!(k, derive_key(&s, 1, 2, 3, false));
        assert_ne!(k, derive_key(&Secret([8; 16]), 1, 2, 3, true));
        assert_eq!(k, derive_key(&s, 1, 2, 3, true));
    }
}
