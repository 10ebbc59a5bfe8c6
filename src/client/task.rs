//! A task: a path in the pool namespace that owns blocks under a lease.

use super::{BlockHandle, Client, ClientError};
use crate::proto::{Placement, PoolPath, Request, Response};

/// An open task at a pool path such as `/job/stage/task`.
///
/// While open, its lease is renewed in the background. [`Task::close`] (or dropping the
/// task) removes the path and frees every block under it; [`Task::finish`] stops
/// renewing but keeps the data for later stages, alive as long as an ancestor's lease
/// is renewed (for example the job driver's [`Client::lease`]).
pub struct Task {
    client: Client,
    path: PoolPath,
    done: bool,
}

impl Task {
    pub(crate) fn new(client: Client, path: PoolPath) -> Self {
        client.renewer().add(&path);
        Self {
            client,
            path,
            done: false,
        }
    }

    /// The task's path.
    pub fn path(&self) -> &PoolPath {
        &self.path
    }

    /// The client this task belongs to.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Allocates blocks covering at least `bytes`, owned by the task's path, placed on
    /// the least-loaded memory nodes.
    pub fn alloc(&self, bytes: u64) -> Result<Vec<BlockHandle>, ClientError> {
        self.alloc_at_path(self.path.clone(), bytes, Placement::LeastLoaded)
    }

    /// Allocates with an explicit placement policy.
    pub fn alloc_with(
        &self,
        bytes: u64,
        placement: Placement,
    ) -> Result<Vec<BlockHandle>, ClientError> {
        self.alloc_at_path(self.path.clone(), bytes, placement)
    }

    /// Allocates blocks owned by the child path `name` (relative, for example `part-3`),
    /// so other tasks can find them with [`Client::open_blocks`].
    pub fn alloc_at(&self, name: &str, bytes: u64) -> Result<Vec<BlockHandle>, ClientError> {
        let path = self.path.join(name)?;
        self.alloc_at_path(path, bytes, Placement::LeastLoaded)
    }

    fn alloc_at_path(
        &self,
        path: PoolPath,
        bytes: u64,
        placement: Placement,
    ) -> Result<Vec<BlockHandle>, ClientError> {
        match self.client.request(Request::Alloc {
            path: path.clone(),
            bytes,
            placement,
        })? {
            Response::Blocks(grants) => self.client.handles(&path, grants),
            other => Err(ClientError::unexpected(&other)),
        }
    }

    /// The task's own blocks (owned by exactly its path), with write access.
    pub fn blocks(&self) -> Result<Vec<BlockHandle>, ClientError> {
        self.client.open_blocks(self.path.as_str(), true)
    }

    /// Frees `blocks`, which must be owned by this task's path. Their handles (and any
    /// copies of them) stop working.
    pub fn free(&self, blocks: Vec<BlockHandle>) -> Result<(), ClientError> {
        self.free_at(&self.path, blocks)
    }

    /// Frees blocks owned by the child path `name`.
    pub fn free_child(&self, name: &str, blocks: Vec<BlockHandle>) -> Result<(), ClientError> {
        self.free_at(&self.path.join(name)?, blocks)
    }

    fn free_at(&self, path: &PoolPath, blocks: Vec<BlockHandle>) -> Result<(), ClientError> {
        if blocks.is_empty() {
            return Ok(());
        }
        self.client.request(Request::Free {
            path: path.clone(),
            blocks: blocks.iter().map(|b| b.id()).collect(),
        })?;
        Ok(())
    }

    /// Ends the task and frees everything under its path.
    pub fn close(mut self) -> Result<(), ClientError> {
        self.end(true, true)
    }

    /// Ends the task but keeps its data: the path stays alive while an ancestor's
    /// lease is renewed, and is reclaimed when it is removed or its lease expires.
    pub fn finish(mut self) -> Result<(), ClientError> {
        self.end(false, true)
    }

    /// Ends the task; `patient` waits for a lost controller connection to come back.
    fn end(&mut self, free: bool, patient: bool) -> Result<(), ClientError> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        self.client.renewer().remove(&self.path);
        if free {
            let req = Request::Remove {
                path: self.path.clone(),
            };
            if patient {
                self.client.request(req)?;
            } else {
                self.client.request_once(req)?;
            }
        }
        Ok(())
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Err(e) = self.end(true, false) {
            tracing::warn!(path = %self.path, error = %e, "could not free task blocks on drop; the lease will reclaim them");
        }
    }
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task").field("path", &self.path).finish()
    }
}
