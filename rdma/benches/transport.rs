//! Latency of single operations and of a batch, on the soft (TCP loopback) and shm
//! backends: 4 KiB READ and WRITE, 8-byte fetch-and-add, a batch of 16 x 4 KiB READs;
//! and the access check alone, with a plain key and with a capability (MAC + expiry).
//!
//! Run with `cargo bench -p farpool-rdma --bench transport`.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use farpool_rdma::shm::{ShmRegion, ShmTransport};
use farpool_rdma::soft::{SoftServer, SoftServerConfig, SoftTransport};
use farpool_rdma::{AccessTable, Op, RKey, Region, RegionOptions, RemoteAddr, Transport};

const BLOCK: u64 = 1 << 20;
const REGION: u64 = 16 * BLOCK;
const KEY: RKey = RKey {
    key: 0xBE7C,
    epoch: 0,
    expiry: 0,
};

fn grant_all(access: &AccessTable) {
    for b in 0..access.num_blocks() {
        access.set(b, KEY.epoch, KEY.key, 0);
    }
}

fn bench_transport(c: &mut Criterion, name: &str, t: &dyn Transport) {
    let mut g = c.benchmark_group(name);
    let at = RemoteAddr::new(4096, KEY);
    let mut buf = vec![0u8; 4096];
    let data = vec![0x5Au8; 4096];

    g.throughput(Throughput::Bytes(4096));
    g.bench_function("read_4k", |b| b.iter(|| t.read(at, &mut buf).unwrap()));
    g.bench_function("write_4k", |b| b.iter(|| t.write(at, &data).unwrap()));

    g.throughput(Throughput::Elements(1));
    g.bench_function("faa_8", |b| {
        b.iter(|| t.fetch_add(RemoteAddr::new(0, KEY), 1).unwrap())
    });

    let mut bufs = vec![vec![0u8; 4096]; 16];
    g.throughput(Throughput::Bytes(16 * 4096));
    g.bench_with_input(BenchmarkId::new("batch_read_4k", 16), &16, |b, _| {
        b.iter(|| {
            let mut ops: [Op; 16] = std::array::from_fn(|_| Op::fetch_add(at, 0));
            for (i, (op, buf)) in ops.iter_mut().zip(bufs.iter_mut()).enumerate() {
                *op = Op::read(RemoteAddr::new(i as u64 * 4096, KEY), buf);
            }
            t.execute(&mut ops).unwrap();
        })
    });
    g.finish();
}

fn soft(c: &mut Criterion) {
    let opts = RegionOptions {
        hugepages: true,
        lock: false,
    };
    let region = Arc::new(Region::anonymous(REGION as usize, opts).unwrap());
    let access = Arc::new(AccessTable::new(REGION, BLOCK).unwrap());
    grant_all(&access);
    let server =
        SoftServer::bind("127.0.0.1:0", region, access, SoftServerConfig::default()).unwrap();
    let t = SoftTransport::connect(&server.local_addr().to_string()).unwrap();
    bench_transport(c, "soft", &t);
}

fn shm(c: &mut Criterion) {
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let path = dir.path().join("bench-region");
    let node = ShmRegion::create(&path, REGION, BLOCK).unwrap();
    grant_all(&node.access());
    let t = ShmTransport::open(&path).unwrap();
    bench_transport(c, "shm", &t);
}

/// The per-operation access check: key comparison vs capability MAC verification.
fn access_check(c: &mut Criterion) {
    use farpool_rdma::access::{grant_mac, unix_now_secs};
    let access = AccessTable::new(REGION, BLOCK).unwrap();
    grant_all(&access);
    let now = unix_now_secs();
    let cap = RKey {
        key: grant_mac(KEY.key, now + 3600),
        expiry: now + 3600,
        ..KEY
    };
    let mut g = c.benchmark_group("access_check");
    g.bench_function("key", |b| {
        b.iter(|| access.check(std::hint::black_box(4096), 4096, KEY, false))
    });
    g.bench_function("capability", |b| {
        b.iter(|| access.check_grant(std::hint::black_box(4096), 4096, cap, false, now))
    });
    g.finish();
}

criterion_group!(benches, soft, shm, access_check);
criterion_main!(benches);
