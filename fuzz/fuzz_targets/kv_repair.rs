//! The Kv bucket repair planner (after a takeover of an expired bucket lock): any
//! bucket bytes and record bytes must plan without panicking, keep a subset of the
//! slots with each key at most once, and leave a body that needs no further repair.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    farpool::ds::fuzz_kv_repair(data);
});
