//! Benchmark workloads for the DAG executor, each with a check against a direct
//! computation: tree reduction ([`tree_reduction`]), blocked GEMM ([`gemm`]) and TSQR
//! ([`tsqr`]). `farpool bench dag` and the `dag_*` examples run them with both
//! schedulers.
//!
//! Task functions are deterministic: inputs are generated inside leaf tasks from a
//! seed, so every run (and the direct computation) sees the same data.

mod gemm;
mod matrix;
mod tree;
mod tsqr;

pub use gemm::{gemm, GemmSpec};
pub use tree::{tree_reduction, TreeSpec};
pub use tsqr::{tsqr, TsqrSpec};

use super::{DagError, Graph, JobOutput, Registry};
use std::time::{Duration, Instant};

/// What each task does besides its own computation: nothing, sleep or spin for a
/// fixed time (tree reduction's 0, 1 and 10 ms tasks, sleeping or busy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct TaskWork {
    /// How long every task takes.
    pub time: Duration,
    /// Spin on the CPU instead of sleeping.
    pub busy: bool,
}

impl TaskWork {
    /// Sleeps or spins for the configured time.
    pub fn run(&self) {
        if self.time.is_zero() {
            return;
        }
        if self.busy {
            let start = Instant::now();
            let mut x = 0u64;
            while start.elapsed() < self.time {
                for _ in 0..64 {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
        } else {
            std::thread::sleep(self.time);
        }
    }
}

/// The outcome of checking a job's outputs against a direct computation.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// Whether every sink output matches.
    pub correct: bool,
    /// What was compared (and the largest deviation, for floating point).
    pub detail: String,
}

type Checker = Box<dyn Fn(&JobOutput) -> Result<Check, DagError> + Send + Sync>;

/// A workload ready to run: task functions, the graph, and a checker for its result.
pub struct Workload {
    name: &'static str,
    registry: Registry,
    graph: Graph,
    checker: Checker,
}

impl Workload {
    /// The workload's short name (`tr`, `gemm`, `tsqr`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The task functions the graph uses.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The graph.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Compares the sink outputs of a run with the direct computation.
    pub fn check(&self, out: &JobOutput) -> Result<Check, DagError> {
        (self.checker)(out)
    }
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload")
            .field("name", &self.name)
            .field("tasks", &self.graph.len())
            .finish()
    }
}

/// A workload by its parameters: what a worker process needs to rebuild the same graph
/// and task functions as the submitter (functions are code, deployed with the worker).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum WorkloadSpec {
    /// Tree reduction.
    Tr(TreeSpec),
    /// Blocked GEMM.
    Gemm(GemmSpec),
    /// TSQR.
    Tsqr(TsqrSpec),
}

impl WorkloadSpec {
    /// Builds the workload.
    pub fn build(&self) -> Result<Workload, DagError> {
        match *self {
            WorkloadSpec::Tr(s) => tree_reduction(s),
            WorkloadSpec::Gemm(s) => gemm(s),
            WorkloadSpec::Tsqr(s) => tsqr(s),
        }
    }
}

fn config_error(what: String) -> DagError {
    DagError::Config(what)
}
