//! An in-process pool: a controller and N memory nodes on 127.0.0.1, for tests,
//! examples and the demo. They speak the same protocols over loopback as separate
//! processes would.

use crate::client::{Client, ClientError};
use crate::controller::{Controller, ControllerConfig, ControllerError};
use crate::memnode::{MemNode, MemNodeConfig, MemNodeError};
use farpool_rdma::TransportKind;
use std::net::SocketAddr;
use std::time::Duration;

/// Settings of an embedded pool.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Number of memory nodes.
    pub nodes: usize,
    /// Region size of each node.
    pub capacity: u64,
    /// Block size.
    pub block_size: u64,
    /// Data-plane transport of every node.
    pub transport: TransportKind,
    /// Lease period.
    pub lease: Duration,
    /// Grace period after a lease lapses before its data is reclaimed.
    pub grace: Duration,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Test-only: start every memory node in torn mode ([`MemNode::set_torn_mode`]),
    /// so that READ/WRITE tear the way they may on RDMA. Data-structure tests use it
    /// with the soft transport (shm clients map the region themselves and are not
    /// affected).
    pub torn: bool,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            nodes: 2,
            capacity: 64 << 20,
            block_size: 1 << 20,
            transport: TransportKind::Soft,
            lease: Duration::from_secs(10),
            grace: Duration::from_secs(2),
            heartbeat: Duration::from_millis(500),
            torn: false,
        }
    }
}

/// Why an embedded pool could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// The controller failed to start.
    #[error("embedded controller: {0}")]
    Controller(#[from] ControllerError),
    /// A memory node failed to start.
    #[error("embedded memory node: {0}")]
    MemNode(#[from] MemNodeError),
}

/// A running in-process pool. Dropping it stops the nodes, then the controller.
pub struct EmbeddedPool {
    nodes: Vec<MemNode>,
    controller: Option<Controller>,
    addr: SocketAddr,
}

impl EmbeddedPool {
    /// Starts the controller and the memory nodes; returns when all nodes are registered.
    pub fn start(cfg: EmbeddedConfig) -> Result<EmbeddedPool, EmbeddedError> {
        let controller = Controller::start(ControllerConfig {
            listen: "127.0.0.1:0".into(),
            lease: cfg.lease,
            grace: cfg.grace,
            heartbeat: cfg.heartbeat,
            dead_after: cfg.heartbeat * 3,
            ..ControllerConfig::default()
        })?;
        let addr = controller.local_addr();
        let mut nodes = Vec::with_capacity(cfg.nodes);
        for _ in 0..cfg.nodes {
            let node = MemNode::start(MemNodeConfig {
                controller: addr.to_string(),
                listen: "127.0.0.1:0".into(),
                capacity: cfg.capacity,
                block_size: cfg.block_size,
                transport: cfg.transport,
                // Embedded pools are for tests and demos: don't pin memory.
                hugepages: false,
                lock: false,
                ..MemNodeConfig::default()
            })?;
            if cfg.torn {
                node.set_torn_mode(true);
            }
            nodes.push(node);
        }
        Ok(EmbeddedPool {
            nodes,
            controller: Some(controller),
            addr,
        })
    }

    /// The controller's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A new client connected to the pool.
    pub fn client(&self) -> Result<Client, ClientError> {
        Client::connect(&self.addr.to_string())
    }

    /// The memory nodes.
    pub fn nodes(&self) -> &[MemNode] {
        &self.nodes
    }

    /// The controller.
    pub fn controller(&self) -> Option<&Controller> {
        self.controller.as_ref()
    }

    /// Stops one memory node (simulating a crash of that node).
    pub fn stop_node(&mut self, index: usize) -> Option<()> {
        if index < self.nodes.len() {
            self.nodes.remove(index).shutdown();
            Some(())
        } else {
            None
        }
    }
}

impl Drop for EmbeddedPool {
    fn drop(&mut self) {
        for n in self.nodes.drain(..) {
            n.shutdown();
        }
        if let Some(c) = self.controller.take() {
            c.shutdown();
        }
    }
}
