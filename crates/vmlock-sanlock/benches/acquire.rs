//! Acquire + release latency of one exclusive disk lease: through the vmlock `sanlock` driver,
//! beside the same requests sent straight to the daemon with this crate's protocol client; and
//! of one shared disk lease, which the driver takes inside the disk's migration gate (both gate
//! leases held shared meanwhile), beside the bare shared lease and the gate alone.
//!
//! `cargo bench -p vmlock-sanlock --bench acquire` (iterations: `VMLOCK_BENCH_ITERS`, default
//! 300). Starts its own sanlock daemon (io_timeout 1, lease files under /var/tmp) and SIGKILLs it
//! by pid at the end. The rows run interleaved, round by round, on the same lease.

#![allow(clippy::unwrap_used)] // a benchmark program: failures abort it

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};
use vmlock::conformance::Guest;
use vmlock::{domain, AcquireOptions, DiskMode, Manager, Resource, VmParams};
use vmlock_sanlock::driver::lease_name;
use vmlock_sanlock::proto::{flags, ResourceSpec};

struct Row {
    name: &'static str,
    samples: Vec<Duration>,
}

impl Row {
    fn new(name: &'static str) -> Self {
        Row {
            name,
            samples: Vec::new(),
        }
    }

    fn time(&mut self, f: impl FnOnce()) {
        let t = Instant::now();
        f();
        self.samples.push(t.elapsed());
    }

    fn percentile(sorted: &[Duration], p: f64) -> Duration {
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn vm(id: u32, name: &str) -> VmParams {
    VmParams::new(id, uuid::Uuid::new_v4(), name).unwrap()
}

fn main() {
    let iters: usize = std::env::var("VMLOCK_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let warmup = (iters / 10).max(5);
    let dir = common::workdir();
    let host = common::Host::start(dir.path(), "bench", 1);
    host.wait_joined();
    let disk_path = dir.path().join("disks").join("bench.img");
    std::fs::write(&disk_path, vec![0u8; 4096]).unwrap();
    let disk = Resource::disk(&disk_path, DiskMode::Exclusive).unwrap();
    let opts = AcquireOptions::default();

    // A running VM (a real `sleep` guest) whose manager acquires and releases its disk.
    let guest = Guest::spawn();
    let mut running = Manager::new(
        &host.plugin,
        vm(1, "bench-vm").with_pid(guest.pid()),
        vmlock::StartMode::Start,
    )
    .unwrap();
    running.register_resource(disk.clone()).unwrap();
    running.acquire(&opts).unwrap(); // creates and formats the lease file
    running.release().unwrap();

    // The same lease, straight to the daemon.
    let spec = ResourceSpec {
        lockspace: host.driver.config().lockspace.clone(),
        name: lease_name(&disk_path),
        path: host.driver.lease_path(&disk_path),
        offset: 0,
        lver: 0,
        flags: flags::ALIGN1M | flags::SECTOR512,
    };
    let client = host.daemon.client();
    let mut conn = client.register().unwrap();

    // A shared disk: a running VM of the driver, and its lease and gates straight to the daemon.
    let shared_path = dir.path().join("disks").join("shared.img");
    std::fs::write(&shared_path, vec![0u8; 4096]).unwrap();
    let shared_disk = Resource::disk(&shared_path, DiskMode::Shared).unwrap();
    let guest2 = Guest::spawn();
    let mut sharing = Manager::new(
        &host.plugin,
        vm(3, "bench-shared").with_pid(guest2.pid()),
        vmlock::StartMode::Start,
    )
    .unwrap();
    sharing.register_resource(shared_disk).unwrap();
    sharing.acquire(&opts).unwrap(); // creates the lease and gate files
    sharing.release().unwrap();
    let shared_name = lease_name(&shared_path);
    let shared_lease = host.driver.lease_path(&shared_path);
    let shared_spec = ResourceSpec {
        name: shared_name.clone(),
        path: shared_lease.clone(),
        flags: spec.flags | flags::RES_SHARED,
        ..spec.clone()
    };
    let gate_path = shared_lease.with_file_name(format!("{shared_name}.gate"));
    let gates: Vec<ResourceSpec> = [("src", 0), ("dst", 1 << 20)]
        .into_iter()
        .map(|(which, offset)| ResourceSpec {
            name: format!("{shared_name}.gate.{which}"),
            path: gate_path.clone(),
            offset,
            ..shared_spec.clone()
        })
        .collect();

    let mut rows = [
        Row::new("daemon direct: acquire + release on a registered connection"),
        Row::new("driver: acquire + release of a running VM (Manager)"),
        Row::new("daemon direct: register + acquire + release + close"),
        Row::new("driver: VM start + stop (open, register, acquire, shutdown)"),
        Row::new("daemon direct: shared acquire + release (no gate)"),
        Row::new("daemon direct: the gate alone (both gate leases shared, acquire + release)"),
        Row::new("driver: shared acquire + release of a running VM (gate + lease)"),
    ];
    for round in 0..warmup + iters {
        let keep = round >= warmup;
        let [direct, driver, direct_conn, driver_vm, direct_sh, direct_gate, driver_sh] = &mut rows;
        let sample = |row: &mut Row, f: &mut dyn FnMut()| {
            if keep {
                row.time(f);
            } else {
                f();
            }
        };
        sample(direct, &mut || {
            conn.acquire(
                std::slice::from_ref(&spec),
                flags::ACQUIRE_OWNER_NOWAIT,
                "bench",
            )
            .unwrap();
            conn.release(std::slice::from_ref(&spec)).unwrap();
        });
        sample(driver, &mut || {
            running.acquire(&opts).unwrap();
            running.release().unwrap();
        });
        sample(direct_conn, &mut || {
            let mut c = client.register().unwrap();
            c.acquire(
                std::slice::from_ref(&spec),
                flags::ACQUIRE_OWNER_NOWAIT,
                "bench",
            )
            .unwrap();
            c.release(std::slice::from_ref(&spec)).unwrap();
        });
        sample(driver_vm, &mut || {
            let mut m =
                domain::process_start(&host.plugin, vm(2, "bench-vm2"), [disk.clone()], &opts)
                    .unwrap();
            m.shutdown().unwrap();
        });
        sample(direct_sh, &mut || {
            conn.acquire(
                std::slice::from_ref(&shared_spec),
                flags::ACQUIRE_OWNER_NOWAIT,
                "bench",
            )
            .unwrap();
            conn.release(std::slice::from_ref(&shared_spec)).unwrap();
        });
        sample(direct_gate, &mut || {
            conn.acquire(&gates, flags::ACQUIRE_OWNER_NOWAIT, "bench")
                .unwrap();
            conn.release(&gates).unwrap();
        });
        sample(driver_sh, &mut || {
            sharing.acquire(&opts).unwrap();
            sharing.release().unwrap();
        });
    }
    drop(conn);

    println!(
        "\nsanlock {} (io_timeout {} s, lease file on {}), {iters} iterations after {warmup} warm-up:\n",
        vmlock_sanlock::proto::version_text(host.driver.daemon_version()),
        common::IO_TIMEOUT,
        dir.path().display()
    );
    println!("| path | p50 ms | p99 ms | mean ms |");
    println!("|---|---:|---:|---:|");
    for row in &mut rows {
        row.samples.sort();
        let mean = row.samples.iter().sum::<Duration>() / row.samples.len() as u32;
        println!(
            "| {} | {} | {} | {} |",
            row.name,
            ms(Row::percentile(&row.samples, 50.0)),
            ms(Row::percentile(&row.samples, 99.0)),
            ms(mean)
        );
    }
    // The daemon (SIGKILL by pid) and the directory go when `host` and `dir` drop.
    drop(running);
    drop(sharing);
    drop(guest);
    drop(guest2);
    drop(host);
}
