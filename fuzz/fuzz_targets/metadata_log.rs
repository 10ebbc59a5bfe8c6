//! Feeds arbitrary bytes to the controller's on-disk metadata decoders (log and
//! snapshot): they must return records or errors, never panic or allocate without
//! bound. A successfully decoded log must re-encode to the same intact prefix.
#![no_main]

use farpool::controller::journal::{decode_log, decode_snapshot, encode_record, LOG_MAGIC};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(log) = decode_log(data) {
        assert!(log.valid_len as usize <= data.len());
        assert_eq!(log.valid_len + log.torn_bytes, data.len() as u64);
        if !log.records.is_empty() {
            let mut again = LOG_MAGIC.to_vec();
            for r in &log.records {
                again.extend(encode_record(r).expect("a decoded record encodes"));
            }
            assert_eq!(&again[..], &data[..log.valid_len as usize]);
        }
    }
    let _ = decode_snapshot(data);
});
