//! Feeds arbitrary bytes to every control-plane decoder: they must return errors,
//! never panic or allocate without bound.
#![no_main]

use farpool::proto::frame::{decode, read_msg};
use farpool::proto::{ControllerMsg, Envelope, Hello, NodeMsg, PoolPath, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode::<Hello>(data);
    let _ = decode::<Envelope<Request>>(data);
    let _ = decode::<Envelope<Response>>(data);
    let _ = decode::<NodeMsg>(data);
    let _ = decode::<ControllerMsg>(data);
    let _ = read_msg::<Envelope<Request>>(&mut &data[..]);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = PoolPath::parse(s);
    }
});
