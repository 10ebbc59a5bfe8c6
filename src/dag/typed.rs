//! The typed layer over byte buffers: bincode-encoded serde values.

use super::DagError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;

/// Encodes a value as a task input or output.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, DagError> {
    bincode::serialize(value).map_err(|source| DagError::Codec {
        what: std::any::type_name::<T>().to_string(),
        source,
    })
}

/// Decodes a value encoded with [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DagError> {
    bincode::deserialize(bytes).map_err(|source| DagError::Codec {
        what: std::any::type_name::<T>().to_string(),
        source,
    })
}

/// The named inputs of one task run.
#[derive(Debug, Default, Clone)]
pub struct Inputs {
    values: HashMap<String, Arc<Vec<u8>>>,
}

impl Inputs {
    pub(crate) fn insert(&mut self, name: String, value: Arc<Vec<u8>>) {
        self.values.insert(name, value);
    }

    /// The raw bytes of input `name`.
    pub fn bytes(&self, name: &str) -> Result<&[u8], DagError> {
        self.values
            .get(name)
            .map(|v| v.as_slice())
            .ok_or_else(|| DagError::NoSuchInput(name.to_string()))
    }

    /// Input `name` decoded as `T`.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<T, DagError> {
        decode(self.bytes(name)?)
    }

    /// Input names, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    /// Number of inputs.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the task has no inputs.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}
