//! Shared test support: real sanlock daemons (the test kit's), one per simulated host, each with
//! a private SANLOCK_RUN_DIR, sharing lease files in a directory under /var/tmp (O_DIRECT needs a
//! real filesystem, not tmpfs), and drivers that joined their lockspace.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use vmlock::Plugin;
use vmlock_sanlock::{SanlockConfig, SanlockDriver};

/// The test lockspace's io_timeout: joins take ~3 s.
pub const IO_TIMEOUT: u32 = 1;

/// A sanlock daemon acting as one host (the test kit's), SIGKILLed and reaped by pid when dropped.
pub use vmlock_testkit::sanlock::SanlockDaemon as Daemon;

/// A temp dir under /var/tmp with `leases/` (shared storage) and `disks/`.
pub fn workdir() -> tempfile::TempDir {
    vmlock_testkit::sanlock::workdir("vmlock-sanlock-")
}

pub fn config(dir: &Path, daemon: &Daemon, host_id: u64) -> SanlockConfig {
    let mut c = SanlockConfig::new(dir.join("leases"), host_id);
    c.run_dir = daemon.run_dir.clone();
    c.io_timeout = IO_TIMEOUT;
    c.host_name = daemon.name.clone();
    c.join_timeout = Duration::from_secs(60);
    c
}

/// One host: its daemon and a driver that has joined the lockspace.
pub struct Host {
    pub driver: Arc<SanlockDriver>,
    pub plugin: Plugin,
    pub daemon: Daemon,
}

impl Host {
    pub fn start(dir: &Path, name: &str, host_id: u64) -> Self {
        let daemon = Daemon::start(dir, name);
        let driver =
            Arc::new(SanlockDriver::start(config(dir, &daemon, host_id)).expect("driver start"));
        let plugin = Plugin::from_driver(driver.clone());
        Host {
            driver,
            plugin,
            daemon,
        }
    }

    pub fn wait_joined(&self) {
        self.driver
            .wait_joined(Duration::from_secs(60))
            .expect("lockspace joined");
    }

    /// Waits (bounded) until this host has seen `host_id` renew its delta lease (state LIVE).
    pub fn wait_sees_live(&self, host_id: u64) {
        self.daemon
            .wait_sees_live(&self.driver.config().lockspace, host_id);
    }
}
