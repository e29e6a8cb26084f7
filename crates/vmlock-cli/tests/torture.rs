//! A short torture campaign (issue 13) against the `vmlock` this package builds: a few hundred
//! seeded operations and faults, every must-be-0 row at 0. The campaign is
//! `vmlock_torture::run`; this test binary also serves as its guest program (`torture guest ...`).
//! The long run is `vmlock-torture` (docs/RELIABILITY.md, "Torture campaign").
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
        return;
    }
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let me = std::env::current_exe().expect("the test's own path");
    let opts = vmlock_torture::Options::new(
        env("VMLOCK_TORTURE_SEED", 1),
        env("VMLOCK_TORTURE_OPS", 300),
        PathBuf::from(env!("CARGO_BIN_EXE_vmlock")),
        me,
    );
    let report = vmlock_torture::run(opts).expect("the campaign ran");
    print!("{}", report.table());
    for d in &report.details {
        eprintln!("{d}");
    }
    assert!(
        report.passed(),
        "a must-be-0 row is not 0 (seed {})",
        report.seed
    );
    assert!(report.faults() > 0, "no fault was injected");
    println!("test short_seeded_campaign ... ok");
}
