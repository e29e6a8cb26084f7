//! virtlockd's reply decoding (`vmlock_bench::virtlockd_proto`, the bench's XDR client): the
//! input's first byte picks the call the reply answers (its procedure, and the byte itself as
//! the serial), the rest is what virtlockd sent: a length word (`frame_len`) and the frame's
//! other bytes (`decode_reply`), cut to that length as the client reads them. A reply that
//! decodes must encode (`encode_reply`) to a frame that decodes to the same outcome.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmlock_bench::virtlockd_proto::{
    decode_reply, encode_reply, frame_len, PROC_ACQUIRE, PROC_REGISTER, PROC_RELEASE,
};

fuzz_target!(|data: &[u8]| {
    let Some((&call, frame)) = data.split_first() else {
        return;
    };
    let procedure = [PROC_REGISTER, PROC_ACQUIRE, PROC_RELEASE][usize::from(call % 3)];
    let serial = u32::from(call);
    let Some((word, rest)) = frame.split_first_chunk::<4>() else {
        return;
    };
    let Ok(len) = frame_len(*word) else {
        return;
    };
    // The client reads exactly the frame's length; a shorter input is a connection closed early.
    let Some(rest) = rest.get(..len - 4) else {
        return;
    };
    let Ok(outcome) = decode_reply(rest, procedure, serial) else {
        return;
    };
    let again = encode_reply(procedure, serial, &outcome);
    let word = again[..4].try_into().expect("a length word");
    let len = frame_len(word).expect("an encoded reply's length is one the client reads");
    assert_eq!(len, again.len());
    let decoded = decode_reply(&again[4..], procedure, serial).expect("an encoded reply decodes");
    assert_eq!(decoded, outcome);
});
