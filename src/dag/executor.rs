//! The executor pool: threads standing in for serverless function instances. Both
//! schedulers run their tasks on it; a Wukong executor invokes others by submitting
//! to it.

use parking_lot::Mutex;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

type Work = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of executor threads taking invocations from one queue.
pub struct ExecutorPool {
    queue: Option<Sender<Work>>,
    threads: Vec<JoinHandle<()>>,
}

/// A cheap handle that submits invocations to an [`ExecutorPool`].
#[derive(Clone)]
pub(crate) struct Invoker {
    queue: Sender<Work>,
}

impl Invoker {
    /// Queues `work` for the next free executor; false if the pool has shut down.
    pub(crate) fn invoke(&self, work: impl FnOnce() + Send + 'static) -> bool {
        self.queue.send(Box::new(work)).is_ok()
    }
}

impl ExecutorPool {
    /// Starts `threads` executors (at least one).
    pub fn new(threads: usize) -> std::io::Result<ExecutorPool> {
        let (tx, rx) = channel::<Work>();
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::with_capacity(threads.max(1));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("dag-exec-{i}"))
                    .spawn(move || run(&rx))?,
            );
        }
        Ok(ExecutorPool {
            queue: Some(tx),
            threads: handles,
        })
    }

    /// Number of executor threads.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Whether the pool has no threads (never).
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    pub(crate) fn invoker(&self) -> Option<Invoker> {
        self.queue.clone().map(|queue| Invoker { queue })
    }
}

fn run(rx: &Mutex<Receiver<Work>>) {
    loop {
        let work = rx.lock().recv();
        match work {
            Ok(work) => work(),
            Err(_) => return,
        }
    }
}

impl Drop for ExecutorPool {
    /// Stops taking new work and waits for the queued invocations to finish.
    fn drop(&mut self) {
        self.queue.take();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::warn!("a DAG executor thread panicked");
            }
        }
    }
}

impl std::fmt::Debug for ExecutorPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutorPool")
            .field("threads", &self.threads.len())
            .finish()
    }
}
