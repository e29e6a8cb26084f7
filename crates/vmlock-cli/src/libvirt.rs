//! `vmlock libvirt`: what libvirt's `vmlock` lock-driver plugin (crate `vmlock-libvirt`) needs
//! from this program.
//!
//! - `holder`: the per-domain holder. The plugin starts it from libvirt's forked child just before
//!   that child execs QEMU, so the holder is QEMU's child. It takes the domain's leases (or, for
//!   an incoming migration, registers as the destination), keeps their descriptions for as long
//!   as QEMU lives, and serves the domain's control socket, through which the plugin's later
//!   calls (CPU start, pause, hotplug, unplug, migration) reach the leases: vmlockd takes changes
//!   to a VM only from its holder process. It reports its start on a socket pair the plugin reads, with copies
//!   of the lock descriptions for QEMU to keep.
//! - `install` / `uninstall`: put the plugin and a default `qemu-vmlock.conf` in place, or take
//!   away what `install` wrote (and nothing else).

use anyhow::{bail, Context};
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmlock::{AcquireOptions, LockFailureAction, Manager, Plugin, Resource, StartMode, VmParams};

/// The marker the plugin carries in its binary, so `uninstall` removes only a plugin it wrote.
const PLUGIN_MARKER: &[u8] = b"vmlock-libvirt-plugin:";
/// The first line of a configuration `install` wrote.
const CONFIG_HEADER: &str = "# qemu-vmlock.conf, written by `vmlock libvirt install`";

/// `vmlock libvirt ...`
#[derive(Debug, clap::Subcommand)]
pub enum LibvirtCommand {
    /// Install the lock-driver plugin and a default qemu-vmlock.conf (idempotent), and print the
    /// line to add to qemu.conf.
    Install(InstallArgs),
    /// Remove what `install` put in place (nothing else).
    Uninstall(InstallArgs),
    /// The per-domain holder the plugin starts from libvirt's child before QEMU's exec.
    #[command(hide = true)]
    Holder(HolderArgs),
}

/// Where the plugin and its configuration go.
#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// libvirt's lock-driver directory.
    #[arg(long, default_value = "/usr/lib/x86_64-linux-gnu/libvirt/lock-driver")]
    plugin_dir: PathBuf,
    /// libvirt's configuration directory (qemu.conf's).
    #[arg(long, default_value = "/etc/libvirt")]
    config_dir: PathBuf,
    /// The plugin to install (default: libvmlock_libvirt.so beside this program).
    #[arg(long)]
    plugin: Option<PathBuf>,
}

/// Arguments of the holder (built by the plugin).
#[derive(Debug, clap::Args)]
pub struct HolderArgs {
    /// Domain name.
    #[arg(long)]
    name: String,
    /// Domain uuid.
    #[arg(long)]
    uuid: String,
    /// Domain id.
    #[arg(long)]
    id: u32,
    /// The guest: this holder's parent, the process that execs QEMU.
    #[arg(long)]
    guest_pid: u32,
    /// A disk: PATH[,shared|,readonly].
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// A lease: LOCKSPACE:KEY:PATH:OFFSET.
    #[arg(long = "lease")]
    leases: Vec<String>,
    /// poweroff, pause or ignore.
    #[arg(long, default_value = "poweroff")]
    on_lock_failure: String,
    /// libvirt's connection uri, through which lock-failure actions are carried out.
    #[arg(long)]
    uri: Option<String>,
    /// The socket on which the start is reported ("OK" with the lock descriptions, or "ERR ...").
    #[arg(
        long,
        required_unless_present = "takeover_fd",
        conflicts_with = "takeover_fd"
    )]
    ready_fd: Option<RawFd>,
    /// Take over from the guest, which took the leases itself: the socket on which it hands
    /// their descriptions down.
    #[arg(long, requires = "control_fd")]
    takeover_fd: Option<RawFd>,
    /// With `--takeover-fd`: the domain's control socket, bound and listening.
    #[arg(long, requires = "takeover_fd")]
    control_fd: Option<RawFd>,
}

/// Runs a `vmlock libvirt` command.
pub fn run(plugin: &Plugin, runtime_dir: &Path, command: LibvirtCommand) -> anyhow::Result<i32> {
    match command {
        LibvirtCommand::Install(args) => install(&args).map(|()| 0),
        LibvirtCommand::Uninstall(args) => uninstall(&args).map(|()| 0),
        LibvirtCommand::Holder(args) => hold(plugin, runtime_dir, args),
    }
}

fn hold(plugin: &Plugin, runtime_dir: &Path, args: HolderArgs) -> anyhow::Result<i32> {
    if let (Some(takeover), Some(control)) = (args.takeover_fd, args.control_fd) {
        return take_over(runtime_dir, &args, takeover, control);
    }
    let ready_fd = args
        .ready_fd
        .context("--ready-fd or --takeover-fd is needed")?;
    // SAFETY: the plugin passes its end of a socket pair under this number and nothing else in
    // this process owns it; it is closed once the start is reported.
    let mut ready = unsafe { std::os::unix::net::UnixStream::from_raw_fd(ready_fd) };
    let _ = rustix::io::fcntl_setfd(&ready, rustix::io::FdFlags::CLOEXEC);
    let started = start(plugin, &args);
    let (manager, policy) = match started {
        Ok(held) => held,
        Err(e) => {
            // One line: the plugin hands it to libvirt as the domain's error.
            let line = format!("{e:#}").replace('\n', " ");
            let _ = writeln!(ready, "ERR {line}");
            return Ok(1);
        }
    };
    let guest = vmlock_sys::pidfd::ProcessHandle::open(args.guest_pid, None)
        .context("watching the guest")?;
    let uuid = manager.vm().uuid.to_string();
    let manager = Arc::new(Mutex::new(manager));
    crate::control::watch_fencing(runtime_dir, &manager, &policy);
    let control = crate::control::ControlServer::start(
        crate::control::socket_path(runtime_dir, &uuid),
        Arc::clone(&manager),
        policy,
    );
    if let Err(e) = control {
        // Nothing stays taken for a QEMU that will not run: the child fails on this report.
        if let Ok(mut m) = manager.lock() {
            let _ = m.release();
        }
        let _ = writeln!(ready, "ERR no control socket for the domain: {e:#}");
        return Ok(1);
    }
    // With the report go copies of the lock descriptions, which QEMU keeps across its exec.
    let copies = manager
        .lock()
        .map(|m| m.lock_descriptions())
        .unwrap_or_default();
    let raw: Vec<RawFd> = copies.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
    // One byte per message of at most MAX_FDS descriptors (see vmlock_sys::fdpass).
    let pieces = raw.len().div_ceil(vmlock_sys::fdpass::MAX_FDS).max(1);
    let report = format!("OK {}{}\n", raw.len(), " ".repeat(pieces));
    if vmlock_sys::fdpass::send_with_fds(&ready, report.as_bytes(), &raw).is_err() {
        // The child gave up waiting: it will not exec QEMU. Our exit frees what we took.
        return Ok(1);
    }
    drop(copies);
    drop(ready);
    // The leases live as long as QEMU: when it exits the daemon unlocks them from the guest's
    // own pidfd (or hands them to a migration destination that took them over), so there is
    // nothing left to release here.
    guest.wait_exit(None);
    drop(control);
    Ok(0)
}

/// The holder started by a pre-exec child that took the leases itself: receives their
/// descriptions, takes the domain over from its guest (this process's parent) in vmlockd, and
/// serves the control socket the child bound. Nobody waits for it: a failure is logged (to the
/// domain's log) and leaves the guest holding its leases, through vmlockd and its own copies of
/// the descriptions, until it exits.
fn take_over(
    runtime_dir: &Path,
    args: &HolderArgs,
    takeover_fd: RawFd,
    control_fd: RawFd,
) -> anyhow::Result<i32> {
    // SAFETY: the plugin passes these two descriptors under these numbers (the hand-down socket
    // and the bound control socket) and nothing else in this process owns them.
    let (handed, listener) = unsafe {
        (
            std::os::unix::net::UnixStream::from_raw_fd(takeover_fd),
            std::os::unix::net::UnixListener::from_raw_fd(control_fd),
        )
    };
    for fd in [takeover_fd, control_fd] {
        let _ = rustix::io::fcntl_setfd(
            // SAFETY: borrowed for this call only; owned by `handed` and `listener` above.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            rustix::io::FdFlags::CLOEXEC,
        );
    }
    let result = take_over_and_serve(runtime_dir, args, &handed, listener);
    if result.is_err() && guest_gone(args.guest_pid) {
        // QEMU died while this holder started: nothing is left to hold (vmlockd unlocked when
        // it exited), and nothing failed that the domain's log should alarm about.
        eprintln!(
            "vmlock libvirt holder: domain {}: the guest, pid {}, exited while its holder \
             started; nothing to hold",
            args.name, args.guest_pid
        );
        return Ok(0);
    }
    if let Err(e) = &result {
        eprintln!(
            "vmlock libvirt holder: domain {} (uuid {}): could not take over from its guest, \
             pid {}: {e:#}; the guest keeps its leases, but libvirt's later lock calls will fail",
            args.name, args.uuid, args.guest_pid
        );
    }
    result
}

/// Whether the guest (this holder's parent until it exits) is gone or exiting.
fn guest_gone(guest_pid: u32) -> bool {
    nix::unistd::getppid().as_raw() != i32::try_from(guest_pid).unwrap_or(-1)
        || vmlock::process::has_exited_or_exiting(guest_pid)
}

/// How long the holder waits for its guest's exec before it takes over anyway.
const GUEST_EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits (at most `timeout`) until the guest's end of the hand-down socket closes: at its exec
/// of QEMU (the end is close-on-exec), or its exit. (Usually it has: the plugin's clone execs
/// this holder only then, except for a hand-down too large to wait in the socket, or on a
/// machine without that clone.) Until then libvirt's pre-exec child is still
/// at work on the domain's start, and the takeover (this holder's work and vmlockd's) would
/// compete with it for the CPU. The guest holds its leases meanwhile, through vmlockd and its
/// own descriptions.
fn wait_for_exec(handed: &std::os::unix::net::UnixStream, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = [0u8; 64];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        let mut poll = [rustix::event::PollFd::new(
            handed,
            rustix::event::PollFlags::IN,
        )];
        let timespec = rustix::time::Timespec::try_from(left).ok();
        match rustix::event::poll(&mut poll, timespec.as_ref()) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(_) => return,
        }
        // End of file (or a reset): the other end is closed. Anything else sent is not ours.
        match rustix::io::read(handed, &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn take_over_and_serve(
    runtime_dir: &Path,
    args: &HolderArgs,
    handed: &std::os::unix::net::UnixStream,
    listener: std::os::unix::net::UnixListener,
) -> anyhow::Result<i32> {
    let (locks, fds) = vmlock_client::handdown::receive(handed, Duration::from_secs(10))
        .context("receiving the lock descriptions")?;
    wait_for_exec(handed, GUEST_EXEC_TIMEOUT);
    // Its end closes at its exec, or early in its exit (before this holder is reparented): an
    // exiting guest says so in its kernel flags.
    if guest_gone(args.guest_pid) {
        // Libvirt gave the start up before QEMU's exec: the guest and its leases are gone.
        eprintln!(
            "vmlock libvirt holder: domain {}: the guest, pid {}, exited before QEMU started; \
             nothing to hold",
            args.name, args.guest_pid
        );
        return Ok(0);
    }
    let runtime = vmlock_client::RuntimeDir::resolve(Some(runtime_dir))?;
    let driver = vmlock_client::driver::LockdDriver::taking_over(
        vmlock_client::Endpoint::new(runtime),
        vmlock_client::driver::Takeover {
            guest_pid: args.guest_pid,
            locks,
            fds,
            flags: Some(vmlock_client::proto::AcquireFlags {
                on_lock_failure: args.on_lock_failure.parse()?,
                // As the guest's own acquire: through libvirt when it gave a connection.
                supervisor_acts: args.uri.is_some(),
                ..Default::default()
            }),
        },
    );
    let plugin = Plugin::from_driver(Arc::new(driver));
    let (manager, policy) = start(&plugin, args)?;
    let guest = vmlock_sys::pidfd::ProcessHandle::open(args.guest_pid, None)
        .context("watching the guest")?;
    let uuid = manager.vm().uuid.to_string();
    let manager = Arc::new(Mutex::new(manager));
    crate::control::watch_fencing(runtime_dir, &manager, &policy);
    let control = crate::control::ControlServer::serve_on(
        listener,
        crate::control::socket_path(runtime_dir, &uuid),
        Arc::clone(&manager),
        policy,
    )?;
    // As for a holder that took the leases itself: they live as long as QEMU.
    guest.wait_exit(None);
    drop(control);
    Ok(0)
}

/// Takes the leases (or registers as a migration destination) and names the guest.
fn start(
    plugin: &Plugin,
    args: &HolderArgs,
) -> anyhow::Result<(Manager, crate::control::LockFailurePolicy)> {
    let parent = nix::unistd::getppid().as_raw();
    if u32::try_from(parent).ok() != Some(args.guest_pid) {
        bail!(
            "the holder's parent is pid {parent}, not the guest {}",
            args.guest_pid
        );
    }
    let uuid = vmlock::params::parse_uuid(&args.uuid)?;
    let vm = VmParams::new(args.id, uuid, &args.name)?;
    let action: LockFailureAction = args.on_lock_failure.parse()?;
    let mut resources = Vec::new();
    for d in &args.disks {
        resources.push(d.parse::<Resource>()?);
    }
    for l in &args.leases {
        resources.push(Resource::parse_lease(l)?);
    }
    vmlockd::raise_fd_limit();
    // libvirt's child looks the same for a fresh start and a migration destination; what tells
    // them apart is the domain already running elsewhere under its uuid. The destination then
    // registers as such, which the lock service refuses unless the source prepared a migration.
    let elsewhere = running_guest(plugin, &vm).filter(|p| *p != args.guest_pid);
    let incoming = elsewhere.is_some();
    let mode = if incoming {
        StartMode::IncomingMigration
    } else {
        StartMode::Start
    };
    let name = vm.name.clone();
    let mut manager = Manager::new(plugin, vm, mode).map_err(|e| match elsewhere {
        Some(pid) if incoming => anyhow::anyhow!(
            "domain \"{name}\" (uuid {uuid}) already runs as pid {pid} and is not migrating \
             here: {e}"
        ),
        _ => e.into(),
    })?;
    for r in resources {
        manager.register_resource(r)?;
    }
    if !incoming {
        manager.acquire(&AcquireOptions {
            on_lock_failure: action,
            // Through libvirt, so that it knows its domain paused or stopped.
            supervisor_acts: args.uri.is_some(),
            ..Default::default()
        })?;
        manager.guest_started(args.guest_pid)?;
    }
    let policy = crate::control::LockFailurePolicy {
        action,
        qmp: None,
        guest_pid: args.guest_pid,
        libvirt: args.uri.clone().map(|u| (u, args.uuid.clone())),
    };
    Ok((manager, policy))
}

/// The running guest the lock service knows for VM `vm`, if any.
fn running_guest(plugin: &Plugin, vm: &VmParams) -> Option<u32> {
    Manager::new(plugin, vm.clone(), StartMode::Attach)
        .and_then(|mut m| m.guest_pid())
        .ok()
        .flatten()
        .filter(|p| vmlock::process::is_running(*p))
}

/// The plugin built beside this program.
fn default_plugin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this program")?;
    let dir = exe.parent().context("this program's directory")?;
    for candidate in [
        dir.join("libvmlock_libvirt.so"),
        dir.join("../lib/vmlock/libvmlock_libvirt.so"),
    ] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "no libvmlock_libvirt.so beside {} (build it with `cargo build -p vmlock-libvirt`, or \
         name it with --plugin)",
        exe.display()
    )
}

fn is_our_plugin(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|bytes| {
        bytes
            .windows(PLUGIN_MARKER.len())
            .any(|w| w == PLUGIN_MARKER)
    })
}

fn default_config() -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("locating this program")?;
    Ok(format!(
        "{CONFIG_HEADER}\n\
         # The vmlock lock driver of libvirt's QEMU driver (qemu.conf: lock_manager = \"vmlock\").\n\
         # See docs/libvirt.md.\n\
         \n\
         # Lock every disk automatically (else only <lease> elements).\n\
         auto_disk_leases = 1\n\
         \n\
         # Refuse domains with writable disks but no <lease> (default: !auto_disk_leases).\n\
         #require_lease_for_disks = 0\n\
         \n\
         # vmlockd's runtime directory (its socket, state, and each domain's control socket).\n\
         #runtime_dir = \"/run/vmlock\"\n\
         \n\
         # The program that holds each domain's leases.\n\
         vmlock_binary = \"{}\"\n",
        exe.display()
    ))
}

fn install(args: &InstallArgs) -> anyhow::Result<()> {
    let plugin = match &args.plugin {
        Some(p) => p.clone(),
        None => default_plugin()?,
    };
    if !is_our_plugin(&plugin) {
        bail!("{} is not vmlock's libvirt plugin", plugin.display());
    }
    let target = args.plugin_dir.join("vmlock.so");
    if target.exists() && !is_our_plugin(&target) {
        bail!(
            "{} exists and is not vmlock's plugin: not replacing it",
            target.display()
        );
    }
    std::fs::create_dir_all(&args.plugin_dir)
        .with_context(|| format!("creating {}", args.plugin_dir.display()))?;
    // Written beside and renamed over, so a libvirtd loading it never sees half a file.
    let partial = args.plugin_dir.join(".vmlock.so.partial");
    std::fs::copy(&plugin, &partial)
        .with_context(|| format!("copying {} to {}", plugin.display(), partial.display()))?;
    std::fs::rename(&partial, &target)
        .with_context(|| format!("installing {}", target.display()))?;
    println!("installed {}", target.display());
    let config = args.config_dir.join("qemu-vmlock.conf");
    if config.exists() {
        println!("kept {} (already there)", config.display());
    } else {
        std::fs::create_dir_all(&args.config_dir)
            .with_context(|| format!("creating {}", args.config_dir.display()))?;
        std::fs::write(&config, default_config()?)
            .with_context(|| format!("writing {}", config.display()))?;
        println!("wrote {}", config.display());
    }
    println!(
        "add this line to {} and restart libvirtd:\n  lock_manager = \"vmlock\"",
        args.config_dir.join("qemu.conf").display()
    );
    Ok(())
}

fn uninstall(args: &InstallArgs) -> anyhow::Result<()> {
    let target = args.plugin_dir.join("vmlock.so");
    if is_our_plugin(&target) {
        std::fs::remove_file(&target).with_context(|| format!("removing {}", target.display()))?;
        println!("removed {}", target.display());
    } else if target.exists() {
        println!("left {} (not vmlock's plugin)", target.display());
    }
    let config = args.config_dir.join("qemu-vmlock.conf");
    match std::fs::read_to_string(&config) {
        Ok(text)
            if text == default_config()? || text.starts_with(CONFIG_HEADER) && !edited(&text)? =>
        {
            std::fs::remove_file(&config)
                .with_context(|| format!("removing {}", config.display()))?;
            println!("removed {}", config.display());
        }
        Ok(_) => println!("left {} (changed since install)", config.display()),
        Err(_) => {}
    }
    let uses_vmlock = std::fs::read_to_string(args.config_dir.join("qemu.conf")).is_ok_and(|t| {
        t.lines()
            .any(|l| l.trim_start().starts_with("lock_manager") && l.contains("\"vmlock\""))
    });
    if uses_vmlock {
        println!(
            "qemu.conf still says lock_manager = \"vmlock\": remove that line before restarting libvirtd"
        );
    }
    Ok(())
}

/// Whether a configuration `install` wrote was changed since (only the program's path may
/// differ: this program may have moved).
fn edited(text: &str) -> anyhow::Result<bool> {
    let strip = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with("vmlock_binary"))
            .map(str::to_owned)
            .collect()
    };
    Ok(strip(text) != strip(&default_config()?))
}
