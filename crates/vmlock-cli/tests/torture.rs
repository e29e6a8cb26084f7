//! A short torture campaign (issue 13) against the `vmlock` this package builds: a few hundred
//! seeded operations and faults, every must-be-0 row at 0. The campaign is
//! `vmlock_torture::run`; this test binary also serves as its guest program (`torture guest ...`).
//! The long run is `vmlock-torture` (docs/RELIABILITY.md, "Torture campaign").
//!
//! A second campaign runs vmlockd with cluster locks in a real three-member etcd cluster (half the
//! operations): every grant also holds a key, and no key may be left at the end.
//!
//! `VMLOCK_TORTURE_SEED` and `VMLOCK_TORTURE_OPS` override the seed (default 1) and the number of
//! operations (default 300).

use std::path::PathBuf;

fn main() {
    if let Some(code) = vmlock_torture::guest_main_if_asked() {
        std::process::exit(code);
    }
    // libtest's listing (`cargo test -- --list`) expects one line per test.
    if std::env::args().any(|a| a == "--list") {
        println!("short_seeded_campaign: test");
        println!("short_seeded_campaign_with_etcd: test");
        return;
    }
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let me = std::env::current_exe().expect("the test's own path");
    let seed = env("VMLOCK_TORTURE_SEED", 1);
    let ops = env("VMLOCK_TORTURE_OPS", 300);
    let campaign = |name: &str, ops: u64, etcd: Vec<String>| {
        let mut opts = vmlock_torture::Options::new(
            seed,
            ops,
            PathBuf::from(env!("CARGO_BIN_EXE_vmlock")),
            me.clone(),
        );
        opts.etcd_endpoints = etcd;
        let report = vmlock_torture::run(opts).expect("the campaign ran");
        print!("{}", report.table());
        for d in &report.details {
            eprintln!("{d}");
        }
        assert!(
            report.passed(),
            "{name}: a must-be-0 row is not 0 (seed {})",
            report.seed
        );
        assert!(report.faults() > 0, "{name}: no fault was injected");
        println!("test {name} ... ok");
    };
    campaign("short_seeded_campaign", ops, Vec::new());
    let cluster = vmlock_testkit::etcd::EtcdCluster::three();
    campaign(
        "short_seeded_campaign_with_etcd",
        (ops / 2).max(50),
        cluster.endpoints(),
    );
}
