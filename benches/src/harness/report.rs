//! Summaries of measured runs, the terminal table, loading and merging results files, and the SVG plot.
//!
//! Everything here works from [`RunResult`]s only, so results written by several invocations (or on
//! several days) can be [`load`]ed, [`merge`]d and summarised together.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::results::{Latency, Machine, Params, Results, RunResult, BUSY_PCT, SCHEMA_VERSION};
use super::spec::{FrameSize, PeerKind, Rate, Topology};

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
fn rank<T: PartialEq + Copy>(order: &mut Vec<T>, x: T) -> usize {
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

/// Formats a latency in nanoseconds as microseconds with 3 significant digits or so.
fn fmt_us(ns: u64) -> String {
    let us = ns as f64 / 1000.0;
    if us < 10.0 {
        format!("{us:.2}")
    } else if us < 100.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.0}")
    }
}

/// Formats a loss ratio as a percentage: `0` when nothing was lost, small values in scientific form.
fn fmt_loss(ratio: f64) -> String {
    let pct = ratio * 100.0;
    if ratio <= 0.0 {
        "0".to_string()
    } else if pct < 0.01 {
        format!("{pct:.1e}")
    } else {
        format!("{pct:.2}")
    }
}

/// Formats an optional value with no decimals, `-` when absent.
fn fmt_opt0(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"))
}

/// Label of a summary in warnings: peer and size, plus the topology when several are present.
fn label(s: &Summary, with_topology: bool) -> String {
    if with_topology {
        format!("{} {} {}", s.peer, s.topology, s.size)
    } else {
        format!("{} {}", s.peer, s.size)
    }
}

/// Whether the summaries cover more than one topology.
fn several_topologies(summaries: &[Summary]) -> bool {
    summaries.iter().any(|s| s.topology != summaries[0].topology)
}

/// Prints the machine header and one aligned line per summary, the peers of each size side by side
/// (a blank line between sizes), followed by a short legend of the columns.
pub fn print_table(out: &mut dyn io::Write, machine: &Machine, summaries: &[Summary]) -> io::Result<()> {
    let host =
        if machine.hostname.is_empty() { String::new() } else { format!(" | host {}", machine.hostname) };
    writeln!(
        out,
        "Machine: {} | {} CPUs | kernel {} | TSC {:.3} GHz{host}",
        if machine.cpu_model.is_empty() { "unknown CPU" } else { &machine.cpu_model },
        machine.cpus,
        if machine.kernel.is_empty() { "unknown" } else { &machine.kernel },
        machine.tsc_hz / 1e9,
    )?;
    if !machine.versions.is_empty() {
        let v: Vec<String> = machine.versions.iter().map(|(k, v)| format!("{k} {v}")).collect();
        writeln!(out, "Versions: {}", v.join(", "))?;
    }
    if summaries.is_empty() {
        writeln!(out, "\nNo runs to report.")?;
        return Ok(());
    }

    const HEADER: [&str; 12] = [
        "size",
        "peer",
        "topology",
        "reps",
        "Mpps",
        "(min–max)",
        "Gbit/s",
        "cyc/fr",
        "self/fr",
        "loss %",
        "µs p50/p99/p99.9",
        "vs 1st",
    ];
    // Left-aligned columns; the others are right-aligned.
    const LEFT: [bool; 12] = [true, true, true, false, false, true, false, false, false, false, false, false];

    let rows: Vec<[String; 12]> = summaries
        .iter()
        .map(|s| {
            [
                s.size.to_string(),
                s.peer.to_string(),
                s.topology.to_string(),
                s.reps.to_string(),
                format!("{:.3}", s.mpps_median),
                format!("({:.2}–{:.2})", s.mpps_min, s.mpps_max),
                format!("{:.2}", s.gbps_median),
                fmt_opt0(s.cycles_median),
                fmt_opt0(s.self_cycles_median),
                fmt_loss(s.loss_ratio_max),
                s.latency.as_ref().map_or_else(
                    || "-".to_string(),
                    |l| format!("{}/{}/{}", fmt_us(l.p50_ns), fmt_us(l.p99_ns), fmt_us(l.p999_ns)),
                ),
                s.ratio_to_first.map_or_else(|| "-".to_string(), |r| format!("{r:.2}×")),
            ]
        })
        .collect();

    let mut widths = HEADER.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // Two spaces between columns (one between the median and its spread) when that fits a
    // 110-column terminal, else one.
    const SPREAD: usize = 5;
    let total: usize = widths.iter().sum();
    let wide = total + 2 * (widths.len() - 1) - 1 <= 110;
    let line = |cells: &[&str]| -> String {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                s.push_str(if wide && i != SPREAD { "  " } else { " " });
            }
            if LEFT[i] {
                let _ = write!(s, "{cell:<w$}", w = widths[i]);
            } else {
                let _ = write!(s, "{cell:>w$}", w = widths[i]);
            }
        }
        s.trim_end().to_string()
    };

    writeln!(out)?;
    writeln!(out, "{}", line(&HEADER))?;
    let mut prev: Option<(Topology, FrameSize)> = None;
    for (s, row) in summaries.iter().zip(&rows) {
        let key = (s.topology, s.size);
        if prev.is_some_and(|p| p != key) {
            writeln!(out)?;
        }
        prev = Some(key);
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        writeln!(out, "{}", line(&cells))?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "Mpps: median (min–max) over repetitions. cyc/fr: switch process CPU time per forwarded frame, in TSC"
    )?;
    writeln!(
        out,
        "cycles; self/fr: busy cycles per frame as the switch reports them. loss %: worst repetition. Latency:"
    )?;
    writeln!(
        out,
        "one-way µs, of the median-rate repetition. vs 1st: median Mpps relative to {} at the same size.",
        summaries[0].peer
    )?;
    Ok(())
}

/// Reads and parses results files, checking the schema version of each.
///
/// Errors name the file and say what was wrong: unreadable, not JSON, written by an incompatible
/// version, or JSON that is not a results file.
pub fn load(paths: &[PathBuf]) -> Result<Vec<Results>, String> {
    if paths.is_empty() {
        return Err("no results files given; pass one or more files written by `vswitch-bench run --json`"
            .to_string());
    }
    paths.iter().map(|p| load_one(p)).collect()
}

/// Reads and parses one results file.
fn load_one(path: &Path) -> Result<Results, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read results file {shown}: {e}"))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        format!("{shown} is not valid JSON ({e}); expected a file written by `vswitch-bench run --json`")
    })?;
    let schema = value.get("schema").ok_or_else(|| {
        format!(
            "{shown} is not a vswitch-bench results file (it has no \"schema\" field); expected a file \
             written by `vswitch-bench run --json`"
        )
    })?;
    match schema.as_u64() {
        Some(v) if v == u64::from(SCHEMA_VERSION) => {}
        Some(v) => {
            return Err(format!(
                "{shown} uses results schema version {v}, but this vswitch-bench reads version \
                 {SCHEMA_VERSION}; use the vswitch-bench that wrote it, or measure again"
            ))
        }
        None => {
            return Err(format!(
                "{shown} has an invalid \"schema\" field ({schema}); expected the number {SCHEMA_VERSION}"
            ))
        }
    }
    serde_json::from_value(value)
        .map_err(|e| format!("{shown} does not match results schema version {SCHEMA_VERSION}: {e}"))
}

/// Merges results files: the machine and parameters of the first, the runs of all, in order.
///
/// An empty list gives an empty [`Results`] with a default machine and placeholder parameters
/// ([`load`] never returns an empty list).
pub fn merge(files: Vec<Results>) -> Results {
    let mut it = files.into_iter();
    let Some(mut first) = it.next() else {
        return Results {
            schema: SCHEMA_VERSION,
            machine: Machine::default(),
            params: Params {
                command: String::new(),
                topology: Topology::P2p,
                ports: 0,
                flows: 0,
                duration_s: 0.0,
                warmup_s: 0.0,
                reps: 0,
                rate: Rate::Max,
                backend_cpu: 0,
                generator_cpu: 0,
                hugepages: false,
            },
            runs: Vec::new(),
        };
    };
    for f in it {
        first.runs.extend(f.runs);
    }
    first
}

/// Human-readable warnings about summaries whose figures should not be trusted as they stand:
/// disturbed repetitions, generator-limited rates, loss, reordering and misdelivery.
pub fn warnings(summaries: &[Summary]) -> Vec<String> {
    let with_topology = several_topologies(summaries);
    let mut out = Vec::new();
    for s in summaries {
        let l = label(s, with_topology);
        if s.busy_reps > 0 {
            out.push(format!(
                "{l}: {} of {} repetitions ran while other processes (or the hypervisor, as steal time) took >{BUSY_PCT}% of the CPUs; \
                 figures are unreliable",
                s.busy_reps, s.reps
            ));
        }
        if s.generator_limited_reps > 0 {
            out.push(format!(
                "{l}: the generator, not the switch, limited the rate in {} of {} repetitions",
                s.generator_limited_reps, s.reps
            ));
        }
        if s.lost_total > 0 || s.loss_ratio_max > 0.0 {
            out.push(format!(
                "{l}: {} frames were lost (up to {}% in one repetition)",
                s.lost_total,
                fmt_loss(s.loss_ratio_max)
            ));
        }
        if s.reordered_total > 0 {
            out.push(format!("{l}: {} frames arrived out of order", s.reordered_total));
        }
        if s.misdelivered_total > 0 {
            out.push(format!(
                "{l}: {} frames were delivered to ports the topology forbids (wrong port or VLAN leak); \
                 the switch forwarded incorrectly",
                s.misdelivered_total
            ));
        }
    }
    out
}

/// Series colours (Tableau 10), by series index.
const COLORS: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// Width and height of one panel of the SVG, in pixels.
const PANEL: (u32, u32) = (1000, 460);

/// Colour of series `i`, lightened towards white by `t` (0..1).
fn color(i: usize, t: f64) -> plotters::style::RGBColor {
    let (r, g, b) = COLORS[i % COLORS.len()];
    let mix = |c: u8| (f64::from(c) + (255.0 - f64::from(c)) * t.clamp(0.0, 0.8)).round() as u8;
    plotters::style::RGBColor(mix(r), mix(g), mix(b))
}

/// Writes an SVG with two panels: median throughput (with min–max whiskers) by frame size, one series
/// per peer; and the latency CDF of each peer × size that timed frames (or a note that none did).
///
/// Text is emitted as SVG `<text>` elements and laid out with plotters' built-in size estimate, so
/// no font files or system font libraries are needed to write the file; the viewer picks the font.
pub fn write_svg(path: &Path, results: &Results) -> Result<(), String> {
    let summaries = summarize(&results.runs);
    let mut svg = String::new();
    draw_svg(&mut svg, &results.machine, &summaries)
        .map_err(|e| format!("cannot draw the plot for {}: {e}", path.display()))?;
    std::fs::write(path, svg).map_err(|e| format!("cannot write the plot to {}: {e}", path.display()))
}

/// One throughput series: a peer (and topology, when several are present).
struct Series {
    name: String,
    /// (category index, median, min, max)
    points: Vec<(usize, f64, f64, f64)>,
}

/// Tick marks for a logarithmic axis over `lo..hi` (both > 0): 1, 2, 5 times powers of ten, or
/// more steps per decade when the range is narrow.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let steps: &[&[f64]] = &[&[1.0, 2.0, 5.0], &[1.0, 1.5, 2.0, 3.0, 5.0, 7.0]];
    let mut ticks = Vec::new();
    for mult in steps {
        ticks.clear();
        let (d0, d1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        for d in d0..=d1 {
            for m in *mult {
                let v = m * 10f64.powi(d);
                if v >= lo && v <= hi {
                    ticks.push(v);
                }
            }
        }
        if ticks.len() >= 4 {
            break;
        }
    }
    ticks
}

/// Categorical x axis of the throughput panel: category `i` (a frame size) sits at `i as f64`, so
/// series can be offset a little around it.
struct SizeAxis(Vec<String>);

impl plotters::coord::ranged1d::Ranged for SizeAxis {
    type FormatOption = plotters::coord::ranged1d::NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let n = self.0.len().max(1) as f64;
        let t = (value + 0.5) / n;
        limit.0 + (f64::from(limit.1 - limit.0) * t).round() as i32
    }

    fn key_points<H: plotters::coord::ranged1d::KeyPointHint>(&self, _hint: H) -> Vec<f64> {
        (0..self.0.len()).map(|i| i as f64).collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        -0.5..self.0.len().max(1) as f64 - 0.5
    }
}

impl plotters::coord::ranged1d::ValueFormatter<f64> for SizeAxis {
    fn format_ext(&self, value: &f64) -> String {
        let i = value.round();
        if i >= 0.0 && (value - i).abs() < 1e-6 {
            self.0.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    }
}

/// Draws the plot into `svg`.
fn draw_svg(
    svg: &mut String,
    machine: &Machine,
    summaries: &[Summary],
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};

    let with_topology = several_topologies(summaries);
    let mut topologies: Vec<Topology> = Vec::new();
    let mut sizes: Vec<FrameSize> = Vec::new();
    for s in summaries {
        rank(&mut topologies, s.topology);
        if !sizes.contains(&s.size) {
            sizes.push(s.size);
        }
    }
    sizes.sort();
    let topo_names: Vec<String> = topologies.iter().map(|t| t.to_string()).collect();
    let cpu = if machine.cpu_model.is_empty() { "unknown CPU" } else { machine.cpu_model.as_str() };
    let topo_title = if topo_names.is_empty() { "no runs".to_string() } else { topo_names.join(", ") };

    // Throughput series in first-appearance order of (peer, topology).
    let mut keys: Vec<(PeerKind, Option<Topology>)> = Vec::new();
    let mut series: Vec<Series> = Vec::new();
    for s in summaries {
        let key = (s.peer, with_topology.then_some(s.topology));
        let i = rank(&mut keys, key);
        if i == series.len() {
            let name = match key.1 {
                Some(t) => format!("{} {t}", s.peer),
                None => s.peer.to_string(),
            };
            series.push(Series { name, points: Vec::new() });
        }
        let x = sizes.iter().position(|&z| z == s.size).unwrap_or(0);
        series[i].points.push((x, s.mpps_median, s.mpps_min, s.mpps_max));
    }

    let timed: Vec<(usize, &Summary, &Latency)> = summaries
        .iter()
        .filter_map(|s| {
            let l = s.latency.as_ref().filter(|l| !l.cdf.is_empty())?;
            let i = keys.iter().position(|&k| k == (s.peer, with_topology.then_some(s.topology)))?;
            Some((i, s, l))
        })
        .collect();

    let root = SVGBackend::with_string(svg, (PANEL.0, PANEL.1 * 2)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(PANEL.1);

    // Panel 1: throughput by frame size.
    let ymax = summaries.iter().map(|s| s.mpps_max).fold(0.0, f64::max);
    let ymax = if ymax > 0.0 { ymax * 1.15 } else { 1.0 };
    // Peers of one size are spread a little around the category so their whiskers do not overlap.
    let dodge = |i: usize| {
        let k = series.len().max(1) as f64;
        (i as f64 - (k - 1.0) / 2.0) * (0.3 / k)
    };
    let axis = SizeAxis(sizes.iter().map(|s| s.to_string()).collect());
    let mut chart = ChartBuilder::on(&top)
        .caption(format!("Forwarding rate, {topo_title} — {cpu}"), ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(axis, 0f64..ymax)?;
    chart
        .configure_mesh()
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 16))
        .light_line_style(BLACK.mix(0.04))
        .disable_x_mesh()
        .y_label_formatter(&|y| format!("{y:.1}"))
        .x_desc("frame size (bytes, FCS included)")
        .y_desc("Mpps (median, min–max)")
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let c = color(i, 0.0);
        let pts: Vec<(f64, f64)> = s.points.iter().map(|&(x, m, _, _)| (x as f64 + dodge(i), m)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
        for &(x, _, lo, hi) in s.points.iter().filter(|p| p.3 > p.2) {
            let x = x as f64 + dodge(i);
            let cap = 0.03;
            chart.draw_series([
                PathElement::new(vec![(x, lo), (x, hi)], c.stroke_width(1)),
                PathElement::new(vec![(x - cap, lo), (x + cap, lo)], c.stroke_width(1)),
                PathElement::new(vec![(x - cap, hi), (x + cap, hi)], c.stroke_width(1)),
            ])?;
        }
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()?;
    }

    // Panel 2: latency CDF.
    let caption = format!("One-way latency CDF, {topo_title} — {cpu}");
    if timed.is_empty() {
        let area = bottom.titled(&caption, ("sans-serif", 24))?;
        let (w, h) = area.dim_in_pixel();
        area.draw(&Text::new(
            "no latency measured",
            (w as i32 / 2, h as i32 / 2),
            ("sans-serif", 20).into_font().color(&BLACK.mix(0.6)).pos(Pos::new(HPos::Center, VPos::Center)),
        ))?;
    } else {
        let all_us = timed.iter().flat_map(|(_, _, l)| l.cdf.iter().map(|&(_, ns)| ns as f64 / 1000.0));
        let (lo, hi) = all_us.fold((f64::INFINITY, 0.0f64), |(lo, hi), us| {
            (if us > 0.0 { lo.min(us) } else { lo }, hi.max(us))
        });
        let lo = if lo.is_finite() { lo / 1.25 } else { 0.01 };
        let hi = if hi > lo { hi * 1.25 } else { lo * 10.0 };
        let mut chart = ChartBuilder::on(&bottom)
            .caption(caption, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(65)
            .build_cartesian_2d((lo..hi).log_scale().with_key_points(log_ticks(lo, hi)), 0f64..1.0)?;
        chart
            .configure_mesh()
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 16))
            .light_line_style(BLACK.mix(0.04))
            .x_label_formatter(&|x| format!("{}", (x * 1e6).round() / 1e6))
            .y_label_formatter(&|y| format!("{y:.1}"))
            .x_desc("latency (µs, log scale)")
            .y_desc("fraction of frames")
            .draw()?;
        // Sizes of the same peer share its colour, lighter for larger sizes.
        let mut seen_per_series: BTreeMap<usize, usize> = BTreeMap::new();
        for &(i, s, l) in &timed {
            let k = seen_per_series.entry(i).or_insert(0);
            let c = color(i, 0.25 * *k as f64);
            *k += 1;
            let pts: Vec<(f64, f64)> =
                l.cdf.iter().map(|&(f, ns)| ((ns as f64 / 1000.0).max(lo), f.clamp(0.0, 1.0))).collect();
            let name = format!("{} {}", series[i].name, s.size);
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(peer: PeerKind, size: FrameSize, rep: u32, mpps: f64) -> RunResult {
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

    fn latency(p50_ns: u64) -> Latency {
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

    fn machine() -> Machine {
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

    fn results(runs: Vec<RunResult>) -> Results {
        let mut r = merge(Vec::new());
        r.machine = machine();
        r.params.command = "run".into();
        r.params.ports = 2;
        r.params.reps = 3;
        r.runs = runs;
        r
    }

    fn sample_runs() -> Vec<RunResult> {
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

    #[test]
    fn warnings_say_what_is_wrong() {
        let mut runs = sample_runs();
        runs[2].other_cpu_pct = 20.0;
        runs[3].other_cpu_pct = 6.0;
        runs[4].other_cpu_pct = 1.0;
        runs[7].generator_limited = true;
        runs[8].generator_limited = true;
        runs[5].lost_frames = 7;
        runs[5].loss_ratio = 0.007;
        runs[0].misdelivered = 3;
        runs[0].reordered = 2;
        let w = warnings(&summarize(&runs));
        let has = |needle: &str| w.iter().any(|l| l.contains(needle));
        assert!(
            has("ours 64: 2 of 3 repetitions ran while other processes (or the hypervisor, as steal time) took >5% of the CPUs; figures are unreliable"),
            "{w:#?}"
        );
        assert!(
            has("dpdk 1518: the generator, not the switch, limited the rate in 2 of 2 repetitions"),
            "{w:#?}"
        );
        assert!(has("dpdk 64: 7 frames were lost (up to 0.70% in one repetition)"), "{w:#?}");
        assert!(has("ours imix: 3 frames were delivered to ports the topology forbids"), "{w:#?}");
        assert!(has("ours imix: 2 frames arrived out of order"), "{w:#?}");
        assert_eq!(w.len(), 5, "{w:#?}");
        assert!(warnings(&summarize(&sample_runs())).is_empty());
    }

    #[test]
    fn table_is_aligned_and_fits() {
        let s = summarize(&sample_runs());
        let mut buf = Vec::new();
        print_table(&mut buf, &machine(), &s).unwrap();
        let text = String::from_utf8(buf).unwrap();
        println!("{text}");
        assert!(text.starts_with("Machine: Test CPU @ 3.00GHz | 2 CPUs | kernel 6.1.0-test | TSC 2.900 GHz"));
        assert!(text.contains("dpdk-testpmd 22.11.11"));
        for l in text.lines() {
            assert!(l.chars().count() <= 110, "too wide: {l}");
        }
        let rows: Vec<&str> = text.lines().filter(|l| l.contains(" p2p ")).collect();
        assert_eq!(rows.len(), 5);
        assert!(rows[0].contains("11.000") && rows[0].contains("(10.00–12.00)") && rows[0].contains("1.00×"));
        assert!(rows[0].contains("5.00/20.0/40.0"), "{}", rows[0]);
        assert!(rows[1].contains("0.77×"));
        // Columns line up: the Mpps column ends at the same place on every row.
        let header = text.lines().find(|l| l.starts_with("size")).unwrap();
        let end = header.find("Mpps").unwrap() + 4;
        for r in &rows {
            assert!(r.as_bytes()[end - 1].is_ascii_digit(), "{r}");
            assert_eq!(r.as_bytes()[end], b' ', "{r}");
        }
        let mut empty = Vec::new();
        print_table(&mut empty, &Machine::default(), &[]).unwrap();
        assert!(String::from_utf8(empty).unwrap().contains("No runs"));
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vswitch-report-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn json_round_trip_and_merge() {
        let d = temp_dir("json");
        let a = results(sample_runs());
        let mut b = results(vec![run(PeerKind::Ovs, FrameSize::Fixed(64), 1, 1.0)]);
        b.machine.cpu_model = "Other".into();
        let (pa, pb) = (d.join("a.json"), d.join("b.json"));
        std::fs::write(&pa, serde_json::to_string_pretty(&a).unwrap()).unwrap();
        std::fs::write(&pb, serde_json::to_string(&b).unwrap()).unwrap();
        let loaded = load(&[pa.clone(), pb]).unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[0].runs.len(), a.runs.len());
        assert_eq!(loaded[0].runs[2].latency, a.runs[2].latency);
        assert_eq!(loaded[0].runs[7].size, FrameSize::Fixed(1518));
        assert_eq!(serde_json::to_value(&loaded[0]).unwrap(), serde_json::to_value(&a).unwrap());
        let m = merge(loaded);
        assert_eq!(m.machine.cpu_model, "Test CPU @ 3.00GHz");
        assert_eq!(m.runs.len(), a.runs.len() + 1);
        assert_eq!(m.runs.last().map(|r| r.peer), Some(PeerKind::Ovs));
        // Summaries serialise too (for `report --json`).
        let j = serde_json::to_string(&summarize(&m.runs)).unwrap();
        assert!(j.contains("\"ratio_to_first\""));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn load_errors_name_the_file_and_the_problem() {
        let d = temp_dir("errors");
        let missing = d.join("missing.json");
        let e = load(&[missing]).unwrap_err();
        assert!(e.contains("cannot read results file") && e.contains("missing.json"), "{e}");

        let bad = d.join("bad.json");
        std::fs::write(&bad, "{ not json").unwrap();
        let e = load(&[bad]).unwrap_err();
        assert!(e.contains("bad.json is not valid JSON"), "{e}");

        let noschema = d.join("noschema.json");
        std::fs::write(&noschema, "{\"runs\": []}").unwrap();
        let e = load(&[noschema]).unwrap_err();
        assert!(e.contains("noschema.json is not a vswitch-bench results file"), "{e}");

        let mut v = serde_json::to_value(results(sample_runs())).unwrap();
        v["schema"] = serde_json::json!(SCHEMA_VERSION + 1);
        let newer = d.join("newer.json");
        std::fs::write(&newer, v.to_string()).unwrap();
        let e = load(&[newer]).unwrap_err();
        assert!(
            e.contains("newer.json uses results schema version 2") && e.contains("reads version 1"),
            "{e}"
        );

        let mut v = serde_json::to_value(results(sample_runs())).unwrap();
        v["runs"][0]["size"] = serde_json::json!("huge");
        let wrong = d.join("wrong.json");
        std::fs::write(&wrong, v.to_string()).unwrap();
        let e = load(&[wrong]).unwrap_err();
        assert!(e.contains("wrong.json does not match results schema version 1"), "{e}");

        assert!(load(&[]).unwrap_err().contains("no results files"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn svg_has_both_panels_and_every_peer() {
        let d = temp_dir("svg");
        let mut runs = sample_runs();
        runs.push(run(PeerKind::Ovs, FrameSize::Imix, 1, 1.5));
        let p = d.join("plot.svg");
        write_svg(&p, &results(runs)).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        for name in ["ours", "dpdk", "ovs", "Forwarding rate, p2p", "latency CDF", "Test CPU", "imix"] {
            assert!(svg.contains(name), "missing {name}");
        }
        assert!(!svg.contains("no latency measured"));

        let p2 = d.join("nolat.svg");
        let plain: Vec<RunResult> =
            sample_runs().into_iter().map(|r| RunResult { latency: None, ..r }).collect();
        write_svg(&p2, &results(plain)).unwrap();
        let svg = std::fs::read_to_string(&p2).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("no latency measured"));

        write_svg(&d.join("empty.svg"), &results(Vec::new())).unwrap();
        let e = write_svg(&d.join("no/such/dir/x.svg"), &results(sample_runs())).unwrap_err();
        assert!(e.contains("cannot write the plot to"), "{e}");
        if std::env::var_os("REPORT_SVG_KEEP").is_some() {
            let _ = std::fs::copy(&p, std::env::temp_dir().join("vswitch-report-example.svg"));
        } else {
            let _ = std::fs::remove_dir_all(&d);
        }
    }
}
