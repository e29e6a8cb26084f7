//! The configuration parsers: `vmlockd.toml` (`vmlockd::config::Config::parse`, with its
//! `[etcd]` section), the `[etcd]` table alone (`vmlock_etcd::Config::from_toml` and
//! `validate`), libvirt's `qemu-vmlock.conf` (`vmlock_libvirt::config::Config::parse`) and the
//! driver configurations of the `nop` and `lockd` drivers through the registry
//! (`vmlock::registry::parse_config`). The input's first byte picks the parser; errors are
//! fine, panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmlock::registry::Registry;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match kind % 5 {
        0 => {
            if let Ok(c) = vmlockd::config::Config::parse(text, "fuzz") {
                let _ = c.etcd_config("fuzz-host");
                let _ = c.metrics_socket_address();
                let _ = c.requires_lease();
            }
        }
        1 => {
            if let Ok(c) = vmlock_etcd::Config::from_toml(text) {
                let _ = c.validate();
                let _ = c.endpoints_text();
                let _ = (c.keepalive_interval(), c.margin(), c.fence_lead());
                let _ = (
                    c.request_timeout(),
                    c.attempt_timeout(),
                    c.connect_timeout(),
                );
            }
        }
        2 => {
            let _ = vmlock_libvirt::config::Config::parse(text, "fuzz");
        }
        3 => {
            let mut registry = Registry::new();
            registry.register("lockd", vmlock_client::driver::LockdDriver::from_config);
            let _ = registry.load_with_toml("lockd", "fuzz", text);
        }
        _ => {
            let _ = Registry::new().load_with_toml("nop", "fuzz", text);
        }
    }
});
