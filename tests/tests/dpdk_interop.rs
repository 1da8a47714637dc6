//! A real frontend: DPDK's virtio-user (testpmd, flowgen) with two ports connected to the
//! switch forwards traffic both ways.

use std::process::Command;
use std::time::Duration;

use e2e_tests::{testpmd, testpmd_rx_packets, wait_until, Proc, Scratch};
use vswitch::{PortConfig, Switch, SwitchConfig, UnsealedMemory};

fn testpmd_generator(dir: &Scratch, prefix: &str, args: &[String]) -> Proc {
    let mut cmd = Command::new(testpmd());
    cmd.args([
        "--lcores",
        "0@1,1@1",
        "--main-lcore",
        "0",
        "--no-pci",
        "--no-huge",
        "-m",
        "1024",
        "--single-file-segments",
    ])
    .arg(format!("--file-prefix={prefix}"))
    .args(args);
    Proc::spawn(cmd, &dir.path("testpmd.log")).cleanup_dir(format!("/var/run/dpdk/{prefix}").into())
}

fn vdevs(a: &std::path::Path, b: &std::path::Path, extra: &str) -> Vec<String> {
    vec![
        "--vdev".into(),
        format!("net_virtio_user0,path={},queues=1{extra}", a.display()),
        "--vdev".into(),
        format!("net_virtio_user1,path={},queues=1{extra}", b.display()),
    ]
}

/// A switch with ports `a` and `b` on sockets `a` and `b` (`opts` after each spec).
fn two_ports(a: &std::path::Path, b: &std::path::Path, opts: &str) -> Switch {
    let cfg = SwitchConfig {
        fdb_aging_secs: 300,
        ports: vec![
            PortConfig::parse(&format!("a={}{opts}", a.display())).unwrap(),
            PortConfig::parse(&format!("b={}{opts}", b.display())).unwrap(),
        ],
        // testpmd --no-huge hands over memfds it never seals.
        unsealed_memory: UnsealedMemory::Guard,
        ..Default::default()
    };
    Switch::start(cfg).unwrap()
}

fn flowgen(size: u32) -> Vec<String> {
    ["--", "--forward-mode=flowgen", "--nb-cores=1", "--auto-start", "--stats-period", "1", "--burst=32"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--txpkts={size}")])
        .collect()
}

fn check_both_ways(sw: &Switch, log: &str) {
    let rx = testpmd_rx_packets(log);
    assert_eq!(rx.len(), 2, "testpmd printed no final statistics:\n{log}");
    assert!(rx[0] > 10_000 && rx[1] > 10_000, "too little came back to virtio-user: {rx:?}\n{log}");
    let s = sw.stats().unwrap();
    for p in &s.ports {
        assert!(p.rx.packets > 10_000, "{}: received {} from its frontend", p.name, p.rx.packets);
        assert!(p.tx.packets > 10_000, "{}: delivered {} to its frontend", p.name, p.tx.packets);
        assert_eq!(p.tx.copies, p.tx.packets, "{}: one copy per delivered packet", p.name);
        assert_eq!(p.rx.drop_malformed + p.tx.drop_malformed, 0, "{}: malformed", p.name);
    }
}

/// testpmd busy-polls a CPU: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn test_testpmd_virtio_user_forwards_both_ways_through_the_switch() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("dpdk");
    let (a, b) = (dir.path("a.sock"), dir.path("b.sock"));
    let sw = two_ports(&a, &b, "");
    let mut args = vdevs(&a, &b, "");
    args.extend(flowgen(64));
    let mut gen = testpmd_generator(&dir, &format!("vsw-e2e-{}", std::process::id()), &args);
    let up = wait_until(Duration::from_secs(30), || {
        gen.log_text().matches("Rx-pps").count() >= 6 || !gen.running()
    });
    let ports = sw.ports().unwrap();
    let log = gen.stop(Duration::from_secs(5));
    assert!(up, "testpmd did not run for 3 s:\n{log}");
    check_both_ways(&sw, &log);
    for p in &ports {
        assert!(p.connected, "{p:?}");
        assert!(p.device.features.contains(&"VERSION_1".to_string()), "{p:?}");
        assert_eq!(p.device.running_queues, vec![0, 1], "{p:?}");
    }
    // The frontend went away: both ports are idle again, ready for the next one.
    assert!(wait_until(Duration::from_secs(5), || sw.ports().unwrap().iter().all(|p| !p.connected)));
}

#[test]
fn test_client_mode_ports_connect_to_virtio_user_servers() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("dpdk-client");
    let (a, b) = (dir.path("a.sock"), dir.path("b.sock"));
    // virtio-user listens (server=1); the switch connects and retries until it can.
    let mut args = vdevs(&a, &b, ",server=1");
    args.extend(flowgen(1518));
    let mut gen = testpmd_generator(&dir, &format!("vsw-e2e-c{}", std::process::id()), &args);
    // It listens on the second socket only once the first is connected.
    assert!(
        wait_until(Duration::from_secs(30), || a.exists()),
        "virtio-user did not listen:\n{}",
        gen.log_text()
    );
    let sw = two_ports(&a, &b, ",client");
    let flowing = wait_until(Duration::from_secs(30), || {
        sw.stats().map(|s| s.ports.iter().all(|p| p.tx.packets > 10_000)).unwrap_or(false) || !gen.running()
    });
    std::thread::sleep(Duration::from_secs(1));
    let log = gen.stop(Duration::from_secs(5));
    assert!(flowing, "no traffic through client-mode ports:\n{log}");
    check_both_ways(&sw, &log);
}

/// DPDK's virtio-user on packed rings (`packed_vq=1`, virtio 1.1) on ports that offer them
/// (`packed=on`): the switch serves them like split ones. Twice: DPDK's default in-order mergeable-buffer paths, then its general paths
/// (out of order allowed, one buffer per packet), each forwarding both ways with every frame
/// copied once and none malformed.
#[test]
fn test_testpmd_virtio_user_on_packed_rings_forwards_both_ways() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (k, extra) in [",packed_vq=1", ",packed_vq=1,in_order=0,mrg_rxbuf=0"].into_iter().enumerate() {
        let dir = Scratch::new(&format!("dpdk-packed{k}"));
        let (a, b) = (dir.path("a.sock"), dir.path("b.sock"));
        let sw = two_ports(&a, &b, ",packed=on");
        let mut args = vdevs(&a, &b, extra);
        args.extend(flowgen(if k == 0 { 64 } else { 1518 }));
        let mut gen = testpmd_generator(&dir, &format!("vsw-e2e-p{k}-{}", std::process::id()), &args);
        let up = wait_until(Duration::from_secs(30), || {
            gen.log_text().matches("Rx-pps").count() >= 6 || !gen.running()
        });
        let ports = sw.ports().unwrap();
        let log = gen.stop(Duration::from_secs(5));
        assert!(up, "testpmd ({extra}) did not run for 3 s:\n{log}");
        for p in &ports {
            assert!(p.device.features.contains(&"RING_PACKED".to_string()), "{extra}: {p:?}");
        }
        check_both_ways(&sw, &log);
    }
}
