//! The bench in quick mode against vmlockd (the daemon linked into the bench) and the floors.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn quick_run_against_vmlockd_prints_the_table() {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_vmlock-bench"))
        .args([
            "--quick",
            "--systems",
            "vmlock,floor",
            "--vmlockd",
            "builtin",
        ])
        .output()
        .expect("run vmlock-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failed: {stderr}\n{stdout}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    let cells = |prefix: &str| -> Vec<String> {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no row {prefix:?} in\n{stdout}"));
        line.split('|').map(|c| c.trim().to_owned()).collect()
    };
    // Columns: "", workload, metric, vmlock, virtlockd, sanlock, OFD floor, socket floor, ratios...
    for row in [
        "| 1. acquire+release, 1 client | p50 |",
        "| 2. 16 owners, different disks | acquire+release pairs/s |",
        "| 3. VM start, 64 disks | p50 |",
        "| 4. owner SIGKILL → other owner holds | p50 |",
        "| 5. daemon restart with N held locks | until every lock is back |",
        "| 6. daemon RSS with N held locks | RSS with N locks |",
    ] {
        let c = cells(row);
        assert!(
            !c[3].starts_with("n/a"),
            "vmlock has no value in {row}:\n{stdout}"
        );
    }
    for row in [
        "| 1. acquire+release, 1 client | p50 |",
        "| 2. 16 owners, different disks | p50 |",
    ] {
        let c = cells(row);
        assert!(
            !c[6].starts_with("n/a") && !c[7].starts_with("n/a"),
            "floors missing in {row}:\n{stdout}"
        );
    }
    assert_eq!(
        cells("| 5. daemon restart with N held locks | locks lost (must be 0) |")[3],
        "0",
        "{stdout}"
    );
    assert!(
        stdout.contains("virtlockd: skipped") && stdout.contains("sanlock: skipped"),
        "{stdout}"
    );
}

/// The cluster table in quick mode: a real 3-member etcd, vmlockd with `[etcd]` beside the bare
/// put+delete floor, and one takeover at TTL 3 s with the guest fenced first. Skipped (passes,
/// says why) where etcd is not installed.
#[test]
fn quick_run_with_etcd_prints_the_cluster_table() {
    if !std::path::Path::new("/usr/bin/etcd").is_file() {
        println!("skipped: etcd is not installed (package etcd-server)");
        return;
    }
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_vmlock-bench"))
        .args(["--quick", "--systems", "etcd", "--vmlockd", "builtin"])
        .output()
        .expect("run vmlock-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failed: {stderr}\n{stdout}");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );
    let cells = |prefix: &str| -> Vec<String> {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no row {prefix:?} in\n{stdout}"));
        line.split('|').map(|c| c.trim().to_owned()).collect()
    };
    // Columns: "", workload, metric, vmlock + etcd, etcd floor, sanlock, ratios...
    for row in [
        "| 1. acquire+release, 1 client | p50 |",
        "| 2. 16 owners, different disks | p50 |",
    ] {
        let c = cells(row);
        assert!(
            !c[3].starts_with("n/a") && !c[4].starts_with("n/a"),
            "no value in {row}:\n{stdout}"
        );
    }
    let took =
        cells("| 7. host lost → other host holds, short timeouts | loss → other host holds, p50 |");
    assert!(took[3].ends_with(" s"), "{stdout}");
    assert_eq!(
        cells("| 7. host lost → other host holds, short timeouts | fenced before the other host held (must be all) |")[3],
        "1/1",
        "{stdout}"
    );
}
