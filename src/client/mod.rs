//! The client library: connect to a controller, open tasks at pool paths, allocate
//! blocks, and read, write and run atomics on them with one-sided operations.
//!
//! ```no_run
//! # fn main() -> Result<(), farpool::ClientError> {
//! let client = farpool::Client::connect("127.0.0.1:7070")?;
//! let task = client.task("/wordcount/map/m0")?;
//! let blocks = task.alloc(1 << 20)?;
//! blocks[0].write(0, b"hello")?;
//! let mut buf = [0u8; 5];
//! blocks[0].read(0, &mut buf)?;
//! task.close()?; // frees the blocks
//! # Ok(()) }
//! ```
//!
//! Leases: a [`Task`] renews its path's lease in the background while it is open; a
//! [`LeaseGuard`] from [`Client::lease`] renews a whole prefix (for example a job driver
//! keeping `/wordcount` alive while its stages run). Data whose lease is not renewed is
//! reclaimed by the controller after the lease period plus a grace period.

mod block;
mod control;
pub(crate) mod data;
mod error;
mod lease;
mod replica;
mod task;

pub use block::{BatchRun, BlockHandle};
pub use error::ClientError;
pub use lease::LeaseGuard;
pub use task::Task;

use crate::proto::{BlockGrant, ClusterStatus, PoolPath, Request, Response};
use control::ControlConn;
use data::DataPlane;
use lease::Renewer;
use std::sync::Arc;
use std::time::Duration;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Name shown in controller logs.
    pub name: String,
    /// Timeout for connecting to the controller.
    pub connect_timeout: Duration,
    /// Timeout for one control request.
    pub request_timeout: Duration,
    /// How long a control request keeps trying to reconnect (with backoff) after the
    /// control connection broke, for example while the controller restarts; zero
    /// tries once, at once. Best-effort calls (freeing a dropped task) try once.
    pub reconnect_for: Duration,
    /// Client token from `farpool token` (required when the controller has a cluster
    /// key). Defaults to the `FARPOOL_TOKEN` environment variable.
    pub token: Option<String>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            name: format!("pid-{}", std::process::id()),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            reconnect_for: Duration::from_secs(30),
            token: std::env::var(crate::proto::token::TOKEN_ENV)
                .ok()
                .filter(|t| !t.trim().is_empty()),
        }
    }
}

/// A connection to a farpool controller plus the data-plane connections to memory
/// nodes it opens on demand. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
    /// Copies of every block of the data-structure objects this handle creates.
    copies: u8,
}

pub(crate) struct ClientInner {
    control: ControlConn,
    data: DataPlane,
    renewer: Renewer,
}

impl Client {
    /// Connects to the controller at `addr` (`host:port`).
    pub fn connect(addr: &str) -> Result<Client, ClientError> {
        Self::connect_with(addr, ClientConfig::default())
    }

    /// Connects with explicit settings.
    pub fn connect_with(addr: &str, config: ClientConfig) -> Result<Client, ClientError> {
        let control = ControlConn::connect(addr, &config)?;
        let lease = Duration::from_millis(control.lease_ms().max(30));
        let inner = Arc::new(ClientInner {
            control,
            data: DataPlane::default(),
            renewer: Renewer::new(lease),
        });
        inner.renewer.start(Arc::downgrade(&inner));
        Ok(Client { inner, copies: 1 })
    }

    /// This client with data-structure objects ([`crate::ds::File`], `Queue`, `Kv`,
    /// `Log`) created through it replicated: every block of an object created with the
    /// returned handle has `copies` copies on distinct memory nodes (1: unreplicated,
    /// the default; see docs/OPERATIONS.md, "Replication"). Objects keep the copy count
    /// of their first block for every block they add later, whoever adds it. Shares the
    /// connections of `self`.
    pub fn with_copies(&self, copies: u8) -> Client {
        Client {
            inner: self.inner.clone(),
            copies: copies.max(1),
        }
    }

    /// Copies per block of the data-structure objects created through this handle.
    pub fn copies(&self) -> u8 {
        self.copies
    }

    /// Opens a task at `path` (for example `/job/stage/task`): creates the path if
    /// needed and renews its lease in the background until the task is closed,
    /// finished or dropped.
    pub fn task(&self, path: &str) -> Result<Task, ClientError> {
        let path = PoolPath::parse(path)?;
        if path.is_root() {
            return Err(crate::proto::PathError::Root.into());
        }
        self.request(Request::Open { path: path.clone() })?;
        Ok(Task::new(self.clone(), path))
    }

    /// Keeps the lease of `prefix` (and so of everything below it) renewed until the
    /// guard is dropped. Creates the path if needed.
    pub fn lease(&self, prefix: &str) -> Result<LeaseGuard, ClientError> {
        let path = PoolPath::parse(prefix)?;
        self.request(Request::Open { path: path.clone() })?;
        Ok(LeaseGuard::new(self.clone(), path))
    }

    /// Handles for the blocks owned by exactly `path`, in allocation order. With
    /// `writable` the grants allow writes and atomics; otherwise they are read-only.
    pub fn open_blocks(&self, path: &str, writable: bool) -> Result<Vec<BlockHandle>, ClientError> {
        let path = PoolPath::parse(path)?;
        match self.request(Request::Lookup {
            path: path.clone(),
            writable,
        })? {
            Response::Blocks(grants) => self.handles(&path, grants),
            other => Err(ClientError::unexpected(&other)),
        }
    }

    /// Removes `path` and its subtree, freeing every block in it. Returns the number
    /// of blocks freed.
    pub fn remove(&self, path: &str) -> Result<u64, ClientError> {
        let path = PoolPath::parse(path)?;
        match self.request(Request::Remove { path })? {
            Response::Removed { blocks, .. } => Ok(blocks),
            other => Err(ClientError::unexpected(&other)),
        }
    }

    /// Sets (`Some`) or clears (`None`) the byte quota on `path` and its subtree.
    pub fn set_quota(&self, path: &str, bytes: Option<u64>) -> Result<(), ClientError> {
        let path = PoolPath::parse(path)?;
        self.request(Request::SetQuota { path, bytes })?;
        Ok(())
    }

    /// Pins (`true`) or unpins `path`: a pinned path is never reclaimed by lease
    /// expiry; its blocks stay until it is removed or unpinned. Paths below it are not
    /// pinned by it.
    pub fn pin(&self, path: &str, pinned: bool) -> Result<(), ClientError> {
        let path = PoolPath::parse(path)?;
        self.request(Request::Pin { path, pinned })?;
        Ok(())
    }

    /// Maps the object at `path` to `key` in the persistent tier at `tier_url`: when
    /// its lease runs out (lease plus grace without renewal), the controller flushes
    /// it there (with the object kind's `sync`) and then frees it, instead of just
    /// freeing it. `tier_url` is resolved by the controller's process: an absolute
    /// directory, `file:///dir` or `s3://bucket/prefix` (not `memory:`). The mapping
    /// is kept in the controller's metadata log. Mappings do not nest.
    pub fn map_to(&self, path: &str, tier_url: &str, key: &str) -> Result<(), ClientError> {
        let path = PoolPath::parse(path)?;
        let backing = Some(crate::proto::Backing {
            url: tier_url.to_string(),
            key: key.to_string(),
        });
        self.request(Request::Map { path, backing })?;
        Ok(())
    }

    /// Removes the mapping of `path`: it is freed at lease expiry like any path.
    pub fn unmap(&self, path: &str) -> Result<(), ClientError> {
        let path = PoolPath::parse(path)?;
        self.request(Request::Map {
            path,
            backing: None,
        })?;
        Ok(())
    }

    /// Renews the lease of `prefix` once.
    pub fn renew(&self, prefix: &str) -> Result<Duration, ClientError> {
        let prefix = PoolPath::parse(prefix)?;
        match self.request(Request::Renew { prefix })? {
            Response::Renewed { lease_ms } => Ok(Duration::from_millis(lease_ms)),
            other => Err(ClientError::unexpected(&other)),
        }
    }

    /// Cluster status: memory nodes, capacity, usage per path.
    pub fn status(&self) -> Result<ClusterStatus, ClientError> {
        match self.request(Request::Status)? {
            Response::Status(s) => Ok(*s),
            other => Err(ClientError::unexpected(&other)),
        }
    }

    /// The controller's lease period.
    pub fn lease_period(&self) -> Duration {
        Duration::from_millis(self.inner.control.lease_ms())
    }

    /// Sends one request and turns `Response::Error` into [`ClientError::Control`].
    pub(crate) fn request(&self, req: Request) -> Result<Response, ClientError> {
        match self.inner.control.call(req)? {
            Response::Error(e) => Err(ClientError::Control(e)),
            r => Ok(r),
        }
    }

    /// Like [`Client::request`], but reconnects at most once, without waiting.
    pub(crate) fn request_once(&self, req: Request) -> Result<Response, ClientError> {
        match self.inner.control.call_once(req)? {
            Response::Error(e) => Err(ClientError::Control(e)),
            r => Ok(r),
        }
    }

    /// Handles for `grants` of blocks owned by `path` (looked up again when a grant
    /// expires).
    pub(crate) fn handles(
        &self,
        path: &PoolPath,
        grants: Vec<BlockGrant>,
    ) -> Result<Vec<BlockHandle>, ClientError> {
        grants
            .into_iter()
            .map(|g| {
                let t = self.inner.data.transport(&g.endpoint)?;
                let ctx = replica::HandleCtx::new(self, path, &g, &t)?;
                let source = block::GrantSource {
                    client: Arc::downgrade(&self.inner),
                    path: path.clone(),
                };
                Ok(BlockHandle::with_ctx(g, t, ctx, Some(source)))
            })
            .collect()
    }

    pub(crate) fn renewer(&self) -> &Renewer {
        &self.inner.renewer
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("controller", &self.inner.control.addr())
            .finish()
    }
}
