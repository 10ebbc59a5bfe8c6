//! Tree reduction with the DAG executor: sums 1..=N over a binary tree of tasks, once
//! with the decentralized (Wukong) scheduler and once with the centralized baseline,
//! on the same executors and the same embedded pool, and checks both against the
//! direct sum.
//!
//! `cargo run --release --example dag_tree_reduction -- [LEAVES] [EXECUTORS]`
//! (defaults: 1024 leaves, 4 executors).

use farpool::dag::{encode, DagRuntime, Graph, Input, Registry, RuntimeConfig, Scheduler};
use farpool::{EmbeddedConfig, EmbeddedPool};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let leaves: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1024);
    let executors: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(4);
    if leaves == 0 {
        return Err("LEAVES must be at least 1".into());
    }

    let mut registry = Registry::new();
    registry.register("leaf", |inputs| Ok(encode(&inputs.get::<u64>("v")?)?));
    registry.register("sum", |inputs| {
        let mut total = 0u64;
        for name in inputs.names() {
            total += inputs.get::<u64>(name)?;
        }
        Ok(encode(&total)?)
    });

    let mut graph = Graph::new();
    let mut level: Vec<String> = Vec::new();
    for i in 0..leaves {
        let name = format!("leaf-{i}");
        graph.add(&name, "leaf", [("v", Input::value(&(i + 1))?)])?;
        level.push(name);
    }
    let mut depth = 0;
    while level.len() > 1 {
        let mut next = Vec::new();
        for (j, pair) in level.chunks(2).enumerate() {
            let name = format!("sum-{depth}-{j}");
            let inputs: Vec<(String, Input)> = pair
                .iter()
                .enumerate()
                .map(|(k, p)| (format!("in{k}"), Input::task(p)))
                .collect();
            graph.add(&name, "sum", inputs)?;
            next.push(name);
        }
        level = next;
        depth += 1;
    }
    let root = level.pop().ok_or("the tree has no root")?;

    let pool = EmbeddedPool::start(EmbeddedConfig::default())?;
    let runtime = DagRuntime::new(
        pool.client()?,
        registry,
        RuntimeConfig {
            executors,
            ..RuntimeConfig::default()
        },
    )?;
    let expected = leaves * (leaves + 1) / 2;
    for scheduler in [Scheduler::Wukong, Scheduler::Central] {
        let out = runtime.run(&graph, scheduler)?;
        let total: u64 = out.get(&root)?;
        let s = out.stats();
        println!(
            "{scheduler:?}: sum {total} ({}), {} tasks in {:.2} ms, {:.1} us/task, {} invocations, {} counter ops, {} pool bytes written",
            if total == expected { "correct" } else { "WRONG" },
            s.tasks,
            s.makespan.as_secs_f64() * 1e3,
            s.makespan.as_secs_f64() * 1e6 * executors as f64 / s.tasks as f64,
            s.invocations,
            s.counter_ops,
            s.bytes_written,
        );
        if total != expected {
            return Err(format!("{scheduler:?} computed {total}, expected {expected}").into());
        }
    }
    Ok(())
}
