//! A real etcd cluster on loopback (Debian's `etcd-server`, 3.4): one or three members, each with a
//! private data directory in a temp dir and free client and peer ports; started and waited for on
//! each member's `/health` endpoint (bounded), members killed and restarted by pid, every member
//! SIGKILLed and reaped by pid when the cluster is dropped. Members can also listen for clients on
//! extra local addresses ([`EtcdCluster::start_with`]), such as the root-side ends of
//! [`NetHost`](crate::netns::NetHost) links, so daemons in other network namespaces reach them.
//!
//! With [`ClusterOptions::tls`] the members serve clients over TLS only and require a client
//! certificate signed by the cluster's own CA ([`TlsFiles`], made with `openssl` in the temp dir;
//! peers stay on plain http); readiness is then checked with `etcdctl endpoint health`.
//! [`EtcdCluster::enable_auth`] turns on etcd's authentication with a `root` user.

use crate::process::{kill_child, wait_child, wait_until};
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

/// Bound on one `openssl` or `etcdctl` run (killed by pid past it).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// How a cluster is started ([`EtcdCluster::start_opts`]).
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Addresses besides 127.0.0.1 every member listens for clients on (see
    /// [`EtcdCluster::start_with`]).
    pub extra_client_ips: Vec<Ipv4Addr>,
    /// Clients over TLS only (`https://` client URLs, `--client-cert-auth`): a client must
    /// trust [`TlsFiles::ca`] and present a certificate it signed. Peers stay on plain http.
    pub tls: bool,
    /// More etcd flags for every member, such as `--auth-token-ttl=1`.
    pub extra_args: Vec<String>,
}

/// The PEM files of a TLS cluster (P-256 keys, made by `openssl` in the cluster's temp dir).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed the members' and the client's certificates.
    pub ca: PathBuf,
    /// The members' certificate (subjectAltName IP:127.0.0.1 and every extra client address).
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client certificate (CN `vmlock-client`, a name no etcd user has).
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// Another CA, which signed nothing of this cluster's: a client trusting only it must refuse
    /// the members.
    pub other_ca: PathBuf,
}

/// The `openssl` configuration the certificates are made with: the extensions of a CA, a
/// server and a client certificate.
fn openssl_config(sans: &[Ipv4Addr]) -> String {
    let alt = sans
        .iter()
        .map(|ip| format!("IP:{ip}"))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "[req]\ndistinguished_name = dn\n[dn]\n\
         [ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier = hash\n\
         [server]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
         extendedKeyUsage = serverAuth,clientAuth\nsubjectAltName = {alt}\n\
         [client]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
         extendedKeyUsage = clientAuth\n"
    )
}

/// Runs `cmd` with its output captured, killing it by pid if it runs longer than
/// [`COMMAND_TIMEOUT`]; its stdout, or an error with its status, stdout and stderr.
fn run_bounded(cmd: &mut Command) -> Result<String, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {what}: {e}"))?;
    // The commands print a few lines: the pipes cannot fill before they exit.
    let status = wait_child(&mut child, COMMAND_TIMEOUT);
    if status.is_none() {
        kill_child(&mut child);
    }
    let mut out = String::new();
    let mut err = String::new();
    if let Some(o) = child.stdout.as_mut() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(e) = child.stderr.as_mut() {
        let _ = e.read_to_string(&mut err);
    }
    match status {
        Some(s) if s.success() => Ok(out),
        Some(s) => Err(format!("{what}: {s}\nstdout: {out}\nstderr: {err}")),
        None => Err(format!(
            "{what}: still running after {COMMAND_TIMEOUT:?} (killed)\nstdout: {out}\nstderr: {err}"
        )),
    }
}

/// Runs `openssl` with `args` (bounded); panics with its output if it fails.
fn openssl(args: &mut Command) {
    run_bounded(args).unwrap_or_else(|e| panic!("openssl (is it installed?): {e}"));
}

/// A new P-256 key `DIR/NAME.key` and either a self-signed CA certificate `DIR/NAME.pem` or a
/// certificate request `DIR/NAME.csr`, for the common name `cn`.
fn openssl_req(dir: &Path, name: &str, cn: &str, ca: bool) {
    let mut cmd = Command::new("openssl");
    cmd.arg("req")
        .arg("-config")
        .arg(dir.join("openssl.cnf"))
        .args([
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .args(["-subj", &format!("/CN={cn}")]);
    if ca {
        cmd.args(["-x509", "-extensions", "ca", "-days", "2", "-out"])
            .arg(dir.join(format!("{name}.pem")));
    } else {
        cmd.args(["-new", "-out"])
            .arg(dir.join(format!("{name}.csr")));
    }
    openssl(&mut cmd);
}

/// Signs `DIR/NAME.csr` with the CA `DIR/ca.pem` into `DIR/NAME.pem`, with the extensions of
/// section `ext` of the configuration.
fn openssl_sign(dir: &Path, name: &str, ext: &str) {
    openssl(
        Command::new("openssl")
            .args(["x509", "-req", "-in"])
            .arg(dir.join(format!("{name}.csr")))
            .arg("-CA")
            .arg(dir.join("ca.pem"))
            .arg("-CAkey")
            .arg(dir.join("ca.key"))
            .args(["-CAcreateserial", "-days", "2", "-out"])
            .arg(dir.join(format!("{name}.pem")))
            .arg("-extfile")
            .arg(dir.join("openssl.cnf"))
            .args(["-extensions", ext]),
    );
}

/// Makes in `dir` a CA, a server certificate for `sans`, a client certificate and another CA.
fn make_certificates(dir: &Path, sans: &[Ipv4Addr]) -> TlsFiles {
    std::fs::create_dir_all(dir).expect("create the TLS dir");
    std::fs::write(dir.join("openssl.cnf"), openssl_config(sans)).expect("write openssl.cnf");
    openssl_req(dir, "ca", "vmlock-test-ca", true);
    openssl_req(dir, "other-ca", "vmlock-test-other-ca", true);
    openssl_req(dir, "server", "etcd-server", false);
    openssl_sign(dir, "server", "server");
    openssl_req(dir, "client", "vmlock-client", false);
    openssl_sign(dir, "client", "client");
    TlsFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
        other_ca: dir.join("other-ca.pem"),
    }
}

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
    /// The certificates, when clients talk TLS.
    tls: Option<TlsFiles>,
    /// More flags for every member.
    extra_args: Vec<String>,
    /// The root user's password once authentication is on.
    root_password: Option<String>,
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
        Self::start_opts(
            size,
            &ClusterOptions {
                extra_client_ips: extra_client_ips.to_vec(),
                ..ClusterOptions::default()
            },
        )
    }

    /// A single member serving clients over TLS with client certificates ([`TlsFiles`]).
    pub fn single_tls() -> Self {
        Self::start_opts(
            1,
            &ClusterOptions {
                tls: true,
                ..ClusterOptions::default()
            },
        )
    }

    /// Starts `size` members as `options` say and waits (at most [`READY_TIMEOUT`] each) until
    /// every one is healthy.
    pub fn start_opts(size: usize, options: &ClusterOptions) -> Self {
        assert!(size >= 1, "a cluster needs a member");
        let extra_client_ips = &options.extra_client_ips;
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
        let tls = options.tls.then(|| {
            let sans: Vec<Ipv4Addr> = std::iter::once(Ipv4Addr::LOCALHOST)
                .chain(extra_client_ips.iter().copied())
                .collect();
            make_certificates(&dir.path().join("tls"), &sans)
        });
        let mut cluster = EtcdCluster {
            dir,
            members,
            initial_cluster,
            extra_client_ips: extra_client_ips.to_vec(),
            tls,
            extra_args: options.extra_args.clone(),
            root_password: None,
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
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let listen_client = std::iter::once(client.clone())
            .chain(
                self.extra_client_ips
                    .iter()
                    .map(|ip| format!("{scheme}://{ip}:{}", m.client_port)),
            )
            .collect::<Vec<_>>()
            .join(",");
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("create the member's log");
        let mut cmd = Command::new("etcd");
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(&self.extra_args)
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

    /// Whether member `i` says it is healthy: `/health` answers `true` (plain http), or
    /// `etcdctl endpoint health` succeeds (with TLS or authentication on).
    fn healthy(&self, i: usize) -> bool {
        if self.tls.is_none() && self.root_password.is_none() {
            let port = self.members[i].client_port;
            return http(port, "GET", "/health", None)
                .is_ok_and(|body| body.contains("\"health\":\"true\""));
        }
        self.etcdctl(&[self.endpoints()[i].as_str()], &["endpoint", "health"])
            .is_ok()
    }

    /// Runs `etcdctl` (API v3) against `endpoints` with the cluster's client certificate (with
    /// TLS) and the root user (once authentication is on), bounded by [`COMMAND_TIMEOUT`].
    fn etcdctl(&self, endpoints: &[&str], args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(["--dial-timeout=2s", "--command-timeout=5s"]);
        if let Some(t) = &self.tls {
            cmd.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        if let Some(p) = &self.root_password {
            cmd.arg(format!("--user=root:{p}"));
        }
        run_bounded(cmd.args(args))
    }

    /// The certificates, if clients talk TLS.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Turns on etcd's authentication: adds the user `root` with `password` (the role `root`
    /// is granted by `etcdctl auth enable`) and enables authentication. From then on every
    /// request needs a user (or, with TLS, a client certificate whose CN is a user).
    pub fn enable_auth(&mut self, password: &str) {
        assert!(self.root_password.is_none(), "authentication is already on");
        let endpoints: Vec<String> = (0..self.members.len())
            .filter(|&i| self.is_running(i))
            .map(|i| self.endpoints()[i].clone())
            .collect();
        let endpoints: Vec<&str> = endpoints.iter().map(String::as_str).collect();
        let pw = format!("--new-user-password={password}");
        for args in [
            &["user", "add", "root", pw.as_str()][..],
            &["auth", "enable"],
        ] {
            self.etcdctl(&endpoints, args)
                .unwrap_or_else(|e| panic!("etcdctl {args:?}: {e}"));
        }
        self.root_password = Some(password.to_owned());
    }

    /// Waits (bounded) until member `i` is healthy; panics with its log's tail if it exits or
    /// stays unhealthy.
    fn wait_healthy(&mut self, i: usize) {
        let name = self.members[i].name.clone();
        let log = self.members[i].log.clone();
        let mut exited = None;
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        loop {
            if self.healthy(i) {
                return;
            }
            let child = self.members[i].child.as_mut().expect("member runs");
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

    /// Every member's client URL (`http://127.0.0.1:PORT`, `https://` with TLS), killed members
    /// included.
    pub fn endpoints(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.members
            .iter()
            .map(|m| format!("{scheme}://127.0.0.1:{}", m.client_port))
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
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.members
            .iter()
            .map(|m| format!("{scheme}://{ip}:{}", m.client_port))
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
    /// until a running member knows a leader that is itself running. Plain http clusters only.
    pub fn leader(&self) -> usize {
        assert!(
            self.tls.is_none(),
            "leader() reads /v3/maintenance/status over plain http: not with TLS"
        );
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
