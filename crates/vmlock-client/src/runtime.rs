//! The runtime directory (socket, pid file, state file, log) and starting the embedded daemon.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use vmlock::Error;

/// Environment variable naming the runtime directory.
pub const RUNTIME_DIR_ENV: &str = "VMLOCK_RUNTIME_DIR";
/// Environment variable naming the daemon program the client starts.
pub const DAEMON_ENV: &str = "VMLOCKD";

/// Where one daemon keeps its socket and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeDir(PathBuf);

impl RuntimeDir {
    /// `dir` if given, else `$VMLOCK_RUNTIME_DIR`, else `/run/vmlock` for root and
    /// `$XDG_RUNTIME_DIR/vmlock` for other users.
    pub fn resolve(dir: Option<&Path>) -> Result<Self, Error> {
        if let Some(d) = dir {
            return Self::checked(d.to_path_buf());
        }
        if let Some(d) = std::env::var_os(RUNTIME_DIR_ENV).filter(|d| !d.is_empty()) {
            return Self::checked(PathBuf::from(d));
        }
        if nix::unistd::geteuid().is_root() {
            return Ok(RuntimeDir(PathBuf::from("/run/vmlock")));
        }
        match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            Some(d) => Self::checked(PathBuf::from(d).join("vmlock")),
            None => Err(Error::Config {
                source_name: "runtime directory".into(),
                reason: format!("not root and XDG_RUNTIME_DIR is unset: pass --runtime-dir or set {RUNTIME_DIR_ENV}"),
            }),
        }
    }

    fn checked(path: PathBuf) -> Result<Self, Error> {
        if !path.is_absolute() {
            return Err(Error::Config {
                source_name: "runtime directory".into(),
                reason: format!("{} must be an absolute path", path.display()),
            });
        }
        Ok(RuntimeDir(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// The daemon's socket.
    pub fn socket(&self) -> PathBuf {
        self.0.join("vmlockd.sock")
    }
    /// The pid file, locked by the running daemon.
    pub fn pid_file(&self) -> PathBuf {
        self.0.join("vmlockd.pid")
    }
    /// The lock table as of the last change.
    pub fn state_file(&self) -> PathBuf {
        self.0.join("state.json")
    }
    /// Where an embedded daemon logs.
    pub fn log_file(&self) -> PathBuf {
        self.0.join("vmlockd.log")
    }

    /// Creates the directory, private to its user.
    pub fn create(&self) -> std::io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.0)?;
        std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o700))
    }

    /// The pid in the pid file, if any.
    pub fn daemon_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// Whether a daemon holds the pid file's lock (a pid file alone may be a killed daemon's).
fn daemon_serves(runtime: &RuntimeDir) -> bool {
    std::fs::File::open(runtime.pid_file()).is_ok_and(|f| {
        vmlock_sys::ofd::probe(
            std::os::fd::AsFd::as_fd(&f),
            vmlock_sys::ofd::LockKind::Exclusive,
            0,
            1,
        )
        .is_ok_and(|c| c.is_some())
    })
}

/// The program (and leading arguments) that runs the daemon: `$VMLOCKD`, else the `vmlock`
/// command itself (`vmlock daemon`: the very build of the client, so the two never differ in
/// version), else `vmlockd` beside the current executable, else `vmlockd` on `PATH`.
pub fn daemon_program() -> (PathBuf, Vec<std::ffi::OsString>) {
    if let Some(p) = std::env::var_os(DAEMON_ENV).filter(|p| !p.is_empty()) {
        return (PathBuf::from(p), Vec::new());
    }
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_name().is_some_and(|n| n == "vmlock") {
            return (exe, vec!["daemon".into()]);
        }
        if let Some(sibling) = exe
            .parent()
            .map(|d| d.join("vmlockd"))
            .filter(|s| s.is_file())
        {
            return (sibling, Vec::new());
        }
    }
    (PathBuf::from("vmlockd"), Vec::new())
}

/// Starts a daemon for `runtime` in the background and waits until it serves (it says so on its
/// standard output). A daemon already running, or started concurrently, is fine.
pub fn spawn_daemon(
    runtime: &RuntimeDir,
    program: &Path,
    leading_args: &[std::ffi::OsString],
    config: Option<&Path>,
) -> Result<(), Error> {
    runtime
        .create()
        .map_err(|e| Error::io(format!("creating {}", runtime.path().display()), &e))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(runtime.log_file())
        .map_err(|e| Error::io(format!("opening {}", runtime.log_file().display()), &e))?;
    let mut cmd = Command::new(program);
    cmd.args(leading_args)
        .arg("--runtime-dir")
        .arg(runtime.path())
        .arg("--notify-stdout");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    // A clean start: the caller may be `vmlock run`, whose signal mask blocks the stop signals
    // and whose descriptors include VMs' lock descriptions. Its own session also keeps a Ctrl-C
    // meant for the CLI from stopping the daemon. READY comes back on stdout (fd 1), kept.
    // SAFETY: reset_before_exec is async-signal-safe (no allocation, no lock; sigprocmask,
    // sigaction, setsid, close_range, fcntl), as a pre_exec closure must be.
    unsafe {
        cmd.pre_exec(|| vmlock_sys::child::reset_before_exec());
    }
    let mut child = cmd.spawn().map_err(|e| {
        Error::io(
            format!("starting the lock daemon {}", program.display()),
            &e,
        )
    })?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    if line.trim() == "READY" {
        return Ok(());
    }
    // It exited: another daemon won the race (fine: one holds the pid file's lock) or it failed
    // (say why: its own last words, else its log).
    let status = child
        .wait()
        .map_err(|e| Error::io("waiting for the lock daemon", &e))?;
    if runtime.socket().exists() && daemon_serves(runtime) {
        return Ok(());
    }
    let why = line.trim().strip_prefix("ERROR ").map_or_else(
        || format!("see {}", runtime.log_file().display()),
        str::to_owned,
    );
    Err(Error::ServiceUnavailable {
        reason: format!(
            "the lock daemon {} exited ({status}): {why}",
            program.display()
        ),
    })
}
