//! The SVG plot: median throughput by frame size (with min–max whiskers), one series per peer,
//! above the latency CDF of each peer × size that timed frames.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::stats::{rank, several_topologies, summarize, Summary};
use crate::harness::results::{Latency, Machine, Results};
use crate::harness::spec::{FrameSize, PeerKind, Topology};

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
pub fn write_svg(path: &Path, results: &Results) -> Result<(), PlotError> {
    let summaries = summarize(&results.runs);
    let mut svg = String::new();
    draw_svg(&mut svg, &results.machine, &summaries)
        .map_err(|source| PlotError::Draw { path: path.to_path_buf(), source })?;
    std::fs::write(path, svg).map_err(|source| PlotError::Write { path: path.to_path_buf(), source })
}

/// Why the plot was not written.
#[derive(thiserror::Error, Debug)]
pub enum PlotError {
    /// cannot draw the plot for {path}: {source}
    #[error("cannot draw the plot for {}: {source}", .path.display())]
    Draw {
        /// Where it was to go.
        path: PathBuf,
        /// What plotters said.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// cannot write the plot to {path}: {source}
    #[error("cannot write the plot to {}: {source}", .path.display())]
    Write {
        /// Where it was to go.
        path: PathBuf,
        /// Why it could not be written.
        source: std::io::Error,
    },
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

/// One panel of the plot.
type Panel<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// What both panels are drawn from.
struct Layout<'a> {
    /// Frame sizes, ascending: the throughput panel's categories.
    sizes: Vec<FrameSize>,
    /// Throughput series in first-appearance order of (peer, topology).
    series: Vec<Series>,
    /// The summaries with a latency CDF, each with the index of its series (for its colour).
    timed: Vec<(usize, &'a Summary, &'a Latency)>,
    /// `topologies — CPU`, the end of both captions.
    title: String,
}

impl<'a> Layout<'a> {
    fn new(machine: &Machine, summaries: &'a [Summary]) -> Layout<'a> {
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

        let timed = summaries
            .iter()
            .filter_map(|s| {
                let l = s.latency.as_ref().filter(|l| !l.cdf.is_empty())?;
                let i = keys.iter().position(|&k| k == (s.peer, with_topology.then_some(s.topology)))?;
                Some((i, s, l))
            })
            .collect();
        Layout { sizes, series, timed, title: format!("{topo_title} — {cpu}") }
    }
}

/// Draws the plot into `svg`.
fn draw_svg(
    svg: &mut String,
    machine: &Machine,
    summaries: &[Summary],
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let layout = Layout::new(machine, summaries);
    let root = SVGBackend::with_string(svg, (PANEL.0, PANEL.1 * 2)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(PANEL.1);
    draw_throughput(&top, &layout, summaries)?;
    draw_latency(&bottom, &layout)?;
    root.present()?;
    Ok(())
}

/// Panel 1: throughput by frame size.
fn draw_throughput(
    area: &Panel<'_>,
    layout: &Layout<'_>,
    summaries: &[Summary],
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let series = &layout.series;
    let ymax = summaries.iter().map(|s| s.mpps_max).fold(0.0, f64::max);
    let ymax = if ymax > 0.0 { ymax * 1.15 } else { 1.0 };
    // Peers of one size are spread a little around the category so their whiskers do not overlap.
    let dodge = |i: usize| {
        let k = series.len().max(1) as f64;
        (i as f64 - (k - 1.0) / 2.0) * (0.3 / k)
    };
    let axis = SizeAxis(layout.sizes.iter().map(|s| s.to_string()).collect());
    let mut chart = ChartBuilder::on(area)
        .caption(format!("Forwarding rate, {}", layout.title), ("sans-serif", 24))
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
    Ok(())
}

/// Panel 2: latency CDF, or a note that no run timed frames.
fn draw_latency(
    area: &Panel<'_>,
    layout: &Layout<'_>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let caption = format!("One-way latency CDF, {}", layout.title);
    let timed = &layout.timed;
    if timed.is_empty() {
        let area = area.titled(&caption, ("sans-serif", 24))?;
        let (w, h) = area.dim_in_pixel();
        area.draw(&Text::new(
            "no latency measured",
            (w as i32 / 2, h as i32 / 2),
            ("sans-serif", 20).into_font().color(&BLACK.mix(0.6)).pos(Pos::new(HPos::Center, VPos::Center)),
        ))?;
        return Ok(());
    }
    let all_us = timed.iter().flat_map(|(_, _, l)| l.cdf.iter().map(|&(_, ns)| ns as f64 / 1000.0));
    let (lo, hi) = all_us
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), us| (if us > 0.0 { lo.min(us) } else { lo }, hi.max(us)));
    let lo = if lo.is_finite() { lo / 1.25 } else { 0.01 };
    let hi = if hi > lo { hi * 1.25 } else { lo * 10.0 };
    let mut chart = ChartBuilder::on(area)
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
    for &(i, s, l) in timed {
        let k = seen_per_series.entry(i).or_insert(0);
        let c = color(i, 0.25 * *k as f64);
        *k += 1;
        let pts: Vec<(f64, f64)> =
            l.cdf.iter().map(|&(f, ns)| ((ns as f64 / 1000.0).max(lo), f.clamp(0.0, 1.0))).collect();
        let name = format!("{} {}", layout.series[i].name, s.size);
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::report::testdata::{results, run, sample_runs, temp_dir};
    use crate::harness::results::RunResult;

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
        assert!(e.to_string().contains("cannot write the plot to"), "{e}");
        if std::env::var_os("REPORT_SVG_KEEP").is_some() {
            let _ = std::fs::copy(&p, std::env::temp_dir().join("vswitch-report-example.svg"));
        } else {
            let _ = std::fs::remove_dir_all(&d);
        }
    }
}
