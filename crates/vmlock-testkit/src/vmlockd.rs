//! A vmlockd process in a private temporary directory, stopped by pid.

use crate::process::{kill_and_wait, kill_child, read_line};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long a daemon may take to say READY.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running vmlockd with its runtime directory `dir/run`, killed (SIGKILL) and reaped by pid when
/// dropped. The directory also holds the test's disks.
#[derive(Debug)]
pub struct Vmlockd {
    /// The private directory.
    pub dir: tempfile::TempDir,
    program: PathBuf,
    config: Option<PathBuf>,
    child: Option<Child>,
}

impl Vmlockd {
    /// Starts `program` (the `vmlockd` binary: `env!("CARGO_BIN_EXE_vmlockd")`) with the
    /// configuration text `config`, if any, and waits until it serves.
    pub fn start(program: &Path, config: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config.map(|text| {
            let p = dir.path().join("vmlockd.toml");
            std::fs::write(&p, text).expect("write config");
            p
        });
        let mut d = Vmlockd {
            dir,
            program: program.to_owned(),
            config,
            child: None,
        };
        d.restart();
        d
    }

    /// The runtime directory (socket, pid file, state).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// Where tests put their disks.
    pub fn disk_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the daemon (again) and waits (bounded) until it says it serves.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let mut cmd = Command::new(&self.program);
        cmd.arg("--runtime-dir")
            .arg(self.run_dir())
            .arg("--notify-stdout")
            .env("VMLOCK_LOG", "warn");
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn vmlockd");
        let line = read_line(child.stdout.as_mut().expect("stdout"), READY_TIMEOUT);
        if !matches!(&line, Ok(Some(l)) if l.trim() == "READY") {
            kill_child(&mut child);
            panic!("vmlockd did not start: {line:?}");
        }
        self.child = Some(child);
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM and wait (bounded) for it to exit, as an init system stops it.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        crate::process::signal_and_wait(
            &mut child,
            rustix::process::Signal::TERM,
            Duration::from_secs(10),
        )
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
        }
    }
}

impl Drop for Vmlockd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The pid in `run_dir/vmlockd.pid`: a daemon the CLI started, which is not our child.
pub fn pid_in(run_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(run_dir.join("vmlockd.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// SIGKILLs the daemon of `run_dir`, if any, and waits until it is gone.
pub fn kill_in(run_dir: &Path) {
    if let Some(pid) = pid_in(run_dir) {
        kill_and_wait(pid);
    }
}

/// A private runtime directory for a `vmlock` CLI under test: every command runs with
/// `--runtime-dir DIR/run`, and the daemon the CLI starts there is killed by pid on drop.
#[derive(Debug)]
pub struct CliEnv {
    /// The private directory (disks and sockets of the test go here too).
    pub dir: tempfile::TempDir,
    program: PathBuf,
}

impl CliEnv {
    /// An environment for `program` (`env!("CARGO_BIN_EXE_vmlock")`).
    pub fn new(program: &Path) -> Self {
        CliEnv {
            dir: tempfile::tempdir().expect("temp dir"),
            program: program.to_owned(),
        }
    }

    /// The runtime directory.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// `vmlock --runtime-dir RUN`, quiet unless something goes wrong.
    pub fn vmlock(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.arg("--runtime-dir")
            .arg(self.run_dir())
            .env("VMLOCK_LOG", "warn");
        c
    }
}

impl Drop for CliEnv {
    fn drop(&mut self) {
        kill_in(&self.run_dir());
    }
}
