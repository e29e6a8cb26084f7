//! A short torture campaign (issue 13) against the `vmlock` this package builds: a few hundred
//! seeded operations and faults, every must-be-0 row at 0. The campaign is
//! `vmlock_torture::run`; this test binary also serves as its guest program (`torture guest ...`).
//! The long run is `vmlock-torture` (docs/RELIABILITY.md, "Torture campaign").
//!
//! A second campaign runs vmlockd with cluster locks in a real three-member etcd cluster (half the
//! operations): every grant also holds a key, and no key may be left at the end; vmlockd runs in
//! a network namespace of its own, which the campaign cuts off from etcd for 0.3-3 s now and then.
//!
//! `VMLOCK_TORTURE_SEED` and `VMLOCK_TORTURE_OPS` override the seed (default 1) and the number of
//! operations (default 300).

use std::path::PathBuf;
use std::sync::Arc;
use vmlock_testkit::netns::NetHost;

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
    let campaign = |name: &str, ops: u64, etcd: Vec<String>, net: Option<Arc<NetHost>>| {
        let mut opts = vmlock_torture::Options::new(
            seed,
            ops,
            PathBuf::from(env!("CARGO_BIN_EXE_vmlock")),
            me.clone(),
        );
        opts.etcd_endpoints = etcd;
        opts.etcd_net = net;
        let report = vmlock_torture::run(opts).expect("the campaign ran");
        print!("{}", report.summary());
        if let Err(why) = report.verdict(name) {
            panic!("{why}");
        }
        println!("test {name} ... ok");
    };
    campaign("short_seeded_campaign", ops, Vec::new(), None);
    // vmlockd in a network namespace of its own, so that the campaign can cut it off from etcd
    // (short partitions: no guest may be fenced); without namespaces, no partitions.
    let (cluster, endpoints, net) = match NetHost::unavailable() {
        None => {
            let net = NetHost::create();
            let cluster = vmlock_testkit::etcd::EtcdCluster::start_with(3, &[net.root_addr()]);
            let endpoints = cluster.endpoints_via(net.root_addr());
            (cluster, endpoints, Some(Arc::new(net)))
        }
        Some(why) => {
            println!("no etcd partitions: {why}");
            let cluster = vmlock_testkit::etcd::EtcdCluster::three();
            let endpoints = cluster.endpoints();
            (cluster, endpoints, None)
        }
    };
    campaign(
        "short_seeded_campaign_with_etcd",
        (ops / 2).max(50),
        endpoints,
        net,
    );
    drop(cluster);
}
