//! Blocked GEMM: `C = A x B` for `n x n` test matrices in `block x block` blocks.

use super::matrix::{self, block, max_abs};
use super::{Check, TaskWork, Workload};
use crate::dag::{DagError, Graph, Input, Registry, TaskError};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};
use std::sync::{Arc, OnceLock};

/// Size of a blocked GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GemmSpec {
    /// Matrix side (the workload: at least 2,048).
    pub n: usize,
    /// Block side (512); must divide `n`.
    pub block: usize,
    /// Seed of the test matrices (`A` uses `seed`, `B` uses `seed + 1`).
    pub seed: u64,
    /// Extra time every task takes.
    pub work: TaskWork,
}

impl Default for GemmSpec {
    fn default() -> Self {
        Self {
            n: 2048,
            block: 512,
            seed: 42,
            work: TaskWork::default(),
        }
    }
}

/// The blocked GEMM graph: `a-i-k` and `b-k-j` generate blocks of `A` and `B`,
/// `mul-i-j-k` multiplies `A[i,k] x B[k,j]` (a fan-in of two), and `c-i-j` adds the
/// `n / block` products of block `C[i,j]` (a fan-in of `n / block`). The sinks
/// `c-i-j` are checked against `A x B` computed directly with faer.
pub fn gemm(spec: GemmSpec) -> Result<Workload, DagError> {
    let GemmSpec {
        n,
        block: bs,
        seed,
        work,
    } = spec;
    if bs == 0 || n == 0 || n % bs != 0 || n > 1 << 16 {
        return Err(super::config_error(format!(
            "GEMM needs a block side that divides the matrix side (up to 65536); got {n} in blocks of {bs}"
        )));
    }
    let nb = n / bs;
    let mut registry = Registry::new();
    registry.register("gen", move |inputs| {
        work.run();
        let (which, bi, bj): (u64, usize, usize) = inputs.get("at")?;
        Ok(matrix::encode(&block(
            seed + which,
            bi * bs,
            bj * bs,
            bs,
            bs,
        )))
    });
    registry.register("mul", move |inputs| {
        work.run();
        let a = matrix::decode(inputs.bytes("a")?)?;
        let b = matrix::decode(inputs.bytes("b")?)?;
        if a.ncols() != b.nrows() {
            return Err(TaskError::msg("block shapes do not match"));
        }
        let mut c = Mat::<f64>::zeros(a.nrows(), b.ncols());
        matmul(
            c.as_mut(),
            Accum::Replace,
            a.as_ref(),
            b.as_ref(),
            1.0,
            Par::Seq,
        );
        Ok(matrix::encode(&c))
    });
    registry.register("add", move |inputs| {
        work.run();
        let mut total: Option<Mat<f64>> = None;
        for name in inputs.names() {
            let m = matrix::decode(inputs.bytes(name)?)?;
            total = Some(match total {
                None => m,
                Some(t) if t.shape() == m.shape() => t + m,
                Some(_) => return Err(TaskError::msg("block shapes do not match")),
            });
        }
        let total = total.ok_or_else(|| TaskError::msg("add needs at least one input"))?;
        Ok(matrix::encode(&total))
    });

    let mut graph = Graph::new();
    for i in 0..nb {
        for k in 0..nb {
            graph.add(
                &format!("a-{i}-{k}"),
                "gen",
                [("at", Input::value(&(0u64, i, k))?)],
            )?;
            graph.add(
                &format!("b-{i}-{k}"),
                "gen",
                [("at", Input::value(&(1u64, i, k))?)],
            )?;
        }
    }
    for i in 0..nb {
        for j in 0..nb {
            let mut parts = Vec::with_capacity(nb);
            for k in 0..nb {
                let name = format!("mul-{i}-{j}-{k}");
                graph.add(
                    &name,
                    "mul",
                    [
                        ("a", Input::task(&format!("a-{i}-{k}"))),
                        ("b", Input::task(&format!("b-{k}-{j}"))),
                    ],
                )?;
                parts.push((format!("p{k}"), Input::task(&name)));
            }
            graph.add(&format!("c-{i}-{j}"), "add", parts)?;
        }
    }

    let expected: Arc<OnceLock<Mat<f64>>> = Arc::new(OnceLock::new());
    Ok(Workload {
        name: "gemm",
        registry,
        graph,
        checker: Box::new(move |out| {
            let c = expected.get_or_init(|| {
                let a = block(seed, 0, 0, n, n);
                let b = block(seed + 1, 0, 0, n, n);
                let mut c = Mat::<f64>::zeros(n, n);
                matmul(
                    c.as_mut(),
                    Accum::Replace,
                    a.as_ref(),
                    b.as_ref(),
                    1.0,
                    Par::Seq,
                );
                c
            });
            let scale = max_abs(c).max(1.0);
            let mut worst = 0.0f64;
            for i in 0..nb {
                for j in 0..nb {
                    let name = format!("c-{i}-{j}");
                    let got = match matrix::decode(out.bytes(&name)?) {
                        Ok(m) if m.shape() == (bs, bs) => m,
                        Ok(_) | Err(_) => {
                            return Ok(Check {
                                correct: false,
                                detail: format!("{name} is not a {bs}x{bs} block"),
                            })
                        }
                    };
                    let want = c.submatrix(i * bs, j * bs, bs, bs).to_owned();
                    worst = worst.max(max_abs(&(got - want)));
                }
            }
            let rel = worst / scale;
            Ok(Check {
                correct: rel < 1e-10,
                detail: format!("{n}x{n} in {bs}x{bs} blocks, max relative deviation {rel:.2e}"),
            })
        }),
    })
}
