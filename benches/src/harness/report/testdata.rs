//! Runs, machines and directories the report's tests share.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::merge;
use crate::harness::results::{Latency, Machine, Results, RunResult};
use crate::harness::spec::{FrameSize, PeerKind, Topology};

pub(super) fn run(peer: PeerKind, size: FrameSize, rep: u32, mpps: f64) -> RunResult {
    RunResult {
        peer,
        topology: Topology::P2p,
        size,
        rep,
        duration_s: 1.0,
        offered_pps: None,
        tx_frames: 1000,
        rx_frames: 1000,
        expected_frames: 1000,
        refused_frames: 0,
        lost_frames: 0,
        loss_ratio: 0.0,
        reordered: 0,
        misdelivered: 0,
        mpps,
        gbps: mpps * 0.5,
        cycles_per_frame: Some(mpps * 10.0),
        self_cycles_per_frame: None,
        tx_ring_full: 10,
        generator_limited: false,
        other_cpu_pct: 0.0,
        latency: None,
    }
}

pub(super) fn latency(p50_ns: u64) -> Latency {
    Latency {
        samples: 100,
        min_ns: p50_ns / 2,
        mean_ns: p50_ns as f64,
        p50_ns,
        p90_ns: p50_ns * 2,
        p99_ns: p50_ns * 4,
        p999_ns: p50_ns * 8,
        max_ns: p50_ns * 10,
        cdf: vec![
            (0.0, p50_ns / 2),
            (0.5, p50_ns),
            (0.9, p50_ns * 2),
            (0.99, p50_ns * 4),
            (1.0, p50_ns * 10),
        ],
    }
}

pub(super) fn machine() -> Machine {
    Machine {
        cpu_model: "Test CPU @ 3.00GHz".into(),
        cpus: 2,
        kernel: "6.1.0-test".into(),
        hostname: "box".into(),
        tsc_hz: 2.9e9,
        started_unix: 1,
        versions: BTreeMap::from([("dpdk-testpmd".to_string(), "22.11.11".to_string())]),
    }
}

pub(super) fn results(runs: Vec<RunResult>) -> Results {
    let mut r = merge(Vec::new());
    r.machine = machine();
    r.params.command = "run".into();
    r.params.ports = 2;
    r.params.reps = 3;
    r.runs = runs;
    r
}

pub(super) fn sample_runs() -> Vec<RunResult> {
    use FrameSize::{Fixed, Imix};
    use PeerKind::{Dpdk, Ours};
    let mut v = vec![
        run(Ours, Imix, 1, 3.0),
        run(Ours, Fixed(1518), 1, 2.0),
        run(Ours, Fixed(64), 1, 10.0),
        run(Ours, Fixed(64), 2, 12.0),
        run(Ours, Fixed(64), 3, 11.0),
        run(Dpdk, Fixed(64), 1, 9.0),
        run(Dpdk, Fixed(64), 2, 8.0),
        run(Dpdk, Fixed(1518), 1, 2.5),
        run(Dpdk, Fixed(1518), 2, 2.1),
    ];
    v[2].latency = Some(latency(4000));
    v[3].latency = Some(latency(6000));
    v[4].latency = Some(latency(5000));
    v[5].latency = Some(latency(3000));
    v
}

pub(super) fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vswitch-report-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
