//! Kv repartitioning intents (the head of a directory block): any bytes must decode
//! to an intent or be rejected, never panic, and a decoded intent must re-encode to
//! the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    farpool::ds::fuzz_kv_intent(data);
});
