//! Blocked GEMM with the DAG executor: `C = A x B` for 2,048 x 2,048 test matrices in
//! 512 x 512 blocks (generate, multiply, add tasks), with the decentralized (Wukong)
//! scheduler and the centralized baseline on the same executors and embedded pool,
//! each checked against `A x B` computed directly with faer.
//!
//! `cargo run --release --example dag_gemm -- [N] [BLOCK] [EXECUTORS]`
//! (defaults: 2048, 512, 4). `farpool bench dag --workload gemm` runs it with
//! repetitions and JSON output.

use farpool::dag::workloads::{gemm, GemmSpec};
use farpool::dag::{DagRuntime, RuntimeConfig, Scheduler};
use farpool::{EmbeddedConfig, EmbeddedPool};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let d = GemmSpec::default();
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(d.n);
    let block: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(d.block);
    let executors: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(4);
    let workload = gemm(GemmSpec { n, block, ..d })?;
    let pool = EmbeddedPool::start(EmbeddedConfig {
        capacity: 512 << 20,
        ..EmbeddedConfig::default()
    })?;
    let runtime = DagRuntime::new(
        pool.client()?,
        workload.registry().clone(),
        RuntimeConfig {
            executors,
            ..RuntimeConfig::default()
        },
    )?;
    for scheduler in [Scheduler::Wukong, Scheduler::Central] {
        let out = runtime.run(workload.graph(), scheduler)?;
        let check = workload.check(&out)?;
        let s = out.stats();
        println!(
            "{scheduler:?}: {} ({}), {} tasks in {:.1} ms (compute {:.1} ms), pool bytes moved {} of {} ideal",
            check.detail,
            if check.correct { "correct" } else { "WRONG" },
            s.tasks,
            s.makespan.as_secs_f64() * 1e3,
            s.compute.as_secs_f64() * 1e3,
            s.bytes_written + s.bytes_read,
            s.ideal_bytes,
        );
        if !check.correct {
            return Err(format!("{scheduler:?}: {}", check.detail).into());
        }
    }
    Ok(())
}
