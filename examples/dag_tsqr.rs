//! TSQR with the DAG executor: the R factor of a 262,144 x 128 test matrix from QRs
//! of 8,192 x 128 chunks merged pairwise up a binary tree, with the decentralized
//! (Wukong) scheduler and the centralized baseline on the same executors and embedded
//! pool, each checked (up to row signs) against a direct QR of the whole matrix with
//! faer.
//!
//! `cargo run --release --example dag_tsqr -- [ROWS] [COLS] [CHUNK] [EXECUTORS]`
//! (defaults: 262144, 128, 8192, 4). `farpool bench dag --workload tsqr` runs it with
//! repetitions and JSON output.

use farpool::dag::workloads::{tsqr, TsqrSpec};
use farpool::{EmbeddedConfig, EmbeddedPool};

#[path = "common/mod.rs"]
mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let d = TsqrSpec::default();
    let rows: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(d.rows);
    let cols: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(d.cols);
    let chunk: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(d.chunk);
    let executors: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(4);
    let workload = tsqr(TsqrSpec {
        rows,
        cols,
        chunk,
        ..d
    })?;
    let pool = EmbeddedPool::start(EmbeddedConfig::default())?;
    common::run_both(&pool, &workload, executors, common::bytes_line)
}
