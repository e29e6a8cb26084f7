//! sanlock's reply decoding (`vmlock_sanlock::proto`): the header, the bodies the driver reads
//! (`GET_HOSTS`, `READ_RESOURCE`, `INQUIRE`) and the inquire state string. The input is a
//! header followed by a body, as the daemon would send them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmlock_sanlock::proto::{
    decode_hosts, decode_inquire, decode_read_resource, decode_reply_header, parse_state,
    REPLY_HEADER_LEN,
};

fuzz_target!(|data: &[u8]| {
    let (header, body) = data.split_at(data.len().min(REPLY_HEADER_LEN));
    let count = match decode_reply_header(header) {
        Ok(reply) => {
            let _ = reply.body_len();
            reply.data2
        }
        Err(_) => u32::MAX,
    };
    let hosts = decode_hosts(body, count);
    assert!(hosts.len() <= body.len() / 8);
    let _ = decode_read_resource(body);
    let state = decode_inquire(body);
    let _ = parse_state(&state);
});
