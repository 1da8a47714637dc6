//! Orchestration: for each frame size and repetition, each peer in turn is started, pinned,
//! driven by the generator, measured and stopped; results go to the terminal, JSON and SVG.
//!
//! Peers alternate within a repetition (ours, dpdk, ours, dpdk, ...) rather than running all
//! repetitions of one peer first, so slow drifts in machine load hit every peer alike.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::clock::{Clock, ClockError};
use super::gen::{self, Event, GenConfig, GenError, GenResult, Plan};
use super::peer::{self, Peer, PeerError, PeerOptions};
use super::report::{self, PlotError};
use super::results::{Params, Results, RunResult, SCHEMA_VERSION};
use super::spec::{FrameSize, PeerKind, Rate, SpecError, Topology};
use super::sys;
use crate::frontend::IommuConfig;
use crate::frontend::{Frontend, FrontendConfig};

/// Why a benchmark, or one measurement of it, failed.
#[derive(thiserror::Error, Debug)]
pub enum RunError {
    /// An unusable parameter (its message as is).
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// no frame sizes given (--sizes 64,1518)
    #[error("no frame sizes given (--sizes 64,1518)")]
    NoSizes,
    /// --reps must be at least 1
    #[error("--reps must be at least 1")]
    NoReps,
    /// --backend-cpus and --generator-cpus each need at least one CPU
    #[error("--backend-cpus and --generator-cpus each need at least one CPU")]
    NoCpus,
    /// more generator threads than ports
    #[error("{threads} generator CPUs for {ports} ports: give --generator-cpus at most one CPU per port")]
    TooManyGenerators {
        /// --generator-cpus given.
        threads: usize,
        /// Ports in the topology.
        ports: usize,
    },
    /// The TSC cannot be used (its message as is).
    #[error(transparent)]
    Clock(#[from] ClockError),
    /// none of the requested peers can run here (see the messages above)
    #[error("none of the requested peers can run here (see the messages above)")]
    NoPeers,
    /// cannot create work directory {path}: {source}
    #[error("cannot create work directory {}: {source}", .path.display())]
    Workdir {
        /// The directory.
        path: PathBuf,
        /// Why it cannot be created.
        source: io::Error,
    },
    /// cannot pin the generator to CPU {cpu}: {source}
    #[error("cannot pin the generator to CPU {cpu}: {source}")]
    Pin {
        /// The CPU asked for.
        cpu: usize,
        /// Why not.
        source: io::Error,
    },
    /// The generator cannot plan or send the traffic (its message as is).
    #[error(transparent)]
    Gen(#[from] GenError),
    /// The peer failed to start or stop (its message as is).
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// port {port}: cannot connect to {socket}: {source}
    #[error("port {port}: cannot connect to {}: {source}", .socket.display())]
    Connect {
        /// The port.
        port: usize,
        /// Its vhost-user socket.
        socket: PathBuf,
        /// Why the frontend could not connect.
        source: crate::frontend::Error,
    },
    /// the measurement window never started
    #[error("the measurement window never started")]
    NoWindow,
    /// no offered rate down to {mpps:.3} Mpps met the loss limit {loss}
    #[error("no offered rate down to {mpps:.3} Mpps met the loss limit {loss}")]
    NoNdr {
        /// The lowest failing rate, Mpps.
        mpps: f64,
        /// The loss limit (a ratio).
        loss: f64,
    },
    /// stdout: {0}
    #[error("stdout: {0}")]
    Stdout(#[source] io::Error),
    /// The results file cannot be written (its message as is).
    #[error(transparent)]
    Json(#[from] WriteJsonError),
    /// The plot cannot be written (its message as is).
    #[error(transparent)]
    Plot(#[from] PlotError),
    /// no run completed (see the messages above)
    #[error("no run completed (see the messages above)")]
    NoRuns,
}

/// Why the results could not be written as JSON.
#[derive(thiserror::Error, Debug)]
pub enum WriteJsonError {
    /// cannot encode results: {0}
    #[error("cannot encode results: {0}")]
    Encode(#[from] serde_json::Error),
    /// cannot write {path}: {source}
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why it cannot be written.
        source: io::Error,
    },
}

/// Everything a `run`, `latency` or `ndr` command needs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// `run`, `latency` or `ndr` (recorded in the results).
    pub command: String,
    /// Switches under test, in table order (the first is the ratio's reference).
    pub peers: Vec<PeerKind>,
    /// Topology.
    pub topology: Topology,
    /// Ports (None = the topology's default).
    pub ports: Option<usize>,
    /// Frame sizes.
    pub sizes: Vec<FrameSize>,
    /// Flows per sending port.
    pub flows: usize,
    /// Measured time per run.
    pub duration: Duration,
    /// Discarded time before each measurement.
    pub warmup: Duration,
    /// Repetitions per peer and size.
    pub reps: u32,
    /// Offered load.
    pub rate: Rate,
    /// CPUs for the switch under test: its polling threads, one per CPU (DPDK: forwarding
    /// lcores; OVS: PMD threads); the process as a whole is pinned to them.
    pub backend_cpus: Vec<usize>,
    /// CPUs for the generator: one thread per CPU, the ports split between them.
    pub generator_cpus: Vec<usize>,
    /// Try to back guest memory with huge pages (falls back to 4 KiB pages).
    pub hugepages: bool,
    /// Time frames (one histogram record per received frame).
    pub latency: bool,
    /// Sockets, logs and peer state go here.
    pub workdir: PathBuf,
    /// Our switch's binary (None: found next to this program).
    pub vswitch_bin: Option<PathBuf>,
    /// Write results here.
    pub json: Option<PathBuf>,
    /// Write the plot here.
    pub svg: Option<PathBuf>,
    /// Entries per vring of the generator's queues.
    pub ring_size: u16,
    /// Frames per TX burst.
    pub burst: usize,
    /// NDR: acceptable loss ratio (0.0 = zero loss).
    pub ndr_loss: f64,
    /// NDR: stop when the search interval is narrower than this fraction of its top.
    pub ndr_precision: f64,
    /// Print progress lines.
    pub progress: bool,
    /// Our switch busy-polls (benchmarks); `false` uses its adaptive mode (tests).
    pub busy_poll: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            command: "run".into(),
            peers: vec![PeerKind::Ours],
            topology: Topology::P2p,
            ports: None,
            sizes: vec![FrameSize::Fixed(64)],
            flows: 1,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            reps: 3,
            rate: Rate::Max,
            backend_cpus: vec![0],
            generator_cpus: vec![1],
            hugepages: true,
            latency: true,
            workdir: std::env::temp_dir().join(format!("vswitch-bench-{}", std::process::id())),
            vswitch_bin: None,
            json: None,
            svg: None,
            ring_size: 256,
            burst: 32,
            ndr_loss: 0.0,
            ndr_precision: 0.02,
            progress: true,
            busy_poll: true,
        }
    }
}

/// Runs the benchmark, prints the table and writes the files; returns the results.
pub fn run(opts: &RunOptions) -> Result<Results, RunError> {
    let ports = opts.ports.unwrap_or(opts.topology.default_ports());
    opts.topology.check_ports(ports)?;
    if opts.sizes.is_empty() {
        return Err(RunError::NoSizes);
    }
    if opts.reps == 0 {
        return Err(RunError::NoReps);
    }
    if opts.backend_cpus.is_empty() || opts.generator_cpus.is_empty() {
        return Err(RunError::NoCpus);
    }
    if opts.generator_cpus.len() > ports {
        return Err(RunError::TooManyGenerators { threads: opts.generator_cpus.len(), ports });
    }
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let shared: Vec<usize> =
        opts.backend_cpus.iter().copied().filter(|c| opts.generator_cpus.contains(c)).collect();
    if !shared.is_empty() && cpus > 1 {
        eprintln!("warning: switch and generator share CPUs {shared:?}; figures will be low");
    }
    let clock = Clock::calibrate(Duration::from_millis(100))?;
    let mut machine = sys::machine(clock.hz());
    machine.versions.insert("vswitch-bench".into(), env!("CARGO_PKG_VERSION").into());

    let peers = usable_peers(opts, ports, &mut machine.versions);
    if peers.is_empty() {
        return Err(RunError::NoPeers);
    }

    let hugepages = opts.hugepages
        && sys::hugepages(1024).unwrap_or_else(|e| {
            eprintln!("warning: huge pages unavailable ({e}); using 4 KiB pages");
            false
        });
    std::fs::create_dir_all(&opts.workdir)
        .map_err(|source| RunError::Workdir { path: opts.workdir.clone(), source })?;
    sys::pin_current_thread(opts.generator_cpus[0])
        .map_err(|source| RunError::Pin { cpu: opts.generator_cpus[0], source })?;

    let params = Params {
        command: opts.command.clone(),
        topology: opts.topology,
        ports,
        flows: opts.flows,
        duration_s: opts.duration.as_secs_f64(),
        warmup_s: opts.warmup.as_secs_f64(),
        reps: opts.reps,
        rate: opts.rate,
        backend_cpu: opts.backend_cpus[0],
        generator_cpu: opts.generator_cpus[0],
        backend_cpus: opts.backend_cpus.clone(),
        generator_cpus: opts.generator_cpus.clone(),
        hugepages,
    };
    let mut results = Results { schema: SCHEMA_VERSION, machine, params, runs: Vec::new() };
    let ctx = Ctx { opts, ports, hugepages, clock };

    for &size in &opts.sizes {
        let plan = Plan::new(opts.topology, ports, opts.flows, size)?;
        if opts.command == "ndr" {
            for &kind in &peers {
                match ndr(&ctx, kind, &plan, size) {
                    Ok(r) => results.runs.push(r),
                    Err(e) => eprintln!("{kind} {size}: {e}"),
                }
            }
            continue;
        }
        let rate_of = offered_rates(&ctx, &peers, &plan, size)?;
        for rep in 1..=opts.reps {
            for (i, &kind) in peers.iter().enumerate() {
                match ctx.measure(kind, &plan, size, rate_of[i], rep, opts.duration) {
                    Ok(r) => results.runs.push(r),
                    Err(e) => eprintln!("{kind} {size} rep {rep}: {e}"),
                }
            }
        }
    }

    write_outputs(opts, &results)?;
    let _ = std::fs::remove_dir_all(&opts.workdir);
    if results.runs.is_empty() {
        return Err(RunError::NoRuns);
    }
    Ok(results)
}

/// The offered rate of each peer for `size`, in frames per second (`None`: as fast as the
/// rings take them). For a fraction of the maximum rate, each peer's maximum is measured first.
fn offered_rates(
    ctx: &Ctx<'_>,
    peers: &[PeerKind],
    plan: &Plan,
    size: FrameSize,
) -> Result<Vec<Option<f64>>, RunError> {
    let mut rate_of = Vec::new();
    for &kind in peers {
        let pps = match ctx.opts.rate {
            Rate::Max => None,
            Rate::Pps(p) => Some(p),
            Rate::Fraction(f) => {
                let probe = ctx.measure(kind, plan, size, None, 0, short(ctx.opts.duration))?;
                eprintln!("{kind} {size}: maximum {:.3} Mpps; offering {:.0} %", probe.mpps, f * 100.0);
                Some(probe.mpps * 1e6 * f)
            }
        };
        rate_of.push(pps);
    }
    Ok(rate_of)
}

/// The requested peers that are installed and can run the topology with `ports` ports, each
/// once, in the order asked; records their versions. Says on stderr why others are skipped.
fn usable_peers(opts: &RunOptions, ports: usize, versions: &mut BTreeMap<String, String>) -> Vec<PeerKind> {
    let mut peers = Vec::new();
    for &kind in &opts.peers {
        if peers.contains(&kind) {
            continue;
        }
        let probed = match kind {
            PeerKind::Ours | PeerKind::OursPolicy | PeerKind::OursViommu | PeerKind::OursLog => {
                peer::probe_vswitch(opts.vswitch_bin.as_deref())
            }
            _ => peer::probe(kind),
        };
        match probed {
            Ok(version) => {
                if let Err(why) = peer::supports(kind, opts.topology, ports) {
                    eprintln!("skipping peer {kind}: {why}");
                    continue;
                }
                versions.insert(kind.to_string(), version);
                peers.push(kind);
            }
            Err(e) => eprintln!("skipping peer {kind}: {e}"),
        }
    }
    peers
}

/// Prints the table and its warnings, then writes the JSON and SVG files asked for.
fn write_outputs(opts: &RunOptions, results: &Results) -> Result<(), RunError> {
    let summaries = report::summarize(&results.runs);
    let mut out = std::io::stdout().lock();
    report::print_table(&mut out, &results.machine, &summaries).map_err(RunError::Stdout)?;
    for w in report::warnings(&summaries) {
        let _ = writeln!(out, "warning: {w}");
    }
    drop(out);
    if let Some(path) = &opts.json {
        write_json(path, results)?;
        eprintln!("results written to {}", path.display());
    }
    if let Some(path) = &opts.svg {
        report::write_svg(path, results)?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

/// Writes `results` as pretty JSON.
pub fn write_json(path: &Path, results: &Results) -> Result<(), WriteJsonError> {
    let text = serde_json::to_string_pretty(results)?;
    std::fs::write(path, text + "\n")
        .map_err(|source| WriteJsonError::Write { path: path.to_path_buf(), source })
}

/// A shorter run for probing the maximum rate and for search trials.
fn short(d: Duration) -> Duration {
    d.min(Duration::from_secs(3))
}

struct Ctx<'a> {
    opts: &'a RunOptions,
    ports: usize,
    hugepages: bool,
    clock: Clock,
}

impl Ctx<'_> {
    /// One run: start the peer, connect a frontend per port, drive traffic, stop the peer.
    fn measure(
        &self,
        kind: PeerKind,
        plan: &Plan,
        size: FrameSize,
        rate_pps: Option<f64>,
        rep: u32,
        duration: Duration,
    ) -> Result<RunResult, RunError> {
        let o = self.opts;
        let popts = PeerOptions {
            kind,
            topology: o.topology,
            ports: self.ports,
            backend_cpus: o.backend_cpus.clone(),
            hugepages: self.hugepages,
            workdir: o.workdir.join(format!("{kind}")),
            vswitch_bin: o.vswitch_bin.clone(),
            busy_poll: o.busy_poll,
            flows: o.flows,
        };
        let mut peer = Peer::start(&popts)?;
        let mut frontends = Vec::with_capacity(self.ports);
        let mut fcfg = frontend_config(plan.max_len(), o.ring_size, self.hugepages);
        if kind == PeerKind::OursViommu {
            fcfg.iommu = Some(IommuConfig { prefill: true, page: 4096, ..IommuConfig::default() });
        }
        for (i, sock) in peer.sockets().iter().enumerate() {
            let fe = Frontend::connect(sock, fcfg.clone(), Duration::from_secs(15))
                .map_err(|source| RunError::Connect { port: i, socket: sock.clone(), source })?;
            frontends.push(fe);
        }
        let mut gcfg = GenConfig {
            rate_pps,
            warmup: o.warmup,
            duration,
            burst: o.burst,
            cpus: o.generator_cpus.clone(),
            ..GenConfig::default()
        };
        if kind == PeerKind::OursLog {
            for (i, fe) in frontends.iter_mut().enumerate() {
                fe.start_migration_log().map_err(|source| RunError::Connect {
                    port: i,
                    socket: peer.sockets()[i].clone(),
                    source,
                })?;
            }
            gcfg.read_dirty_log = Some(Duration::from_millis(100));
        }
        let me = std::process::id();
        let pids: Vec<u32> = peer.pids();
        let mut all = pids.clone();
        all.push(me);
        let (mut snap_a, mut snap_b) = (None, None);
        let label = if rep == 0 { format!("{kind} {size} max") } else { format!("{kind} {size} rep {rep}") };
        // A progress line rewrites itself with \r: only on a terminal.
        let progress = o.progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let result = {
            let mut on = |ev: Event| match ev {
                Event::WindowStart => {
                    peer.begin_window();
                    snap_a = Some((sys::cpu_snapshot(&pids), sys::cpu_snapshot(&all)));
                }
                Event::WindowEnd => snap_b = Some((sys::cpu_snapshot(&pids), sys::cpu_snapshot(&all))),
                Event::Progress { elapsed_s, total_s, rx_pps } if progress => {
                    eprint!("\r[{label}] {elapsed_s:4.0}/{total_s:.0} s  {:8.3} Mpps   ", rx_pps / 1e6);
                    let _ = std::io::stderr().flush();
                }
                Event::Progress { .. } => {}
            };
            gen::run(&mut frontends, plan, &gcfg, &self.clock, o.latency, &mut on)
        };
        drop(frontends);
        let report = peer.stop()?;
        let g = result?;
        let (a, b) = match (snap_a, snap_b) {
            (Some(a), Some(b)) => (a, b),
            _ => return Err(RunError::NoWindow),
        };
        // CPU of the switch's processes; "other" load excludes the generator (this process) too.
        let switch_secs = sys::pids_cpu_seconds(&a.0, &b.0);
        let r =
            self.result(kind, size, rep, rate_pps, &g, switch_secs, sys::other_cpu_pct(&a.1, &b.1), report);
        if progress {
            eprint!("\r");
        }
        eprintln!("{}", one_line(&label, &r));
        Ok(r)
    }

    #[allow(clippy::too_many_arguments)]
    fn result(
        &self,
        kind: PeerKind,
        size: FrameSize,
        rep: u32,
        rate_pps: Option<f64>,
        g: &GenResult,
        switch_cpu_s: f64,
        other_cpu_pct: f64,
        report: peer::PeerReport,
    ) -> RunResult {
        let pps = g.pps();
        RunResult {
            peer: kind,
            topology: self.opts.topology,
            size,
            rep,
            duration_s: g.window_s,
            offered_pps: rate_pps,
            tx_frames: g.tx_frames,
            rx_frames: g.rx_frames,
            expected_frames: g.expected,
            lost_frames: g.lost,
            refused_frames: g.refused,
            loss_ratio: if g.expected > 0 { g.lost as f64 / g.expected as f64 } else { 0.0 },
            reordered: g.reordered,
            misdelivered: g.misdelivered,
            mpps: pps / 1e6,
            gbps: if g.window_s > 0.0 { g.window_rx_bytes as f64 * 8.0 / g.window_s / 1e9 } else { 0.0 },
            cycles_per_frame: (g.window_rx > 0).then(|| switch_cpu_s * self.clock.hz() / g.window_rx as f64),
            self_cycles_per_frame: report.self_cycles_per_frame,
            tx_ring_full: g.tx_ring_full,
            generator_limited: g.generator_limited(rate_pps.is_some()),
            other_cpu_pct,
            latency: g.latency.clone(),
        }
    }
}

/// Frontend settings for frames up to `max_len` bytes.
fn frontend_config(max_len: usize, ring_size: u16, hugepages: bool) -> FrontendConfig {
    let mut c = FrontendConfig {
        ring_size,
        hugepages,
        // Room for the largest frame behind a 12-byte header, in whole cache lines.
        tx_buf_size: ((max_len + 12).max(2048).div_ceil(64) * 64) as u32,
        rx_buf_size: 2048,
        scratch_size: 4096,
        ..FrontendConfig::default()
    };
    c.mem_size = c.required_mem_size().div_ceil(2 << 20) * (2 << 20);
    c
}

fn one_line(label: &str, r: &RunResult) -> String {
    let lat = r
        .latency
        .as_ref()
        .map(|l| format!(", latency p50 {:.1} µs p99 {:.1} µs", l.p50_ns as f64 / 1e3, l.p99_ns as f64 / 1e3))
        .unwrap_or_default();
    let cyc = r.cycles_per_frame.map(|c| format!(", {c:.0} cycles/frame")).unwrap_or_default();
    format!(
        "[{label}] {:.3} Mpps, {:.2} Gbit/s{cyc}, lost {} of {}{}{lat}{}{}",
        r.mpps,
        r.gbps,
        r.lost_frames,
        r.expected_frames,
        if r.refused_frames > 0 {
            format!(" ({} refused by a full TX ring)", r.refused_frames)
        } else {
            String::new()
        },
        if r.busy() {
            format!(", machine busy ({:.0} % other load)", r.other_cpu_pct)
        } else {
            String::new()
        },
        if r.generator_limited { ", generator-limited" } else { "" },
    )
}

/// Binary search for the highest offered rate with loss at or below the threshold.
/// Returns the last passing trial (at the NDR rate).
fn ndr(ctx: &Ctx<'_>, kind: PeerKind, plan: &Plan, size: FrameSize) -> Result<RunResult, RunError> {
    let o = ctx.opts;
    let max = ctx.measure(kind, plan, size, None, 0, short(o.duration))?;
    let mut hi = max.mpps * 1e6 * 1.05;
    let mut lo = 0.0;
    let mut best: Option<RunResult> = None;
    let mut rate = max.mpps * 1e6;
    for step in 1..=12u32 {
        let r = ctx.measure(kind, plan, size, Some(rate), step, o.duration)?;
        // Pass or fail on loss alone; a generator that could not keep the rate is reported,
        // since failing the trial for it would drive the search down for the wrong reason.
        let pass = r.loss_ratio <= o.ndr_loss;
        eprintln!(
            "  ndr {kind} {size} step {step}: offered {:.3} Mpps, loss {:.4} % -> {}{}",
            rate / 1e6,
            r.loss_ratio * 100.0,
            if pass { "pass" } else { "fail" },
            if r.generator_limited { " (the generator could not hold this rate)" } else { "" }
        );
        if pass {
            lo = rate;
            best = Some(r);
        } else {
            hi = rate;
        }
        if hi - lo <= o.ndr_precision * hi {
            break;
        }
        rate = (lo + hi) / 2.0;
    }
    let mut best = best.ok_or(RunError::NoNdr { mpps: hi / 1e6, loss: o.ndr_loss })?;
    best.rep = 1;
    eprintln!("NDR {kind} {size}: {:.3} Mpps (loss <= {} %)", lo / 1e6, o.ndr_loss * 100.0);
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_config_fits_jumbo_frames() {
        let c = frontend_config(9014, 256, false);
        assert!(c.tx_buf_size as usize >= 9014 + 12);
        assert_eq!(c.tx_buf_size % 64, 0);
        assert!(c.mem_size >= c.required_mem_size());
        let d = frontend_config(60, 256, false);
        assert_eq!(d.tx_buf_size, 2048);
    }

    #[test]
    fn unknown_sizes_and_reps_are_refused_before_anything_starts() {
        let o = RunOptions { sizes: vec![], ..RunOptions::default() };
        assert!(run(&o).unwrap_err().to_string().contains("no frame sizes"));
        let o = RunOptions { reps: 0, ..RunOptions::default() };
        assert!(run(&o).unwrap_err().to_string().contains("--reps"));
        let o = RunOptions { ports: Some(3), ..RunOptions::default() };
        assert!(run(&o).unwrap_err().to_string().contains("exactly 2"));
    }
}
