#!/usr/bin/env bash
# usage: BEFORE=bin AFTER=bin scripts/bench-dag-ab.sh OUTDIR ROUNDS [bench dag args...]
# Appends one JSON line per run to OUTDIR/runs.jsonl, tagged with build, round and load.
# Before/after on one pre-started, warmed cluster (controller + 1 GiB soft memory node,
# 1 MiB blocks, started with the before binary; server code is the same in both builds).
set -euo pipefail
out="$1"; rounds="${2:-3}"; shift 2; extra=("$@")
mkdir -p "$out"
before="${BEFORE:?path of the before build farpool binary}"
after="${AFTER:?path of the after build farpool binary}"
tmp="$(mktemp -d)"; pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$tmp"' EXIT
announce() { for _ in $(seq 100); do a="$(sed -n 's/^listening //p' "$1" | head -1)"; [ -n "$a" ] && { echo "$a"; return; }; sleep 0.1; done; exit 1; }
"$before" controller --listen 127.0.0.1:0 > "$tmp/ctl.out" 2>/dev/null & pids+=($!)
ctl="$(announce "$tmp/ctl.out")"
"$before" memnode --controller "$ctl" --listen 127.0.0.1:0 --capacity 1GiB --block-size 1MiB > "$tmp/mem.out" 2>/dev/null & pids+=($!)
announce "$tmp/mem.out" > /dev/null
# Wait until the memory node is idle (it faults its region in before announcing itself;
# this only guards against anything else it does at start).
for _ in $(seq 60); do
  c=$(ps -o pcpu= -p "${pids[1]}" | tr -d ' '); t1=$(awk '{print $14+$15}' /proc/${pids[1]}/stat); sleep 0.5; t2=$(awk '{print $14+$15}' /proc/${pids[1]}/stat)
  [ $((t2 - t1)) -le 2 ] && break
done
echo "memnode settled (cpu ticks in 0.5s: $((t2-t1)))" >&2
for r in $(seq "$rounds"); do
  for side in before after; do
    bin=$before; [ $side = after ] && bin=$after
    l0=$(cut -d' ' -f1-3 /proc/loadavg)
    "$bin" bench dag --controller "$ctl" --scheduler both --json "${extra[@]}" \
      | sed "s/^{/{\"build\":\"$side\",\"round\":$r,\"cluster\":\"prestarted\",\"load_before\":\"$l0\",/" >> "$out/runs.jsonl"
    echo "round $r $side load $l0 -> $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  done
done
