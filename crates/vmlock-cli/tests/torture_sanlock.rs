//! A short torture campaign against the `sanlock` driver (issue 13) with the `vmlock` this package
//! builds: two real sanlock daemons as two hosts, guests under `vmlock --driver sanlock run` on
//! either host fighting over the same disks' leases, a few hundred seeded operations and faults
//! (a daemon SIGKILLed and restarted, stopped, sent malformed requests; supervisors and guests
//! SIGKILLed; malformed control frames), every must-be-0 row at 0. The campaign is
//! `vmlock_torture::run` with `Driver::Sanlock`; this test binary also serves as its guest program.
//! The long run is `vmlock-torture --driver sanlock` (docs/RELIABILITY.md, "Torture campaign").
//!
//! Without sanlock installed the campaign cannot run: it is reported as ignored (skipped), never
//! as passed.
//!
//! `VMLOCK_TORTURE_SEED` and `VMLOCK_TORTURE_SANLOCK_OPS` override the seed (default 1) and the
//! number of operations (default 300).

use std::path::PathBuf;

const NAME: &str = "short_seeded_sanlock_campaign";

fn main() {
    if let Some(code) = vmlock_torture::guest_main_if_asked() {
        std::process::exit(code);
    }
    // libtest's listing (`cargo test -- --list`) expects one line per test.
    if std::env::args().any(|a| a == "--list") {
        println!("{NAME}: test");
        return;
    }
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let seed = env("VMLOCK_TORTURE_SEED");
    let ops = env("VMLOCK_TORTURE_SANLOCK_OPS");
    let me = std::env::current_exe().expect("the test's own path");
    let mut opts = vmlock_torture::Options::new(
        seed.unwrap_or(1),
        ops.unwrap_or(300),
        PathBuf::from(env!("CARGO_BIN_EXE_vmlock")),
        me,
    );
    opts.driver = vmlock_torture::Driver::Sanlock;
    if let Some(why) = vmlock_torture::skip_reason(&opts) {
        println!("test {NAME} ... ignored, skipped: {why}");
        println!("\ntest result: ok. 0 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out");
        return;
    }
    let report = vmlock_torture::run(opts).expect("the campaign ran");
    print!("{}", report.summary());
    if let Err(why) = report.verdict(NAME) {
        panic!("{why}");
    }
    if seed.is_none() && ops.is_none() {
        // The default run kills a daemon under running guests: the lock-failure path is covered.
        assert!(
            report.fenced_by_lock_service > 0,
            "{NAME}: no guest was ended by the lock-failure path (seed 1 kills daemons under guests)"
        );
    }
    println!("test {NAME} ... ok");
}
