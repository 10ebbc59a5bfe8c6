//! Feeds arbitrary bytes to the soft transport's frame decoders: they must never panic,
//! and whatever decodes must re-encode to the same bytes.
//!
//! `cargo +nightly fuzz run soft_frame` (from `rdma/`), seeded from
//! `fuzz/corpus/soft_frame/`.

#![no_main]

use farpool_rdma::soft::frame::{
    decode_client_hello, decode_error, decode_request, decode_request_header, decode_response,
    decode_response_header, decode_server_hello, encode_error, CLIENT_HELLO_LEN, MAX_ERROR_PAYLOAD,
    REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN, SERVER_HELLO_LEN, STATUS_OK,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A stream of requests, as the server's input loop consumes it.
    let mut rest = data;
    while let Ok(Some((h, len))) = decode_request(rest) {
        assert!(len >= REQUEST_HEADER_LEN && len <= rest.len());
        assert_eq!(h.encode()[..], rest[..REQUEST_HEADER_LEN]);
        rest = &rest[len..];
    }
    if let Ok(Some(h)) = decode_request_header(data) {
        assert_eq!(h.encode()[..], data[..REQUEST_HEADER_LEN]);
    }

    // A stream of responses, as the client's receive loop consumes it.
    let mut rest = data;
    while let Ok(Some((h, len))) = decode_response(rest) {
        assert_eq!(len, RESPONSE_HEADER_LEN + h.len as usize);
        assert_eq!(h.encode()[..], rest[..RESPONSE_HEADER_LEN]);
        if h.status != STATUS_OK {
            let payload = &rest[RESPONSE_HEADER_LEN..len];
            if let Ok(e) = decode_error(h.status, payload) {
                let mut out = [0u8; MAX_ERROR_PAYLOAD];
                let (status, n) = encode_error(&e, &mut out);
                assert_eq!(status, h.status);
                assert_eq!(n, payload.len());
            }
        }
        rest = &rest[len..];
    }
    let _ = decode_response_header(data);

    if let Some(b) = data.get(..CLIENT_HELLO_LEN).and_then(|b| b.try_into().ok()) {
        let _ = decode_client_hello(b);
    }
    if let Some(b) = data.get(..SERVER_HELLO_LEN).and_then(|b| b.try_into().ok()) {
        let _ = decode_server_hello(b);
    }
    if let Some((&status, payload)) = data.split_first() {
        let _ = decode_error(status, &payload[..payload.len().min(40)]);
    }
});
