//! Remote DAG workers: `farpool worker --listen` processes on 127.0.0.2 and 127.0.0.3
//! (other "hosts" on the loopback network) run jobs for an invoker over TCP, with a
//! real controller and memory node; one of them is killed with SIGKILL in the middle
//! of a job and the job still completes correctly on the other.

mod common;

use farpool::dag::process::{WorkerConfig, WorkerPool};
use farpool::dag::workloads::{GemmSpec, TaskWork, TreeSpec, WorkloadSpec};
use farpool::dag::{Plan, Scheduler};
use std::time::Duration;

fn worker(controller: &str, ip: &str) -> common::Proc {
    common::spawn(&[
        "worker",
        "--controller",
        controller,
        "--listen",
        &format!("{ip}:0"),
    ])
}

fn config(controller: &str, remote: Vec<String>) -> WorkerConfig {
    WorkerConfig {
        bin: common::bin().into(),
        controller: controller.to_string(),
        workers: 4,
        inline_limit: 4096,
        cluster_large_outputs: true,
        crash_in: None,
        crash_site: Default::default(),
        free_intermediates: true,
        remote,
    }
}

#[test]
fn remote_workers_run_jobs_and_survive_a_killed_worker() {
    let ctl = common::controller();
    let _mem = common::memnode(&ctl.addr, "64MiB", "soft");
    let client = farpool::Client::connect(&ctl.addr).unwrap();
    assert!(common::eventually(Duration::from_secs(10), || {
        client
            .status()
            .map(|s| !s.nodes.is_empty())
            .unwrap_or(false)
    }));
    let mut a = worker(&ctl.addr, "127.0.0.2");
    let b = worker(&ctl.addr, "127.0.0.3");
    assert!(a.addr.starts_with("127.0.0.2:"), "{}", a.addr);
    assert!(b.addr.starts_with("127.0.0.3:"), "{}", b.addr);
    let mut pool =
        WorkerPool::new(config(&ctl.addr, vec![a.addr.clone(), b.addr.clone()])).unwrap();

    // A tree reduction and a GEMM with blocks through pool objects, both ways.
    let tree = WorkloadSpec::Tr(TreeSpec {
        leaves: 64,
        ..TreeSpec::default()
    });
    let gemm = WorkloadSpec::Gemm(GemmSpec {
        n: 64,
        block: 32,
        ..GemmSpec::default()
    });
    for spec in [tree, gemm] {
        let w = spec.build().unwrap();
        let edges = Plan::new(w.graph(), w.registry()).unwrap().fan_in_edges() as u64;
        for s in [Scheduler::Wukong, Scheduler::Central] {
            let out = pool.run(&client, spec, s).unwrap();
            let check = w.check(&out).unwrap();
            assert!(check.correct, "{} {s:?}: {}", w.name(), check.detail);
            assert_eq!(out.stats().tasks_run, out.stats().tasks, "{s:?}");
            if s == Scheduler::Wukong {
                assert_eq!(out.stats().fan_in_count, edges, "{s:?}");
            }
        }
    }
    let mut addrs = pool.remote_addrs();
    addrs.sort();
    assert_eq!(addrs.len(), 4);
    assert_eq!(addrs.iter().filter(|x| **x == a.addr).count(), 2);
    assert!(pool.pids().is_empty(), "no local worker processes");

    // Kill -9 the worker on 127.0.0.2 while a job runs on both: its invocations are
    // retried on 127.0.0.3 and the invoker reconnects there. The job takes at least
    // 255 tasks x 25 ms / 4 connections (1.6 s); the kill comes 200 ms after the job's
    // path appears in the pool.
    let slow = WorkloadSpec::Tr(TreeSpec {
        leaves: 128,
        work: TaskWork {
            time: Duration::from_millis(25),
            busy: false,
        },
    });
    let w = slow.build().unwrap();
    let edges = Plan::new(w.graph(), w.registry()).unwrap().fan_in_edges() as u64;
    let killed_addr = a.addr.clone();
    let watcher = farpool::Client::connect(&ctl.addr).unwrap();
    let killer = std::thread::spawn(move || {
        let started = common::eventually(Duration::from_secs(30), || {
            watcher
                .status()
                .map(|s| {
                    s.paths
                        .iter()
                        .any(|p| p.path.as_str().starts_with("/dagw-"))
                })
                .unwrap_or(false)
        });
        std::thread::sleep(Duration::from_millis(200));
        a.kill(); // SIGKILL
        (a, started)
    });
    let out = pool.run(&client, slow, Scheduler::Wukong).unwrap();
    let (_a, started) = killer.join().unwrap();
    assert!(started, "the job's path appeared in the pool");
    let check = w.check(&out).unwrap();
    assert!(check.correct, "{}", check.detail);
    let st = out.stats();
    assert!(
        st.retries >= 1,
        "the dead worker's invocations were retried"
    );
    assert_eq!(st.fan_in_count, edges, "no counter double-counted");
    assert!(
        pool.remote_addrs().iter().all(|x| *x != killed_addr),
        "every connection now goes to the live worker"
    );
    assert!(!pool.is_empty());
    // The pool goes on with the live worker.
    let out = pool.run(&client, tree, Scheduler::Central).unwrap();
    assert!(tree.build().unwrap().check(&out).unwrap().correct);
    drop(b);
}

#[test]
fn unreachable_remote_workers_are_a_typed_error() {
    let ctl = common::controller();
    let _mem = common::memnode(&ctl.addr, "16MiB", "soft");
    let client = farpool::Client::connect(&ctl.addr).unwrap();
    // A port nothing listens on: bind one, then close it.
    let port = std::net::TcpListener::bind("127.0.0.2:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut pool = WorkerPool::new(config(&ctl.addr, vec![format!("127.0.0.2:{port}")])).unwrap();
    match pool.run(
        &client,
        WorkloadSpec::Tr(TreeSpec::default()),
        Scheduler::Wukong,
    ) {
        Err(farpool::dag::DagError::Worker(m)) => assert!(m.contains("--listen"), "{m}"),
        other => panic!("{other:?}"),
    }
}
