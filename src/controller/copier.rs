//! Re-replication copies: the controller acts as a one-sided client that reads a live
//! copy of a block and writes it into the group's new (pending) copy.
//!
//! Clients write every copy of a replicated block, the primary first, and from the
//! moment re-replication starts their refreshed grants include the pending copy. A
//! client WRITE can therefore race with the copy and be overwritten in the new copy by
//! older bytes the copier read before it. The copier closes that gap by verification:
//! after the first copy it reads the source and the new copy again and rewrites every
//! chunk that differs, until one whole pass finds them equal. Because clients write the
//! source before the new copy, any WRITE the copier overwrote was already in the source
//! when the next pass read it, so a clean pass means the new copy holds everything the
//! source held. See docs/OPERATIONS.md ("Replication") for the limits.

use super::server::Shared;
use crate::client::data::DataPlane;
use crate::client::{BlockHandle, ClientError};
use crate::proto::BlockGrant;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, watch};

/// Bytes compared and rewritten at a time during verification.
const CHUNK: usize = 64 * 1024;
/// Verification passes before a copy is given up (and retried later).
const MAX_PASSES: usize = 64;

/// One copy to make.
#[derive(Debug)]
pub(crate) struct CopyJob {
    /// Replica group id.
    pub group: u64,
    /// A live copy (read-only grant).
    pub source: Box<BlockGrant>,
    /// The new copy (read-write grant).
    pub target: Box<BlockGrant>,
}

/// Runs copies until shutdown, each on a blocking thread, reporting the outcome to
/// the state machine.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<CopyJob>,
    mut shutdown: watch::Receiver<bool>,
) {
    let data = Arc::new(DataPlane::default());
    loop {
        let job = tokio::select! {
            _ = shutdown.wait_for(|&stop| stop) => break,
            job = rx.recv() => match job {
                Some(job) => job,
                None => break,
            },
        };
        let shared = shared.clone();
        let data = data.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let (group, target) = (job.group, job.target.block);
            let res =
                tokio::task::spawn_blocking(move || copy_block(&data, &job.source, &job.target))
                    .await;
            let ok = match res {
                Ok(Ok(passes)) => {
                    tracing::info!(group, %target, passes, elapsed = ?started.elapsed(), "re-replication done");
                    true
                }
                Ok(Err(e)) => {
                    tracing::warn!(group, %target, "re-replication failed, will retry: {e}");
                    false
                }
                Err(e) => {
                    tracing::error!(group, %target, "re-replication task failed: {e}");
                    false
                }
            };
            let effects = {
                let mut state = shared.state.lock();
                let effects = if ok {
                    state.repair_done(group, target)
                } else {
                    state.repair_failed(group, target)
                };
                shared.persist(&mut state);
                effects
            };
            shared.dispatch(effects, None);
        });
    }
}

/// Copies `source` into `target` and verifies it (see the module docs). Returns the
/// number of verification passes.
pub(crate) fn copy_block(
    data: &DataPlane,
    source: &BlockGrant,
    target: &BlockGrant,
) -> Result<usize, ClientError> {
    let src = BlockHandle::new(source.clone(), data.transport(&source.endpoint)?, None);
    let dst = BlockHandle::new(target.clone(), data.transport(&target.endpoint)?, None);
    let len = usize::try_from(src.len().min(dst.len())).unwrap_or(usize::MAX);
    let mut a = vec![0u8; len];
    let mut b = vec![0u8; len];
    src.read(0, &mut a)?;
    dst.write(0, &a)?;
    for pass in 1..=MAX_PASSES {
        src.read(0, &mut a)?;
        dst.read(0, &mut b)?;
        let mut clean = true;
        for (i, (x, y)) in a.chunks(CHUNK).zip(b.chunks(CHUNK)).enumerate() {
            if x != y {
                clean = false;
                dst.write((i * CHUNK) as u64, x)?;
            }
        }
        if clean {
            return Ok(pass);
        }
    }
    Err(ClientError::Protocol(format!(
        "block {} kept changing through {MAX_PASSES} verification passes",
        source.block
    )))
}
