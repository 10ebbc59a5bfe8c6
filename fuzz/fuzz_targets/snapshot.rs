//! Persistent-tier snapshots: any bytes must decode to a snapshot or a typed error,
//! never a panic, and a decoded snapshot must re-encode to bytes that decode to it.
#![no_main]

use farpool::ds::Snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = Snapshot::decode(data) {
        assert_eq!(Snapshot::decode(&s.encode()).as_ref(), Ok(&s));
    }
});
