//! `vswitch-bench`: the demo and the packet-rate harness.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use vswitch_bench::demo::{self, DemoConfig};
use vswitch_bench::harness::report;
use vswitch_bench::harness::run::{self, RunOptions};
use vswitch_bench::harness::spec::{FrameSize, PeerKind, Rate, Topology};

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
    /// Measure throughput (and latency) of one or more switches, side by side.
    Run {
        #[command(flatten)]
        common: Common,
        /// Frame sizes: nominal sizes including FCS (64..9018) or "imix", comma separated.
        #[arg(long, value_delimiter = ',', default_value = "64,1518")]
        sizes: Vec<FrameSize>,
        /// Offered load: max, N% (of the measured maximum), Nmpps, Nkpps or Npps.
        #[arg(long, default_value = "max")]
        rate: Rate,
        /// Repetitions per peer and size (median and spread are reported).
        #[arg(long, default_value_t = 3)]
        reps: u32,
    },
    /// Latency percentiles at a fixed offered load.
    Latency {
        #[command(flatten)]
        common: Common,
        /// Frame size (nominal, including FCS) or "imix".
        #[arg(long, default_value = "64")]
        size: FrameSize,
        /// Offered load: N% of the measured maximum, Nmpps, Nkpps or Npps.
        #[arg(long, default_value = "50%")]
        rate: Rate,
        /// Repetitions per peer.
        #[arg(long, default_value_t = 1)]
        reps: u32,
    },
    /// RFC 2544-style search for the highest rate with loss at or below a limit.
    Ndr {
        #[command(flatten)]
        common: Common,
        /// Frame size (nominal, including FCS) or "imix".
        #[arg(long, default_value = "64")]
        size: FrameSize,
        /// Acceptable loss in percent of frames (0 = none).
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// Stop when the search interval is narrower than this percentage of its top.
        #[arg(long, default_value_t = 2.0)]
        precision: f64,
    },
    /// The co-design table: the same uplink-to-guests traffic through tier 0 (software), a
    /// Level 0, a Level 1, a Level 2 NIC model (both guests plugged) and a Level 3 one (each
    /// guest given a VF); host and device cost per packet, and at Levels 2 and 3 what 100
    /// hand-overs (unplug, plug) cost under traffic.
    Tiers {
        /// The wire: gen (an in-process wire, this harness's generator at its far end), tap
        /// (a TAP device and an AF_PACKET sender in a network namespace; needs root) or
        /// afpacket (the software path's TAP and afpacket: ports side by side, the latter on a
        /// veth, the same sender; needs root) or afxdp (afpacket: beside afxdp: ports in copy
        /// and skb modes, on veths, the same sender; needs root).
        #[arg(long, default_value = "gen")]
        wire: vswitch_bench::tiers::WireKind,
        /// Nominal frame sizes (with FCS), comma separated.
        #[arg(long, value_delimiter = ',', default_value = "64,1518")]
        sizes: Vec<usize>,
        /// What the wire carries: udp (timed for latency), tcp (two in-order streams the
        /// NIC's LRO can coalesce), back (the guests send to the wire), vm (the guests send to
        /// each other: inter-VM), comma separated.
        #[arg(long, value_delimiter = ',', default_value = "udp,tcp")]
        traffic: Vec<vswitch_bench::tiers::Traffic>,
        /// Measured seconds per run.
        #[arg(long, default_value_t = 3.0)]
        duration: f64,
        /// CPU for the switch's polling thread.
        #[arg(long)]
        pmd_core: Option<usize>,
        /// Frames per second of the fixed-rate run that measures latency (default: 100000 on a
        /// generator wire, 20000 on a TAP).
        #[arg(long)]
        rate: Option<u64>,
        /// Write the rows as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write a bar chart (CPU copies, host cycles, PCIe transactions per frame) as SVG.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Table (and plot) from saved results; several files are merged.
    Report {
        /// JSON files written by `run --json`.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Write a plot (throughput by frame size, latency CDF).
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Write the merged results.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn tiers(
    wire: vswitch_bench::tiers::WireKind,
    sizes: Vec<usize>,
    traffic: Vec<vswitch_bench::tiers::Traffic>,
    duration: f64,
    pmd_core: Option<usize>,
    rate: Option<u64>,
    out: (Option<PathBuf>, Option<PathBuf>),
) -> CmdResult {
    let (json, svg) = out;
    use vswitch_bench::tiers::{self, TiersConfig};
    let cfg = TiersConfig {
        wire,
        sizes,
        traffic,
        duration: seconds("duration", duration)?,
        dir: std::env::temp_dir().join(format!("vswitch-tiers-{}", std::process::id())),
        pmd_core,
        rate,
    };
    let rows = tiers::run(&cfg);
    let _ = std::fs::remove_dir_all(&cfg.dir);
    let rows = rows?;
    tiers::print(&rows);
    if let Some(p) = json {
        std::fs::write(&p, serde_json::to_string_pretty(&rows)?)?;
    }
    if let Some(p) = svg {
        tiers::write_svg(&p, &rows)?;
    }
    Ok(())
}

/// Options every measuring command takes.
#[derive(Args)]
struct Common {
    /// Topology: p2p (A<->B), p2p-uni (A->B), mesh, flood, vlan.
    #[arg(long, default_value = "p2p")]
    topology: Topology,
    /// Ports (default: 2 for p2p, 4 otherwise).
    #[arg(long)]
    ports: Option<usize>,
    /// Switches to measure, in table order: ours, ours+policy (every policy on, nothing dropped), ours+viommu (generator behind a vIOMMU, 4 KiB IOTLB entries), dpdk (testpmd io forwarding), ovs (OVS-DPDK).
    #[arg(long, value_delimiter = ',', default_value = "ours,dpdk")]
    peers: Vec<PeerKind>,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of traffic discarded before each measurement.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Flows per sending port (distinct MACs, IPs and UDP ports).
    #[arg(long, default_value_t = 1)]
    flows: usize,
    /// CPUs the switch under test is pinned to, comma separated: one polling thread per CPU
    /// (DPDK: forwarding lcores; OVS: PMD threads).
    #[arg(long = "backend-cpus", visible_alias = "backend-cpu", value_delimiter = ',', default_value = "0")]
    backend_cpus: Vec<usize>,
    /// CPUs of the generator, comma separated: one thread per CPU, the ports split between them.
    #[arg(
        long = "generator-cpus",
        visible_alias = "generator-cpu",
        value_delimiter = ',',
        default_value = "1"
    )]
    generator_cpus: Vec<usize>,
    /// Use 4 KiB pages for guest memory even when huge pages are available.
    #[arg(long)]
    no_hugepages: bool,
    /// Do not time frames (saves a histogram update per frame).
    #[arg(long)]
    no_latency: bool,
    /// Our switch's binary (default: next to this program, or target/release/vswitch).
    #[arg(long, env = "VSWITCH")]
    vswitch: Option<PathBuf>,
    /// Entries per vring of the generator's queues.
    #[arg(long, default_value_t = 256)]
    ring_size: u16,
    /// Frames per TX burst.
    #[arg(long, default_value_t = 32)]
    burst: usize,
    /// Write results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a plot as SVG.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

fn seconds(name: &str, s: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|_| format!("--{name} {s} is not a number of seconds"))
}

impl Common {
    fn options(self, command: &str) -> Result<RunOptions, String> {
        let duration = seconds("duration", self.duration)?;
        if duration < Duration::from_millis(500) {
            return Err("--duration must be at least 0.5 s".into());
        }
        Ok(RunOptions {
            command: command.into(),
            peers: self.peers,
            topology: self.topology,
            ports: self.ports,
            flows: self.flows,
            duration,
            warmup: seconds("warmup", self.warmup)?,
            backend_cpus: self.backend_cpus,
            generator_cpus: self.generator_cpus,
            hugepages: !self.no_hugepages,
            latency: !self.no_latency,
            vswitch_bin: self.vswitch,
            ring_size: self.ring_size,
            burst: self.burst,
            json: self.json,
            svg: self.svg,
            progress: !self.quiet,
            ..RunOptions::default()
        })
    }
}

/// A failed command: the harness's typed errors and this program's own messages alike, printed
/// as `vswitch-bench: {message}`.
type CmdResult = Result<(), Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    let res: CmdResult = match Cli::parse().cmd {
        Cmd::Demo { ports, size, duration, busy_poll, pmd_cores } => demo::run(DemoConfig {
            ports,
            size,
            duration,
            busy_poll,
            pmd_cores,
            dir: std::env::temp_dir().join(format!("vswitch-demo-{}", std::process::id())),
        })
        .map(|_| ())
        .map_err(Into::into),
        Cmd::Tiers { wire, sizes, traffic, duration, pmd_core, rate, json, svg } => {
            tiers(wire, sizes, traffic, duration, pmd_core, rate, (json, svg))
        }
        Cmd::Run { common, sizes, rate, reps } => {
            measure(common, "run", |o| RunOptions { sizes, rate, reps, ..o })
        }
        Cmd::Latency { common, size, rate, reps } => {
            measure(common, "latency", |o| RunOptions { sizes: vec![size], rate, reps, latency: true, ..o })
        }
        Cmd::Ndr { common, size, loss, precision } => {
            if !((0.0..100.0).contains(&loss) && precision > 0.0 && precision < 100.0) {
                Err("--loss must be in [0, 100) and --precision in (0, 100) percent".into())
            } else {
                measure(common, "ndr", |o| RunOptions {
                    sizes: vec![size],
                    reps: 1,
                    ndr_loss: loss / 100.0,
                    ndr_precision: precision / 100.0,
                    ..o
                })
            }
        }
        Cmd::Report { files, svg, json } => report_cmd(&files, svg, json),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vswitch-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `run`, `latency` or `ndr`: the common options, completed by `finish`, then the harness.
fn measure(common: Common, command: &str, finish: impl FnOnce(RunOptions) -> RunOptions) -> CmdResult {
    let o = common.options(command)?;
    run::run(&finish(o))?;
    Ok(())
}

fn report_cmd(files: &[PathBuf], svg: Option<PathBuf>, json: Option<PathBuf>) -> CmdResult {
    let merged = report::merge(report::load(files)?);
    let summaries = report::summarize(&merged.runs);
    let mut out = std::io::stdout().lock();
    report::print_table(&mut out, &merged.machine, &summaries).map_err(|e| format!("stdout: {e}"))?;
    for w in report::warnings(&summaries) {
        use std::io::Write;
        let _ = writeln!(out, "warning: {w}");
    }
    if let Some(p) = svg {
        report::write_svg(&p, &merged)?;
        eprintln!("plot written to {}", p.display());
    }
    if let Some(p) = json {
        run::write_json(&p, &merged)?;
        eprintln!("merged results written to {}", p.display());
    }
    Ok(())
}
