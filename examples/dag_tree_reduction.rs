//! Tree reduction with the DAG executor: sums 1..=N over a binary tree of tasks, once
//! with the decentralized (Wukong) scheduler and once with the centralized baseline,
//! on the same executors and the same embedded pool, and checks both against the
//! direct sum.
//!
//! `cargo run --release --example dag_tree_reduction -- [LEAVES] [EXECUTORS] [TASK_MS] [busy|sleep] [soft|shm]`
//! (defaults: 1024 leaves, 4 executors, 0 ms, sleep, soft). `farpool bench dag
//! --workload tr` runs the same workload with repetitions and JSON output.

use farpool::dag::workloads::{tree_reduction, TaskWork, TreeSpec};
use farpool::{EmbeddedConfig, EmbeddedPool};
use std::time::Duration;

#[path = "common/mod.rs"]
mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let leaves: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1024);
    let executors: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(4);
    let task_ms: f64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(0.0);
    let busy = args.next().is_some_and(|a| a == "busy");
    let transport = args.next().unwrap_or_else(|| "soft".to_string()).parse()?;
    if !(task_ms.is_finite() && task_ms >= 0.0) {
        return Err("TASK_MS must be a non-negative number".into());
    }

    let workload = tree_reduction(TreeSpec {
        leaves,
        work: TaskWork {
            time: Duration::from_secs_f64(task_ms / 1e3),
            busy,
        },
    })?;
    let pool = EmbeddedPool::start(EmbeddedConfig {
        transport,
        ..EmbeddedConfig::default()
    })?;
    common::run_both(&pool, &workload, executors, |s| {
        let overhead = s.overhead_us_per_task(executors);
        format!(
            "{} tasks in {:.2} ms, overhead {overhead:.1} us/task, {} invocations, {} counter ops, {} pool bytes moved",
            s.tasks,
            s.makespan.as_secs_f64() * 1e3,
            s.invocations,
            s.counter_ops,
            s.bytes_written + s.bytes_read,
        )
    })
}
