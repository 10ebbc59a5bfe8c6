//! TSQR: the R factor of a tall-skinny test matrix by a binary tree of QRs.

use super::matrix::{self, block, max_abs};
use super::{Check, TaskWork, Workload};
use crate::dag::{DagError, Graph, Input, Registry, TaskError};
use faer::Mat;
use std::sync::{Arc, OnceLock};

/// Size of a TSQR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TsqrSpec {
    /// Rows of the matrix (the workload: 262,144).
    pub rows: usize,
    /// Columns (128).
    pub cols: usize,
    /// Rows per leaf chunk (8,192); must divide `rows` and be at least `cols`.
    pub chunk: usize,
    /// Seed of the test matrix.
    pub seed: u64,
    /// Extra time every task takes.
    pub work: TaskWork,
}

impl Default for TsqrSpec {
    fn default() -> Self {
        Self {
            rows: 262_144,
            cols: 128,
            chunk: 8_192,
            seed: 7,
            work: TaskWork::default(),
        }
    }
}

/// `R` with every row's sign flipped so its diagonal is non-negative: the R factor of
/// a full-rank matrix is unique up to these signs.
fn normalized(r: &Mat<f64>) -> Mat<f64> {
    let n = r.nrows().min(r.ncols());
    Mat::from_fn(n, r.ncols(), |i, j| {
        let v = if j >= i { r[(i, j)] } else { 0.0 };
        if r[(i, i)] < 0.0 {
            -v
        } else {
            v
        }
    })
}

/// The R factor (`cols x cols`) of `m`.
fn r_factor(m: &Mat<f64>) -> Mat<f64> {
    m.qr().thin_R().to_owned()
}

/// The TSQR graph: `qr-0-i` generates chunk `i` and factors it; `qr-l-j` stacks the
/// R factors of `qr-(l-1)-(2j)` and `qr-(l-1)-(2j+1)` and factors the stack (a fan-in
/// of two), up to one root. The root's R is checked, up to row signs, against the R
/// of the whole matrix factored directly with faer.
pub fn tsqr(spec: TsqrSpec) -> Result<Workload, DagError> {
    let TsqrSpec {
        rows,
        cols,
        chunk,
        seed,
        work,
    } = spec;
    if cols == 0 || chunk < cols || rows % chunk != 0 || rows == 0 || rows > 1 << 26 {
        return Err(super::config_error(format!(
            "TSQR needs rows (up to 2^26) split into chunks of at least `cols` rows; got {rows}x{cols} in chunks of {chunk} rows"
        )));
    }
    let chunks = rows / chunk;
    let mut registry = Registry::new();
    registry.register("leaf_qr", move |inputs| {
        work.run();
        let i: usize = inputs.get("chunk")?;
        Ok(matrix::encode(&r_factor(&block(
            seed,
            i * chunk,
            0,
            chunk,
            cols,
        ))))
    });
    registry.register("merge_qr", move |inputs| {
        work.run();
        let mut names: Vec<&str> = inputs.names().collect();
        names.sort_unstable();
        let mut parts = Vec::with_capacity(names.len());
        for name in names {
            let r = matrix::decode(inputs.bytes(name)?)?;
            if r.ncols() != cols {
                return Err(TaskError::msg("an R factor has the wrong width"));
            }
            parts.push(r);
        }
        let height: usize = parts.iter().map(|r| r.nrows()).sum();
        let mut stacked = Mat::<f64>::zeros(height, cols);
        let mut at = 0;
        for r in &parts {
            stacked
                .as_mut()
                .submatrix_mut(at, 0, r.nrows(), cols)
                .copy_from(r.as_ref());
            at += r.nrows();
        }
        Ok(matrix::encode(&r_factor(&stacked)))
    });

    let mut graph = Graph::new();
    let mut level: Vec<String> = Vec::with_capacity(chunks);
    for i in 0..chunks {
        let name = format!("qr-0-{i}");
        graph.add(&name, "leaf_qr", [("chunk", Input::value(&i)?)])?;
        level.push(name);
    }
    let mut depth = 1;
    while level.len() > 1 {
        let mut next = Vec::with_capacity(level.len().div_ceil(2));
        for (j, pair) in level.chunks(2).enumerate() {
            let name = format!("qr-{depth}-{j}");
            // Input names sort in stacking order (top first).
            let inputs: Vec<(String, Input)> = pair
                .iter()
                .enumerate()
                .map(|(k, p)| (format!("r{k}"), Input::task(p)))
                .collect();
            graph.add(&name, "merge_qr", inputs)?;
            next.push(name);
        }
        level = next;
        depth += 1;
    }
    let root = level.pop().unwrap_or_else(|| "qr-0-0".to_string());

    let expected: Arc<OnceLock<Mat<f64>>> = Arc::new(OnceLock::new());
    Ok(Workload {
        name: "tsqr",
        registry,
        graph,
        checker: Box::new(move |out| {
            let want =
                expected.get_or_init(|| normalized(&r_factor(&block(seed, 0, 0, rows, cols))));
            let got = match matrix::decode(out.bytes(&root)?) {
                Ok(m) if m.shape() == (cols, cols) => normalized(&m),
                Ok(_) | Err(_) => {
                    return Ok(Check {
                        correct: false,
                        detail: format!("{root} is not a {cols}x{cols} R factor"),
                    })
                }
            };
            let rel = max_abs(&(got - want)) / max_abs(want).max(1.0);
            Ok(Check {
                correct: rel < 1e-9,
                detail: format!(
                    "R of {rows}x{cols} in {chunks} chunks, max relative deviation {rel:.2e} from a direct QR"
                ),
            })
        }),
    })
}
