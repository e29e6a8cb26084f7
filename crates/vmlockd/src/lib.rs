//! vmlockd, the local lock daemon. Its clients (the `lockd` driver among them) live in `vmlock-client`.
//!
//! - [`server`]: the daemon process (socket, connections, owner watcher, state file);
//! - [`host`]: the lock core's host on Linux, and the work done outside the table lock;
//! - [`store`]: what survives a restart;
//! - [`holder`]: the daemon's side of a holder connection;
//! - [`telemetry`]: Prometheus metrics and the event stream.
//!
//! The lock table is `vmlock_core::LockTable`; every Linux call is in `vmlock-sys`.
//!
//! The wire protocol, the runtime directory and the QMP client live in `vmlock-client`, which
//! clients use without this crate; they are imported here under their old module names.

pub mod cluster;
pub mod config;
pub mod holder;
pub mod server;
pub mod store;
pub mod telemetry;
mod workers;
// Crate-internal names for what moved to vmlock-client (the daemon's modules say `crate::proto`).
use vmlock_client::{proto, qmp, runtime};
pub mod host;

/// Runs the daemon with command-line `args` (shared by `vmlockd` and `vmlock daemon`).
pub fn daemon_main(args: DaemonArgs) -> anyhow::Result<()> {
    let notify = args.notify_stdout;
    if notify {
        // A panic before READY is told on the READY pipe too (stdout goes to /dev/null after
        // READY): the log may be on a full file system.
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            use std::io::Write;
            let _ = writeln!(
                std::io::stdout(),
                "ERROR panic: {}",
                info.to_string().replace('\n', " ")
            );
            default(info);
        }));
    }
    let result = run_daemon(args);
    if let (Err(e), true) = (&result, notify) {
        // Whoever waits for READY learns why there is none, even when the log cannot be
        // written (a full runtime file system).
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "ERROR {}", format!("{e:#}").replace('\n', " "));
        let _ = out.flush();
    }
    result
}

fn run_daemon(args: DaemonArgs) -> anyhow::Result<()> {
    use std::io::Write;
    // However it was started (a parent with blocked or ignored signals), SIGTERM and friends stop
    // the daemon; stopping it kills no guest. Before any thread exists, so all inherit the mask.
    vmlock_sys::child::default_stop_signals()?;
    init_logging();
    let config = match &args.config {
        Some(path) => config::Config::load(path)?,
        None => config::Config::default(),
    };
    raise_fd_limit();
    let runtime = runtime::RuntimeDir::resolve(args.runtime_dir.as_deref())?;
    let activated = server::activated_listener()?;
    let (daemon, listener, wake) = server::Daemon::start(runtime.clone(), config, activated)?;
    daemon.first_cluster_lease();
    tracing::info!(dir = %runtime.path().display(), pid = std::process::id(), "vmlockd serving");
    if args.notify_stdout {
        let mut out = std::io::stdout();
        writeln!(out, "READY")?;
        out.flush()?;
        // Detach stdout from whoever waited for READY.
        let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
        nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1)?;
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    daemon.serve(listener, wake)
}

/// Logs to standard error; under systemd (`JOURNAL_STREAM` set: standard error is the journal)
/// straight to journald instead, so that every field of a line (an event's `kind`, `vm`, `seq`,
/// ...) becomes a journal field (`KIND=`, `VM=`, `SEQ=`, ...).
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("VMLOCK_LOG").unwrap_or_else(|_| "info".into())
    };
    let journald = std::env::var_os("JOURNAL_STREAM").and_then(|_| tracing_journald::layer().ok());
    match journald {
        Some(layer) => tracing_subscriber::registry()
            .with(filter())
            .with(layer)
            .init(),
        None => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(|| LossyStderr)
            .init(),
    }
}

/// Standard error that never fails: the log is often a file in the runtime directory, and when
/// that file system is full a failed write must cost the line, not the daemon (tracing's own
/// report of a failed write goes to `eprintln!`, which panics when standard error fails).
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// The daemon's command line.
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// Runtime directory (socket, pid file, state). Default: /run/vmlock for root,
    /// $XDG_RUNTIME_DIR/vmlock otherwise.
    #[arg(long, env = runtime::RUNTIME_DIR_ENV)]
    pub runtime_dir: Option<std::path::PathBuf>,
    /// Configuration file (TOML).
    #[arg(long, short = 'f')]
    pub config: Option<std::path::PathBuf>,
    /// Run in the foreground (the default; accepted for familiarity with virtlockd).
    #[arg(long)]
    pub foreground: bool,
    /// Print READY on standard output once serving (used by clients that start the daemon).
    #[arg(long)]
    pub notify_stdout: bool,
}

/// Every held lock is an open description: allow as many as the hard limit permits.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("raising the open-file limit to {hard}: {e}");
            }
        }
    }
}
