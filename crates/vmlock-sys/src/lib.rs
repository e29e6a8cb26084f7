//! The seam to Linux: every system call vmlock's daemon, clients, drivers and bench make about
//! locks and processes lives here, so the lock core and the protocol are plain Rust.
//!
//! - [`child`]: a clean start (signals, session, descriptors) for the daemon a client spawns;
//! - [`disk`]: opening lock targets (only regular files and block devices, never blocking);
//! - [`ofd`]: open-file-description byte-range locks;
//! - [`pidfd`]: process handles that cannot be fooled by pid reuse;
//! - [`fdpass`]: descriptors over `SCM_RIGHTS`;
//! - [`lobby`]: accepted connections wait, without a thread, until they send something;
//! - [`procfs`]: naming the process that holds a lock; QEMU processes and their writable disks.

pub mod child;
pub mod disk;
pub mod fdpass;
pub mod lobby;
pub mod mountns;
pub mod ofd;
pub mod pidfd;
pub mod procfs;
