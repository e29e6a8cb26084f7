//! `vmlock run`: the supervisor. It acquires every lease, then runs the guest as its child; this
//! process keeps the locks' descriptions (the lockd holder) for exactly as long as the guest lives.
//!
//! - The guest gets `PR_SET_PDEATHSIG(SIGKILL)`: if the supervisor is killed, the guest dies with
//!   it, so a guest never runs without its locks.
//! - SIGTERM, SIGINT, SIGHUP and SIGQUIT sent to the supervisor are forwarded to the guest, which
//!   decides how to stop; the supervisor exits with the guest's status.

use anyhow::Context;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use vmlock::{
    AcquireOptions, LockFailureAction, LockState, Manager, Plugin, Resource, StartMode, VmParams,
};

/// Arguments of `vmlock run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// VM name (named in every conflict).
    #[arg(long)]
    name: String,
    /// VM uuid; a fresh one is generated and printed when omitted.
    #[arg(long)]
    uuid: Option<String>,
    /// Domain id.
    #[arg(long, default_value_t = 1)]
    id: u32,
    /// A disk: PATH[,shared|,readonly]. Repeat for more.
    #[arg(long = "disk", value_name = "PATH[,shared|,readonly]")]
    disks: Vec<String>,
    /// An explicit lease: LOCKSPACE:KEY:PATH:OFFSET. Repeat for more.
    #[arg(long = "lease", value_name = "LOCKSPACE:KEY:PATH:OFFSET")]
    leases: Vec<String>,
    /// What to do to the guest if a lease is lost: poweroff, pause (needs --qmp), ignore.
    #[arg(long, default_value = "poweroff")]
    on_lock_failure: String,
    /// The guest's QMP socket (QEMU), needed for --on-lock-failure pause.
    #[arg(long)]
    qmp: Option<PathBuf>,
    /// For guests that are not QEMU: also hold QEMU's writer lock bytes, so a stray QEMU or
    /// qemu-img refuses to open the disks.
    #[arg(long)]
    hold_qemu_bytes: bool,
    /// Destination of a migration: take the leases over from the source with the state that
    /// `vmlock migrate-prepare` printed there. The guest should be started with `-incoming`.
    #[arg(long, value_name = "STATE")]
    incoming: Option<String>,
    /// The guest's program and arguments.
    #[arg(required = true, last = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

const FORWARDED: [Signal; 4] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// Runs the guest under its leases; returns the exit code to leave with.
pub fn run(plugin: &Plugin, runtime_dir: &Path, args: RunArgs) -> anyhow::Result<i32> {
    let uuid = match &args.uuid {
        Some(u) => vmlock::params::parse_uuid(u)?,
        None => {
            let u = uuid::Uuid::new_v4();
            say!("vmlock: VM \"{}\" gets uuid {u}", args.name);
            u
        }
    };
    let vm = VmParams::new(args.id, uuid, &args.name)?;
    let mut resources = Vec::new();
    for d in &args.disks {
        resources.push(d.parse::<Resource>()?);
    }
    for l in &args.leases {
        resources.push(Resource::parse_lease(l)?);
    }
    let on_lock_failure: LockFailureAction = args.on_lock_failure.parse()?;
    let options = AcquireOptions {
        on_lock_failure,
        qmp_socket: args.qmp.clone(),
        hold_qemu_bytes: args.hold_qemu_bytes,
        ..Default::default()
    };

    // Block the signals we forward before any thread exists, so every thread inherits the mask
    // and only the forwarding thread receives them.
    let mut forwarded = SigSet::empty();
    for s in FORWARDED {
        forwarded.add(s);
    }
    forwarded.thread_block().context("blocking signals")?;

    // This process keeps one description per lock.
    vmlockd::raise_fd_limit();
    let incoming: Option<LockState> = args.incoming.as_deref().map(str::parse).transpose()?;
    let mode = if incoming.is_some() {
        StartMode::IncomingMigration
    } else {
        StartMode::Start
    };
    let mut manager = Manager::new(plugin, vm, mode)?;
    for r in resources {
        manager.register_resource(r)?;
    }
    match &incoming {
        Some(state) => manager.acquire_incoming(state, &options)?,
        None => manager.acquire(&options)?,
    }
    let held = manager.inquire().map(|s| s.entries.len()).unwrap_or(0);

    let supervisor = nix::unistd::getpid();
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..]);
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (sigprocmask, prctl, getppid); it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The supervisor may have died before prctl took effect: then do not run unprotected.
            if nix::unistd::getppid() != supervisor {
                return Err(std::io::Error::other("the vmlock supervisor exited"));
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = manager.shutdown();
            anyhow::bail!("starting the guest {:?}: {e}", args.command[0]);
        }
    };
    let guest_pid = child.id();
    if let Err(e) = manager.guest_started(guest_pid) {
        let _ = child.kill();
        let _ = child.wait();
        let _ = manager.shutdown();
        return Err(e).context("handing the locks to the guest process");
    }

    std::thread::Builder::new()
        .name("signal-forwarder".into())
        .spawn(move || loop {
            if let Ok(sig) = forwarded.wait() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(guest_pid as i32), sig);
            }
        })
        .context("starting the signal forwarder")?;

    // Later `vmlock` commands reach this VM's leases through the supervisor that holds them.
    let manager = Arc::new(Mutex::new(manager));
    let policy = crate::control::LockFailurePolicy {
        action: on_lock_failure,
        qmp: args.qmp.clone(),
        guest_pid,
        libvirt: None,
    };
    crate::control::watch_fencing(runtime_dir, &manager, &policy);
    let control = crate::control::ControlServer::start(
        crate::control::socket_path(runtime_dir, &uuid.to_string()),
        Arc::clone(&manager),
        policy,
    );
    if let Err(e) = &control {
        say!(
            "vmlock: warning: no control socket for \"{}\": {e:#}",
            args.name
        );
    }
    // Announced once later commands can reach the VM through its control socket.
    say!(
        "vmlock: VM \"{}\" (uuid {uuid}) holds {held} lock(s); guest pid {guest_pid}",
        args.name
    );

    let status = child.wait().context("waiting for the guest")?;
    drop(control);
    let mut manager = manager.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = manager.shutdown() {
        // Our exit closes the descriptions this process keeps, so the locks go anyway.
        say!(
            "vmlock: warning: releasing the leases of \"{}\": {e}",
            args.name
        );
    }
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}
