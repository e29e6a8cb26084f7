//! libvirt's `vmlock` lock-driver plugin: `vmlock.so` in libvirt's lock-driver directory, chosen
//! by `lock_manager = "vmlock"` in `qemu.conf`.
//!
//! - [`abi`]: the C ABI libvirt loads (`virLockDriverImpl`): thin `extern "C"` shims that copy
//!   their arguments, catch every panic and report errors through libvirt;
//! - [`domain`]: what each call does, in safe Rust;
//! - [`config`]: the configuration file, `qemu-vmlock.conf`;
//! - [`spawn`]: starting a domain's holder from libvirt's pre-exec child (plain system calls);
//! - [`report`]: errors to libvirt, resolved at run time (no link against libvirt).
//!
//! The design — who keeps the lock descriptions, why the holder is QEMU's child, what each
//! libvirt call becomes — is in ARCHITECTURE.md and docs/libvirt.md.

pub mod abi;
pub mod config;
pub mod domain;
pub mod report;
pub mod spawn;
