//! The graph API: registered task functions and tasks with named inputs.

use super::typed::{encode, Inputs};
use super::{DagError, TaskError};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;

/// A task function: named inputs in, one output buffer out.
pub type TaskFn = Arc<dyn Fn(&Inputs) -> Result<Vec<u8>, TaskError> + Send + Sync>;

/// Task functions by name. Graphs refer to functions by these names, so a graph is
/// plain data that any executor with the same registry can run.
#[derive(Clone, Default)]
pub struct Registry {
    functions: HashMap<String, TaskFn>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or replaces) the function `name`.
    pub fn register<F>(&mut self, name: &str, f: F) -> &mut Self
    where
        F: Fn(&Inputs) -> Result<Vec<u8>, TaskError> + Send + Sync + 'static,
    {
        self.functions.insert(name.to_string(), Arc::new(f));
        self
    }

    /// The function `name`.
    pub fn get(&self, name: &str) -> Option<&TaskFn> {
        self.functions.get(name)
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.functions.contains_key(name)
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.functions.keys().collect();
        names.sort();
        f.debug_struct("Registry")
            .field("functions", &names)
            .finish()
    }
}

/// Where one named input of a task comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The output of another task of the graph.
    Task(String),
    /// A constant.
    Const(Arc<Vec<u8>>),
}

impl Input {
    /// The output of task `name`.
    pub fn task(name: &str) -> Input {
        Input::Task(name.to_string())
    }

    /// A constant byte buffer.
    pub fn bytes(bytes: impl Into<Vec<u8>>) -> Input {
        Input::Const(Arc::new(bytes.into()))
    }

    /// A constant value, encoded with [`encode`](super::encode).
    pub fn value<T: Serialize + ?Sized>(value: &T) -> Result<Input, DagError> {
        Ok(Input::Const(Arc::new(encode(value)?)))
    }
}

/// One task of a graph.
#[derive(Debug, Clone)]
pub(crate) struct TaskSpec {
    pub name: String,
    pub function: String,
    pub inputs: Vec<(String, Input)>,
}

/// A DAG of named tasks. Build it with [`Graph::add`]; it is checked (names, inputs,
/// cycles) when it is planned or run.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub(crate) tasks: Vec<TaskSpec>,
    pub(crate) index: HashMap<String, usize>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds task `name` running registered function `function` on `inputs`
    /// (input name, source). Inputs may name tasks added later. Fails if `name` is
    /// taken or is not a valid pool path component (it names the task's pool object;
    /// names starting with `@` are reserved for the runtime).
    pub fn add<I, S>(
        &mut self,
        name: &str,
        function: &str,
        inputs: I,
    ) -> Result<&mut Self, DagError>
    where
        I: IntoIterator<Item = (S, Input)>,
        S: Into<String>,
    {
        let valid = !name.is_empty()
            && !name.starts_with('@')
            && name != "."
            && name != ".."
            && name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.:=+@".contains(ch));
        if !valid {
            return Err(DagError::BadTaskName(name.to_string()));
        }
        if self.index.contains_key(name) {
            return Err(DagError::DuplicateTask(name.to_string()));
        }
        self.index.insert(name.to_string(), self.tasks.len());
        self.tasks.push(TaskSpec {
            name: name.to_string(),
            function: function.to_string(),
            inputs: inputs.into_iter().map(|(n, i)| (n.into(), i)).collect(),
        });
        Ok(self)
    }

    /// Number of tasks.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether the graph has no tasks.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Task names in insertion order.
    pub fn task_names(&self) -> impl Iterator<Item = &str> {
        self.tasks.iter().map(|t| t.name.as_str())
    }
}
