//! The conformance kit against the `lockd` driver and a real vmlockd process.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::sync::Arc;
use vmlock::conformance::Harness;
use vmlock::Plugin;
use vmlock_client::driver::LockdDriver;

struct Lockd {
    daemon: common::Daemon,
    plugin: Plugin,
}

impl Harness for Lockd {
    fn plugin(&self) -> Plugin {
        self.plugin.clone()
    }
    fn disk_dir(&self) -> &Path {
        self.daemon.disk_dir()
    }
}

fn lockd() -> Lockd {
    let daemon = common::Daemon::start();
    let plugin = Plugin::from_driver(Arc::new(LockdDriver::new(daemon.endpoint())));
    Lockd { daemon, plugin }
}

vmlock::conformance_tests!(lockd());
