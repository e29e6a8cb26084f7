//! Sending and receiving file descriptors with `SCM_RIGHTS` over a UNIX stream socket.

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Most descriptors one `sendmsg` carries (the kernel's `SCM_MAX_FD` is 253).
pub const MAX_FDS: usize = 250;

/// The kernel's own bound per message: receive room for this many, so a peer that sends the
/// most the kernel allows never makes us drop (truncate) what it sent.
const SCM_MAX_FD: usize = 253;

/// Writes all of `data` with `fds` attached, any number of them. One `sendmsg` carries at most
/// [`MAX_FDS`], so with more, `data` is cut into as many consecutive pieces, each sent with its
/// share of the descriptors on its first byte. A stream socket delivers them in order, and the
/// kernel never merges two messages that carry descriptors into one `recvmsg`, so a reader that
/// gives every descriptor to the data it arrived with sees them all inside `data`.
pub fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let pieces = fds.len().div_ceil(MAX_FDS).max(1);
    if data.len() < pieces {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors need at least {pieces} bytes to travel with",
                fds.len()
            ),
        ));
    }
    let size = data.len() / pieces;
    for (i, piece_fds) in fds
        .chunks(MAX_FDS)
        .chain(std::iter::repeat(&[][..]))
        .take(pieces)
        .enumerate()
    {
        let end = if i + 1 == pieces {
            data.len()
        } else {
            (i + 1) * size
        };
        send_piece(stream, &data[i * size..end], piece_fds)?;
    }
    Ok(())
}

/// Writes all of `data`, attaching `fds` (at most [`MAX_FDS`]) to its first byte.
fn send_piece(stream: &UnixStream, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut sent = 0;
    while sent < data.len() {
        let iov = [IoSlice::new(&data[sent..])];
        let cmsgs: &[ControlMessage<'_>] = if sent == 0 && !fds.is_empty() {
            &[ControlMessage::ScmRights(fds)]
        } else {
            &[]
        };
        match sendmsg::<()>(
            stream.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads up to `buf.len()` bytes; descriptors that arrive are appended to `fds` (close-on-exec).
/// Returns 0 at end of stream. With `dont_wait`, fails with `WouldBlock` instead of waiting.
/// Descriptors that arrive belong to the last byte read: the kernel ends a `recvmsg` right after
/// data that carried descriptors.
pub fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    dont_wait: bool,
) -> std::io::Result<usize> {
    let mut space = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        match recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            if dont_wait {
                MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT
            } else {
                MsgFlags::MSG_CMSG_CLOEXEC
            },
        ) {
            Ok(msg) => {
                for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        for raw in received {
                            // SAFETY: the kernel just installed `raw` in our table for us alone.
                            fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                        }
                    }
                }
                if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "too many descriptors in one message",
                    ));
                }
                return Ok(msg.bytes);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_descriptors_than_one_message_carries_arrive_inside_the_data() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = OwnedFd::from(tempfile::tempfile().unwrap());
        let fds: Vec<OwnedFd> = (0..600).map(|_| file.try_clone().unwrap()).collect();
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let data = vec![7u8; 1000];
        send_with_fds(&a, &data, &raw).unwrap();
        let (mut got, mut bytes) = (Vec::new(), 0);
        let mut buf = [0u8; 4096];
        while bytes < data.len() {
            bytes += recv_with_fds(&b, &mut buf, &mut got, false).unwrap();
        }
        assert_eq!(bytes, 1000);
        assert_eq!(got.len(), 600);
        // Too little data to carry them is refused, not truncated.
        let e = send_with_fds(&a, &[1, 2], &raw).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    }
}
