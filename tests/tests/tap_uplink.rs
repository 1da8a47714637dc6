//! TAP uplinks: the switch's ports to the host's network stack. Each TAP is moved into a
//! network namespace of its own (as containers do), with an address, and the namespaces talk
//! through the switch: ping, iperf3 TCP with TSO both ways, jumbo frames, VLAN tagging, and a
//! device deleted under the switch.
//!
//! Needs root (CAP_NET_ADMIN) and `ip`, `ping`, `iperf3` (scripts/install-test-deps.sh).

use std::sync::Mutex;
use std::time::Duration;

use e2e_tests::netns::Netns;
use e2e_tests::{connect_default, find, init_log, port_info, port_stats, wait_until, Scratch};
use vswitch::config::SwitchConfig;
use vswitch::switch::Switch;

/// One test at a time: iperf3 fills both CPUs.
static SERIAL: Mutex<()> = Mutex::new(());

/// A TAP name unique to this process and test (at most 15 bytes).
fn ifname(tag: &str) -> String {
    format!("vt{}{tag}", std::process::id() % 100_000)
}

fn start(dir: &Scratch, specs: &[String]) -> Switch {
    start_on(dir, specs, Vec::new())
}

/// [`start`] with one polling thread per listed CPU.
fn start_on(dir: &Scratch, specs: &[String], pmd_cores: Vec<usize>) -> Switch {
    init_log();
    let ports = e2e_tests::parse_ports(dir, specs);
    Switch::start(SwitchConfig { fdb_aging_secs: 300, ports, pmd_cores, ..Default::default() })
        .expect("switch starts")
}

/// Two namespaces, each holding one of the switch's TAP ports `a` and `b` with 10.88.0.1 and .2.
fn two_hosts(sw_specs: &[String], a: &str, b: &str) -> (Netns, Netns) {
    let (na, nb) = (Netns::new("a"), Netns::new("b"));
    na.adopt(a, "10.88.0.1/24");
    nb.adopt(b, "10.88.0.2/24");
    let _ = sw_specs;
    (na, nb)
}

#[test]
fn test_two_namespaces_ping_and_stream_tcp_both_ways_through_tap_ports() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("tap-tcp");
    let (a, b) = (ifname("a"), ifname("b"));
    let specs = [format!("a=tap:{a}"), format!("b=tap:{b}")];
    let sw = start(&dir, &specs);
    let (na, nb) = two_hosts(&specs, &a, &b);
    na.ping("10.88.0.2", 3, &[]).unwrap_or_else(|e| panic!("ping a -> b: {e} {:?}", sw.stats()));
    let mut server = nb.spawn(&["iperf3", "-s", "-B", "10.88.0.2"], &dir.path("iperf3.log"));
    std::thread::sleep(Duration::from_millis(300));
    let up = na.iperf3("10.88.0.2", 2, false);
    let down = na.iperf3("10.88.0.2", 2, true);
    server.kill();
    println!("iperf3 TCP through two TAP ports: a->b {up:.2} Gbit/s, b->a {down:.2} Gbit/s");
    assert!(up > 0.0 && down > 0.0);
    let s = sw.stats().expect("stats");
    let (pa, pb) = (find(&s, "a"), find(&s, "b"));
    // The kernels handed the switch TCP frames of up to 64 KiB and got them back whole.
    assert!(pb.queues[0].counters.gso_whole > 0, "TSO frames crossed whole to b: {pb:?}");
    assert!(pa.queues[0].counters.gso_whole > 0, "TSO frames crossed whole to a: {pa:?}");
    // No CPU copy by the switch between two uplinks: the kernels' copies only.
    assert_eq!(pa.tx.copies + pb.tx.copies, 0, "{pa:?} {pb:?}");
    assert!(pa.rx.kernel_copies > 0 && pb.tx.kernel_copies > 0);
    assert!(port_info(&sw, "a").connected && port_info(&sw, "a").socket == format!("tap:{a}"));
}

#[test]
fn test_multiqueue_tap_ports_spread_flows_over_queues_and_polling_threads() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("tap-mq");
    let (a, b) = (ifname("m"), ifname("n"));
    let specs = [format!("a=tap:{a},queues=2"), format!("b=tap:{b},queues=2")];
    // Two polling threads: queue k of port p is polled by thread (p + k) % 2.
    let sw = start_on(&dir, &specs, vec![0, 1]);
    let (na, nb) = two_hosts(&specs, &a, &b);
    na.ping("10.88.0.2", 2, &[]).unwrap_or_else(|e| panic!("ping: {e}"));
    let mut server = nb.spawn(&["iperf3", "-s", "-B", "10.88.0.2"], &dir.path("iperf3.log"));
    std::thread::sleep(Duration::from_millis(300));
    // Eight flows each way: the kernel hashes each to one queue of the device.
    for reverse in [false, true] {
        let mut cmd = vec!["timeout", "60", "iperf3", "-c", "10.88.0.2", "-t", "2", "-P", "8"];
        cmd.extend(["--connect-timeout", "5000"]);
        if reverse {
            cmd.push("-R");
        }
        let out = na.run(&cmd);
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    server.kill();
    let s = sw.stats().expect("stats");
    // Queue reports: 2k = the device's receive side (the switch delivers), 2k+1 = its transmit
    // side (the switch reads).
    let from = |p: &str, k: usize| find(&s, p).queues[2 * k + 1].counters.packets;
    let (a0, a1, b0, b1) = (from("a", 0), from("a", 1), from("b", 0), from("b", 1));
    println!("frames read per queue: a {a0}/{a1}, b {b0}/{b1}");
    assert!((a0 > 0 && a1 > 0) || (b0 > 0 && b1 > 0), "flows spread over both queues of a device");
    let busy = s.pmds.iter().filter(|p| p.packets > 0).count();
    assert_eq!(busy, 2, "both polling threads moved packets: {:?}", s.pmds);
}

#[test]
fn test_jumbo_frames_cross_tap_ports_with_mtu_9000() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("tap-jumbo");
    let (a, b) = (ifname("c"), ifname("d"));
    let specs = [format!("a=tap:{a},mtu=9000,offloads=off"), format!("b=tap:{b},mtu=9000,offloads=off")];
    let _sw = start(&dir, &specs);
    let (na, _nb) = two_hosts(&specs, &a, &b);
    // 8972 bytes of ICMP payload = a 9000-byte IP packet, not to be fragmented.
    na.ping("10.88.0.2", 3, &["-s", "8972", "-M", "do"]).unwrap_or_else(|e| panic!("jumbo ping: {e}"));
}

#[test]
fn test_a_frame_longer_than_the_switch_takes_is_dropped_and_counted_not_read_past() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("tap-long");
    let (a, b) = (ifname("l"), ifname("k"));
    // Without offloads the switch reads frames of up to 9220 bytes; the administrator of the
    // namespace raises the device's MTU far past that.
    let specs = [format!("a=tap:{a},offloads=off"), format!("b=tap:{b},offloads=off")];
    let sw = start(&dir, &specs);
    let (na, _nb) = two_hosts(&specs, &a, &b);
    na.ip(&["link", "set", &a, "mtu", "16000"]);
    let _ = na.ping("10.88.0.2", 2, &["-s", "12000", "-M", "do"]);
    let s = port_stats(&sw, "a");
    assert!(s.rx.drop_malformed >= 1, "the long frames were dropped as malformed: {s:?}");
    // Frames that fit still cross.
    na.ping("10.88.0.2", 2, &[]).unwrap_or_else(|e| panic!("ping after: {e}"));
}

/// An ARP frame: request (`op` 1) or reply (2), optionally tagged.
fn arp(
    dst: [u8; 6],
    src: [u8; 6],
    vlan: Option<u16>,
    op: u16,
    sip: [u8; 4],
    tmac: [u8; 6],
    tip: [u8; 4],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(dst);
    f.extend(src);
    if let Some(v) = vlan {
        f.extend([0x81, 0x00]);
        f.extend(v.to_be_bytes());
    }
    f.extend([0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4]);
    f.extend(op.to_be_bytes());
    f.extend(src);
    f.extend(sip);
    f.extend(tmac);
    f.extend(tip);
    f.resize(f.len().max(60), 0);
    f
}

#[test]
fn test_tap_on_an_access_vlan_reaches_a_trunk_port_tagged_and_back_untagged() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("tap-vlan");
    let a = ifname("v");
    let specs = [format!("a=tap:{a},vlan=10"), "g=SOCK:g.sock,trunk=10".to_string()];
    let sw = start(&dir, &specs);
    let mut fe = connect_default(&dir, "g");
    let na = Netns::new("v");
    na.adopt(&a, "10.88.0.1/24");
    // The namespace asks who has 10.88.0.2: the guest on the trunk sees it tagged with VLAN 10.
    let pinger = std::thread::spawn({
        let name = na.name.clone();
        move || {
            std::process::Command::new("ip")
                .args(["netns", "exec", &name, "ping", "-c", "4", "-i", "0.3", "-W", "1", "10.88.0.2"])
                .output()
        }
    });
    let mut req = None;
    assert!(wait_until(Duration::from_secs(5), || {
        for f in fe.recv_frames(0, 8, Duration::from_millis(100)) {
            if f.len() >= 42 && f[12..14] == [0x81, 0x00] && f[16..18] == [0x08, 0x06] {
                req = Some(f);
            }
        }
        req.is_some()
    }));
    let req = req.expect("ARP request");
    assert_eq!(u16::from_be_bytes([req[14], req[15]]) & 0xfff, 10, "tagged with the access VLAN");
    let ns_mac: [u8; 6] = req[6..12].try_into().expect("6 bytes");
    // The guest answers tagged; the namespace gets it untagged and learns the guest's MAC.
    let gmac = [0x52, 0x54, 0x00, 0x77, 0x00, 0x02];
    let reply = arp(ns_mac, gmac, Some(10), 2, [10, 88, 0, 2], ns_mac, [10, 88, 0, 1]);
    e2e_tests::send(&mut fe, 0, &reply);
    let _ = pinger.join();
    let out = na.run(&["ip", "neigh", "show", "10.88.0.2"]);
    let neigh = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(neigh.contains("52:54:00:77:00:02"), "the namespace learned the guest's MAC: {neigh}");
    let s = port_stats(&sw, "g");
    assert!(s.rx.packets >= 1, "{s:?}");
}

#[test]
fn test_an_access_tap_reaches_a_trunk_tap_tagged() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("tap-trunk");
    let (a, b) = (ifname("t"), ifname("u"));
    let specs = [format!("a=tap:{a},vlan=10"), format!("b=tap:{b},trunk=10")];
    let _sw = start(&dir, &specs);
    let (na, nb) = two_hosts(&specs, &a, &b);
    // This kernel has no 8021q module, so namespace b cannot answer on VLAN 10; it can show
    // what arrives: a's ARP requests, tagged 10 on the trunk.
    let cap = dir.path("tcpdump.txt");
    let log = dir.path("tcpdump.log");
    let cap_s = cap.to_string_lossy().to_string();
    let mut dump = nb.spawn(&["sh", "-c", &format!("exec tcpdump -l -e -n -c 2 -i {b} arp > {cap_s}")], &log);
    std::thread::sleep(Duration::from_millis(800));
    let _ = na.ping("10.88.0.2", 3, &[]);
    let _ = dump.wait_exit(Duration::from_secs(5));
    dump.kill();
    let seen = std::fs::read_to_string(&cap).unwrap_or_default();
    assert!(seen.contains("vlan 10"), "the trunk saw a's frames tagged with VLAN 10: {seen:?}");
    assert!(seen.contains("Request who-has 10.88.0.2"), "{seen:?}");
}

#[test]
fn test_a_deleted_tap_takes_only_its_port_down() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("tap-gone");
    let (a, b) = (ifname("x"), ifname("y"));
    let specs = [format!("a=tap:{a}"), format!("b=tap:{b}"), "g=SOCK:g.sock".to_string()];
    let sw = start(&dir, &specs);
    let (na, nb) = two_hosts(&specs, &a, &b);
    na.ping("10.88.0.2", 2, &[]).unwrap_or_else(|e| panic!("ping before: {e}"));
    nb.ip(&["link", "del", &b]);
    // Traffic towards b finds its device gone: the port goes down, nothing else does.
    let _ = na.ping("10.88.0.2", 2, &[]);
    assert!(
        wait_until(Duration::from_secs(5), || !port_info(&sw, "b").connected),
        "port b shows its device gone"
    );
    assert!(port_info(&sw, "a").connected, "port a is unaffected");
    let mut fe = connect_default(&dir, "g");
    // The guest still gets the namespace's broadcasts through a.
    let _ = na.ping("10.88.0.9", 1, &[]);
    let got = fe.recv_frames(0, 1, Duration::from_secs(3));
    assert!(!got.is_empty(), "a's broadcasts still reach the guest");
    sw.del_port("b").expect("a gone port can be removed");
}

#[test]
fn test_a_namespace_and_a_qemu_linux_guest_ping_and_stream_both_ways_through_the_switch() {
    use e2e_tests::linux::{Guest, GuestSpec, Kit};
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let kit = Kit::get();
    let dir = Scratch::new("tap-guest");
    let a = ifname("q");
    let specs = [format!("a=tap:{a}"), "g=SOCK:g.sock".to_string()];
    let _sw = start(&dir, &specs);
    let na = Netns::new("q");
    na.adopt(&a, "10.88.0.1/24");
    // The guest serves iperf3 and waits for "done" on tcp/5999; the namespace is the client.
    let spec = GuestSpec::new(
        "g",
        &dir.path("g.sock"),
        "52:54:00:4b:00:02",
        &["role=server", "ip=10.88.0.2/24", "peer=10.88.0.1", "tests=ping,iperf3"],
    );
    let mut guest = Guest::start(&kit, &dir, &spec);
    let booted =
        wait_until(Duration::from_secs(180), || na.ping("10.88.0.2", 1, &[]).is_ok() || !guest.running());
    assert!(booted && guest.running(), "the guest never answered\n{}", guest.report());
    na.ping("10.88.0.2", 5, &[]).unwrap_or_else(|e| panic!("ping the guest: {e}\n{}", guest.report()));
    // iperf3's server in the guest may start a moment after its network, and under TCG it
    // takes a while to listen again after each test.
    let to_guest = na.iperf3_patient("10.88.0.2", 3, false, Duration::from_secs(30));
    let from_guest = na.iperf3_patient("10.88.0.2", 3, true, Duration::from_secs(30));
    println!("iperf3 TCP namespace->guest {to_guest:.2} Gbit/s, guest->namespace {from_guest:.2} Gbit/s (guest under TCG)");
    assert!(to_guest > 0.0 && from_guest > 0.0);
    // Tell the guest it is done; it pings back and powers off.
    let _ = na.run(&["bash", "-c", "echo done ok=1 > /dev/tcp/10.88.0.2/5999"]);
    let r = guest.wait_result(Duration::from_secs(60));
    let r = r.unwrap_or_else(|| panic!("no result from the guest\n{}", guest.report()));
    assert!(r.pass, "{}\n{}", r.line, guest.report());
    assert_eq!(r.get("ping_loss"), "0%", "the guest's pings to the namespace: {}", r.line);
}
