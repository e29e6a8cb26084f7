//! Fixtures shared by vmlock's tests: one home for starting daemons, QEMU guests, qcow2 images,
//! sanlock hosts, etcd clusters, private libvirtd instances and network namespaces, so every test
//! starts its own processes in private directories and stops them by pid. Every wait here is bounded and panics on its timeout instead
//! of hanging.

pub mod etcd;
pub mod fuse;
pub mod libvirt;
pub mod netns;
pub mod process;
pub mod qemu;
pub mod sanlock;
pub mod vmlockd;
