#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 60) from a scratch copy of its
# committed seed corpus, so the committed corpus stays small and reviewed.
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`); libFuzzer's instrumentation
# flags are unstable, so RUSTC_BOOTSTRAP lets the stable toolchain build them.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
# libfuzzer-sys compiles libFuzzer (C++): install a compiler when there is none.
if ! command -v c++ >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
fi
command -v c++ >/dev/null || { echo "fuzz.sh: needs a C++ compiler (g++ or clang++) for libFuzzer"; exit 1; }
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failed=0
ran=0
run() { # crate-dir target
  local dir="$1" target="$2"
  mkdir -p "$scratch/$target"
  cp -r "$dir/corpus/$target/." "$scratch/$target/" 2>/dev/null || true
  echo "== fuzz $target for ${secs}s"
  ran=$((ran + 1))
  if ! (cd "$dir" && cargo fuzz run "$target" "$scratch/$target" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1); then
    echo "fuzz target $target FAILED (crash input under $dir/artifacts/$target)"
    failed=$((failed + 1))
  fi
}
run fuzz control_frame
run fuzz metadata_log
run rdma/fuzz soft_frame
run fuzz snapshot
run fuzz kv_intent
run fuzz kv_cached
run fuzz kv_repair
run fuzz dag_frame
run fuzz token
echo "fuzzing: $((ran - failed)) passed, $failed failed"
[ "$failed" -eq 0 ]
