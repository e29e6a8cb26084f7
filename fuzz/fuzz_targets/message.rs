//! JSON decoding of every message of vmlockd's protocol and of the supervisor's control socket
//! (a frame's body), without the socket: the input's first byte picks the type. A decoded
//! message must encode again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use vmlock_client::control::{ControlReply, ControlRequest};
use vmlock_client::proto::{EventBatch, Push, Reply, Request};

fn decode<T: DeserializeOwned + Serialize>(body: &[u8]) {
    if let Ok(msg) = serde_json::from_slice::<T>(body) {
        // Anything decoded is sendable: encoding it fails only on a bug.
        serde_json::to_vec(&msg).expect("a decoded message encodes");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 6 {
        0 => decode::<Request>(body),
        1 => decode::<Reply>(body),
        2 => decode::<Push>(body),
        3 => decode::<ControlRequest>(body),
        4 => decode::<ControlReply>(body),
        _ => decode::<EventBatch>(body),
    }
});
