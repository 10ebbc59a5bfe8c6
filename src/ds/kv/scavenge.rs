//! Reclaiming a [`Kv`]'s blocks that no published map names any more.
//!
//! A client that dies in the short windows between taking fresh blocks and naming
//! them in the root, or between publishing a new map and retiring the old
//! partitions, leaves blocks that nothing reaches: an unpublished directory block,
//! replaced partitions, the replaced directory. Repartitioning never looks at them
//! again, so without this they would stay allocated until the table is removed.
//!
//! [`Kv::scavenge`] holds the table's fence, so no live client repartitions, and
//! first rewrites the root with its own token (same directory, still idle): a holder
//! whose fence expired before it took the root (it may still be about to) now fails
//! its root CAS; `next` is read after that, and a fence renewal after the read proves
//! nobody took the fence since, so every child index below that `next` which the
//! directory in force does not name is garbage, for good. Each is freed through the meta block's directory entry
//! (`Linked` → retired; `Empty`, a block allocated but never linked → marked freed and
//! its path removed), so a stalled client that wakes up finds it freed and stops.

use super::repart::{REPARTITION_WAIT, ROOT};
use super::root::Root;
use super::{Kv, NEXT};
use crate::ds::object::{Entry, HEADER};
use crate::ds::DsError;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// What one [`Kv::scavenge`] freed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvScavenged {
    /// Child blocks (directories and partitions) no published map named, freed.
    pub freed: u64,
    /// Child indices looked at (those below the table's `next` counter).
    pub examined: u64,
}

impl Kv {
    /// Frees the table's directory and partition blocks that the map in force does
    /// not name: leftovers of clients that died just before naming fresh blocks in the
    /// root or just after publishing a new map (see `docs/DATA_STRUCTURES.md`,
    /// "Kv"). Finishes a repartitioning in progress first (as [`Kv::settle`]); safe
    /// while other clients use the table (it holds the table's fence, so they wait
    /// for it only if they need to repartition). Value blocks of large values are
    /// not examined. Costs a READ of the meta block's directory plus one controller
    /// call per block freed. Bounded by the repartitioning wait (10 s): gives
    /// [`DsError::Corrupt`] naming the cause when the fence stays held that long.
    pub fn scavenge(&self) -> Result<KvScavenged, DsError> {
        let deadline = Instant::now() + REPARTITION_WAIT;
        loop {
            self.settle()?;
            if let Some(token) = self.fence_acquire()? {
                let out = self.scavenge_fenced(token);
                // Best effort: an unreleased fence only delays the next run by its TTL.
                let _ = self.fence_release(token);
                if let Some(done) = out? {
                    return Ok(done);
                }
            }
            if Instant::now() > deadline {
                return Err(self.stuck());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// One pass while holding fence `token`; `None` when the root was busy or
    /// changed (the caller settles and tries again).
    fn scavenge_fenced(&self, token: u64) -> Result<Option<KvScavenged>, DsError> {
        let raw = self.map_block.faa(ROOT, 0)?;
        let Some(root) = Root::decode(raw) else {
            return Ok(Some(KvScavenged::default())); // no partition yet
        };
        if root.busy || root.token >= token {
            return Ok(None);
        }
        // Stale holders (smaller tokens) can no longer take the root: its value is new.
        let bumped = self.root_word(root.dir, token, false)?;
        if self.map_block.cas(ROOT, raw, bumped)? != raw {
            return Ok(None);
        }
        self.collect_unreachable(root.dir, token)
    }

    /// Frees every child below `next` that neither the map block, the directory
    /// block `dir` nor its entries name. The caller holds fence `token`, and the root
    /// (idle, naming `dir`) holds that token. `None` when the fence was lost.
    ///
    /// Why this frees only garbage, however long this client pauses: `next` is read
    /// after the root took our token, so a holder with a smaller token can no longer
    /// take the root (its fresh children are garbage); the fence renewal that follows
    /// succeeds only if nobody acquired the fence since ours, so every later holder
    /// takes its children from `next` after our read (indices we do not touch); and
    /// a later directory names only children of `dir` or newer ones.
    pub(super) fn collect_unreachable(
        &self,
        dir: u64,
        token: u64,
    ) -> Result<Option<KvScavenged>, DsError> {
        let Some(entries) = self.read_dir(dir)? else {
            return Err(self.corrupt(format!(
                "directory block {} named by the idle root is gone",
                dir
            )));
        };
        let mut live: HashSet<u64> = entries.iter().map(|e| e >> 8).collect();
        live.insert(dir);
        live.insert(0); // the map block
        let next = self.obj.meta().faa(NEXT, 0)?.clamp(1, self.obj.entries());
        if !self.fence_renew(token)? {
            return Ok(None);
        }
        // One READ of entries 1..next; each one acted on is re-read atomically (a
        // READ may see a word mid-CAS torn).
        let mut buf = vec![0u8; 8 * (next as usize - 1)];
        self.obj.meta().read(HEADER + 8, &mut buf)?;
        let mut done = KvScavenged {
            freed: 0,
            examined: next - 1,
        };
        for (i, word) in super::le_words(&buf).enumerate() {
            let k = i as u64 + 1;
            if live.contains(&k) || word == crate::ds::object::FREED {
                continue;
            }
            let was = self.obj.entry(k)?;
            let freed = match was {
                Entry::Freed => 0,
                Entry::Linked(_) => {
                    self.discard(k)?;
                    1
                }
                // Allocated but never linked, or (usually) nothing at all.
                Entry::Empty => match self.obj.forget_empty(k)? {
                    Some(blocks) => blocks,
                    None => {
                        self.discard(k)?; // linked meanwhile by a stale holder
                        1
                    }
                },
            };
            if freed > 0 {
                tracing::info!(table = %self.obj.path(), child = k, entry = ?was, "scavenged an unreachable block");
                done.freed += freed;
            }
        }
        Ok(Some(done))
    }
}
