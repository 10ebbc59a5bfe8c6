#!/usr/bin/env bash
# Soak test (issue 5, item 8): starts a controller (with a metadata log) and two memory
# nodes on 127.0.0.1, runs `farpool soak` with 64 verifying clients for SECONDS
# (default 600), and prints exactly one line
#   ops=N errors=N lost=N rss_start_kib=N rss_end_kib=N
# (rss: the controller and both memory nodes together, after setup and at the end).
# Exits non-zero on any failed operation or lost item.
#
# Environment: FARPOOL_BIN (a farpool binary; default: build --release), SOAK_CLIENTS
# (64), SOAK_CAPACITY (per memory node, 128MiB), SOAK_KEEP=1 keeps the logs directory.
# Not part of CI: it runs for minutes.
set -euo pipefail

secs=${1:-600}
clients=${SOAK_CLIENTS:-64}
capacity=${SOAK_CAPACITY:-128MiB}
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${FARPOOL_BIN:-}" ]; then
  bin=$FARPOOL_BIN
else
  (cd "$root" && cargo build --release --quiet --bin farpool) >&2
  bin="${CARGO_TARGET_DIR:-$root/target}/release/farpool"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/farpool-soak.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${SOAK_KEEP:-0}" = 1 ]; then echo "soak: logs in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

# wait_addr OUT NAME: prints the address from the process's `listening <addr>` line.
wait_addr() {
  local a
  for _ in $(seq 400); do
    a=$(sed -n 's/^listening //p' "$1" 2>/dev/null | head -1)
    if [ -n "$a" ]; then echo "$a"; return 0; fi
    sleep 0.05
  done
  echo "soak: $2 did not start; its log:" >&2
  cat "$1.err" >&2 || true
  return 1
}

# Liveness is generous (20 missed heartbeats of 500 ms): on a loaded machine a starved
# memory node must not be declared dead, which would count as lost data.
"$bin" controller --listen 127.0.0.1:0 --data-dir "$work/controller" --log-fsync-ms 100 \
  --heartbeat-ms 500 --missed-heartbeats 20 \
  >"$work/controller.out" 2>"$work/controller.out.err" &
pids+=($!)
ctl=$(wait_addr "$work/controller.out" controller)
watch=(--watch-pid "${pids[0]}")
for i in 1 2; do
  "$bin" memnode --controller "$ctl" --listen 127.0.0.1:0 --capacity "$capacity" \
    --block-size 64KiB --no-hugepages >"$work/memnode$i.out" 2>"$work/memnode$i.out.err" &
  pids+=($!)
  watch+=(--watch-pid "$!")
  wait_addr "$work/memnode$i.out" "memory node $i" >/dev/null
done

rc=0
"$bin" soak --controller "$ctl" --clients "$clients" --duration "$secs" --wait-nodes 2 \
  "${watch[@]}" || rc=$?
exit "$rc"
