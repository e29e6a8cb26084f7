//! The `vmlock-bench` library: the parts of the bench that other crates reach, the fuzz targets
//! in particular. The benchmark itself is the `vmlock-bench` binary (`src/main.rs`).

pub mod virtlockd_proto;
