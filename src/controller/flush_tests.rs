//! Unit tests of mapped paths in the state machine: flush at expiry, the renew race,
//! failures with backoff, nesting, pins, and the journal.

use super::state::{ControllerState, Effect, StateConfig};
use crate::proto::grant::WireTransport;
use crate::proto::{Backing, ControlError, Placement, PoolPath, Register, Secret};
use std::time::{Duration, Instant};

const BS: u64 = 4096;
const SECRET: Secret = Secret([9; 16]);

fn p(s: &str) -> PoolPath {
    PoolPath::parse(s).unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn backing(key: &str) -> Backing {
    Backing {
        url: "/srv/tier".into(),
        key: key.into(),
    }
}

/// Lease 10 s, grace 2 s, first retry after 1 s; one node of 32 blocks.
fn setup() -> (ControllerState, Instant) {
    let t0 = Instant::now();
    let cfg = StateConfig {
        lease: Duration::from_secs(10),
        grace: Duration::from_secs(2),
        dead_after: Duration::from_secs(3600),
        flush_retry: Duration::from_secs(1),
        ..StateConfig::default()
    };
    let mut st = ControllerState::new(cfg, SECRET, t0);
    st.enable_journal();
    st.register_node(
        &Register {
            data_addr: "10.0.0.1:9000".into(),
            transport: WireTransport::Soft,
            capacity: 32 * BS,
            block_size: BS,
            hugepages: false,
            locked: true,
        },
        t0,
    )
    .unwrap();
    (st, t0)
}

/// The flush effects among `effects`: (path, token, has_children).
fn flushes(effects: &[Effect]) -> Vec<(PoolPath, u64, bool)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Flush {
                path,
                token,
                has_children,
                ..
            } => Some((path.clone(), *token, *has_children)),
            _ => None,
        })
        .collect()
}

fn revoked(effects: &[Effect]) -> usize {
    effects
        .iter()
        .map(|e| match e {
            Effect::Revoke { blocks, .. } => blocks.len(),
            _ => 0,
        })
        .sum()
}

fn exists(st: &ControllerState, now: Instant, path: &str) -> bool {
    st.status(now).paths.iter().any(|u| u.path.as_str() == path)
}

/// An object at /j/kv (meta block) with a partition at /j/kv/p0 and a plain task
/// path /j/t, all allocated at `t0`; /j/kv is mapped.
fn object(st: &mut ControllerState, t0: Instant) {
    st.alloc(&p("/j/kv"), BS, Placement::default(), t0).unwrap();
    st.alloc(&p("/j/kv/p0"), 2 * BS, Placement::default(), t0)
        .unwrap();
    st.alloc(&p("/j/t"), BS, Placement::default(), t0).unwrap();
    st.map(&p("/j/kv"), Some(backing("kv"))).unwrap();
}

#[test]
fn an_expired_mapped_path_is_flushed_then_freed() {
    let (mut st, t0) = setup();
    object(&mut st, t0);
    assert!(
        flushes(&st.tick(t0 + ms(11_000))).is_empty(),
        "grace not over"
    );
    let effects = st.tick(t0 + ms(12_500));
    let f = flushes(&effects);
    assert_eq!(f.len(), 1, "{effects:?}");
    assert_eq!(f[0].0, p("/j/kv"));
    assert!(f[0].2, "the partition below owns blocks");
    let now = t0 + ms(12_500);
    // The unmapped task went; the object and its partition stay until flushed, and so
    // does their parent.
    assert!(!exists(&st, now, "/j/t"));
    assert!(exists(&st, now, "/j/kv/p0") && exists(&st, now, "/j"));
    let status = st.status(now);
    assert_eq!(status.flushes.len(), 1);
    assert!(status.flushes[0].in_flight);
    assert!(
        flushes(&st.tick(now + ms(100))).is_empty(),
        "one attempt at a time"
    );

    let effects = st.flush_done(&p("/j/kv"), f[0].1, Ok(100), now + ms(200));
    assert_eq!(revoked(&effects), 3);
    let status = st.status(now + ms(200));
    assert!(!exists(&st, now, "/j/kv") && !exists(&st, now, "/j/kv/p0"));
    assert_eq!(status.flushes_total, 1);
    assert!(status.flushes.is_empty());
    assert_eq!(status.blocks_expired_total, 4, "1 task block + 3 flushed");
    // Its parent, kept only for it, expires next.
    st.tick(now + ms(300));
    assert!(st.status(now + ms(300)).paths.is_empty());
    // A late or repeated report changes nothing.
    assert!(st
        .flush_done(&p("/j/kv"), f[0].1, Ok(1), now + ms(400))
        .is_empty());
    st.check_invariants().unwrap();
}

#[test]
fn a_renew_during_the_flush_keeps_the_object() {
    let (mut st, t0) = setup();
    object(&mut st, t0);
    let now = t0 + ms(12_500);
    let f = flushes(&st.tick(now));
    assert_eq!(f.len(), 1);
    // The job's client comes back and renews its prefix while the flush runs.
    st.renew(&p("/j"), now + ms(10)).unwrap();
    let effects = st.flush_done(&p("/j/kv"), f[0].1, Ok(100), now + ms(20));
    assert!(effects.is_empty());
    assert!(exists(&st, now, "/j/kv/p0"));
    let status = st.status(now + ms(20));
    assert_eq!(status.flushes_total, 0);
    assert!(
        status.flushes.is_empty(),
        "the job is over; expiry re-arms it"
    );
    // Flushed again at the next expiry.
    let later = now + ms(10) + ms(12_001);
    assert_eq!(flushes(&st.tick(later)).len(), 1);
    st.check_invariants().unwrap();
}

#[test]
fn a_late_child_keeps_the_whole_object_alive() {
    let (mut st, t0) = setup();
    object(&mut st, t0);
    // A partition allocated later (its own lease runs longer).
    st.alloc(&p("/j/kv/p1"), BS, Placement::default(), t0 + ms(5_000))
        .unwrap();
    let effects = st.tick(t0 + ms(12_500));
    assert!(flushes(&effects).is_empty());
    assert!(
        exists(&st, t0, "/j/kv/p0"),
        "an expired partition is not freed alone"
    );
    let effects = st.tick(t0 + ms(17_500));
    assert_eq!(
        flushes(&effects).len(),
        1,
        "the late child's timer flushes the object"
    );
    st.check_invariants().unwrap();
}

#[test]
fn a_failed_flush_keeps_the_data_and_retries_with_backoff() {
    let (mut st, t0) = setup();
    object(&mut st, t0);
    let mut now = t0 + ms(12_500);
    let f = flushes(&st.tick(now));
    let reason = "persistent tier '/srv/tier': put 'kv' failed: permission denied";
    assert!(st
        .flush_done(&p("/j/kv"), f[0].1, Err(reason.into()), now)
        .is_empty());
    let status = st.status(now);
    assert_eq!(status.flush_failures_total, 1);
    assert_eq!(status.flushes[0].failures, 1);
    assert_eq!(status.flushes[0].last_error.as_deref(), Some(reason));
    assert!(!status.flushes[0].in_flight);
    assert_eq!(status.flushes[0].retry_in_ms, 1000);
    assert!(exists(&st, now, "/j/kv/p0"));
    // No retry before the backoff, one after it; the next backoff doubles.
    assert!(flushes(&st.tick(now + ms(900))).is_empty());
    now += ms(1000);
    let f = flushes(&st.tick(now));
    assert_eq!(f.len(), 1);
    st.flush_done(&p("/j/kv"), f[0].1, Err(reason.into()), now);
    assert_eq!(st.status(now).flushes[0].retry_in_ms, 2000);
    assert!(flushes(&st.tick(now + ms(1999))).is_empty());
    let f = flushes(&st.tick(now + ms(2000)));
    assert_eq!(f.len(), 1);
    // An operator removes the object meanwhile: the job goes, the result is ignored.
    let (removed, _) = st.remove(&p("/j/kv")).unwrap();
    assert_eq!(removed.blocks, 3);
    assert!(st.status(now).flushes.is_empty());
    assert!(st
        .flush_done(&p("/j/kv"), f[0].1, Ok(1), now + ms(2100))
        .is_empty());
    assert_eq!(st.status(now).flushes_total, 0);
    st.check_invariants().unwrap();
}

#[test]
fn pinned_wins_and_unmapping_frees_normally() {
    let (mut st, t0) = setup();
    object(&mut st, t0);
    st.pin(&p("/j/kv/p0"), true).unwrap();
    assert!(flushes(&st.tick(t0 + ms(13_000))).is_empty());
    assert!(exists(&st, t0, "/j/kv"));
    st.pin(&p("/j/kv/p0"), false).unwrap();
    st.map(&p("/j/kv"), None).unwrap();
    let effects = st.tick(t0 + ms(13_100));
    assert!(flushes(&effects).is_empty());
    assert_eq!(revoked(&effects), 3, "freed as any expired path");
    assert!(st.status(t0 + ms(13_100)).paths.is_empty());
    st.check_invariants().unwrap();
}

#[test]
fn bad_mappings_are_refused() {
    let (mut st, t0) = setup();
    object(&mut st, t0);
    let bad = |st: &mut ControllerState, path: &str, url: &str, key: &str| {
        let b = Backing {
            url: url.into(),
            key: key.into(),
        };
        match st.map(&p(path), Some(b)) {
            Err(ControlError::BadRequest(e)) => e,
            other => panic!("{path} {url} {key}: {other:?}"),
        }
    };
    assert!(bad(&mut st, "/j/kv/p0", "/srv/tier", "x").contains("nest"));
    assert!(bad(&mut st, "/j", "/srv/tier", "x").contains("nest"));
    assert!(bad(&mut st, "/j/t", "memory:", "x").contains("memory:"));
    assert!(bad(&mut st, "/j/t", "relative/dir", "x").contains("absolute"));
    assert!(bad(&mut st, "/j/t", "/srv/tier", "").contains("key"));
    assert!(bad(&mut st, "/j/t", "/srv/tier", "/").contains("key"));
    assert!(matches!(
        st.map(&PoolPath::root(), Some(backing("r"))),
        Err(ControlError::BadRequest(_))
    ));
    assert!(matches!(
        st.map(&p("/nope"), Some(backing("r"))),
        Err(ControlError::NotFound(_))
    ));
    st.map(&p("/j/t"), Some(backing("t"))).unwrap();
    st.map(&p("/j/t"), Some(backing("t2"))).unwrap();
    let s3 = Backing {
        url: "s3://bucket/prefix".into(),
        key: "k".into(),
    };
    st.map(&p("/j/t"), Some(s3.clone())).unwrap();
    let u = st.status(t0);
    let t = u.paths.iter().find(|u| u.path.as_str() == "/j/t").unwrap();
    assert_eq!(t.backing.as_ref(), Some(&s3));
}

#[test]
fn mappings_survive_replay_and_snapshots() {
    let (mut st, t0) = setup();
    object(&mut st, t0);
    st.map(&p("/j/t"), Some(backing("t"))).unwrap();
    st.map(&p("/j/t"), None).unwrap();
    let mut log = Vec::new();
    // The setup's node and everything since.
    log.extend(st.take_journal());
    let cfg = *st.config();
    let want = st.snapshot();
    assert_eq!(want.mappings, vec![(p("/j/kv"), backing("kv"))]);
    let replayed = ControllerState::recover(cfg, SECRET, None, &log, t0).unwrap();
    assert_eq!(replayed.snapshot(), want);
    let from_snap = ControllerState::recover(cfg, SECRET, Some(&want), &[], t0).unwrap();
    assert_eq!(from_snap.snapshot(), want);
    // A flush that freed the object is journaled as a removal.
    let now = t0 + ms(12_500);
    let f = flushes(&st.tick(now));
    st.flush_done(&p("/j/kv"), f[0].1, Ok(1), now);
    log.extend(st.take_journal());
    let replayed = ControllerState::recover(cfg, SECRET, None, &log, now).unwrap();
    assert_eq!(replayed.snapshot(), st.snapshot());
    assert!(replayed.snapshot().mappings.is_empty());
}
