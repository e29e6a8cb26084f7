//! vmlock's lock core: which VM holds which lock, and the rules for granting, releasing, handing
//! over and recovering them, as a state machine over an injected [`host`]. No system call happens
//! in this crate: the daemon runs the core over Linux, the simulator over a simulated kernel.

pub mod types;
