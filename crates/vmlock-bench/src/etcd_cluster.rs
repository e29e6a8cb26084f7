//! A private etcd cluster on loopback for the cluster rows (the same set-up as
//! `vmlock_testkit::etcd`, which is a test crate the bench does not depend on): `size` members of
//! the installed `etcd`, each with its data directory under the work directory and free client and
//! peer ports, ready when every member answers `true` on `/health`; every member is SIGKILLed and
//! reaped by pid when the cluster is dropped (and gets SIGKILL if the bench dies).

use crate::util::{self, Proc};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// How long a cluster may take to become healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one HTTP probe of a member may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// The `etcd` binary, if installed.
pub fn find() -> Option<PathBuf> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd", "/usr/sbin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// A running cluster; its members stop when it is dropped.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<(u16, Proc)>,
}

fn free_port() -> Result<u16> {
    Ok(
        TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .and_then(|l| l.local_addr())
            .context("binding a free loopback port")?
            .port(),
    )
}

impl EtcdCluster {
    /// Starts `size` members of `bin` with their data in `dir` and waits until all are healthy.
    pub fn start(bin: &Path, dir: &Path, size: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ports: Vec<(u16, u16)> = (0..size)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("n{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let log = std::fs::File::create(dir.join(format!("n{i}.log")))?;
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut cmd = Command::new(bin);
            cmd.args(["--name", &format!("n{i}")])
                .arg("--data-dir")
                .arg(dir.join(format!("n{i}")))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "vmlock-bench"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log));
            members.push((
                *client,
                Proc::start(&format!("etcd member n{i}"), &mut cmd)?,
            ));
        }
        let mut cluster = EtcdCluster { members };
        for i in 0..size {
            let port = cluster.members[i].0;
            let log = dir.join(format!("n{i}.log"));
            let proc = &mut cluster.members[i].1;
            util::wait_for(
                "an etcd member's /health",
                READY_TIMEOUT,
                Duration::from_millis(50),
                || {
                    if !proc.running() {
                        bail!("etcd member n{i} exited; see {}", log.display());
                    }
                    Ok(http_get(port, "/health")
                        .ok()
                        .filter(|b| b.contains("\"health\":\"true\""))
                        .map(drop))
                },
            )?;
        }
        Ok(cluster)
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|(port, _)| format!("http://127.0.0.1:{port}"))
            .collect()
    }
}

/// One HTTP/1.0 GET to a member's client port on loopback; the body.
fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))?;
    s.set_write_timeout(Some(PROBE_TIMEOUT))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}
