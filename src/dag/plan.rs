//! Validation: a graph checked against a registry and turned into indexed tasks,
//! parent and child lists, leaves, sinks and a topological order.

use super::graph::{Graph, Input, Registry};
use super::schedule::Schedule;
use super::DagError;
use std::collections::VecDeque;
use std::sync::Arc;

/// A task's index in a [`Plan`].
pub type TaskId = usize;

/// Where one input of a planned task comes from.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// The output of `parents[i]` of the task.
    Parent(usize),
    /// A constant.
    Const(Arc<Vec<u8>>),
}

/// A planned task.
#[derive(Debug, Clone)]
pub(crate) struct PlannedTask {
    pub name: String,
    pub function: String,
    pub inputs: Vec<(String, Source)>,
    /// Distinct tasks this task reads, in first-use order; the fan-in edge of parent
    /// `parents[i]` is edge `i` of this task.
    pub parents: Vec<TaskId>,
    /// Distinct tasks that read this task.
    pub children: Vec<TaskId>,
}

/// A validated graph: every input resolves, every function is registered, there is no
/// cycle. Also holds the static schedules (one per leaf).
#[derive(Debug, Clone)]
pub struct Plan {
    pub(crate) tasks: Vec<PlannedTask>,
    leaves: Vec<TaskId>,
    sinks: Vec<TaskId>,
    topo: Vec<TaskId>,
    schedules: Vec<Schedule>,
}

impl Plan {
    /// Validates `graph` against `registry`.
    pub fn new(graph: &Graph, registry: &Registry) -> Result<Plan, DagError> {
        if graph.tasks.is_empty() {
            return Err(DagError::Empty);
        }
        let mut tasks = Vec::with_capacity(graph.tasks.len());
        for spec in &graph.tasks {
            if !registry.contains(&spec.function) {
                return Err(DagError::UnknownFunction {
                    task: spec.name.clone(),
                    function: spec.function.clone(),
                });
            }
            let mut parents: Vec<TaskId> = Vec::new();
            let mut inputs = Vec::with_capacity(spec.inputs.len());
            for (input, source) in &spec.inputs {
                let source = match source {
                    Input::Const(bytes) => Source::Const(bytes.clone()),
                    Input::Task(name) => {
                        let Some(&id) = graph.index.get(name) else {
                            return Err(DagError::MissingInput {
                                task: spec.name.clone(),
                                input: input.clone(),
                                missing: name.clone(),
                            });
                        };
                        let edge = match parents.iter().position(|&p| p == id) {
                            Some(e) => e,
                            None => {
                                parents.push(id);
                                parents.len() - 1
                            }
                        };
                        Source::Parent(edge)
                    }
                };
                inputs.push((input.clone(), source));
            }
            tasks.push(PlannedTask {
                name: spec.name.clone(),
                function: spec.function.clone(),
                inputs,
                parents,
                children: Vec::new(),
            });
        }
        for id in 0..tasks.len() {
            for p in tasks[id].parents.clone() {
                tasks[p].children.push(id);
            }
        }
        let topo = topological(&tasks)?;
        let leaves: Vec<TaskId> = (0..tasks.len())
            .filter(|&t| tasks[t].parents.is_empty())
            .collect();
        let sinks: Vec<TaskId> = (0..tasks.len())
            .filter(|&t| tasks[t].children.is_empty())
            .collect();
        let schedules = leaves
            .iter()
            .map(|&leaf| Schedule::from_leaf(&tasks, leaf))
            .collect();
        Ok(Plan {
            tasks,
            leaves,
            sinks,
            topo,
            schedules,
        })
    }

    /// Number of tasks.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether the plan has no tasks (never: empty graphs are rejected).
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// The name of task `id`.
    pub fn name(&self, id: TaskId) -> &str {
        &self.tasks[id].name
    }

    /// The task called `name`.
    pub fn id(&self, name: &str) -> Option<TaskId> {
        self.tasks.iter().position(|t| t.name == name)
    }

    /// The distinct tasks `id` reads.
    pub fn parents(&self, id: TaskId) -> &[TaskId] {
        &self.tasks[id].parents
    }

    /// The distinct tasks that read `id`.
    pub fn children(&self, id: TaskId) -> &[TaskId] {
        &self.tasks[id].children
    }

    /// Tasks with no task inputs: where executors start.
    pub fn leaves(&self) -> &[TaskId] {
        &self.leaves
    }

    /// Tasks no other task reads: their outputs are the job's result.
    pub fn sinks(&self) -> &[TaskId] {
        &self.sinks
    }

    /// A topological order of all tasks.
    pub fn topological_order(&self) -> &[TaskId] {
        &self.topo
    }

    /// The static schedules, one per leaf, in the order of [`Plan::leaves`].
    pub fn schedules(&self) -> &[Schedule] {
        &self.schedules
    }

    /// Number of fan-in edges (task inputs of tasks with more than one parent).
    pub fn fan_in_edges(&self) -> usize {
        self.tasks
            .iter()
            .filter(|t| t.parents.len() > 1)
            .map(|t| t.parents.len())
            .sum()
    }
}

/// Kahn's algorithm; reports a task on a cycle if there is one.
fn topological(tasks: &[PlannedTask]) -> Result<Vec<TaskId>, DagError> {
    let mut remaining: Vec<usize> = tasks.iter().map(|t| t.parents.len()).collect();
    let mut ready: VecDeque<TaskId> = (0..tasks.len()).filter(|&t| remaining[t] == 0).collect();
    let mut order = Vec::with_capacity(tasks.len());
    while let Some(t) = ready.pop_front() {
        order.push(t);
        for &c in &tasks[t].children {
            remaining[c] -= 1;
            if remaining[c] == 0 {
                ready.push_back(c);
            }
        }
    }
    if order.len() < tasks.len() {
        // Every task left has a parent left; walking parents from any of them must
        // revisit a task, which lies on a cycle.
        let mut seen = vec![false; tasks.len()];
        let mut t = (0..tasks.len()).find(|&t| remaining[t] > 0).unwrap_or(0);
        while !seen[t] {
            seen[t] = true;
            t = tasks[t]
                .parents
                .iter()
                .copied()
                .find(|&p| remaining[p] > 0)
                .unwrap_or(t);
        }
        return Err(DagError::Cycle(tasks[t].name.clone()));
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dag::{Graph, Input, Registry};

    fn registry() -> Registry {
        let mut r = Registry::new();
        r.register("f", |_| Ok(Vec::new()));
        r
    }

    #[test]
    fn diamond_plans() {
        let mut g = Graph::new();
        g.add("a", "f", Vec::<(String, Input)>::new()).unwrap();
        g.add("b", "f", [("x", Input::task("a"))]).unwrap();
        g.add("c", "f", [("x", Input::task("a"))]).unwrap();
        g.add("d", "f", [("l", Input::task("b")), ("r", Input::task("c"))])
            .unwrap();
        let p = Plan::new(&g, &registry()).unwrap();
        assert_eq!(p.leaves(), &[0]);
        assert_eq!(p.sinks(), &[3]);
        assert_eq!(p.children(0), &[1, 2]);
        assert_eq!(p.parents(3), &[1, 2]);
        assert_eq!(p.topological_order()[0], 0);
        assert_eq!(p.fan_in_edges(), 2);
    }

    #[test]
    fn cycle_is_reported() {
        let mut g = Graph::new();
        g.add("a", "f", [("x", Input::task("c"))]).unwrap();
        g.add("b", "f", [("x", Input::task("a"))]).unwrap();
        g.add("c", "f", [("x", Input::task("b"))]).unwrap();
        g.add("d", "f", Vec::<(String, Input)>::new()).unwrap();
        assert!(matches!(
            Plan::new(&g, &registry()),
            Err(DagError::Cycle(_))
        ));
    }

    #[test]
    fn missing_input_and_function() {
        let mut g = Graph::new();
        g.add("a", "f", [("x", Input::task("nope"))]).unwrap();
        match Plan::new(&g, &registry()) {
            Err(DagError::MissingInput { missing, .. }) => assert_eq!(missing, "nope"),
            other => panic!("{other:?}"),
        }
        let mut g = Graph::new();
        g.add("a", "g", Vec::<(String, Input)>::new()).unwrap();
        assert!(matches!(
            Plan::new(&g, &registry()),
            Err(DagError::UnknownFunction { .. })
        ));
        assert!(matches!(
            Plan::new(&Graph::new(), &registry()),
            Err(DagError::Empty)
        ));
        let mut g = Graph::new();
        assert!(matches!(
            g.add("a/b", "f", Vec::<(String, Input)>::new()),
            Err(DagError::BadTaskName(_))
        ));
        g.add("a", "f", Vec::<(String, Input)>::new()).unwrap();
        assert!(matches!(
            g.add("a", "f", Vec::<(String, Input)>::new()),
            Err(DagError::DuplicateTask(_))
        ));
    }
}
