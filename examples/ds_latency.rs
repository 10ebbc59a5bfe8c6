//! A quick single-client latency probe of the data structures on an embedded pool:
//! 4 KiB File write/read/append, Queue enqueue/dequeue and Kv upsert/get, one
//! operation at a time (depth 1), with the raw block READ/WRITE for comparison.
//!
//! `cargo run --release --example ds_latency [soft|shm] [iterations]`
//!
//! Not a benchmark of record (no warm-up control, one client, shared machine): the
//! figures of record come from the bench harness.

use farpool::ds::{File, Kv, KvConfig, Queue, QueueConfig};
use farpool::{EmbeddedConfig, EmbeddedPool};
use std::time::{Duration, Instant};

const SIZE: usize = 4096;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let transport = match args.next().as_deref() {
        None | Some("soft") => farpool_rdma::TransportKind::Soft,
        Some("shm") => farpool_rdma::TransportKind::Shm,
        Some(other) => return Err(format!("unknown transport '{other}'; use soft or shm").into()),
    };
    let iterations: usize = match args.next() {
        Some(n) => n.parse()?,
        None => 5000,
    };
    let pool = EmbeddedPool::start(EmbeddedConfig {
        nodes: 1,
        capacity: 256 << 20,
        block_size: 1 << 20,
        transport,
        ..EmbeddedConfig::default()
    })?;
    let client = pool.client()?;
    let task = client.task("/probe/t")?;
    let data = vec![0x5a_u8; SIZE];
    let mut buf = vec![0_u8; SIZE];
    println!("transport {transport}, {iterations} operations each, 4 KiB payloads, depth 1");

    let block = task.alloc(1)?.remove(0);
    let slots = block.len() / SIZE as u64;
    report("block write", iterations, |i| {
        block.write((i as u64 % slots) * SIZE as u64, &data)?;
        Ok(())
    })?;
    report("block read", iterations, |i| {
        block.read((i as u64 % slots) * SIZE as u64, &mut buf)?;
        Ok(())
    })?;

    let file = File::create(&task, "f")?;
    let span = 32 * (1 << 20) / SIZE as u64;
    report("file write_at", iterations, |i| {
        file.write_at((i as u64 % span) * SIZE as u64, &data)?;
        Ok(())
    })?;
    report("file read_at", iterations, |i| {
        file.read_at((i as u64 % span) * SIZE as u64, &mut buf)?;
        Ok(())
    })?;
    let appends = iterations.min(40_000);
    report("file append", appends, |_| {
        file.append(&data)?;
        Ok(())
    })?;

    let queue = Queue::create(
        &task,
        "q",
        QueueConfig {
            slot_size: SIZE as u64 + 24,
        },
    )?;
    report("queue enqueue", iterations.min(20_000), |_| {
        queue.enqueue(&data)?;
        Ok(())
    })?;
    report("queue dequeue", iterations.min(20_000), |_| {
        queue.dequeue()?.ok_or("the queue ran dry")?;
        Ok(())
    })?;

    let kv = Kv::create(&task, "kv", KvConfig::default())?;
    let keys = 1000;
    report("kv upsert", iterations, |i| {
        kv.upsert(format!("key-{}", i % keys).as_bytes(), &data)?;
        Ok(())
    })?;
    report("kv get", iterations, |i| {
        kv.get(format!("key-{}", i % keys).as_bytes())?
            .ok_or("a key went missing")?;
        Ok(())
    })?;
    println!("kv partitions: {}", kv.partitions()?);
    task.close()?;
    Ok(())
}

fn report(
    name: &str,
    n: usize,
    mut op: impl FnMut(usize) -> Result<(), Box<dyn std::error::Error>>,
) -> Result<(), Box<dyn std::error::Error>> {
    if n == 0 {
        return Ok(());
    }
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        op(i)?;
        lat.push(t.elapsed());
    }
    let total = start.elapsed();
    lat.sort_unstable();
    let pct = |p: f64| lat[((n as f64 * p) as usize).min(n - 1)];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{name:>14}: {:>8.0} ops/s  p50 {:>6.1} us  p99 {:>7.1} us",
        n as f64 / total.as_secs_f64(),
        us(pct(0.5)),
        us(pct(0.99)),
    );
    Ok(())
}
