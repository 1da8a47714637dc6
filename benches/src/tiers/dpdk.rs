//! The reference beside the switch's own uplinks (`--wire afxdp`): DPDK's `dpdk-testpmd`
//! forwarding (`io` mode) between a `net_af_packet` or `net_af_xdp` port on the same veth and a
//! `net_vhost` port the harness's guest connects to, on the switch's polling core, behind the
//! same sender. It does less than the switch (no MAC learning, one guest, no VLANs): a floor for
//! what the kernel interface costs, not a like-for-like switch.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::far::{ip, send_wire, FarRx, Netns};
use super::{receive, spawn_back, wire_frames_for, Rx, TierRow, TiersConfig, Traffic, G};
use crate::frontend::{Frontend, FrontendConfig};
use crate::harness::peer::dpdk::testpmd_cycles;

/// testpmd, stopped with SIGINT (it prints its cycle count on the way out) and killed if it
/// does not go within 5 s.
struct Testpmd(Child);

impl Testpmd {
    fn stop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.stop();
        }
    }
}

/// One row: testpmd with `pmd` (`af_packet` or `af_xdp`) on a veth, at `size`; `traffic` udp
/// (the sender into the guest) or back (the guest to the far end's receiver).
pub(super) fn row(
    cfg: &TiersConfig,
    label: &str,
    pmd: &str,
    size: usize,
    k: usize,
    traffic: Traffic,
) -> Result<TierRow, String> {
    let ifname = format!("vbt{}{k}", std::process::id() % 100_000);
    let peer = format!("{ifname}p");
    let _ = Command::new("ip").args(["link", "del", &ifname]).output();
    ip(&["link", "add", &ifname, "type", "veth", "peer", "name", &peer])?;
    ip(&["link", "set", &ifname, "up"])?;
    let dir = cfg.dir.join(format!("t{k}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let sock = dir.join("vh.sock");
    let _ = std::fs::remove_file(&sock);
    let log = dir.join("testpmd.log");
    let prefix = format!("vsb-tiers-{}-{k}", std::process::id());
    let core = cfg.pmd_core.unwrap_or(0);
    let dev = match pmd {
        "af_xdp" => format!("net_af_xdp0,iface={ifname},start_queue=0,queue_count=1"),
        _ => format!("net_af_packet0,iface={ifname},qpairs=1"),
    };
    let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let child = Command::new("dpdk-testpmd")
        .args([
            "--lcores",
            &format!("0@{core},1@{core}"),
            "--main-lcore",
            "0",
            "--no-pci",
            "--no-huge",
            "-m",
            "1024",
        ])
        .arg(format!("--file-prefix={prefix}"))
        .args(["--vdev", &dev, "--vdev", &format!("net_vhost0,iface={},queues=1", sock.display())])
        .args(["--", "--forward-mode=io", "--nb-cores=1", "--auto-start", "--stats-period", "1"])
        .arg("--record-core-cycles")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("dpdk-testpmd: {e} (scripts/install-test-deps.sh installs it)"))?;
    let mut tp = Testpmd(child);
    let t = Instant::now();
    while !sock.exists() {
        if t.elapsed() > Duration::from_secs(20) || !matches!(tp.0.try_wait(), Ok(None)) {
            return Err(format!("testpmd did not come up: {}", tail(&log)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ns = Netns::new(&peer)?;
    let cfg_fe = FrontendConfig { ring_size: 1024, ..FrontendConfig::default() };
    let mut guest =
        vec![Frontend::connect(&sock, cfg_fe, Duration::from_secs(10)).map_err(|e| format!("guest: {e}"))?];
    let (frames, mss) = wire_frames_for(traffic, size);
    let (mpps, offered, _) = phase(&ns, &peer, &frames, 0, cfg.duration, &mut guest, false, mss)?;
    let pps = cfg.rate.unwrap_or(20_000);
    let (_, _, hist) = phase(&ns, &peer, &frames, pps, cfg.duration, &mut guest, true, mss)?;
    drop(guest);
    tp.stop();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = Command::new("ip").args(["link", "del", &ifname]).output();
    let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{prefix}"));
    Ok(TierRow {
        tier: label.to_string(),
        wire: cfg.wire,
        traffic,
        size,
        offered_mpps: offered,
        mpps,
        delivered: if offered > 0.0 { mpps / offered } else { 0.0 },
        // testpmd's forwarding core, busy iterations only, over both phases and the warm-ups.
        host_cycles: testpmd_cycles(&text).unwrap_or(f64::NAN),
        // Not counted by testpmd.
        cpu_copies: f64::NAN,
        kernel_copies: f64::NAN,
        latency_us: [0.5, 0.99, 0.999].map(|q| hist.value_at_quantile(q) as f64 / 1000.0),
        ..TierRow::default()
    })
}

/// The sender at `pps` (0: as fast as it goes) for `dur` after a 500 ms warm-up, the guest
/// counting; (delivered Mpps, offered Mpps, latency when `timed`).
#[allow(clippy::too_many_arguments)]
fn phase(
    ns: &Netns,
    ifname: &str,
    frames: &[Vec<u8>],
    pps: u64,
    dur: Duration,
    guest: &mut [Frontend],
    timed: bool,
    mss: usize,
) -> Result<(f64, f64, Histogram<u64>), String> {
    let stop_tx = Arc::new(AtomicBool::new(false));
    let (stop_rx, on) = (AtomicBool::new(false), AtomicBool::new(false));
    let rx = Rx { frames: AtomicU64::new(0) };
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    let warmup = Duration::from_millis(500);
    std::thread::scope(|s| -> Result<_, String> {
        let (tx, rxt) = if frames.first().is_some_and(|f| G.iter().any(|g| f[6..12] == *g)) {
            let far_rx = FarRx { frames: &rx.frames, hist: &mut hist, timed: &on };
            spawn_back(s, &ns.0, ifname, frames, pps, &stop_tx, &stop_rx, guest, far_rx)
        } else {
            let (nsname, ifname, frames, stop) =
                (ns.0.clone(), ifname.to_string(), frames.to_vec(), stop_tx.clone());
            let tx = s.spawn(move || send_wire(&nsname, &ifname, frames, pps, stop));
            let (rxr, stop_r, h, onr) = (&rx, &stop_rx, &mut hist, &on);
            let rxt = s.spawn(move || -> Result<u64, String> {
                receive(guest, rxr, stop_r, h, onr, mss);
                Ok(0)
            });
            (tx, rxt)
        };
        std::thread::sleep(warmup);
        let (r0, t0) = (rx.frames.load(Ordering::Relaxed), Instant::now());
        on.store(timed, Ordering::Relaxed);
        std::thread::sleep(dur);
        on.store(false, Ordering::Relaxed);
        let (r1, el) = (rx.frames.load(Ordering::Relaxed), t0.elapsed());
        stop_tx.store(true, Ordering::Relaxed);
        let sent = tx.join();
        std::thread::sleep(Duration::from_millis(100));
        stop_rx.store(true, Ordering::Relaxed);
        // Both joined before either's failure is passed on.
        let received = rxt.join().map_err(|_| "receiver panicked".to_string())?;
        let sent = sent.map_err(|_| "sender panicked".to_string())??;
        received?;
        let total = el + warmup;
        Ok(((r1 - r0) as f64 / el.as_secs_f64() / 1e6, sent as f64 / total.as_secs_f64() / 1e6))
    })
    .map(|(a, b)| (a, b, hist))
}

/// The log's last lines (for an error).
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join(" | ")
}
