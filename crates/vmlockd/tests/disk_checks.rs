//! What a real vmlockd agrees to open as a disk: only regular files and block devices, reached
//! without blocking and never through its own descriptors; and, in indirect mode, one lock file
//! per inode whatever alias (hard link, bind mount of the file or of its directory) names it.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{locked_by_someone, start, Daemon, Fixture};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;
use vmlock::conformance::{disk, vm, Guest, Harness};
use vmlock::{domain, AcquireOptions, DiskMode, Error, Resource};
use vmlock_client::proto::{Reply, Request};

/// Longest any refusal may take: far more than a refusal needs, far less than a blocked open.
const BOUND: Duration = Duration::from_secs(5);

/// Runs `f` on its own thread; fails the test if it has not answered within [`BOUND`].
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(BOUND)
        .unwrap_or_else(|_| panic!("{what}: no answer within {BOUND:?} (the daemon blocked)"))
}

/// Every VM the daemon lists, with what it holds.
fn held(f: &Fixture) -> Vec<(String, usize)> {
    let mut conn = f.daemon.endpoint().connect().unwrap();
    match conn.call(&Request::Status, &[]).unwrap() {
        Reply::Status(s) => s
            .into_iter()
            .map(|o| (o.vm.name, o.resources.len()))
            .collect(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn only_regular_files_and_block_devices_are_locked() {
    let f = Fixture::new(Daemon::start());
    let fifo = f.disk_dir().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let dir = f.disk_dir().join("a-directory");
    std::fs::create_dir(&dir).unwrap();
    let g = Guest::spawn();
    // A VM that holds nothing, so that the raw requests below reach the table itself (the API
    // would refuse some of these paths before they are sent).
    let m = start(&f, "vm-a", &g, &[]).unwrap();
    let uuid = m.vm().uuid.to_string();
    let cases: [(PathBuf, &str); 6] = [
        (fifo.clone(), "FIFO"),
        (dir, "directory"),
        ("/dev/null".into(), "character device"),
        (
            f.disk_dir().join("forged\nvm-b  /img/x"),
            "control character",
        ),
        ("/proc/self/fd/0".into(), "magic link"),
        ("/proc/self/status".into(), "procfs"),
    ];
    for (path, expect) in cases {
        for mode in [DiskMode::Exclusive, DiskMode::Shared] {
            let resource = Resource::Disk {
                path: path.clone(),
                mode,
            };
            let endpoint = f.daemon.endpoint();
            let request = Request::Acquire {
                uuid: uuid.clone(),
                resources: vec![resource],
                flags: Default::default(),
            };
            let e = bounded(&format!("{path:?}"), move || {
                endpoint.connect().unwrap().call(&request, &[]).unwrap_err()
            });
            assert!(
                matches!(&e, Error::InvalidResource { reason, .. } if reason.contains(expect)),
                "{path:?} ({mode}): {e}"
            );
        }
        assert_eq!(held(&f), vec![("vm-a".to_owned(), 0)], "after {path:?}");
    }
    // A lease file is opened the same way.
    let lease = Resource::Lease(vmlock::Lease {
        lockspace: "ls".into(),
        key: "k".into(),
        path: fifo.clone(),
        offset: 0,
    });
    let endpoint = f.daemon.endpoint();
    let request = Request::Acquire {
        uuid: uuid.clone(),
        resources: vec![lease],
        flags: Default::default(),
    };
    let e = bounded("a FIFO lease", move || {
        endpoint.connect().unwrap().call(&request, &[]).unwrap_err()
    });
    assert!(e.to_string().contains("FIFO"), "{e}");
    // And through the API, as a VM manager would ask: a clear error at once, nothing held.
    let plugin = f.plugin.clone();
    let g2 = Guest::spawn();
    let vm_b = vm("vm-b", &g2);
    let r = Resource::disk(&fifo, DiskMode::Exclusive).unwrap();
    let e = bounded("a FIFO through the API", move || {
        domain::process_start(&plugin, vm_b, [r], &AcquireOptions::default())
            .map(|_| ())
            .unwrap_err()
    });
    assert!(e.to_string().contains("FIFO"), "{e}");
    assert!(held(&f).iter().all(|(_, n)| *n == 0), "{:?}", held(&f));
    // The daemon still serves: a real disk is granted.
    let d = disk(&f, "real", DiskMode::Exclusive);
    let _b = start(&f, "vm-c", &g2, std::slice::from_ref(&d)).unwrap();
    assert!(locked_by_someone(d.path()));
}

/// Runs `body` on a thread of its own in a private mount namespace (so bind mounts never reach
/// the host); the daemon and guests it starts inherit the namespace.
fn in_private_mount_namespace(body: impl FnOnce() + Send + 'static) {
    let (done, finished) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        vmlock_sys::mountns::enter_private()
            .expect("a private mount namespace: the test needs root");
        body();
        let _ = done.send(());
    });
    // A panicking body drops `done` without sending: that ends the wait too.
    if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        finished.recv_timeout(Duration::from_secs(60))
    {
        panic!("test body timed out");
    }
    if let Err(p) = t.join() {
        std::panic::resume_unwind(p);
    }
}

fn bind(from: &Path, to: &Path) {
    nix::mount::mount(
        Some(from),
        to,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap_or_else(|e| panic!("bind {} on {}: {e}", from.display(), to.display()));
}

#[test]
fn indirect_mode_gives_one_lock_to_every_alias_of_a_disk() {
    in_private_mount_namespace(|| {
        let lockspace = tempfile::tempdir().unwrap();
        let f = Fixture::new(Daemon::start_with_config(Some(&format!(
            "file_lockspace_dir = \"{}\"",
            lockspace.path().display()
        ))));
        let images = f.disk_dir().join("images");
        std::fs::create_dir(&images).unwrap();
        let path = images.join("a.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let d = Resource::disk(&path, DiskMode::Exclusive).unwrap();

        // Aliases: a hard link, a bind mount of the file, a bind mount of its directory.
        let hard = f.disk_dir().join("hard.img");
        std::fs::hard_link(&path, &hard).unwrap();
        let file_mount = f.disk_dir().join("bound.img");
        std::fs::write(&file_mount, b"").unwrap();
        bind(&path, &file_mount);
        let dir_mount = f.disk_dir().join("bound-dir");
        std::fs::create_dir(&dir_mount).unwrap();
        bind(&images, &dir_mount);
        let aliases = [hard, file_mount.clone(), dir_mount.join("a.img")];

        let (ga, gb) = (Guest::spawn(), Guest::spawn());
        let a = start(&f, "vm-a", &ga, std::slice::from_ref(&d)).unwrap();
        let (_, id) = vmlock_sys::disk::identify(&path).unwrap();
        let lock_file = lockspace.path().join(vmlockd::host::lockspace_name(&id));
        assert!(locked_by_someone(&lock_file), "{}", lock_file.display());
        assert_eq!(
            std::fs::read_dir(lockspace.path()).unwrap().count(),
            1,
            "one lock file"
        );
        for alias in &aliases {
            let r = Resource::disk(alias, DiskMode::Exclusive).unwrap();
            let e = start(&f, "vm-b", &gb, &[r]).unwrap_err();
            assert!(
                matches!(e, Error::Busy { .. }),
                "{} got a second lock: {e}",
                alias.display()
            );
        }
        assert_eq!(std::fs::read_dir(lockspace.path()).unwrap().count(), 1);
        drop(a);
        for m in [&file_mount, &dir_mount] {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    });
}
