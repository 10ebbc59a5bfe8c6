//! The farpool side of a benchmark: one client connection, one task and its blocks per
//! client thread.

use super::args::{BenchOp, Plan};
use super::error::BenchError;
use super::load::{BatchOutcome, Connection};
use crate::client::{BlockHandle, Client, ClientError, Task};
use crate::proto::Placement;
use farpool_rdma::Op;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Opens a client and a task at `path` on the controller at `addr`.
fn open(addr: &str, path: &str) -> Result<(Client, Task), BenchError> {
    let client = Client::connect(addr)
        .map_err(|e| BenchError::client(format!("connecting to the controller at {addr}"), e))?;
    let task = client
        .task(path)
        .map_err(|e| BenchError::client(format!("opening task {path}"), e))?;
    Ok((client, task))
}

/// A client running READ/WRITE/CAS/FAA batches on its own blocks.
///
/// All of a client's blocks are placed on one memory node (the first block's) and share
/// the client's one connection to it, so every batch goes out as one call of that
/// transport: one doorbell, as on RDMA. The memory node checks each operation's key
/// against the block it addresses.
pub(crate) struct DataConn {
    _client: Client,
    task: Option<Task>,
    handles: Vec<BlockHandle>,
    /// `(index into handles, byte offset in that block)` per slot.
    slots: Vec<(usize, u64)>,
    op: BenchOp,
    /// One read buffer per operation of a batch.
    bufs: Vec<Vec<u8>>,
    /// The value written by WRITE.
    data: Vec<u8>,
    /// Per slot, the value CAS expects to find (its last observed value).
    expected: Vec<u64>,
}

impl DataConn {
    /// Connects, opens the task at `path` and allocates enough blocks for `plan.slots`
    /// slots of `plan.size` bytes.
    pub(crate) fn connect(addr: &str, path: &str, plan: &Plan) -> Result<Self, BenchError> {
        let (client, task) = open(addr, path)?;
        let mut handles = task
            .alloc(1)
            .map_err(|e| BenchError::client("allocating the first block", e))?;
        let Some(first) = handles.first() else {
            return Err(BenchError::Args(
                "the controller granted no block for a 1-byte allocation".into(),
            ));
        };
        let block_len = first.len();
        let (first_id, first_transport) = (first.id(), Arc::clone(first.transport()));
        if plan.size > block_len {
            return Err(BenchError::Args(format!(
                "--size {} is larger than the cluster's block size {block_len}; an operation must fit in one block",
                plan.size
            )));
        }
        let per_block = block_len / plan.size;
        let blocks_needed = plan.slots.div_ceil(per_block);
        if blocks_needed > 1 {
            let node = first_id.node;
            let more = task
                .alloc_with((blocks_needed - 1) * block_len, Placement::Node(node))
                .map_err(|e| {
                    BenchError::client(
                        format!(
                            "allocating {} more blocks on node {node}",
                            blocks_needed - 1
                        ),
                        e,
                    )
                })?;
            handles.extend(more);
        }
        if let Some(h) = handles
            .iter()
            .find(|h| !Arc::ptr_eq(h.transport(), &first_transport))
        {
            return Err(BenchError::Args(format!(
                "block {} was placed on another memory node than block {}; the cluster ignored the placement request",
                h.id(),
                first_id
            )));
        }
        let wanted = usize::try_from(plan.slots).unwrap_or(usize::MAX);
        let mut slots = Vec::with_capacity(wanted);
        'fill: for (index, h) in handles.iter().enumerate() {
            for k in 0..h.len() / plan.size {
                if slots.len() == wanted {
                    break 'fill;
                }
                slots.push((index, k * plan.size));
            }
        }
        if slots.len() < wanted {
            return Err(BenchError::Args(format!(
                "the granted blocks hold {} slots of {} bytes, {} are needed",
                slots.len(),
                plan.size,
                wanted
            )));
        }
        let op_bytes = usize::try_from(plan.size).unwrap_or(usize::MAX);
        Ok(Self {
            _client: client,
            task: Some(task),
            handles,
            op: plan.op,
            bufs: if plan.op == BenchOp::Read {
                vec![vec![0; op_bytes]; plan.depth]
            } else {
                Vec::new()
            },
            data: if plan.op == BenchOp::Write {
                super::payload(plan.size)
            } else {
                Vec::new()
            },
            expected: if plan.op == BenchOp::Cas {
                vec![0; slots.len()]
            } else {
                Vec::new()
            },
            slots,
        })
    }
}

impl Connection for DataConn {
    fn run_batch(&mut self, slots: &[usize]) -> Result<BatchOutcome, BenchError> {
        let Self {
            handles,
            slots: slot_map,
            op,
            bufs,
            data,
            expected,
            ..
        } = self;
        let data: &[u8] = data;
        let Some(exec) = handles.first() else {
            return Err(BenchError::Args("no blocks to run operations on".into()));
        };
        let locate = |s: usize| {
            slot_map
                .get(s)
                .and_then(|&(h, off)| handles.get(h).map(|h| (h, off)))
                .ok_or_else(|| BenchError::Args(format!("slot {s} is out of range")))
        };
        let build = |e: crate::client::ClientError| BenchError::client("building an operation", e);
        let mut ops: Vec<Op<'_>> = Vec::with_capacity(slots.len());
        match op {
            BenchOp::Read => {
                for (buf, &s) in bufs.iter_mut().zip(slots) {
                    let (h, off) = locate(s)?;
                    ops.push(h.read_op(off, buf).map_err(build)?);
                }
            }
            BenchOp::Write => {
                for &s in slots {
                    let (h, off) = locate(s)?;
                    ops.push(h.write_op(off, data).map_err(build)?);
                }
            }
            BenchOp::Cas => {
                for &s in slots {
                    let (h, off) = locate(s)?;
                    let old = expected.get(s).copied().unwrap_or(0);
                    ops.push(h.cas_op(off, old, old.wrapping_add(1)).map_err(build)?);
                }
            }
            BenchOp::Faa => {
                for &s in slots {
                    let (h, off) = locate(s)?;
                    ops.push(h.faa_op(off, 1).map_err(build)?);
                }
            }
            BenchOp::Alloc => {
                return Err(BenchError::Args(
                    "alloc is measured by the allocation benchmark, not on blocks".into(),
                ))
            }
            BenchOp::Get
            | BenchOp::Put
            | BenchOp::Enqueue
            | BenchOp::Dequeue
            | BenchOp::Append
            | BenchOp::Scan => {
                return Err(BenchError::Args(format!(
                    "{op} is a data-structure operation, measured on a structure, not on blocks"
                )))
            }
        }
        let mut result = exec
            .transport()
            .execute(&mut ops)
            .map_err(ClientError::from);
        let expired = |o: &Op<'_>| {
            matches!(
                o.status,
                farpool_rdma::OpStatus::Failed(farpool_rdma::OpError::GrantExpired { .. })
            )
        };
        if result.is_err() && ops.iter().any(expired) {
            // Soft grants live --grant-ttl-secs: refresh them through their handles.
            let hs = slots
                .iter()
                .map(|&s| locate(s).map(|(h, _)| h))
                .collect::<Result<Vec<_>, _>>()?;
            result = BlockHandle::retry_expired_many(&hs, &mut ops);
        }
        let mut outcome = BatchOutcome::default();
        for (o, &s) in ops.iter().zip(slots) {
            match o.outcome() {
                Ok(found) => {
                    if *op == BenchOp::Cas {
                        if let Some(e) = expected.get_mut(s) {
                            // Swapped: the word now holds e + 1. Not swapped: try what
                            // was found next time.
                            *e = if found == *e {
                                e.wrapping_add(1)
                            } else {
                                found
                            };
                        }
                    }
                }
                Err(err) => {
                    outcome.fail(|| err.to_string());
                }
            }
        }
        if let Err(e) = result {
            if outcome.failed > 0 {
                outcome.error = Some(e.to_string());
            }
        }
        Ok(outcome)
    }

    fn finish(mut self) -> Result<(), BenchError> {
        match self.task.take() {
            Some(task) => task
                .close()
                .map_err(|e| BenchError::client("closing the benchmark task", e)),
            None => Ok(()),
        }
    }
}

/// Blocks an allocation client holds before releasing them with one `Free` request.
pub(crate) const ALLOC_FREE_BATCH: usize = 16;

/// A client measuring controller allocations the way a task uses them: it allocates one
/// block at a time and, every [`ALLOC_FREE_BATCH`] blocks, frees what it holds with one
/// request (as a task releases its blocks when it ends). The recorded latency is the
/// allocation's alone; the rate counts allocations, and the frees' time is inside the
/// measured window.
pub(crate) struct AllocConn {
    _client: Client,
    task: Option<Task>,
    held: Vec<BlockHandle>,
}

impl AllocConn {
    /// Connects and opens the task at `path`; stores the cluster's block length in
    /// `block_len` (learned from one allocation before the run).
    pub(crate) fn connect(
        addr: &str,
        path: &str,
        block_len: &AtomicU64,
    ) -> Result<Self, BenchError> {
        let (client, task) = open(addr, path)?;
        let blocks = task
            .alloc(1)
            .map_err(|e| BenchError::client("allocating a block", e))?;
        if let Some(b) = blocks.first() {
            block_len.store(b.len(), Ordering::Relaxed);
        }
        task.free(blocks)
            .map_err(|e| BenchError::client("freeing a block", e))?;
        Ok(Self {
            _client: client,
            task: Some(task),
            held: Vec::with_capacity(ALLOC_FREE_BATCH),
        })
    }
}

impl Connection for AllocConn {
    fn run_batch(&mut self, _slots: &[usize]) -> Result<BatchOutcome, BenchError> {
        let Some(task) = &self.task else {
            return Err(BenchError::Args("the allocation task is closed".into()));
        };
        let started = Instant::now();
        let allocated = task.alloc(1);
        let latency = started.elapsed();
        let mut error = match allocated {
            Ok(blocks) => {
                self.held.extend(blocks);
                None
            }
            Err(e) => Some(format!("alloc: {e}")),
        };
        if self.held.len() >= ALLOC_FREE_BATCH {
            if let Err(e) = task.free(std::mem::take(&mut self.held)) {
                error.get_or_insert(format!("free: {e}"));
            }
        }
        Ok(BatchOutcome {
            failed: u64::from(error.is_some()),
            error,
            latency: Some(latency),
        })
    }

    fn finish(mut self) -> Result<(), BenchError> {
        match self.task.take() {
            Some(task) => task
                .close()
                .map_err(|e| BenchError::client("closing the allocation task", e)),
            None => Ok(()),
        }
    }
}
