//! The seam to Linux: every system call the daemon and its clients make lives below this module,
//! so the lock table and the protocol are plain Rust.

pub mod fdpass;
pub mod ofd;
pub mod pidfd;
pub mod procfs;
