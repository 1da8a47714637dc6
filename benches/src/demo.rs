//! `vswitch-bench demo`: the switch with a built-in topology. N in-process virtio-net
//! frontends connect to N switch ports over real vhost-user sockets and send to each other in
//! a ring (port i → port i+1), after one broadcast each so the switch learns every MAC.
//! Prints live rates until interrupted or the duration ends.
//!
//! ```text
//!   frontend 0 ─┐                 ┌─ frontend 1
//!               ├── vswitch (PMD) ─┤
//!   frontend 2 ─┘                 └─ ...
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vswitch::control::Stats;
use vswitch::{PortConfig, Switch, SwitchConfig};

use crate::frame::write_frame;
use crate::frontend::{Frontend, FrontendConfig};

/// Demo settings.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Number of ports (and frontends), at least 2.
    pub ports: usize,
    /// Frame size in bytes (60..=1514).
    pub size: usize,
    /// Seconds to run; 0 = until Ctrl-C.
    pub duration: u64,
    /// Switch polling mode.
    pub busy_poll: bool,
    /// PMD CPUs.
    pub pmd_cores: Vec<usize>,
    /// Where sockets go.
    pub dir: PathBuf,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Per-frontend counters the generator thread publishes.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
}

/// Runs the demo; returns the total frames delivered.
pub fn run(cfg: DemoConfig) -> Result<u64, String> {
    if cfg.ports < 2 {
        return Err("the demo needs at least 2 ports".into());
    }
    if !(60..=1514).contains(&cfg.size) {
        return Err(format!("--size {} is outside 60..1514", cfg.size));
    }
    // SAFETY: installing an async-signal-safe handler that only stores an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    std::fs::create_dir_all(&cfg.dir).map_err(|e| format!("cannot create {}: {e}", cfg.dir.display()))?;
    let sock = |i: usize| cfg.dir.join(format!("port{i}.sock"));
    let control = cfg.dir.join("vswitch.ctl");
    let ports = (0..cfg.ports)
        .map(|i| PortConfig::parse(&format!("port{i}={}", sock(i).display())).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let sw = Switch::start(SwitchConfig {
        pmd_cores: cfg.pmd_cores.clone(),
        busy_poll: cfg.busy_poll,
        control: Some(control.clone()),
        fdb_aging_secs: 300,
        ports,
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    let mut fes = Vec::new();
    for i in 0..cfg.ports {
        let fe = Frontend::connect(&sock(i), FrontendConfig::default(), Duration::from_secs(10))
            .map_err(|e| format!("frontend {i}: {e}"))?;
        fes.push(fe);
    }
    println!(
        "demo: {} ports, {}-byte frames, sockets and control socket in {} (try: vswitch ctl --control {} stats)",
        cfg.ports,
        cfg.size,
        cfg.dir.display(),
        control.display()
    );
    let counters: Arc<Vec<Counters>> = Arc::new((0..cfg.ports).map(|_| Counters::default()).collect());
    let size = cfg.size;
    let gen_counters = counters.clone();
    let gen = std::thread::Builder::new()
        .name("demo-gen".into())
        .spawn(move || generate(fes, size, &gen_counters))
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut last = (Instant::now(), vec![(0u64, 0u64); cfg.ports], sw.stats().ok());
    while !STOP.load(Ordering::Relaxed) && (cfg.duration == 0 || start.elapsed().as_secs() < cfg.duration) {
        std::thread::sleep(Duration::from_secs(1));
        let now: Vec<(u64, u64)> = counters
            .iter()
            .map(|c| (c.sent.load(Ordering::Relaxed), c.received.load(Ordering::Relaxed)))
            .collect();
        let stats = sw.stats().ok();
        print_rates(last.0.elapsed().as_secs_f64(), &last.1, &now, last.2.as_ref(), stats.as_ref(), size);
        last = (Instant::now(), now, stats);
    }
    STOP.store(true, Ordering::Relaxed);
    let _ = gen.join();
    let total: u64 = counters.iter().map(|c| c.received.load(Ordering::Relaxed)).sum();
    drop(sw);
    let _ = std::fs::remove_dir_all(&cfg.dir);
    println!("demo: {total} frames delivered in {:.1} s", start.elapsed().as_secs_f64());
    Ok(total)
}

fn print_rates(
    dt: f64,
    prev: &[(u64, u64)],
    now: &[(u64, u64)],
    ps: Option<&Stats>,
    s: Option<&Stats>,
    size: usize,
) {
    let mut line = String::new();
    let mut total = 0u64;
    for (i, (p, n)) in prev.iter().zip(now).enumerate() {
        let rx = n.1 - p.1;
        total += rx;
        line.push_str(&format!(
            "p{i} tx {:.2} rx {:.2}  ",
            (n.0 - p.0) as f64 / dt / 1e6,
            rx as f64 / dt / 1e6
        ));
    }
    let mpps = total as f64 / dt / 1e6;
    let cost = match (ps, s) {
        (Some(a), Some(b)) => {
            let (pk, ti) = b.pmds.iter().zip(&a.pmds).fold((0u64, 0u64), |acc, (x, y)| {
                (acc.0 + x.packets - y.packets, acc.1 + x.busy_ticks - y.busy_ticks)
            });
            if pk > 0 {
                format!("{:.0} ticks/pkt", ti as f64 / pk as f64)
            } else {
                "-".into()
            }
        }
        _ => "-".into(),
    };
    println!("{line}| total {mpps:.2} Mpps {:.2} Gbit/s | switch {cost}", mpps * (size as f64) * 8.0 / 1e3);
}

/// One thread drives every frontend round-robin (as one DPDK lcore drives many ports).
fn generate(mut fes: Vec<Frontend>, size: usize, counters: &[Counters]) {
    let n = fes.len();
    let macs: Vec<[u8; 6]> =
        fes.iter().enumerate().map(|(i, f)| f.mac().unwrap_or([0x02, 0, 0, 0, 0, i as u8 + 1])).collect();
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let payload = size.saturating_sub(42);
    for i in 0..n {
        let mut buf = vec![0u8; size.max(64) + 64];
        let len = write_frame(&mut buf, macs[(i + 1) % n], macs[i], None, payload, 0);
        buf.truncate(len);
        frames.push(buf);
    }
    // One broadcast each so the switch learns where every MAC lives.
    for i in 0..n {
        let mut b = vec![0u8; 128];
        let len = write_frame(&mut b, [0xff; 6], macs[i], None, 18, 0);
        fes[i].send(0, &b[..len]);
    }
    let mut sent = vec![0u64; n];
    let mut recv = vec![0u64; n];
    let mut iter = 0u64;
    while !STOP.load(Ordering::Relaxed) {
        for i in 0..n {
            let mut k = 0;
            while k < 32 && fes[i].enqueue_tx(0, &frames[i]) {
                k += 1;
            }
            fes[i].flush_tx(0);
            sent[i] += k;
            let r = &mut recv[i];
            fes[i].poll_rx(0, |_| *r += 1);
        }
        iter += 1;
        if iter.is_multiple_of(64) {
            for i in 0..n {
                counters[i].sent.store(sent[i], Ordering::Relaxed);
                counters[i].received.store(recv[i], Ordering::Relaxed);
            }
        }
    }
    for i in 0..n {
        counters[i].sent.store(sent[i], Ordering::Relaxed);
        counters[i].received.store(recv[i], Ordering::Relaxed);
    }
}
