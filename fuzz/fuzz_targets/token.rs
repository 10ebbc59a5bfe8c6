//! Feeds arbitrary text to the client-token decoder (what a controller runs on every
//! client hello): it must return errors, never panic; whatever decodes must fail
//! verification under a key it was not issued with.
#![no_main]

use farpool::proto::{ClusterKey, Token};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(t) = Token::decode(s) {
            let _ = t.verify(&ClusterKey::from_bytes([0x5a; 16]), 0);
        }
    }
});
