//! The floors: an in-process OFD lock + unlock, and bare request/response over a UNIX socket to a
//! separate echo process (one thread per connection, as vmlockd serves).

use crate::util::{self, Fast, Op, Proc};
use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;

/// A request about as large as a vmlockd acquire of one disk.
const BODY: usize = 160;

/// The echo server (runs as `vmlock-bench internal-echo SOCKET`): answers each length-prefixed
/// frame with a frame of the same size.
pub fn echo_server(socket: &Path) -> Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    let mut out = std::io::stdout();
    writeln!(out, "READY")?;
    out.flush()?;
    for stream in listener.incoming() {
        let Ok(mut s) = stream else { continue };
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4 << 10];
            loop {
                let mut hdr = [0u8; 4];
                if s.read_exact(&mut hdr).is_err() {
                    return;
                }
                let len = (u32::from_be_bytes(hdr) as usize).min(buf.len());
                if s.read_exact(&mut buf[..len]).is_err() {
                    return;
                }
                let mut reply = Vec::with_capacity(4 + len);
                reply.extend_from_slice(&hdr);
                reply.extend_from_slice(&buf[..len]);
                if s.write_all(&reply).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

fn round_trip(s: &mut UnixStream, frame: &[u8], buf: &mut [u8]) -> Result<()> {
    s.write_all(frame)?;
    s.read_exact(buf)?;
    Ok(())
}

fn ofd_op(f: &File) -> Result<()> {
    anyhow::ensure!(util::ofd_try_lock(f)?, "OFD floor: lock unexpectedly busy");
    util::ofd_unlock(f)
}

fn open(p: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .with_context(|| format!("opening {}", p.display()))
}

/// The OFD floor: lock and unlock byte 0 of a file in this process, 16 files for 16 threads.
pub fn ofd_fast(dir: &Path) -> Result<Fast> {
    let disks = util::make_disks(&dir.join("ofd"), "f", 17)?;
    let f = open(&disks[0])?;
    let single: Op = Box::new(move || ofd_op(&f));
    let mut conc: Vec<Op> = Vec::new();
    for p in &disks[1..] {
        let f = open(p)?;
        conc.push(Box::new(move || ofd_op(&f)));
    }
    Ok(Fast {
        single,
        conc,
        guard: Box::new(()),
    })
}

/// The socket floor: two request/response round trips (as an acquire and a release are two
/// requests) with an echo server in another process.
pub fn sock_fast(dir: &Path) -> Result<Fast> {
    std::fs::create_dir_all(dir)?;
    let sock = dir.join("echo.sock");
    let exe = std::env::current_exe().context("current exe")?;
    let mut server = Proc::spawn(
        "echo server",
        Command::new(exe).arg("internal-echo").arg(&sock),
    )?;
    server.wait_line("READY")?;
    let mut frame = (BODY as u32).to_be_bytes().to_vec();
    frame.resize(4 + BODY, b'x');
    let op = |frame: Vec<u8>| -> Result<Op> {
        let mut s = UnixStream::connect(&sock)?;
        let mut buf = vec![0u8; frame.len()];
        Ok(Box::new(move || {
            round_trip(&mut s, &frame, &mut buf)?;
            round_trip(&mut s, &frame, &mut buf)
        }))
    };
    let single = op(frame.clone())?;
    let conc = (0..16).map(|_| op(frame.clone())).collect::<Result<_>>()?;
    Ok(Fast {
        single,
        conc,
        guard: Box::new(server),
    })
}
