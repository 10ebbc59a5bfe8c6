//! The fuzz seed corpus (`fuzz/corpus/soft_frame/`) must stay valid: each seed decodes
//! as what its name says, so protocol changes cannot silently leave fuzzing with
//! seeds that are rejected at the first byte.

use std::path::Path;

use farpool_rdma::soft::frame::{
    decode_client_hello, decode_error, decode_request, decode_response, decode_server_hello,
    CLIENT_HELLO_LEN, SERVER_HELLO_LEN, STATUS_OK,
};

fn seed(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus/soft_frame")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Decodes a whole stream of requests; returns the op codes.
fn requests(mut b: &[u8]) -> Vec<u8> {
    let mut ops = Vec::new();
    while let Some((h, len)) = decode_request(b).unwrap() {
        ops.push(h.op);
        b = &b[len..];
    }
    assert!(b.is_empty(), "trailing bytes");
    ops
}

/// Decodes a whole stream of responses; returns the statuses.
fn responses(mut b: &[u8]) -> Vec<u8> {
    let mut st = Vec::new();
    while let Some((h, len)) = decode_response(b).unwrap() {
        if h.status != STATUS_OK {
            decode_error(h.status, &b[16..len]).unwrap();
        }
        st.push(h.status);
        b = &b[len..];
    }
    assert!(b.is_empty(), "trailing bytes");
    st
}

#[test]
fn seeds_decode() {
    let hello: [u8; CLIENT_HELLO_LEN] = seed("client_hello").try_into().unwrap();
    decode_client_hello(&hello).unwrap();
    let hello: [u8; SERVER_HELLO_LEN] = seed("server_hello").try_into().unwrap();
    assert_eq!(decode_server_hello(&hello).unwrap(), 1 << 20);
    assert_eq!(requests(&seed("req_read_4k")), [1]);
    assert_eq!(requests(&seed("req_write_16")), [2]);
    assert_eq!(requests(&seed("req_cas")), [3]);
    assert_eq!(requests(&seed("req_faa")), [4]);
    assert_eq!(requests(&seed("req_pipeline")), [1, 4, 2, 9]);
    assert_eq!(responses(&seed("resp_read_ok")), [0]);
    assert_eq!(responses(&seed("resp_faa_ok")), [0]);
    assert_eq!(responses(&seed("resp_errors")), [1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(decode_request(&seed("truncated_header")), Ok(None));
}
