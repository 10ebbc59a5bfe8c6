//! Leases with real processes: objects mapped to a backing path are flushed there when
//! their client dies, then freed; a failing flush keeps the data; a killed client's
//! blocks all return to the pool (pinned paths stay); mappings survive a controller
//! kill -9.
//!
//! Client processes are this test binary re-executed with `FARPOOL_FLUSH_CHILD` set:
//! [`child_process_entry`] then runs the child's part (create, map, renew) instead of
//! returning at once, and the parent kills it with SIGKILL.

mod common;

use common::{eventually, memnode, Proc};
use farpool::ds::{File, Kv, KvConfig, Log, ObjectFlags, Queue, QueueConfig};
use farpool::proto::ClusterStatus;
use farpool::tier::Tier;
use farpool::Client;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const KEYS: usize = 300;
const ITEMS: usize = 200;
/// Upper bound for anything that must happen within lease + grace (1.5 s here) plus
/// a flush: generous, so a loaded machine does not fail it; it is no speed claim.
const BOUND: Duration = Duration::from_secs(30);

fn key(i: usize) -> Vec<u8> {
    format!("key-{i}").into_bytes()
}

fn value(i: usize) -> Vec<u8> {
    vec![(i % 251) as u8; 10 + i % 90]
}

fn item(i: usize) -> Vec<u8> {
    format!("item-{i}").into_bytes()
}

/// A controller with a 1 s lease, 0.5 s grace and 200 ms first flush retry.
fn controller(data_dir: Option<&str>, listen: &str) -> Proc {
    let mut extra = vec!["--flush-retry-ms", "200"];
    if let Some(d) = data_dir {
        extra.extend(["--data-dir", d]);
    }
    common::controller_with(listen, &extra)
}

/// Starts this binary as a child client in `mode`; returns once it printed READY.
fn child(mode: &str, controller: &str, tier: &str) -> Child {
    let exe = std::env::current_exe().expect("test binary path");
    let mut c = Command::new(exe)
        .args([
            "child_process_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FARPOOL_FLUSH_CHILD", mode)
        .env("FARPOOL_FLUSH_CONTROLLER", controller)
        .env("FARPOOL_FLUSH_TIER", tier)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child client");
    let out = c.stdout.take().expect("child stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = String::new();
        while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            if line.contains("FLUSH-CHILD READY") {
                let _ = tx.send(());
            }
            line.clear();
        }
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        let _ = c.kill();
        panic!("child client {mode} did not get ready");
    }
    c
}

/// SIGKILL, no cleanup: the child's leases are simply no longer renewed.
fn kill9(mut c: Child) {
    c.kill().expect("kill -9 the child");
    c.wait().expect("reap the child");
}

fn status(c: &Client) -> ClusterStatus {
    c.status().expect("status")
}

fn has_path(st: &ClusterStatus, path: &str) -> bool {
    st.paths.iter().any(|u| u.path.as_str() == path)
}

/// Every block of every node is free (no revocation pending).
fn all_free(st: &ClusterStatus) -> bool {
    st.used_bytes == 0
        && st
            .nodes
            .iter()
            .all(|n| n.blocks_free == n.blocks_total && n.blocks_revoking == 0)
}

/// Not a test: the entry point of the child client processes the tests start (does
/// nothing unless `FARPOOL_FLUSH_CHILD` names a mode).
#[test]
fn child_process_entry() {
    let Ok(mode) = std::env::var("FARPOOL_FLUSH_CHILD") else {
        return;
    };
    let addr = std::env::var("FARPOOL_FLUSH_CONTROLLER").expect("controller address");
    let tier = std::env::var("FARPOOL_FLUSH_TIER").expect("tier");
    let client = Client::connect(&addr).expect("connect");
    let mut keep = Vec::new();
    match mode.as_str() {
        // A Kv and a Queue under /fjob, mapped to the tier; renewed until killed.
        "objects" => {
            keep.push(client.lease("/fjob").expect("lease"));
            let kv = Kv::create_at(&client, "/fjob/kv", KvConfig::default()).expect("kv");
            for i in 0..KEYS {
                kv.upsert(&key(i), &value(i)).expect("upsert");
            }
            ObjectFlags::mapped(&tier, "fjob/kv")
                .apply(&client, kv.path())
                .expect("map kv");
            let q =
                Queue::create_at(&client, "/fjob/q", QueueConfig { slot_size: 64 }).expect("queue");
            for i in 0..ITEMS {
                q.enqueue(&item(i)).expect("enqueue");
            }
            client
                .map_to("/fjob/q", &tier, "fjob/q")
                .expect("map queue");
            // An unmapped task's blocks, freed plainly.
            let task = client.task("/fjob/scratch").expect("task");
            task.alloc(256 << 10).expect("alloc");
            std::mem::forget(task);
        }
        // A Kv mapped to a tier that cannot be written.
        "bad-tier" => {
            keep.push(client.lease("/bjob").expect("lease"));
            let kv = Kv::create_at(&client, "/bjob/kv", KvConfig::default()).expect("kv");
            for i in 0..KEYS {
                kv.upsert(&key(i), &value(i)).expect("upsert");
            }
            client.map_to("/bjob/kv", &tier, "bjob/kv").expect("map");
        }
        // Many blocks in many tasks of one job, renewed; one pinned path.
        "blocks" => {
            keep.push(client.lease("/cjob").expect("lease"));
            for t in 0..8 {
                let task = client.task(&format!("/cjob/stage/t{t}")).expect("task");
                for _ in 0..4 {
                    task.alloc(256 << 10).expect("alloc");
                }
                std::mem::forget(task);
            }
            let pinned = client.task("/cjob/keep").expect("task");
            pinned.alloc(128 << 10).expect("alloc");
            client.pin("/cjob/keep", true).expect("pin");
            std::mem::forget(pinned);
        }
        other => panic!("unknown child mode {other}"),
    }
    println!("FLUSH-CHILD READY");
    loop {
        // Leases and tasks renew in the background until the parent kills us.
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn mapped_objects_of_a_killed_client_are_flushed_freed_and_load_back() {
    let ctl = controller(None, "127.0.0.1:0");
    let _mem = memnode(&ctl.addr, "16MiB", "soft");
    let dir = tempfile::tempdir().unwrap();
    let tier_url = dir.path().join("tier").to_str().unwrap().to_string();
    let c = child("objects", &ctl.addr, &tier_url);
    let client = Client::connect(&ctl.addr).unwrap();
    let st = status(&client);
    assert!(st.used_bytes > 0);
    let mapped: Vec<String> = st
        .paths
        .iter()
        .filter_map(|u| Some(format!("{} {}", u.path, u.backing.as_ref()?)))
        .collect();
    assert_eq!(
        mapped,
        [
            format!("/fjob/kv {tier_url}#fjob/kv"),
            format!("/fjob/q {tier_url}#fjob/q")
        ]
    );

    kill9(c);
    assert!(
        eventually(BOUND, || {
            let st = status(&client);
            all_free(&st) && st.paths.is_empty()
        }),
        "the killed client's objects were not flushed and freed: {:?}",
        status(&client)
    );
    let st = status(&client);
    assert!(st.paths.is_empty(), "{:?}", st.paths);
    assert_eq!(st.flushes_total, 2);
    assert_eq!(st.flush_failures_total, 0);
    assert!(dir.path().join("tier/fjob/kv").is_file());
    assert!(dir.path().join("tier/fjob/q").is_file());

    // Load them back in a new client and check every key and item.
    let _lease = client.lease("/restored").unwrap();
    let tier = Tier::open(&tier_url).unwrap();
    let kv = Kv::load(
        &client,
        "/restored/kv",
        KvConfig::default(),
        &tier,
        "fjob/kv",
    )
    .unwrap();
    for i in 0..KEYS {
        assert_eq!(kv.get(&key(i)).unwrap(), Some(value(i)), "key {i}");
    }
    assert_eq!(kv.entries().unwrap().len(), KEYS);
    let q = Queue::load(
        &client,
        "/restored/q",
        QueueConfig { slot_size: 64 },
        &tier,
        "fjob/q",
    )
    .unwrap();
    for i in 0..ITEMS {
        assert_eq!(q.dequeue().unwrap(), Some(item(i)), "item {i}");
    }
    assert_eq!(q.dequeue().unwrap(), None);
}

#[test]
fn a_failing_flush_keeps_the_data_reports_it_and_retries() {
    let ctl = controller(None, "127.0.0.1:0");
    let _mem = memnode(&ctl.addr, "16MiB", "soft");
    let dir = tempfile::tempdir().unwrap();
    // A plain file where the tier directory should be: the tier cannot be opened
    // (permissions would not stop a test running as root).
    let tier_path = dir.path().join("tier");
    std::fs::write(&tier_path, b"not a directory").unwrap();
    let tier_url = tier_path.to_str().unwrap().to_string();
    let c = child("bad-tier", &ctl.addr, &tier_url);
    let client = Client::connect(&ctl.addr).unwrap();
    let used = status(&client).used_bytes;
    kill9(c);

    assert!(
        eventually(BOUND, || status(&client).flush_failures_total >= 2),
        "no failed flush reported: {:?}",
        status(&client)
    );
    let st = status(&client);
    assert_eq!(st.used_bytes, used, "nothing freed while the flush fails");
    assert!(has_path(&st, "/bjob/kv"));
    assert_eq!(st.flushes_total, 0);
    let f = &st.flushes[0];
    assert_eq!(f.path.as_str(), "/bjob/kv");
    assert!(f.failures >= 1);
    let err = f.last_error.as_deref().unwrap_or_default();
    assert!(err.contains("cannot open persistent tier"), "{err}");

    // The operator's view: text and JSON.
    let out = Command::new(common::bin())
        .args(["status", "--controller", &ctl.addr])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("FLUSHES"), "{text}");
    assert!(
        text.contains("/bjob/kv") && text.contains("last error"),
        "{text}"
    );
    let out = Command::new(common::bin())
        .args(["status", "--controller", &ctl.addr, "--json"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["flushes"][0]["last_error"].is_string(), "{json}");
    assert!(json["flush_failures_total"].as_u64().unwrap() >= 1);

    // Once the tier works, a retry flushes and frees the data.
    std::fs::remove_file(&tier_path).unwrap();
    std::fs::create_dir(&tier_path).unwrap();
    assert!(
        eventually(BOUND, || all_free(&status(&client))),
        "the retried flush did not free the data: {:?}",
        status(&client)
    );
    assert_eq!(status(&client).flushes_total, 1);
    let tier = Tier::open(&tier_url).unwrap();
    let _lease = client.lease("/back").unwrap();
    let kv = Kv::load(&client, "/back/kv", KvConfig::default(), &tier, "bjob/kv").unwrap();
    assert_eq!(kv.entries().unwrap().len(), KEYS);
}

#[test]
fn kill_9_a_client_mid_job_returns_its_blocks_and_keeps_pinned_paths() {
    let ctl = controller(None, "127.0.0.1:0");
    let _mem = memnode(&ctl.addr, "16MiB", "soft");
    let c = child("blocks", &ctl.addr, "-");
    let client = Client::connect(&ctl.addr).unwrap();
    let st = status(&client);
    let pinned = st
        .paths
        .iter()
        .find(|u| u.path.as_str() == "/cjob/keep")
        .map(|u| u.subtree_bytes)
        .unwrap();
    assert!(pinned > 0);
    assert!(st.used_bytes >= 8 * 4 * (256 << 10) + pinned);
    // Renewed: still there after more than a lease and grace.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(status(&client).used_bytes, st.used_bytes);

    kill9(c);
    let settled = |st: &ClusterStatus| {
        let paths: Vec<&str> = st.paths.iter().map(|u| u.path.as_str()).collect();
        st.used_bytes == pinned
            && paths == ["/cjob", "/cjob/keep"]
            && st
                .nodes
                .iter()
                .map(|n| (n.blocks_total - n.blocks_free) * n.block_size)
                .sum::<u64>()
                == pinned
    };
    assert!(
        eventually(BOUND, || settled(&status(&client))),
        "the killed client's blocks did not return to the pool: {:?}",
        status(&client)
    );
    // The operator removes the pinned path: capacity is back to 100 %.
    client.remove("/cjob").unwrap();
    assert!(
        eventually(BOUND, || all_free(&status(&client))),
        "{:?}",
        status(&client)
    );
}

#[test]
fn a_mapping_survives_a_controller_kill_9_and_is_flushed_after_restart() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_string();
    let mut ctl = controller(Some(&data_dir), "127.0.0.1:0");
    let addr = ctl.addr.clone();
    let _mem = memnode(&addr, "16MiB", "soft");
    let tier_dir = tempfile::tempdir().unwrap();
    let tier_url = tier_dir.path().to_str().unwrap().to_string();
    {
        let client = Client::connect(&addr).unwrap();
        let lease = client.lease("/djob").unwrap();
        let kv = Kv::create_at(&client, "/djob/kv", KvConfig::default()).unwrap();
        for i in 0..KEYS {
            kv.upsert(&key(i), &value(i)).unwrap();
        }
        client.map_to("/djob/kv", &tier_url, "djob/kv").unwrap();
        ctl.kill();
        // The lease guard's renewals fail from here on; dropping it stops them.
        drop(lease);
    }
    // Same data directory and port, so the memory node re-registers.
    let ctl = controller(Some(&data_dir), &addr);
    let client = Client::connect(&ctl.addr).unwrap();
    let st = status(&client);
    let kv = st
        .paths
        .iter()
        .find(|u| u.path.as_str() == "/djob/kv")
        .expect("the object is recovered");
    let b = kv.backing.as_ref().expect("the mapping is recovered");
    assert_eq!(
        (b.url.as_str(), b.key.as_str()),
        (tier_url.as_str(), "djob/kv")
    );
    // Nobody renews it: the recovered controller flushes it once its node is back.
    assert!(
        eventually(BOUND, || {
            let st = status(&client);
            st.flushes_total == 1 && st.paths.is_empty()
        }),
        "{:?}",
        status(&client)
    );
    let tier = Tier::open(&tier_url).unwrap();
    let _lease = client.lease("/back").unwrap();
    let kv = Kv::load(&client, "/back/kv", KvConfig::default(), &tier, "djob/kv").unwrap();
    for i in 0..KEYS {
        assert_eq!(kv.get(&key(i)).unwrap(), Some(value(i)), "key {i}");
    }
}

#[test]
fn files_logs_and_raw_paths_are_flushed_by_kind() {
    let ctl = controller(None, "127.0.0.1:0");
    let _mem = memnode(&ctl.addr, "16MiB", "soft");
    let dir = tempfile::tempdir().unwrap();
    let tier_url = format!("file://{}", dir.path().to_str().unwrap());
    let client = Client::connect(&ctl.addr).unwrap();
    let lease = client.lease("/rjob").unwrap();
    // A file and a log, spanning several blocks.
    let file = File::create_at(&client, "/rjob/file").unwrap();
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    file.append(&bytes).unwrap();
    client.map_to("/rjob/file", &tier_url, "r/file").unwrap();
    let log = Log::create_at(&client, "/rjob/log").unwrap();
    let mut positions = Vec::new();
    for i in 0..50u32 {
        positions.push(log.append(&item(i as usize), &[i % 3]).unwrap());
    }
    client.map_to("/rjob/log", &tier_url, "r/log").unwrap();
    // Raw blocks (no farpool object): flushed as their bytes in allocation order.
    let task = client.task("/rjob/raw").unwrap();
    let blocks = task.alloc(3 * (64 << 10)).unwrap();
    let mut raw = Vec::new();
    for (k, b) in blocks.iter().enumerate() {
        let fill = vec![0xA0 + k as u8; b.len() as usize];
        b.write(0, &fill).unwrap();
        raw.extend(fill);
    }
    client.map_to("/rjob/raw", &tier_url, "r/raw").unwrap();
    task.finish().unwrap();
    // Nobody renews from here.
    drop(lease);
    assert!(
        eventually(BOUND, || {
            let st = status(&client);
            st.flushes_total == 3 && all_free(&st) && st.paths.is_empty()
        }),
        "{:?}",
        status(&client)
    );
    let tier = Tier::open(&tier_url).unwrap();
    assert_eq!(tier.get("r/raw").unwrap(), raw);
    let _lease = client.lease("/back").unwrap();
    let f = File::load(&client, "/back/file", &tier, "r/file").unwrap();
    assert_eq!(f.read_all().unwrap(), bytes);
    let l = Log::load(&client, "/back/log", &tier, "r/log").unwrap();
    let scan = l.scan(0, l.end().unwrap(), &[]).unwrap();
    assert_eq!(scan.entries.len(), 50);
    for (i, e) in scan.entries.iter().enumerate() {
        assert_eq!(e.position, positions[i]);
        assert_eq!(e.data, item(i));
        assert_eq!(e.streams, [i as u32 % 3]);
    }
}
