//! Data-plane connections to memory nodes, opened on first use and shared.

use super::ClientError;
use crate::proto::{Endpoint, WireTransport};
use farpool_rdma::shm::ShmTransport;
use farpool_rdma::soft::SoftTransport;
use farpool_rdma::Transport;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// One transport per memory node endpoint.
#[derive(Default)]
pub(crate) struct DataPlane {
    nodes: RwLock<HashMap<Endpoint, Arc<dyn Transport>>>,
}

impl DataPlane {
    /// The transport for `ep`, connecting on first use.
    pub(crate) fn transport(&self, ep: &Endpoint) -> Result<Arc<dyn Transport>, ClientError> {
        if let Some(t) = self.nodes.read().get(ep) {
            return Ok(t.clone());
        }
        let node_err = |source| ClientError::Node {
            node: ep.node,
            source,
        };
        let t: Arc<dyn Transport> = match ep.transport {
            WireTransport::Soft => Arc::new(SoftTransport::connect(&ep.addr).map_err(node_err)?),
            WireTransport::Shm => {
                Arc::new(ShmTransport::open(Path::new(&ep.addr)).map_err(node_err)?)
            }
            WireTransport::Verbs => verbs(&ep.addr).map_err(node_err)?,
        };
        let mut nodes = self.nodes.write();
        Ok(nodes.entry(ep.clone()).or_insert(t).clone())
    }
}

/// A verbs transport to `addr`; the device comes from `FARPOOL_RDMA_DEVICE` and
/// `FARPOOL_GID_INDEX` when set.
#[cfg(feature = "verbs")]
fn verbs(addr: &str) -> Result<Arc<dyn Transport>, farpool_rdma::TransportError> {
    use farpool_rdma::verbs::{DeviceConfig, VerbsClientConfig, VerbsTransport};
    let device = DeviceConfig {
        device: std::env::var("FARPOOL_RDMA_DEVICE").ok(),
        port: 1,
        gid_index: std::env::var("FARPOOL_GID_INDEX")
            .ok()
            .and_then(|v| v.parse().ok()),
    };
    Ok(Arc::new(VerbsTransport::connect(
        addr,
        VerbsClientConfig {
            device,
            ..VerbsClientConfig::default()
        },
    )?))
}

#[cfg(not(feature = "verbs"))]
fn verbs(_addr: &str) -> Result<Arc<dyn Transport>, farpool_rdma::TransportError> {
    Err(farpool_rdma::VerbsError::NotBuilt.into())
}
