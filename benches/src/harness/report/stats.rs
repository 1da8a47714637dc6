//! Statistics over repetitions: runs grouped by topology, frame size and peer into [`Summary`]
//! rows with medians, spread, totals and the ratio to the first peer.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::harness::results::{Latency, RunResult};
use crate::harness::spec::{FrameSize, PeerKind, Topology};

/// One row: a peer × topology × frame size, over its repetitions.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Switch under test.
    pub peer: PeerKind,
    /// Topology.
    pub topology: Topology,
    /// Frame size.
    pub size: FrameSize,
    /// Runs (repetitions) summarised.
    pub reps: usize,
    /// Median forwarding rate, millions of frames per second.
    pub mpps_median: f64,
    /// Slowest repetition, Mpps.
    pub mpps_min: f64,
    /// Fastest repetition, Mpps.
    pub mpps_max: f64,
    /// Median throughput, Gbit/s at the nominal frame size.
    pub gbps_median: f64,
    /// Median of the switch processes' CPU cycles per frame, over the runs that measured it.
    pub cycles_median: Option<f64>,
    /// Median of the cycles per frame the switch reports itself, over the runs that have it.
    pub self_cycles_median: Option<f64>,
    /// Worst loss ratio of any repetition (0..=1).
    pub loss_ratio_max: f64,
    /// Frames lost, summed over repetitions.
    pub lost_total: u64,
    /// Frames received out of order, summed over repetitions.
    pub reordered_total: u64,
    /// Frames delivered where the topology forbids, summed over repetitions.
    pub misdelivered_total: u64,
    /// Latency of the repetition with the median rate, among the repetitions that timed frames
    /// (the lower of the middle two for an even count).
    pub latency: Option<Latency>,
    /// Repetitions disturbed by other processes ([`RunResult::busy`]).
    pub busy_reps: usize,
    /// Repetitions where the generator, not the switch, limited the rate.
    pub generator_limited_reps: usize,
    /// `mpps_median` divided by the first peer's `mpps_median` for the same topology and size.
    /// The first peer is the one that appears first in the runs; `None` when it has no row for this
    /// topology and size, or measured no frames.
    pub ratio_to_first: Option<f64>,
}

/// Median of `v` (the mean of the middle two for an even count); `None` for an empty slice.
fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// Position of `x` in `order`, appending it when new (first-appearance order).
pub(super) fn rank<T: PartialEq + Copy>(order: &mut Vec<T>, x: T) -> usize {
    match order.iter().position(|&o| o == x) {
        Some(i) => i,
        None => {
            order.push(x);
            order.len() - 1
        }
    }
}

/// Groups `runs` by topology, frame size and peer and summarises each group.
///
/// Rows are ordered by topology (order of first appearance), then frame size (fixed sizes ascending,
/// IMIX last), then peer (order of first appearance), so the peers of one size are adjacent.
pub fn summarize(runs: &[RunResult]) -> Vec<Summary> {
    let mut peers: Vec<PeerKind> = Vec::new();
    let mut topologies: Vec<Topology> = Vec::new();
    // (topology rank, size, peer rank) -> runs
    let mut groups: BTreeMap<(usize, FrameSize, usize), Vec<&RunResult>> = BTreeMap::new();
    for r in runs {
        let p = rank(&mut peers, r.peer);
        let t = rank(&mut topologies, r.topology);
        groups.entry((t, r.size, p)).or_default().push(r);
    }

    let mut out: Vec<Summary> = groups.values().map(|g| summarize_group(g)).collect();

    if let Some(&first) = peers.first() {
        let base: BTreeMap<(usize, FrameSize), f64> = groups
            .keys()
            .zip(&out)
            .filter(|(_, s)| s.peer == first)
            .map(|(&(t, size, _), s)| ((t, size), s.mpps_median))
            .collect();
        for (&(t, size, _), s) in groups.keys().zip(out.iter_mut()) {
            s.ratio_to_first = base.get(&(t, size)).filter(|&&b| b > 0.0).map(|&b| s.mpps_median / b);
        }
    }
    out
}

/// Summarises one non-empty group of runs of the same peer, topology and size.
fn summarize_group(g: &[&RunResult]) -> Summary {
    let first = g[0];
    let collect =
        |f: &dyn Fn(&RunResult) -> Option<f64>| -> Vec<f64> { g.iter().filter_map(|r| f(r)).collect() };
    let mut mpps = collect(&|r| Some(r.mpps));
    let mut gbps = collect(&|r| Some(r.gbps));
    let mut cycles = collect(&|r| r.cycles_per_frame);
    let mut self_cycles = collect(&|r| r.self_cycles_per_frame);

    let mut timed: Vec<&RunResult> = g.iter().copied().filter(|r| r.latency.is_some()).collect();
    timed.sort_by(|a, b| a.mpps.total_cmp(&b.mpps));
    let latency = timed.get(timed.len().saturating_sub(1) / 2).and_then(|r| r.latency.clone());

    let mpps_median = median(&mut mpps).unwrap_or(0.0);
    Summary {
        peer: first.peer,
        topology: first.topology,
        size: first.size,
        reps: g.len(),
        mpps_median,
        mpps_min: mpps.first().copied().unwrap_or(0.0),
        mpps_max: mpps.last().copied().unwrap_or(0.0),
        gbps_median: median(&mut gbps).unwrap_or(0.0),
        cycles_median: median(&mut cycles),
        self_cycles_median: median(&mut self_cycles),
        loss_ratio_max: g.iter().map(|r| r.loss_ratio).fold(0.0, f64::max),
        lost_total: g.iter().map(|r| r.lost_frames).sum(),
        reordered_total: g.iter().map(|r| r.reordered).sum(),
        misdelivered_total: g.iter().map(|r| r.misdelivered).sum(),
        latency,
        busy_reps: g.iter().filter(|r| r.busy()).count(),
        generator_limited_reps: g.iter().filter(|r| r.generator_limited).count(),
        ratio_to_first: None,
    }
}

/// Whether the summaries cover more than one topology.
pub(super) fn several_topologies(summaries: &[Summary]) -> bool {
    summaries.iter().any(|s| s.topology != summaries[0].topology)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::report::testdata::{run, sample_runs};

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn summarize_groups_orders_and_compares() {
        let s = summarize(&sample_runs());
        let keys: Vec<(PeerKind, FrameSize)> = s.iter().map(|s| (s.peer, s.size)).collect();
        use FrameSize::{Fixed, Imix};
        use PeerKind::{Dpdk, Ours};
        assert_eq!(
            keys,
            vec![
                (Ours, Fixed(64)),
                (Dpdk, Fixed(64)),
                (Ours, Fixed(1518)),
                (Dpdk, Fixed(1518)),
                (Ours, Imix)
            ]
        );

        let ours64 = &s[0];
        assert_eq!(ours64.reps, 3);
        assert_eq!((ours64.mpps_median, ours64.mpps_min, ours64.mpps_max), (11.0, 10.0, 12.0));
        assert_eq!(ours64.gbps_median, 5.5);
        assert_eq!(ours64.cycles_median, Some(110.0));
        assert_eq!(ours64.self_cycles_median, None);
        assert_eq!(ours64.ratio_to_first, Some(1.0));
        // The repetition with the median rate (11 Mpps) had p50 = 5 µs.
        assert_eq!(ours64.latency.as_ref().map(|l| l.p50_ns), Some(5000));

        let dpdk64 = &s[1];
        assert_eq!(dpdk64.reps, 2);
        assert_eq!(dpdk64.mpps_median, 8.5, "even count: mean of the middle two");
        assert_eq!((dpdk64.mpps_min, dpdk64.mpps_max), (8.0, 9.0));
        let r = dpdk64.ratio_to_first.unwrap_or(0.0);
        assert!((r - 8.5 / 11.0).abs() < 1e-12, "{r}");
        assert_eq!(dpdk64.latency.as_ref().map(|l| l.p50_ns), Some(3000));

        let dpdk1518 = &s[3];
        assert!((dpdk1518.mpps_median - 2.3).abs() < 1e-12);
        assert!((dpdk1518.ratio_to_first.unwrap_or(0.0) - 2.3 / 2.0).abs() < 1e-12);
        assert!(dpdk1518.latency.is_none());
        assert_eq!(s[4].ratio_to_first, Some(1.0));
    }

    #[test]
    fn ratio_needs_the_first_peer() {
        // dpdk appears first, so it is the baseline; ours has a size dpdk lacks.
        let runs = vec![
            run(PeerKind::Dpdk, FrameSize::Fixed(64), 1, 4.0),
            run(PeerKind::Ours, FrameSize::Fixed(64), 1, 5.0),
            run(PeerKind::Ours, FrameSize::Fixed(128), 1, 5.0),
        ];
        let s = summarize(&runs);
        assert_eq!(s[0].peer, PeerKind::Dpdk);
        assert_eq!(s[0].ratio_to_first, Some(1.0));
        assert_eq!(s[1].ratio_to_first, Some(1.25));
        assert_eq!(s[2].ratio_to_first, None);
        assert!(summarize(&[]).is_empty());
    }
}
