//! Blocked GEMM with the DAG executor: `C = A x B` for 2,048 x 2,048 test matrices in
//! 512 x 512 blocks (generate, multiply, add tasks), with the decentralized (Wukong)
//! scheduler and the centralized baseline on the same executors and embedded pool,
//! each checked against `A x B` computed directly with faer.
//!
//! `cargo run --release --example dag_gemm -- [N] [BLOCK] [EXECUTORS]`
//! (defaults: 2048, 512, 4). `farpool bench dag --workload gemm` runs it with
//! repetitions and JSON output.

use farpool::dag::workloads::{gemm, GemmSpec};
use farpool::{EmbeddedConfig, EmbeddedPool};

#[path = "common/mod.rs"]
mod common;

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
    common::run_both(&pool, &workload, executors, common::bytes_line)
}
