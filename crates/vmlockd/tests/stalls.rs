//! Nothing one VM waits on stalls another VM (issue 11, items 3 and 5), with real processes: a
//! real `vmlockd`, real guests (`sleep`), holders in this process or in a child process of their
//! own, and storage that stops answering (a FUSE filesystem that hangs on command,
//! [`vmlock_testkit::fuse::HangFs`]).
//!
//! Each test makes one thing stuck — hung storage under a held disk, an open that never returns,
//! a supervisor that stopped reading, a FIFO named as a disk — and keeps it stuck for
//! [`STUCK_FOR`] while other VMs start, acquire, release and die over and over; every one of their
//! requests must be answered within [`BOUND`]. Every wait is bounded: a stall fails the test on a
//! timeout, never hangs the suite. Each test starts its own daemon in a private directory and
//! stops every process it started by its pid.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{locked_by_someone, Daemon};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};
use vmlock::conformance::Guest;
use vmlock::{DiskMode, Error, LockFailureAction, Resource};
use vmlock_client::proto::{AcquireFlags, HeldResource, Reply, Request, VmIdentity};
use vmlock_client::runtime::RuntimeDir;
use vmlock_client::{Endpoint, Holder};
use vmlock_sys::pidfd::ProcessHandle;
use vmlock_testkit::fuse::{private_mount_namespace, HangFs, DISK_NAME};

/// The longest any request of a VM that is not stuck may take.
const BOUND: Duration = Duration::from_millis(500);
/// How long each test keeps its stuck thing stuck while other VMs work.
const STUCK_FOR: Duration = Duration::from_secs(5);
/// Pause between two rounds of the other VMs' work (load pacing only: nothing waits for a state).
const PACE: Duration = Duration::from_millis(50);
/// Bound for set-up steps and for a stuck request to give up on its own.
const SLOW: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Bounded steps

/// Runs `f` on a thread of its own and returns its result, failing the test if it takes longer
/// than `bound`. A stuck `f` is left behind (it ends when the test's daemon is killed).
fn within<T: Send + 'static>(
    bound: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let rx = in_background(what, f);
    match rx.recv_timeout(bound) {
        Ok(v) => v,
        Err(RecvTimeoutError::Timeout) => {
            panic!("{what}: no answer within {bound:?} (the daemon stalls)")
        }
        Err(RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

/// Runs `f` on a thread of its own; its result arrives on the returned channel.
fn in_background<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Receiver<T> {
    let (tx, rx) = channel();
    std::thread::Builder::new()
        .name(what.chars().take(15).collect())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .unwrap();
    rx
}

/// Polls `cond` (no event exists for it) until it holds, failing after `bound`.
fn until(bound: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {bound:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

// ---------------------------------------------------------------------------------------------
// VMs acting through the client, as `vmlock run` does

static VM_ID: AtomicU32 = AtomicU32::new(1);

fn identity(name: &str, pid: u32) -> VmIdentity {
    VmIdentity {
        uuid: uuid::Uuid::new_v4().to_string(),
        name: name.to_owned(),
        id: VM_ID.fetch_add(1, Ordering::Relaxed),
        pid,
    }
}

fn call(endpoint: &Endpoint, request: &Request) -> Result<Reply, Error> {
    endpoint.connect()?.call(request, &[])
}

fn acquire_request(uuid: &str, resources: Vec<Resource>, flags: AcquireFlags) -> Request {
    Request::Acquire {
        uuid: uuid.to_owned(),
        resources,
        flags,
    }
}

fn held(reply: Result<Reply, Error>) -> Result<Vec<HeldResource>, Error> {
    match reply? {
        Reply::Held(h) | Reply::Kept { held: h, .. } => Ok(h),
        other => panic!("unexpected reply {other:?}"),
    }
}

/// A VM whose holder runs in this process, with a real guest.
struct Vm {
    vm: VmIdentity,
    guest: Guest,
    _holder: Holder,
}

impl Vm {
    /// Starts the guest and registers the holder, within `bound`.
    fn start(endpoint: &Endpoint, name: &str, bound: Duration) -> Vm {
        let guest = Guest::spawn();
        let vm = identity(name, guest.pid());
        let (e, v) = (endpoint.clone(), vm.clone());
        let holder = within(bound, &format!("{name}: register its holder"), move || {
            Holder::start(&e, v)
        })
        .unwrap_or_else(|e| panic!("{name}: registering its holder: {e}"));
        Vm {
            vm,
            guest,
            _holder: holder,
        }
    }

    fn acquire(
        &self,
        endpoint: &Endpoint,
        disks: &[&Resource],
        flags: AcquireFlags,
        bound: Duration,
    ) -> Result<Vec<HeldResource>, Error> {
        let request = acquire_request(
            &self.vm.uuid,
            disks.iter().map(|&r| r.clone()).collect(),
            flags,
        );
        let e = endpoint.clone();
        within(bound, &format!("{}: acquire", self.vm.name), move || {
            held(call(&e, &request))
        })
    }

    fn release(&self, endpoint: &Endpoint) {
        let request = Request::Release {
            uuid: self.vm.uuid.clone(),
            resources: None,
        };
        let e = endpoint.clone();
        within(BOUND, &format!("{}: release", self.vm.name), move || {
            held(call(&e, &request))
        })
        .unwrap_or_else(|e| panic!("{}: release: {e}", self.vm.name));
    }
}

fn disk(dir: &Path, name: &str, mode: DiskMode) -> Resource {
    let path = dir.join(name);
    if !path.exists() {
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
    }
    Resource::disk(path, mode).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Other VMs at work

/// One round of other VMs' work, every request within [`BOUND`]: VM B starts, takes and releases
/// a disk; VM C takes another, its guest is SIGKILLed, its disk comes free and VM D takes and
/// releases it; `status` answers.
fn others_proceed(endpoint: &Endpoint, dir: &Path, round: usize) {
    let b_disk = disk(dir, "others-b.img", DiskMode::Exclusive);
    let c_disk = disk(dir, "others-c.img", DiskMode::Exclusive);
    let flags = AcquireFlags::default;

    let b = Vm::start(endpoint, &format!("b{round}"), BOUND);
    b.acquire(endpoint, &[&b_disk], flags(), BOUND)
        .unwrap_or_else(|e| panic!("round {round}: VM B's acquire: {e}"));
    assert!(locked_by_someone(b_disk.path()));
    b.release(endpoint);
    assert!(
        !locked_by_someone(b_disk.path()),
        "round {round}: B's disk still locked after its release"
    );

    let mut c = Vm::start(endpoint, &format!("c{round}"), BOUND);
    c.acquire(endpoint, &[&c_disk], flags(), BOUND)
        .unwrap_or_else(|e| panic!("round {round}: VM C's acquire: {e}"));
    c.guest.kill();
    until(
        BOUND,
        &format!("round {round}: the daemon frees the disk of VM C after its guest was killed"),
        || !locked_by_someone(c_disk.path()),
    );
    let d = Vm::start(endpoint, &format!("d{round}"), BOUND);
    d.acquire(endpoint, &[&c_disk], flags(), BOUND)
        .unwrap_or_else(|e| panic!("round {round}: VM D taking dead VM C's disk: {e}"));
    d.release(endpoint);

    let e = endpoint.clone();
    let status = within(BOUND, "status", move || call(&e, &Request::Status)).unwrap();
    assert!(matches!(status, Reply::Status(_)), "{status:?}");
}

/// Rounds of [`others_proceed`] until `stuck_since` is [`STUCK_FOR`] ago; `still_stuck` is asked
/// after every round and must hold all along.
fn others_proceed_while_stuck(
    endpoint: &Endpoint,
    dir: &Path,
    stuck_since: Instant,
    mut still_stuck: impl FnMut() -> Result<(), String>,
) -> usize {
    let mut round = 0;
    while stuck_since.elapsed() < STUCK_FOR {
        others_proceed(endpoint, dir, round);
        if let Err(what) = still_stuck() {
            panic!("after {round} rounds: the stuck thing came unstuck: {what}");
        }
        round += 1;
        // Deliberate pacing of the rounds, over the fixed STUCK_FOR window.
        std::thread::sleep(PACE);
    }
    assert!(round > 0);
    round
}

/// A `stat` of `path` from this process on a thread of its own: while it does not return, the
/// storage under `path` still hangs.
fn sentinel_stat(path: PathBuf) -> Receiver<std::io::Result<std::fs::Metadata>> {
    in_background("sentinel stat", move || std::fs::metadata(path))
}

fn still_pending<T: std::fmt::Debug>(rx: &Receiver<T>, what: &str) -> Result<(), String> {
    match rx.try_recv() {
        Err(std::sync::mpsc::TryRecvError::Empty) => Ok(()),
        other => Err(format!("{what}: {other:?}")),
    }
}

/// A test's world: a private mount namespace, a daemon in a private directory and, if asked, a
/// FUSE filesystem. VMs declared after it are dropped first; then the filesystem is ended, then
/// the daemon killed.
struct World {
    fs: Option<HangFs>,
    daemon: Daemon,
    _mount_dir: tempfile::TempDir,
}

impl World {
    fn new(with_fs: bool) -> World {
        private_mount_namespace().unwrap();
        let mount_dir = tempfile::tempdir().unwrap();
        let fs = with_fs.then(|| HangFs::mount(mount_dir.path()).unwrap());
        World {
            fs,
            daemon: Daemon::start(),
            _mount_dir: mount_dir,
        }
    }

    fn endpoint(&self) -> Endpoint {
        self.daemon.endpoint()
    }

    fn dir(&self) -> &Path {
        self.daemon.disk_dir()
    }

    fn fs(&self) -> &HangFs {
        self.fs.as_ref().unwrap()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // The filesystem first: a daemon killed while its request waits in the filesystem cannot
        // exit (nor be reaped) until the request is answered or the filesystem is gone.
        if let Some(fs) = self.fs.as_mut() {
            let _ = fs.unmount();
        }
        self.daemon.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// The tests

/// The setup itself, with nothing stuck: proves the harness (rounds of other VMs within their
/// bound) passes on any daemon, so the tests below fail only through the stall they cause.
#[test]
fn other_vms_answer_within_bound_when_nothing_is_stuck() {
    let world = World::new(true);
    let endpoint = world.endpoint();
    let a = Vm::start(&endpoint, "a", SLOW);
    let a_disk = Resource::disk(world.fs().file(DISK_NAME), DiskMode::Exclusive).unwrap();
    a.acquire(&endpoint, &[&a_disk], AcquireFlags::default(), SLOW)
        .unwrap();
    for round in 0..3 {
        others_proceed(&endpoint, world.dir(), round);
    }
    assert!(locked_by_someone(&world.fs().file(DISK_NAME)));
}

/// (a) VM A holds a disk on storage that stops answering. The daemon's periodic lease check
/// stats A's disk and gets stuck in the filesystem; every other VM must still start, take and
/// release disks, and a killed guest's disk must still come free, within [`BOUND`], for
/// [`STUCK_FOR`]. A keeps its lock throughout.
#[test]
fn hung_storage_under_a_held_disk_stalls_no_other_vm() {
    let world = World::new(true);
    let endpoint = world.endpoint();
    let fs = world.fs();
    let a = Vm::start(&endpoint, "a", SLOW);
    let a_disk = Resource::disk(fs.file(DISK_NAME), DiskMode::Exclusive).unwrap();
    let flags = AcquireFlags {
        // Whatever the daemon makes of storage that does not answer, A's guest keeps running and
        // so A keeps its lock.
        on_lock_failure: LockFailureAction::Ignore,
        ..AcquireFlags::default()
    };
    a.acquire(&endpoint, &[&a_disk], flags, SLOW).unwrap();

    fs.hang();
    let stuck_since = Instant::now();
    // The daemon checks every lease once a second: wait (bounded) until that check is stuck in
    // the filesystem. A daemon that no longer reaches the filesystem from there is fine too.
    let reached = fs.wait_held(1, Duration::from_secs(3));
    let sentinel = sentinel_stat(fs.file(DISK_NAME));
    let rounds = others_proceed_while_stuck(&endpoint, world.dir(), stuck_since, || {
        still_pending(&sentinel, "a stat of the hung disk returned")?;
        if fs.blocked() == 0 {
            return Err("no operation waits in the filesystem".into());
        }
        Ok(())
    });
    eprintln!("{rounds} rounds of other VMs while the storage hung (lease check stuck: {reached})");

    fs.resume();
    sentinel
        .recv_timeout(SLOW)
        .expect("stat still stuck after resume")
        .unwrap();
    assert!(
        locked_by_someone(&fs.file(DISK_NAME)),
        "VM A lost its lock while its storage hung"
    );
    assert!(vmlock::process::is_running(a.guest.pid()));
    let (e, uuid) = (endpoint.clone(), a.vm.uuid.clone());
    let held = within(BOUND, "inquire A", move || {
        held(call(&e, &Request::Inquire { uuid }))
    })
    .unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
}

/// (b) VM A asks for a disk on storage that hangs: the daemon's open of it blocks. Only A waits;
/// other VMs proceed within [`BOUND`] for [`STUCK_FOR`]. Once the storage answers again, A's
/// acquire ends either granted (and locked) or refused (and nothing held).
#[test]
fn an_acquire_stuck_opening_a_hung_disk_stalls_no_other_vm() {
    let world = World::new(true);
    let endpoint = world.endpoint();
    let fs = world.fs();
    let a = Vm::start(&endpoint, "a", SLOW);
    let a_disk = Resource::disk(fs.file(DISK_NAME), DiskMode::Exclusive).unwrap();

    fs.hang();
    let stuck_since = Instant::now();
    let request = acquire_request(&a.vm.uuid, vec![a_disk.clone()], AcquireFlags::default());
    let e = endpoint.clone();
    let a_acquire = in_background("A's acquire", move || held(call(&e, &request)));
    assert!(
        fs.wait_held(1, SLOW),
        "A's acquire never reached the filesystem"
    );
    let sentinel = sentinel_stat(fs.file(DISK_NAME));
    let mut a_result = None;
    others_proceed_while_stuck(&endpoint, world.dir(), stuck_since, || {
        still_pending(&sentinel, "a stat of the hung disk returned")?;
        // The daemon may give up on A's open after a bound of its own: record the answer.
        if a_result.is_none() {
            a_result = a_acquire.try_recv().ok();
        }
        Ok(())
    });

    fs.resume();
    let a_result = match a_result {
        Some(r) => r,
        None => a_acquire
            .recv_timeout(SLOW)
            .expect("A's acquire still unanswered after the storage came back"),
    };
    sentinel.recv_timeout(SLOW).unwrap().unwrap();
    match a_result {
        Ok(held) => {
            assert_eq!(held.len(), 1, "{held:?}");
            assert!(locked_by_someone(&fs.file(DISK_NAME)));
        }
        Err(e) => {
            eprintln!("A's acquire was refused: {e}");
            until(SLOW, "A's refused disk comes free", || {
                !locked_by_someone(&fs.file(DISK_NAME))
            });
        }
    }
    // Either way, the daemon still serves A.
    let (e, uuid) = (endpoint.clone(), a.vm.uuid.clone());
    within(BOUND, "inquire A", move || {
        held(call(&e, &Request::Inquire { uuid }))
    })
    .unwrap();
}

/// (c) A supervisor stops reading its holder connection (SIGSTOP, as a paused or swapped-out
/// process would) while a hotplug for its VM is pushed to it. Other VMs proceed within [`BOUND`]
/// for [`STUCK_FOR`]; the stuck hotplug fails on a bound of its own and leaves nothing held, not
/// even through the descriptions queued, unread, on the stopped holder's socket.
#[test]
fn a_stopped_supervisor_stalls_no_other_vm_and_its_hotplug_leaves_nothing_held() {
    let world = World::new(false);
    let endpoint = world.endpoint();
    let guest = Guest::spawn();
    let vm = identity("stopped", guest.pid());
    // Only a VM's own holder process may change its locks, so this test process is the holder;
    // its holder connection registers and then stops reading, as a stopped supervisor's would.
    let stopped_holder = raw_hold(&world.daemon.runtime().socket(), &vm);
    let hotplug = disk(world.dir(), "hotplug.img", DiskMode::Exclusive);

    let stuck_since = Instant::now();
    let request = acquire_request(&vm.uuid, vec![hotplug.clone()], AcquireFlags::default());
    let e = endpoint.clone();
    let stuck = in_background("hotplug", move || held(call(&e, &request)));
    let mut stuck_result = None;
    others_proceed_while_stuck(&endpoint, world.dir(), stuck_since, || {
        if stuck_result.is_none() {
            stuck_result = stuck.try_recv().ok();
        }
        Ok(())
    });
    let stuck_result = match stuck_result {
        Some(r) => r,
        None => stuck
            .recv_timeout(SLOW.saturating_sub(stuck_since.elapsed()))
            .expect("the hotplug to a stopped supervisor never gave up"),
    };
    let e = stuck_result.expect_err("a hotplug nobody acknowledged was granted");
    eprintln!("hotplug refused: {e}");
    // Nothing held: not by the daemon, not by the descriptions waiting unread in the stopped
    // holder's socket.
    assert!(
        !locked_by_someone(hotplug.path()),
        "the failed hotplug left its disk locked"
    );
    let (e, uuid) = (endpoint.clone(), vm.uuid.clone());
    let held_now = within(BOUND, "inquire the stopped VM", move || {
        held(call(&e, &Request::Inquire { uuid }))
    })
    .unwrap();
    assert!(held_now.is_empty(), "{held_now:?}");
    // Others can take the disk.
    let other = Vm::start(&endpoint, "after", BOUND);
    other
        .acquire(&endpoint, &[&hotplug], AcquireFlags::default(), BOUND)
        .unwrap();
    other.release(&endpoint);
    drop(stopped_holder);
}

/// (c2) A request connection whose client sends request after request and never reads a reply:
/// the daemon's write of a reply blocks once the socket's buffers are full (for as long as the
/// connection's write timeout, 30 s by default). Only that connection's thread may wait there
/// (today each request connection has a thread of its own; a design that shares threads between
/// connections must replace a stuck one): other VMs proceed within [`BOUND`] for
/// [`STUCK_FOR`].
#[test]
fn a_request_client_that_never_reads_its_replies_stalls_no_other_vm() {
    use vmlock_client::proto::write_frame;
    let world = World::new(false);
    let endpoint = world.endpoint();
    let stuck = common::raw_connection(&world.daemon.runtime().socket());
    let writer = stuck.try_clone().unwrap();
    // Its writes block too once the daemon stops reading (stuck in its own write); the thread is
    // left behind and ends when the daemon is killed and the write fails.
    let (sent_tx, sent_rx) = channel::<usize>();
    std::thread::spawn(move || {
        let mut sent = 0usize;
        while write_frame(&writer, &Request::Status, &[]).is_ok() {
            sent += 1;
            let _ = sent_tx.send(sent);
        }
    });
    // Until the writer stops getting through, the daemon is not stuck yet.
    let mut last = 0;
    let stuck_since = loop {
        match sent_rx.recv_timeout(Duration::from_millis(500)) {
            Ok(n) => last = n,
            Err(RecvTimeoutError::Timeout) => break Instant::now(),
            Err(RecvTimeoutError::Disconnected) => panic!("the writer failed after {last}"),
        }
    };
    assert!(
        last > 100,
        "only {last} requests went out before the writes blocked"
    );
    others_proceed_while_stuck(&endpoint, world.dir(), stuck_since, || {
        // Still nothing gets through: the daemon's reply writer on that connection is stuck.
        match sent_rx.try_recv() {
            Err(std::sync::mpsc::TryRecvError::Empty) => Ok(()),
            other => Err(format!("the stuck client's writes went on: {other:?}")),
        }
    });
    drop(stuck);
}

/// A holder connection for `vm` that registers and then never reads again.
fn raw_hold(socket: &Path, vm: &VmIdentity) -> std::os::unix::net::UnixStream {
    use vmlock_client::proto::write_frame;
    let stream = common::raw_connection(socket);
    write_frame(
        &stream,
        &Request::Hold {
            vm: vm.clone(),
            adopt: Vec::new(),
            incoming: false,
            flags: None,
            acquire: None,
        },
        &[],
    )
    .unwrap();
    assert_eq!(common::read_reply(&stream), Some(Reply::Ok));
    stream
}

/// (d) Asking to lock a FIFO (a shared disk is opened read-only, which blocks on a FIFO until a
/// writer comes): the daemon must not wait for it. Other VMs proceed within [`BOUND`] for
/// [`STUCK_FOR`]; the request is answered (refused) and nothing is held.
#[test]
fn a_fifo_named_as_a_disk_stalls_no_other_vm() {
    let world = World::new(false);
    let endpoint = world.endpoint();
    let fifo = world.dir().join("fifo.img");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let f = Vm::start(&endpoint, "f", SLOW);
    let fifo_disk = Resource::disk(&fifo, DiskMode::Shared).unwrap();

    let stuck_since = Instant::now();
    let request = acquire_request(&f.vm.uuid, vec![fifo_disk], AcquireFlags::default());
    let e = endpoint.clone();
    let fifo_acquire = in_background("FIFO acquire", move || held(call(&e, &request)));
    let mut fifo_result = None;
    others_proceed_while_stuck(&endpoint, world.dir(), stuck_since, || {
        if fifo_result.is_none() {
            fifo_result = fifo_acquire.try_recv().ok();
        }
        Ok(())
    });
    let fifo_result = match fifo_result {
        Some(r) => r,
        None => fifo_acquire
            .recv_timeout(BOUND)
            .expect("the acquire of a FIFO is still unanswered"),
    };
    let e = fifo_result.expect_err("a FIFO was granted as a disk");
    eprintln!("FIFO refused: {e}");
    let (e, uuid) = (endpoint.clone(), f.vm.uuid.clone());
    let held_now = within(BOUND, "inquire F", move || {
        held(call(&e, &Request::Inquire { uuid }))
    })
    .unwrap();
    assert!(held_now.is_empty(), "{held_now:?}");
}

/// (e) Item 5: a supervisor is SIGKILLed while its guest keeps running (a guest without
/// PDEATHSIG, or one that outlives it). The guest's disk must stay locked for as long as the guest
/// lives — never "unlocked" while its pid runs — and the daemon must end the guest, then unlock.
#[test]
fn a_killed_supervisor_s_guest_keeps_its_lock_until_it_is_gone() {
    let world = World::new(false);
    let held_disk = disk(world.dir(), "guest.img", DiskMode::Exclusive);
    let vm = identity("orphan", 0);
    let mut holder = HolderProcess::spawn(&world.daemon, &vm, Some(held_disk.path()));
    let guest = holder.guest.take().unwrap();
    assert!(locked_by_someone(held_disk.path()));

    holder.kill();
    let killed_at = Instant::now();
    loop {
        // Probe first, then ask whether the guest lives: an "unlocked" seen while the guest is
        // alive afterwards was seen while it was alive.
        let locked = locked_by_someone(held_disk.path());
        let alive = !guest.has_exited();
        assert!(
            locked || !alive,
            "the disk of a running guest was unlocked {:?} after its supervisor was killed",
            killed_at.elapsed()
        );
        if !locked {
            break;
        }
        assert!(
            killed_at.elapsed() < SLOW,
            "after {SLOW:?} the guest is {} and its disk still locked",
            if alive { "still running" } else { "gone" }
        );
        // A bounded poll: the kernel announces no lock change; a fine grain catches any window
        // in which the running guest's disk is unlocked.
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(guest.has_exited());
    eprintln!(
        "guest ended and disk unlocked {:?} after the supervisor's death",
        killed_at.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// A holder in a process of its own

const HELPER_ENV: &str = "VMLOCK_STALLS_HOLDER";

/// A child process running [`holder_process`]: a VM's holder that the test can kill, whose guest
/// is a `sleep` it starts as its own child, without PDEATHSIG, and names with `GuestStarted`.
struct HolderProcess {
    child: Option<Child>,
    /// The guest, the holder process's own child.
    guest: Option<GuestHandle>,
}

/// A guest that is not this process's child: signalled through its pidfd, so never a reused pid.
struct GuestHandle(ProcessHandle);

impl GuestHandle {
    fn has_exited(&self) -> bool {
        self.0.has_exited()
    }
}

impl Drop for GuestHandle {
    fn drop(&mut self) {
        let _ = self.0.signal(rustix::process::Signal::KILL);
    }
}

impl HolderProcess {
    fn spawn(daemon: &Daemon, vm: &VmIdentity, disk: Option<&Path>) -> Self {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "holder_process",
            "--ignored",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, "1")
        .env("VMLOCK_STALLS_RUNTIME", daemon.runtime().path())
        .env("VMLOCK_STALLS_UUID", &vm.uuid)
        .env("VMLOCK_STALLS_NAME", &vm.name)
        .env("VMLOCK_STALLS_GUEST", "own")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        if let Some(d) = disk {
            cmd.env("VMLOCK_STALLS_DISK", d);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut process = HolderProcess {
            child: Some(child),
            guest: None,
        };
        let ready = in_background("holder output", move || {
            for line in BufReader::new(stdout).lines() {
                let line = line.ok()?;
                // libtest may have started the line ("test holder_process ... ").
                if let Some((_, pid)) = line.split_once("READY ") {
                    return pid.trim().parse::<u32>().ok();
                }
            }
            None
        });
        let guest_pid = ready
            .recv_timeout(SLOW)
            .ok()
            .flatten()
            .expect("the holder process did not get ready");
        // Opened while its parent (the holder process) is alive and has not reaped it.
        process.guest = Some(GuestHandle(ProcessHandle::open(guest_pid, None).unwrap()));
        process
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for HolderProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Not a test: the body of [`HolderProcess`] when this binary is started with `HELPER_ENV` set;
/// otherwise it does nothing. Registers a VM's holder through the client, acquires the disk if
/// asked, says `READY <guest pid>` and keeps holding until its stdin closes or it is killed.
#[test]
#[ignore = "not a test: the body of a holder process that other tests start"]
fn holder_process() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let var = |name: &str| std::env::var(name).unwrap();
    let runtime = RuntimeDir::resolve(Some(Path::new(&var("VMLOCK_STALLS_RUNTIME")))).unwrap();
    let mut endpoint = Endpoint::new(runtime);
    endpoint.auto_start = false;
    let uuid = var("VMLOCK_STALLS_UUID");
    let own_guest = var("VMLOCK_STALLS_GUEST") == "own";
    let guest_pid = if own_guest {
        // No PDEATHSIG: this guest outlives its supervisor. Never waited for here: the test
        // ends it through a pidfd.
        #[allow(clippy::zombie_processes)]
        let child = Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child.id()
    } else {
        var("VMLOCK_STALLS_GUEST").parse().unwrap()
    };
    let vm = VmIdentity {
        uuid: uuid.clone(),
        name: var("VMLOCK_STALLS_NAME"),
        id: 1,
        pid: guest_pid,
    };
    let _holder = Holder::start(&endpoint, vm).unwrap();
    if let Ok(path) = std::env::var("VMLOCK_STALLS_DISK") {
        let disk = Resource::disk(PathBuf::from(path), DiskMode::Exclusive).unwrap();
        held(call(
            &endpoint,
            &acquire_request(&uuid, vec![disk], AcquireFlags::default()),
        ))
        .unwrap();
    }
    if own_guest {
        let reply = call(
            &endpoint,
            &Request::GuestStarted {
                uuid,
                pid: guest_pid,
            },
        )
        .unwrap();
        assert_eq!(reply, Reply::Ok);
    }
    let mut out = std::io::stdout();
    writeln!(out, "READY {guest_pid}").unwrap();
    out.flush().unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    // Exit without touching the guest or releasing anything: as a crashed supervisor would.
    std::process::exit(0);
}
