//! A second "host" on this machine for network-partition tests: a private network namespace
//! joined to the test's own (root) namespace by a veth pair, so a daemon started inside it reaches
//! services in the root namespace (an [`EtcdCluster`](crate::etcd::EtcdCluster) listening on
//! [`NetHost::root_addr`]) only over that link, and a test partitions the host by taking the link
//! down ([`NetHost::cut`]) and heals it ([`NetHost::restore`]).
//!
//! The namespace has no name in `/run/netns` that could outlive the test: a short-lived thread
//! `unshare(CLONE_NEWNET)`s and opens `/proc/thread-self/ns/net`, and that descriptor alone keeps
//! the namespace alive. When the descriptor is closed (on drop, or when the test process dies,
//! even by SIGKILL) and no process is left inside, the kernel frees the namespace and with it the
//! veth pair. Drop also deletes the pair explicitly, because the kernel's namespace teardown is
//! asynchronous and the next test should find the link gone.
//!
//! Each host gets the /30 `10.213.H.Q` (Q = 4·(k mod 64), H = k / 64, k < 16384): the root end is
//! `.Q+1`, the namespace end `.Q+2`, and the namespace's default route goes to the root end. The
//! subnet is claimed by the name of the root-side interface, `vmlk<k>r` (the namespace side is
//! `vmlk<k>n`): creating a link whose name exists fails, atomically in the kernel, so two test
//! processes (or two fixtures in one) never pick the same addresses, without a lock file; subnets
//! where this namespace already has an address (not a fixture's) are passed over. The link's alias
//! names the test process that owns it.
//!
//! Links are configured with iproute2's `ip`, run in the right namespace by `setns` between fork
//! and exec ([`NetHost::enter`]). Every `ip` run is bounded by [`IP_TIMEOUT`].

use crate::process::kill_and_wait;
use nix::sched::{setns, unshare, CloneFlags};
use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long one `ip` command may take (it answers in milliseconds; generous for a loaded machine).
pub const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// How many /30 subnets `10.213.0.0/16` holds.
const SUBNETS: usize = 1 << 14;

/// Where the next fixture of this process starts looking for a free subnet, so fixtures of one
/// process do not all retry the same taken names.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A private network namespace linked to the root namespace by a veth pair. Dropping it deletes the
/// pair and closes the namespace's descriptor (the namespace goes once no process is left in it).
#[derive(Debug)]
pub struct NetHost {
    /// The private namespace (`/proc/thread-self/ns/net` of the thread that created it).
    ns: Arc<OwnedFd>,
    /// The namespace of the thread that created the host: root-side `ip` commands run there even
    /// when the host is dropped on another thread.
    root: Arc<OwnedFd>,
    subnet: usize,
    root_if: String,
    ns_if: String,
    root_addr: Ipv4Addr,
    addr: Ipv4Addr,
}

/// A fresh network namespace: a thread unshares its own and opens it, then exits; the descriptor
/// keeps the namespace alive.
fn new_namespace() -> std::io::Result<OwnedFd> {
    std::thread::spawn(|| {
        unshare(CloneFlags::CLONE_NEWNET)?;
        Ok(std::fs::File::open("/proc/thread-self/ns/net")?.into())
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// The calling thread's network namespace.
fn current_namespace() -> std::io::Result<OwnedFd> {
    Ok(std::fs::File::open("/proc/thread-self/ns/net")?.into())
}

/// Makes `cmd` exec in the network namespace `ns` (a `setns` between fork and exec). The command
/// holds its own reference to the descriptor, so it stays open until the command is dropped.
fn enter_namespace(ns: &Arc<OwnedFd>, cmd: &mut Command) {
    let ns = Arc::clone(ns);
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe work
    // is allowed: it reads an fd number through an Arc (no allocation, no lock) and makes one
    // setns system call; an error becomes an io::Error from the raw errno, which does not
    // allocate.
    unsafe {
        cmd.pre_exec(move || {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
        });
    }
}

/// Runs `ip args` in the namespace `ns`, waiting at most [`IP_TIMEOUT`] (then SIGKILLs it by pid);
/// the output, or why it could not run.
fn ip_in(ns: &Arc<OwnedFd>, args: &[&str]) -> Result<Output, String> {
    let mut cmd = Command::new("ip");
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    enter_namespace(ns, &mut cmd);
    let child = cmd.spawn().map_err(|e| {
        format!(
            "spawn `ip {}` (is iproute2 installed?): {e}",
            args.join(" ")
        )
    })?;
    let pid = child.id();
    // A thread waits for the output (no pipe can fill while we wait); we wait for it, bounded.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(IP_TIMEOUT) {
        Ok(out) => out.map_err(|e| format!("wait for `ip {}`: {e}", args.join(" "))),
        Err(_) => {
            kill_and_wait(pid);
            Err(format!(
                "`ip {}` still running after {IP_TIMEOUT:?}",
                args.join(" ")
            ))
        }
    }
}

/// Runs `ip args` in `ns` and panics, with its stderr, unless it succeeds.
fn ip_ok(ns: &Arc<OwnedFd>, args: &[&str]) {
    let out = ip_in(ns, args).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// The root-side and namespace-side addresses of subnet `k`.
fn subnet_addrs(k: usize) -> (Ipv4Addr, Ipv4Addr) {
    let third = u8::try_from(k / 64).expect("subnet index below 16384");
    let base = u8::try_from(k % 64 * 4).expect("four addresses per /30");
    (
        Ipv4Addr::new(10, 213, third, base + 1),
        Ipv4Addr::new(10, 213, third, base + 2),
    )
}

impl NetHost {
    /// Why network namespaces cannot be used here (not root: `unshare` refused; no `ip`), or
    /// `None` when [`NetHost::create`] can work. Tests print `SKIPPED: <reason>` and return.
    pub fn unavailable() -> Option<String> {
        if let Err(e) = new_namespace() {
            return Some(format!("cannot create a network namespace: {e}"));
        }
        let root = match current_namespace() {
            Ok(fd) => Arc::new(fd),
            Err(e) => return Some(format!("cannot open this thread's network namespace: {e}")),
        };
        match ip_in(&root, &["-V"]) {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(format!("`ip -V` failed: {}", out.status)),
            Err(e) => Some(e),
        }
    }

    /// A fresh namespace with `lo` up, the namespace end of a new veth pair at [`addr`] with a
    /// default route to the root end at [`root_addr`], both ends up. Panics if anything fails
    /// (check [`NetHost::unavailable`] first).
    ///
    /// [`addr`]: NetHost::addr
    /// [`root_addr`]: NetHost::root_addr
    pub fn create() -> NetHost {
        let ns = Arc::new(new_namespace().expect("create a network namespace"));
        let root = Arc::new(current_namespace().expect("open this thread's network namespace"));
        // /proc/<pid>/fd/<n> names our namespace descriptor for `ip` (which opens it as a path).
        let ns_path = format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            std::os::fd::AsRawFd::as_raw_fd(&*ns)
        );
        let start =
            (std::process::id() as usize).wrapping_mul(61) + NEXT.fetch_add(1, Ordering::Relaxed);
        let mut claimed = None;
        for i in 0..SUBNETS {
            let k = (start + i) % SUBNETS;
            let (root_if, ns_if) = (format!("vmlk{k}r"), format!("vmlk{k}n"));
            // Something besides these fixtures may use addresses in the subnet: leave it alone
            // rather than route the test's traffic somewhere unexpected.
            let root_cidr = format!("{}/30", subnet_addrs(k).0);
            let used = ip_in(&root, &["-4", "-o", "addr", "show", "to", &root_cidr])
                .unwrap_or_else(|e| panic!("{e}"));
            if !used.stdout.is_empty() {
                continue;
            }
            let out = ip_in(
                &root,
                &[
                    "link", "add", &root_if, "type", "veth", "peer", "name", &ns_if, "netns",
                    &ns_path,
                ],
            )
            .unwrap_or_else(|e| panic!("{e}"));
            if out.status.success() {
                claimed = Some((k, root_if, ns_if));
                break;
            }
            let err = String::from_utf8_lossy(&out.stderr);
            // Another fixture (in this process or another) holds subnet k: try the next.
            assert!(
                err.contains("File exists"),
                "`ip link add {root_if} type veth peer name {ns_if} netns {ns_path}` failed: {}",
                err.trim()
            );
        }
        let (subnet, root_if, ns_if) = claimed.expect("a free subnet in 10.213.0.0/16");
        let (root_addr, addr) = subnet_addrs(subnet);
        // From here on, Drop deletes the pair if a step panics.
        let host = NetHost {
            ns,
            root,
            subnet,
            root_if,
            ns_if,
            root_addr,
            addr,
        };
        host.configure();
        host
    }

    /// Addresses, links up, the namespace's default route.
    fn configure(&self) {
        let alias = format!("vmlock-testkit pid {}", std::process::id());
        let root_cidr = format!("{}/30", self.root_addr);
        let ns_cidr = format!("{}/30", self.addr);
        let gw = self.root_addr.to_string();
        ip_ok(
            &self.root,
            &["link", "set", "dev", &self.root_if, "alias", &alias],
        );
        ip_ok(
            &self.root,
            &["addr", "add", &root_cidr, "dev", &self.root_if],
        );
        ip_ok(&self.root, &["link", "set", "dev", &self.root_if, "up"]);
        ip_ok(&self.ns, &["link", "set", "dev", "lo", "up"]);
        ip_ok(&self.ns, &["addr", "add", &ns_cidr, "dev", &self.ns_if]);
        ip_ok(&self.ns, &["link", "set", "dev", &self.ns_if, "up"]);
        ip_ok(&self.ns, &["route", "add", "default", "via", &gw]);
    }

    /// The root namespace's end of the link: what a program inside the namespace connects to,
    /// and what a service in the root namespace must listen on to be reachable from inside.
    pub fn root_addr(&self) -> Ipv4Addr {
        self.root_addr
    }

    /// The namespace's own address (its end of the link).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The root-side interface's name (`vmlk<k>r`; it is listed by `ip link` while the host lives).
    pub fn root_interface(&self) -> &str {
        &self.root_if
    }

    /// The namespace-side interface's name (`vmlk<k>n`, only visible inside the namespace).
    pub fn interface(&self) -> &str {
        &self.ns_if
    }

    /// This host's subnet index `k` (its /30 is the `k`-th of `10.213.0.0/16`).
    pub fn subnet(&self) -> usize {
        self.subnet
    }

    /// Partitions the host: takes the root-side end down. The namespace end loses its carrier, so
    /// what the namespace sends is dropped by the veth, and the root namespace loses its route to
    /// the subnet, so what it sends is not delivered: established connections stall (TCP keeps
    /// retransmitting) rather than being reset, as on a real partition. Listening sockets bound
    /// to [`root_addr`](NetHost::root_addr) stay bound (the address stays assigned).
    pub fn cut(&self) {
        ip_ok(&self.root, &["link", "set", "dev", &self.root_if, "down"]);
    }

    /// Heals a [`cut`](NetHost::cut): the root-side end up again, which restores the root
    /// namespace's route to the subnet; stalled connections resume at their next retransmission
    /// (TCP's backoff can delay that by seconds after a long cut).
    pub fn restore(&self) {
        ip_ok(&self.root, &["link", "set", "dev", &self.root_if, "up"]);
    }

    /// Makes `cmd` run inside the namespace (a `setns` in the child before exec); returns it for
    /// chaining. Its children stay inside too.
    pub fn enter<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        enter_namespace(&self.ns, cmd);
        cmd
    }

    /// A [`Command`] for `program` that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        self.enter(&mut cmd);
        cmd
    }

    /// Runs `ip args` inside the namespace (at most [`IP_TIMEOUT`]) and returns its stdout;
    /// panics, with its stderr, if it fails. For tests that inspect or change the namespace's
    /// links and routes.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = ip_in(&self.ns, args).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "`ip {}` inside failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread that has joined the namespace and returns its result: sockets `f`
    /// creates belong to the namespace for their whole life, whichever thread uses them later.
    /// Panics in `f` propagate.
    pub fn in_namespace<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(self.ns.as_fd(), CloneFlags::CLONE_NEWNET).expect("join the namespace");
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for NetHost {
    fn drop(&mut self) {
        // Deleting one end deletes the pair; the namespace itself goes when `ns` is closed and no
        // process is left inside it.
        match ip_in(&self.root, &["link", "del", "dev", &self.root_if]) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "netns: `ip link del {}` failed: {}",
                self.root_if,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("netns: {e}"),
        }
    }
}
