//! Fan-in arrivals against a real (torn-mode) pool: the two-parent "pair" protocol
//! (first-edge record in the claim word) and the counter protocol of wider fan-ins,
//! under first attempts, replays, executors that died half-way and concurrent racers.

use farpool::dag::{Arrival, FanIn, Graph, Input, Plan, Registry};
use farpool::{EmbeddedConfig, EmbeddedPool};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::collections::BTreeSet;

fn pool() -> EmbeddedPool {
    EmbeddedPool::start(EmbeddedConfig {
        nodes: 1,
        capacity: 32 << 20,
        block_size: 256 << 10,
        torn: true,
        ..EmbeddedConfig::default()
    })
    .expect("embedded pool")
}

/// Leaves `p0..p{parents-1}` and one child `c` reading all of them, plus `extra`
/// further two-parent children `x{i}` of `p0` and `p1` (for the race test).
fn plan(parents: usize, extra: usize) -> Plan {
    let mut r = Registry::new();
    r.register("f", |_| Ok(Vec::new()));
    let mut g = Graph::new();
    for p in 0..parents {
        g.add(&format!("p{p}"), "f", Vec::<(String, Input)>::new())
            .unwrap();
    }
    let inputs: Vec<(String, Input)> = (0..parents)
        .map(|p| (format!("i{p}"), Input::task(&format!("p{p}"))))
        .collect();
    g.add("c", "f", inputs).unwrap();
    for i in 0..extra {
        g.add(
            &format!("x{i}"),
            "f",
            [("a", Input::task("p0")), ("b", Input::task("p1"))],
        )
        .unwrap();
    }
    Plan::new(&g, &r).unwrap()
}

#[test]
fn pair_is_decided_by_the_first_edge_record() {
    let pool = pool();
    let client = pool.client().unwrap();
    let plan = plan(2, 0);
    let c = plan.id("c").unwrap();

    // Both first attempts, edge 1 first: edge 0 runs the child in its one batch.
    let job = client.task("/pair-first").unwrap();
    let fanin = FanIn::create(&job, &plan).unwrap();
    assert_eq!(fanin.arrive_first(c, 1, 7, 2).unwrap(), Arrival::Wait);
    let ops = fanin.ops();
    assert_eq!(
        fanin.arrive_first(c, 0, 5, 1).unwrap(),
        Arrival::Run(vec![5, 7])
    );
    assert_eq!(fanin.ops() - ops, 4, "one batch of four operations");
    // Replays of either edge: the same decisions, nothing counted twice, marks kept.
    assert_eq!(fanin.arrive(c, 1, 8, 2).unwrap(), Arrival::Wait);
    assert_eq!(fanin.arrive(c, 0, 6, 1).unwrap(), Arrival::Run(vec![5, 7]));
    assert_eq!(fanin.count(c).unwrap(), 2);
    assert_eq!(fanin.total_count().unwrap(), 2);
    assert!(
        fanin.arrive_first(c, 0, 5, 1).is_err(),
        "a 'first' arrival on a set edge is refused"
    );
    assert_eq!(fanin.count(c).unwrap(), 2, "and its count taken back");
    job.close().unwrap();

    // An executor on edge 0 died after its flag CAS and before its batch (a replay's
    // two steps): edge 1 is then the first recorded edge and waits; the retry of edge
    // 0 runs the child; the count misses the dead arrival only.
    let job = client.task("/pair-dead").unwrap();
    let fanin = FanIn::create(&job, &plan).unwrap();
    let block = job.blocks().unwrap().remove(0);
    assert_eq!(block.cas(16, 0, 5).unwrap(), 0, "edge 0's flag, alone");
    assert_eq!(fanin.arrive_first(c, 1, 7, 2).unwrap(), Arrival::Wait);
    assert_eq!(fanin.arrive(c, 0, 9, 1).unwrap(), Arrival::Run(vec![5, 7]));
    assert_eq!(fanin.arrive(c, 1, 7, 2).unwrap(), Arrival::Wait);
    assert_eq!(fanin.count(c).unwrap(), 1);
    job.close().unwrap();

    // One executor arriving on both edges (it ran both parents): the second runs it.
    let job = client.task("/pair-same-owner").unwrap();
    let fanin = FanIn::create(&job, &plan).unwrap();
    assert_eq!(fanin.arrive_first(c, 0, 5, 3).unwrap(), Arrival::Wait);
    assert_eq!(
        fanin.arrive_first(c, 1, 7, 3).unwrap(),
        Arrival::Run(vec![5, 7])
    );
    job.close().unwrap();
}

/// One step of a random arrival history on edge `.1`.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `arrive_first` (turned into a replay if the edge had any step before).
    First,
    /// `arrive`: a retried executor.
    Replay,
    /// An executor that set the edge's flag and died before anything else.
    FlagOnly,
}

fn steps() -> impl Strategy<Value = (usize, Vec<(Kind, usize)>)> {
    (2usize..=3).prop_flat_map(|parents| {
        let kind = prop_oneof![Just(Kind::First), Just(Kind::Replay), Just(Kind::FlagOnly)];
        (
            Just(parents),
            proptest::collection::vec((kind, 0..parents), 0..12),
        )
    })
}

#[test]
fn random_arrival_histories_run_the_child_from_one_executor_and_count_once() {
    let pool = pool();
    let client = pool.client().unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let job_no = std::sync::atomic::AtomicU64::new(0);
    runner
        .run(&steps(), |(parents, mut history)| {
            let n = job_no.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let plan = plan(parents, 0);
            let c = plan.id("c").unwrap();
            let job = client.task(&format!("/random-{n}")).unwrap();
            let fanin = FanIn::create(&job, &plan).unwrap();
            let block = job.blocks().unwrap().remove(0);
            // Afterwards every edge is replayed once, as retries would: the child
            // must have been claimed by then.
            history.extend((0..parents).map(|e| (Kind::Replay, e)));
            let mut seen = vec![false; parents];
            // The mark the edge's flag holds: the first one set.
            let mut marks = vec![0u64; parents];
            let mut counted = 0u64;
            let mut runners = BTreeSet::new();
            for (kind, e) in history {
                // Each edge has its own executor (owner); its marks differ per try so
                // the test sees which one stayed.
                let owner = 100 + e as u64;
                let mark = 10 * (e as u64 + 1) + u64::from(seen[e]);
                let kind = match kind {
                    Kind::First if seen[e] => Kind::Replay,
                    k => k,
                };
                seen[e] = true;
                if marks[e] == 0 {
                    marks[e] = mark;
                    if !matches!(kind, Kind::FlagOnly) {
                        counted += 1;
                    }
                }
                let got = match kind {
                    Kind::FlagOnly => {
                        block.cas(16 + 8 * e as u64, 0, mark).unwrap();
                        continue;
                    }
                    Kind::First => fanin.arrive_first(c, e, mark, owner).unwrap(),
                    Kind::Replay => fanin.arrive(c, e, mark, owner).unwrap(),
                };
                if let Arrival::Run(m) = got {
                    prop_assert!(seen.iter().all(|&s| s), "ran before every edge arrived");
                    prop_assert_eq!(&m, &marks, "the first mark of every edge");
                    runners.insert(e);
                }
                prop_assert!(fanin.count(c).unwrap() <= parents as u64);
            }
            prop_assert_eq!(
                runners.len(),
                1,
                "one executor runs the child: {:?}",
                runners
            );
            prop_assert_eq!(fanin.count(c).unwrap(), counted, "counted once per edge");
            job.close().unwrap();
            Ok(())
        })
        .unwrap();
}

#[test]
fn racing_pair_arrivals_run_every_child_once() {
    let pool = pool();
    let client = pool.client().unwrap();
    let children = 300;
    let plan = plan(2, children);
    let job = client.task("/pair-race").unwrap();
    let fanin = FanIn::create(&job, &plan).unwrap();
    let ids: Vec<_> = (0..children)
        .map(|i| plan.id(&format!("x{i}")).unwrap())
        .collect();
    let runs: Vec<Vec<(usize, Vec<u64>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2usize)
            .map(|edge| {
                let (fanin, ids) = (&fanin, &ids);
                s.spawn(move || {
                    let mut won = Vec::new();
                    for (i, &x) in ids.iter().enumerate() {
                        let mark = 1000 * (i as u64 + 1) + edge as u64;
                        if let Arrival::Run(m) =
                            fanin.arrive_first(x, edge, mark, edge as u64 + 1).unwrap()
                        {
                            won.push((i, m));
                        }
                    }
                    won
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut claimed = vec![0u32; children];
    for (i, m) in runs.into_iter().flatten() {
        claimed[i] += 1;
        let base = 1000 * (i as u64 + 1);
        assert_eq!(m, vec![base, base + 1], "both marks of child {i}");
    }
    assert!(claimed.iter().all(|&n| n == 1), "every child claimed once");
    assert_eq!(fanin.total_count().unwrap(), 2 * children as u64);
    job.close().unwrap();
}
