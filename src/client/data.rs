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
            WireTransport::Verbs => {
                return Err(node_err(farpool_rdma::TransportError::Protocol(
                    "this build has no RDMA verbs backend; rebuild with --features verbs".into(),
                )))
            }
        };
        let mut nodes = self.nodes.write();
        Ok(nodes.entry(ep.clone()).or_insert(t).clone())
    }
}
