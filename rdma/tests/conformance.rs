//! Conformance suite: every backend must pass the same cases.
//!
//! Each case is a function over `(&dyn Transport, &Fixture)`; the `backends!` macro runs
//! every case against a fresh soft server (TCP on 127.0.0.1) and a fresh shm region,
//! each both normally and in torn mode (READ/WRITE copied in small pieces with yields,
//! shm batches run in reverse), so no case relies on more than RDMA promises.
//!
//! With the `verbs` feature, the cases that do not depend on per-grant keys also run
//! against the verbs backend (module `verbs`) on a real RDMA device: by default the first
//! one, or `FARPOOL_RDMA_DEVICE` / `FARPOOL_GID_INDEX`. Without a device those tests
//! print why and pass, unless `FARPOOL_VERBS_REQUIRE=1` (as `scripts/softroce-test.sh`
//! sets). The key and epoch cases (`stale_epoch`, `wrong_key`, `read_only_key`,
//! `partial_batch`, module `verbs_windows`) need memory windows: on a device without
//! them (the memory node falls back to the region rkey) they print why and pass.

use std::collections::HashSet;
use std::sync::Arc;

use farpool_rdma::shm::{ShmRegion, ShmTransport};
use farpool_rdma::soft::{SoftServer, SoftServerConfig, SoftTransport};
use farpool_rdma::{
    AccessTable, Error, Op, OpError, OpStatus, RKey, Region, RegionOptions, RemoteAddr, Transport,
    TransportKind,
};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = MIB;
const REGION: u64 = 32 * MIB;

/// The memory node's side of a backend: its region and access table.
struct Fixture {
    region: Arc<Region>,
    access: Arc<AccessTable>,
}

/// A block grant: read-write and read-only keys at the block's current epoch.
#[derive(Clone, Copy)]
struct Grant {
    base: u64,
    rw: RKey,
    ro: RKey,
}

impl Grant {
    fn rw(&self, off: u64) -> RemoteAddr {
        RemoteAddr::new(self.base + off, self.rw)
    }
    fn ro(&self, off: u64) -> RemoteAddr {
        RemoteAddr::new(self.base + off, self.ro)
    }
}

impl Fixture {
    fn grant(&self, block: u32) -> Grant {
        let epoch = self.access.epoch(block);
        let rw = 0x5EC2_E700_0000_0000 | (u64::from(block) << 16) | u64::from(epoch) << 1 | 1;
        let ro = rw ^ 0xFF00;
        self.access.set(block, epoch, rw, ro);
        Grant {
            base: u64::from(block) * BLOCK,
            rw: RKey {
                key: rw,
                epoch,
                expiry: 0,
            },
            ro: RKey {
                key: ro,
                epoch,
                expiry: 0,
            },
        }
    }

    /// Frees `block` (bumps its epoch, no keys) and returns the new epoch.
    fn free(&self, block: u32) -> u32 {
        let next = self.access.epoch(block) + 1;
        self.access.set(block, next, 0, 0);
        next
    }
}

fn region() -> (Arc<Region>, Arc<AccessTable>) {
    let opts = RegionOptions {
        hugepages: false,
        lock: false,
    };
    let region = Arc::new(Region::anonymous(REGION as usize, opts).unwrap());
    let access = Arc::new(AccessTable::new(REGION, BLOCK).unwrap());
    (region, access)
}

fn with_soft(case: fn(&dyn Transport, &Fixture)) {
    soft_backend(case, false);
}

fn with_soft_torn(case: fn(&dyn Transport, &Fixture)) {
    soft_backend(case, true);
}

fn with_shm(case: fn(&dyn Transport, &Fixture)) {
    shm_backend(case, false);
}

fn with_shm_torn(case: fn(&dyn Transport, &Fixture)) {
    shm_backend(case, true);
}

fn soft_backend(case: fn(&dyn Transport, &Fixture), torn: bool) {
    let (region, access) = region();
    region.set_torn_mode(torn);
    let server = SoftServer::bind(
        "127.0.0.1:0",
        region.clone(),
        access.clone(),
        SoftServerConfig::default(),
    )
    .unwrap();
    let t = SoftTransport::connect(&server.local_addr().to_string()).unwrap();
    assert_eq!(t.kind(), TransportKind::Soft);
    assert_eq!(t.max_op_bytes(), MIB as usize);
    case(&t, &Fixture { region, access });
    drop(t);
    server.shutdown();
    assert_eq!(server.stats().connections, 0);
}

fn shm_backend(case: fn(&dyn Transport, &Fixture), torn: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("farpool-region");
    let node = ShmRegion::create(&path, REGION, BLOCK).unwrap();
    let t = ShmTransport::open(&path).unwrap();
    t.region().set_torn_mode(torn);
    assert_eq!(t.kind(), TransportKind::Shm);
    assert_eq!(t.max_op_bytes(), BLOCK as usize);
    case(
        &t,
        &Fixture {
            region: node.region(),
            access: node.access(),
        },
    );
}

macro_rules! backends {
    ($($case:ident),* $(,)?) => {
        mod soft {
            $( #[test] fn $case() { super::with_soft(super::$case); } )*
        }
        mod shm {
            $( #[test] fn $case() { super::with_shm(super::$case); } )*
        }
        mod soft_torn {
            $( #[test] fn $case() { super::with_soft_torn(super::$case); } )*
        }
        mod shm_torn {
            $( #[test] fn $case() { super::with_shm_torn(super::$case); } )*
        }
    };
}

backends!(
    every_operation,
    reads_see_writes,
    node_and_client_see_each_other,
    zero_length_and_empty_batch,
    bounds,
    misaligned_atomics,
    stale_epoch,
    wrong_key,
    read_only_key,
    too_large,
    concurrent_fetch_add,
    cas_counter_is_linearizable,
    mixed_batch,
    partial_batch,
    large_ops,
    large_batch,
    concurrent_batches,
    registered_buffers,
);

#[cfg(feature = "verbs")]
fn with_verbs(case: fn(&dyn Transport, &Fixture)) {
    verbs_backend(case, false);
}

/// Key and epoch cases: they need the device to enforce grants (memory windows).
#[cfg(feature = "verbs")]
fn with_verbs_windows(case: fn(&dyn Transport, &Fixture)) {
    verbs_backend(case, true);
}

#[cfg(feature = "verbs")]
fn verbs_backend(case: fn(&dyn Transport, &Fixture), need_windows: bool) {
    use farpool_rdma::verbs::{
        DeviceConfig, VerbsClientConfig, VerbsServer, VerbsServerConfig, VerbsTransport,
    };
    use farpool_rdma::{TransportError, VerbsError};
    let device = DeviceConfig {
        device: std::env::var("FARPOOL_RDMA_DEVICE").ok(),
        port: 1,
        gid_index: std::env::var("FARPOOL_GID_INDEX")
            .ok()
            .map(|v| v.parse().expect("FARPOOL_GID_INDEX must be a number")),
    };
    let (region, access) = region();
    let server = match VerbsServer::bind(
        "127.0.0.1:0",
        region.clone(),
        access.clone(),
        VerbsServerConfig {
            device: device.clone(),
            ..VerbsServerConfig::default()
        },
    ) {
        Ok(s) => s,
        Err(TransportError::Verbs(VerbsError::NoDevice))
            if std::env::var("FARPOOL_VERBS_REQUIRE").as_deref() != Ok("1") =>
        {
            eprintln!("skipped: no RDMA device (set FARPOOL_VERBS_REQUIRE=1 to fail instead)");
            return;
        }
        Err(e) => panic!("verbs server: {e}"),
    };
    // Knobs for experiments on a device: FARPOOL_VERBS_SQ (send-queue depth),
    // FARPOOL_VERBS_BASIC=1 (ibv_post_send instead of ibv_wr_*), FARPOOL_VERBS_TIMEOUT_S.
    let env_num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let defaults = VerbsClientConfig::default();
    let t = VerbsTransport::connect(
        &server.local_addr().to_string(),
        VerbsClientConfig {
            device,
            send_queue: env_num("FARPOOL_VERBS_SQ").map_or(defaults.send_queue, |v| v as u32),
            extended_api: std::env::var("FARPOOL_VERBS_BASIC").as_deref() != Ok("1"),
            op_timeout: env_num("FARPOOL_VERBS_TIMEOUT_S")
                .map_or(defaults.op_timeout, std::time::Duration::from_secs),
            ..defaults
        },
    )
    .unwrap_or_else(|e| panic!("verbs client: {e}"));
    assert_eq!(t.kind(), TransportKind::Verbs);
    assert_eq!(t.max_op_bytes(), MIB as usize);
    assert_eq!(
        t.memory_windows(),
        *server.isolation() == farpool_rdma::verbs::Isolation::MemoryWindows
    );
    if need_windows && !t.memory_windows() {
        eprintln!(
            "skipped: the memory node does not use memory windows: {}",
            server.isolation()
        );
        return;
    }
    case(&t, &Fixture { region, access });
    drop(t);
    server.shutdown();
}

#[cfg(feature = "verbs")]
macro_rules! verbs_backend {
    ($($case:ident),* $(,)?) => {
        mod verbs {
            $( #[test] fn $case() { super::with_verbs(super::$case); } )*
        }
    };
}

#[cfg(feature = "verbs")]
macro_rules! verbs_windows_backend {
    ($($case:ident),* $(,)?) => {
        mod verbs_windows {
            $( #[test] fn $case() { super::with_verbs_windows(super::$case); } )*
        }
    };
}

#[cfg(feature = "verbs")]
verbs_windows_backend!(stale_epoch, wrong_key, read_only_key, partial_batch);

/// A verbs server and client on the configured device, or `None` (with the reason
/// printed) when there is no device and `FARPOOL_VERBS_REQUIRE` is not 1.
#[cfg(feature = "verbs")]
fn verbs_pair(
    server_cfg: farpool_rdma::verbs::VerbsServerConfig,
    client_cfg: farpool_rdma::verbs::VerbsClientConfig,
) -> Option<(
    farpool_rdma::verbs::VerbsServer,
    farpool_rdma::verbs::VerbsTransport,
    Fixture,
)> {
    use farpool_rdma::verbs::{device_names, VerbsServer, VerbsTransport};
    if device_names().is_empty() {
        assert_ne!(std::env::var("FARPOOL_VERBS_REQUIRE").as_deref(), Ok("1"));
        eprintln!("skipped: no RDMA device");
        return None;
    }
    let (region, access) = region();
    let server = VerbsServer::bind("127.0.0.1:0", region.clone(), access.clone(), server_cfg)
        .unwrap_or_else(|e| panic!("verbs server: {e}"));
    let t = VerbsTransport::connect(&server.local_addr().to_string(), client_cfg)
        .unwrap_or_else(|e| panic!("verbs client: {e}"));
    Some((server, t, Fixture { region, access }))
}

/// With memory windows the device itself refuses what a grant does not allow: a window
/// rkey used outside its block, an rkey with another key byte or another index, and the
/// rkey of a revoked grant all fail with a remote access error (counted by the client),
/// not by a check in the client library.
#[cfg(feature = "verbs")]
#[test]
fn verbs_device_refuses_revoked_and_forged_rkeys() {
    use farpool_rdma::verbs::{VerbsClientConfig, VerbsServerConfig};
    let Some((server, t, fx)) = verbs_pair(
        VerbsServerConfig::default(),
        VerbsClientConfig {
            queue_pairs: 1,
            ..VerbsClientConfig::default()
        },
    ) else {
        return;
    };
    if !t.memory_windows() {
        eprintln!("skipped: no memory windows: {}", server.isolation());
        return;
    }
    let g = fx.grant(20);
    let _neighbour = fx.grant(21);
    t.write(g.rw(0), b"windowed").unwrap();
    // Every refusal kills the queue pair, and windows belong to the queue pair they were
    // bound on: take a fresh window rkey after each one.
    let fresh = || t.window_rkey(g.rw(0), true).unwrap();
    let mut b = [0u8; 8];
    let rkey = fresh();
    t.read_with_rkey(rkey, g.base, &mut b).unwrap();
    assert_eq!(&b, b"windowed");
    let before = t.device_access_errors();
    let denied = |r: Result<(), Error>| match r {
        Err(Error::Op(OpError::AccessDenied)) => {}
        other => panic!("expected the device to refuse it, got {other:?}"),
    };
    // Guessed rkeys: another key byte, another window index.
    denied(t.read_with_rkey(rkey ^ 0x5A, g.base, &mut b));
    let rkey = fresh();
    denied(t.read_with_rkey(rkey.wrapping_add(0x100), g.base, &mut b));
    let mut refused = 2;
    // A read-only grant gets a window of its own.
    let rkey = fresh();
    let ro = t.window_rkey(g.ro(0), false).unwrap();
    assert_ne!(ro, rkey);
    t.read_with_rkey(ro, g.base, &mut b).unwrap();
    // The last bytes of the block are inside the window; the next block is outside.
    t.read_with_rkey(rkey, g.base + BLOCK - 8, &mut b).unwrap();
    let outside = t.read_with_rkey(rkey, g.base + BLOCK, &mut b);
    if t.device().name.starts_with("rxe") {
        // Soft-RoCE (Linux 6.1 rxe_resp.c, check_rkey) checks a window's address
        // against its memory region only, not against the window's own bounds.
        eprintln!(
            "rxe: READ outside the window's block: {outside:?} (rxe does not check window bounds)"
        );
        if outside.is_err() {
            refused += 1;
        }
    } else {
        denied(outside);
        refused += 1;
    }
    // A revoked grant: valid just before the free, refused by the device right after
    // (the memory node invalidated the window; the queue pair is the same).
    let rkey = fresh();
    t.read_with_rkey(rkey, g.base, &mut b).unwrap();
    fx.free(20);
    denied(t.read_with_rkey(rkey, g.base, &mut b));
    refused += 1;
    assert_eq!(t.device_access_errors() - before, refused);
    // Through the API the same grant is reported stale.
    assert!(matches!(
        op_err(t.read(g.rw(0), &mut b)),
        OpError::StaleEpoch { .. }
    ));
    drop(t);
    server.shutdown();
}

/// The fallback: a memory node told not to use memory windows serves the region rkey
/// (trusted mode) and every operation still works.
#[cfg(feature = "verbs")]
#[test]
fn verbs_region_key_fallback() {
    use farpool_rdma::verbs::{Isolation, VerbsClientConfig, VerbsServerConfig};
    let Some((server, t, fx)) = verbs_pair(
        VerbsServerConfig {
            memory_windows: false,
            ..VerbsServerConfig::default()
        },
        VerbsClientConfig::default(),
    ) else {
        return;
    };
    assert!(matches!(server.isolation(), Isolation::RegionKey { .. }));
    assert!(!t.memory_windows());
    every_operation(&t, &fx);
    mixed_batch(&t, &fx);
    drop(t);
    server.shutdown();
}

#[cfg(feature = "verbs")]
verbs_backend!(
    every_operation,
    reads_see_writes,
    node_and_client_see_each_other,
    zero_length_and_empty_batch,
    bounds,
    misaligned_atomics,
    too_large,
    concurrent_fetch_add,
    cas_counter_is_linearizable,
    mixed_batch,
    large_ops,
    large_batch,
    concurrent_batches,
    registered_buffers,
);

/// A memory node that goes away makes operations fail with a typed transport error (an
/// error completion, or the client's `op_timeout` when the device reports nothing: under
/// Soft-RoCE no retry-exceeded completion arrived within 30 s), never a hang, and later
/// calls fail to reconnect, also typed.
#[cfg(feature = "verbs")]
#[test]
fn verbs_memory_node_gone() {
    use farpool_rdma::verbs::{
        device_names, VerbsClientConfig, VerbsServer, VerbsServerConfig, VerbsTransport,
    };
    use farpool_rdma::TransportError;
    if device_names().is_empty() {
        assert_ne!(std::env::var("FARPOOL_VERBS_REQUIRE").as_deref(), Ok("1"));
        eprintln!("skipped: no RDMA device");
        return;
    }
    let (region, access) = region();
    let server = VerbsServer::bind(
        "127.0.0.1:0",
        region.clone(),
        access.clone(),
        VerbsServerConfig::default(),
    )
    .unwrap();
    let addr = server.local_addr().to_string();
    let t = VerbsTransport::connect(
        &addr,
        VerbsClientConfig {
            op_timeout: std::time::Duration::from_secs(5),
            ..VerbsClientConfig::default()
        },
    )
    .unwrap();
    let fx = Fixture { region, access };
    let g = fx.grant(1);
    t.write(g.rw(0), b"alive").unwrap();
    server.shutdown();
    let started = std::time::Instant::now();
    let mut b = [0u8; 5];
    match t.read(g.rw(0), &mut b) {
        Err(Error::Transport(TransportError::Verbs(_))) => {}
        other => panic!("expected a verbs transport error, got {other:?}"),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    match t.read(g.rw(0), &mut b) {
        Err(Error::Transport(TransportError::Connect { .. })) => {}
        other => panic!("expected a connect error, got {other:?}"),
    }
}

/// Operations on buffers from `alloc_buf` (registered memory on verbs) and on plain
/// slices mixed in one batch.
fn registered_buffers(t: &dyn Transport, fx: &Fixture) {
    let g = fx.grant(7);
    let mut src = t.alloc_buf(64 * 1024).unwrap();
    let data = pattern(src.len(), 77);
    src.copy_from_slice(&data);
    let mut dst = t.alloc_buf(64 * 1024).unwrap();
    let mut plain = vec![0u8; 4096];
    let mut ops = vec![
        Op::write(g.rw(0), &src),
        Op::write(g.rw(200_000), &data[..4096]),
        Op::fetch_add(g.rw(300_000), 9),
    ];
    t.execute(&mut ops).unwrap();
    drop(ops);
    let mut ops = vec![
        Op::read(g.rw(0), &mut dst),
        Op::read(g.rw(200_000), &mut plain),
    ];
    t.execute(&mut ops).unwrap();
    drop(ops);
    assert!(dst[..] == data[..]);
    assert!(plain[..] == data[..4096]);
    // Part of a registered buffer works too.
    let mut part = [0u8; 100];
    t.read(g.rw(1000), &mut dst[5..105]).unwrap();
    part.copy_from_slice(&dst[5..105]);
    assert_eq!(part[..], data[1000..1100]);
    drop(src);
    // A new buffer after one was dropped is registered afresh.
    let mut again = t.alloc_buf(4096).unwrap();
    t.read(g.rw(0), &mut again).unwrap();
    assert!(again[..] == data[..4096]);
    assert_eq!(fx.region.fetch_add(g.base + 300_000, 0).unwrap(), 9);
}

fn op_err(r: Result<impl std::fmt::Debug, Error>) -> OpError {
    match r {
        Err(Error::Op(e)) => e,
        other => panic!("expected an operation error, got {other:?}"),
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn every_operation(t: &dyn Transport, fx: &Fixture) {
    let g = fx.grant(1);
    t.write(g.rw(64), b"one-sided").unwrap();
    let mut buf = [0u8; 9];
    t.read(g.rw(64), &mut buf).unwrap();
    assert_eq!(&buf, b"one-sided");

    assert_eq!(t.fetch_add(g.rw(128), 10).unwrap(), 0);
    assert_eq!(t.fetch_add(g.rw(128), 5).unwrap(), 10);
    assert_eq!(t.fetch_add(g.rw(128), u64::MAX).unwrap(), 15); // wrapping -1
    assert_eq!(t.compare_swap(g.rw(128), 14, 100).unwrap(), 14); // success
    assert_eq!(t.compare_swap(g.rw(128), 14, 200).unwrap(), 100); // failure: found 100
    let mut w = [0u8; 8];
    t.read(g.rw(128), &mut w).unwrap();
    assert_eq!(u64::from_le_bytes(w), 100, "atomics are little-endian u64s");

    // Atomics see values written with plain WRITEs.
    t.write(g.rw(136), &u64::MAX.to_le_bytes()).unwrap();
    assert_eq!(t.fetch_add(g.rw(136), 2).unwrap(), u64::MAX);
    assert_eq!(t.fetch_add(g.rw(136), 0).unwrap(), 1);
}

fn reads_see_writes(t: &dyn Transport, fx: &Fixture) {
    for block in [0u32, 7, 15] {
        let g = fx.grant(block);
        for (i, len) in [1usize, 7, 8, 63, 64, 4096, 65_536, 100_000]
            .into_iter()
            .enumerate()
        {
            let off = (i as u64) * 3 + 1;
            let data = pattern(len, u64::from(block) * 100 + i as u64);
            t.write(g.rw(off), &data).unwrap();
            let mut back = vec![0u8; len];
            t.read(g.rw(off), &mut back).unwrap();
            assert_eq!(back, data, "block {block} len {len}");
        }
    }
    // The last byte of the region is reachable.
    let g = fx.grant(15);
    t.write(g.rw(BLOCK - 1), &[0xEE]).unwrap();
    let mut b = [0u8; 1];
    t.read(g.ro(BLOCK - 1), &mut b).unwrap();
    assert_eq!(b, [0xEE]);
}

fn node_and_client_see_each_other(t: &dyn Transport, fx: &Fixture) {
    let g = fx.grant(3);
    fx.region.write(g.base + 10, b"from the node").unwrap();
    let mut b = [0u8; 13];
    t.read(g.rw(10), &mut b).unwrap();
    assert_eq!(&b, b"from the node");
    t.write(g.rw(40), b"from the client").unwrap();
    let mut b = [0u8; 15];
    fx.region.read(g.base + 40, &mut b).unwrap();
    assert_eq!(&b, b"from the client");
    t.fetch_add(g.rw(64), 3).unwrap();
    assert_eq!(fx.region.fetch_add(g.base + 64, 0).unwrap(), 3);
}

fn zero_length_and_empty_batch(t: &dyn Transport, fx: &Fixture) {
    let g = fx.grant(2);
    t.read(g.rw(BLOCK - 1), &mut []).unwrap();
    t.write(g.rw(0), &[]).unwrap();
    t.execute(&mut []).unwrap();
}

fn bounds(t: &dyn Transport, fx: &Fixture) {
    let g = fx.grant(4);
    let mut buf = [0u8; 16];
    // Past the block's end (even though the next block is granted with the same key
    // layout, an operation must stay inside one block).
    fx.grant(5);
    assert_eq!(
        op_err(t.read(g.rw(BLOCK - 8), &mut buf)),
        OpError::OutOfBounds {
            addr: g.base + BLOCK - 8,
            len: 16,
            start: g.base,
            end: g.base + BLOCK
        }
    );
    assert_eq!(
        op_err(t.write(g.rw(BLOCK - 1), &[1, 2])),
        OpError::OutOfBounds {
            addr: g.base + BLOCK - 1,
            len: 2,
            start: g.base,
            end: g.base + BLOCK
        }
    );
    // Past the region's end.
    let past = RemoteAddr::new(REGION, g.rw);
    assert_eq!(
        op_err(t.read(past, &mut buf)),
        OpError::OutOfBounds {
            addr: REGION,
            len: 16,
            start: 0,
            end: REGION
        }
    );
    assert!(matches!(
        op_err(t.fetch_add(RemoteAddr::new(u64::MAX - 7, g.rw), 1)),
        OpError::OutOfBounds { .. }
    ));
    // Nothing was written next door.
    let mut next = [0u8; 2];
    fx.region.read(g.base + BLOCK, &mut next).unwrap();
    assert_eq!(next, [0, 0]);
}

fn misaligned_atomics(t: &dyn Transport, fx: &Fixture) {
    let g = fx.grant(6);
    for off in [1u64, 4, 7, 12] {
        assert_eq!(
            op_err(t.fetch_add(g.rw(off), 1)),
            OpError::Misaligned { addr: g.base + off }
        );
        assert_eq!(
            op_err(t.compare_swap(g.rw(off), 0, 1)),
            OpError::Misaligned { addr: g.base + off }
        );
    }
    let mut b = [0u8; 16];
    t.read(g.rw(0), &mut b).unwrap();
    assert_eq!(b, [0; 16]);
}

fn stale_epoch(t: &dyn Transport, fx: &Fixture) {
    let old = fx.grant(8);
    t.write(old.rw(0), b"before free").unwrap();
    let current = fx.free(8);
    let expect = OpError::StaleEpoch {
        granted: old.rw.epoch,
        current,
    };
    let mut b = [0u8; 11];
    assert_eq!(op_err(t.read(old.rw(0), &mut b)), expect);
    assert_eq!(op_err(t.read(old.ro(0), &mut b)), expect);
    assert_eq!(op_err(t.write(old.rw(0), b"x")), expect);
    assert_eq!(op_err(t.fetch_add(old.rw(0), 1)), expect);
    // A new grant at the new epoch works; the old one still does not.
    let new = fx.grant(8);
    assert_eq!(new.rw.epoch, current);
    assert_ne!(new.rw.key, old.rw.key);
    t.read(new.rw(0), &mut b).unwrap();
    assert_eq!(&b, b"before free");
    assert_eq!(op_err(t.write(old.rw(0), b"x")), expect);
}

fn wrong_key(t: &dyn Transport, fx: &Fixture) {
    let g = fx.grant(9);
    let other = fx.grant(10);
    let mut b = [0u8; 8];
    let bad = [
        RKey {
            key: g.rw.key ^ 1,
            epoch: g.rw.epoch,
            expiry: 0,
        },
        RKey {
            key: 0,
            epoch: g.rw.epoch,
            expiry: 0,
        },
        other.rw, // a valid key of another block
    ];
    for rkey in bad {
        let at = RemoteAddr::new(g.base, rkey);
        assert_eq!(op_err(t.read(at, &mut b)), OpError::AccessDenied);
        assert_eq!(op_err(t.write(at, b"nope")), OpError::AccessDenied);
        assert_eq!(op_err(t.compare_swap(at, 0, 1)), OpError::AccessDenied);
    }
    // A block never granted denies everything, including key 0.
    let never = RemoteAddr::new(11 * BLOCK, RKey::default());
    assert_eq!(op_err(t.read(never, &mut b)), OpError::AccessDenied);
    fx.region.read(g.base, &mut b).unwrap();
    assert_eq!(b, [0; 8]);
}

fn read_only_key(t: &dyn Transport, fx: &Fixture) {
    let g = fx.grant(12);
    t.write(g.rw(0), b"readable").unwrap();
    let mut b = [0u8; 8];
    t.read(g.ro(0), &mut b).unwrap();
    assert_eq!(&b, b"readable");
    assert_eq!(op_err(t.write(g.ro(0), b"writable")), OpError::ReadOnly);
    assert_eq!(op_err(t.fetch_add(g.ro(0), 1)), OpError::ReadOnly);
    assert_eq!(op_err(t.compare_swap(g.ro(0), 0, 1)), OpError::ReadOnly);
    t.read(g.ro(0), &mut b).unwrap();
    assert_eq!(&b, b"readable");
}

fn too_large(t: &dyn Transport, fx: &Fixture) {
    let g = fx.grant(13);
    let max = t.max_op_bytes() as u64;
    let mut big = vec![0u8; max as usize + 1];
    assert_eq!(
        op_err(t.read(g.rw(0), &mut big)),
        OpError::TooLarge { len: max + 1, max }
    );
    assert_eq!(
        op_err(t.write(g.rw(0), &big)),
        OpError::TooLarge { len: max + 1, max }
    );
    // The transport is still usable.
    t.write(g.rw(0), b"ok").unwrap();
}

fn concurrent_fetch_add(t: &dyn Transport, fx: &Fixture) {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 10_000;
    const BATCH: u64 = 50;
    let g = fx.grant(14);
    let at = g.rw(8);
    let seen: Vec<Vec<u64>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(move || {
                    let mut olds = Vec::with_capacity(PER_THREAD as usize);
                    for _ in 0..PER_THREAD / BATCH {
                        let mut ops: Vec<Op> = (0..BATCH).map(|_| Op::fetch_add(at, 1)).collect();
                        t.execute(&mut ops).unwrap();
                        olds.extend(ops.iter().map(|o| o.result));
                    }
                    olds
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let total = THREADS * PER_THREAD;
    assert_eq!(t.fetch_add(at, 0).unwrap(), total);
    // Every increment observed a distinct previous value: 0..total exactly once each.
    let mut all: Vec<u64> = seen.into_iter().flatten().collect();
    all.sort_unstable();
    assert!(all.iter().copied().eq(0..total));
}

fn cas_counter_is_linearizable(t: &dyn Transport, fx: &Fixture) {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 500;
    let g = fx.grant(14);
    let at = g.rw(64);
    let observed: Vec<Vec<u64>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(move || {
                    let mut won = Vec::with_capacity(PER_THREAD);
                    let mut cur = t.fetch_add(at, 0).unwrap();
                    while won.len() < PER_THREAD {
                        let found = t.compare_swap(at, cur, cur + 1).unwrap();
                        if found == cur {
                            won.push(cur);
                            cur += 1;
                        } else {
                            cur = found;
                        }
                    }
                    won
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let total = (THREADS * PER_THREAD) as u64;
    assert_eq!(t.fetch_add(at, 0).unwrap(), total);
    let unique: HashSet<u64> = observed.iter().flatten().copied().collect();
    assert_eq!(unique.len() as u64, total, "a value was won by two CASes");
    assert!(unique.iter().all(|&v| v < total));
}

fn mixed_batch(t: &dyn Transport, fx: &Fixture) {
    let g = fx.grant(2);
    let data: Vec<Vec<u8>> = (0..25).map(|i| pattern(100 + i * 37, i as u64)).collect();
    let mut bufs: Vec<Vec<u8>> = (0..25).map(|i| vec![0u8; 100 + i * 37]).collect();
    // Seed the read targets first.
    for (i, d) in data.iter().enumerate() {
        fx.region.write(g.base + 8192 + i as u64 * 4096, d).unwrap();
    }
    let mut ops: Vec<Op> = Vec::new();
    for (i, d) in data.iter().enumerate() {
        ops.push(Op::write(g.rw(i as u64 * 4096 + 200_000), d));
    }
    for (i, b) in bufs.iter_mut().enumerate() {
        ops.push(Op::read(g.ro(8192 + i as u64 * 4096), b));
    }
    for i in 0..25u64 {
        ops.push(Op::fetch_add(g.rw(i * 8), i + 1));
    }
    for i in 0..25u64 {
        ops.push(Op::compare_swap(g.rw(4096 + i * 8), 0, 1000 + i));
    }
    assert_eq!(ops.len(), 100);
    t.execute(&mut ops).unwrap();
    assert!(ops.iter().all(|o| o.status == OpStatus::Done));
    assert!(ops[50..].iter().all(|o| o.result == 0));
    drop(ops);
    assert_eq!(bufs, data);
    for (i, d) in data.iter().enumerate() {
        let mut back = vec![0u8; d.len()];
        fx.region
            .read(g.base + i as u64 * 4096 + 200_000, &mut back)
            .unwrap();
        assert_eq!(&back, d);
    }
    for i in 0..25u64 {
        assert_eq!(fx.region.fetch_add(g.base + i * 8, 0).unwrap(), i + 1);
        assert_eq!(
            fx.region.fetch_add(g.base + 4096 + i * 8, 0).unwrap(),
            1000 + i
        );
    }
}

fn partial_batch(t: &dyn Transport, fx: &Fixture) {
    let g = fx.grant(3);
    let stale = RemoteAddr::new(
        g.base,
        RKey {
            key: g.rw.key,
            epoch: g.rw.epoch + 1,
            expiry: 0,
        },
    );
    let mut rbuf = [0u8; 4];
    let mut ops = vec![
        Op::write(g.rw(0), b"good"),                                   // 0 ok
        Op::fetch_add(g.rw(3), 1),                                     // 1 misaligned
        Op::write(g.ro(16), b"nope"),                                  // 2 read-only
        Op::fetch_add(g.rw(8), 7),                                     // 3 ok
        Op::read(RemoteAddr::new(g.base, RKey::default()), &mut rbuf), // 4 denied
        Op::write(stale, b"late"),                                     // 5 stale
        Op::write(g.rw(BLOCK - 2), b"over"),                           // 6 out of bounds
        Op::compare_swap(g.rw(24), 0, 99),                             // 7 ok (swaps)
    ];
    match t.execute(&mut ops) {
        Err(Error::Partial {
            failed,
            total,
            index,
            error,
        }) => {
            assert_eq!((failed, total, index), (5, 8, 1));
            assert_eq!(error, OpError::Misaligned { addr: g.base + 3 });
        }
        other => panic!("expected Partial, got {other:?}"),
    }
    let failed: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o.status, OpStatus::Failed(_)))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(failed, [1, 2, 4, 5, 6]);
    assert_eq!(ops[2].outcome(), Err(OpError::ReadOnly));
    assert_eq!(ops[4].outcome(), Err(OpError::AccessDenied));
    assert!(matches!(ops[5].outcome(), Err(OpError::StaleEpoch { .. })));
    assert!(matches!(ops[6].outcome(), Err(OpError::OutOfBounds { .. })));
    assert_eq!(ops[3].outcome(), Ok(0));
    assert_eq!(ops[7].outcome(), Ok(0));
    drop(ops);
    let mut b = [0u8; 4];
    fx.region.read(g.base, &mut b).unwrap();
    assert_eq!(&b, b"good");
    fx.region.read(g.base + 16, &mut b).unwrap();
    assert_eq!(b, [0; 4]);
    assert_eq!(fx.region.fetch_add(g.base + 8, 0).unwrap(), 7);
    assert_eq!(fx.region.fetch_add(g.base + 24, 0).unwrap(), 99);
}

fn large_ops(t: &dyn Transport, fx: &Fixture) {
    let g = fx.grant(5);
    let data = pattern(MIB as usize, 5);
    t.write(g.rw(0), &data).unwrap();
    let mut back = vec![0u8; MIB as usize];
    t.read(g.ro(0), &mut back).unwrap();
    assert!(back == data, "1 MiB round trip differs");
    // Large ops mixed with small ones in one batch.
    let g2 = fx.grant(6);
    let data2 = pattern(700_000, 6);
    let mut back2 = vec![0u8; 700_000];
    let mut small = [0u8; 8];
    let mut ops = vec![
        Op::write(g2.rw(0), &data2),
        Op::fetch_add(g2.rw(800_000), 1),
        Op::read(g.rw(0), &mut back2),
        Op::read(g.rw(100), &mut small),
    ];
    t.execute(&mut ops).unwrap();
    drop(ops);
    assert!(back2[..] == data[..700_000]);
    assert_eq!(small[..], data[100..108]);
    let mut check = vec![0u8; 700_000];
    fx.region.read(g2.base, &mut check).unwrap();
    assert!(check == data2);
}

fn large_batch(t: &dyn Transport, fx: &Fixture) {
    const N: usize = 5000;
    const LEN: usize = 4096;
    // 5000 x 4 KiB (~20 MiB) to distinct addresses in blocks 0..20: operations of one
    // batch may run in any order, so no two of them touch the same bytes.
    let per_block = BLOCK as usize / LEN;
    let grants: Vec<Grant> = (0..N.div_ceil(per_block) as u32)
        .map(|b| fx.grant(b))
        .collect();
    let addr = |i: usize| grants[i / per_block].rw(((i % per_block) * LEN) as u64);
    let data: Vec<Vec<u8>> = (0..N).map(|i| pattern(LEN, i as u64 + 1)).collect();
    let mut ops: Vec<Op> = (0..N).map(|i| Op::write(addr(i), &data[i])).collect();
    t.execute(&mut ops).unwrap();
    drop(ops);
    let mut bufs = vec![vec![0u8; LEN]; N];
    let mut ops: Vec<Op> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| Op::read(addr(i), b))
        .collect();
    t.execute(&mut ops).unwrap();
    drop(ops);
    for (i, b) in bufs.iter().enumerate() {
        assert!(b == &data[i], "op {i}");
    }
}

fn concurrent_batches(t: &dyn Transport, fx: &Fixture) {
    let grants: Vec<Grant> = (0..4).map(|b| fx.grant(b)).collect();
    std::thread::scope(|s| {
        for (k, g) in grants.iter().enumerate() {
            s.spawn(move || {
                for round in 0..50u64 {
                    let data: Vec<Vec<u8>> = (0..16)
                        .map(|i| pattern(4096, round * 100 + i + k as u64 * 10_000))
                        .collect();
                    let mut ops: Vec<Op> = data
                        .iter()
                        .enumerate()
                        .map(|(i, d)| Op::write(g.rw(i as u64 * 4096), d))
                        .collect();
                    t.execute(&mut ops).unwrap();
                    drop(ops);
                    let mut bufs = vec![vec![0u8; 4096]; 16];
                    let mut ops: Vec<Op> = bufs
                        .iter_mut()
                        .enumerate()
                        .map(|(i, b)| Op::read(g.rw(i as u64 * 4096), b))
                        .collect();
                    t.execute(&mut ops).unwrap();
                    drop(ops);
                    assert!(bufs == data);
                }
            });
        }
    });
}
