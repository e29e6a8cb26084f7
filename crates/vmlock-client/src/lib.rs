//! A client of vmlockd, and everything both sides of its socket share.
//!
//! - [`proto`]: the wire protocol (frames, requests, replies, pushes); the daemon uses it too;
//! - [`connection`]: request connections ([`Connection`]) and where to find the daemon
//!   ([`Endpoint`]);
//! - [`holder`]: the holder that keeps a VM's lock descriptions, on a thread of its own
//!   ([`Holder`]) or in the caller's own loop without any thread ([`HoldConnection`], usable in a
//!   forked child before exec: see [`holder`] for the contract);
//! - [`handdown`]: a self-holding guest hands its lock descriptions down to the holder that
//!   takes over from it;
//! - [`control`]: the control socket of a VM's supervisor (protocol and client);
//! - [`driver`]: the `lockd` driver of the lock manager API;
//! - [`runtime`]: the runtime directory and starting the embedded daemon;
//! - [`qmp`]: a minimal QMP client (the daemon and the supervisor pause guests with it).

pub mod connection;
pub mod control;
pub mod driver;
pub mod fence;
pub mod handdown;
pub mod holder;
pub mod proto;
pub mod qmp;
pub mod runtime;

pub use connection::{unexpected, Connection, Endpoint, EventStream, Opening, REPLY_TIMEOUT};
pub use holder::{HoldConnection, Holder, Served};
pub use runtime::RuntimeDir;
