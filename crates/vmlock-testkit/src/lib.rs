//! Fixtures shared by vmlock's tests: one home for starting daemons, QEMU guests, qcow2 images
//! and sanlock hosts, so every test starts its own processes in private directories and stops them
//! by pid.

pub mod fuse;
