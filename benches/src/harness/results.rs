//! The JSON result schema written by `vswitch-bench run --json` and read by `report`.
//!
//! One [`RunResult`] per peer × frame size × repetition (and per NDR trial); summaries are
//! derived from them (see [`report::summarize`](super::report::summarize)), so results from
//! several files can be merged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::spec::{FrameSize, PeerKind, Rate, Topology};

/// Version of this schema; bumped on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// A results file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    /// [`SCHEMA_VERSION`] of the writer.
    pub schema: u32,
    /// Where it ran.
    pub machine: Machine,
    /// How it was invoked.
    pub params: Params,
    /// Every measured run, in the order run.
    pub runs: Vec<RunResult>,
}

/// Description of the machine and software under test.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// Online CPUs.
    pub cpus: usize,
    /// `uname -r`.
    pub kernel: String,
    /// Host name.
    pub hostname: String,
    /// TSC frequency in Hz (what cycles/packet figures are counted in).
    pub tsc_hz: f64,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix: u64,
    /// Versions of the peers and tools, e.g. `"dpdk-testpmd" => "22.11.11"`.
    pub versions: BTreeMap<String, String>,
}

/// The command's parameters.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Params {
    /// `run`, `latency` or `ndr`.
    pub command: String,
    /// Topology.
    pub topology: Topology,
    /// Ports.
    pub ports: usize,
    /// Flows per sending port (distinct MAC/IP/UDP-port tuples).
    pub flows: usize,
    /// Measured seconds per run (after warm-up).
    pub duration_s: f64,
    /// Discarded seconds before each measurement.
    pub warmup_s: f64,
    /// Repetitions per peer and size.
    pub reps: u32,
    /// Offered rate.
    pub rate: Rate,
    /// CPU the switch under test was pinned to (the first of `backend_cpus`).
    pub backend_cpu: usize,
    /// CPU the generator was pinned to (the first of `generator_cpus`).
    pub generator_cpu: usize,
    /// CPUs the switch under test was pinned to (its polling threads, one each); empty in files
    /// written before there could be several.
    #[serde(default)]
    pub backend_cpus: Vec<usize>,
    /// CPUs of the generator's threads, one each.
    #[serde(default)]
    pub generator_cpus: Vec<usize>,
    /// Whether guest memory used huge pages.
    pub hugepages: bool,
}

/// Latency distribution of one run, one-way, in nanoseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    /// Frames timed.
    pub samples: u64,
    /// Smallest.
    pub min_ns: u64,
    /// Mean.
    pub mean_ns: f64,
    /// Median.
    pub p50_ns: u64,
    /// 90th percentile.
    pub p90_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Largest.
    pub max_ns: u64,
    /// Points of the cumulative distribution: (fraction of frames 0..=1, latency ns),
    /// increasing in both, for plotting.
    pub cdf: Vec<(f64, u64)>,
}

/// One measured run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    /// Switch under test.
    pub peer: PeerKind,
    /// Topology.
    pub topology: Topology,
    /// Frame size.
    pub size: FrameSize,
    /// Repetition number, from 1 (NDR trials count up per search step).
    pub rep: u32,
    /// Measured seconds.
    pub duration_s: f64,
    /// Offered rate in frames/s summed over senders; `None` = as fast as possible.
    pub offered_pps: Option<f64>,
    /// Frames the generator put on TX rings during the measurement.
    pub tx_frames: u64,
    /// Frames received during the measurement (all ports).
    pub rx_frames: u64,
    /// Frames expected at receivers (tx × receivers per frame) during the measurement.
    pub expected_frames: u64,
    /// Frames expected but never received (counted after a drain at the end), including
    /// `refused_frames`.
    pub lost_frames: u64,
    /// Fixed-rate runs: frames due when the TX ring was full, so never offered (a NIC would
    /// have dropped them); part of `lost_frames`. Always 0 at the maximum rate, where a full
    /// ring is back-pressure.
    #[serde(default)]
    pub refused_frames: u64,
    /// `lost_frames / expected_frames`.
    pub loss_ratio: f64,
    /// Frames that arrived with a lower sequence number than one already seen on their stream.
    pub reordered: u64,
    /// Frames delivered where the topology says they must not go (VLAN leaks, wrong port).
    pub misdelivered: u64,
    /// Received frames per second, millions (the switch's forwarding rate).
    pub mpps: f64,
    /// Received bits per second, billions, at the nominal frame size (FCS included).
    pub gbps: f64,
    /// CPU cycles the switch's processes used per forwarded frame (process CPU time × TSC Hz).
    pub cycles_per_frame: Option<f64>,
    /// Cycles per frame the switch reports itself (busy cycles only), when it does.
    pub self_cycles_per_frame: Option<f64>,
    /// Times the generator found a TX ring full (the switch did not keep up), in the window.
    pub tx_ring_full: u64,
    /// True when the generator, not the switch, limited the rate (see
    /// [`GenResult::generator_limited`](super::gen::GenResult::generator_limited)).
    pub generator_limited: bool,
    /// Share of all CPUs used by other processes (or taken by the hypervisor: steal time)
    /// during the measurement, percent.
    pub other_cpu_pct: f64,
    /// One-way latency, when frames were timed.
    pub latency: Option<Latency>,
}

impl RunResult {
    /// Whether other processes used enough CPU to distort this run.
    pub fn busy(&self) -> bool {
        self.other_cpu_pct > BUSY_PCT
    }
}

/// Other processes' CPU share above which a run is flagged as disturbed.
pub const BUSY_PCT: f64 = 5.0;
