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
echo "records in $out" >&2
