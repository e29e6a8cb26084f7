//! The conformance kit against the `sanlock` driver and a real sanlock daemon (one host).

mod common;

use std::path::Path;
use vmlock::conformance::Harness;
use vmlock::Plugin;

struct Sanlock {
    // Dropped in this order: the driver, then the daemon (SIGKILL), then the directory.
    host: common::Host,
    dir: tempfile::TempDir,
}

impl Harness for Sanlock {
    fn plugin(&self) -> Plugin {
        self.host.plugin.clone()
    }
    fn disk_dir(&self) -> &Path {
        // Canonical, so that the kit's paths and the driver's lease names agree.
        self.dir.path()
    }
}

fn sanlock() -> Sanlock {
    let dir = common::workdir();
    let host = common::Host::start(dir.path(), "host-a", 1);
    host.wait_joined();
    Sanlock { host, dir }
}

vmlock::conformance_tests!(sanlock());
