//! DAG worker frames (invoker <-> `farpool worker`, pipes or TCP): any bytes must
//! decode to a message, "need more bytes" or a typed error, never a panic, and a
//! decoded message must re-encode to a frame that decodes to it again.
#![no_main]

use farpool::dag::wire::{decode_reply, decode_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((m, n))) = decode_request(data) {
        assert!(n <= data.len());
        let frame = m.encode().expect("a decoded request re-encodes");
        let again = decode_request(&frame).expect("re-decodes").expect("whole");
        assert_eq!(again.0, m);
    }
    if let Ok(Some((m, n))) = decode_reply(data) {
        assert!(n <= data.len());
        let frame = m.encode().expect("a decoded reply re-encodes");
        let again = decode_reply(&frame).expect("re-decodes").expect("whole");
        assert_eq!(again.0, m);
    }
});
