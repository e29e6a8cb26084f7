//! The guest: a small process run under `vmlock run` that is its own oracle, independent of
//! vmlock.
//!
//! While it runs, every [`PERIOD`] and for each disk it has plugged in, it
//! 1. re-reads its mark (`G` + its id, [`MARK_LEN`] bytes at [`MARK_OFFSET`]): another guest's mark
//!    there means two guests wrote the disk while both ran (a **double writer**);
//! 2. checks that the kernel has a lock on byte 0 of the disk (vmlock's OFD lock), else it **ran
//!    without its lock**: asked with `F_OFD_GETLK` through its own description (which holds no
//!    lock, so any lock seen is another description's), and cross-checked in `/proc/locks` by
//!    inode (a miss there while `F_OFD_GETLK` sees the lock is noted as `proc-locks-miss`: a
//!    `/proc/locks` read is not atomic). Under the `sanlock` driver (`--sanlock RUN_DIR`) it asks
//!    sanlock instead, every [`SANLOCK_CHECK_EVERY`] rounds: the daemon of its host must list the
//!    disk's lease as granted to its supervisor (its parent, the registered sanlock client)
//!    ([`crate::sanlock_view`]); a daemon that does not answer is noted once per outage
//!    (`lease-service-gone`, then `lease-service-back`);
//! 3. writes its mark again (`pwrite`, and `fsync` now and then).
//!
//! What it finds is appended to `DIR/g<ID>.log`, one line per finding:
//! `double-writer PATH OTHER`, `no-lock PATH` (and `lock-back PATH` when it returns),
//! `proc-locks-miss PATH`, `orphan-no-lock PATH` (no lock seen after its
//! supervisor died: the moment before `PR_SET_PDEATHSIG` kills it), `error TEXT`, `exit term`.
//!
//! Hotplug and unplug: the campaign writes `DIR/g<ID>.ctl` (a generation number, then one disk
//! path per line) with a rename; the guest applies it at its next round — opening new disks,
//! closing removed ones — and then writes the generation to `DIR/g<ID>.ack`. The campaign
//! attaches a disk before plugging it in and unplugs it (waiting for the ack) before detaching.
//!
//! Migration: a guest started with `--incoming` (a migration destination) writes nothing to its
//! disks — it checks its locks but neither writes nor re-reads its mark — until told to write, as
//! a destination QEMU writes nothing before the switch-over. A control file line `write 0` stops
//! a guest's writes (the source paused for the switch-over), `write 1` starts or resumes them;
//! the ack means the change is in force (no write after a `write 0` ack). A resumed source keeps
//! re-reading its mark, so a destination that wrote meanwhile is caught as a double writer; a
//! destination's first write is not preceded by a read, and from then on a source that still
//! wrote is caught.

use crate::locks::{byte0_locked, locked_files, FileId};
use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Time between two rounds of checks.
pub const PERIOD: Duration = Duration::from_millis(4);
/// Where the mark is written in each disk.
pub const MARK_OFFSET: u64 = 4096;
/// Length of the mark.
pub const MARK_LEN: usize = 16;
/// Under sanlock, the lease check runs every this many rounds (one `sanlock client status`).
pub const SANLOCK_CHECK_EVERY: u64 = 8;
/// How long a guest waits for its host's sanlock daemon to answer a status request.
const SANLOCK_STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// A guest's mark: `G` and its id, zero-padded to [`MARK_LEN`] bytes.
pub fn mark(id: u64) -> [u8; MARK_LEN] {
    let mut m = [0u8; MARK_LEN];
    let text = format!("G{id:015}");
    m.copy_from_slice(&text.as_bytes()[..MARK_LEN]);
    m
}

/// The control file of guest `id` in `dir`.
pub fn ctl_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("g{id}.ctl"))
}

/// The acknowledgement file of guest `id` in `dir`.
pub fn ack_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("g{id}.ack"))
}

/// The findings of guest `id` in `dir`.
pub fn log_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("g{id}.log"))
}

/// Writes `text` to `path` through a temporary file and a rename, so readers see all or nothing.
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

struct Disk {
    file: File,
    id: FileId,
    written: bool,
    rounds: u64,
    reported_no_lock: bool,
    reported_other: Option<[u8; MARK_LEN]>,
    /// Under sanlock: the disk's lease name.
    lease: Option<String>,
}

struct Guest {
    id: u64,
    dir: PathBuf,
    mark: [u8; MARK_LEN],
    log: File,
    disks: BTreeMap<PathBuf, Disk>,
    generation: u64,
    parent: nix::unistd::Pid,
    /// Under sanlock: the run directory of its host's daemon.
    sanlock: Option<PathBuf>,
    /// Rounds run (under sanlock, the lease check runs every [`SANLOCK_CHECK_EVERY`]).
    round_no: u64,
    /// Under sanlock: the daemon did not answer at the last check.
    service_gone: bool,
    /// It writes (and re-reads) its mark; false for a migration destination until told, and for
    /// a paused migration source.
    writing: bool,
}

impl Guest {
    fn note(&mut self, line: &str) {
        // Best effort: a finding that cannot be written is printed instead.
        if writeln!(self.log, "{line} @{}", crate::now_ms()).is_err() {
            eprintln!("guest {}: {line}", self.id);
        }
    }

    fn plug(&mut self, path: &Path) {
        if self.disks.contains_key(path) {
            return;
        }
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => match file.metadata() {
                Ok(m) => {
                    self.disks.insert(
                        path.to_owned(),
                        Disk {
                            file,
                            id: FileId::from_metadata(&m),
                            written: false,
                            rounds: 0,
                            reported_no_lock: false,
                            reported_other: None,
                            lease: self
                                .sanlock
                                .as_ref()
                                .map(|_| crate::sanlock_view::lease_name(path)),
                        },
                    );
                }
                Err(e) => self.note(&format!("error fstat {}: {e}", path.display())),
            },
            Err(e) => self.note(&format!("error open {}: {e}", path.display())),
        }
    }

    /// Applies a newer control file, if any.
    fn apply_ctl(&mut self) {
        let Ok(text) = std::fs::read_to_string(ctl_path(&self.dir, self.id)) else {
            return;
        };
        let mut lines = text.lines();
        let Some(generation) = lines.next().and_then(|g| g.trim().parse::<u64>().ok()) else {
            return;
        };
        if generation <= self.generation {
            return;
        }
        let mut wanted: Vec<PathBuf> = Vec::new();
        for line in lines {
            match line.strip_prefix("write ") {
                Some(w) => self.writing = w.trim() == "1",
                None => wanted.push(PathBuf::from(line)),
            }
        }
        self.disks.retain(|p, _| wanted.contains(p));
        for p in &wanted {
            self.plug(p);
        }
        self.generation = generation;
        if let Err(e) = write_atomic(&ack_path(&self.dir, self.id), &generation.to_string()) {
            self.note(&format!("error ack: {e}"));
        }
    }

    /// Under sanlock, on rounds that check: the leases the daemon lists as held by this guest's
    /// supervisor (`Some(None)`: the daemon did not answer; noted once per outage).
    fn sanlock_view(&mut self) -> Option<Option<HashSet<String>>> {
        let run_dir = self.sanlock.clone()?;
        self.round_no += 1;
        if (self.round_no - 1) % SANLOCK_CHECK_EVERY != 0 {
            return None;
        }
        let supervisor = u32::try_from(self.parent.as_raw()).unwrap_or(0);
        match crate::sanlock_view::status(&run_dir, SANLOCK_STATUS_TIMEOUT) {
            Ok(leases) => {
                if std::mem::take(&mut self.service_gone) {
                    self.note("lease-service-back");
                }
                Some(Some(
                    leases
                        .into_iter()
                        .filter(|l| {
                            l.pid == supervisor && l.state == crate::sanlock_view::LeaseState::Held
                        })
                        .map(|l| l.name)
                        .collect(),
                ))
            }
            Err(e) => {
                if !std::mem::replace(&mut self.service_gone, true) {
                    self.note(&format!("lease-service-gone {e}"));
                }
                Some(None)
            }
        }
    }

    fn round(&mut self) {
        let sanlock = self.sanlock.is_some();
        let view = self.sanlock_view();
        let locked = if sanlock {
            HashSet::new()
        } else {
            match locked_files() {
                Ok(l) => l,
                Err(e) => {
                    self.note(&format!("error /proc/locks: {e}"));
                    return;
                }
            }
        };
        let orphan = nix::unistd::getppid() != self.parent;
        let mut notes = Vec::new();
        let writing = self.writing;
        for (path, disk) in &mut self.disks {
            if writing && disk.written {
                let mut seen = [0u8; MARK_LEN];
                match disk.file.read_exact_at(&mut seen, MARK_OFFSET) {
                    Ok(()) if seen != self.mark && disk.reported_other != Some(seen) => {
                        disk.reported_other = Some(seen);
                        notes.push(format!(
                            "double-writer {} {}",
                            path.display(),
                            String::from_utf8_lossy(&seen)
                        ));
                    }
                    Ok(()) => {}
                    Err(e) => notes.push(format!("error read {}: {e}", path.display())),
                }
            }
            // Under sanlock: the daemon's list, on rounds that check it (no answer: no verdict).
            // Else the verdict is the kernel's F_OFD_GETLK; /proc/locks is read too, and a lock it
            // misses while F_OFD_GETLK sees one is noted (its reads are not atomic).
            let held = if sanlock {
                match (&view, &disk.lease) {
                    (Some(Some(leases)), Some(lease)) => leases.contains(lease),
                    _ => !disk.reported_no_lock,
                }
            } else {
                match byte0_locked(&disk.file) {
                    Ok(h) => h,
                    Err(e) => {
                        notes.push(format!("error F_OFD_GETLK {}: {e}", path.display()));
                        true
                    }
                }
            };
            if !sanlock && held && !locked.contains(&disk.id) {
                notes.push(format!("proc-locks-miss {}", path.display()));
            }
            if !held {
                if !disk.reported_no_lock {
                    disk.reported_no_lock = true;
                    let what = if orphan { "orphan-no-lock" } else { "no-lock" };
                    notes.push(format!("{what} {}", path.display()));
                }
            } else if disk.reported_no_lock {
                disk.reported_no_lock = false;
                notes.push(format!("lock-back {}", path.display()));
            }
            if !writing {
                continue;
            }
            if let Err(e) = disk.file.write_all_at(&self.mark, MARK_OFFSET) {
                notes.push(format!("error write {}: {e}", path.display()));
                continue;
            }
            if disk.rounds % 32 == 0 {
                if let Err(e) = disk.file.sync_data() {
                    notes.push(format!("error fsync {}: {e}", path.display()));
                }
            }
            disk.written = true;
            disk.rounds += 1;
        }
        for n in notes {
            self.note(&n);
        }
    }
}

/// The guest's entry point: `guest --id ID --dir DIR [--incoming] [--sanlock RUN_DIR] [--disk
/// PATH]...` (the arguments after the program and its `guest` word; `--incoming`: a migration
/// destination, which writes nothing until its control file says `write 1`). Runs until SIGTERM (exit 0) or SIGKILL;
/// returns the exit code.
pub fn main(args: &[String]) -> i32 {
    let mut id = None;
    let mut dir = None;
    let mut sanlock = None;
    let mut disks = Vec::new();
    let mut incoming = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--incoming" {
            incoming = true;
            continue;
        }
        match (a.as_str(), it.next()) {
            ("--id", Some(v)) => id = v.parse::<u64>().ok(),
            ("--dir", Some(v)) => dir = Some(PathBuf::from(v)),
            ("--sanlock", Some(v)) => sanlock = Some(PathBuf::from(v)),
            ("--disk", Some(v)) => disks.push(PathBuf::from(v)),
            _ => {
                eprintln!(
                    "guest: usage: guest --id ID --dir DIR [--incoming] [--sanlock RUN_DIR] \
                     [--disk PATH]..."
                );
                return 2;
            }
        }
    }
    let (Some(id), Some(dir)) = (id, dir) else {
        eprintln!("guest: --id and --dir are required");
        return 2;
    };
    // SIGTERM is read from a signalfd between rounds, so the guest records its exit cause.
    let mut term = nix::sys::signal::SigSet::empty();
    term.add(nix::sys::signal::Signal::SIGTERM);
    if let Err(e) = term.thread_block() {
        eprintln!("guest: blocking SIGTERM: {e}");
        return 1;
    }
    let signals = match nix::sys::signalfd::SignalFd::with_flags(
        &term,
        nix::sys::signalfd::SfdFlags::SFD_NONBLOCK,
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("guest: signalfd: {e}");
            return 1;
        }
    };
    let log = match OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(&dir, id))
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("guest: log: {e}");
            return 1;
        }
    };
    let mut guest = Guest {
        id,
        dir,
        mark: mark(id),
        log,
        disks: BTreeMap::new(),
        generation: 0,
        parent: nix::unistd::getppid(),
        sanlock,
        round_no: 0,
        service_gone: false,
        writing: !incoming,
    };
    for d in &disks {
        guest.plug(d);
    }
    loop {
        if let Ok(Some(_)) = signals.read_signal() {
            guest.note("exit term");
            return 0;
        }
        guest.apply_ctl();
        guest.round();
        // Deliberate pacing of the oracle's rounds.
        std::thread::sleep(PERIOD);
    }
}
