//! Shared test support: a real vmlockd process in a private runtime directory (the test kit's
//! [`Vmlockd`]), with this crate's views of it.
#![allow(dead_code)]

use std::ops::{Deref, DerefMut};
use std::path::Path;
use vmlock_client::runtime::RuntimeDir;
use vmlock_client::Endpoint;
use vmlock_testkit::vmlockd::Vmlockd;

/// A running vmlockd, killed (SIGKILL) and reaped by pid when dropped.
pub struct Daemon(Vmlockd);

impl Daemon {
    pub fn start() -> Self {
        Self::start_with_config(None)
    }

    pub fn start_with_config(config: Option<&str>) -> Self {
        Daemon(Vmlockd::start(
            Path::new(env!("CARGO_BIN_EXE_vmlockd")),
            config,
        ))
    }

    pub fn runtime(&self) -> RuntimeDir {
        RuntimeDir::resolve(Some(&self.0.run_dir())).expect("runtime dir")
    }

    pub fn endpoint(&self) -> Endpoint {
        let mut e = Endpoint::new(self.runtime());
        e.auto_start = false;
        e
    }
}

impl Deref for Daemon {
    type Target = Vmlockd;
    fn deref(&self) -> &Vmlockd {
        &self.0
    }
}

impl DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Vmlockd {
        &mut self.0
    }
}
