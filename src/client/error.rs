//! Client errors.

use crate::proto::frame::FrameError;
use crate::proto::{ControlError, PathError, Response};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The controller refused the request.
    #[error("controller: {0}")]
    Control(#[from] ControlError),
    /// The path is malformed.
    #[error(transparent)]
    Path(#[from] PathError),
    /// Cannot reach the controller.
    #[error(
        "cannot connect to controller at {addr}: {source}; is `farpool controller` running there?"
    )]
    Connect {
        /// Address dialled.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The control connection failed.
    #[error("control connection: {0}")]
    Frame(#[from] FrameError),
    /// The controller sent something this client does not understand.
    #[error("unexpected controller response: {0}; client and controller versions may differ")]
    Protocol(String),
    /// A data-plane operation or connection failed.
    #[error("data plane: {0}")]
    Transport(#[from] farpool_rdma::Error),
    /// Could not open the data-plane connection to a memory node.
    #[error("memory node {node}: {source}")]
    Node {
        /// Memory node id.
        node: u32,
        /// Cause.
        #[source]
        source: farpool_rdma::TransportError,
    },
    /// The access falls outside the block.
    #[error("offset {offset} + length {len} is outside the block of {block_len} bytes")]
    OutOfBounds {
        /// Offset in the block.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Block length.
        block_len: u64,
    },
    /// An atomic at an offset that is not a multiple of 8.
    #[error("atomic at block offset {0} is not 8-byte aligned")]
    Misaligned(u64),
    /// An operation passed to `execute` targets another block's memory node.
    #[error("operation {index} in the batch does not belong to this block; build batch operations with the same handle's *_op methods")]
    ForeignOp {
        /// Index in the batch.
        index: usize,
    },
}

impl ClientError {
    pub(crate) fn unexpected(r: &Response) -> Self {
        ClientError::Protocol(format!("{r:?}"))
    }
}
