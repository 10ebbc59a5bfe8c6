//! DAG executor tests over an embedded pool: tree reductions under both schedulers,
//! diamonds, large outputs through pool objects, replayed fan-in arrivals, failures.

use farpool::dag::{
    encode, Arrival, DagError, DagRuntime, FanIn, Graph, Input, Plan, Registry, RuntimeConfig,
    Scheduler, TaskError,
};
use farpool::{EmbeddedConfig, EmbeddedPool};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Torn mode: READ/WRITE tear the way they may on RDMA, so the fan-in protocol and the
/// inline log are checked against what the data plane really promises.
fn pool() -> EmbeddedPool {
    EmbeddedPool::start(EmbeddedConfig {
        nodes: 2,
        capacity: 32 << 20,
        block_size: 256 << 10,
        torn: true,
        ..EmbeddedConfig::default()
    })
    .expect("embedded pool")
}

/// Functions: `leaf` returns its constant, `sum` adds every input (u64s), `pad` adds a
/// large ballast so outputs go through pool objects. `calls` counts runs per task.
fn registry(calls: Arc<Mutex<HashMap<u64, u64>>>) -> Registry {
    let mut r = Registry::new();
    r.register("leaf", |inputs| Ok(encode(&inputs.get::<u64>("v")?)?));
    let c = calls.clone();
    r.register("sum", move |inputs| {
        let mut total = 0u64;
        for name in inputs.names() {
            let (v, _): (u64, Vec<u8>) = match inputs.get::<(u64, Vec<u8>)>(name) {
                Ok(x) => x,
                Err(_) => (inputs.get::<u64>(name)?, Vec::new()),
            };
            total += v;
        }
        *c.lock()
            .map_err(|_| TaskError::msg("poisoned"))?
            .entry(total)
            .or_default() += 1;
        Ok(encode(&total)?)
    });
    r.register("pad", |inputs| {
        let v: u64 = inputs.get("v")?;
        Ok(encode(&(v, vec![7u8; 64 << 10]))?)
    });
    r
}

/// A binary tree reduction over `leaves` leaves holding 1..=leaves; the sink is `r`.
fn tree(leaves: u64, leaf_fn: &str) -> Graph {
    let mut g = Graph::new();
    let mut level: Vec<String> = Vec::new();
    for i in 0..leaves {
        let name = format!("l{i}");
        g.add(&name, leaf_fn, [("v", Input::value(&(i + 1)).unwrap())])
            .unwrap();
        level.push(name);
    }
    let mut depth = 0;
    while level.len() > 1 {
        let mut next = Vec::new();
        for (j, pair) in level.chunks(2).enumerate() {
            let name = if level.len() <= 2 {
                "r".to_string()
            } else {
                format!("s{depth}-{j}")
            };
            let inputs: Vec<(String, Input)> = pair
                .iter()
                .enumerate()
                .map(|(k, p)| (format!("in{k}"), Input::task(p)))
                .collect();
            g.add(&name, "sum", inputs).unwrap();
            next.push(name);
        }
        level = next;
        depth += 1;
    }
    g
}

fn runtime(
    pool: &EmbeddedPool,
    config: RuntimeConfig,
) -> (DagRuntime, Arc<Mutex<HashMap<u64, u64>>>) {
    let calls = Arc::new(Mutex::new(HashMap::new()));
    let rt = DagRuntime::new(pool.client().unwrap(), registry(calls.clone()), config).unwrap();
    (rt, calls)
}

#[test]
fn tree_reduction_both_schedulers() {
    let pool = pool();
    let (rt, _) = runtime(&pool, RuntimeConfig::default());
    for leaves in [64u64, 1024] {
        let g = tree(leaves, "leaf");
        for s in [Scheduler::Wukong, Scheduler::Central] {
            let out = rt.run(&g, s).unwrap();
            assert_eq!(
                out.get::<u64>("r").unwrap(),
                leaves * (leaves + 1) / 2,
                "{s:?}"
            );
            let st = out.stats();
            assert_eq!(
                st.tasks_run, st.tasks,
                "{s:?}: every task runs exactly once"
            );
            assert_eq!(st.tasks, 2 * leaves - 1);
            match s {
                Scheduler::Wukong => {
                    assert!(st.counter_ops > 0);
                    let edges = rt.plan(&g).unwrap().fan_in_edges() as u64;
                    assert_eq!(st.fan_in_count, edges, "every parent counted once");
                    // One executor per leaf; fan-ins are resolved, never invoked.
                    assert_eq!(st.invocations, leaves);
                }
                Scheduler::Central => {
                    assert_eq!(st.counter_ops, 0);
                    assert_eq!(st.invocations, st.tasks);
                    // Small outputs travel through the scheduler, never the pool.
                    assert_eq!(st.bytes_written, 0);
                }
            }
        }
    }
}

#[test]
fn replayed_fan_in_counts_once() {
    let pool = pool();
    let (rt, calls) = runtime(
        &pool,
        RuntimeConfig {
            replay_fan_in: true,
            ..RuntimeConfig::default()
        },
    );
    let g = tree(128, "leaf");
    let out = rt.run(&g, Scheduler::Wukong).unwrap();
    assert_eq!(out.get::<u64>("r").unwrap(), 128 * 129 / 2);
    assert_eq!(out.stats().tasks_run, out.stats().tasks);
    assert_eq!(
        out.stats().fan_in_count,
        rt.plan(&g).unwrap().fan_in_edges() as u64,
        "replayed arrivals did not count"
    );
    // The root's total is unique: it ran once.
    assert_eq!(calls.lock().unwrap().get(&(128 * 129 / 2)), Some(&1));
}

#[test]
fn fan_in_arrival_is_replay_safe() {
    let pool = pool();
    let client = pool.client().unwrap();
    let mut r = Registry::new();
    r.register("f", |_| Ok(Vec::new()));
    let mut g = Graph::new();
    for p in ["a", "b", "c"] {
        g.add(p, "f", Vec::<(String, Input)>::new()).unwrap();
    }
    g.add(
        "d",
        "f",
        [
            ("x", Input::task("a")),
            ("y", Input::task("b")),
            ("z", Input::task("c")),
        ],
    )
    .unwrap();
    let plan = Plan::new(&g, &r).unwrap();
    let d = plan.id("d").unwrap();
    let job = client.task("/fanin-replay").unwrap();
    let fanin = FanIn::create(&job, &plan).unwrap();
    // Owners 100, 101, 102 arrive on edges 0, 1, 2.
    assert_eq!(fanin.arrive(d, 0, 10, 100).unwrap(), Arrival::Wait);
    assert_eq!(
        fanin.arrive(d, 0, 11, 100).unwrap(),
        Arrival::Wait,
        "replay of edge 0"
    );
    assert_eq!(fanin.count(d).unwrap(), 1, "the replay did not count");
    assert_eq!(fanin.mark(d, 0).unwrap(), 10, "the first mark stays");
    assert_eq!(fanin.mark(d, 1).unwrap(), 0, "edge 1 has not arrived");
    assert_eq!(fanin.arrive(d, 1, 20, 101).unwrap(), Arrival::Wait);
    assert_eq!(
        fanin.arrive(d, 2, 30, 102).unwrap(),
        Arrival::Run(vec![10, 20, 30]),
        "last arriver runs the child; the replay's mark did not replace the first"
    );
    assert_eq!(fanin.count(d).unwrap(), 3);
    // Replays after completion neither count nor run the child again, except that a
    // retry of the claimer gets its claim back.
    for (e, owner) in [(0, 100), (1, 101), (2, 999)] {
        assert_eq!(fanin.arrive(d, e, 99, owner).unwrap(), Arrival::Wait);
    }
    assert_eq!(
        fanin.arrive(d, 2, 30, 102).unwrap(),
        Arrival::Run(vec![10, 20, 30]),
        "a retry of the claimer"
    );
    assert_eq!(fanin.count(d).unwrap(), 3);
    assert_eq!(fanin.total_count().unwrap(), 3);
    assert!(fanin.arrive(d, 3, 1, 100).is_err(), "no such edge");
    assert!(
        fanin.arrive(d, 0, 0, 100).is_err(),
        "mark 0 means 'not arrived'"
    );
    // Invocation words: the first record wins, a retry of the same owner does not
    // invoke again.
    let a = plan.id("a").unwrap();
    assert_eq!(fanin.begin_invoke(a, 7).unwrap(), 0);
    assert_eq!(
        fanin.begin_invoke(a, 7).unwrap(),
        7,
        "the retry sees its own id"
    );
    assert_eq!(fanin.begin_invoke(a, 8).unwrap(), 7);
    assert!(!fanin.sink_done(a).unwrap());
    fanin.record_sink(a, 7).unwrap();
    assert!(fanin.sink_done(a).unwrap());
    // First arrivals (one batch each) mixed with replays of the same edges.
    let job2 = client.task("/fanin-first").unwrap();
    let fanin = FanIn::create(&job2, &plan).unwrap();
    assert_eq!(fanin.arrive_first(d, 1, 20, 101).unwrap(), Arrival::Wait);
    assert_eq!(
        fanin.arrive(d, 1, 21, 101).unwrap(),
        Arrival::Wait,
        "replay"
    );
    assert!(
        fanin.arrive_first(d, 1, 22, 101).is_err(),
        "a 'first' arrival on a set edge is refused"
    );
    assert_eq!(fanin.count(d).unwrap(), 1, "and its count taken back");
    assert_eq!(fanin.arrive_first(d, 0, 10, 100).unwrap(), Arrival::Wait);
    assert_eq!(
        fanin.arrive_first(d, 2, 30, 102).unwrap(),
        Arrival::Run(vec![10, 20, 30])
    );
    assert_eq!(fanin.total_count().unwrap(), 3);
    // Consumer release bits: the last of three consumers frees; replays count
    // nothing twice, and a replay that finds every bit set frees again.
    assert!(!fanin.release(a, 0, 3).unwrap());
    assert!(!fanin.release(a, 0, 3).unwrap(), "replay");
    assert!(!fanin.release(a, 2, 3).unwrap());
    assert!(fanin.release(a, 1, 3).unwrap(), "the last consumer frees");
    assert!(
        fanin.release(a, 2, 3).unwrap(),
        "a replay after the last frees again"
    );
    assert!(fanin.release(a, 3, 3).is_err());
    job2.close().unwrap();
    job.close().unwrap();
}

#[test]
fn lost_counter_increment_is_healed_by_flags() {
    // An executor that set its flag and died before its FAA: the counter stays short,
    // yet the last flag setter sees every flag set and runs the child, once. (Three
    // parents: a two-parent child is decided by its first-edge record, see
    // tests/dag_fanin.rs.)
    let pool = pool();
    let client = pool.client().unwrap();
    let mut r = Registry::new();
    r.register("f", |_| Ok(Vec::new()));
    let mut g = Graph::new();
    g.add("a", "f", Vec::<(String, Input)>::new()).unwrap();
    g.add("b", "f", Vec::<(String, Input)>::new()).unwrap();
    g.add("d", "f", Vec::<(String, Input)>::new()).unwrap();
    g.add(
        "c",
        "f",
        [
            ("x", Input::task("a")),
            ("y", Input::task("b")),
            ("z", Input::task("d")),
        ],
    )
    .unwrap();
    let plan = Plan::new(&g, &r).unwrap();
    let c = plan.id("c").unwrap();
    let job = client.task("/fanin-lost").unwrap();
    let fanin = FanIn::create(&job, &plan).unwrap();
    // Simulate edge 0's flag CAS without its FAA: block 0, region at 0, flags at 16.
    let block = job.blocks().unwrap().remove(0);
    assert_eq!(block.cas(16, 0, 5).unwrap(), 0);
    assert_eq!(fanin.arrive(c, 1, 7, 2).unwrap(), Arrival::Wait);
    assert_eq!(
        fanin.arrive(c, 2, 9, 3).unwrap(),
        Arrival::Run(vec![5, 7, 9])
    );
    assert_eq!(fanin.count(c).unwrap(), 2);
    assert_eq!(
        fanin.arrive(c, 0, 5, 1).unwrap(),
        Arrival::Wait,
        "retry of edge 0"
    );
    job.close().unwrap();
}

#[test]
fn diamonds_and_large_outputs() {
    let pool = pool();
    for cluster in [true, false] {
        let (rt, calls) = runtime(
            &pool,
            RuntimeConfig {
                cluster_large_outputs: cluster,
                ..RuntimeConfig::default()
            },
        );
        // a -> {b, c} -> d, twice in a row, with 64 KiB outputs (above the inline limit).
        let mut g = Graph::new();
        g.add("a", "pad", [("v", Input::value(&1u64).unwrap())])
            .unwrap();
        g.add("b", "sum", [("x", Input::task("a"))]).unwrap();
        g.add(
            "c",
            "sum",
            [
                ("x", Input::task("a")),
                ("k", Input::value(&10u64).unwrap()),
            ],
        )
        .unwrap();
        g.add(
            "d",
            "sum",
            [("l", Input::task("b")), ("r", Input::task("c"))],
        )
        .unwrap();
        g.add("e", "pad", [("v", Input::task("d"))]).unwrap();
        g.add("f", "sum", [("x", Input::task("e"))]).unwrap();
        g.add(
            "g",
            "sum",
            [("x", Input::task("e")), ("y", Input::task("d"))],
        )
        .unwrap();
        for s in [Scheduler::Wukong, Scheduler::Central] {
            calls.lock().unwrap().clear();
            let out = rt.run(&g, s).unwrap();
            assert_eq!(out.get::<u64>("f").unwrap(), 12, "{s:?} cluster={cluster}");
            assert_eq!(out.get::<u64>("g").unwrap(), 24, "{s:?} cluster={cluster}");
            assert_eq!(out.outputs().len(), 2);
            assert!(matches!(out.bytes("d"), Err(DagError::NoSuchOutput(_))));
            assert_eq!(out.stats().tasks_run, 7);
            assert!(
                out.stats().bytes_written >= 64 << 10,
                "{s:?}: large outputs in the pool"
            );
        }
    }
}

#[test]
fn errors_are_reported() {
    let pool = pool();
    let mut r = Registry::new();
    let runs = Arc::new(AtomicU64::new(0));
    let r2 = runs.clone();
    r.register("ok", move |_| {
        r2.fetch_add(1, Ordering::Relaxed);
        Ok(Vec::new())
    });
    r.register("bad", |_| Err(TaskError::msg("boom")));
    r.register("panics", |_| panic!("kaput"));
    let rt = DagRuntime::new(pool.client().unwrap(), r, RuntimeConfig::default()).unwrap();

    let mut g = Graph::new();
    g.add("a", "ok", [("x", Input::task("b"))]).unwrap();
    g.add("b", "ok", [("x", Input::task("a"))]).unwrap();
    assert!(matches!(
        rt.run(&g, Scheduler::Wukong),
        Err(DagError::Cycle(_))
    ));

    let mut g = Graph::new();
    g.add("a", "ok", [("x", Input::task("zz"))]).unwrap();
    assert!(matches!(
        rt.run(&g, Scheduler::Central),
        Err(DagError::MissingInput { .. })
    ));

    for f in ["bad", "panics"] {
        let mut g = Graph::new();
        g.add("a", "ok", Vec::<(String, Input)>::new()).unwrap();
        g.add("b", "ok", Vec::<(String, Input)>::new()).unwrap();
        g.add("c", f, [("x", Input::task("a")), ("y", Input::task("b"))])
            .unwrap();
        g.add("d", "ok", [("x", Input::task("c"))]).unwrap();
        for s in [Scheduler::Wukong, Scheduler::Central] {
            match rt.run(&g, s) {
                Err(DagError::TaskFailed { task, .. }) => assert_eq!(task, "c"),
                other => panic!("{f} {s:?}: {other:?}"),
            }
        }
    }
    assert!(runs.load(Ordering::Relaxed) > 0);
}

#[test]
fn crashed_executor_is_retried_without_double_counting() {
    let pool = pool();
    let leaves = 64u64;
    let total = leaves * (leaves + 1) / 2;
    let g = tree(leaves, "leaf");
    // A leaf, an inner fan-in child three levels up, and the root (a sink).
    for (task, s) in [
        ("l5", Scheduler::Wukong),
        ("s2-1", Scheduler::Wukong),
        ("r", Scheduler::Wukong),
        ("s2-1", Scheduler::Central),
    ] {
        let (rt, calls) = runtime(
            &pool,
            RuntimeConfig {
                crash_in: Some(task.to_string()),
                ..RuntimeConfig::default()
            },
        );
        let out = rt.run(&g, s).unwrap();
        let st = out.stats();
        assert_eq!(out.get::<u64>("r").unwrap(), total, "{task} {s:?}");
        assert_eq!(st.retries, 1, "{task} {s:?}: one executor died");
        // Only the killed task ran twice: tasks its executor had finished before are
        // recovered from the pool, children it had reached are not run again.
        assert_eq!(st.tasks_run, st.tasks + 1, "{task} {s:?}");
        let root_runs = calls.lock().unwrap().get(&total).copied();
        assert_eq!(
            root_runs,
            Some(if task == "r" { 2 } else { 1 }),
            "{task} {s:?}"
        );
        if s == Scheduler::Wukong {
            assert_eq!(
                st.invocations,
                leaves + 1,
                "{task}: one retry, no other new invocation"
            );
            assert_eq!(
                st.fan_in_count,
                rt.plan(&g).unwrap().fan_in_edges() as u64,
                "{task}: no counter double-counted"
            );
        }
    }
    let (rt, _) = runtime(
        &pool,
        RuntimeConfig {
            crash_in: Some("nope".to_string()),
            ..RuntimeConfig::default()
        },
    );
    assert!(matches!(
        rt.run(&g, Scheduler::Wukong),
        Err(DagError::Config(_))
    ));
}

/// Retry case: the executor recorded in the pool that it invokes a child (the
/// invocation word) and died before invoking it. The retry finds its own id in the
/// word and invokes the child again; a second invocation of the same start task (the
/// dead attempt had made it) is dropped by the invoker.
#[test]
fn crash_between_invocation_record_and_invocation_loses_nothing() {
    use farpool::dag::CrashSite;
    let pool = pool();
    // a -> {b, c} -> d with small outputs: a's executor keeps b and invokes c.
    let mut g = Graph::new();
    g.add("a", "sum", [("x", Input::value(&1u64).unwrap())])
        .unwrap();
    g.add(
        "b",
        "sum",
        [
            ("x", Input::task("a")),
            ("k", Input::value(&10u64).unwrap()),
        ],
    )
    .unwrap();
    g.add(
        "c",
        "sum",
        [
            ("x", Input::task("a")),
            ("k", Input::value(&100u64).unwrap()),
        ],
    )
    .unwrap();
    g.add(
        "d",
        "sum",
        [("l", Input::task("b")), ("r", Input::task("c"))],
    )
    .unwrap();
    // Died after the record, before the invocation: without the re-invocation the
    // fan-in at d never completes (Stalled).
    let (rt, calls) = runtime(
        &pool,
        RuntimeConfig {
            crash_in: Some("a".into()),
            crash_site: CrashSite::AfterInvokeRecord,
            ..RuntimeConfig::default()
        },
    );
    let out = rt.run(&g, Scheduler::Wukong).unwrap();
    assert_eq!(out.get::<u64>("d").unwrap(), 112);
    let st = out.stats();
    assert_eq!(st.retries, 1);
    assert_eq!(st.tasks_run, st.tasks + 1, "only a ran again");
    assert_eq!(st.invocations, 3, "the leaf, its retry, c once");
    assert_eq!(calls.lock().unwrap().get(&101), Some(&1), "c ran once");
    assert_eq!(st.fan_in_count, 2);
    // Died after the invocation was made (in b, on the same path): the retry
    // re-sends c's invocation and the invoker drops it; c still runs once.
    let (rt, calls) = runtime(
        &pool,
        RuntimeConfig {
            crash_in: Some("b".into()),
            ..RuntimeConfig::default()
        },
    );
    let out = rt.run(&g, Scheduler::Wukong).unwrap();
    assert_eq!(out.get::<u64>("d").unwrap(), 112);
    let st = out.stats();
    assert_eq!(st.retries, 1);
    assert_eq!(st.tasks_run, st.tasks + 2, "a and b ran again");
    assert_eq!(
        st.invocations, 3,
        "the duplicate invocation of c was dropped"
    );
    assert_eq!(calls.lock().unwrap().get(&101), Some(&1), "c ran once");
    assert_eq!(st.fan_in_count, 2);
}

/// Retry case: a sink that ran before the crash, on the same path, is not run again
/// (its done word is set after its output reached the submitter).
#[test]
fn sink_that_ran_before_a_crash_is_not_run_again() {
    let pool = pool();
    // a has a 64 KiB output: its executor runs both children itself, s first.
    let mut g = Graph::new();
    g.add("a", "pad", [("v", Input::value(&1u64).unwrap())])
        .unwrap();
    g.add("s", "sum", [("x", Input::task("a"))]).unwrap();
    g.add(
        "k",
        "sum",
        [
            ("x", Input::task("a")),
            ("c", Input::value(&1000u64).unwrap()),
        ],
    )
    .unwrap();
    g.add(
        "k2",
        "sum",
        [("x", Input::task("k")), ("c", Input::value(&5u64).unwrap())],
    )
    .unwrap();
    let (rt, calls) = runtime(
        &pool,
        RuntimeConfig {
            crash_in: Some("k".into()),
            ..RuntimeConfig::default()
        },
    );
    assert_eq!(rt.plan(&g).unwrap().children(0), &[1, 2], "s runs before k");
    let out = rt.run(&g, Scheduler::Wukong).unwrap();
    assert_eq!(out.get::<u64>("s").unwrap(), 1);
    assert_eq!(out.get::<u64>("k2").unwrap(), 1006);
    let st = out.stats();
    assert_eq!(st.retries, 1);
    let calls = calls.lock().unwrap();
    assert_eq!(calls.get(&1), Some(&1), "the sink s ran once");
    assert_eq!(calls.get(&1001), Some(&2), "k (killed) ran again");
    // a (a chain task: its output was only in the dead executor's memory) and k ran
    // twice.
    assert_eq!(st.tasks_run, st.tasks + 2);
}

/// Intermediate outputs in pool objects are freed when their last consumer is done:
/// every GEMM block except the sinks' is freed before the job ends, under both
/// schedulers and with a consumer (a `mul` task reading two objects) killed and
/// retried, and the pool holds none of them afterwards.
#[test]
fn intermediate_objects_are_freed_by_their_last_consumer() {
    use farpool::dag::workloads::{gemm, GemmSpec};
    let pool = pool();
    // 4x4 blocks of 16x16 doubles (2 KiB + header) with a 1 KiB inline limit: every
    // output is a pool object. gen: 2 x 16 blocks, mul: 64, add: 16 (sinks).
    let w = gemm(GemmSpec {
        n: 64,
        block: 16,
        ..GemmSpec::default()
    })
    .unwrap();
    let (gens, muls) = (32u64, 64u64);
    for (crash, s) in [
        (None, Scheduler::Wukong),
        (None, Scheduler::Central),
        (Some("mul-1-2-3"), Scheduler::Wukong),
        (Some("c-1-2"), Scheduler::Wukong),
    ] {
        for free in [true, false] {
            let rt = DagRuntime::new(
                pool.client().unwrap(),
                w.registry().clone(),
                RuntimeConfig {
                    inline_limit: 1024,
                    crash_in: crash.map(str::to_string),
                    free_intermediates: free,
                    // Every consumer reads its inputs from the pool.
                    cluster_large_outputs: false,
                    ..RuntimeConfig::default()
                },
            )
            .unwrap();
            let out = rt.run(w.graph(), s).unwrap();
            let check = w.check(&out).unwrap();
            assert!(
                check.correct,
                "{crash:?} {s:?} free={free}: {}",
                check.detail
            );
            let st = out.stats();
            let expect = if free { gens + muls } else { 0 };
            assert_eq!(
                st.objects_freed, expect,
                "{crash:?} {s:?} free={free}: every non-sink output freed once"
            );
            if s == Scheduler::Wukong {
                assert_eq!(
                    st.fan_in_count,
                    rt.plan(w.graph()).unwrap().fan_in_edges() as u64
                );
            }
        }
    }
    // Nothing of the jobs is left in the pool.
    let client = pool.client().unwrap();
    let status = client.status().unwrap();
    assert!(
        status
            .paths
            .iter()
            .all(|p| !p.path.as_str().starts_with("/dag-")),
        "{:?}",
        status.paths
    );
}

/// A consumer whose own output lives only in memory releases its pool-object input
/// when its invocation ends, not at once: a retry of the invocation runs it again and
/// must still find the input.
#[test]
fn a_retried_consumer_still_finds_its_input_object() {
    let pool = pool();
    // a: 64 KiB (a pool object, clustering off); its executor keeps b (a sink) and
    // invokes c with a's mark; c's executor runs c, then k2, and dies in k2.
    let mut g = Graph::new();
    g.add("a", "pad", [("v", Input::value(&1u64).unwrap())])
        .unwrap();
    g.add("b", "sum", [("x", Input::task("a"))]).unwrap();
    g.add(
        "c",
        "sum",
        [
            ("x", Input::task("a")),
            ("k", Input::value(&10u64).unwrap()),
        ],
    )
    .unwrap();
    g.add(
        "k2",
        "sum",
        [("x", Input::task("c")), ("k", Input::value(&5u64).unwrap())],
    )
    .unwrap();
    for _ in 0..3 {
        let (rt, calls) = runtime(
            &pool,
            RuntimeConfig {
                crash_in: Some("k2".into()),
                cluster_large_outputs: false,
                ..RuntimeConfig::default()
            },
        );
        let out = rt.run(&g, Scheduler::Wukong).unwrap();
        assert_eq!(out.get::<u64>("b").unwrap(), 1);
        assert_eq!(out.get::<u64>("k2").unwrap(), 16);
        let st = out.stats();
        assert_eq!(st.retries, 1);
        assert_eq!(calls.lock().unwrap().get(&11), Some(&2), "c ran again");
        assert_eq!(st.objects_freed, 1, "a's object freed once both were done");
    }
}

#[test]
fn workloads_are_correct_both_ways() {
    use farpool::dag::workloads::{gemm, tree_reduction, tsqr, GemmSpec, TreeSpec, TsqrSpec};
    let pool = pool();
    let small = [
        tree_reduction(TreeSpec {
            leaves: 33,
            ..TreeSpec::default()
        })
        .unwrap(),
        gemm(GemmSpec {
            n: 48,
            block: 16,
            ..GemmSpec::default()
        })
        .unwrap(),
        // R factors of 8 columns are 528 bytes: inline; 40 columns: pool objects.
        tsqr(TsqrSpec {
            rows: 1024,
            cols: 8,
            chunk: 128,
            ..TsqrSpec::default()
        })
        .unwrap(),
        tsqr(TsqrSpec {
            rows: 640,
            cols: 40,
            chunk: 128,
            ..TsqrSpec::default()
        })
        .unwrap(),
    ];
    for w in &small {
        let rt = DagRuntime::new(
            pool.client().unwrap(),
            w.registry().clone(),
            RuntimeConfig::default(),
        )
        .unwrap();
        for s in [Scheduler::Wukong, Scheduler::Central] {
            let out = rt.run(w.graph(), s).unwrap();
            let check = w.check(&out).unwrap();
            assert!(check.correct, "{} {s:?}: {}", w.name(), check.detail);
            let st = out.stats();
            assert_eq!(st.tasks_run, st.tasks);
            assert!(st.ideal_bytes > 0);
            assert!(
                st.bytes_written + st.bytes_read <= st.ideal_bytes,
                "{} {s:?}: moved {} of {} ideal bytes",
                w.name(),
                st.bytes_written + st.bytes_read,
                st.ideal_bytes
            );
        }
    }
    // A check that can fail: another workload's output is not accepted.
    let rt = DagRuntime::new(
        pool.client().unwrap(),
        small[3].registry().clone(),
        RuntimeConfig::default(),
    )
    .unwrap();
    let other = rt.run(small[3].graph(), Scheduler::Wukong).unwrap();
    assert!(small[2].check(&other).is_err() || !small[2].check(&other).unwrap().correct);
    assert!(gemm(GemmSpec {
        n: 50,
        block: 16,
        ..GemmSpec::default()
    })
    .is_err());
}

#[test]
fn worker_processes_run_jobs_and_survive_a_killed_worker() {
    use farpool::dag::process::{WorkerConfig, WorkerPool};
    use farpool::dag::workloads::{TreeSpec, WorkloadSpec};
    let pool = pool();
    let client = pool.client().unwrap();
    let leaves = 64u64;
    let spec = WorkloadSpec::Tr(TreeSpec {
        leaves,
        ..TreeSpec::default()
    });
    let workload = spec.build().unwrap();
    let edges = Plan::new(workload.graph(), workload.registry())
        .unwrap()
        .fan_in_edges() as u64;
    let config = workers_config(&pool);
    let mut workers = WorkerPool::new(config).unwrap();
    let out = workers.run(&client, spec, Scheduler::Wukong).unwrap();
    assert!(workload.check(&out).unwrap().correct);
    let st = out.stats();
    assert_eq!(st.tasks_run, st.tasks);
    assert_eq!(st.fan_in_count, edges);
    assert_eq!(workers.len(), 3);
    // The same processes run the next job.
    let pids = workers.pids();
    let out = workers.run(&client, spec, Scheduler::Wukong).unwrap();
    assert!(workload.check(&out).unwrap().correct);
    assert_eq!(workers.pids(), pids, "workers are reused");
    drop(workers);

    // A worker process aborts in the middle of an inner fan-in child (the built-in
    // tree names its inner tasks sum-<level>-<index>).
    let mut workers = WorkerPool::new(WorkerConfig {
        crash_in: Some("sum-2-1".into()),
        ..workers_config(&pool)
    })
    .unwrap();
    let out = workers.run(&client, spec, Scheduler::Wukong).unwrap();
    let st = out.stats();
    assert!(workload.check(&out).unwrap().correct);
    assert_eq!(
        st.retries, 1,
        "one worker died and its invocation was retried"
    );
    // The dead process's counts died with it: the killed invocation had run its
    // leaf, sum-0-*, sum-1-* and sum-2-1 (4 tasks). The retry recovered the first
    // three from the pool and ran only sum-2-1 again.
    assert_eq!(
        st.tasks_run,
        st.tasks - 4 + 1,
        "only the killed task ran again"
    );
    assert_eq!(st.fan_in_count, edges, "no counter double-counted");
    assert_eq!(workers.len(), 3, "the dead worker was replaced");

    // The centralized scheduler dispatches to the same kind of workers, with a crash.
    let out = workers.run(&client, spec, Scheduler::Central).unwrap();
    let st = out.stats();
    assert!(workload.check(&out).unwrap().correct);
    assert_eq!(st.retries, 1);
    assert_eq!(
        st.invocations,
        st.tasks + 1,
        "one dispatch per task, one retry"
    );
    assert_eq!(
        st.tasks_run, st.tasks,
        "the killed dispatch's count died with it"
    );
    assert_eq!(st.counter_ops, 0);
    // A job the workers cannot join fails with their message; the same workers run
    // the next job.
    workers.set_crash_in(Some("no-such-task".into()));
    match workers.run(&client, spec, Scheduler::Wukong) {
        Err(DagError::Worker(message)) => assert!(message.contains("no-such-task"), "{message}"),
        other => panic!("{other:?}"),
    }
    workers.set_crash_in(None);
    let out = workers.run(&client, spec, Scheduler::Wukong).unwrap();
    assert!(workload.check(&out).unwrap().correct);
    assert_eq!(workers.len(), 3);
    // GEMM with large outputs through pool objects, both ways.
    // 32x32 blocks are 8 KiB: above the inline limit.
    let gemm = WorkloadSpec::Gemm(farpool::dag::workloads::GemmSpec {
        n: 64,
        block: 32,
        ..Default::default()
    });
    let w = gemm.build().unwrap();
    let mut workers = WorkerPool::new(workers_config(&pool)).unwrap();
    for s in [Scheduler::Wukong, Scheduler::Central] {
        let out = workers.run(&client, gemm, s).unwrap();
        assert!(w.check(&out).unwrap().correct, "{s:?}");
        assert!(
            out.stats().bytes_written > 0,
            "{s:?}: blocks through the pool"
        );
    }
}

fn workers_config(pool: &EmbeddedPool) -> farpool::dag::process::WorkerConfig {
    farpool::dag::process::WorkerConfig {
        bin: env!("CARGO_BIN_EXE_farpool").into(),
        controller: pool.addr().to_string(),
        workers: 3,
        inline_limit: 4096,
        cluster_large_outputs: true,
        crash_in: None,
        crash_site: Default::default(),
        free_intermediates: true,
        remote: Vec::new(),
    }
}
