//! The terminal table of summaries, with its machine header and legend, and the warnings
//! printed below it.

use std::fmt::Write as _;
use std::io;

use super::stats::{several_topologies, Summary};
use crate::harness::results::{Machine, BUSY_PCT};
use crate::harness::spec::{FrameSize, PeerKind, Topology};

/// Column titles.
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
/// Left-aligned columns; the others are right-aligned.
const LEFT: [bool; 12] = [true, true, true, false, false, true, false, false, false, false, false, false];
/// The spread column, set one space after the median it qualifies.
const SPREAD: usize = 5;
/// The terminal width the table tries to fit.
const TERMINAL_WIDTH: usize = 110;

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

/// Prints the machine header and one aligned line per summary, the peers of each size side by side
/// (a blank line between sizes), followed by a short legend of the columns.
pub fn print_table(out: &mut dyn io::Write, machine: &Machine, summaries: &[Summary]) -> io::Result<()> {
    print_machine(out, machine)?;
    if summaries.is_empty() {
        writeln!(out, "\nNo runs to report.")?;
        return Ok(());
    }
    let rows: Vec<[String; 12]> = summaries.iter().map(row).collect();
    let widths = column_widths(&rows);
    writeln!(out)?;
    writeln!(out, "{}", line(&widths, &HEADER))?;
    let mut prev: Option<(Topology, FrameSize)> = None;
    for (s, row) in summaries.iter().zip(&rows) {
        let key = (s.topology, s.size);
        if prev.is_some_and(|p| p != key) {
            writeln!(out)?;
        }
        prev = Some(key);
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        writeln!(out, "{}", line(&widths, &cells))?;
    }
    print_legend(out, summaries[0].peer)
}

/// The header lines: CPU, kernel, TSC, host, and the versions of the peers measured.
fn print_machine(out: &mut dyn io::Write, machine: &Machine) -> io::Result<()> {
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
    Ok(())
}

/// The cells of one summary, in [`HEADER`] order.
fn row(s: &Summary) -> [String; 12] {
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
}

/// Width of each column: its widest cell or title, in characters.
fn column_widths(rows: &[[String; 12]]) -> [usize; 12] {
    let mut widths = HEADER.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    widths
}

/// One line of the table, cells padded to `widths` and trailing blanks trimmed.
fn line(widths: &[usize; 12], cells: &[&str]) -> String {
    // Two spaces between columns (one between the median and its spread) when that fits a
    // 110-column terminal, else one.
    let total: usize = widths.iter().sum();
    let wide = total + 2 * (widths.len() - 1) - 1 <= TERMINAL_WIDTH;
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
}

/// What the columns mean; `first` is the peer the ratios are relative to.
fn print_legend(out: &mut dyn io::Write, first: PeerKind) -> io::Result<()> {
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
        "one-way µs, of the median-rate repetition. vs 1st: median Mpps relative to {first} at the same size."
    )?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::report::stats::summarize;
    use crate::harness::report::testdata::{machine, sample_runs};

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
}
