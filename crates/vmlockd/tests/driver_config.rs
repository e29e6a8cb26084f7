//! The `lockd` driver's TOML configuration: unknown keys and bad values are errors naming the key.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use vmlock::Registry;

fn registry() -> Registry {
    let mut r = Registry::new();
    vmlock_client::driver::register(&mut r);
    r
}

#[test]
fn unknown_keys_and_bad_values_are_refused_by_name() {
    let r = registry();
    let e = r
        .load_with_toml(
            "lockd",
            "lockd.toml",
            "auto_start = false\nautostart = true",
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `autostart`"), "{e}");
    let e = r
        .load_with_toml("lockd", "lockd.toml", "auto_start = \"no\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("auto_start"), "{e}");
}

#[test]
fn every_known_key_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "runtime_dir = \"{}\"\nauto_start = false\ndaemon = \"/usr/bin/true\"\ndaemon_config = \"/etc/vmlockd.toml\"\n",
        dir.path().join("run").display()
    );
    let p = registry()
        .load_with_toml("lockd", "lockd.toml", &text)
        .unwrap();
    assert_eq!(p.driver().name(), "lockd");
}
