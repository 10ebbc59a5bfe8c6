//! Object flags (pinned, mapped to a backing path) and flushing an object of any kind
//! to the persistent tier, as the controller does when a mapped object's lease runs
//! out.
//!
//! The kind of the object at a path is read from the magic word of its meta block
//! (the first block owned by the path): [`File`], [`Queue`], [`Kv`] or [`Log`], whose
//! `sync` writes a [`super::Snapshot`] that the matching `load` restores. A path
//! holding blocks that are not a farpool object is flushed *raw*: the bytes of the
//! blocks it owns, in allocation order, concatenated (read them back with
//! [`Tier::get`]); a raw path with blocks below it is refused, since only the path's own
//! blocks would be written.

use super::{file, kv, log, queue, DsError, File, Kv, Log, Queue};
use crate::client::Client;
use crate::proto::{Backing, PoolPath};
use crate::tier::Tier;

/// Flags of an object, set right after creating it with [`ObjectFlags::apply`].
///
/// ```no_run
/// # fn main() -> Result<(), farpool::ds::DsError> {
/// use farpool::ds::{Kv, KvConfig, ObjectFlags};
/// let client = farpool::Client::connect("127.0.0.1:7070")?;
/// let task = client.task("/job/map/m0")?;
/// let kv = Kv::create(&task, "counts", KvConfig::default())?;
/// ObjectFlags::mapped("/var/lib/farpool/tier", "job/counts").apply(&client, kv.path())?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectFlags {
    /// Never reclaimed by lease expiry (removed only explicitly). Wins over `backing`:
    /// a pinned object is not flushed.
    pub pinned: bool,
    /// When the lease runs out, the controller flushes the object to this backing
    /// path, then frees it.
    pub backing: Option<Backing>,
}

impl ObjectFlags {
    /// Flags mapping an object to `key` in the tier at `tier_url` (an absolute
    /// directory, `file:///dir` or `s3://bucket/prefix`, as seen by the controller).
    pub fn mapped(tier_url: &str, key: &str) -> ObjectFlags {
        ObjectFlags {
            pinned: false,
            backing: Some(Backing {
                url: tier_url.to_string(),
                key: key.to_string(),
            }),
        }
    }

    /// Flags pinning an object.
    pub fn pinned() -> ObjectFlags {
        ObjectFlags {
            pinned: true,
            backing: None,
        }
    }

    /// Sets these flags on the object at `path` (the controller records them in its
    /// metadata log): pins or unpins it, and maps or unmaps it.
    pub fn apply(&self, client: &Client, path: &PoolPath) -> Result<(), DsError> {
        client.pin(path.as_str(), self.pinned)?;
        match &self.backing {
            Some(b) => client.map_to(path.as_str(), &b.url, &b.key)?,
            None => client.unmap(path.as_str())?,
        }
        Ok(())
    }
}

/// What lives at a path, by the magic word of its first block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A [`File`].
    File,
    /// A [`Queue`].
    Queue,
    /// A [`Kv`] table.
    Kv,
    /// A [`Log`].
    Log,
    /// Blocks that are not a farpool object (or a path without blocks).
    Raw,
}

impl ObjectKind {
    /// The kind whose meta block starts with `magic`.
    pub fn of_magic(magic: u64) -> ObjectKind {
        match magic {
            file::MAGIC => ObjectKind::File,
            queue::MAGIC => ObjectKind::Queue,
            kv::MAGIC => ObjectKind::Kv,
            log::MAGIC => ObjectKind::Log,
            _ => ObjectKind::Raw,
        }
    }
}

/// The kind of the object at `path`.
pub fn kind_at(client: &Client, path: &str) -> Result<ObjectKind, DsError> {
    let blocks = client.open_blocks(path, false)?;
    let Some(meta) = blocks.first() else {
        return Ok(ObjectKind::Raw);
    };
    let mut word = [0u8; 8];
    meta.read(0, &mut word)?;
    Ok(ObjectKind::of_magic(u64::from_le_bytes(word)))
}

/// Writes the object at `path` to `key` in `tier` with its kind's `sync`, without
/// removing it; returns its kind and the bytes stored. `has_children`: whether paths
/// below `path` own blocks (refused for a raw path, whose flush would miss them).
pub fn sync_any(
    client: &Client,
    path: &str,
    tier: &Tier,
    key: &str,
    has_children: bool,
) -> Result<(ObjectKind, u64), DsError> {
    let kind = kind_at(client, path)?;
    let n = match kind {
        ObjectKind::File => File::open(client, path)?.sync(tier, key)?,
        ObjectKind::Queue => Queue::open(client, path)?.sync(tier, key)?,
        ObjectKind::Kv => Kv::open(client, path)?.sync(tier, key)?,
        ObjectKind::Log => Log::open(client, path)?.sync(tier, key)?,
        ObjectKind::Raw if has_children => {
            return Err(DsError::Config(format!(
                "'{path}' is not a farpool object and paths below it own blocks; only its own blocks could be flushed, so nothing is: map each object's own path instead, or remove it"
            )))
        }
        ObjectKind::Raw => {
            let mut bytes = Vec::new();
            for b in client.open_blocks(path, false)? {
                let start = bytes.len();
                let len = usize::try_from(b.len()).map_err(|_| {
                    DsError::Config(format!("a block of '{path}' is too large to flush"))
                })?;
                bytes.resize(start + len, 0);
                b.read(0, &mut bytes[start..])?;
            }
            let n = bytes.len() as u64;
            tier.put(key, bytes)?;
            n
        }
    };
    Ok((kind, n))
}
