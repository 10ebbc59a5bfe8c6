//! Kv cached-get validation: a cached location, a key, a bucket image and record bytes;
//! any bytes must be accepted or rejected without a panic, and an accepted record must
//! be one the (unfrozen) bucket points at and that holds the key.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    farpool::ds::fuzz_kv_cached(data);
});
