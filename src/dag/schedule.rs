//! Static schedules: the tasks reachable from one leaf, by depth-first search, as in
//! Wukong. An executor started at a leaf can only ever run tasks of its schedule;
//! at a fan-out it keeps one branch and hands the others, each a sub-schedule rooted at
//! the child, to new executors.

use super::plan::{PlannedTask, TaskId};

/// The static schedule of one leaf: every task reachable from it, in depth-first
/// (pre-)order, the leaf first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    leaf: TaskId,
    tasks: Vec<TaskId>,
}

impl Schedule {
    pub(crate) fn from_leaf(tasks: &[PlannedTask], leaf: TaskId) -> Schedule {
        let mut seen = vec![false; tasks.len()];
        let mut order = Vec::new();
        let mut stack = vec![leaf];
        while let Some(t) = stack.pop() {
            if std::mem::replace(&mut seen[t], true) {
                continue;
            }
            order.push(t);
            // Push in reverse so the first child is visited first.
            for &c in tasks[t].children.iter().rev() {
                if !seen[c] {
                    stack.push(c);
                }
            }
        }
        Schedule { leaf, tasks: order }
    }

    /// The leaf the schedule starts at.
    pub fn leaf(&self) -> TaskId {
        self.leaf
    }

    /// The reachable tasks in depth-first order.
    pub fn tasks(&self) -> &[TaskId] {
        &self.tasks
    }

    /// Whether `task` is reachable from the leaf.
    pub fn contains(&self, task: TaskId) -> bool {
        self.tasks.contains(&task)
    }
}

#[cfg(test)]
mod tests {
    use crate::dag::{Graph, Input, Plan, Registry};

    #[test]
    fn dfs_from_each_leaf() {
        let mut r = Registry::new();
        r.register("f", |_| Ok(Vec::new()));
        let mut g = Graph::new();
        let none = Vec::<(String, Input)>::new;
        g.add("a", "f", none()).unwrap();
        g.add("b", "f", none()).unwrap();
        g.add("c", "f", [("x", Input::task("a")), ("y", Input::task("b"))])
            .unwrap();
        g.add("d", "f", [("x", Input::task("a"))]).unwrap();
        g.add("e", "f", [("x", Input::task("c")), ("y", Input::task("d"))])
            .unwrap();
        let p = Plan::new(&g, &r).unwrap();
        let s = p.schedules();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].leaf(), 0);
        assert_eq!(s[0].tasks(), &[0, 2, 4, 3]);
        assert_eq!(s[1].tasks(), &[1, 2, 4]);
        assert!(!s[1].contains(3));
    }
}
