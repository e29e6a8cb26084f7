//! Migration hand-off: the lock steps' own time beside QEMU's measured downtime, same runs.
//!
//! `cargo bench -p vmlock-cli --bench migration_handoff` — needs `qemu-system-x86_64`
//! (scripts/install-test-deps.sh). Two real QEMU processes (TCG) migrate over loopback while
//! their disks are held through the `lockd` driver and a real vmlockd.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // a benchmark program: failures abort it

use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmlock::{domain, AcquireOptions, DiskMode, MigrationOutcome, Plugin, Resource, VmParams};
use vmlock_client::driver::LockdDriver;
use vmlock_client::qmp::Qmp;
use vmlock_client::runtime::RuntimeDir;
use vmlock_client::Endpoint;
use vmlock_testkit::process::KillOnDrop;
use vmlock_testkit::qemu::{qcow2, QemuLine};

const RUNS: usize = 10;

/// A QEMU with `disks` as SCSI disks (as libvirt attaches many), SIGKILLed and reaped on drop.
fn qemu(disks: &[PathBuf], qmp: &Path, incoming: bool) -> KillOnDrop {
    let line = QemuLine {
        memory_mb: 64,
        qmp: vec![qmp.to_owned()],
        disks: disks.to_vec(),
        scsi_disks: true,
        scsi_controller: true,
        extra: if incoming {
            vec!["-incoming".into(), "defer".into()]
        } else {
            Vec::new()
        },
    };
    KillOnDrop(line.command().stdin(Stdio::null()).spawn().unwrap())
}

fn connect(path: &Path) -> Qmp {
    Qmp::connect_when_ready(path, Duration::from_secs(20)).unwrap()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if !vmlock_testkit::qemu::available() {
        println!("skipped: qemu-system-x86_64 is not installed (run scripts/install-test-deps.sh)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let runtime = RuntimeDir::resolve(Some(&dir.path().join("run"))).unwrap();
    let mut endpoint = Endpoint::new(runtime.clone());
    endpoint.daemon_program = PathBuf::from(env!("CARGO_BIN_EXE_vmlock"));
    endpoint.daemon_args = vec!["daemon".into()];
    let plugin = Plugin::from_driver(Arc::new(LockdDriver::new(endpoint)));

    println!("Migration hand-off (lockd, one host), {RUNS} runs each, medians in ms");
    println!(
        "{:>5} | {:>8} | {:>11} | {:>8} | {:>13} | {:>13} | {:>11}",
        "disks", "prepare", "dest accept", "finish", "lock total", "QEMU downtime", "QEMU total"
    );
    for ndisks in [1usize, 16] {
        let (mut prep, mut accept, mut fin, mut total, mut down, mut qtotal) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for run in 0..RUNS {
            let disks: Vec<PathBuf> = (0..ndisks)
                .map(|i| qcow2(dir.path(), &format!("d{ndisks}-{run}-{i}.qcow2")))
                .collect();
            let resources: Vec<Resource> = disks
                .iter()
                .map(|d| Resource::disk(d, DiskMode::Exclusive).unwrap())
                .collect();
            let (sq, dq) = (
                dir.path().join(format!("s{ndisks}-{run}.qmp")),
                dir.path().join(format!("t{ndisks}-{run}.qmp")),
            );
            // As `vmlock run` does: lock first, then start QEMU and hand the locks to it.
            let vm = VmParams::new(1, uuid::Uuid::new_v4(), "bench").unwrap();
            let mut src = domain::process_start(
                &plugin,
                vm.clone(),
                resources.clone(),
                &AcquireOptions::default(),
            )
            .unwrap();
            let src_qemu = qemu(&disks, &sq, false);
            src.guest_started(src_qemu.pid()).unwrap();
            let mut src_qmp = connect(&sq);

            let t = Instant::now();
            let state = src.prepare_migration("bench").unwrap();
            let t_prepare = t.elapsed();
            let t = Instant::now();
            let mut dst = domain::migration_incoming(
                &plugin,
                vm,
                resources,
                &state,
                &AcquireOptions::default(),
            )
            .unwrap();
            let t_accept = t.elapsed();
            let dst_qemu = qemu(&disks, &dq, true);
            dst.guest_started(dst_qemu.pid()).unwrap();
            let mut dst_qmp = connect(&dq);

            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let status = src_qmp
                .migrate_to(&mut dst_qmp, &format!("tcp:127.0.0.1:{port}"))
                .unwrap();
            assert_eq!(status, "completed", "migration failed");
            let info = src_qmp.execute("query-migrate", json!({})).unwrap();
            let t = Instant::now();
            dst.complete_migration(MigrationOutcome::Success).unwrap();
            src.complete_migration(MigrationOutcome::Success).unwrap();
            let t_finish = t.elapsed();
            dst_qmp.execute("cont", json!({})).unwrap();
            drop(src_qemu);
            src.shutdown().unwrap();
            drop(dst_qemu);
            dst.shutdown().unwrap();

            prep.push(ms(t_prepare));
            accept.push(ms(t_accept));
            fin.push(ms(t_finish));
            total.push(ms(t_prepare + t_accept + t_finish));
            down.push(info["downtime"].as_f64().unwrap_or(f64::NAN));
            qtotal.push(info["total-time"].as_f64().unwrap_or(f64::NAN));
        }
        println!(
            "{ndisks:>5} | {:>8.3} | {:>11.3} | {:>8.3} | {:>13.3} | {:>13.1} | {:>11.1}",
            median(&mut prep),
            median(&mut accept),
            median(&mut fin),
            median(&mut total),
            median(&mut down),
            median(&mut qtotal)
        );
    }
    println!("Only `finish` lies on QEMU's critical path (after switchover); prepare and dest accept run before `migrate`.");
    if let Some(pid) = runtime.daemon_pid() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}
