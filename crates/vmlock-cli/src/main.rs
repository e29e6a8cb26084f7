//! `vmlock`: run a guest under disk leases, and inspect or change what VMs hold.

/// `eprintln!` that never panics: a supervisor's standard error may be a closed pipe or a full
/// log file, and a supervisor that panics takes its guest with it (PDEATHSIG).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod audit;
mod bounded;
mod control;
mod libvirt;
mod supervise;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use vmlock::{DriverConfig, Plugin, Registry, Resource};
use vmlock_client::proto::{Reply, Request};
use vmlock_client::runtime::RuntimeDir;
use vmlock_client::Endpoint;

#[derive(Debug, Parser)]
#[command(
    name = "vmlock",
    version,
    about = "Keeps every VM disk written by one VM at a time"
)]
struct Cli {
    /// Runtime directory of the lock daemon (socket, pid file, state).
    #[arg(long, global = true, env = vmlock_client::runtime::RUNTIME_DIR_ENV)]
    runtime_dir: Option<PathBuf>,
    /// Lock driver.
    #[arg(long, global = true, default_value = "lockd", value_parser = clap::builder::PossibleValuesParser::new(registry().names()))]
    driver: String,
    /// Driver configuration file (TOML). For lockd it may name the daemon's own configuration
    /// with `daemon_config`.
    #[arg(long, global = true)]
    driver_config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Acquire every lease, run COMMAND as the guest with the leases tied to its life, and exit
    /// with its exit status.
    Run(supervise::RunArgs),
    /// Show every held disk: path, mode, owner, since when.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List every QEMU process on the host and, for each disk image it has open for writing,
    /// whether a vmlock lease covers it. Exit status: 0 all covered, 2 a writable disk runs
    /// unprotected, 1 on errors.
    Audit(audit::AuditArgs),
    /// Print the lock state of a running VM (releases nothing).
    Inquire {
        /// The VM's uuid.
        #[arg(long)]
        uuid: String,
    },
    /// Lock one more disk for a running VM before hotplugging it.
    AttachDisk {
        /// The VM's uuid.
        #[arg(long)]
        uuid: String,
        /// PATH[,shared|,readonly]
        #[arg(long)]
        disk: String,
    },
    /// Release a disk of a running VM after unplugging it.
    DetachDisk {
        /// The VM's uuid.
        #[arg(long)]
        uuid: String,
        /// PATH[,shared|,readonly]
        #[arg(long)]
        disk: String,
    },
    /// Migration source: print the lock state to hand to the destination (`run --incoming`).
    /// The source keeps holding everything until migrate-finish.
    MigratePrepare {
        /// The VM's uuid.
        #[arg(long)]
        uuid: String,
        /// The destination's URI (informational).
        #[arg(long, default_value = "vmlock://localhost")]
        destination: String,
    },
    /// The migration succeeded: the destination now owns the VM's locks.
    MigrateFinish {
        /// The VM's uuid.
        #[arg(long)]
        uuid: String,
    },
    /// The migration failed or was cancelled: the source keeps everything, the destination nothing.
    MigrateCancel {
        /// The VM's uuid.
        #[arg(long)]
        uuid: String,
    },
    /// Called by a lock service that lost a VM's leases (sanlock's kill path): the VM's
    /// supervisor carries out its on-lock-failure action and releases the leases.
    #[command(hide = true)]
    LockFailure {
        /// The VM's uuid.
        #[arg(long)]
        uuid: String,
    },
    /// Run the lock daemon in the foreground (what the CLI starts when none runs).
    #[command(hide = true)]
    Daemon {
        #[command(flatten)]
        args: vmlockd::DaemonArgs,
    },
    /// libvirt's lock-driver plugin: install, uninstall (and the per-domain holder it starts).
    #[command(subcommand)]
    Libvirt(libvirt::LibvirtCommand),
    /// Write the man pages (one per command) and shell completions generated from this CLI.
    #[command(hide = true)]
    GenerateDocs {
        /// Where: DIR/man1/*.1 and DIR/completions/{vmlock.bash,_vmlock,vmlock.fish}.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the lock daemon's metrics (Prometheus text format).
    Metrics,
    /// Print the lock daemon's recent events (acquired, refused, released, owner died, lease
    /// lost, action taken, daemon restarted), oldest first.
    Events {
        /// One JSON object per line, as the daemon sends them.
        #[arg(long)]
        json: bool,
        /// Then keep printing new events as they happen; across a daemon restart, reconnect and
        /// go on with the new daemon's events.
        #[arg(long)]
        follow: bool,
    },
    /// Print the guest pid of a running VM (the seed's GetChild).
    Pid {
        /// The VM's uuid.
        #[arg(long)]
        uuid: String,
    },
}

/// Everything the subcommands share: where the daemon is, and the driver.
struct Ctx {
    runtime: RuntimeDir,
    plugin: Plugin,
}

impl Ctx {
    fn new(cli: &Cli) -> anyhow::Result<Self> {
        let runtime = RuntimeDir::resolve(cli.runtime_dir.as_deref())?;
        let registry = registry();
        let mut config = match &cli.driver_config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                text.parse::<DriverConfig>()
                    .with_context(|| format!("parsing {}", path.display()))?
            }
            None => DriverConfig::new(),
        };
        if cli.driver == vmlock_client::driver::NAME && !config.contains_key("runtime_dir") {
            config.insert(
                "runtime_dir".into(),
                toml::Value::String(runtime.path().display().to_string()),
            );
        }
        if cli.driver == vmlock_sanlock::NAME && !config.contains_key("lock_failure_helper") {
            // sanlock's kill path reaches the VM's supervisor through this very program.
            if let Ok(exe) = std::env::current_exe() {
                config.insert(
                    "lock_failure_helper".into(),
                    toml::Value::String(exe.display().to_string()),
                );
                config.insert(
                    "control_dir".into(),
                    toml::Value::String(runtime.path().display().to_string()),
                );
            }
        }
        let plugin = registry.load(&cli.driver, &config)?;
        Ok(Ctx { runtime, plugin })
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.runtime.clone())
    }

    /// A connection to a running daemon (none is started: there would be nothing to report).
    fn daemon(&self) -> vmlock::Result<vmlock_client::Connection> {
        vmlock_client::Connection::connect(&self.runtime)
    }

    /// The running VM `uuid`, reached through its supervisor: whatever the driver, the leases
    /// belong to the supervisor's process, and lock services take changes only from it.
    fn vm(&self, uuid: &str) -> anyhow::Result<RunningVm> {
        let uuid = vmlock::params::parse_uuid(uuid)?.to_string();
        Ok(RunningVm {
            runtime: self.runtime.path().to_path_buf(),
            uuid,
        })
    }
}

/// Man pages and completions, from the clap definition itself, so they never drift from it.
fn generate_docs(out: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let man = out.join("man1");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut Cli::command(), "vmlock", &completions)
            .with_context(|| format!("writing {shell} completions"))?;
    }
    Ok(())
}

/// Every driver this program can load.
fn registry() -> Registry {
    let mut registry = Registry::new();
    vmlock_client::driver::register(&mut registry);
    vmlock_sanlock::register(&mut registry);
    registry
}

fn main() {
    use std::io::Write;
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // Not eprintln!: standard error may be a full log file or a closed pipe.
            let _ = writeln!(std::io::stderr(), "vmlock: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    if let Command::Daemon { mut args } = cli.command {
        args.runtime_dir = args.runtime_dir.or(cli.runtime_dir);
        vmlockd::daemon_main(args)?;
        return Ok(0);
    }
    if let Command::GenerateDocs { out } = &cli.command {
        generate_docs(out)?;
        return Ok(0);
    }
    let ctx = Ctx::new(&cli)?;
    match cli.command {
        Command::Run(args) => supervise::run(&ctx.plugin, ctx.runtime.path(), args),
        Command::Status { json } => status(&ctx, json).map(|()| 0),
        Command::Audit(args) => audit::run(&ctx, &args),
        Command::Metrics => {
            print!("{}", ctx.daemon()?.metrics()?);
            Ok(0)
        }
        Command::Events { json, follow } => events(&ctx, json, follow).map(|()| 0),
        Command::Inquire { uuid } => {
            println!("{}", ctx.vm(&uuid)?.inquire()?);
            Ok(0)
        }
        Command::AttachDisk { uuid, disk } => {
            ctx.vm(&uuid)?.attach_disk(disk.parse()?)?;
            Ok(0)
        }
        Command::DetachDisk { uuid, disk } => {
            ctx.vm(&uuid)?.detach_disk(disk.parse()?)?;
            Ok(0)
        }
        Command::MigratePrepare { uuid, destination } => {
            println!("{}", ctx.vm(&uuid)?.prepare(&destination)?);
            Ok(0)
        }
        Command::MigrateFinish { uuid } => {
            ctx.vm(&uuid)?.complete(true)?;
            Ok(0)
        }
        Command::MigrateCancel { uuid } => {
            ctx.vm(&uuid)?.complete(false)?;
            Ok(0)
        }
        Command::LockFailure { uuid } => {
            let uuid = vmlock::params::parse_uuid(&uuid)?.to_string();
            control::call(
                ctx.runtime.path(),
                &uuid,
                &control::ControlRequest::LockFailure,
            )?;
            Ok(0)
        }
        Command::Daemon { .. } | Command::GenerateDocs { .. } => Ok(0),
        Command::Libvirt(command) => libvirt::run(&ctx.plugin, ctx.runtime.path(), command),
        Command::Pid { uuid } => match ctx.vm(&uuid)?.guest_pid()? {
            Some(pid) => {
                println!("{pid}");
                Ok(0)
            }
            None => bail!("VM {uuid} has no known guest process"),
        },
    }
}

/// A running VM, reached through its supervisor's control socket.
struct RunningVm {
    runtime: PathBuf,
    uuid: String,
}

impl RunningVm {
    fn ask(&self, request: &control::ControlRequest) -> vmlock::Result<control::ControlReply> {
        control::call(&self.runtime, &self.uuid, request)
    }

    fn inquire(&mut self) -> vmlock::Result<vmlock::LockState> {
        control::state(self.ask(&control::ControlRequest::Inquire)?)
    }

    fn guest_pid(&mut self) -> vmlock::Result<Option<u32>> {
        match self.ask(&control::ControlRequest::GuestPid)? {
            control::ControlReply::Pid(p) => Ok(p),
            other => Err(vmlock::Error::Protocol {
                reason: format!("unexpected reply {other:?}"),
            }),
        }
    }

    fn attach_disk(&mut self, disk: Resource) -> vmlock::Result<()> {
        self.ask(&control::ControlRequest::AttachDisk(disk))
            .map(|_| ())
    }

    fn detach_disk(&mut self, disk: Resource) -> vmlock::Result<()> {
        self.ask(&control::ControlRequest::DetachDisk(disk))
            .map(|_| ())
    }

    fn prepare(&mut self, destination: &str) -> vmlock::Result<vmlock::LockState> {
        control::state(self.ask(&control::ControlRequest::MigratePrepare(
            destination.to_owned(),
        ))?)
    }

    fn complete(&mut self, success: bool) -> vmlock::Result<()> {
        self.ask(&control::ControlRequest::MigrateComplete(success))
            .map(|_| ())
    }
}

/// Every VM's held resources: from the daemon when the driver has a host-wide table, else from
/// every supervisor. `start_daemon`: start vmlockd if none runs (`status` does, so its table is
/// the one later commands use; `audit` must not, an empty new table would prove nothing).
fn held_resources(
    ctx: &Ctx,
    start_daemon: bool,
) -> vmlock::Result<Vec<vmlock_client::proto::OwnerStatus>> {
    if !ctx.plugin.driver().capabilities().host_status {
        return Ok(supervised_status(ctx.runtime.path()));
    }
    let mut endpoint = ctx.endpoint();
    endpoint.auto_start = start_daemon;
    match endpoint.connect()?.call(&Request::Status, &[])? {
        Reply::Status(s) => Ok(s),
        other => Err(vmlock::Error::Protocol {
            reason: format!("unexpected reply {other:?}"),
        }),
    }
}

fn status(ctx: &Ctx, json: bool) -> anyhow::Result<()> {
    let owners = held_resources(ctx, true)?;
    if json {
        // One object per held resource, flat and stable for scripts.
        let rows: Vec<serde_json::Value> = owners
            .iter()
            .flat_map(|owner| {
                owner.resources.iter().map(move |r| {
                    let since = r.since.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                    serde_json::json!({
                        "resource": r.resource.label(),
                        "path": r.resource.path(),
                        "mode": r.resource.mode().to_string(),
                        "vm": {"name": owner.vm.name, "uuid": owner.vm.uuid, "id": owner.vm.id, "pid": owner.vm.pid},
                        "holder_pid": owner.holder_pid,
                        "since": format_unix(since),
                        "version": r.version,
                        "confirmed": r.confirmed,
                        "lost": r.lost,
                    })
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<48} {:<9} {:<16} {:<36} {:>8}  SINCE",
        "PATH", "MODE", "VM", "UUID", "PID"
    );
    for owner in &owners {
        for r in &owner.resources {
            let since = r
                .since
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let mark = if r.confirmed {
                ""
            } else {
                " (awaiting supervisor)"
            };
            println!(
                "{:<48} {:<9} {:<16} {:<36} {:>8}  {}{mark}",
                r.resource.label(),
                r.resource.mode().to_string(),
                owner.vm.name,
                owner.vm.uuid,
                owner.vm.pid,
                format_unix(since)
            );
        }
    }
    Ok(())
}

/// `vmlock events`: the buffer, then (with `follow`) new events; when the daemon goes away, waits
/// for the next one and resumes after the last event printed.
fn events(ctx: &Ctx, json: bool, follow: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use vmlock_client::proto::Event;
    let print = |e: &Event| -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        if json {
            writeln!(out, "{}", serde_json::to_string(e)?)?;
        } else {
            writeln!(out, "{}", describe_event(e))?;
        }
        out.flush()?;
        Ok(())
    };
    if !follow {
        let (events, missed) = ctx.daemon()?.events(None)?;
        if missed > 0 {
            say!("vmlock: {missed} older events are no longer buffered");
        }
        for e in &events {
            print(e)?;
        }
        return Ok(());
    }
    let mut last = None;
    let mut waiting = false;
    loop {
        let conn = match ctx.daemon() {
            Ok(c) => c,
            Err(e) if last.is_some() => {
                if !std::mem::replace(&mut waiting, true) {
                    say!("vmlock: {e}; waiting for vmlockd to come back");
                }
                // A poll: nothing tells a client that a daemon started; this follows until
                // interrupted.
                std::thread::sleep(std::time::Duration::from_millis(200));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        waiting = false;
        let mut stream = conn.subscribe(last)?;
        let error = loop {
            match stream.next(None) {
                Ok(Some(batch)) => {
                    if batch.missed > 0 {
                        say!("vmlock: {} events were missed", batch.missed);
                    }
                    for e in &batch.events {
                        print(e)?;
                        last = Some(e.position());
                    }
                }
                Ok(None) => {}
                Err(e) => break e,
            }
        };
        say!("vmlock: {error}; reconnecting");
    }
}

/// One line per event for people.
fn describe_event(e: &vmlock_client::proto::Event) -> String {
    use vmlock_client::proto::EventKind as K;
    let secs = e.time_ms / 1000;
    let vm = |v: &vmlock_client::proto::VmIdentity| {
        if v.name.is_empty() {
            v.uuid.clone()
        } else {
            format!("{} ({})", v.name, v.uuid)
        }
    };
    let what = match &e.kind {
        K::Acquired { vm: v, resources } => format!("{} acquired {}", vm(v), resources.join(", ")),
        K::Released { vm: v, resources } => format!("{} released {}", vm(v), resources.join(", ")),
        K::Refused {
            vm: v,
            request,
            reason,
            error,
            ..
        } => format!("{} refused {request} ({reason}): {error}", vm(v)),
        K::OwnerDied { vm: v, locks } => {
            format!("{} guest pid {} exited; {locks} locks freed", vm(v), v.pid)
        }
        K::LeaseLost {
            vm: v,
            resources,
            action,
        } => format!(
            "{} lost {} (on_lock_failure = {action})",
            vm(v),
            resources.join(", ")
        ),
        K::ActionTaken { vm: v, action } => format!("{} lock-failure action: {action}", vm(v)),
        K::DaemonStarted { pid, vms, locks } => {
            format!("vmlockd {pid} started ({vms} VMs, {locks} locks recovered)")
        }
        K::DaemonRestarted { pid, vms, locks } => {
            format!("vmlockd {pid} restarted ({vms} VMs, {locks} locks recovered)")
        }
    };
    format!(
        "{}.{:03}Z {}.{} {:<16} {what}",
        format_unix(secs).trim_end_matches('Z'),
        e.time_ms % 1000,
        e.boot,
        e.seq,
        e.kind.name()
    )
}

/// What the supervisors in `runtime_dir` hold (drivers without a daemon-wide table), in the
/// daemon's status shape.
fn supervised_status(runtime_dir: &std::path::Path) -> Vec<vmlock_client::proto::OwnerStatus> {
    control::describe_all(runtime_dir)
        .into_iter()
        .filter_map(|reply| match reply {
            control::ControlReply::Vm {
                name,
                uuid,
                id,
                pid,
                state,
                since,
            } => {
                let since = std::time::UNIX_EPOCH + std::time::Duration::from_secs(since);
                let state: vmlock::LockState = state.parse().ok()?;
                Some(vmlock_client::proto::OwnerStatus {
                    vm: vmlock_client::proto::VmIdentity {
                        uuid,
                        name,
                        id,
                        pid: pid.unwrap_or(0),
                    },
                    holder_pid: None,
                    resources: state
                        .entries
                        .into_iter()
                        .map(|e| vmlock_client::proto::HeldResource {
                            resource: e.resource,
                            version: e.version,
                            since,
                            confirmed: true,
                            lost: false,
                        })
                        .collect(),
                })
            }
            _ => None,
        })
        .collect()
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC), without a date crate.
fn format_unix(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times() {
        assert_eq!(format_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
