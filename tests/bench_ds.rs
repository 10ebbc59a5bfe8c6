//! `farpool bench kv|queue|file|log` through the built binary: a short `--verify` run
//! prints the one documented line with zeros, and a measurement prints a JSON record
//! of the structure.

use std::process::Command;

fn farpool(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_farpool"))
        .args(args)
        .output()
        .expect("run the farpool binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The counters of a `lost=N duplicated=N reordered=N splits=N merges=N` line.
fn counters(line: &str) -> Vec<(String, u64)> {
    line.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("key=value");
            (k.to_string(), v.parse().expect("a number"))
        })
        .collect()
}

#[test]
fn kv_verify_prints_zeros_and_repartitions() {
    let (ok, out, err) = farpool(&[
        "bench",
        "kv",
        "--verify",
        "--duration",
        "2",
        "--no-progress",
    ]);
    assert!(ok, "stdout: {out}\nstderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    let c = counters(lines[0]);
    let names: Vec<&str> = c.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        ["lost", "duplicated", "reordered", "splits", "merges"],
        "{out}"
    );
    assert_eq!(c[0].1 + c[1].1 + c[2].1, 0, "{out}");
    assert!(c[3].1 > 0, "the table split: {out}");
}

#[test]
fn queue_verify_and_a_structure_measurement() {
    let (ok, out, err) = farpool(&[
        "bench",
        "queue",
        "--verify",
        "--duration",
        "1",
        "--no-progress",
    ]);
    assert!(ok, "stdout: {out}\nstderr: {err}");
    let c = counters(out.trim());
    assert_eq!(c.len(), 5, "{out}");
    assert_eq!(c[0].1 + c[1].1 + c[2].1, 0, "{out}");

    let (ok, out, err) = farpool(&[
        "bench",
        "file",
        "--op",
        "append",
        "--duration",
        "0.3",
        "--warmup",
        "0",
        "--json",
        "--no-progress",
    ]);
    assert!(ok, "stdout: {out}\nstderr: {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON record");
    assert_eq!(v["system"], "farpool-file");
    assert_eq!(v["structure"], "file");
    assert_eq!(v["op"], "append");
    assert_eq!(v["errors"], 0, "{out}");
    assert!(v["ops"].as_u64().is_some_and(|n| n > 0), "{out}");

    // Only kv get and put are batched (Kv::get_many, Kv::upsert_many); other structure
    // operations refuse a depth.
    let (ok, _, err) = farpool(&[
        "bench",
        "queue",
        "--op",
        "enqueue",
        "--depth",
        "8",
        "--no-progress",
    ]);
    assert!(!ok);
    assert!(err.contains("--depth 1"), "{err}");
    // kv put at depth 8 runs pipelined upsert_many batches without errors.
    let (ok, out, err) = farpool(&[
        "bench",
        "kv",
        "--op",
        "put",
        "--depth",
        "8",
        "--duration",
        "0.3",
        "--warmup",
        "0",
        "--json",
        "--no-progress",
    ]);
    assert!(ok, "stdout: {out}\nstderr: {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON record");
    assert_eq!(
        (v["op"].as_str(), v["depth"].as_u64()),
        (Some("put"), Some(8))
    );
    assert_eq!(v["errors"], 0, "{out}");
    assert!(v["ops"].as_u64().is_some_and(|n| n > 0), "{out}");
}
