//! `sync`, `dump` and `load`: data structures to and from the persistent tier
//! ([`crate::tier::Tier`]), in the format of [`Snapshot`].
//!
//! `sync` writes a structure's contents under a key and leaves it in the pool; `dump`
//! does the same and then removes it from the pool (its memory goes back to the free
//! pool); `load` creates the structure at a path and fills it from the key. Contents
//! are read without stopping other clients: under concurrent writers a snapshot holds
//! each item as it was at some moment during the call.

use super::{DsError, File, Kv, KvConfig, Log, Queue, QueueConfig, Snapshot};
use crate::client::Client;
use crate::tier::Tier;

/// Reads and decodes the snapshot under `key`.
pub(super) fn fetch(tier: &Tier, key: &str) -> Result<Snapshot, DsError> {
    let bytes = tier.get(key)?;
    Snapshot::decode(&bytes).map_err(|source| DsError::Snapshot {
        key: key.to_string(),
        source,
    })
}

/// Stores `snap` under `key`; returns the bytes stored.
pub(super) fn store(tier: &Tier, key: &str, snap: &Snapshot) -> Result<u64, DsError> {
    let bytes = snap.encode();
    let n = bytes.len() as u64;
    tier.put(key, bytes)?;
    Ok(n)
}

/// Refuses to load into a structure that already holds data.
fn ensure_empty(
    empty: bool,
    kind: &'static str,
    path: &crate::proto::PoolPath,
) -> Result<(), DsError> {
    if empty {
        return Ok(());
    }
    Err(DsError::Exists {
        kind,
        path: path.clone(),
    })
}

/// The error for a snapshot of another kind.
pub(super) fn wrong(key: &str, wanted: &'static str, found: &Snapshot) -> DsError {
    DsError::Snapshot {
        key: key.to_string(),
        source: super::SnapshotError::WrongKind {
            wanted,
            found: found.kind(),
        },
    }
}

impl File {
    /// Writes the file's bytes to `tier` under `key`; returns the bytes stored.
    pub fn sync(&self, tier: &Tier, key: &str) -> Result<u64, DsError> {
        store(tier, key, &Snapshot::File(self.read_all()?))
    }

    /// [`File::sync`], then removes the file from the pool.
    pub fn dump(self, tier: &Tier, key: &str) -> Result<u64, DsError> {
        let n = self.sync(tier, key)?;
        self.destroy()?;
        Ok(n)
    }

    /// Creates the file at `path` holding what `key` in `tier` holds.
    pub fn load(client: &Client, path: &str, tier: &Tier, key: &str) -> Result<File, DsError> {
        let snap = fetch(tier, key)?;
        let Snapshot::File(bytes) = snap else {
            return Err(wrong(key, "file", &snap));
        };
        let f = File::create_at(client, path)?;
        ensure_empty(f.len()? == 0, "file", f.path())?;
        f.write_at(0, &bytes)?;
        Ok(f)
    }
}

impl Queue {
    /// Writes the queue's items (head first, without taking them) to `tier` under
    /// `key`; returns the bytes stored.
    pub fn sync(&self, tier: &Tier, key: &str) -> Result<u64, DsError> {
        store(tier, key, &Snapshot::Queue(self.items()?))
    }

    /// [`Queue::sync`], then removes the queue from the pool.
    pub fn dump(self, tier: &Tier, key: &str) -> Result<u64, DsError> {
        let n = self.sync(tier, key)?;
        self.destroy()?;
        Ok(n)
    }

    /// Creates the queue at `path` with `config` holding the items `key` in `tier`
    /// holds, in order.
    pub fn load(
        client: &Client,
        path: &str,
        config: QueueConfig,
        tier: &Tier,
        key: &str,
    ) -> Result<Queue, DsError> {
        let snap = fetch(tier, key)?;
        let Snapshot::Queue(items) = snap else {
            return Err(wrong(key, "queue", &snap));
        };
        let q = Queue::create_at(client, path, config)?;
        ensure_empty(q.is_empty()?, "queue", q.path())?;
        q.enqueue_many(&items)?;
        Ok(q)
    }
}

impl Kv {
    /// Writes every pair to `tier` under `key`; returns the bytes stored.
    pub fn sync(&self, tier: &Tier, key: &str) -> Result<u64, DsError> {
        store(tier, key, &Snapshot::Kv(self.entries()?))
    }

    /// [`Kv::sync`], then removes the table from the pool.
    pub fn dump(self, tier: &Tier, key: &str) -> Result<u64, DsError> {
        let n = self.sync(tier, key)?;
        self.destroy()?;
        Ok(n)
    }

    /// Creates the table at `path` with `config` holding the pairs `key` in `tier`
    /// holds (partitions split as they fill, as for any insert).
    pub fn load(
        client: &Client,
        path: &str,
        config: KvConfig,
        tier: &Tier,
        key: &str,
    ) -> Result<Kv, DsError> {
        let snap = fetch(tier, key)?;
        let Snapshot::Kv(pairs) = snap else {
            return Err(wrong(key, "kv table", &snap));
        };
        let kv = Kv::create_at(client, path, config)?;
        ensure_empty(kv.entries()?.is_empty(), "kv table", kv.path())?;
        kv.upsert_many(&pairs)?;
        Ok(kv)
    }
}

impl Log {
    /// Writes the log's complete entries (from its first untrimmed position) to
    /// `tier` under `key`; returns the bytes stored.
    pub fn sync(&self, tier: &Tier, key: &str) -> Result<u64, DsError> {
        let (start, bytes) = self.raw()?;
        store(tier, key, &Snapshot::Log { start, bytes })
    }

    /// [`Log::sync`], then removes the log from the pool.
    pub fn dump(self, tier: &Tier, key: &str) -> Result<u64, DsError> {
        let n = self.sync(tier, key)?;
        self.destroy()?;
        Ok(n)
    }

    /// Creates the log at `path` holding the entries `key` in `tier` holds, at the
    /// positions they had (positions before the first are trimmed).
    pub fn load(client: &Client, path: &str, tier: &Tier, key: &str) -> Result<Log, DsError> {
        let snap = fetch(tier, key)?;
        let Snapshot::Log { start, bytes } = snap else {
            return Err(wrong(key, "log", &snap));
        };
        let log = Log::create_at(client, path)?;
        ensure_empty(log.end()? == 0, "log", log.path())?;
        log.restore(start, &bytes)?;
        Ok(log)
    }
}
