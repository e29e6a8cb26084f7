//! # vmlock-sanlock: the `sanlock` driver
//!
//! Disk leases on shared storage through a running [sanlock](https://pagure.io/sanlock) daemon.
//! Everything that touches a lease area (alignment, formatting, Disk Paxos, delta leases) is done
//! by the daemon; this crate only speaks its socket protocol ([`proto`], a pure-Rust client: see
//! `docs/sanlock.md` for why it does not link `libsanlock_client`).
//!
//! ```no_run
//! use vmlock::{DriverConfig, Registry};
//! let mut registry = Registry::new();
//! vmlock_sanlock::register(&mut registry);
//! let plugin = registry.load_with_toml(
//!     "sanlock",
//!     "/etc/vmlock/sanlock.toml",
//!     "host_id = 1\nlease_dir = \"/mnt/shared/vmlock-leases\"\n",
//! )?;
//! # Ok::<(), vmlock::Error>(())
//! ```

pub mod driver;
pub mod proto;

pub use driver::{register, SanlockConfig, SanlockDriver, NAME};
