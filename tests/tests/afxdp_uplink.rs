//! AF_XDP uplinks: the switch on existing network devices (veth pairs here, the far end of each
//! in a network namespace of its own) through XDP sockets and its own XDP program. The
//! namespaces talk through the switch: ping, iperf3 TCP (GSO off at the far ends: AF_XDP carries
//! no offload metadata), 64-byte UDP bursts counted end to end, jumbo frames (multi-buffer), a
//! VLAN-tagged stream, two queues; and the program's life: attached while the port lives, gone
//! after `port-del`, exit and SIGKILL, another holder refused by name.
//!
//! Needs root (CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF) and `ip`, `ping`, `iperf3`, `ethtool`
//! (scripts/install-test-deps.sh).

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use e2e_tests::netns::{ip, Netns};
use e2e_tests::{connect_default, find, init_log, port_info, port_stats, wait_until, Proc, Scratch};
use vswitch::config::SwitchConfig;
use vswitch::switch::Switch;
use vswitch_bench::frame::{build_frame, frame_seq};
use vswitch_bench::harness::peer::vswitch_binary;

/// One test at a time: iperf3 fills both CPUs, and the program tests count attachments.
static SERIAL: Mutex<()> = Mutex::new(());

/// A veth pair named after this process and `tag`: (the switch's end, the namespace's end),
/// deleted with the namespace (or by name on drop).
struct Veth(String, String);

impl Veth {
    /// With one queue: a frame the far end sends on its transmit queue K arrives on receive
    /// queue K here, and a port binds queues 0..queues= only.
    fn new(tag: &str) -> Veth {
        Veth::with_queues(tag, 1)
    }

    fn with_queues(tag: &str, queues: u16) -> Veth {
        let base = format!("vx{}{tag}", std::process::id() % 100_000);
        let (a, b) = (format!("{base}s"), format!("{base}n"));
        let _ = Command::new("ip").args(["link", "del", &a]).output();
        let q = queues.to_string();
        let qs = ["numtxqueues", &q, "numrxqueues", &q];
        // Both ends: native XDP on a veth wants as many receive queues as its peer sends on.
        ip(&[&["link", "add", &a][..], &qs, &["type", "veth", "peer", "name", &b], &qs].concat());
        Veth(a, b)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

/// The XDP program on `dev` as `ip link` shows it ("prog/xdp id N" and its name), if any.
fn xdp_on(dev: &str) -> Option<String> {
    let out = Command::new("ip").args(["-d", "link", "show", "dev", dev]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines().find(|l| l.contains("prog/xdp")).map(|l| l.trim().to_string())
}

fn start_on(dir: &Scratch, specs: &[String], pmd_cores: Vec<usize>) -> Switch {
    init_log();
    let ports = e2e_tests::parse_ports(dir, specs);
    Switch::start(SwitchConfig { fdb_aging_secs: 300, ports, pmd_cores, ..Default::default() })
        .expect("switch starts")
}

/// Two veths, the switch on one end of each (`a`, `b` with `opts`), the other ends in two
/// namespaces as 10.88.0.1 and .2, with checksum offload, GSO and TSO off at their far ends: AF_XDP
/// has no offload metadata, and a veth hands XDP its peer's frames with the checksum not yet
/// filled in (a real NIC's far end is another machine, whose frames arrive complete).
fn two_hosts(dir: &Scratch, queues: u16, opts: &str, pmds: Vec<usize>) -> (Switch, Netns, Netns, Veth, Veth) {
    let (va, vb) = (Veth::with_queues("a", queues), Veth::with_queues("b", queues));
    let specs = [format!("a=afxdp:{}{opts}", va.0), format!("b=afxdp:{}{opts}", vb.0)];
    let sw = start_on(dir, &specs, pmds);
    let (na, nb) = (Netns::new("xa"), Netns::new("xb"));
    na.adopt(&va.1, "10.88.0.1/24");
    nb.adopt(&vb.1, "10.88.0.2/24");
    for (ns, v) in [(&na, &va), (&nb, &vb)] {
        let out = ns.run(&["ethtool", "-K", &v.1, "tx", "off", "tso", "off", "gso", "off"]);
        assert!(out.status.success(), "ethtool: {}", String::from_utf8_lossy(&out.stderr));
    }
    (sw, na, nb, va, vb)
}

#[test]
fn test_two_namespaces_ping_and_stream_tcp_through_afxdp_ports_with_the_program_attached_while_they_live() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("afx-tcp");
    let (sw, na, nb, va, vb) = two_hosts(&dir, 1, "", Vec::new());
    na.ping("10.88.0.2", 3, &[]).unwrap_or_else(|e| panic!("ping a -> b: {e} {:?}", sw.stats()));
    let mut server = nb.spawn(&["iperf3", "-s", "-B", "10.88.0.2"], &dir.path("iperf3.log"));
    std::thread::sleep(Duration::from_millis(300));
    let up = na.iperf3("10.88.0.2", 2, false);
    let down = na.iperf3("10.88.0.2", 2, true);
    server.kill();
    println!("iperf3 TCP through two AF_XDP ports: a->b {up:.2} Gbit/s, b->a {down:.2} Gbit/s");
    assert!(up > 0.0 && down > 0.0);
    let s = sw.stats().expect("stats");
    let (pa, pb) = (find(&s, "a"), find(&s, "b"));
    assert_eq!(pa.tx.copies + pb.tx.copies, 0, "no switch CPU copy counted between two uplinks: {pa:?}");
    let info = port_info(&sw, "a");
    // A veth takes native XDP, not zero copy: `auto` settles on `copy`.
    assert!(info.connected && info.socket == format!("afxdp:{} (copy)", va.0), "{info:?}");
    let prog = xdp_on(&va.0).expect("an XDP program on the device while the port lives");
    assert!(prog.contains("vswitch_xsk") || prog.contains("prog/xdp id"), "{prog}");
    sw.del_port("a").expect("port-del");
    assert!(
        wait_until(Duration::from_secs(5), || xdp_on(&va.0).is_none()),
        "the program is gone after port-del: {:?}",
        xdp_on(&va.0)
    );
    na.ping("10.88.0.2", 1, &["-W", "1"]).expect_err("no path without the port");
    assert!(xdp_on(&vb.0).is_some(), "the other port's program stays");
    drop(sw);
    assert!(wait_until(Duration::from_secs(5), || xdp_on(&vb.0).is_none()), "gone when the switch stops");
}

#[test]
fn test_64_byte_udp_bursts_from_a_namespace_reach_a_guest_counted_end_to_end_over_afxdp() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("afx-burst");
    let v = Veth::new("g");
    let sw = start_on(&dir, &[format!("up=afxdp:{}", v.0), "g=SOCK:g.sock".into()], Vec::new());
    let ns = Netns::new("xg");
    ns.adopt(&v.1, "10.88.1.1/24");
    let mut g = connect_default(&dir, "g");
    let guest = [0x52, 0x54, 0, 0x5d, 0, 1];
    e2e_tests::send(&mut g, 0, &build_frame([0xff; 6], guest, None, 18, 0));
    let far = [0x02, 0, 0, 0x5d, 0, 2];
    let n = 2000u64;
    let frames: Vec<Vec<u8>> = (1..=n).map(|i| build_frame(guest, far, None, 18, i)).collect();
    assert_eq!(frames[0].len(), 60, "64 bytes on the wire with the FCS");
    for chunk in frames.chunks(200) {
        ns.inject(&v.1, chunk);
        let want = chunk.last().map(|f| frame_seq(f).unwrap()).unwrap();
        let mut got = Vec::new();
        assert!(
            wait_until(Duration::from_secs(5), || {
                g.poll_rx(0, |f| got.extend(frame_seq(f)));
                got.last() == Some(&want)
            }),
            "the guest got {} of {} frames up to {want}: {:?}",
            got.len(),
            chunk.len(),
            port_stats(&sw, "up")
        );
        let first = frame_seq(&chunk[0]).unwrap();
        assert_eq!(got, (first..=want).collect::<Vec<_>>(), "every frame once and in order");
    }
    let s = port_stats(&sw, "up");
    assert!(s.rx.packets >= n, "{s:?}");
    // And back: the guest's frames leave by the device, every one (counted by the far end).
    let before = rx_packets(&ns, &v.1);
    for i in 0..500 {
        e2e_tests::send(&mut g, 0, &build_frame(far, guest, None, 18, 10_000 + i));
    }
    assert!(
        wait_until(Duration::from_secs(5), || rx_packets(&ns, &v.1) >= before + 500),
        "the far end counted {} of 500: {:?}",
        rx_packets(&ns, &v.1) - before,
        port_stats(&sw, "up")
    );
}

/// Packets the device `dev` in `ns` received (its sysfs counter).
fn rx_packets(ns: &Netns, dev: &str) -> u64 {
    let out = ns.run(&["cat", &format!("/sys/class/net/{dev}/statistics/rx_packets")]);
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

#[test]
fn test_jumbo_frames_cross_afxdp_ports_in_several_chunks() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("afx-jumbo");
    let (sw, na, nb, va, vb) = two_hosts(&dir, 1, ",mtu=9000", Vec::new());
    na.ip(&["link", "set", &va.1, "mtu", "9000"]);
    nb.ip(&["link", "set", &vb.1, "mtu", "9000"]);
    // 8972 bytes of ICMP payload = a 9000-byte IP packet, not to be fragmented.
    na.ping("10.88.0.2", 3, &["-s", "8972", "-M", "do"])
        .unwrap_or_else(|e| panic!("jumbo ping: {e} {:?}", sw.stats()));
    let s = port_stats(&sw, "a");
    assert!(s.rx.packets >= 3, "{s:?}");
}

#[test]
fn test_a_vlan_tagged_stream_from_the_device_reaches_an_access_guest_untagged_over_afxdp() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("afx-vlan");
    let v = Veth::new("v");
    let specs = [format!("up=afxdp:{},trunk=10:11", v.0), "g=SOCK:g.sock,vlan=10".into()];
    let sw = start_on(&dir, &specs, Vec::new());
    let ns = Netns::new("xv");
    ns.adopt(&v.1, "10.88.2.1/24");
    let mut g = connect_default(&dir, "g");
    let guest = [0x52, 0x54, 0, 0x5d, 0, 0x10];
    e2e_tests::send(&mut g, 0, &build_frame([0xff; 6], guest, None, 18, 0));
    let far = [0x02, 0, 0, 0x5d, 0, 0x11];
    // (This kernel has no 8021q: the namespace's tagged frames are raw ones.)
    let tagged: Vec<Vec<u8>> =
        (1..=100).map(|i| build_frame(guest, far, Some(if i % 10 == 0 { 11 } else { 10 }), 18, i)).collect();
    ns.inject(&v.1, &tagged);
    let mut got = Vec::new();
    wait_until(Duration::from_secs(5), || {
        for f in g.recv_frames(0, 128, Duration::from_millis(50)) {
            assert_eq!(f[12..14], [0x08, 0x00], "the access guest gets its frames untagged");
            got.extend(frame_seq(&f));
        }
        got.len() >= 90
    });
    let want: Vec<u64> = (1..=100).filter(|i| i % 10 != 0).collect();
    assert_eq!(got, want, "VLAN 10 only, every frame once and in order: {:?}", port_stats(&sw, "up"));
}

#[test]
fn test_two_queue_afxdp_ports_spread_flows_over_both_sockets() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("afx-mq");
    let (sw, na, nb, _va, _vb) = two_hosts(&dir, 2, ",queues=2", vec![0, 1]);
    na.ping("10.88.0.2", 2, &[]).unwrap_or_else(|e| panic!("ping: {e}"));
    let mut server = nb.spawn(&["iperf3", "-s", "-B", "10.88.0.2"], &dir.path("iperf3.log"));
    std::thread::sleep(Duration::from_millis(300));
    let out = na.run(&[
        "timeout",
        "60",
        "iperf3",
        "-c",
        "10.88.0.2",
        "-t",
        "2",
        "-P",
        "8",
        "--connect-timeout",
        "5000",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    server.kill();
    let s = sw.stats().expect("stats");
    let from = |p: &str, k: usize| find(&s, p).queues[2 * k + 1].counters.packets;
    let (a0, a1) = (from("a", 0), from("a", 1));
    println!("frames read per queue of a: {a0}/{a1}");
    assert!(a0 > 0 && a1 > 0, "the device's two queues both fed their sockets");
}

#[test]
fn test_a_second_holder_is_refused_by_name_and_a_killed_switch_leaves_no_program() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("afx-life");
    let v = Veth::new("k");
    let sw = start_on(&dir, &[format!("up=afxdp:{}", v.0)], Vec::new());
    // Another switch (in this process) asks for the same device: refused, naming the holder.
    let other = Switch::start(SwitchConfig {
        fdb_aging_secs: 300,
        ports: e2e_tests::parse_ports(&dir, &[format!("up2=afxdp:{}", v.0)]),
        ..Default::default()
    });
    let err = other.err().expect("the device is held").to_string();
    assert!(err.contains("another XDP program is attached") && err.contains("vswitch_xsk"), "{err}");
    drop(sw);
    assert!(wait_until(Duration::from_secs(5), || xdp_on(&v.0).is_none()), "gone when the switch stops");
    // A switch process killed with SIGKILL: its program goes with it.
    let bin = vswitch_binary(None).expect("vswitch is built (scripts/test.sh builds it first)");
    let control = dir.path("ctl.sock");
    let run = |log: &str| {
        let mut cmd = Command::new(&bin);
        cmd.arg("run").arg("--port").arg(format!("up=afxdp:{}", v.0)).arg("--control").arg(&control);
        let _ = std::fs::remove_file(&control);
        let p = Proc::spawn(cmd, &dir.path(log));
        assert!(wait_until(Duration::from_secs(10), || control.exists()), "switch up: {}", p.log_text());
        p
    };
    let mut p = run("vswitch1.log");
    // (The control socket may come up before the ports do.)
    let attached = || wait_until(Duration::from_secs(10), || xdp_on(&v.0).is_some());
    assert!(attached(), "attached by the switch process: {}", p.log_text());
    // SAFETY: signalling a child we spawned.
    unsafe { libc::kill(p.pid() as i32, libc::SIGKILL) };
    let _ = p.wait_exit(Duration::from_secs(5));
    assert!(
        wait_until(Duration::from_secs(5), || xdp_on(&v.0).is_none()),
        "nothing left behind by a killed switch: {:?}",
        xdp_on(&v.0)
    );
    // And the next start takes the device as usual.
    let mut p = run("vswitch2.log");
    assert!(attached(), "attached again: {}", p.log_text());
    p.kill();
}

#[test]
fn test_generic_mode_carries_traffic_and_zero_copy_on_a_veth_is_refused_with_the_drivers_answer() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("afx-modes");
    let v = Veth::new("z");
    let zc = Switch::start(SwitchConfig {
        fdb_aging_secs: 300,
        ports: e2e_tests::parse_ports(&dir, &[format!("up=afxdp:{},mode=zerocopy", v.0)]),
        ..Default::default()
    });
    let err = zc.err().expect("a veth has no zero copy").to_string();
    assert!(
        err.contains("none of mode=zerocopy's ways")
            && err.contains("zerocopy: binding queue 0")
            && err.contains("try mode=skb"),
        "{err}"
    );
    assert!(xdp_on(&v.0).is_none(), "a refused port leaves no program behind");
    drop(v);
    let (sw, na, _nb, va, _vb) = two_hosts(&dir, 1, ",mode=skb", Vec::new());
    assert_eq!(port_info(&sw, "a").socket, format!("afxdp:{} (skb)", va.0));
    assert!(xdp_on(&va.0).is_some_and(|p| p.contains("xdpgeneric") || p.contains("prog/xdp")));
    na.ping("10.88.0.2", 3, &[]).unwrap_or_else(|e| panic!("ping over generic XDP: {e} {:?}", sw.stats()));
}

/// A switch process stopped (SIGSTOP) while more frames arrive than the socket holds (10000 for
/// AF_XDP's 4096 receive chunks, 40000 for a packet socket's buffer): the socket's kernel keeps what
/// its rings hold and drops the rest; once the switch runs again it reads what was kept and
/// counts what was dropped (`no_buffer` on the port's receive side), for AF_XDP
/// (`XDP_STATISTICS`) and AF_PACKET (`PACKET_STATISTICS`) alike. Nothing goes uncounted.
#[test]
fn test_frames_the_kernel_dropped_while_the_switch_was_stopped_are_counted_as_no_buffer() {
    use vswitch::control::{request, Request, Stats};
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bin = vswitch_binary(None).expect("vswitch is built (scripts/test.sh builds it first)");
    for kind in ["afxdp", "afpacket"] {
        let dir = Scratch::new(&format!("afx-drops-{kind}"));
        let v = Veth::new("d");
        let ns = Netns::new("xd");
        ns.adopt(&v.1, "10.88.3.1/24");
        let control = dir.path("ctl.sock");
        let mut cmd = Command::new(&bin);
        cmd.arg("run").arg("--port").arg(format!("up={kind}:{}", v.0)).arg("--control").arg(&control);
        let mut p = Proc::spawn(cmd, &dir.path("vswitch.log"));
        assert!(wait_until(Duration::from_secs(10), || control.exists()), "switch up: {}", p.log_text());
        let stats = || -> Stats {
            serde_json::from_value(request(&control, &Request::Stats).expect("stats")).unwrap()
        };
        let up = |s: &Stats| find(s, "up").rx;
        assert!(wait_until(Duration::from_secs(5), || kind != "afxdp" || xdp_on(&v.0).is_some()));
        let before = up(&stats());
        // SAFETY: signalling a child we spawned.
        unsafe { libc::kill(p.pid() as i32, libc::SIGSTOP) };
        let n = if kind == "afxdp" { 10_000u64 } else { 40_000 };
        let frames: Vec<Vec<u8>> = (1..=n)
            .map(|i| build_frame([0x02, 0, 0, 0x5d, 0, 9], [0x02, 0, 0, 0x5d, 0, 8], None, 18, i))
            .collect();
        for chunk in frames.chunks(100) {
            ns.inject(&v.1, chunk);
        }
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: as above.
        unsafe { libc::kill(p.pid() as i32, libc::SIGCONT) };
        let lost_on_veth = || {
            let out = ns.run(&["cat", &format!("/sys/class/net/{}/statistics/tx_dropped", v.1)]);
            String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().unwrap_or(0)
        };
        let mut last = before;
        let all = wait_until(Duration::from_secs(5), || {
            last = up(&stats());
            (last.packets - before.packets) + (last.drop_no_buffer - before.drop_no_buffer) + lost_on_veth()
                >= n
        });
        let (got, dropped) = (last.packets - before.packets, last.drop_no_buffer - before.drop_no_buffer);
        println!(
            "{kind}: {got} read, {dropped} counted dropped by the socket, {} by the veth",
            lost_on_veth()
        );
        assert!(all, "{kind}: every frame read or counted: {got} read, {dropped} dropped, of {n}");
        assert!(dropped > 0 && got > 0, "{kind}: the rings held some, the rest was dropped: {got}/{dropped}");
        p.kill();
    }
}
