//! The frame reader (`vmlock_client::proto::FrameReader`) over a real socket: the input's first
//! byte picks the message type, the rest is what the peer sent before closing its end. Frames
//! are read until the reader refuses one or the connection ends; nothing may panic or wait.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vmlock_client::control::{ControlReply, ControlRequest};
use vmlock_client::proto::{FrameReader, Message, Push, Reply, Request};

/// More than the socket buffer would block the writer: inputs past this are cut.
const MAX_INPUT: usize = 64 << 10;

fn read_all<T: Message>(bytes: &[u8]) {
    let Ok((mut ours, mut peer)) = UnixStream::pair() else {
        return;
    };
    let _ = peer.write_all(&bytes[..bytes.len().min(MAX_INPUT)]);
    drop(peer);
    // A bug that waits would show as libFuzzer's timeout, not a hang of the whole run.
    let _ = ours.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reader = FrameReader::new();
    // Each successful read consumes at least the 4-byte header.
    for _ in 0..=bytes.len() / 4 {
        if reader.read::<T>(&ours).is_err() {
            break;
        }
    }
    let _ = &mut ours;
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    match kind % 5 {
        0 => read_all::<Request>(rest),
        1 => read_all::<Reply>(rest),
        2 => read_all::<Push>(rest),
        3 => read_all::<ControlRequest>(rest),
        _ => read_all::<ControlReply>(rest),
    }
});
