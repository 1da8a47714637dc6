//! PVP benchmark (not a test; prints figures): harness → switch → hostvm payload (forward)
//! → switch → harness, beside the same harness run port to port (p2p) without the VM.
//!
//! `cargo test --release -p hostvm --test pvp -- --ignored --nocapture`
//! (`HOSTVM_PVP_SECS`, `HOSTVM_PVP_REPS` to change the window and repetitions.)
//!
//! On a 2-core host the PVP run has three busy pollers (switch PMD, guest vCPU, generator)
//! on two cores: each scheduling period moves about one ring's worth of frames through the
//! VM, so the figure measures the scheduler, not the datapath. Run it on 3+ cores.

use std::process::Command;
use std::time::Duration;

use e2e_tests::{connect_default, mac_str, sock, switch_config, wait_until, Proc, Scratch};
use vswitch::Switch;
use vswitch_bench::harness::clock::Clock;
use vswitch_bench::harness::gen::{self, GenConfig, Plan};
use vswitch_bench::harness::spec::{FrameSize, Topology};

fn env_or(k: &str, d: u64) -> u64 {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

/// One generator run over ports `h0` and `h1` of `sw`, as fast as it can: received Mpps and
/// frames lost.
fn measure(dir: &Scratch, size: u16, secs: u64, clock: &Clock) -> (f64, u64) {
    let mut ports = vec![connect_default(dir, "h0"), connect_default(dir, "h1")];
    let plan = Plan::new(Topology::P2p, 2, 1, FrameSize::Fixed(size)).expect("plan");
    let cfg = GenConfig {
        warmup: Duration::from_secs(1),
        duration: Duration::from_secs(secs),
        ..Default::default()
    };
    let r = gen::run(&mut ports, &plan, &cfg, clock, false, &mut |_| {}).expect("generator runs");
    (r.pps() / 1e6, r.lost)
}

#[test]
#[ignore = "benchmark: cargo test --release -p hostvm --test pvp -- --ignored --nocapture"]
fn pvp_versus_p2p() {
    let secs = env_or("HOSTVM_PVP_SECS", 5);
    let reps = env_or("HOSTVM_PVP_REPS", 2);
    let clock = Clock::calibrate(Duration::from_millis(200)).expect("clock");
    println!("size  topology  offered      Mpps (both directions)  lost");
    for size in [64u16, 1518] {
        let offered = "max";
        for _ in 0..reps {
            let dir = Scratch::new("pvp-p2p");
            let mut cfg = switch_config(&dir, &["h0", "h1"]);
            cfg.busy_poll = true;
            let sw = Switch::start(cfg).expect("switch");
            let (mpps, lost) = measure(&dir, size, secs, &clock);
            println!("{size:>4}  p2p       {offered:<12} {mpps:>8.3}                {lost}");
            drop(sw);

            let dir = Scratch::new("pvp-vm");
            let mut cfg = switch_config(&dir, &["h0,vlan=10", "vm0,vlan=10", "vm1,vlan=20", "h1,vlan=20"]);
            cfg.busy_poll = true;
            let sw = Switch::start(cfg).expect("switch");
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostvm"));
            cmd.args(["run", "--mem", "64M", "--serial", "null", "--stats-interval", "0"]);
            cmd.args(["--payload", "forward", "--busy-poll"]);
            for (i, port) in ["vm0", "vm1"].iter().enumerate() {
                let m = [0x52, 0x54, 0, 0, 0, 0x20 + i as u8];
                cmd.arg("--net").arg(format!("socket={},mac={}", sock(&dir, port).display(), mac_str(m)));
            }
            let mut vm = Proc::spawn(cmd, &dir.path("vm.log"));
            assert!(wait_until(Duration::from_secs(10), || vm.log_text().contains("payload NICs ready")));
            let (mpps, lost) = measure(&dir, size, secs, &clock);
            println!("{size:>4}  pvp       {offered:<12} {mpps:>8.3}                {lost}");
            let log = vm.stop(Duration::from_secs(5));
            for l in log.lines().filter(|l| l.contains("rx_frames=")) {
                println!("      {l}");
            }
            drop(sw);
        }
    }
}
