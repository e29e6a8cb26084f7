//! The conformance kit against the `lockd` driver and a real vmlockd with `[etcd]`: every grant
//! also holds a key in a real three-member etcd cluster. One cluster serves the whole run and is
//! stopped by pid when the run ends; each scenario gets its own daemon.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{Daemon, Fixture};
use vmlock_testkit::etcd::EtcdCluster;

fn config(endpoints: &[String]) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    format!(
        "[etcd]\nendpoints = [{}]\nttl = 5\nkeepalive_interval_ms = 500\nmargin_ms = 500\n\
         fence_lead_ms = 1000\n",
        endpoints.join(", ")
    )
}

fn main() -> std::process::ExitCode {
    let cluster = EtcdCluster::three();
    let text = config(&cluster.endpoints());
    let code =
        vmlock::conformance::run_all(move || Fixture::new(Daemon::start_with_config(Some(&text))));
    drop(cluster);
    code
}
