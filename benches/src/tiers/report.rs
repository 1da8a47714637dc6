//! The co-design table as text and as an SVG bar chart.

use super::{TierRow, Traffic, GEN_TIERS};

/// The table.
pub fn print(rows: &[TierRow]) {
    println!(
        "{:<18} {:<4} {:>5} {:>8} {:>8} {:>6} {:>6} {:>9} {:>9} {:>7} {:>7} {:>7} {:>8} {:>6} {:>6} {:>22} {:>6}",
        "tier",
        "wire",
        "size",
        "offered",
        "Mpps",
        "deliv",
        "skdrop",
        "host cyc",
        "dev ns",
        "CPU cp",
        "kern cp",
        "desc",
        "DMA B",
        "TLPs",
        "irqs",
        "latency p50/p99/p99.9 us",
        "added"
    );
    for r in rows {
        println!(
            "{:<18} {:<4} {:>5} {:>8.3} {:>8.3} {:>6.3} {:>6.3} {:>9.0} {:>9.0} {:>7.2} {:>7.2} {:>7.2} {:>8.0} {:>6.1} {:>6.3} {:>8.1}/{:.1}/{:.1} {:>+6.1}",
            r.tier,
            r.traffic.name(),
            r.size,
            r.offered_mpps,
            r.mpps,
            r.delivered,
            r.socket_drops,
            r.host_cycles,
            r.device_ns,
            r.cpu_copies,
            r.kernel_copies,
            r.desc_fetches,
            r.dma_bytes,
            r.tlps,
            r.irqs,
            r.latency_us[0],
            r.latency_us[1],
            r.latency_us[2],
            r.latency_added_us
        );
    }
    for r in rows {
        if let Some(h) = r.handover {
            println!(
                "{:<18} {:<4} {:>5}  100 hand-overs of g0 at the fixed rate: plug {} us median ({} max), unplug {} us median ({} max), {} in-flight transmits drained, {} unbalanced",
                r.tier, r.traffic.name(), r.size, h.plug_us[0], h.plug_us[1], h.unplug_us[0], h.unplug_us[1], h.drained, h.unbalanced
            );
        }
    }
    let wire = rows.first().map(|r| r.wire).unwrap_or_default();
    println!("(the sender as fast as it goes: deliv, wire frames delivered per frame offered; skdrop, dropped by the uplink's");
    println!(" socket (its rings full) per frame offered; then per wire frame delivered into");
    println!(" a guest, a coalesced TCP frame counting as its segments; host cycles exclude the modelled device's, which dev ns");
    println!(" shows; kern cp: the TAP wire's read. Latency at a fixed rate, the same for every tier (added: the median less");
    println!(" tier 0's); tcp rows are not timed. back rows: the guests send, the wire's far end receives and counts.");
    if rows.iter().any(|r| r.tier.starts_with("DPDK")) {
        println!(" DPDK rows: dpdk-testpmd forwarding (io) from its net_af_packet/net_af_xdp port on the same veth into one");
        println!(" guest through net_vhost (back: from it), on the same core; no learning, no VLANs. host cyc: its");
        println!(" --record-core-cycles (busy iterations, both directions); it counts no copies (NaN).");
    }
    println!(" Wire: {wire:?})");
}

/// Writes the table as an SVG: per traffic and size, one bar per tier, for CPU copies, host
/// cycles and PCIe transactions per frame.
pub fn write_svg(path: &std::path::Path, rows: &[TierRow]) -> Result<(), String> {
    use plotters::prelude::*;
    let mut groups: Vec<(Traffic, usize)> = Vec::new();
    for r in rows {
        if !groups.contains(&(r.traffic, r.size)) {
            groups.push((r.traffic, r.size));
        }
    }
    let label = |g: &(Traffic, usize)| format!("{} {} B", g.0.name(), g.1);
    type Metric = (&'static str, fn(&TierRow) -> f64);
    let metrics: [Metric; 3] = [
        ("CPU copies per frame", |r| r.cpu_copies),
        ("host cycles per frame (device's excluded)", |r| r.host_cycles),
        ("PCIe transactions per frame", |r| r.tlps),
    ];
    // One per tier of GEN_TIERS (checked at compile time).
    let colors: [RGBColor; GEN_TIERS.len()] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
    ];
    // The tiers' bars share 0.8 of each group's width.
    let w = 0.8 / GEN_TIERS.len() as f64;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 330 * metrics.len() as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        for (panel, (title, f)) in root.split_evenly((metrics.len(), 1)).iter().zip(metrics) {
            let top = rows.iter().map(f).fold(0.0f64, f64::max).max(1e-9) * 1.15;
            let n = groups.len().max(1);
            let mut chart = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..n as f64, 0f64..top)
                .map_err(|e| e.to_string())?;
            chart.configure_mesh().disable_x_mesh().x_labels(0).draw().map_err(|e| e.to_string())?;
            // Each group's name above its bars.
            let names = groups.iter().enumerate().map(|(g, grp)| {
                Text::new(label(grp), (g as f64 + 0.35, top * 0.97), ("sans-serif", 14).into_font())
            });
            chart.draw_series(names).map_err(|e| e.to_string())?;
            for (t, (name, _)) in GEN_TIERS.iter().enumerate() {
                let bars = rows.iter().filter(|r| r.tier == *name).filter_map(|r| {
                    let g = groups.iter().position(|g| *g == (r.traffic, r.size))? as f64;
                    let x0 = g + 0.1 + w * t as f64;
                    Some(Rectangle::new([(x0, 0.0), (x0 + 0.85 * w, f(r))], colors[t].filled()))
                });
                chart
                    .draw_series(bars)
                    .map_err(|e| e.to_string())?
                    .label(*name)
                    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colors[t].filled()));
            }
            chart.configure_series_labels().border_style(BLACK).draw().map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    std::fs::write(path, svg).map_err(|e| format!("{}: {e}", path.display()))
}
