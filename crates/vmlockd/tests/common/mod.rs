//! Shared test support: a real vmlockd process in a private runtime directory (the test kit's
//! [`Vmlockd`]), with this crate's views of it.
#![allow(dead_code)]

use std::ops::{Deref, DerefMut};
use std::path::Path;
use vmlock_client::runtime::RuntimeDir;
use vmlock_client::Endpoint;
use vmlock_testkit::vmlockd::Vmlockd;

/// A running vmlockd, killed (SIGKILL) and reaped by pid when dropped.
pub struct Daemon(Vmlockd);

impl Daemon {
    pub fn start() -> Self {
        Self::start_with_config(None)
    }

    pub fn start_with_config(config: Option<&str>) -> Self {
        Daemon(Vmlockd::start(
            Path::new(env!("CARGO_BIN_EXE_vmlockd")),
            config,
        ))
    }

    pub fn runtime(&self) -> RuntimeDir {
        RuntimeDir::resolve(Some(&self.0.run_dir())).expect("runtime dir")
    }

    pub fn endpoint(&self) -> Endpoint {
        let mut e = Endpoint::new(self.runtime());
        e.auto_start = false;
        e
    }
}

impl Deref for Daemon {
    type Target = Vmlockd;
    fn deref(&self) -> &Vmlockd {
        &self.0
    }
}

impl DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Vmlockd {
        &mut self.0
    }
}

/// A real daemon and the `lockd` driver talking to it, as the conformance kit's harness.
pub struct Fixture {
    pub daemon: Daemon,
    pub plugin: vmlock::Plugin,
}

impl Fixture {
    pub fn new(daemon: Daemon) -> Self {
        let plugin = vmlock::Plugin::from_driver(std::sync::Arc::new(
            vmlock_client::driver::LockdDriver::new(daemon.endpoint()),
        ));
        Fixture { daemon, plugin }
    }
}

impl vmlock::conformance::Harness for Fixture {
    fn plugin(&self) -> vmlock::Plugin {
        self.plugin.clone()
    }
    fn disk_dir(&self) -> &Path {
        self.daemon.disk_dir()
    }
}

/// True if some other description holds a lock on byte 0 of `path` (asked from this process,
/// through a description of its own, as any outsider would).
pub fn locked_by_someone(path: &Path) -> bool {
    use std::os::fd::AsFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open the disk");
    vmlock_sys::ofd::probe(file.as_fd(), vmlock_sys::ofd::LockKind::Exclusive, 0, 1)
        .expect("probe")
        .is_some()
}

/// A connection that said hello; reads fail after 10 s instead of hanging the test.
pub fn raw_connection(socket: &Path) -> std::os::unix::net::UnixStream {
    use vmlock_client::proto::{write_frame, Reply, Request, PROTOCOL_VERSION};
    let s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    write_frame(
        &s,
        &Request::Hello {
            version: PROTOCOL_VERSION,
        },
        &[],
    )
    .expect("hello");
    assert!(matches!(read_reply(&s), Some(Reply::Hello { .. })));
    s
}

/// The next reply on `s`, if one comes.
pub fn read_reply(s: &std::os::unix::net::UnixStream) -> Option<vmlock_client::proto::Reply> {
    vmlock_client::proto::read_frame::<vmlock_client::proto::Reply>(s)
        .ok()
        .map(|(r, _)| r)
}

/// Starts VM `name` with `guest` and `disks` through the API (a holder thread in this process).
pub fn start(
    f: &Fixture,
    name: &str,
    guest: &vmlock::conformance::Guest,
    disks: &[vmlock::Resource],
) -> vmlock::Result<vmlock::Manager> {
    vmlock::domain::process_start(
        &f.plugin,
        vmlock::conformance::vm(name, guest),
        disks.iter().cloned(),
        &vmlock::AcquireOptions::default(),
    )
}
