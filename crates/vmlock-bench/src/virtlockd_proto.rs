//! virtlockd's socket protocol as the bench speaks it: libvirt RPC framing with XDR bodies,
//! program 0x0EA7BEEF (written from the protocol description, no libvirt code). Pure functions
//! over bytes: the call frames and bodies the bench sends, and the decoding of virtlockd's
//! replies, which `fuzz/fuzz_targets/virtlockd_reply.rs` fuzzes. The socket calls are in the
//! bench's `sys_virtlockd`.
//!
//! A frame is a big-endian length word (the whole frame, itself included), then six header words
//! (program, version, procedure, type, serial, status), then the XDR body. A reply whose status
//! is not 0 carries a `remote_error` (code, domain, optional message, ...).

use anyhow::{ensure, Context, Result};

/// The lock daemon's RPC program.
pub const PROGRAM: u32 = 0x0EA7_BEEF;
/// The program's version.
pub const VERSION: u32 = 1;
/// `REGISTER`: names the owner (a UUID, a name, an id and a pid) of the connection's locks.
pub const PROC_REGISTER: u32 = 1;
/// `ACQUIRE_RESOURCE`.
pub const PROC_ACQUIRE: u32 = 6;
/// `RELEASE_RESOURCE`.
pub const PROC_RELEASE: u32 = 7;
/// `VIR_ERR_RESOURCE_BUSY`: the resource is held by another owner.
pub const ERR_BUSY: i32 = 87;
/// The length word and the six header words.
pub const HEADER_LEN: usize = 28;
/// The longest reply frame the client reads.
pub const MAX_FRAME: usize = 1 << 20;
/// The header's type word of a call.
const TYPE_CALL: u32 = 0;
/// The header's type word of a reply.
const TYPE_REPLY: u32 = 1;
/// The header's status word of a reply that carries a `remote_error`.
const STATUS_ERROR: u32 = 1;
/// libvirt's `VIR_ERR_ERROR` level, written in the error replies [`encode_reply`] makes.
const LEVEL_ERROR: u32 = 2;

/// An error reply: virtlockd refused the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    /// libvirt's error code (`virErrorNumber`), e.g. [`ERR_BUSY`].
    pub code: i32,
    /// The error's message; empty when the reply has none (or a truncated one).
    pub message: String,
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "virtlockd error {}: {}", self.code, self.message)
    }
}

impl std::error::Error for RemoteError {}

/// Appends an XDR unsigned int.
pub fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_be_bytes());
}

/// Appends an XDR string: its length, its bytes, zeros to a multiple of four.
pub fn put_string(b: &mut Vec<u8>, s: &str) {
    put_u32(b, s.len() as u32);
    b.extend_from_slice(s.as_bytes());
    while b.len() % 4 != 0 {
        b.push(0);
    }
}

/// Reads an XDR unsigned int at `*at` and moves past it.
pub fn get_u32(b: &[u8], at: &mut usize) -> Result<u32> {
    let v = b
        .get(*at..at.saturating_add(4))
        .context("short XDR body")?
        .try_into()
        .map(u32::from_be_bytes)?;
    *at += 4;
    Ok(v)
}

/// The whole frame of a call of `procedure` with `serial` and the XDR `body`.
pub fn encode_call(procedure: u32, serial: u32, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER_LEN + body.len());
    put_u32(&mut f, (HEADER_LEN + body.len()) as u32);
    for w in [PROGRAM, VERSION, procedure, TYPE_CALL, serial, 0] {
        put_u32(&mut f, w);
    }
    f.extend_from_slice(body);
    f
}

/// `REGISTER`'s body: the owner's UUID, name, id (virtlockd refuses 0: the bench sends 1) and
/// pid, no flags.
pub fn register_body(uuid: &[u8; 16], name: &str, pid: u32) -> Vec<u8> {
    let mut b = uuid.to_vec();
    put_string(&mut b, name);
    put_u32(&mut b, 1);
    put_u32(&mut b, pid);
    put_u32(&mut b, 0);
    b
}

/// `ACQUIRE_RESOURCE`'s and `RELEASE_RESOURCE`'s body: the default lockspace (its resource
/// names are absolute file paths), `path`, and no flags (exclusive, no autocreate).
pub fn resource_body(path: &str) -> Vec<u8> {
    let mut b = Vec::new();
    put_string(&mut b, "");
    put_string(&mut b, path);
    put_u32(&mut b, 0);
    b
}

/// The length of a reply frame (length word included) from its first four bytes, if the client
/// reads such a frame: at least a header, at most [`MAX_FRAME`].
pub fn frame_len(word: [u8; 4]) -> Result<usize> {
    let len = u32::from_be_bytes(word) as usize;
    ensure!(
        (HEADER_LEN..=MAX_FRAME).contains(&len),
        "bad virtlockd frame length {len}"
    );
    Ok(len)
}

/// Decodes a reply frame after its length word (`rest`: the frame's other `len - 4` bytes) to the
/// call of `procedure` with `serial`: `Ok(Ok(()))` for success, `Ok(Err(_))` for virtlockd's
/// error, `Err(_)` for a frame that is not a reply to that call or is cut short.
pub fn decode_reply(
    rest: &[u8],
    procedure: u32,
    serial: u32,
) -> Result<std::result::Result<(), RemoteError>> {
    let mut at = 0;
    let mut words = [0u32; 6];
    for w in &mut words {
        *w = get_u32(rest, &mut at)?;
    }
    ensure!(
        words[0] == PROGRAM && words[2] == procedure && words[4] == serial,
        "reply does not match the call: {words:?}"
    );
    if words[5] == 0 {
        return Ok(Ok(()));
    }
    let code = get_u32(rest, &mut at)? as i32;
    let _domain = get_u32(rest, &mut at)?;
    let mut message = String::new();
    if get_u32(rest, &mut at)? == 1 {
        let n = get_u32(rest, &mut at)? as usize;
        let bytes = rest.get(at..at.saturating_add(n)).unwrap_or_default();
        message = String::from_utf8_lossy(bytes).into_owned();
    }
    Ok(Err(RemoteError { code, message }))
}

/// The whole reply frame virtlockd sends for `outcome` of the call of `procedure` with `serial`
/// (an error's `remote_error` with its message, level `VIR_ERR_ERROR` and no other fields): for
/// tests and the fuzz target's seed corpus.
pub fn encode_reply(
    procedure: u32,
    serial: u32,
    outcome: &std::result::Result<(), RemoteError>,
) -> Vec<u8> {
    let mut body = Vec::new();
    let status = match outcome {
        Ok(()) => 0,
        Err(e) => {
            put_u32(&mut body, e.code as u32);
            put_u32(&mut body, 0); // domain
            put_u32(&mut body, 1); // message: present
            put_string(&mut body, &e.message);
            put_u32(&mut body, LEVEL_ERROR);
            put_u32(&mut body, 0); // dom: absent
            for _ in 0..3 {
                put_u32(&mut body, 0); // str1, str2, str3: absent
            }
            put_u32(&mut body, 0); // int1
            put_u32(&mut body, 0); // int2
            put_u32(&mut body, 0); // net: absent
            STATUS_ERROR
        }
    };
    let mut f = Vec::with_capacity(HEADER_LEN + body.len());
    put_u32(&mut f, (HEADER_LEN + body.len()) as u32);
    for w in [PROGRAM, VERSION, procedure, TYPE_REPLY, serial, status] {
        put_u32(&mut f, w);
    }
    f.extend_from_slice(&body);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits a whole frame as the client reads it: the length word, then the rest.
    fn read(frame: &[u8]) -> (usize, &[u8]) {
        let word = frame[..4].try_into().expect("a length word");
        (frame_len(word).expect("a good length"), &frame[4..])
    }

    #[test]
    fn a_call_frame_is_length_header_body() {
        let body = resource_body("/d");
        let f = encode_call(PROC_ACQUIRE, 5, &body);
        assert_eq!(f.len(), HEADER_LEN + 16);
        let words: Vec<u32> = f
            .chunks(4)
            .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")))
            .collect();
        // length, program, version, procedure, call, serial, status; "" ; "/d" padded; flags
        assert_eq!(
            words,
            [
                44,
                PROGRAM,
                1,
                6,
                0,
                5,
                0,
                0,
                2,
                u32::from_be_bytes(*b"/d\0\0"),
                0
            ]
        );
        let reg = register_body(&[7; 16], "abcde", 42);
        assert_eq!(reg.len(), 16 + 4 + 8 + 12);
        assert_eq!(&reg[16..20], &5u32.to_be_bytes());
        assert_eq!(&reg[reg.len() - 8..], &[0, 0, 0, 42, 0, 0, 0, 0]);
    }

    #[test]
    fn replies_decode_to_what_was_encoded() {
        let ok = encode_reply(PROC_REGISTER, 0, &Ok(()));
        let (len, rest) = read(&ok);
        assert_eq!(len, ok.len());
        assert_eq!(
            decode_reply(rest, PROC_REGISTER, 0).expect("decodes"),
            Ok(())
        );
        for message in ["", "a", "resource busy: held by another owner"] {
            let err = RemoteError {
                code: ERR_BUSY,
                message: message.into(),
            };
            let f = encode_reply(PROC_ACQUIRE, 9, &Err(err.clone()));
            let (len, rest) = read(&f);
            assert_eq!(len, f.len());
            assert_eq!(
                decode_reply(rest, PROC_ACQUIRE, 9).expect("decodes"),
                Err(err)
            );
        }
    }

    #[test]
    fn replies_to_another_call_or_cut_short_are_refused() {
        let f = encode_reply(PROC_ACQUIRE, 3, &Ok(()));
        let rest = &f[4..];
        assert!(decode_reply(rest, PROC_RELEASE, 3).is_err());
        assert!(decode_reply(rest, PROC_ACQUIRE, 4).is_err());
        let mut other = rest.to_vec();
        other[0] ^= 1;
        assert!(decode_reply(&other, PROC_ACQUIRE, 3).is_err());
        for cut in 0..rest.len() {
            assert!(
                decode_reply(&rest[..cut], PROC_ACQUIRE, 3).is_err(),
                "{cut}"
            );
        }
        // An error reply cut before its message word is refused; one cut inside the message's
        // bytes is an error with no message.
        let err = RemoteError {
            code: 1,
            message: "gone".into(),
        };
        let f = encode_reply(PROC_RELEASE, 0, &Err(err));
        let rest = &f[4..];
        let message_at = HEADER_LEN - 4 + 12;
        for cut in HEADER_LEN - 4..message_at + 4 {
            assert!(
                decode_reply(&rest[..cut], PROC_RELEASE, 0).is_err(),
                "{cut}"
            );
        }
        let cut = decode_reply(&rest[..message_at + 6], PROC_RELEASE, 0).expect("decodes");
        assert_eq!(
            cut,
            Err(RemoteError {
                code: 1,
                message: String::new()
            })
        );
    }

    #[test]
    fn frame_lengths_outside_the_client_s_bounds_are_refused() {
        for len in [0u32, 4, 27, (MAX_FRAME + 1) as u32, u32::MAX] {
            assert!(frame_len(len.to_be_bytes()).is_err(), "{len}");
        }
        for len in [28u32, 100, MAX_FRAME as u32] {
            assert_eq!(frame_len(len.to_be_bytes()).expect("good"), len as usize);
        }
    }

    #[test]
    fn a_message_longer_than_the_frame_is_no_message() {
        let mut f = encode_reply(PROC_ACQUIRE, 0, &Ok(()))[4..].to_vec();
        f[20..24].copy_from_slice(&1u32.to_be_bytes());
        for w in [ERR_BUSY as u32, 0, 1, u32::MAX] {
            put_u32(&mut f, w);
        }
        let got = decode_reply(&f, PROC_ACQUIRE, 0).expect("decodes");
        assert_eq!(
            got,
            Err(RemoteError {
                code: ERR_BUSY,
                message: String::new()
            })
        );
    }
}
