//! Real sanlock daemons, one per simulated host, each with a private `SANLOCK_RUN_DIR`, sharing
//! lease files in a directory under /var/tmp (O_DIRECT needs a real filesystem, not tmpfs).

use crate::process::{kill_child, wait_until};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmlock_sanlock::proto::{Client, HostState};

/// How long a daemon may take to answer on its socket.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a host may take to see another one renewing (a few io_timeouts).
pub const LIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// A temp dir under /var/tmp named `prefix...`, with `leases/` left to the drivers and `disks/`.
pub fn workdir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .expect("temp dir under /var/tmp");
    std::fs::create_dir_all(dir.path().join("disks")).expect("disk dir");
    dir
}

/// A sanlock daemon acting as one host (`-e NAME`), its run directory `base/run-NAME` and its log
/// `base/sanlock-NAME.log`; SIGKILLed and reaped by pid when dropped. No watchdog (`-w 0`,
/// tests only).
#[derive(Debug)]
pub struct SanlockDaemon {
    /// The host name.
    pub name: String,
    /// Its `SANLOCK_RUN_DIR`.
    pub run_dir: PathBuf,
    child: Option<Child>,
}

impl SanlockDaemon {
    /// Starts the daemon and waits (bounded) until it answers on its socket.
    pub fn start(base: &Path, name: &str) -> Self {
        Self::try_start(base, name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`SanlockDaemon::start`], with its failures returned (for the torture campaign, which
    /// restarts daemons and must not panic).
    pub fn try_start(base: &Path, name: &str) -> std::io::Result<Self> {
        let run_dir = base.join(format!("run-{name}"));
        std::fs::create_dir_all(&run_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(base.join(format!("sanlock-{name}.log")))?;
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
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("spawn sanlock daemon (is sanlock installed?): {e}"),
                )
            })?;
        // The daemon announces nothing when ready: poll its socket (bounded) until it answers.
        let client = Client::new(&run_dir);
        let deadline = Instant::now() + READY_TIMEOUT;
        while client.version(Duration::from_secs(1)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(std::io::Error::other(format!(
                    "sanlock daemon {name} exited: {status}"
                )));
            }
            if Instant::now() >= deadline {
                kill_child(&mut child);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("sanlock daemon {name} not ready in {READY_TIMEOUT:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(SanlockDaemon {
            name: name.to_owned(),
            run_dir,
            child: Some(child),
        })
    }

    /// A client of this daemon.
    pub fn client(&self) -> Client {
        Client::new(&self.run_dir)
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Its pid, unless it was killed.
    pub fn running_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
        }
    }

    /// Waits until this daemon has seen `host_id` renew its delta lease in `lockspace` (state
    /// LIVE). Before that a lease of that host is "retry later" (-247), not "held by a live
    /// host". sanlock has no event for it: bounded poll of get_hosts.
    pub fn wait_sees_live(&self, lockspace: &str, host_id: u64) {
        let client = self.client();
        let mut last = Vec::new();
        let live = || {
            last = client.get_hosts(lockspace, 0).expect("get_hosts");
            last.iter()
                .any(|h| h.host_id == host_id && h.state == HostState::Live)
        };
        wait_until(
            &format!("host_id {host_id} seen live by {}", self.name),
            LIVE_TIMEOUT,
            Duration::from_millis(100),
            live,
        );
    }

    /// `sanlock client status` of this daemon.
    pub fn status_text(&self) -> String {
        let out = Command::new("sanlock")
            .args(["client", "status"])
            .env("SANLOCK_RUN_DIR", &self.run_dir)
            .output()
            .expect("run sanlock client status");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for SanlockDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}
