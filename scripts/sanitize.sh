#!/usr/bin/env bash
# Runs the transport crate's tests (the only crate with `unsafe`: region, shm and buffer
# code) under AddressSanitizer. Miri cannot run them (mmap, sockets, threads), so ASan
# is the practical check. The sanitizer flag is unstable; RUSTC_BOOTSTRAP lets the
# stable toolchain accept it for this run only.
set -euo pipefail
cd "$(dirname "$0")/.."
target="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/asan"
export RUSTC_BOOTSTRAP=1
export RUSTFLAGS="-Zsanitizer=address"
export RUSTDOCFLAGS="-Zsanitizer=address"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1"
cargo test -p farpool-rdma --target "$target" --lib --tests
