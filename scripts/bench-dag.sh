#!/usr/bin/env bash
# The DAG executor's measurements for docs/BENCHMARKS.md ("DAG executor"): every
# workload with both schedulers alternating in one invocation (3 runs), GEMM and TSQR
# with intermediate outputs freed early and kept, and the load average around each
# invocation. Output: JSON lines in ${OUT:-target/bench-dag.jsonl}, load lines on stderr.
# Needs a release build: cargo build --release --bin farpool
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${FARPOOL:-${CARGO_TARGET_DIR:-target}/release/farpool}"
out="${OUT:-target/bench-dag.jsonl}"
repeat="${REPEAT:-3}"
mkdir -p "$(dirname "$out")"
: > "$out"
run() {
  echo "== $* (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  "$bin" bench dag --scheduler both --repeat "$repeat" --json "$@" >> "$out"
  echo "   done (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
}
run --workload tr --task-ms 0
run --workload tr --task-ms 1
run --workload tr --task-ms 0 --transport shm
run --workload gemm
run --workload gemm --keep-intermediates
run --workload tsqr
run --workload tsqr --keep-intermediates
# Scaling the executors with sleeping 1 ms tasks (they need no core while they sleep):
# whether the central scheduler, one thread, becomes the bottleneck.
for w in 32 128; do run --workload tr --task-ms 1 --workers "$w"; done
run --workload tr --task-ms 1 --workers 16 --processes
# Remote workers: a controller, a memory node and two `farpool worker --listen`
# processes on 127.0.0.2 and 127.0.0.3 (other hosts on the loopback network).
announce() { # file -> address from its "listening <addr>" line
  for _ in $(seq 100); do
    a="$(sed -n 's/^listening //p' "$1" | head -1)"
    [ -n "$a" ] && { echo "$a"; return; }
    sleep 0.1
  done
  echo "no address announced in $1" >&2; exit 1
}
tmp="$(mktemp -d)"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$tmp"' EXIT
"$bin" controller --listen 127.0.0.1:0 > "$tmp/ctl.out" 2>/dev/null & pids+=($!)
ctl="$(announce "$tmp/ctl.out")"
"$bin" memnode --controller "$ctl" --listen 127.0.0.1:0 --capacity 1GiB --block-size 1MiB > "$tmp/mem.out" 2>/dev/null & pids+=($!)
announce "$tmp/mem.out" > /dev/null
"$bin" worker --controller "$ctl" --listen 127.0.0.2:0 > "$tmp/w2.out" & pids+=($!)
"$bin" worker --controller "$ctl" --listen 127.0.0.3:0 > "$tmp/w3.out" & pids+=($!)
workers="$(announce "$tmp/w2.out"),$(announce "$tmp/w3.out")"
sleep 1
run --workload tr --task-ms 0 --controller "$ctl" --worker-addrs "$workers"
run --workload tr --task-ms 1 --controller "$ctl" --worker-addrs "$workers"
run --workload gemm --controller "$ctl" --worker-addrs "$workers"
echo "records in $out" >&2
