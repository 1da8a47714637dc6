//! `vswitch-bench`: the demo and (later) the benchmark harness.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vswitch_bench::demo::{self, DemoConfig};

#[derive(Parser)]
#[command(name = "vswitch-bench", version, about = "Demo and packet-rate harness for vhost-user switches")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the switch with in-process frontends exchanging traffic; print live rates.
    Demo {
        /// Number of ports (and frontends).
        #[arg(long, default_value_t = 3)]
        ports: usize,
        /// Frame size in bytes (60..1514).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Seconds to run (0 = until Ctrl-C).
        #[arg(long, default_value_t = 0)]
        duration: u64,
        /// Switch polls without sleeping.
        #[arg(long)]
        busy_poll: bool,
        /// CPUs for the switch's polling threads.
        #[arg(long, value_delimiter = ',')]
        pmd_cores: Vec<usize>,
    },
}

fn main() -> ExitCode {
    let res = match Cli::parse().cmd {
        Cmd::Demo { ports, size, duration, busy_poll, pmd_cores } => demo::run(DemoConfig {
            ports,
            size,
            duration,
            busy_poll,
            pmd_cores,
            dir: std::env::temp_dir().join(format!("vswitch-demo-{}", std::process::id())),
        })
        .map(|_| ()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vswitch-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
