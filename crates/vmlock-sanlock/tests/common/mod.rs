//! Shared test support: real sanlock daemons, one per simulated host, each with a private
//! SANLOCK_RUN_DIR, sharing lease files in a directory under /var/tmp (O_DIRECT needs a real
//! filesystem, not tmpfs).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmlock::Plugin;
use vmlock_sanlock::proto::{Client, HostState};
use vmlock_sanlock::{SanlockConfig, SanlockDriver};

/// The test lockspace's io_timeout: joins take ~3 s.
pub const IO_TIMEOUT: u32 = 1;

/// A sanlock daemon acting as one host; SIGKILLed and reaped by pid when dropped.
pub struct Daemon {
    pub name: String,
    pub run_dir: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    pub fn start(base: &Path, name: &str) -> Self {
        let run_dir = base.join(format!("run-{name}"));
        std::fs::create_dir_all(&run_dir).expect("create run dir");
        let log = std::fs::File::create(base.join(format!("sanlock-{name}.log")))
            .expect("create daemon log");
        let mut child = Command::new("sanlock")
            .args([
                "daemon", "-D", "-w", "0", "-l", "0", "-h", "0", "-U", "root", "-G", "root",
            ])
            .args(["-e", name])
            .env("SANLOCK_PRIVILEGED", "0")
            .env("SANLOCK_RUN_DIR", &run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sanlock daemon (is sanlock installed?)");
        // The daemon announces nothing when ready: poll its socket (bounded) until it answers.
        let client = Client::new(&run_dir);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if client.version(Duration::from_secs(1)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("sanlock daemon {name} exited: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "sanlock daemon {name} not ready in 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon {
            name: name.to_owned(),
            run_dir,
            child: Some(child),
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.run_dir)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A temp dir under /var/tmp with `leases/` (shared storage) and `disks/`.
pub fn workdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("vmlock-sanlock-")
        .tempdir_in("/var/tmp")
        .expect("temp dir under /var/tmp");
    std::fs::create_dir_all(dir.path().join("disks")).expect("disk dir");
    dir
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

    /// Waits until this host has seen `host_id` renew its delta lease (state LIVE). Before that a
    /// lease of that host is reported as "retry later" (-247), not as held by a live host.
    /// sanlock has no event for it: bounded poll of get_hosts.
    pub fn wait_sees_live(&self, host_id: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let hosts = self.driver.hosts().expect("get_hosts");
            if hosts
                .iter()
                .any(|h| h.host_id == host_id && h.state == HostState::Live)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "host_id {host_id} not seen live in 30 s: {hosts:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
