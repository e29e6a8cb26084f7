//! `vmlock audit`: every QEMU process on the host, each disk image it has open for writing, and
//! whether a vmlock lease covers it — so a VM started outside vmlock is found before it shares a
//! disk with one started inside.
//!
//! Two independent facts per disk: vmlockd's table (the held disks' paths, matched by inode,
//! and the VM holding each), and the kernel (a lock on byte 0 of the image, where vmlock locks,
//! held by any description). The table says who; the kernel says whether anything excludes a
//! second writer right now, even with no daemon running.

use crate::Ctx;
use serde::Serialize;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmlock::DiskMode;
use vmlock_client::proto::{OwnerStatus, VmIdentity};
use vmlock_sys::disk::Identity;
use vmlock_sys::ofd::{self, LockKind};
use vmlock_sys::procfs::{self, WritableDisk};

/// Exit status when a writable disk runs without a lease.
pub const UNPROTECTED_EXIT: i32 = 2;

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Print JSON (an array of objects, one per QEMU process and writable disk) instead of a
    /// table.
    #[arg(long)]
    json: bool,
    /// Audit only these QEMU processes (repeatable); a pid that is not a running QEMU is noted
    /// on stderr and skipped.
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// How long one disk's storage may take to answer (a `stat`, an open) before the audit
    /// reports it as not answering, with exit status 1, and goes on with the others: a hung NFS
    /// or FUSE mount costs its own disks, not the audit.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    storage_timeout_ms: u64,
}

/// What covers one writable disk of one QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// vmlockd's table holds it for this QEMU's VM.
    Leased,
    /// vmlockd's table holds it for another VM: this QEMU writes to a disk leased to someone
    /// else (e.g. a QEMU started by hand with `locking=off`).
    LeasedToAnotherVm,
    /// Not in vmlockd's table, but another description holds a lock on byte 0 (another
    /// runtime directory's vmlockd, virtlockd, or a vmlockd that is not running).
    Locked,
    /// Nothing: another VM could open the same disk for writing.
    Unprotected,
    /// Its storage did not answer (`--storage-timeout-ms`): not audited. Only the path, from
    /// `/proc`, is known.
    Unanswered,
}

impl Status {
    /// Another VM could open the disk for writing beside this QEMU (exit status 2). Not said of
    /// a disk that was not audited.
    fn unprotected(self) -> bool {
        matches!(self, Status::Unprotected | Status::LeasedToAnotherVm)
    }
}

/// The kernel's answer for byte 0 of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelLock {
    /// A write lock (an exclusive lease).
    Write,
    /// A read lock (a shared lease).
    Read,
    /// No lock.
    None,
    /// Not checked: the path no longer reaches the inode QEMU has open (renamed, or in another
    /// mount namespace), or it could not be opened.
    Unknown,
}

/// A disk as vmlockd's table holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lease {
    /// The holding VM's name.
    pub vm_name: String,
    /// Its uuid.
    pub vm_uuid: String,
    /// Its guest pid (0 when unknown).
    pub vm_pid: u32,
    /// `exclusive`, `shared` or `readonly`.
    pub mode: String,
    /// The lease was lost under the running guest.
    pub lost: bool,
    #[serde(skip)]
    identity: Identity,
}

impl Lease {
    /// A readonly lease takes no lock and a lost one may no longer hold it: neither covers a
    /// writer.
    fn live(&self) -> bool {
        !self.lost && self.mode != DiskMode::ReadOnly.to_string()
    }
}

/// One row of the report: a writable disk of one QEMU process. Field names are stable.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// QEMU's pid.
    pub pid: u32,
    /// The guest name from QEMU's `-name` argument, if any.
    pub name: Option<String>,
    /// The disk's path, as the kernel names it in QEMU's mount namespace.
    pub disk: String,
    /// `st_dev` of the disk (`null` when its storage did not answer).
    pub dev: Option<u64>,
    /// `st_ino` of the disk (`null` when its storage did not answer).
    pub ino: Option<u64>,
    /// For a block device, its `st_rdev`.
    pub block_device: Option<u64>,
    /// The verdict.
    pub status: Status,
    /// The lease in vmlockd's table covering (or contradicting) it.
    pub lease: Option<Lease>,
    /// Whether vmlockd's table was consulted.
    pub daemon_checked: bool,
    /// The kernel's lock on byte 0.
    pub byte0_lock: KernelLock,
    /// QEMU holds its own image-locking bytes on it (off with `locking=off`).
    pub qemu_image_locks: bool,
}

impl Row {
    /// The status in words, for the table.
    fn describe(&self) -> String {
        let vm = |l: &Lease| format!("VM {} ({}, pid {})", l.vm_name, l.vm_uuid, l.vm_pid);
        match (&self.status, &self.lease) {
            (Status::Leased, Some(l)) => format!("leased by {}", vm(l)),
            (Status::LeasedToAnotherVm, Some(l)) => {
                format!("UNPROTECTED: written here but leased to {}", vm(l))
            }
            (Status::Locked, _) if self.daemon_checked => {
                "locked at byte 0 but not in vmlockd's table".to_owned()
            }
            (Status::Locked, _) => "locked at byte 0 (vmlockd not consulted)".to_owned(),
            (Status::Unanswered, _) => {
                "NOT AUDITED: its storage did not answer (hung mount?)".to_owned()
            }
            _ if self.byte0_lock == KernelLock::Unknown => {
                "UNPROTECTED (no lease; byte 0 not checked: path does not reach the open file)"
                    .to_owned()
            }
            _ => "UNPROTECTED".to_owned(),
        }
    }
}

/// The guest name from a QEMU command line: `-name NAME`, `-name guest=NAME,...` or
/// `-name NAME,process=...` (also spelt `--name`); `,,` is QEMU's escaped comma.
pub fn qemu_name(args: &[String]) -> Option<String> {
    let value = args
        .windows(2)
        .find(|w| w[0] == "-name" || w[0] == "--name")
        .map(|w| w[1].as_str())?;
    // Split QEMU's option string on single commas.
    let mut parts = vec![String::new()];
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                parts.last_mut()?.push(',');
            }
            ',' => parts.push(String::new()),
            c => parts.last_mut()?.push(c),
        }
    }
    let first = parts.first().filter(|p| !p.contains('=')).cloned();
    first
        .or_else(|| {
            parts
                .iter()
                .find_map(|p| p.strip_prefix("guest=").map(str::to_owned))
        })
        .filter(|n| !n.is_empty())
}

/// The verdict for a disk QEMU `pid` writes, from the leases on its inode and the kernel's lock.
pub fn classify<'a>(
    pid: u32,
    leases: &[&'a Lease],
    byte0: KernelLock,
) -> (Status, Option<&'a Lease>) {
    let mut live = leases.iter().copied().filter(|l| l.live());
    // A pid of 0: a supervisor that did not report its guest; its lease is taken as this VM's.
    if let Some(l) = live.clone().find(|l| l.vm_pid == pid || l.vm_pid == 0) {
        return (Status::Leased, Some(l));
    }
    if let Some(l) = live.next() {
        return (Status::LeasedToAnotherVm, Some(l));
    }
    let any = leases.first().copied();
    match byte0 {
        KernelLock::Write | KernelLock::Read => (Status::Locked, any),
        KernelLock::None | KernelLock::Unknown => (Status::Unprotected, any),
    }
}

/// Whether two identities are the same disk: one block device (whatever its node), or one
/// inode.
fn same_disk(a: &Identity, b: &Identity) -> bool {
    match (a.block_device, b.block_device) {
        (Some(x), Some(y)) => x == y,
        _ => (a.dev, a.ino) == (b.dev, b.ino),
    }
}

fn identity(d: &WritableDisk) -> Identity {
    Identity {
        dev: d.dev,
        ino: d.ino,
        block_device: d.block_device,
    }
}

/// vmlockd's held disks, each with the inode its path reaches now. A path that cannot be
/// identified (removed, storage gone) is skipped: it cannot be what a QEMU has open by inode.
/// One whose storage does not answer within `timeout` is skipped too, and returned by name.
fn leases(owners: &[OwnerStatus], timeout: Duration) -> (Vec<Lease>, Vec<String>) {
    let held: Vec<(
        &VmIdentity,
        &vmlock_client::proto::HeldResource,
        &Path,
        DiskMode,
    )> = owners
        .iter()
        .flat_map(|o| o.resources.iter().map(move |r| (&o.vm, r)))
        .filter_map(|(vm, r)| match &r.resource {
            // A network disk has no file on this host for a QEMU to have open.
            vmlock::Resource::Disk { path, mode } if r.resource.network_id().is_none() => {
                Some((vm, r, path.as_path(), *mode))
            }
            _ => None,
        })
        .collect();
    let paths: Vec<PathBuf> = held.iter().map(|(_, _, p, _)| p.to_path_buf()).collect();
    let identified = crate::bounded::map(paths, timeout, |path| {
        vmlock_sys::disk::identify(&path).ok().map(|(_, id)| id)
    });
    let mut leases = Vec::new();
    let mut unanswered = Vec::new();
    for ((vm, r, path, mode), id) in held.into_iter().zip(identified) {
        match id {
            Some(Some(identity)) => leases.push(Lease {
                vm_name: vm.name.clone(),
                vm_uuid: vm.uuid.clone(),
                vm_pid: vm.pid,
                mode: mode.to_string(),
                lost: r.lost,
                identity,
            }),
            Some(None) => {}
            None => unanswered.push(path.display().to_string()),
        }
    }
    (leases, unanswered)
}

/// The lock another description holds on byte 0 of the disk, opened by its path (never through
/// QEMU's `/proc/PID/fd` link: `vmlock_sys::disk` refuses magic links, and opens nothing but
/// regular files and block devices, without blocking).
fn byte0_lock(disk: &WritableDisk) -> KernelLock {
    let Ok((file, id)) = vmlock_sys::disk::open(&disk.path, false) else {
        return KernelLock::Unknown;
    };
    if !same_disk(&id, &identity(disk)) {
        return KernelLock::Unknown;
    }
    // Probing for a write lock reports any lock: read locks conflict with it too.
    match ofd::probe(file.as_fd(), LockKind::Exclusive, 0, 1) {
        Ok(Some(c)) if c.kind == LockKind::Exclusive => KernelLock::Write,
        Ok(Some(_)) => KernelLock::Read,
        Ok(None) => KernelLock::None,
        Err(_) => KernelLock::Unknown,
    }
}

/// Runs the audit; returns the exit status.
pub fn run(ctx: &Ctx, args: &AuditArgs) -> anyhow::Result<i32> {
    let mut errors = false;
    let (owners, daemon_checked) = match crate::held_resources(ctx, false) {
        Ok(owners) => (owners, true),
        Err(e) => {
            // No daemon: the kernel's byte-0 lock is still a fact worth reporting.
            if !matches!(e, vmlock::Error::ServiceUnavailable { .. }) {
                errors = true;
            }
            say!("vmlock: no lease table ({e}); checking the kernel's locks only");
            (Vec::new(), false)
        }
    };
    let timeout = Duration::from_millis(args.storage_timeout_ms);
    let (leases, unanswered) = leases(&owners, timeout);
    for path in unanswered {
        say!(
            "vmlock: error: leased disk {path}: its storage did not answer within {timeout:?}; \
             a QEMU writing it is not matched to its lease"
        );
        errors = true;
    }

    let pids = if args.pids.is_empty() {
        procfs::qemu_pids().map_err(|e| anyhow::anyhow!("listing /proc: {e}"))?
    } else {
        let mut pids = Vec::new();
        for &pid in &args.pids {
            if procfs::is_qemu_pid(pid) {
                pids.push(pid);
            } else {
                say!("vmlock: pid {pid} is not a running QEMU process; skipped");
            }
        }
        pids
    };

    let mut rows = Vec::new();
    for pid in pids {
        let descriptors = match procfs::read_write_descriptors(pid) {
            Ok(d) => d,
            // Exited since it was listed: nothing left to protect.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                say!("vmlock: error: QEMU pid {pid}: reading its descriptors: {e}");
                errors = true;
                continue;
            }
        };
        let name = procfs::cmdline(pid).ok().and_then(|a| qemu_name(&a));
        // Each descriptor's file is stat'ed and its byte 0 probed on a worker, with a bound.
        let inspected = crate::bounded::map(descriptors.clone(), timeout, |d| {
            d.inspect().map(|disk| {
                let byte0 = byte0_lock(&disk);
                (disk, byte0)
            })
        });
        let mut disks: Vec<WritableDisk> = Vec::new();
        // Byte 0 of each disk, as probed through its first descriptor (one inode, one answer).
        let mut byte0_locks: Vec<KernelLock> = Vec::new();
        let mut stuck: Vec<&procfs::OpenDescriptor> = Vec::new();
        for (descriptor, result) in descriptors.iter().zip(inspected) {
            match result {
                Some(Some((disk, byte0))) => {
                    if procfs::add_disk(&mut disks, disk) {
                        byte0_locks.push(byte0);
                    }
                }
                Some(None) => {}
                None => stuck.push(descriptor),
            }
        }
        for (disk, byte0) in disks.into_iter().zip(byte0_locks) {
            let on_disk: Vec<&Lease> = leases
                .iter()
                .filter(|l| same_disk(&l.identity, &identity(&disk)))
                .collect();
            let (status, lease) = classify(pid, &on_disk, byte0);
            rows.push(Row {
                pid,
                name: name.clone(),
                disk: disk.path.display().to_string(),
                dev: Some(disk.dev),
                ino: Some(disk.ino),
                block_device: disk.block_device,
                status,
                lease: lease.cloned(),
                daemon_checked,
                byte0_lock: byte0,
                qemu_image_locks: disk.qemu_image_locks,
            });
        }
        for descriptor in stuck {
            say!(
                "vmlock: error: QEMU pid {pid}: {} (descriptor {}) did not answer within \
                 {timeout:?} (hung storage?); not audited",
                descriptor.path.display(),
                descriptor.fd
            );
            errors = true;
            rows.push(Row {
                pid,
                name: name.clone(),
                disk: descriptor.path.display().to_string(),
                dev: None,
                ino: None,
                block_device: None,
                status: Status::Unanswered,
                lease: None,
                daemon_checked,
                byte0_lock: KernelLock::Unknown,
                qemu_image_locks: false,
            });
        }
    }

    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    let unprotected = rows.iter().filter(|r| r.status.unprotected()).count();
    if unprotected > 0 {
        say!("vmlock: {unprotected} writable disk(s) run without a lease");
        return Ok(UNPROTECTED_EXIT);
    }
    Ok(if errors { 1 } else { 0 })
}

fn print_table(rows: &[Row]) {
    println!("{:>8}  {:<16}  {:<48}  STATUS", "PID", "NAME", "DISK");
    for r in rows {
        println!(
            "{:>8}  {:<16}  {:<48}  {}",
            r.pid,
            r.name.as_deref().unwrap_or("-"),
            r.disk,
            r.describe()
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn guesses_the_guest_name() {
        assert_eq!(
            qemu_name(&args(&["qemu", "-name", "web1"])),
            Some("web1".into())
        );
        assert_eq!(
            qemu_name(&args(&[
                "qemu",
                "-m",
                "32",
                "-name",
                "guest=db,debug-threads=on"
            ])),
            Some("db".into())
        );
        assert_eq!(
            qemu_name(&args(&["qemu", "--name", "a,,b,process=x"])),
            Some("a,b".into())
        );
        assert_eq!(
            qemu_name(&args(&["qemu", "-name", "process=x,guest=y"])),
            Some("y".into())
        );
        assert_eq!(qemu_name(&args(&["qemu", "-m", "32"])), None);
        assert_eq!(qemu_name(&args(&["qemu", "-name"])), None);
    }

    fn lease(pid: u32, mode: DiskMode, lost: bool) -> Lease {
        Lease {
            vm_name: "web1".into(),
            vm_uuid: "u".into(),
            vm_pid: pid,
            mode: mode.to_string(),
            lost,
            identity: Identity {
                dev: 1,
                ino: 2,
                block_device: None,
            },
        }
    }

    #[test]
    fn classifies_each_case() {
        let mine = lease(10, DiskMode::Exclusive, false);
        let other = lease(11, DiskMode::Exclusive, false);
        let lost = lease(10, DiskMode::Exclusive, true);
        let ro = lease(10, DiskMode::ReadOnly, false);
        use KernelLock as K;
        assert_eq!(classify(10, &[&mine], K::Write).0, Status::Leased);
        // The daemon's word is enough (indirect mode locks a separate lock file).
        assert_eq!(classify(10, &[&mine], K::None).0, Status::Leased);
        assert_eq!(
            classify(10, &[&other], K::Write).0,
            Status::LeasedToAnotherVm
        );
        assert_eq!(classify(10, &[&other, &mine], K::Write).0, Status::Leased);
        assert_eq!(classify(10, &[&lost], K::None).0, Status::Unprotected);
        assert_eq!(classify(10, &[&lost], K::Write).0, Status::Locked);
        assert_eq!(classify(10, &[&ro], K::None).0, Status::Unprotected);
        assert_eq!(classify(10, &[], K::Read).0, Status::Locked);
        assert_eq!(classify(10, &[], K::None).0, Status::Unprotected);
        assert_eq!(classify(10, &[], K::Unknown).0, Status::Unprotected);
    }

    #[test]
    fn block_devices_match_by_device() {
        let a = Identity {
            dev: 5,
            ino: 100,
            block_device: Some(0x801),
        };
        let b = Identity {
            dev: 6,
            ino: 7,
            block_device: Some(0x801),
        };
        assert!(same_disk(&a, &b));
        assert!(!same_disk(
            &a,
            &Identity {
                block_device: Some(0x802),
                ..b
            }
        ));
    }
}
