//! Shared by the DAG examples: run a workload with both schedulers on the same
//! executors and pool, print one line each, and fail on a wrong result.

use farpool::dag::workloads::Workload;
use farpool::dag::{DagRuntime, JobStats, RuntimeConfig, Scheduler};
use farpool::EmbeddedPool;

/// Runs `workload` with the Wukong scheduler, then the central one, on `executors`
/// executors over `pool`; prints `describe(stats)` after each check's verdict.
pub fn run_both(
    pool: &EmbeddedPool,
    workload: &Workload,
    executors: usize,
    describe: impl Fn(&JobStats) -> String,
) -> Result<(), Box<dyn std::error::Error>> {
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
        println!(
            "{scheduler:?}: {} ({}), {}",
            check.detail,
            if check.correct { "correct" } else { "WRONG" },
            describe(out.stats()),
        );
        if !check.correct {
            return Err(format!("{scheduler:?}: {}", check.detail).into());
        }
    }
    Ok(())
}

/// The line GEMM and TSQR print: tasks, makespan, compute and pool bytes.
#[allow(dead_code)] // not every example uses it
pub fn bytes_line(s: &JobStats) -> String {
    format!(
        "{} tasks in {:.1} ms (compute {:.1} ms), pool bytes moved {} of {} ideal",
        s.tasks,
        s.makespan.as_secs_f64() * 1e3,
        s.compute.as_secs_f64() * 1e3,
        s.bytes_written + s.bytes_read,
        s.ideal_bytes,
    )
}
