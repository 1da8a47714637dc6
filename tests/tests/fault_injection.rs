//! Fault injection against a running `vswitch` process: frontends SIGKILLed mid-traffic by
//! the hundred, a port connecting and disconnecting a thousand times, a mixed-traffic soak.
//! The ports that keep working lose nothing, and the switch's file descriptors, threads and
//! guest-memory mappings come back to where they started (read from `/proc/<pid>`).
//!
//! `SOAK_SECS` sets the soak's length (default 120 s in CI; the issue note reports 1800).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e_tests::{connect, connect_default, exchange, mac, sock, wait_until, Proc, Scratch};
use vswitch::control::{request, PortInfo, Request, Stats};
use vswitch_bench::frontend::{Frontend, FrontendConfig};
use vswitch_bench::harness::peer::vswitch_binary;

/// One test at a time: each loads both CPUs, and each measures the switch's usage.
static SERIAL: Mutex<()> = Mutex::new(());

/// A switch in its own process, with its control socket.
struct Sw {
    p: Proc,
    control: PathBuf,
}

impl Sw {
    fn start(dir: &Scratch, specs: &[&str], extra: &[&str]) -> Sw {
        let bin = vswitch_binary(None).expect("vswitch is built (scripts/test.sh builds it first)");
        let control = dir.path("ctl.sock");
        let mut cmd = Command::new(bin);
        cmd.arg("run").arg("--control").arg(&control).args(extra);
        for s in specs {
            let (name, opts) = s.split_once(',').map_or((*s, None), |(n, o)| (n, Some(o)));
            let mut spec = format!("{name}={}", sock(dir, name).display());
            if let Some(o) = opts {
                spec = format!("{spec},{o}");
            }
            cmd.arg("--port").arg(spec);
        }
        let mut p = Proc::spawn(cmd, &dir.path("vswitch.log"));
        assert!(wait_until(Duration::from_secs(10), || control.exists()), "switch up: {}", p.log_text());
        assert!(p.running());
        Sw { p, control }
    }

    fn ports(&self) -> Vec<PortInfo> {
        let v = request(&self.control, &Request::Ports).expect("ports");
        serde_json::from_value(v).expect("port list")
    }

    fn port(&self, name: &str) -> PortInfo {
        self.ports().into_iter().find(|p| p.name == name).expect("port exists")
    }

    fn stats(&self) -> Stats {
        serde_json::from_value(request(&self.control, &Request::Stats).expect("stats")).expect("stats")
    }

    fn usage(&self) -> Usage {
        Usage::of(self.p.pid())
    }
}

/// What a process holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Usage {
    fds: usize,
    threads: usize,
    /// Mappings of memory files (guests' memory).
    guest_maps: usize,
    vm_kib: u64,
}

impl Usage {
    fn of(pid: u32) -> Usage {
        let proc_ = Path::new("/proc").join(pid.to_string());
        let fds = std::fs::read_dir(proc_.join("fd")).map(|d| d.count()).unwrap_or(0);
        let status = std::fs::read_to_string(proc_.join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
                .unwrap_or(0)
        };
        let maps = std::fs::read_to_string(proc_.join("maps")).unwrap_or_default();
        Usage {
            fds,
            threads: field("Threads:") as usize,
            guest_maps: maps.lines().filter(|l| l.contains("/memfd:") || l.contains("hugepages")).count(),
            vm_kib: field("VmSize:"),
        }
    }
}

/// Waits until the switch's usage is back to `base` (fds, threads, guest mappings).
fn back_to(sw: &Sw, base: Usage) -> Usage {
    let mut now = sw.usage();
    let same = |u: &Usage| (u.fds, u.threads, u.guest_maps) == (base.fds, base.threads, base.guest_maps);
    wait_until(Duration::from_secs(5), || {
        now = sw.usage();
        same(&now)
    });
    assert!(same(&now), "switch holds more than it started with: {now:?}, started {base:?}");
    now
}

/// A guest process (`src/bin/guest.rs`) sending `rate` frames per ms from MAC byte `src` to `dst`.
fn guest(dir: &Scratch, port: &str, src: u8, dst: u8, rate: u64) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_guest"));
    cmd.arg("send")
        .arg(sock(dir, port))
        .arg(format!("{src:x}"))
        .arg(format!("{dst:x}"))
        .arg(rate.to_string());
    Proc::spawn(cmd, &dir.path(&format!("guest-{port}.log")))
}

/// Sets its flag when dropped: a panicking test body stops the threads it scoped (which the
/// scope would otherwise wait for, for ever).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// b and c (VLAN 10) exchange frames both ways in a loop until `stop`; every exchange must
/// arrive whole and in order. Returns exchanges done.
fn keep_exchanging(b: &mut Frontend, c: &mut Frontend, stop: &AtomicBool) -> u64 {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        exchange(b, c, mac(0xb), mac(0xc), 50, n * 100);
        exchange(c, b, mac(0xc), mac(0xb), 50, n * 100 + 50);
        n += 1;
    }
    n
}

#[test]
fn a_hundred_frontends_killed_mid_traffic_cost_the_others_nothing_and_leak_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const WAVE: usize = 10;
    let dir = Scratch::new("fault-kill100");
    let mut specs = vec!["b,vlan=10".to_string(), "c,vlan=10".to_string()];
    specs.extend((0..WAVE).map(|i| format!("k{i},vlan=20")));
    let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let sw = Sw::start(&dir, &specs, &[]);
    let mut b = connect_default(&dir, "b");
    let mut c = connect_default(&dir, "c");
    exchange(&mut b, &mut c, mac(0xb), mac(0xc), 10, 0);
    let base = sw.usage();
    let stop = AtomicBool::new(false);
    let mut killed = 0;
    let exchanges = std::thread::scope(|s| {
        let t = s.spawn(|| keep_exchanging(&mut b, &mut c, &stop));
        let _stop = StopOnDrop(&stop);
        for _wave in 0..100 / WAVE {
            // Pairs of guests send to each other (VLAN 20: nothing reaches b and c).
            let mut gs: Vec<Proc> = (0..WAVE)
                .map(|i| guest(&dir, &format!("k{i}"), 0x40 + i as u8, 0x40 + (i ^ 1) as u8, 4))
                .collect();
            let all_up = wait_until(Duration::from_secs(20), || {
                sw.ports()
                    .iter()
                    .filter(|p| p.name.starts_with('k') && p.device.running_queues == [0, 1])
                    .count()
                    == WAVE
            });
            assert!(
                all_up,
                "guests up: {:?}",
                sw.ports().iter().map(|p| (&p.name, p.connected)).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100)); // mid-traffic
            for g in &mut gs {
                g.kill();
                killed += 1;
            }
            let all_down = wait_until(Duration::from_secs(10), || {
                sw.ports().iter().all(|p| !p.name.starts_with('k') || !p.connected)
            });
            assert!(all_down, "the switch noticed every killed guest");
        }
        stop.store(true, Ordering::Relaxed);
        t.join().expect("b and c lost nothing while guests died")
    });
    assert_eq!(killed, 100);
    assert!(exchanges > 0);
    let now = back_to(&sw, base);
    let st = sw.stats();
    let k_rx: u64 = st.ports.iter().filter(|p| p.name.starts_with('k')).map(|p| p.rx.packets).sum();
    assert!(k_rx > 0, "the killed guests were sending");
    println!("killed 100 guests; b<->c exchanges {exchanges}; switch usage {now:?} (started {base:?})");
}

#[test]
fn a_thousand_connects_and_disconnects_on_one_port_under_traffic_on_another() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cycles: usize = std::env::var("CHURN_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let dir = Scratch::new("fault-churn");
    let sw = Sw::start(&dir, &["a", "b,vlan=10", "c,vlan=10"], &[]);
    let mut b = connect_default(&dir, "b");
    let mut c = connect_default(&dir, "c");
    exchange(&mut b, &mut c, mac(0xb), mac(0xc), 10, 0);
    let base = sw.usage();
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let exchanges = std::thread::scope(|s| {
        let t = s.spawn(|| keep_exchanging(&mut b, &mut c, &stop));
        let _stop = StopOnDrop(&stop);
        let cfg = FrontendConfig { mem_size: 2 << 20, ring_size: 64, ..Default::default() };
        for i in 0..cycles {
            let mut a = Frontend::connect(&sock(&dir, "a"), cfg.clone(), Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("cycle {i}: {e}; switch log:\n{}", sw.p.log_text()));
            if i % 100 == 0 {
                // Now and then a frame, so the connection carries traffic too.
                e2e_tests::send(
                    &mut a,
                    0,
                    &e2e_tests::frame_of_size([0xff; 6], mac(0xa), None, 60, i as u64),
                );
            }
            drop(a);
        }
        stop.store(true, Ordering::Relaxed);
        t.join().expect("b and c lost nothing during the churn")
    });
    assert!(wait_until(Duration::from_secs(5), || !sw.port("a").connected));
    let now = back_to(&sw, base);
    assert!(sw.port("a").connects >= cycles as u64);
    println!(
        "{cycles} connect/negotiate/disconnect cycles in {:?}; b<->c exchanges {exchanges}; usage {now:?} (started {base:?})",
        t0.elapsed()
    );
}

/// Median of `v` (µs).
fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

#[test]
fn soak_with_mixed_traffic_loses_nothing_leaks_nothing_and_reports_latency_drift() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let secs: u64 = std::env::var("SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(120);
    let dir = Scratch::new("fault-soak");
    // VLAN 10: a (policed and anti-spoofed) and b; c a trunk of 10 and 20; VLAN 20: d behind a
    // vIOMMU, and e.
    let sw = Sw::start(
        &dir,
        &[
            "a,vlan=10,mac=02:00:00:00:00:0a,police=1G,anti-spoof",
            "b,vlan=10",
            "c,trunk=10:20",
            "d,vlan=20",
            "e,vlan=20",
        ],
        &[],
    );
    let mut a = connect_default(&dir, "a");
    let mut b = connect_default(&dir, "b");
    let mut c = connect_default(&dir, "c");
    let viommu = vswitch_bench::frontend::IommuConfig::default();
    let mut d = connect(&dir, "d", FrontendConfig { iommu: Some(viommu), ..Default::default() });
    let mut e = connect_default(&dir, "e");
    exchange(&mut a, &mut b, mac(0xa), mac(0xb), 10, 0);
    exchange(&mut b, &mut a, mac(0xb), mac(0xa), 10, 0);
    exchange(&mut d, &mut e, mac(0xd), mac(0xe), 10, 0);
    exchange(&mut e, &mut d, mac(0xe), mac(0xd), 10, 0);
    // The trunk saw the first (flooded) frames of both VLANs; from now on only broadcasts.
    e2e_tests::drain(&mut c, Duration::from_millis(50));
    let base = sw.usage();
    let t0 = Instant::now();
    let (mut rounds, mut bcasts) = (0u64, 0u64);
    let mut rtts: Vec<(f64, u64)> = Vec::new();
    while t0.elapsed() < Duration::from_secs(secs) {
        let seq = rounds * 1000;
        exchange(&mut a, &mut b, mac(0xa), mac(0xb), 64, seq);
        exchange(&mut d, &mut e, mac(0xd), mac(0xe), 64, seq);
        exchange(&mut e, &mut d, mac(0xe), mac(0xd), 64, seq + 100);
        // A broadcast on VLAN 10 reaches b, and c tagged, never VLAN 20.
        let f = e2e_tests::frame_of_size(e2e_tests::BCAST, mac(0xa), None, 100, seq + 200);
        e2e_tests::send(&mut a, 0, &f);
        assert_eq!(e2e_tests::recv_n(&mut b, 1, Duration::from_secs(2)), vec![f.clone()]);
        let tagged = e2e_tests::recv_n(&mut c, 1, Duration::from_secs(2));
        assert_eq!(tagged.len(), 1, "the trunk gets the broadcast");
        assert_eq!(&tagged[0][12..16], &[0x81, 0x00, 0x00, 10], "tagged with VLAN 10");
        bcasts += 1;
        // Round-trip of one frame b -> a -> b.
        let ping = e2e_tests::frame_of_size(mac(0xa), mac(0xb), None, 60, seq + 300);
        let pong = e2e_tests::frame_of_size(mac(0xb), mac(0xa), None, 60, seq + 301);
        let t = Instant::now();
        e2e_tests::send(&mut b, 0, &ping);
        assert_eq!(e2e_tests::recv_n(&mut a, 1, Duration::from_secs(2)), vec![ping]);
        e2e_tests::send(&mut a, 0, &pong);
        assert_eq!(e2e_tests::recv_n(&mut b, 1, Duration::from_secs(2)), vec![pong]);
        rtts.push((t0.elapsed().as_secs_f64(), t.elapsed().as_micros() as u64));
        for fe in [&mut d, &mut e] {
            assert!(e2e_tests::drain(fe, Duration::from_millis(1)).is_empty(), "VLAN 20 saw VLAN 10 traffic");
        }
        rounds += 1;
    }
    let now = back_to(&sw, base);
    let st = sw.stats();
    let drops: u64 = st
        .ports
        .iter()
        .map(|p| p.rx.drop_malformed + p.rx.drop_no_buffer + p.tx.drop_no_buffer + p.rx.drop_policy)
        .sum();
    assert_eq!(drops, 0, "no drop in a soak the guests keep up with: {:?}", st.ports);
    let third = secs as f64 / 3.0;
    let mut first: Vec<u64> = rtts.iter().filter(|(t, _)| *t < third).map(|r| r.1).collect();
    let mut last: Vec<u64> = rtts.iter().filter(|(t, _)| *t >= 2.0 * third).map(|r| r.1).collect();
    let d_info = sw.port("d").device;
    println!(
        "soak {secs} s: {rounds} rounds, {bcasts} broadcasts; round-trip median first third {} us, last third {} us; \
         d's IOTLB misses sent {}; usage {now:?} (started {base:?})",
        median(&mut first),
        median(&mut last),
        d_info.iotlb.map_or(0, |i| i.misses_sent)
    );
}
