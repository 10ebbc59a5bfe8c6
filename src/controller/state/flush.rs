//! Mapped paths: objects flushed to a backing path in the persistent tier when their
//! lease runs out, then freed.
//!
//! The state machine only decides; the I/O layer writes. When the whole subtree of a
//! mapped path has expired (`Namespace::subtree_expired`: every path past its
//! effective deadline plus grace, nothing pinned), [`ControllerState::tick`] queues a
//! [`FlushJob`] and emits [`Effect::Flush`]. The I/O layer reads the object and writes
//! it to the tier, then calls [`ControllerState::flush_done`] with the attempt's token:
//!
//! - success, and the subtree is *still* expired: the path and its subtree are removed
//!   (journaled as an ordinary `Remove`) and their blocks freed;
//! - success, but a client renewed the path (or an ancestor, or allocated below it)
//!   while the flush ran: nothing is freed; the object stays in the pool, the backing
//!   path holds the snapshot taken during the flush, and the object is flushed again
//!   at its next expiry. This is the renew-during-flush race: a renew always wins;
//! - failure (tier unreachable, object corrupt): nothing is freed; the reason is kept
//!   for `farpool status`, counted, and the flush retried after a backoff that starts
//!   at `StateConfig::flush_retry` and doubles up to
//!   [`MAX_FLUSH_BACKOFF`]. An operator may remove the path meanwhile.
//!
//! Jobs are not journaled: after a controller restart every lease is re-armed, so a
//! mapped path is flushed again one lease plus grace later.

use super::{canonical, ControllerState, Effect, Revocations};
use crate::controller::journal::Record;
use crate::controller::namespace::{PathId, Reclaimed, ROOT};
use crate::proto::{Backing, ControlError, FlushStatus, PoolPath};
use std::time::{Duration, Instant};

/// Longest wait between two attempts to flush a mapped path.
pub const MAX_FLUSH_BACKOFF: Duration = Duration::from_secs(300);

/// Longest tier URL or key accepted in a mapping.
const MAX_BACKING_LEN: usize = 1024;

/// A flush running or waiting for its next attempt.
#[derive(Debug, Clone)]
pub(super) struct FlushJob {
    id: PathId,
    gen: u64,
    backing: Backing,
    failures: u32,
    last_error: Option<String>,
    /// Token of the running attempt; `None` while none runs.
    in_flight: Option<u64>,
    next_try: Instant,
}

/// Checks a backing path for use by the controller process.
fn check_backing(b: &Backing) -> Result<(), ControlError> {
    let bad = |why: String| Err(ControlError::BadRequest(why));
    if b.url.is_empty() || b.url.len() > MAX_BACKING_LEN {
        return bad(format!(
            "tier URL must have 1 to {MAX_BACKING_LEN} bytes; use an absolute directory, file:///dir or s3://bucket/prefix"
        ));
    }
    if b.url == "memory:" {
        return bad("a mapping cannot use the 'memory:' tier: the controller flushes into its own process, where no client could load it; use a directory or s3://".into());
    }
    let local = b.url.strip_prefix("file://").unwrap_or(&b.url);
    if !b.url.starts_with("s3://") && !local.starts_with('/') {
        return bad(format!(
            "tier URL '{}' must be an absolute directory, file:///dir or s3://bucket/prefix (the controller resolves it, not the client)",
            b.url
        ));
    }
    if b.key.is_empty() || b.key.len() > MAX_BACKING_LEN || b.key.trim_matches('/').is_empty() {
        return bad(format!(
            "backing key must have 1 to {MAX_BACKING_LEN} bytes and name an object (not only '/')"
        ));
    }
    Ok(())
}

impl ControllerState {
    /// Maps `path` (which must exist, not the root) to `backing`, or unmaps it with
    /// `None`. Mappings do not nest: a path below or above a mapped path cannot be
    /// mapped. Unmapping drops a pending flush (a running attempt's result is then
    /// ignored).
    pub fn map(&mut self, path: &PoolPath, backing: Option<Backing>) -> Result<(), ControlError> {
        let path = canonical(path)?;
        if path.is_root() {
            return Err(ControlError::BadRequest(
                "the root cannot be mapped; map object paths".into(),
            ));
        }
        let id = self
            .ns
            .find(&path)
            .ok_or_else(|| ControlError::NotFound(path.clone().into_owned()))?;
        if let Some(b) = &backing {
            check_backing(b)?;
            let parent = self.ns.get(id).and_then(|n| n.parent).unwrap_or(ROOT);
            if let Some(above) = self.ns.mapped_at_or_above(parent) {
                let above = self.ns.get(above).map(|n| n.path.to_string());
                return Err(ControlError::BadRequest(format!(
                    "'{path}' lies inside mapped path '{}'; mappings do not nest, the whole object there is flushed already",
                    above.unwrap_or_default()
                )));
            }
            if self.ns.mapped_below(id) {
                return Err(ControlError::BadRequest(format!(
                    "a path below '{path}' is mapped; mappings do not nest, unmap it first"
                )));
            }
        } else {
            self.flushes.remove(path.as_ref());
        }
        self.ns.set_backing(id, backing.clone());
        self.log(Record::Map {
            path: path.into_owned(),
            backing,
        });
        Ok(())
    }

    /// Queues a flush for every mapped path in `due` not already queued.
    pub(super) fn queue_flushes(&mut self, due: &[PathId], now: Instant) {
        for &id in due {
            let (Some(node), Some(gen)) = (self.ns.get(id), self.ns.gen(id)) else {
                continue;
            };
            let Some(backing) = node.backing.clone() else {
                continue;
            };
            if self.flushes.contains_key(&node.path) {
                continue;
            }
            tracing::info!(path = %node.path, %backing, "lease of a mapped path ran out; flushing it");
            self.flushes.insert(
                node.path.clone(),
                FlushJob {
                    id,
                    gen,
                    backing,
                    failures: 0,
                    last_error: None,
                    in_flight: None,
                    next_try: now,
                },
            );
        }
    }

    /// Whether job `j` still refers to a live, mapped path whose subtree is expired.
    fn still_due(&self, j: &FlushJob, now: Instant) -> bool {
        self.ns.gen(j.id) == Some(j.gen)
            && self
                .ns
                .get(j.id)
                .is_some_and(|n| n.backing.as_ref() == Some(&j.backing))
            && self.ns.subtree_expired(j.id, now, self.cfg.grace)
    }

    /// Starts every queued flush that is due; drops jobs whose path was renewed,
    /// unmapped or removed since.
    pub(super) fn start_flushes(&mut self, now: Instant) -> Vec<Effect> {
        let mut effects = Vec::new();
        let mut drop = Vec::new();
        let due: Vec<PoolPath> = self
            .flushes
            .iter()
            .filter(|(_, j)| j.in_flight.is_none() && j.next_try <= now)
            .map(|(p, _)| p.clone())
            .collect();
        for path in due {
            let Some(j) = self.flushes.get(&path) else {
                continue;
            };
            if !self.still_due(j, now) {
                drop.push(path);
                continue;
            }
            let has_children = self.ns.get(j.id).is_some_and(|n| {
                n.subtree_bytes > n.blocks.len() as u64 * self.registry.block_size().unwrap_or(0)
            });
            let token = self.next_flush_token;
            self.next_flush_token += 1;
            let backing = j.backing.clone();
            if let Some(j) = self.flushes.get_mut(&path) {
                j.in_flight = Some(token);
            }
            effects.push(Effect::Flush {
                path,
                backing,
                token,
                has_children,
            });
        }
        for path in drop {
            tracing::info!(%path, "mapped path was renewed, unmapped or removed before its flush; kept as it is");
            self.flushes.remove(&path);
        }
        effects
    }

    /// Records the outcome of flush attempt `token` of `path`: `Ok(bytes written)` or
    /// `Err(reason)`. On success the path is removed and its blocks freed, unless it
    /// was renewed meanwhile (see the module documentation); on failure the flush is
    /// retried later. Returns the revocations to send.
    pub fn flush_done(
        &mut self,
        path: &PoolPath,
        token: u64,
        result: Result<u64, String>,
        now: Instant,
    ) -> Vec<Effect> {
        let Some(j) = self.flushes.get(path) else {
            return Vec::new();
        };
        if j.in_flight != Some(token) {
            return Vec::new();
        }
        let still_due = self.still_due(j, now);
        let id = j.id;
        match result {
            Ok(bytes) if still_due => {
                self.flushes.remove(path);
                let mut gone = Reclaimed::default();
                self.ns.remove_subtree(id, &mut gone);
                self.log(Record::Remove { path: path.clone() });
                self.flushes_total += 1;
                self.blocks_expired_total += gone.blocks.len() as u64;
                tracing::info!(%path, bytes, blocks = gone.blocks.len(), "mapped path flushed to its backing path and freed");
                let mut revs = Revocations::default();
                self.release_all(&gone.blocks, &mut revs);
                self.forget_removed_flushes();
                revs.into_effects()
            }
            Ok(bytes) => {
                self.flushes.remove(path);
                tracing::info!(%path, bytes, "mapped path was renewed during its flush; kept in the pool (the backing path holds the snapshot)");
                Vec::new()
            }
            Err(reason) => {
                self.flush_failures_total += 1;
                if let Some(j) = self.flushes.get_mut(path) {
                    j.in_flight = None;
                    j.failures = j.failures.saturating_add(1);
                    let exp = j.failures.saturating_sub(1).min(20);
                    let wait = self
                        .cfg
                        .flush_retry
                        .saturating_mul(1u32 << exp)
                        .min(MAX_FLUSH_BACKOFF);
                    j.next_try = super::later(now, wait);
                    tracing::warn!(
                        %path,
                        backing = %j.backing,
                        failures = j.failures,
                        retry_in = ?wait,
                        "flushing a mapped path failed; its data stays in the pool: {reason}"
                    );
                    j.last_error = Some(reason);
                }
                Vec::new()
            }
        }
    }

    /// Drops jobs whose path is gone (removed by an operator or with an ancestor).
    pub(super) fn forget_removed_flushes(&mut self) {
        let ns = &self.ns;
        self.flushes.retain(|_, j| ns.gen(j.id) == Some(j.gen));
    }

    /// Flushes running or waiting, in path order.
    pub(super) fn flush_status(&self, now: Instant) -> Vec<FlushStatus> {
        self.flushes
            .iter()
            .map(|(path, j)| FlushStatus {
                path: path.clone(),
                backing: j.backing.clone(),
                failures: j.failures,
                last_error: j.last_error.clone(),
                in_flight: j.in_flight.is_some(),
                retry_in_ms: u64::try_from(j.next_try.saturating_duration_since(now).as_millis())
                    .unwrap_or(u64::MAX),
            })
            .collect()
    }
}
