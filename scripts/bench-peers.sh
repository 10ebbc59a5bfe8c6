#!/usr/bin/env bash
# Runs the standard farpool benchmark matrix side by side with Redis and memcached on
# 127.0.0.1 and regenerates the tables of docs/BENCHMARKS.md.
#
# Usage: scripts/bench-peers.sh
#        scripts/bench-peers.sh --render-only docs/bench/peers-<date>.jsonl
#
# --render-only regenerates docs/BENCHMARKS.md from an earlier run's results (the
# `#` lines at the top of the file describe the machine and settings) and runs nothing.
#
# Environment:
#   BENCH_DURATION   measured seconds per run            (default 1.5)
#   BENCH_WARMUP     warm-up seconds per run             (default 0.5)
#   BENCH_REPEAT     runs per configuration              (default 3)
#   REDIS_PORT       port for the redis-server it starts (default 6399)
#   MEMCACHED_PORT   port for the memcached it starts    (default 11299)
#   FARPOOL_BIN      use this farpool binary instead of building one with cargo
#
# It installs redis-server and memcached with apt-get when they are missing, starts
# both on 127.0.0.1, runs every configuration with both peers in the same invocation
# (same clients, same pipeline depth), stops them, saves the raw JSON lines to
# docs/bench/peers-<date>.jsonl and rewrites the part of docs/BENCHMARKS.md between
# <!-- BEGIN GENERATED --> and <!-- END GENERATED -->.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

DURATION=${BENCH_DURATION:-1.5}
WARMUP=${BENCH_WARMUP:-0.5}
REPEAT=${BENCH_REPEAT:-3}
REDIS_PORT=${REDIS_PORT:-6399}
MEMCACHED_PORT=${MEMCACHED_PORT:-11299}
DOC="$ROOT/docs/BENCHMARKS.md"
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
JSONL="$ROOT/docs/bench/peers-$STAMP.jsonl"

log() { printf '[bench-peers] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

grep -q '<!-- BEGIN GENERATED -->' "$DOC" && grep -q '<!-- END GENERATED -->' "$DOC" ||
    die "$DOC lacks the <!-- BEGIN GENERATED --> / <!-- END GENERATED --> markers"

# Rewrites the generated section of docs/BENCHMARKS.md from the results file $1 with
# the farpool binary $2. The file's leading `# ` lines become the section's preamble.
render_doc() {
    local jsonl=$1 bin=$2 tables
    tables=$(mktemp)
    {
        sed -n 's/^# //p' "$jsonl"
        echo "Raw results: \`docs/bench/$(basename "$jsonl")\`."
        echo
        "$bin" bench --render "$jsonl"
    } >"$tables" || { rm -f "$tables"; die "cannot render $jsonl"; }
    awk -v tables="$tables" '
        /<!-- BEGIN GENERATED -->/ { print; while ((getline line < tables) > 0) print line; skip = 1; next }
        /<!-- END GENERATED -->/ { skip = 0 }
        !skip { print }
    ' "$DOC" >"$DOC.tmp"
    mv "$DOC.tmp" "$DOC"
    rm -f "$tables"
}

build_farpool() {
    if [[ -n ${FARPOOL_BIN:-} ]]; then
        BIN=$FARPOOL_BIN
    else
        log "building farpool (release)"
        cargo build --release --quiet --bin farpool
        BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/farpool"
    fi
    [[ -x $BIN ]] || die "farpool binary $BIN not found or not executable"
}

if [[ ${1:-} == --render-only ]]; then
    [[ -f ${2:-} ]] || die "usage: $0 --render-only docs/bench/peers-<date>.jsonl"
    build_farpool
    render_doc "$2" "$BIN"
    log "updated $DOC from $2"
    exit 0
fi

# --- peers: install ---------------------------------------------------------------
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v memcached >/dev/null || missing+=(memcached)
if ((${#missing[@]})); then
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    log "installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- farpool: build ---------------------------------------------------------------
build_farpool

# --- peers: start, and stop on exit -----------------------------------------------
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # name pid port
    local i
    for i in $(seq 1 100); do
        port_open "$3" && return 0
        kill -0 "$2" 2>/dev/null || die "$1 exited at start (is port $3 taken?)"
        sleep 0.1
    done
    die "$1 did not open port $3 within 10 s"
}

for port in "$REDIS_PORT" "$MEMCACHED_PORT"; do
    ! port_open "$port" || die "port $port is already in use; set REDIS_PORT / MEMCACHED_PORT"
done

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize no --loglevel warning &
PIDS+=($!)
wait_port redis-server "$!" "$REDIS_PORT"

MC_USER=()
[[ $(id -u) -ne 0 ]] || MC_USER=(-u root) # memcached refuses to run as root without -u
memcached "${MC_USER[@]}" -l 127.0.0.1 -p "$MEMCACHED_PORT" -t 4 -m 1024 -U 0 &
PIDS+=($!)
wait_port memcached "$!" "$MEMCACHED_PORT"

PEERS=(--peer "redis=127.0.0.1:$REDIS_PORT" --peer "memcached=127.0.0.1:$MEMCACHED_PORT")
COMMON=(--json --no-progress --duration "$DURATION" --warmup "$WARMUP" --repeat "$REPEAT")

mkdir -p "$(dirname "$JSONL")"
cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
{
    echo "# Generated by \`scripts/bench-peers.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'):"
    echo "# $(nproc) CPU cores (${cpu:-unknown CPU}), Linux $(uname -r), loopback;"
    echo "# $(redis-server --version | awk '{ print $1, $2, $3 }'), memcached $(memcached -V | awk '{ print $2 }');"
    echo "# ${DURATION} s measured after ${WARMUP} s warm-up, ${REPEAT} runs per configuration;"
    echo "# load average (1, 5, 15 min) before the runs: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown);"
} >"$JSONL"

run() { # args...
    log "farpool bench $*"
    "$BIN" bench "${COMMON[@]}" "$@" >>"$JSONL"
}

# --- the standard matrix: farpool (soft) vs Redis vs memcached ---------------------
for op in read write; do
    for size in 64 4096 65536; do
        for depth in 1 16; do
            for clients in 1 4; do
                run --op "$op" --size "$size" --depth "$depth" --clients "$clients" "${PEERS[@]}"
            done
        done
    done
done

# --- extra rows -------------------------------------------------------------------
# Atomics: FAA against INCRBY / incr; CAS has no comparable peer command.
run --op faa --depth 1 --clients 1 "${PEERS[@]}"
run --op faa --depth 16 --clients 4 "${PEERS[@]}"
run --op cas --depth 1 --clients 1
run --op cas --depth 16 --clients 4
# Shared-memory transport.
run --transport shm --op read --size 4096 --depth 1 --clients 1
run --transport shm --op read --size 4096 --depth 16 --clients 1
# Controller allocation (alloc one block + free it, per client).
run --op alloc --clients 1
run --op alloc --clients 4
# Memory node memory beyond its region with 64 clients connected.
run --op read --size 4096 --depth 1 --clients 64 --report-node-memory

echo "# load average after the runs: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)." >>"$JSONL"
cleanup
PIDS=()

# --- docs/BENCHMARKS.md -----------------------------------------------------------
render_doc "$JSONL" "$BIN"
log "wrote $JSONL and updated $DOC"
