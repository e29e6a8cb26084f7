//! `vmlockd`: the vmlock lock daemon.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "vmlockd",
    version,
    about = "vmlock's local lock daemon: keeps VM disk locks across its own restarts"
)]
struct Cli {
    #[command(flatten)]
    daemon: vmlockd::DaemonArgs,
}

fn main() -> anyhow::Result<()> {
    vmlockd::daemon_main(Cli::parse().daemon)
}
