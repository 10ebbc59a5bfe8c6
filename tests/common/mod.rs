//! Starts real `farpool controller` and `farpool memnode` processes on 127.0.0.1.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub addr: String,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_farpool")
}

/// Spawns `farpool ARGS` with `envs` and returns it with its first `lines` lines of
/// standard output (the rest is drained so the child never blocks on a full pipe).
fn spawn_announcing(args: &[&str], envs: &[(&str, &str)], lines: usize) -> (Child, Vec<String>) {
    let mut child = Command::new(bin())
        .args(args)
        .envs(envs.iter().copied())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn farpool");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        for _ in 0..lines {
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
        }
        let mut sink = String::new();
        while r.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    let mut got = Vec::new();
    for _ in 0..lines {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => got.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("farpool {args:?} did not announce its address");
            }
        }
    }
    (child, got)
}

/// The value after `prefix` on an announced line.
fn announced(line: &str, prefix: &str, args: &[&str]) -> String {
    line.trim()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("unexpected line {line:?} from farpool {args:?}"))
        .to_string()
}

/// Spawns `farpool ARGS` and waits for its `listening <addr>` line.
pub fn spawn(args: &[&str]) -> Proc {
    let (child, lines) = spawn_announcing(args, &[], 1);
    let addr = announced(&lines[0], "listening ", args);
    Proc { child, addr }
}

/// [`spawn`] with extra environment variables.
pub fn spawn_env(args: &[&str], envs: &[(&str, &str)]) -> Proc {
    let (child, lines) = spawn_announcing(args, envs, 1);
    let addr = announced(&lines[0], "listening ", args);
    Proc { child, addr }
}

/// A controller with short leases and heartbeats, for tests.
pub fn controller() -> Proc {
    controller_with("127.0.0.1:0", &[])
}

/// [`controller`] listening on `listen`, with `extra` arguments after the defaults.
pub fn controller_with(listen: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "controller",
        "--listen",
        listen,
        "--lease-secs",
        "1",
        "--grace-secs",
        "0.5",
        "--heartbeat-ms",
        "100",
        "--missed-heartbeats",
        "3",
    ];
    args.extend_from_slice(extra);
    spawn(&args)
}

/// A memory node of `capacity` with 64 KiB blocks.
pub fn memnode(controller: &str, capacity: &str, transport: &str) -> Proc {
    spawn(&[
        "memnode",
        "--controller",
        controller,
        "--listen",
        "127.0.0.1:0",
        "--capacity",
        capacity,
        "--block-size",
        "64KiB",
        "--transport",
        transport,
        "--no-lock",
        "--no-hugepages",
    ])
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Spawns `farpool ARGS` (which must include `--metrics ADDR`) and waits for its
/// `listening <addr>` and `metrics <addr>` lines; returns the process and the metrics
/// address.
pub fn spawn_with_metrics(args: &[&str]) -> (Proc, String) {
    spawn_with_metrics_env(args, &[])
}

/// [`spawn_with_metrics`] with extra environment variables.
pub fn spawn_with_metrics_env(args: &[&str], envs: &[(&str, &str)]) -> (Proc, String) {
    let (child, lines) = spawn_announcing(args, envs, 2);
    let addr = announced(&lines[0], "listening ", args);
    let metrics = announced(&lines[1], "metrics ", args);
    (Proc { child, addr }, metrics)
}

/// Smallest blocks a memory node accepts, so structures cross block boundaries fast.
pub const SMALL_BLOCK: u64 = 4096;

/// An embedded pool (a controller and two memory nodes of `capacity` bytes each, on
/// 127.0.0.1 inside the test process) with [`SMALL_BLOCK`] blocks, in torn mode when
/// `torn`.
pub fn small_pool(capacity: u64, torn: bool) -> farpool::EmbeddedPool {
    farpool::EmbeddedPool::start(farpool::EmbeddedConfig {
        nodes: 2,
        capacity,
        block_size: SMALL_BLOCK,
        torn,
        ..farpool::EmbeddedConfig::default()
    })
    .expect("embedded pool")
}

/// Blocks of a [`small_pool`] owned by `path` and its subtree.
pub fn subtree_blocks(c: &farpool::Client, path: &str) -> u64 {
    let st = c.status().expect("status");
    st.paths
        .iter()
        .find(|u| u.path.as_str() == path)
        .map_or(0, |u| u.subtree_bytes / SMALL_BLOCK)
}
