//! A real, private libvirtd (and optionally virtlockd) for tests, in a private mount namespace.
//!
//! Each [`LibvirtDaemon`] owns a private directory `D` holding copies of `/etc/libvirt`,
//! `/var/lib/libvirt` and `/var/cache/libvirt`, and runs as
//! `setsid unshare -m --propagation private D/inner.sh ...`: the script bind-mounts `D/run` on
//! `/run`, `D/etc` on `/etc/libvirt`, `D/lib` on `/var/lib/libvirt`, `D/log` on
//! `/var/log/libvirt` and `D/cache` on `/var/cache/libvirt` (only inside the namespace: nothing is
//! mounted on the host), starts virtlockd if asked, then execs libvirtd, so libvirtd is our child.
//! Clients reach it from outside through `D/run/libvirt/libvirt-sock` ([`LibvirtDaemon::uri`]).
//!
//! QEMU's capability cache (`D/cache/qemu`) is shared between instances through
//! [`CAPS_CACHE`]: probing QEMU takes seconds on a first start, a seeded start a fraction of one.
//! libvirt checks the cache against the emulator and itself and probes again if it is stale.
//!
//! Expected noise in `libvirtd.out`: `dmidecode ... /dev/mem: No such file or directory` at start
//! and `At least one cgroup controller is required` at each domain start or reattach
//! (`cgroup_controllers = [ ]`, so that daemons do not share host-wide cgroups).

use crate::process::{kill_and_wait, kill_child, wait_child};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use vmlock_sys::pidfd::ProcessHandle;

/// How long libvirtd may take to serve (a first start probes QEMU: about 8 s on two cores).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one `virsh` command may take (start ~0.5 s, destroy ~1.5 s).
pub const VIRSH_TIMEOUT: Duration = Duration::from_secs(60);

/// How long libvirtd may take to exit on SIGTERM before it is SIGKILLed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where QEMU's capability cache is kept between instances (a copy of a daemon's `D/cache/qemu`).
pub const CAPS_CACHE: &str = "/var/tmp/vmlock-testkit-libvirt-caps";

/// The stock plugins' directory on Debian (holds `lockd.so`).
pub const STOCK_PLUGIN_DIR: &str = "/usr/lib/x86_64-linux-gnu/libvirt/lock-driver";

/// Runs inside the new mount namespace: `inner.sh D START_VIRTLOCKD LIBVIRTD VIRTLOCKD`.
const INNER_SCRIPT: &str = r#"#!/bin/sh
# Private mounts for one test's libvirtd (the namespace is private: the host sees none of them).
set -eu
D=$1
mount --bind "$D/run" /run
mkdir -p /run/libvirt
mount --bind "$D/etc" /etc/libvirt
mount --bind "$D/lib" /var/lib/libvirt
mount --bind "$D/log" /var/log/libvirt
mount --bind "$D/cache" /var/cache/libvirt
if [ "$2" = 1 ]; then
  "$4" >>"$D/virtlockd.out" 2>&1 &
  echo $! >"$D/virtlockd.pid"
fi
echo $$ >"$D/libvirtd.pid"
exec "$3" >>"$D/libvirtd.out" 2>&1
"#;

/// Whether libvirtd and virsh are installed (`scripts/install-test-deps.sh` installs them).
pub fn available() -> bool {
    sbin("libvirtd").is_some() && sbin("virsh").is_some()
}

/// `name` on `PATH` or in the sbin directories (a test's `PATH` may lack them).
fn sbin(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Options of a [`LibvirtDaemon`]; [`LibvirtBuilder::start`] starts it.
#[derive(Debug, Clone, Default)]
pub struct LibvirtBuilder {
    lock_manager: Option<String>,
    plugin_dir: Option<PathBuf>,
    virtlockd: bool,
    env: Vec<(OsString, OsString)>,
    etc_files: Vec<(PathBuf, Vec<u8>)>,
    qemu_conf: Vec<String>,
}

impl LibvirtBuilder {
    /// `lock_manager = "NAME"` in `qemu.conf` (libvirt loads `NAME.so` from the plugin directory,
    /// configured by `/etc/libvirt/qemu-NAME.conf`). Without it: libvirt's nop manager.
    pub fn lock_manager(mut self, name: &str) -> Self {
        self.lock_manager = Some(name.to_owned());
        self
    }

    /// `LIBVIRT_LOCK_MANAGER_PLUGIN_DIR` of libvirtd (default: [`STOCK_PLUGIN_DIR`]).
    pub fn plugin_dir(mut self, dir: &Path) -> Self {
        self.plugin_dir = Some(dir.to_owned());
        self
    }

    /// Starts virtlockd in the namespace too (needed by `lock_manager("lockd")`).
    pub fn virtlockd(mut self, yes: bool) -> Self {
        self.virtlockd = yes;
        self
    }

    /// An environment variable of libvirtd (and of the plugins it loads).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Writes `D/etc/NAME` (seen by libvirtd as `/etc/libvirt/NAME`), e.g. `qemu-vmlock.conf`.
    pub fn etc_file(mut self, name: &str, contents: impl AsRef<[u8]>) -> Self {
        self.etc_files
            .push((PathBuf::from(name), contents.as_ref().to_owned()));
        self
    }

    /// A line appended to `qemu.conf` after the fixture's own settings.
    pub fn qemu_conf(mut self, line: &str) -> Self {
        self.qemu_conf.push(line.to_owned());
        self
    }

    /// Lays out the private directory and starts the daemon(s); returns once libvirtd serves.
    /// Panics (with the daemons' logs) if it does not within [`READY_TIMEOUT`].
    pub fn start(self) -> LibvirtDaemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        for sub in ["etc", "run", "lib", "log", "cache"] {
            std::fs::create_dir(d.join(sub)).expect("create the instance's directories");
        }
        copy_tree(Path::new("/etc/libvirt"), &d.join("etc"));
        copy_tree(Path::new("/var/lib/libvirt"), &d.join("lib"));
        copy_tree(Path::new("/var/cache/libvirt"), &d.join("cache"));
        let caps = Path::new(CAPS_CACHE);
        if caps.is_dir() {
            copy_tree(caps, &d.join("cache/qemu"));
        }

        let mut qemu_conf = String::from(
            "\n# vmlock-testkit: a private daemon run as root, no cgroups, no virtlogd\n\
             user = \"root\"\n\
             group = \"root\"\n\
             dynamic_ownership = 0\n\
             stdio_handler = \"file\"\n\
             cgroup_controllers = [ ]\n\
             security_driver = \"none\"\n",
        );
        if let Some(lm) = &self.lock_manager {
            let _ = writeln!(qemu_conf, "lock_manager = \"{lm}\"");
        }
        for line in &self.qemu_conf {
            let _ = writeln!(qemu_conf, "{line}");
        }
        append(&d.join("etc/qemu.conf"), &qemu_conf);
        // Two daemons must differ in it (migration); libvirt refuses all-equal-digit uuids.
        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").expect("a random uuid");
        append(
            &d.join("etc/libvirtd.conf"),
            &format!("\nhost_uuid = \"{}\"\n", uuid.trim()),
        );
        for (name, contents) in &self.etc_files {
            std::fs::write(d.join("etc").join(name), contents).expect("write an /etc/libvirt file");
        }
        std::fs::write(d.join("inner.sh"), INNER_SCRIPT).expect("write inner.sh");

        let mut daemon = LibvirtDaemon {
            dir,
            options: self,
            libvirtd: None,
            virtlockd_pid: None,
        };
        daemon.spawn(daemon.options.virtlockd);
        daemon
    }
}

/// A private libvirtd in its own mount namespace (see the module's documentation). Dropping it
/// SIGKILLs the QEMU processes of its domains, libvirtd and virtlockd, and waits for each.
#[derive(Debug)]
pub struct LibvirtDaemon {
    dir: tempfile::TempDir,
    options: LibvirtBuilder,
    libvirtd: Option<Child>,
    virtlockd_pid: Option<u32>,
}

impl LibvirtDaemon {
    /// Options for a daemon: libvirt's nop lock manager and no virtlockd unless changed.
    pub fn builder() -> LibvirtBuilder {
        LibvirtBuilder::default()
    }

    /// A daemon with stock `lockd` and its virtlockd.
    pub fn lockd() -> Self {
        Self::builder()
            .lock_manager("lockd")
            .virtlockd(true)
            .start()
    }

    /// The private directory `D`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The connection URI for clients outside the namespace.
    pub fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.dir().join("run/libvirt/libvirt-sock").display()
        )
    }

    /// libvirtd's pid (a new one after [`LibvirtDaemon::restart`]).
    pub fn libvirtd_pid(&self) -> u32 {
        self.libvirtd.as_ref().expect("libvirtd running").id()
    }

    /// virtlockd's pid, if it was started.
    pub fn virtlockd_pid(&self) -> Option<u32> {
        self.virtlockd_pid
    }

    /// libvirtd's stdout and stderr (all its runs).
    pub fn libvirtd_log(&self) -> PathBuf {
        self.dir().join("libvirtd.out")
    }

    /// virtlockd's stdout and stderr.
    pub fn virtlockd_log(&self) -> PathBuf {
        self.dir().join("virtlockd.out")
    }

    /// QEMU's log of domain `name` (its command line and stderr).
    pub fn qemu_log(&self, name: &str) -> PathBuf {
        self.dir().join("log/qemu").join(format!("{name}.log"))
    }

    /// The ends of the daemons' and QEMUs' logs, for panic messages.
    pub fn diagnostics(&self) -> String {
        let mut logs = vec![self.libvirtd_log(), self.virtlockd_log()];
        if let Ok(rd) = std::fs::read_dir(self.dir().join("log/qemu")) {
            let mut q: Vec<PathBuf> = rd.filter_map(|e| Some(e.ok()?.path())).collect();
            q.sort();
            logs.extend(q);
        }
        let mut s = String::new();
        for p in logs {
            if let Ok(text) = std::fs::read_to_string(&p) {
                let tail = &text[text.len() - tail_len(&text, 3000)..];
                let _ = write!(
                    s,
                    "\n--- {} (last {} bytes) ---\n{tail}",
                    p.display(),
                    tail.len()
                );
            }
        }
        s
    }

    /// `virsh -c URI ARGS...`, bounded by [`VIRSH_TIMEOUT`] (the child is killed and we panic
    /// past it).
    pub fn virsh(&self, args: &[&str]) -> Output {
        self.virsh_timeout(args, VIRSH_TIMEOUT)
    }

    /// `virsh -c URI ARGS...`, bounded by `timeout`.
    pub fn virsh_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        let child = Command::new(sbin("virsh").expect("virsh installed"))
            .arg("-c")
            .arg(self.uri())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn virsh");
        let pid = child.id();
        // The output is read while waiting, on a thread, so a large output cannot block virsh.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(timeout) {
            Ok(out) => out.expect("wait for virsh"),
            Err(_) => {
                // Still our (unreaped) child: the pid cannot have been reused yet.
                kill_and_wait(pid);
                panic!(
                    "virsh {args:?} still running after {timeout:?}{}",
                    self.diagnostics()
                );
            }
        }
    }

    /// `virsh ARGS...` that must succeed: its stdout, or a panic with its stderr and the logs.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        assert!(
            out.status.success(),
            "virsh {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            self.diagnostics()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Defines (persistently) the domain of `xml`.
    pub fn define(&self, xml: &str) {
        let file = tempfile::Builder::new()
            .prefix("domain-")
            .suffix(".xml")
            .tempfile_in(self.dir())
            .expect("domain XML file");
        std::fs::write(file.path(), xml).expect("write domain XML");
        self.virsh_ok(&["define", &file.path().to_string_lossy()]);
    }

    /// `virsh domstate NAME`, trimmed (`running`, `shut off`, ...).
    pub fn domstate(&self, name: &str) -> String {
        self.virsh_ok(&["domstate", name]).trim().to_owned()
    }

    /// The pid of domain `name`'s QEMU, from libvirt's pid file, if it runs.
    pub fn qemu_pid(&self, name: &str) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.qemu_pid_file(name))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    fn qemu_pid_file(&self, name: &str) -> PathBuf {
        self.dir()
            .join("run/libvirt/qemu")
            .join(format!("{name}.pid"))
    }

    /// Stops libvirtd (SIGTERM, SIGKILL after [`STOP_TIMEOUT`]) and starts a new one on the same
    /// directory, in a fresh mount namespace with the same mounts (the old namespace goes away
    /// with its last process). virtlockd and running QEMUs are left alone: libvirtd reattaches
    /// to its domains from their status XML in `D/run/libvirt/qemu` (tried: also after a
    /// SIGKILL of libvirtd; the QEMU pid and virtlockd's lock stay, and the new libvirtd can
    /// destroy the domain).
    pub fn restart(&mut self) {
        let mut old = self.libvirtd.take().expect("libvirtd running");
        let pid = i32::try_from(old.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .expect("libvirtd's pid");
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        if wait_child(&mut old, STOP_TIMEOUT).is_none() {
            kill_child(&mut old);
        }
        self.spawn(false);
    }

    /// Starts libvirtd (and virtlockd if `virtlockd`) in a fresh namespace on `D`; waits until
    /// it serves.
    fn spawn(&mut self, virtlockd: bool) {
        let d = self.dir().to_owned();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("unshare.out"))
            .expect("open unshare.out");
        let _ = std::fs::remove_file(d.join("libvirtd.pid"));
        let mut cmd = Command::new("setsid");
        cmd.args(["unshare", "-m", "--propagation", "private", "/bin/sh"])
            .arg(d.join("inner.sh"))
            .arg(&d)
            .arg(if virtlockd { "1" } else { "0" })
            .arg(sbin("libvirtd").expect("libvirtd installed"))
            .arg(sbin("virtlockd").unwrap_or_else(|| "virtlockd".into()))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup unshare.out"))
            .stderr(out)
            // A clean environment: libvirt passes parts of its own (LD_LIBRARY_PATH, ...) on to
            // QEMU, and the test runner's LIBVIRT_* variables must not reach the daemon.
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LC_ALL", "C");
        if let Some(pd) = &self.options.plugin_dir {
            cmd.env("LIBVIRT_LOCK_MANAGER_PLUGIN_DIR", pd);
        }
        for (k, v) in &self.options.env {
            cmd.env(k, v);
        }
        // setsid execs unshare in the same process (a fresh child leads no process group),
        // unshare execs the script, the script execs libvirtd: the child is libvirtd.
        let child = cmd.spawn().expect("spawn setsid unshare (util-linux)");
        self.libvirtd = Some(child);
        self.wait_ready(virtlockd);
        let pid_file = std::fs::read_to_string(d.join("libvirtd.pid")).unwrap_or_default();
        assert_eq!(
            pid_file.trim(),
            self.libvirtd_pid().to_string(),
            "libvirtd is not our child (did setsid fork?)"
        );
        if virtlockd {
            let pid = std::fs::read_to_string(d.join("virtlockd.pid"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .expect("virtlockd's pid file");
            self.virtlockd_pid = Some(pid);
        }
        publish_caps(&d.join("cache/qemu"));
    }

    /// Waits until libvirtd answers `virsh version` (and virtlockd's socket exists, if
    /// started); panics with the logs if libvirtd exits or [`READY_TIMEOUT`] passes.
    fn wait_ready(&mut self, virtlockd: bool) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let sock = self.dir().join("run/libvirt/libvirt-sock");
        let lock_sock = self.dir().join("run/libvirt/virtlockd-sock");
        loop {
            if let Some(status) = self
                .libvirtd
                .as_mut()
                .expect("libvirtd spawned")
                .try_wait()
                .expect("wait for libvirtd")
            {
                self.libvirtd = None;
                panic!(
                    "libvirtd exited ({status}) before serving{}",
                    self.diagnostics()
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            // A listening socket queues the connection until libvirtd has set up its drivers,
            // so one `virsh version` waits out the QEMU probing itself.
            if sock.exists()
                && (!virtlockd || lock_sock.exists())
                && self
                    .virsh_timeout(&["version"], left.max(Duration::from_secs(1)))
                    .status
                    .success()
            {
                return;
            }
            if left.is_zero() {
                panic!(
                    "libvirtd not serving after {READY_TIMEOUT:?}{}",
                    self.diagnostics()
                );
            }
            // Bounded poll (by READY_TIMEOUT): libvirtd has no readiness notification without
            // systemd, and the socket appears only once it listens.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pids of the QEMUs of this daemon's domains (by their pid files) that still run.
    fn qemu_pids(&self) -> Vec<u32> {
        let Ok(rd) = std::fs::read_dir(self.dir().join("run/libvirt/qemu")) else {
            return Vec::new();
        };
        rd.filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            self.qemu_pid(name.strip_suffix(".pid")?)
        })
        .collect()
    }
}

impl Drop for LibvirtDaemon {
    fn drop(&mut self) {
        for pid in self.qemu_pids() {
            kill_if_named(pid, "qemu-system");
        }
        if let Some(mut c) = self.libvirtd.take() {
            kill_child(&mut c);
        }
        // Also when a failed start never got to record it.
        let virtlockd = self.virtlockd_pid.take().or_else(|| {
            std::fs::read_to_string(self.dir().join("virtlockd.pid"))
                .ok()?
                .trim()
                .parse()
                .ok()
        });
        if let Some(pid) = virtlockd {
            kill_if_named(pid, "virtlockd");
        }
        publish_caps(&self.dir().join("cache/qemu"));
    }
}

/// SIGKILLs `pid` and waits (bounded) until it is gone, if its command line contains `name`: the
/// pid comes from a pid file, which may be stale and its pid reused.
fn kill_if_named(pid: u32, name: &str) {
    let Ok(h) = ProcessHandle::open(pid, None) else {
        return;
    };
    // Read after the pidfd is open: from here on the pid cannot be reused under us.
    let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(name));
    if ours {
        let _ = h.signal(rustix::process::Signal::KILL);
        let gone = h.wait_exit(Some(crate::process::KILL_TIMEOUT));
        // Not while unwinding (a drop during a failed test): a second panic would abort.
        if !gone && !std::thread::panicking() {
            panic!("{name} {pid} still running after SIGKILL");
        }
    }
}

/// How many bytes at the end of `text` make at most `max` bytes on a character boundary.
fn tail_len(text: &str, max: usize) -> usize {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text.len() - start
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

/// Copies the contents of `from` into `to` (created), like `cp -a from/. to/` without owners.
fn copy_tree(from: &Path, to: &Path) {
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from.join("."))
        .arg(to)
        .status()
        .expect("run cp");
    assert!(ok.success(), "cp -a {} {}", from.display(), to.display());
}

/// Copies the files of a daemon's QEMU cache into [`CAPS_CACHE`] where they differ, each through
/// a temporary file and a rename, so daemons of parallel tests never see half a file.
fn publish_caps(cache: &Path) {
    fn walk(from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            let target = to.join(e.file_name());
            if e.file_type()?.is_dir() {
                walk(&e.path(), &target)?;
            } else if e.file_type()?.is_file() {
                let data = std::fs::read(e.path())?;
                if std::fs::read(&target).ok().as_ref() != Some(&data) {
                    let tmp = tempfile::NamedTempFile::new_in(to)?;
                    std::fs::write(tmp.path(), &data)?;
                    tmp.persist(&target).map_err(|e| e.error)?;
                }
            }
        }
        Ok(())
    }
    if cache.is_dir() {
        // Only a speed-up: a failure to share it is no test failure.
        let _ = walk(cache, Path::new(CAPS_CACHE));
    }
}

/// Escapes text for XML attributes and elements.
fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// A TCG domain: 64 MiB, one vCPU, q35, no OS, the qcow2 `disks` on virtio-blk (`vda`, `vdb`,
/// ...), and a virtio-scsi controller for hotplugged disks.
pub fn domain_xml(name: &str, uuid: Option<&str>, disks: &[&Path]) -> String {
    assert!(disks.len() <= 26, "at most 26 disks (vda..vdz)");
    let mut x = String::from("<domain type='qemu'>\n");
    let _ = writeln!(x, "  <name>{}</name>", xml_escape(name));
    if let Some(u) = uuid {
        let _ = writeln!(x, "  <uuid>{}</uuid>", xml_escape(u));
    }
    x.push_str(
        "  <memory unit='MiB'>64</memory>\n  <vcpu>1</vcpu>\n  \
         <os><type arch='x86_64' machine='q35'>hvm</type></os>\n  <devices>\n",
    );
    for (i, d) in disks.iter().enumerate() {
        let dev = char::from(b'a' + i as u8);
        let _ = write!(
            x,
            "    <disk type='file' device='disk'>\n      \
             <driver name='qemu' type='qcow2'/>\n      \
             <source file='{}'/>\n      \
             <target dev='vd{dev}' bus='virtio'/>\n    </disk>\n",
            xml_escape(&d.to_string_lossy())
        );
    }
    x.push_str("    <controller type='scsi' model='virtio-scsi'/>\n  </devices>\n</domain>\n");
    x
}

/// A libvirtd whose lock manager is vmlock's plugin, on the vmlockd of `run_dir`: the plugin goes
/// into `dir/lock-driver` as `vmlock.so` (a copy of the cdylib cargo built beside the running test
/// or bench, which must have `vmlock-libvirt` as a dev-dependency), and `qemu-vmlock.conf` names
/// `run_dir` and the `vmlock` program for the holders.
pub fn vmlock_builder(dir: &Path, run_dir: &Path, vmlock: &Path) -> LibvirtBuilder {
    let plugins = dir.join("lock-driver");
    std::fs::create_dir_all(&plugins).expect("plugin dir");
    let exe = std::env::current_exe().expect("current exe");
    let built = exe.parent().expect("exe dir").join("libvmlock_libvirt.so");
    assert!(built.is_file(), "{} not built", built.display());
    // Copied beside and renamed over: a libvirtd already running has the old file mapped, and
    // rewriting that inode in place would change the code under it.
    let partial = plugins.join(".vmlock.so.partial");
    std::fs::copy(&built, &partial).expect("copy plugin");
    std::fs::rename(&partial, plugins.join("vmlock.so")).expect("install plugin");
    let conf = format!(
        "runtime_dir = \"{}\"\nvmlock_binary = \"{}\"\n",
        run_dir.display(),
        vmlock.display()
    );
    LibvirtDaemon::builder()
        .lock_manager("vmlock")
        .plugin_dir(&plugins)
        .etc_file("qemu-vmlock.conf", conf)
}
