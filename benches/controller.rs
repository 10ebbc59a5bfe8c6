//! Controller micro-benchmarks: block allocation and free through an in-process pool.
//!
//! `cargo bench --bench controller`. The end-to-end figures (allocation p50 and
//! allocations/s from several clients) come from `farpool bench --op alloc`; these
//! isolate one client's round trips.

use criterion::{criterion_group, criterion_main, Criterion};
use farpool::embedded::{EmbeddedConfig, EmbeddedPool};
use std::time::{Duration, Instant};

fn pool() -> EmbeddedPool {
    EmbeddedPool::start(EmbeddedConfig {
        nodes: 1,
        capacity: 64 << 20,
        block_size: 1 << 20,
        ..EmbeddedConfig::default()
    })
    .expect("the embedded pool starts on 127.0.0.1")
}

fn allocation(c: &mut Criterion) {
    let pool = pool();
    let client = pool.client().expect("connect to the embedded controller");
    let task = client
        .task("/bench/criterion/alloc")
        .expect("open the benchmark task");

    let mut group = c.benchmark_group("controller");
    // Allocation alone: the free that returns the block is not timed.
    group.bench_function("alloc_1_block", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                let blocks = task.alloc(1).expect("alloc one block");
                timed += started.elapsed();
                task.free(blocks).expect("free the block");
            }
            timed
        })
    });
    group.bench_function("alloc_free_1_block", |b| {
        b.iter(|| {
            let blocks = task.alloc(1).expect("alloc one block");
            task.free(blocks).expect("free the block");
        })
    });
    group.finish();
    task.close().expect("close the benchmark task");
}

criterion_group!(benches, allocation);
criterion_main!(benches);
