//! What every object shares: the meta block at the object's path (magic word,
//! configuration words, hints) and the directory of its child blocks at `<path>/<prefix><k>`.
//!
//! Layout of the meta block: word 0 is the magic (set last, by CAS), words 1..8 are the
//! object's own (configuration and counters), and directory entry `k` is the word at
//! `HEADER + 8k`: 0 (never linked), a block id ([`super::encode_id`]), or [`FREED`].
//! Word 56 of every object kind (Kv, Queue, File, Log) counts its notification
//! listeners ([`super::notify`]); their own words end before it.

use super::{decode_id, encode_id, DsError};
use crate::client::{BlockHandle, Client, ClientError};
use crate::proto::{BlockId, ControlError, Placement, PoolPath, Request, Response};
use std::time::{Duration, Instant};

/// Offset of the magic word.
const MAGIC: u64 = 0;
/// Bytes before the directory.
pub(crate) const HEADER: u64 = 64;
/// Directory word of a freed child (terminal).
pub(crate) const FREED: u64 = u64::MAX;
/// How long an opener waits for a concurrent creator to publish the magic word.
const CREATE_WAIT: Duration = Duration::from_secs(5);

/// A directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    /// Never linked.
    Empty,
    /// Linked to this block.
    Linked(BlockId),
    /// Linked once, freed since; never linked again.
    Freed,
}

/// An object's meta block and the client to reach it.
pub(crate) struct Object {
    client: Client,
    path: PoolPath,
    meta: BlockHandle,
    kind: &'static str,
    prefix: &'static str,
    /// Copies of each block: those of the meta block (see [`Client::with_copies`]).
    copies: u8,
}

impl Object {
    /// Creates the object at `path`, or joins a concurrent creation of it: the first
    /// block allocated at `path` wins; its creator sets the words `config(block_len)`
    /// returns (offset, value; offsets in `8..HEADER`) and then the magic word.
    pub(crate) fn create(
        client: &Client,
        path: PoolPath,
        kind: &'static str,
        magic: u64,
        prefix: &'static str,
        config: impl FnOnce(u64) -> Result<Vec<(u64, u64)>, DsError>,
    ) -> Result<Object, DsError> {
        let mine = alloc_one(client, &path, 1, client.copies())?;
        let config = match config(mine.len()) {
            Ok(c) => c,
            Err(e) => {
                free_quietly(client, &path, mine.id());
                return Err(e);
            }
        };
        let meta = match lookup(client, &path)?.into_iter().next() {
            Some(first) => first,
            None => return Err(DsError::NotFound { kind, path }),
        };
        let won = meta.id() == mine.id();
        if !won {
            free_quietly(client, &path, mine.id());
        }
        let obj = Object {
            client: client.clone(),
            path,
            copies: copies_of(&meta),
            meta,
            kind,
            prefix,
        };
        if won {
            // The block is fresh (zeroed), so adding the value sets the word atomically.
            let mut ops = Vec::with_capacity(config.len());
            for (off, value) in config {
                debug_assert!((8..HEADER).contains(&off));
                ops.push(obj.meta.faa_op(off, value)?);
            }
            obj.meta.execute(&mut ops)?;
            // Only after the configuration completed (never in the same batch).
            obj.meta.cas(MAGIC, 0, magic)?;
        }
        obj.wait_magic(magic)?;
        Ok(obj)
    }

    /// Opens the object at `path`.
    pub(crate) fn open(
        client: &Client,
        path: PoolPath,
        kind: &'static str,
        magic: u64,
        prefix: &'static str,
    ) -> Result<Object, DsError> {
        let meta = match lookup(client, &path) {
            Ok(grants) => grants.into_iter().next(),
            Err(ClientError::Control(ControlError::NotFound(_))) => None,
            Err(e) => return Err(e.into()),
        };
        let Some(meta) = meta else {
            return Err(DsError::NotFound { kind, path });
        };
        let obj = Object {
            client: client.clone(),
            path,
            copies: copies_of(&meta),
            meta,
            kind,
            prefix,
        };
        obj.wait_magic(magic)?;
        Ok(obj)
    }

    /// Opens the object at `path` if its magic word is one of `magics` (`kind` names
    /// them in errors).
    pub(crate) fn open_any(
        client: &Client,
        path: PoolPath,
        kind: &'static str,
        magics: &[u64],
    ) -> Result<Object, DsError> {
        let first = magics.first().copied().unwrap_or(0);
        match Object::open(client, path.clone(), kind, first, "") {
            Err(DsError::WrongKind { found, .. }) if magics.contains(&found) => {
                Object::open(client, path, kind, found, "")
            }
            other => other,
        }
    }

    fn wait_magic(&self, magic: u64) -> Result<(), DsError> {
        let deadline = Instant::now() + CREATE_WAIT;
        loop {
            match self.word(MAGIC)? {
                w if w == magic => return Ok(()),
                0 if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                0 => {
                    return Err(DsError::NotFound {
                        kind: self.kind,
                        path: self.path.clone(),
                    })
                }
                found => {
                    return Err(DsError::WrongKind {
                        kind: self.kind,
                        path: self.path.clone(),
                        found,
                    })
                }
            }
        }
    }

    /// The client the object was opened with.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// The object's path.
    pub(crate) fn path(&self) -> &PoolPath {
        &self.path
    }

    /// The meta block.
    pub(crate) fn meta(&self) -> &BlockHandle {
        &self.meta
    }

    /// Length of the meta block (and the least length of every child block).
    pub(crate) fn block_len(&self) -> u64 {
        self.meta.len()
    }

    /// Atomic read of the meta word at `off`.
    pub(crate) fn word(&self, off: u64) -> Result<u64, ClientError> {
        self.meta.faa(off, 0)
    }

    /// Raises the meta word at `off` to at least `value` (CAS loop).
    pub(crate) fn raise(&self, off: u64, value: u64) -> Result<(), ClientError> {
        let mut cur = self.word(off)?;
        while cur < value {
            let found = self.meta.cas(off, cur, value)?;
            if found == cur {
                break;
            }
            cur = found;
        }
        Ok(())
    }

    /// Number of directory entries.
    pub(crate) fn entries(&self) -> u64 {
        self.meta.len().saturating_sub(HEADER) / 8
    }

    fn dir_off(&self, k: u64) -> Result<u64, DsError> {
        if k >= self.entries() {
            return Err(DsError::DirectoryFull {
                path: self.path.clone(),
                entries: self.entries(),
            });
        }
        Ok(HEADER + 8 * k)
    }

    /// Directory entry `k`.
    pub(crate) fn entry(&self, k: u64) -> Result<Entry, DsError> {
        Ok(match self.word(self.dir_off(k)?)? {
            0 => Entry::Empty,
            FREED => Entry::Freed,
            w => Entry::Linked(decode_id(w)),
        })
    }

    fn child_path(&self, k: u64) -> Result<PoolPath, DsError> {
        Ok(self.path.join(&format!("{}{k}", self.prefix))?)
    }

    /// The handle of child `k`, linking a new block if the entry is empty. `None` when
    /// the child was freed.
    pub(crate) fn link(&self, k: u64) -> Result<Option<BlockHandle>, DsError> {
        match self.entry(k)? {
            Entry::Linked(id) => return self.child_handle(k, id),
            Entry::Freed => return Ok(None),
            Entry::Empty => {}
        }
        let path = self.child_path(k)?;
        let need = self.block_len();
        let block = alloc_one(&self.client, &path, need, self.copies)?;
        if block.len() < need {
            free_quietly(&self.client, &path, block.id());
            return Err(DsError::BlockSize {
                path: self.path.clone(),
                needed: need,
                granted: block.len(),
            });
        }
        let id = encode_id(block.id());
        if id == 0 || id == FREED {
            free_quietly(&self.client, &path, block.id());
            return Err(DsError::Corrupt {
                path: self.path.clone(),
                what: format!("block id {} cannot be stored in a directory", block.id()),
            });
        }
        let found = self.meta.cas(self.dir_off(k)?, 0, id)?;
        if found == 0 {
            return Ok(Some(block));
        }
        // Someone else linked (or already freed) child k: give ours back.
        free_quietly(&self.client, &path, block.id());
        match found {
            FREED => Ok(None),
            w => self.child_handle(k, decode_id(w)),
        }
    }

    /// Marks never-linked child `k` freed, so it is never linked; whether it was
    /// still unlinked (`false`: linked or freed meanwhile).
    pub(crate) fn kill_empty(&self, k: u64) -> Result<bool, DsError> {
        Ok(self.meta.cas(self.dir_off(k)?, 0, FREED)? == 0)
    }

    /// Marks never-linked child `k` freed and removes whatever was allocated at its
    /// path (a client that died between allocating and linking it): the blocks
    /// freed, or `None` when the child was linked meanwhile.
    pub(crate) fn forget_empty(&self, k: u64) -> Result<Option<u64>, DsError> {
        if !self.kill_empty(k)? {
            return Ok(None);
        }
        match self.client.request(Request::Remove {
            path: self.child_path(k)?,
        }) {
            Ok(Response::Removed { blocks, .. }) => Ok(Some(blocks)),
            Ok(_) | Err(ClientError::Control(ControlError::NotFound(_))) => Ok(Some(0)),
            Err(e) => Err(e.into()),
        }
    }

    /// The handle of linked child `k` (block `id`); `None` when it was freed since.
    pub(crate) fn child_handle(&self, k: u64, id: BlockId) -> Result<Option<BlockHandle>, DsError> {
        match lookup(&self.client, &self.child_path(k)?) {
            Ok(grants) => Ok(grants.into_iter().find(|g| g.id() == id)),
            Err(ClientError::Control(ControlError::NotFound(_))) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Marks child `k` (block `id`) freed and removes its path, freeing the block.
    pub(crate) fn retire(&self, k: u64, id: BlockId) -> Result<(), DsError> {
        let found = self.meta.cas(self.dir_off(k)?, encode_id(id), FREED)?;
        if found == FREED {
            return Ok(()); // another client retired it (a log trimmed concurrently)
        }
        if found != encode_id(id) {
            return Err(DsError::Corrupt {
                path: self.path.clone(),
                what: format!("directory entry {k} changed while its block was being retired"),
            });
        }
        match self.client.request(Request::Remove {
            path: self.child_path(k)?,
        }) {
            Ok(_) | Err(ClientError::Control(ControlError::NotFound(_))) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Allocates one block of at least `bytes` at the child path `name` (outside the
    /// directory: the caller records the block id itself).
    pub(crate) fn alloc_named(&self, name: &str, bytes: u64) -> Result<BlockHandle, DsError> {
        alloc_one(
            &self.client,
            &self.path.join(name)?,
            bytes.max(1),
            self.copies,
        )
    }

    /// The handle of block `id` at the child path `name`; `None` when it is gone.
    pub(crate) fn lookup_named(
        &self,
        name: &str,
        id: BlockId,
    ) -> Result<Option<BlockHandle>, DsError> {
        match lookup(&self.client, &self.path.join(name)?) {
            Ok(grants) => Ok(grants.into_iter().find(|g| g.id() == id)),
            Err(ClientError::Control(ControlError::NotFound(_))) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the child path `name` and frees its blocks (nothing if it is gone).
    pub(crate) fn remove_named(&self, name: &str) -> Result<(), DsError> {
        match self.client.request(Request::Remove {
            path: self.path.join(name)?,
        }) {
            Ok(_) | Err(ClientError::Control(ControlError::NotFound(_))) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the object and everything under it.
    pub(crate) fn destroy(&self) -> Result<(), DsError> {
        self.client.remove(self.path.as_str())?;
        Ok(())
    }
}

/// Copies per block of the object whose meta block is `meta`.
fn copies_of(meta: &BlockHandle) -> u8 {
    meta.grant().replication.as_ref().map_or(1, |r| r.copies)
}

/// Allocates one block of at least `bytes` at `path`, with `copies` copies.
fn alloc_one(
    client: &Client,
    path: &PoolPath,
    bytes: u64,
    copies: u8,
) -> Result<BlockHandle, DsError> {
    let req = if copies > 1 {
        Request::AllocReplicated {
            path: path.clone(),
            bytes,
            placement: Placement::LeastLoaded,
            copies,
        }
    } else {
        Request::Alloc {
            path: path.clone(),
            bytes,
            placement: Placement::LeastLoaded,
        }
    };
    let resp = client.request(req)?;
    let Response::Blocks(grants) = resp else {
        return Err(ClientError::unexpected(&resp).into());
    };
    let mut blocks = client.handles(path, grants)?;
    if blocks.len() == 1 {
        if let Some(b) = blocks.pop() {
            return Ok(b);
        }
    }
    // Mixed block sizes: more than one block for `bytes`.
    let granted = blocks.first().map_or(0, |b| b.len());
    for b in &blocks {
        free_quietly(client, path, b.id());
    }
    Err(DsError::BlockSize {
        path: path.clone(),
        needed: bytes,
        granted,
    })
}

/// The writable handles of the blocks owned by exactly `path`, in allocation order.
fn lookup(client: &Client, path: &PoolPath) -> Result<Vec<BlockHandle>, ClientError> {
    match client.request(Request::Lookup {
        path: path.clone(),
        writable: true,
    })? {
        Response::Blocks(grants) => client.handles(path, grants),
        other => Err(ClientError::unexpected(&other)),
    }
}

/// Frees a block this client allocated and does not need; a failure only delays its
/// reclamation until the object (or its lease) goes, so it is logged, not returned.
fn free_quietly(client: &Client, path: &PoolPath, id: BlockId) {
    let r = client.request(Request::Free {
        path: path.clone(),
        blocks: vec![id],
    });
    if let Err(e) = r {
        tracing::debug!(%path, block = %id, error = %e, "could not free a surplus block");
    }
}
