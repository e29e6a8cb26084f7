//! A real etcd cluster on loopback (Debian's `etcd-server`, 3.4): one or three members, each with a
//! private data directory in a temp dir and free client and peer ports; started and waited for on
//! each member's `/health` endpoint (bounded), members killed and restarted by pid, every member
//! SIGKILLed and reaped by pid when the cluster is dropped. Members can also listen for clients on
//! extra local addresses ([`EtcdCluster::start_with`]), such as the root-side ends of
//! [`NetHost`](crate::netns::NetHost) links, so daemons in other network namespaces reach them.

use crate::process::{kill_child, wait_until};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long a cluster may take to be healthy (measured: one member 0.26–0.72 s, three members
/// about a second here; generous for a loaded 2-core machine).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one HTTP probe of a member may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// One member: its name, ports, data directory and (while it runs) its process.
#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A private etcd cluster. Dropping it kills and reaps every member by pid.
#[derive(Debug)]
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial_cluster: String,
    /// Addresses besides 127.0.0.1 every member listens for clients on (same port).
    extra_client_ips: Vec<Ipv4Addr>,
}

/// A free loopback port: bound to port 0, read back, released. Another process could take it in
/// between; the member then fails to start and [`EtcdCluster::start`] panics naming its log.
fn free_port() -> u16 {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
        .port()
}

impl EtcdCluster {
    /// Starts `size` members (1 or 3 make sense) and waits (at most [`READY_TIMEOUT`]) until every
    /// member reports itself healthy on `/health` — which etcd answers `true` only once the
    /// cluster has a leader and the member has applied its first entries.
    pub fn start(size: usize) -> Self {
        Self::start_with(size, &[])
    }

    /// Like [`start`](EtcdCluster::start), and every member also listens for clients on each of
    /// `extra_client_ips`, on the same port as on 127.0.0.1 (see
    /// [`endpoints_via`](EtcdCluster::endpoints_via)). The addresses must be assigned here
    /// before the members start (create the [`NetHost`](crate::netns::NetHost)s first), or etcd
    /// cannot bind them and the start panics with its log. Members still advertise only their
    /// 127.0.0.1 URLs; a client that discovers members from the advertised URLs instead of
    /// using the endpoints it was given would not reach them from another namespace.
    pub fn start_with(size: usize, extra_client_ips: &[Ipv4Addr]) -> Self {
        assert!(size >= 1, "a cluster needs a member");
        let dir = tempfile::Builder::new()
            .prefix("vmlock-etcd-")
            .tempdir()
            .expect("temp dir for etcd");
        let members: Vec<Member> = (1..=size)
            .map(|i| {
                let name = format!("n{i}");
                Member {
                    data_dir: dir.path().join(&name),
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    client_port: free_port(),
                    peer_port: free_port(),
                    child: None,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            dir,
            members,
            initial_cluster,
            extra_client_ips: extra_client_ips.to_vec(),
        };
        for i in 0..size {
            cluster.spawn(i);
        }
        for i in 0..size {
            cluster.wait_healthy(i);
        }
        cluster
    }

    /// A three-member cluster.
    pub fn three() -> Self {
        Self::start(3)
    }

    /// A single member.
    pub fn single() -> Self {
        Self::start(1)
    }

    fn spawn(&mut self, i: usize) {
        let cluster = self.initial_cluster.clone();
        let m = &mut self.members[i];
        assert!(m.child.is_none(), "member {} already runs", m.name);
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let listen_client = std::iter::once(client.clone())
            .chain(
                self.extra_client_ips
                    .iter()
                    .map(|ip| format!("http://{ip}:{}", m.client_port)),
            )
            .collect::<Vec<_>>()
            .join(",");
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("create the member's log");
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &listen_client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "vmlock-test"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd (is etcd-server installed?)");
        m.child = Some(child);
    }

    /// Waits (bounded) until member `i` answers `/health` with `true`; panics with its log's tail
    /// if it exits or stays unhealthy.
    fn wait_healthy(&mut self, i: usize) {
        let port = self.members[i].client_port;
        let name = self.members[i].name.clone();
        let log = self.members[i].log.clone();
        let mut exited = None;
        let child = self.members[i].child.as_mut().expect("member runs");
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(body) = http(port, "GET", "/health", None) {
                if body.contains("\"health\":\"true\"") {
                    return;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                break;
            }
            if std::time::Instant::now() >= deadline {
                break;
            }
            // etcd announces readiness on no descriptor we own: bounded poll of /health.
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "etcd member {name} not healthy in {READY_TIMEOUT:?} (exited: {exited:?}); log:\n{}",
            log_tail(&log)
        );
    }

    /// Every member's client URL (`http://127.0.0.1:PORT`), killed members included.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// Every member's client URL at `ip` (`http://IP:PORT`), killed members included: what a
    /// client in a [`NetHost`](crate::netns::NetHost) whose root address is `ip` connects to.
    /// Panics unless `ip` was among the cluster's extra client addresses.
    pub fn endpoints_via(&self, ip: Ipv4Addr) -> Vec<String> {
        assert!(
            self.extra_client_ips.contains(&ip),
            "etcd does not listen on {ip} (extra client addresses: {:?})",
            self.extra_client_ips
        );
        self.members
            .iter()
            .map(|m| format!("http://{ip}:{}", m.client_port))
            .collect()
    }

    /// The temp dir holding the data directories and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// How many members the cluster has.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Whether member `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// Member `i`'s pid, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// SIGKILLs member `i` and reaps it.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            kill_child(&mut c);
        }
    }

    /// Starts member `i` again on its data directory and ports, and waits until it is healthy.
    pub fn restart_member(&mut self, i: usize) {
        self.kill_member(i);
        self.spawn(i);
        self.wait_healthy(i);
    }

    /// Member `i`'s id and the leader's id as it reports them (`/v3/maintenance/status`), or
    /// `None` if it does not answer or knows no leader.
    fn status(&self, i: usize) -> Option<(String, String)> {
        let body = http(
            self.members[i].client_port,
            "POST",
            "/v3/maintenance/status",
            Some("{}"),
        )
        .ok()?;
        let me = json_string_after(&body, "\"member_id\":")?;
        let leader = json_string_after(&body, "\"leader\":")?;
        (leader != "0").then_some((me, leader))
    }

    /// The index of the member that leads, as the running members report it; waits (bounded)
    /// until a running member knows a leader that is itself running.
    pub fn leader(&self) -> usize {
        let mut found = None;
        wait_until(
            "an etcd leader among the running members",
            READY_TIMEOUT,
            Duration::from_millis(50),
            || {
                let ids: Vec<Option<(String, String)>> = (0..self.members.len())
                    .map(|i| self.is_running(i).then(|| self.status(i)).flatten())
                    .collect();
                let leader = ids.iter().flatten().map(|(_, l)| l.clone()).next();
                found = leader.and_then(|l| {
                    ids.iter()
                        .position(|s| s.as_ref().is_some_and(|(me, _)| *me == l))
                });
                found.is_some()
            },
        );
        found.expect("leader found")
    }

    /// A follower (a running member that does not lead).
    pub fn follower(&self) -> usize {
        let leader = self.leader();
        (0..self.members.len())
            .find(|&i| i != leader && self.is_running(i))
            .expect("a running follower")
    }

    /// The tail of member `i`'s log, for failure messages.
    pub fn log_tail(&self, i: usize) -> String {
        log_tail(&self.members[i].log)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }
}

/// The last 40 lines of a log file.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The string value (etcd's JSON gateway prints 64-bit numbers as strings) after `field`.
fn json_string_after(body: &str, field: &str) -> Option<String> {
    let rest = &body[body.find(field)? + field.len()..];
    let rest = rest.trim_start().strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_owned())
}

/// One HTTP/1.0 request to a member's client port (loopback), bounded by [`PROBE_TIMEOUT`] per
/// step; returns the body.
fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> std::io::Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))?;
    s.set_write_timeout(Some(PROBE_TIMEOUT))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let (_, body) = reply.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "no HTTP header end")
    })?;
    Ok(body.to_owned())
}
