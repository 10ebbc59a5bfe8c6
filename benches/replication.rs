//! 4 KiB WRITE and READ throughput and latency on blocks with 1 and 2 copies, side by
//! side in one run.
//!
//! `cargo bench --bench replication` (plain `main`, not criterion). An embedded pool
//! (controller and three memory nodes in this process, soft transport over
//! 127.0.0.1, 1 MiB blocks); one client thread issues one operation at a time on 4 KiB
//! slots of one block, for `FARPOOL_REPL_SECS` seconds per measurement (default 3),
//! after a 0.5 s warm-up. Prints one JSON object per measurement.

use farpool::embedded::{EmbeddedConfig, EmbeddedPool};
use farpool::{BlockHandle, Placement};
use farpool_rdma::TransportKind;
use std::time::{Duration, Instant};

const SIZE: usize = 4096;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn measure(
    h: &BlockHandle,
    write: bool,
    secs: Duration,
) -> Result<(f64, f64, f64), farpool::ClientError> {
    let slots = (h.len() as usize / SIZE) as u64;
    let data = vec![0xA5u8; SIZE];
    let mut buf = vec![0u8; SIZE];
    let mut op = |i: u64| {
        let off = (i % slots) * SIZE as u64;
        if write {
            h.write(off, &data)
        } else {
            h.read(off, &mut buf)
        }
    };
    let warm = Instant::now();
    let mut i = 0;
    while warm.elapsed() < Duration::from_millis(500) {
        op(i)?;
        i += 1;
    }
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed() < secs {
        let t = Instant::now();
        op(i)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        i += 1;
    }
    let ops = lat.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    Ok((ops, percentile(&lat, 0.5), percentile(&lat, 0.99)))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(()); // `cargo test --benches` lists benchmarks: there are none to list
    }
    let secs = Duration::from_secs_f64(
        std::env::var("FARPOOL_REPL_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3.0),
    );
    let pool = EmbeddedPool::start(EmbeddedConfig {
        nodes: 3,
        capacity: 64 << 20,
        block_size: 1 << 20,
        transport: TransportKind::Soft,
        ..EmbeddedConfig::default()
    })?;
    let client = pool.client()?;
    let task = client.task("/bench/replication")?;
    for op in ["write", "read"] {
        for copies in [1u8, 2] {
            let h = task
                .alloc_replicated(1 << 20, Placement::LeastLoaded, copies)?
                .remove(0);
            let (ops, p50, p99) = measure(&h, op == "write", secs)?;
            println!(
                "{{\"op\":\"{op}\",\"size\":{SIZE},\"copies\":{copies},\"ops_per_s\":{ops:.0},\"mib_per_s\":{:.1},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1}}}",
                ops * SIZE as f64 / (1 << 20) as f64
            );
            task.free(vec![h])?;
        }
    }
    task.close()?;
    Ok(())
}
