//! Shared test support: a real vmlockd process in a private runtime directory.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use vmlockd::client::Endpoint;
use vmlockd::runtime::RuntimeDir;

/// A running vmlockd, killed (SIGKILL) and reaped by pid when dropped.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub config: Option<PathBuf>,
}

impl Daemon {
    pub fn start() -> Self {
        Self::start_with_config(None)
    }

    pub fn start_with_config(config: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config.map(|text| {
            let p = dir.path().join("vmlockd.toml");
            std::fs::write(&p, text).expect("write config");
            p
        });
        let mut d = Daemon {
            dir,
            child: None,
            config,
        };
        d.restart();
        d
    }

    pub fn runtime(&self) -> RuntimeDir {
        RuntimeDir::resolve(Some(&self.dir.path().join("run"))).expect("runtime dir")
    }

    pub fn endpoint(&self) -> Endpoint {
        let mut e = Endpoint::new(self.runtime());
        e.auto_start = false;
        e
    }

    pub fn disk_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the daemon (again) and waits until it says it serves.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmlockd"));
        cmd.arg("--runtime-dir")
            .arg(self.runtime().path())
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
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read READY");
        assert_eq!(line.trim(), "READY", "vmlockd did not start");
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL and reap.
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
