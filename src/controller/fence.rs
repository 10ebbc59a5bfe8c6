//! Fenced locks: one holder per path at a time, each grant with a larger token.
//!
//! Clients use them to arbitrate work on a data structure that must have one driver at
//! a time (a `Kv` repartitioning): the holder gets a token that no earlier or later
//! grant shares and that only grows, and keeps the lock by renewing it within its TTL.
//! When the holder stops renewing, the lock expires and the next client gets a larger
//! token. The controller does not touch the data: the structure itself records the
//! token of whoever is working on it and refuses (by compare-and-swap) a smaller one,
//! so a holder that was superseded cannot complete anything.
//!
//! Pure logic, no I/O. Grants and releases are journaled ([`Record::Fenced`],
//! [`Record::Unfenced`]) and snapshotted, so a controller restart never hands out a
//! token again and keeps held locks held (their TTL re-armed from the restart, as path
//! leases are).
//!
//! [`Record::Fenced`]: super::journal::Record::Fenced
//! [`Record::Unfenced`]: super::journal::Record::Unfenced

use super::journal::SnapFence;
use crate::proto::{ControlError, PoolPath};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Longest TTL a client may ask for.
pub const MAX_FENCE_TTL: Duration = Duration::from_secs(60);

/// One held lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    token: u64,
    ttl: Duration,
    expires: Instant,
}

/// Every fenced lock the controller knows.
#[derive(Debug, Default)]
pub struct Fences {
    /// Token of the next grant (never reused, across restarts too).
    next: u64,
    held: BTreeMap<PoolPath, Held>,
}

/// Checks a TTL asked for by a client.
fn ttl_of(ttl_ms: u64) -> Result<Duration, ControlError> {
    let ttl = Duration::from_millis(ttl_ms);
    if ttl.is_zero() || ttl > MAX_FENCE_TTL {
        return Err(ControlError::BadRequest(format!(
            "fence TTL of {ttl_ms} ms is out of range; ask for 1 ms to {} s",
            MAX_FENCE_TTL.as_secs()
        )));
    }
    Ok(ttl)
}

impl Fences {
    /// No locks; the first token is 1.
    pub fn new() -> Self {
        Self {
            next: 1,
            held: BTreeMap::new(),
        }
    }

    /// Grants the lock on `path` for `ttl_ms` when no one holds it (or its holder let
    /// it expire): returns the new token, which is larger than every earlier one.
    pub fn acquire(
        &mut self,
        path: &PoolPath,
        ttl_ms: u64,
        now: Instant,
    ) -> Result<u64, ControlError> {
        let ttl = ttl_of(ttl_ms)?;
        if let Some(h) = self.held.get(path) {
            if h.expires > now {
                return Err(ControlError::FenceHeld {
                    path: path.clone(),
                    retry_ms: u64::try_from((h.expires - now).as_millis())
                        .unwrap_or(u64::MAX)
                        .max(1),
                });
            }
        }
        let token = self.next;
        self.grant(path, token, ttl, now);
        Ok(token)
    }

    /// Records a grant (also what replaying a journaled grant does).
    pub fn grant(&mut self, path: &PoolPath, token: u64, ttl: Duration, now: Instant) {
        self.next = self.next.max(token.saturating_add(1));
        self.held.insert(
            path.clone(),
            Held {
                token,
                ttl,
                expires: now + ttl,
            },
        );
    }

    /// Extends the lock on `path` held under `token` by `ttl_ms` from `now`. Fails when
    /// another token holds it now or it was released (the caller was superseded: it
    /// must stop), also when it expired but no one took it since (then it is renewed).
    pub fn renew(
        &mut self,
        path: &PoolPath,
        token: u64,
        ttl_ms: u64,
        now: Instant,
    ) -> Result<(), ControlError> {
        let ttl = ttl_of(ttl_ms)?;
        match self.held.get_mut(path) {
            Some(h) if h.token == token => {
                h.ttl = ttl;
                h.expires = now + ttl;
                Ok(())
            }
            _ => Err(ControlError::FenceLost {
                path: path.clone(),
                token,
            }),
        }
    }

    /// Releases the lock on `path` if `token` holds it; whether it did.
    pub fn release(&mut self, path: &PoolPath, token: u64) -> bool {
        match self.held.get(path) {
            Some(h) if h.token == token => {
                self.held.remove(path);
                true
            }
            _ => false,
        }
    }

    /// Forgets locks that expired before `now`; returns them (path, token) for the
    /// journal.
    pub fn expire(&mut self, now: Instant) -> Vec<(PoolPath, u64)> {
        let gone: Vec<(PoolPath, u64)> = self
            .held
            .iter()
            .filter(|(_, h)| h.expires <= now)
            .map(|(p, h)| (p.clone(), h.token))
            .collect();
        for (p, _) in &gone {
            self.held.remove(p);
        }
        gone
    }

    /// The token the next grant gets.
    pub fn next_token(&self) -> u64 {
        self.next
    }

    /// The held locks, in path order.
    pub fn snapshot(&self) -> Vec<SnapFence> {
        self.held
            .iter()
            .map(|(p, h)| SnapFence {
                path: p.clone(),
                token: h.token,
                ttl_ms: u64::try_from(h.ttl.as_millis()).unwrap_or(u64::MAX),
            })
            .collect()
    }

    /// Rebuilds from a snapshot: every lock held again for its TTL from `now`.
    pub fn restore(&mut self, next: u64, fences: &[SnapFence], now: Instant) {
        self.next = self.next.max(next);
        for f in fences {
            let ttl = Duration::from_millis(f.ttl_ms).min(MAX_FENCE_TTL);
            self.grant(&f.path, f.token, ttl, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PoolPath {
        PoolPath::parse(s).unwrap()
    }

    #[test]
    fn one_holder_tokens_grow_and_expiry_hands_over() {
        let t0 = Instant::now();
        let mut f = Fences::new();
        let a = f.acquire(&p("/j/kv"), 100, t0).unwrap();
        assert!(matches!(
            f.acquire(&p("/j/kv"), 100, t0 + Duration::from_millis(50)),
            Err(ControlError::FenceHeld { .. })
        ));
        // Another path is independent.
        let other = f.acquire(&p("/j/other"), 100, t0).unwrap();
        assert!(other > a);
        // Renewal keeps it.
        f.renew(&p("/j/kv"), a, 100, t0 + Duration::from_millis(90))
            .unwrap();
        assert!(f
            .acquire(&p("/j/kv"), 100, t0 + Duration::from_millis(150))
            .is_err());
        // Expired: the next client gets a larger token, the old holder cannot renew.
        let b = f
            .acquire(&p("/j/kv"), 100, t0 + Duration::from_millis(200))
            .unwrap();
        assert!(b > other);
        assert!(matches!(
            f.renew(&p("/j/kv"), a, 100, t0 + Duration::from_millis(200)),
            Err(ControlError::FenceLost { .. })
        ));
        assert!(!f.release(&p("/j/kv"), a));
        assert!(f.release(&p("/j/kv"), b));
        let c = f
            .acquire(&p("/j/kv"), 100, t0 + Duration::from_millis(201))
            .unwrap();
        assert!(c > b);
        assert!(f.acquire(&p("/j/kv"), 0, t0).is_err());
        assert!(f.acquire(&p("/j/x"), 3_600_000, t0).is_err());
    }

    #[test]
    fn snapshot_restore_keeps_tokens_and_holders() {
        let t0 = Instant::now();
        let mut f = Fences::new();
        let a = f.acquire(&p("/j/kv"), 1000, t0).unwrap();
        let mut g = Fences::new();
        let later = t0 + Duration::from_secs(5);
        g.restore(f.next_token(), &f.snapshot(), later);
        assert!(g.acquire(&p("/j/kv"), 1000, later).is_err(), "still held");
        g.renew(&p("/j/kv"), a, 1000, later).unwrap();
        let b = g
            .acquire(&p("/j/kv"), 1000, later + Duration::from_secs(2))
            .unwrap();
        assert!(b > a);
    }
}
