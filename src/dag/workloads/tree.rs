//! Tree reduction: sums `1..=leaves` over a binary tree of tasks.

use super::{Check, TaskWork, Workload};
use crate::dag::{encode, DagError, Graph, Input, Registry};

/// Size and task time of a tree reduction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TreeSpec {
    /// Leaves (the workload has 1,024).
    pub leaves: u64,
    /// What every task does besides adding.
    pub work: TaskWork,
}

impl Default for TreeSpec {
    fn default() -> Self {
        Self {
            leaves: 1024,
            work: TaskWork::default(),
        }
    }
}

/// A binary tree reduction over `spec.leaves` leaves holding `1..=leaves` (`2 *
/// leaves - 1` tasks); the sink is `root`, checked against `leaves * (leaves + 1) / 2`.
pub fn tree_reduction(spec: TreeSpec) -> Result<Workload, DagError> {
    if spec.leaves == 0 || spec.leaves > 1 << 24 {
        return Err(super::config_error(format!(
            "a tree reduction needs 1 to {} leaves, not {}",
            1u64 << 24,
            spec.leaves
        )));
    }
    let work = spec.work;
    let mut registry = Registry::new();
    registry.register("leaf", move |inputs| {
        work.run();
        Ok(encode(&inputs.get::<u64>("v")?)?)
    });
    registry.register("sum", move |inputs| {
        work.run();
        let mut total = 0u64;
        for name in inputs.names() {
            total = total.wrapping_add(inputs.get::<u64>(name)?);
        }
        Ok(encode(&total)?)
    });

    let mut graph = Graph::new();
    let mut level: Vec<String> = Vec::new();
    for i in 0..spec.leaves {
        let name = format!("leaf-{i}");
        graph.add(&name, "leaf", [("v", Input::value(&(i + 1))?)])?;
        level.push(name);
    }
    let mut depth = 0;
    while level.len() > 1 {
        let mut next = Vec::with_capacity(level.len().div_ceil(2));
        for (j, pair) in level.chunks(2).enumerate() {
            let name = if level.len() <= 2 {
                "root".to_string()
            } else {
                format!("sum-{depth}-{j}")
            };
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
    let root = level.pop().unwrap_or_else(|| "root".to_string());
    let leaves = spec.leaves;
    let expected = leaves.wrapping_mul(leaves + 1) / 2;
    Ok(Workload {
        name: "tr",
        registry,
        graph,
        checker: Box::new(move |out| {
            let total: u64 = out.get(&root)?;
            Ok(Check {
                correct: total == expected,
                detail: format!("sum {total}, expected {expected}"),
            })
        }),
    })
}
