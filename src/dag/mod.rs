//! DAG execution over the pool, after Wukong (SoCC'20): decentralized scheduling across
//! executors, fan-in resolved with CAS/FAA on counters in pool blocks, and a
//! centralized baseline over the same executors and the same pool.
//!
//! A [`Graph`] names tasks; each task runs a function registered by name in a
//! [`Registry`] on named inputs that are other tasks' outputs or constants. Inputs and
//! outputs are byte buffers; [`encode`] and [`Inputs::get`] give them a typed (serde)
//! layer. A [`DagRuntime`] runs a graph as a job with either [`Scheduler`] and returns
//! the outputs of its sinks (tasks no other task reads).
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use farpool::dag::{encode, DagRuntime, Graph, Input, Registry, RuntimeConfig, Scheduler};
//! let pool = farpool::EmbeddedPool::start(farpool::EmbeddedConfig::default())?;
//! let mut registry = Registry::new();
//! registry.register("add", |inputs| {
//!     let a: u64 = inputs.get("a")?;
//!     let b: u64 = inputs.get("b")?;
//!     Ok(encode(&(a + b))?)
//! });
//! let mut graph = Graph::new();
//! graph.add("x", "add", [("a", Input::value(&1u64)?), ("b", Input::value(&2u64)?)])?;
//! graph.add("y", "add", [("a", Input::task("x")), ("b", Input::value(&3u64)?)])?;
//! let runtime = DagRuntime::new(pool.client()?, registry, RuntimeConfig::default())?;
//! let out = runtime.run(&graph, Scheduler::Wukong)?;
//! assert_eq!(out.get::<u64>("y")?, 6);
//! # Ok(()) }
//! ```
//!
//! See `docs/DAG.md` for the protocol.

mod central;
mod error;
mod executor;
mod fanin;
mod graph;
mod job;
mod plan;
pub mod process;
mod runtime;
mod schedule;
mod store;
mod typed;
pub mod wire;
mod worker;
pub mod workloads;
mod wukong;

pub use error::{DagError, TaskError};
pub use executor::ExecutorPool;
pub use fanin::{Arrival, FanIn};
pub use graph::{Graph, Input, Registry, TaskFn};
pub use plan::{Plan, TaskId};
pub use runtime::{CrashSite, DagRuntime, JobOutput, JobStats, RuntimeConfig, Scheduler};
pub use schedule::Schedule;
pub use typed::{decode, encode, Inputs};
