//! libvirt's `vmlock` lock-driver plugin in a real, private libvirtd running real QEMU (TCG)
//! domains: the lock taken before QEMU opens its disk, refusals that name the holder, the disk
//! freed when QEMU dies with no libvirt call, daemon and libvirtd restarts with domains running,
//! pause and resume, hotplug and unplug, and a live migration between two libvirt daemons.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use vmlock_testkit::libvirt::{self, domain_xml, LibvirtDaemon};
use vmlock_testkit::process::wait_until;
use vmlock_testkit::qemu;
use vmlock_testkit::vmlockd as vmlockd_kit;

/// How long a change the daemon makes on its own (a guest's exit seen on its pidfd) may take.
const SETTLE: Duration = Duration::from_secs(10);

/// One host: a private vmlockd (started by the CLI in a private runtime directory, killed by pid
/// at the end) and the plugin where libvirtd loads it.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("lock-driver");
        std::fs::create_dir_all(&plugins).unwrap();
        // The cdylib cargo built beside this test (a dev-dependency), installed as libvirt names
        // plugins: NAME.so.
        let exe = std::env::current_exe().unwrap();
        let built = exe.parent().unwrap().join("libvmlock_libvirt.so");
        assert!(built.is_file(), "{} not built", built.display());
        std::fs::copy(&built, plugins.join("vmlock.so")).unwrap();
        let host = Host { dir };
        // The daemon is started from here (outside any libvirtd's namespace).
        let out = host.vmlock(&["status"]);
        assert!(out.status.success(), "{}", text(&out));
        host
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn vmlock(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_vmlock"))
            .arg("--runtime-dir")
            .arg(self.run_dir())
            .args(args)
            .env("VMLOCK_LOG", "warn")
            .output()
            .unwrap()
    }

    /// `vmlock status --json`: (disk path, VM name) of every held disk.
    fn held(&self) -> Vec<(String, String)> {
        let out = self.vmlock(&["status", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["resource"].as_str().unwrap_or_default().to_owned(),
                    r["vm"]["name"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    fn holder_of(&self, disk: &Path) -> Option<String> {
        let disk = disk.display().to_string();
        self.held()
            .into_iter()
            .find(|(r, _)| r.contains(&disk))
            .map(|(_, vm)| vm)
    }

    /// A private libvirtd whose lock manager is vmlock, on this host's daemon.
    fn libvirtd(&self) -> LibvirtDaemon {
        let conf = format!(
            "runtime_dir = \"{}\"\nvmlock_binary = \"{}\"\n",
            self.run_dir().display(),
            env!("CARGO_BIN_EXE_vmlock")
        );
        LibvirtDaemon::builder()
            .lock_manager("vmlock")
            .plugin_dir(&self.dir.path().join("lock-driver"))
            .etc_file("qemu-vmlock.conf", conf)
            .start()
    }

    fn qcow2(&self, name: &str) -> PathBuf {
        qemu::qcow2(self.dir.path(), name)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        vmlockd_kit::kill_in(&self.run_dir());
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn skip() -> bool {
    if !libvirt::available() || !qemu::available() {
        eprintln!(
            "skipped: libvirtd, virsh or QEMU is not installed (scripts/install-test-deps.sh)"
        );
        return true;
    }
    false
}

fn define(libvirtd: &LibvirtDaemon, name: &str, disks: &[&Path]) -> String {
    let uuid = uuid::Uuid::new_v4().to_string();
    libvirtd.define(&domain_xml(name, Some(&uuid), disks));
    uuid
}

#[test]
fn a_domain_holds_its_disk_a_second_is_refused_by_name_and_destroy_frees_it() {
    if skip() {
        return;
    }
    let host = Host::new();
    let libvirtd = host.libvirtd();
    let disk = host.qcow2("a");
    define(&libvirtd, "first", &[&disk]);
    define(&libvirtd, "second", &[&disk]);

    libvirtd.virsh_ok(&["start", "first"]);
    assert_eq!(libvirtd.domstate("first"), "running");
    assert_eq!(
        host.holder_of(&disk).as_deref(),
        Some("first"),
        "{:?}",
        host.held()
    );

    // vmlock refuses in libvirt's pre-exec child, before QEMU opens the disk (QEMU's own image
    // locking would otherwise be what refuses, with its own message).
    let out = libvirtd.virsh(&["start", "second"]);
    assert!(!out.status.success(), "second started: {}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vmlock"), "not vmlock's refusal: {err}");
    assert!(err.contains("\"first\""), "the holder is not named: {err}");
    assert!(
        !err.contains("Failed to get \"write\" lock"),
        "QEMU refused, not vmlock: {err}"
    );
    assert_ne!(libvirtd.domstate("second"), "running");
    assert_eq!(host.holder_of(&disk).as_deref(), Some("first"));

    // Destroy makes no plugin call: the disk is freed from QEMU's exit alone.
    libvirtd.virsh_ok(&["destroy", "first"]);
    // Bounded poll: the daemon unlocks on the guest's pidfd, asynchronously to virsh's return.
    wait_until(
        "the disk is freed",
        SETTLE,
        Duration::from_millis(10),
        || host.holder_of(&disk).is_none(),
    );
    libvirtd.virsh_ok(&["start", "second"]);
    assert_eq!(host.holder_of(&disk).as_deref(), Some("second"));
    libvirtd.virsh_ok(&["destroy", "second"]);
}
