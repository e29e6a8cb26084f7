//! A mount namespace of one's own, for tests and the bench that mount things (FUSE, bind mounts,
//! tmpfs) without touching the host.

use nix::mount::{mount, MsFlags};
use std::io;

/// Moves the calling thread (and so every thread and process it starts from now on) into a new
/// mount namespace whose mounts do not propagate back to the host. Other threads of the process
/// keep the host's view. Needs `CAP_SYS_ADMIN`.
pub fn enter_private() -> io::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(io::Error::from)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_in_a_private_namespace_stays_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().to_owned();
        let inside = std::thread::spawn(move || {
            enter_private().expect("a private mount namespace (the test needs root)");
            mount(
                Some("tmpfs"),
                &target,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .expect("mount tmpfs");
            std::fs::write(target.join("inside"), b"x").expect("write");
            target.join("inside").exists()
        })
        .join()
        .expect("thread");
        assert!(inside);
        // The host's view (this thread) never saw the tmpfs.
        assert!(!dir.path().join("inside").exists());
    }
}
