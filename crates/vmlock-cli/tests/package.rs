//! The Debian package (scripts/build-deb.sh), installed on this machine with dpkg: man pages and
//! completions in place, a guest run with the installed `vmlock`, an upgrade while the guest runs
//! (the lock is kept, also across the new daemon), and a purge that leaves no file behind.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use vmlock_testkit::process::{kill_child, read_line, wait_until};
use vmlock_testkit::vmlockd as vmlockd_kit;

/// The package versions this test installs (never a real release's).
const V1: &str = "0.0.1~pkgtest1";
const V2: &str = "0.0.1~pkgtest2";

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn installed_version() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Status} ${Version}", "vmlock"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.starts_with("install ok installed")
        .then(|| text.rsplit(' ').next().unwrap_or_default().to_owned())
}

/// Purges the test's package however the test ends.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        if installed_version().is_some_and(|v| v.contains("~pkgtest")) {
            let _ = Command::new("dpkg").args(["--purge", "vmlock"]).output();
        }
    }
}

fn build(version: &str, out: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let plugin = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("libvmlock_libvirt.so");
    let built = run(Command::new("bash")
        .arg(root.join("scripts/build-deb.sh"))
        .args([
            "--version",
            version,
            "--fast",
            "--vmlock",
            env!("CARGO_BIN_EXE_vmlock"),
        ])
        .arg("--plugin")
        .arg(plugin)
        .arg("--out")
        .arg(out));
    PathBuf::from(String::from_utf8_lossy(&built.stdout).trim())
}

#[test]
fn the_package_installs_upgrades_under_a_running_guest_and_purges_cleanly() {
    if !nix::unistd::geteuid().is_root()
        || Command::new("dpkg-deb").arg("--version").output().is_err()
    {
        eprintln!("skipped: needs root and dpkg-deb");
        return;
    }
    if let Some(v) = installed_version().filter(|v| !v.contains("~pkgtest")) {
        eprintln!("skipped: vmlock {v} is installed on this machine; not replacing it");
        return;
    }
    let _purge = Purge;
    let work = tempfile::tempdir().unwrap();
    let run_dir = work.path().join("run");
    let disk = work.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();

    run(Command::new("dpkg").arg("-i").arg(build(V1, work.path())));
    assert_eq!(installed_version().as_deref(), Some(V1));
    // Man pages (one per command, and the configuration files) and bash completions.
    for page in ["vmlock-run", "vmlock", "vmlockd.toml", "qemu-vmlock.conf"] {
        let shown = run(Command::new("man")
            .arg(page)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80"));
        assert!(
            String::from_utf8_lossy(&shown.stdout).contains("NAME"),
            "man {page} shows no page"
        );
    }
    run(Command::new("bash").args([
        "-c",
        "source /usr/share/bash-completion/completions/vmlock && complete -p vmlock",
    ]));
    assert!(Path::new("/usr/lib/x86_64-linux-gnu/libvirt/lock-driver/vmlock.so").is_file());

    // A guest under the installed program.
    let mut guest = Command::new("/usr/bin/vmlock")
        .arg("--runtime-dir")
        .arg(&run_dir)
        .args(["run", "--name", "pkg", "--disk"])
        .arg(&disk)
        .args(["--", "sleep", "600"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = guest.stderr.take().unwrap();
    loop {
        let line = read_line(&mut stderr, Duration::from_secs(30))
            .unwrap()
            .expect("the supervisor exited");
        if line.contains("holds") {
            break;
        }
    }
    let held = || {
        let out = Command::new("/usr/bin/vmlock")
            .arg("--runtime-dir")
            .arg(&run_dir)
            .args(["status", "--json"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("\"pkg\"")
    };
    assert!(held());

    // Upgrade with the guest running; then the daemon is replaced by the new program's.
    run(Command::new("dpkg").arg("-i").arg(build(V2, work.path())));
    assert_eq!(installed_version().as_deref(), Some(V2));
    vmlockd_kit::kill_in(&run_dir);
    // Bounded poll: the status call starts the new daemon; the supervisor reconnects by itself.
    wait_until(
        "the lock is back in the new daemon",
        Duration::from_secs(20),
        Duration::from_millis(50),
        held,
    );
    assert!(
        guest.try_wait().unwrap().is_none(),
        "the guest died in the upgrade"
    );
    let intruder = Command::new("/usr/bin/vmlock")
        .arg("--runtime-dir")
        .arg(&run_dir)
        .args(["run", "--name", "intruder", "--disk"])
        .arg(&disk)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert!(!intruder.status.success());
    assert!(String::from_utf8_lossy(&intruder.stderr).contains("\"pkg\""));
    kill_child(&mut guest);
    vmlockd_kit::kill_in(&run_dir);

    // Purge: every file the package installed is gone, conffiles included.
    let listed = run(Command::new("dpkg").args(["-L", "vmlock"]));
    let files: Vec<PathBuf> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .collect();
    assert!(files.len() > 20, "{files:?}");
    run(Command::new("dpkg").args(["--purge", "vmlock"]));
    let left: Vec<&PathBuf> = files.iter().filter(|p| p.exists()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    for path in [
        "/etc/vmlock",
        "/etc/vmlock/vmlockd.toml",
        "/etc/libvirt/qemu-vmlock.conf",
    ] {
        assert!(!Path::new(path).exists(), "{path} left behind");
    }
}
