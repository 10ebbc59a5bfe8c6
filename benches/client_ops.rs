//! One-sided operations through `BlockHandle` on the soft (TCP) and shm transports:
//! 4 KiB READ and WRITE, 8-byte FAA, one operation per round trip.
//!
//! `cargo bench --bench client_ops`. Pipelined and multi-client figures come from
//! `farpool bench`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use farpool::embedded::{EmbeddedConfig, EmbeddedPool};
use farpool_rdma::TransportKind;

const SIZE: usize = 4096;

fn ops(c: &mut Criterion) {
    for transport in [TransportKind::Soft, TransportKind::Shm] {
        let pool = EmbeddedPool::start(EmbeddedConfig {
            nodes: 1,
            capacity: 16 << 20,
            block_size: 1 << 20,
            transport,
            ..EmbeddedConfig::default()
        })
        .expect("the embedded pool starts on 127.0.0.1");
        let client = pool.client().expect("connect to the embedded controller");
        let task = client
            .task(&format!("/bench/criterion/ops-{transport}"))
            .expect("open the benchmark task");
        let blocks = task.alloc(1).expect("allocate one block");
        let block = blocks.first().expect("the pool grants one block").clone();
        let slots = block.len() / SIZE as u64;
        let data = vec![0x5a_u8; SIZE];
        let mut buf = vec![0_u8; SIZE];
        block.write(0, &data).expect("initial write");

        let mut group = c.benchmark_group(format!("client_ops/{transport}"));
        group.throughput(Throughput::Bytes(SIZE as u64));
        let mut slot = 0;
        group.bench_function("read_4KiB", |b| {
            b.iter(|| {
                slot = (slot + 1) % slots;
                block.read(slot * SIZE as u64, &mut buf).expect("read");
            })
        });
        group.bench_function("write_4KiB", |b| {
            b.iter(|| {
                slot = (slot + 1) % slots;
                block.write(slot * SIZE as u64, &data).expect("write");
            })
        });
        group.throughput(Throughput::Elements(1));
        group.bench_function("faa_8B", |b| b.iter(|| block.faa(0, 1).expect("faa")));
        group.finish();
        task.close().expect("close the benchmark task");
    }
}

criterion_group!(benches, ops);
criterion_main!(benches);
