//! The conformance kit against the built-in `nop` driver.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::Path;
use vmlock::conformance::Harness;
use vmlock::{DriverConfig, Plugin, Registry};

struct Nop {
    dir: tempfile::TempDir,
    plugin: Plugin,
}

impl Harness for Nop {
    fn plugin(&self) -> Plugin {
        self.plugin.clone()
    }
    fn disk_dir(&self) -> &Path {
        self.dir.path()
    }
}

fn nop() -> Nop {
    Nop {
        dir: tempfile::tempdir().expect("temp dir"),
        plugin: Registry::new()
            .load("nop", &DriverConfig::new())
            .expect("load nop"),
    }
}

vmlock::conformance_tests!(nop());
