//! VXLAN ports against the Linux kernel's own `vxlan` device: the kernel VTEPs sit in network
//! namespaces of their own behind veth pairs (the underlay, private addresses on links the test
//! makes), a namespace behind a TAP port of the switch is the other host. Ping at 1472, 1600
//! and 3200 bytes (inner fragments), iperf3 TCP both ways, tcpdump decoding our datagrams as
//! VXLAN, and two remotes on one VNI: head-end replication of broadcast, unicast to the remote
//! a MAC was learned behind. Geneve against Open vSwitch's userspace datapath (the kernel has
//! no Geneve), VXLAN over IPv6, several VNIs on one UDP port.
//!
//! Needs root and `ip`, `ping`, `iperf3`, `tcpdump`, `tshark` (scripts/install-test-deps.sh), Open vSwitch
//! (scripts/install-bench-peers.sh).

use std::sync::Mutex;
use std::time::Duration;

use e2e_tests::netns::{ip, Netns};
use e2e_tests::{init_log, port_stats, Scratch};
use vswitch::config::SwitchConfig;
use vswitch::switch::Switch;

/// One test at a time: iperf3 fills both CPUs.
static SERIAL: Mutex<()> = Mutex::new(());

/// A veth pair, its first end in this (the switch's) namespace with `addr`, deleted on drop.
struct Underlay(String, String);

impl Underlay {
    fn new(tag: &str, addr: &str) -> Underlay {
        let base = format!("vu{}{tag}", std::process::id() % 100_000);
        let (a, b) = (format!("{base}s"), format!("{base}n"));
        let _ = std::process::Command::new("ip").args(["link", "del", &a]).output();
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        ip(&["addr", "add", addr, "dev", &a]);
        ip(&["link", "set", &a, "up"]);
        Underlay(a, b)
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

/// A kernel VTEP: namespace `ns` holds the underlay's far end with `under` and a vxlan device
/// (VNI 42, port 4789, remote `switch_ip`) with the overlay address `over`.
fn kernel_vtep(tag: &str, u: &Underlay, under: &str, switch_ip: &str, over: &str) -> Netns {
    let ns = Netns::new(tag);
    ns.adopt(&u.1, under);
    // A veth hands the far end an encapsulated packet whose inner checksum is left for a NIC
    // to fill in; the switch's UDP socket gets those bytes as they are. Checksums done before
    // the veth, as a real NIC's would be on the wire (Open vSwitch's tests do the same).
    let out = ns.run(&["ethtool", "-K", &u.1, "tx", "off"]);
    assert!(out.status.success(), "ethtool: {}", String::from_utf8_lossy(&out.stderr));
    let local = under.split('/').next().unwrap();
    ns.ip(&[
        "link", "add", "vx0", "type", "vxlan", "id", "42", "remote", switch_ip, "local", local, "dstport",
        "4789", "dev", &u.1,
    ]);
    ns.ip(&["addr", "add", over, "dev", "vx0"]);
    ns.ip(&["link", "set", "vx0", "up"]);
    ns
}

fn start(dir: &Scratch, specs: &[String]) -> Switch {
    init_log();
    let ports = e2e_tests::parse_ports(dir, specs);
    Switch::start(SwitchConfig { fdb_aging_secs: 300, ports, ..Default::default() }).expect("switch starts")
}

fn rx_packets(ns: &Netns, dev: &str) -> u64 {
    let out = ns.run(&["cat", &format!("/sys/class/net/{dev}/statistics/rx_packets")]);
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

#[test]
fn test_vxlan_port_and_the_kernels_vxlan_ping_at_every_size_and_stream_tcp_both_ways() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("vxlan-kernel");
    let u = Underlay::new("k", "172.31.90.1/24");
    let tap = format!("vx{}b", std::process::id() % 100_000);
    let specs = ["t=vxlan:172.31.90.2,vni=42,local=172.31.90.1".to_string(), format!("b=tap:{tap}")];
    let sw = start(&dir, &specs);
    let na = kernel_vtep("vka", &u, "172.31.90.2/24", "172.31.90.1", "10.90.0.1/24");
    let nb = Netns::new("vkb");
    nb.adopt(&tap, "10.90.0.2/24");
    // The kernel's vxlan device has an MTU of 1450 (1500 less 50): the host behind the TAP too.
    nb.ip(&["link", "set", &tap, "mtu", "1450"]);
    // What the switch sends, captured on the underlay, decoded by tcpdump and by tshark.
    let pcap = dir.path("vxlan.pcap");
    let pcap_s = pcap.to_string_lossy().to_string();
    let mut dump = na.spawn(
        &["tcpdump", "--immediate-mode", "-U", "-n", "-w", &pcap_s, "-i", &u.1, "udp dst port 4789"],
        &dir.path("tcpdump.log"),
    );
    listening(&dump);
    nb.ping("10.90.0.1", 3, &[]).unwrap_or_else(|e| panic!("ping over VXLAN: {e} {:?}", sw.stats()));
    std::thread::sleep(Duration::from_millis(300));
    // SIGINT: tcpdump writes out what it holds and exits.
    dump.stop(Duration::from_secs(3));
    let seen = read_pcap(&["tcpdump", "-n", "-r", &pcap_s]);
    assert!(seen.contains("VXLAN, flags [I] (0x08), vni 42"), "tcpdump decodes our VXLAN: {seen}");
    assert_tshark_decodes(&pcap_s, "vxlan.vni == 42 && icmp.type == 8", 3);
    // 1422 bytes of payload fill the inner MTU; 1600 and 3200 are fragmented by the sender's IP.
    let hosts = Hosts { near: &nb, near_ip: "10.90.0.2", far: &na, far_ip: "10.90.0.1" };
    hosts.ping_every_size_and_stream(&["1422", "1600", "3200"], 3, &dir, "VXLAN to the kernel's vxlan");
    let s = port_stats(&sw, "t");
    assert!(s.rx.packets > 0 && s.tx.packets > 0, "{s:?}");
    // The TAP's kernel hands over TSO frames with partial checksums: the tunnel cut them into
    // segments and completed the checksums itself, and says so (none of them went whole).
    assert!(s.tx.gso_segmented > 0 && s.tx.csum_completed > 0, "{s:?}");
    assert_eq!(s.tx.gso_whole, 0, "{s:?}");
}

#[test]
fn test_two_remotes_on_one_vni_get_broadcast_each_and_unicast_where_the_mac_was_learned() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("vxlan-two");
    let (u1, u2) = (Underlay::new("p", "172.31.91.1/24"), Underlay::new("q", "172.31.92.1/24"));
    let tap = format!("vx{}c", std::process::id() % 100_000);
    let specs = ["t=vxlan:172.31.91.2,remote=172.31.92.2,vni=42".to_string(), format!("b=tap:{tap}")];
    let sw = start(&dir, &specs);
    let _n1 = kernel_vtep("vt1", &u1, "172.31.91.2/24", "172.31.91.1", "10.91.0.1/24");
    let n2 = kernel_vtep("vt2", &u2, "172.31.92.2/24", "172.31.92.1", "10.91.0.3/24");
    let nb = Netns::new("vtb");
    nb.adopt(&tap, "10.91.0.2/24");
    nb.ip(&["link", "set", &tap, "mtu", "1450"]);
    // Both remotes answer: each got the ARP broadcast (head-end replication).
    nb.ping("10.91.0.1", 2, &[]).unwrap_or_else(|e| panic!("ping remote 1: {e} {:?}", sw.stats()));
    nb.ping("10.91.0.3", 2, &[]).unwrap_or_else(|e| panic!("ping remote 2: {e}"));
    // Learned: a unicast stream to remote 1 does not reach remote 2 (which may still get a
    // multicast or two: IPv6 neighbour discovery and the like).
    let cap = dir.path("icmp2.txt");
    let cap_s = cap.to_string_lossy().to_string();
    let mut dump = n2
        .spawn(&["sh", "-c", &format!("exec tcpdump -l -n -i vx0 icmp > {cap_s}")], &dir.path("tcpdump.log"));
    listening(&dump);
    let before = rx_packets(&n2, "vx0");
    nb.ping("10.91.0.1", 20, &["-i", "0.05"]).unwrap_or_else(|e| panic!("ping remote 1 again: {e}"));
    let extra = rx_packets(&n2, "vx0") - before;
    std::thread::sleep(Duration::from_millis(300));
    dump.kill();
    let seen = std::fs::read_to_string(&cap).unwrap_or_default();
    assert_eq!(seen.lines().count(), 0, "remote 2 saw remote 1's pings ({extra} frames in all): {seen}");
}

#[test]
fn test_geneve_between_two_switches_carries_ping_and_tcp_and_tcpdump_decodes_it() {
    // The host kernel has no Geneve: two switches (two hosts) tunnel to each other, each with a
    // namespace behind a TAP port; tcpdump is the independent reader of what they send.
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("geneve");
    let u = Underlay::new("g", "172.31.94.1/24");
    ip(&["addr", "add", "172.31.94.2/24", "dev", &u.0]);
    let pid = std::process::id() % 100_000;
    let (ta, tb) = (format!("gn{pid}a"), format!("gn{pid}b"));
    let sw1 = start(&dir, &["t=geneve:172.31.94.2,local=172.31.94.1,vni=7".into(), format!("a=tap:{ta}")]);
    let dir2 = Scratch::new("geneve2");
    let sw2 = start(&dir2, &["t=geneve:172.31.94.1,local=172.31.94.2,vni=7".into(), format!("b=tap:{tb}")]);
    let (na, nb) = (Netns::new("gna"), Netns::new("gnb"));
    na.adopt(&ta, "10.94.0.1/24");
    nb.adopt(&tb, "10.94.0.2/24");
    for (n, t) in [(&na, &ta), (&nb, &tb)] {
        n.ip(&["link", "set", t, "mtu", "1450"]);
    }
    // Both ends are local: the datagrams cross the loopback device, where tcpdump reads them.
    let cap = dir.path("tcpdump.txt");
    let cap_s = cap.to_string_lossy().to_string();
    let mut dump = e2e_tests::Proc::spawn(
        {
            let mut c = std::process::Command::new("sh");
            c.args(["-c", &format!("exec tcpdump -l -n -c 4 -i lo udp port 6081 > {cap_s}")]);
            c
        },
        &dir.path("tcpdump.log"),
    );
    listening(&dump);
    na.ping("10.94.0.2", 3, &[])
        .unwrap_or_else(|e| panic!("ping over Geneve: {e} {:?} {:?}", sw1.stats(), sw2.stats()));
    let _ = dump.wait_exit(Duration::from_secs(5));
    dump.kill();
    let seen = std::fs::read_to_string(&cap).unwrap_or_default();
    // tcpdump reads the header (version 0, no options, VNI 7) and, behind it, an Ethernet
    // frame (protocol TEB: it decodes the inner packet).
    assert!(seen.contains("Geneve, Flags [none], vni 0x7: IP"), "tcpdump decodes our Geneve: {seen}");
    na.ping("10.94.0.2", 2, &["-s", "3200"]).unwrap_or_else(|e| panic!("ping -s 3200 over Geneve: {e}"));
    let mut server = nb.spawn(&["iperf3", "-s", "-B", "10.94.0.2"], &dir.path("iperf3.log"));
    std::thread::sleep(Duration::from_millis(300));
    let up = na.iperf3("10.94.0.2", 2, false);
    server.kill();
    println!("iperf3 TCP over Geneve between two switches: {up:.2} Gbit/s");
    assert!(up > 0.0);
}

#[test]
fn test_vxlan_over_an_ipv6_underlay_to_the_kernels_vxlan_carries_ping_at_every_size_and_tcp() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("vxlan-v6");
    let base = format!("vu{}6", std::process::id() % 100_000);
    let (us, un) = (format!("{base}s"), format!("{base}n"));
    let _ = std::process::Command::new("ip").args(["link", "del", &us]).output();
    ip(&["link", "add", &us, "type", "veth", "peer", "name", &un]);
    let u = Underlay(us.clone(), un.clone());
    // nodad: the addresses work at once (duplicate address detection would hold them a second).
    ip(&["addr", "add", "fd00:93::1/64", "dev", &us, "nodad"]);
    ip(&["link", "set", &us, "up"]);
    let tap = format!("vx{}6", std::process::id() % 100_000);
    let specs = ["t=vxlan:fd00:93::2,vni=42,local=fd00:93::1".to_string(), format!("b=tap:{tap}")];
    let sw = start(&dir, &specs);
    let na = Netns::new("v6a");
    ip(&["link", "set", &u.1, "netns", &na.name]);
    na.ip(&["addr", "add", "fd00:93::2/64", "dev", &u.1, "nodad"]);
    na.ip(&["link", "set", &u.1, "up"]);
    let out = na.run(&["ethtool", "-K", &u.1, "tx", "off"]);
    assert!(out.status.success(), "ethtool: {}", String::from_utf8_lossy(&out.stderr));
    na.ip(&[
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        "42",
        "remote",
        "fd00:93::1",
        "local",
        "fd00:93::2",
        "dstport",
        "4789",
        "dev",
        &u.1,
    ]);
    na.ip(&["addr", "add", "10.93.0.1/24", "dev", "vx0"]);
    na.ip(&["link", "set", "vx0", "up"]);
    let nb = Netns::new("v6b");
    nb.adopt(&tap, "10.93.0.2/24");
    // Over IPv6 the headers take 70 bytes: the kernel's vxlan device has an MTU of 1430.
    nb.ip(&["link", "set", &tap, "mtu", "1430"]);
    let cap = dir.path("tcpdump.txt");
    let cap_s = cap.to_string_lossy().to_string();
    let mut dump = na.spawn(
        &["sh", "-c", &format!("exec tcpdump -l -n -c 4 -i {} ip6 and udp dst port 4789 > {cap_s}", u.1)],
        &dir.path("tcpdump.log"),
    );
    listening(&dump);
    nb.ping("10.93.0.1", 3, &[]).unwrap_or_else(|e| panic!("ping over VXLAN/IPv6: {e} {:?}", sw.stats()));
    let _ = dump.wait_exit(Duration::from_secs(5));
    dump.kill();
    let seen = std::fs::read_to_string(&cap).unwrap_or_default();
    assert!(
        seen.contains("fd00:93::1") && seen.contains("VXLAN, flags [I] (0x08), vni 42"),
        "tcpdump decodes our VXLAN over IPv6: {seen}"
    );
    // 1402 bytes of payload fill the inner MTU; 1600 and 3200 go as IPv6 fragments.
    let hosts = Hosts { near: &nb, near_ip: "10.93.0.2", far: &na, far_ip: "10.93.0.1" };
    hosts.ping_every_size_and_stream(&["1402", "1600", "3200"], 3, &dir, "VXLAN/IPv6 to the kernel's vxlan");
}

/// Two tunnel ports, VNIs 42 and 43, on the one UDP port 4789 and the one remote: the kernel's
/// two vxlan devices in one namespace (each VNI its own overlay), each reached from its own
/// host behind a TAP port in its own VLAN. Each port gets its own VNI's datagrams, every one:
/// without the switch's steering the kernel would spread them over both sockets by hash, and
/// each port would drop the other's share (counted `filtered` or `malformed`).
#[test]
fn test_two_vnis_share_one_udp_port_and_each_port_gets_its_own_datagrams() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("vxlan-vnis");
    let u = Underlay::new("m", "172.31.95.1/24");
    let pid = std::process::id() % 100_000;
    let (tb, tc) = (format!("vm{pid}b"), format!("vm{pid}c"));
    let specs = [
        "t42=vxlan:172.31.95.2,vni=42,vlan=10".to_string(),
        "t43=vxlan:172.31.95.2,vni=43,vlan=11".to_string(),
        format!("b=tap:{tb},vlan=10"),
        format!("c=tap:{tc},vlan=11"),
    ];
    let sw = start(&dir, &specs);
    let na = kernel_vtep("vma", &u, "172.31.95.2/24", "172.31.95.1", "10.95.42.1/24");
    na.ip(&[
        "link",
        "add",
        "vx43",
        "type",
        "vxlan",
        "id",
        "43",
        "remote",
        "172.31.95.1",
        "local",
        "172.31.95.2",
        "dstport",
        "4789",
        "dev",
        &u.1,
    ]);
    na.ip(&["addr", "add", "10.95.43.1/24", "dev", "vx43"]);
    na.ip(&["link", "set", "vx43", "up"]);
    let (nb, nc) = (Netns::new("vmb"), Netns::new("vmc"));
    nb.adopt(&tb, "10.95.42.2/24");
    nc.adopt(&tc, "10.95.43.2/24");
    for (n, t) in [(&nb, &tb), (&nc, &tc)] {
        n.ip(&["link", "set", t, "mtu", "1450"]);
    }
    // Many flows (the kernel's vxlan picks its source port by inner flow): each would land on
    // either socket by hash alone.
    for round in 0..3 {
        nb.ping("10.95.42.1", 3, &["-i", "0.05"])
            .unwrap_or_else(|e| panic!("VNI 42, round {round}: {e} {:?}", sw.stats()));
        nc.ping("10.95.43.1", 3, &["-i", "0.05"])
            .unwrap_or_else(|e| panic!("VNI 43, round {round}: {e} {:?}", sw.stats()));
    }
    // The kernel times each run of the selection program while this is open: its cost per
    // datagram, printed (a measurement, not asserted).
    let stats = vswitch::uplink::bpf::enable_run_time_stats().expect("BPF_ENABLE_STATS");
    let (runs0, ns0) = vswitch::uplink::bpf::prog_run_time(vswitch::uplink::bpf::VNI_PROG_NAME);
    let mut server = na.spawn(&["iperf3", "-s"], &dir.path("iperf3.log"));
    std::thread::sleep(Duration::from_millis(300));
    let out = nb.run(&[
        "timeout",
        "30",
        "iperf3",
        "-c",
        "10.95.42.1",
        "-t",
        "1",
        "-P",
        "4",
        "--connect-timeout",
        "5000",
    ]);
    assert!(out.status.success(), "iperf3 over VNI 42: {}", String::from_utf8_lossy(&out.stderr));
    let out = nc.run(&[
        "timeout",
        "30",
        "iperf3",
        "-c",
        "10.95.43.1",
        "-t",
        "1",
        "-P",
        "4",
        "--connect-timeout",
        "5000",
    ]);
    assert!(out.status.success(), "iperf3 over VNI 43: {}", String::from_utf8_lossy(&out.stderr));
    server.kill();
    let (runs, ns) = vswitch::uplink::bpf::prog_run_time(vswitch::uplink::bpf::VNI_PROG_NAME);
    drop(stats);
    let (runs, ns) = (runs.saturating_sub(runs0), ns.saturating_sub(ns0));
    let received: u64 = ["t42", "t43"].iter().map(|p| port_stats(&sw, p).rx.packets).sum();
    println!(
        "VNI selection program: {runs} runs, {:.0} ns per datagram ({received} frames received in all)",
        ns as f64 / runs.max(1) as f64
    );
    assert!(runs > 0, "the program selected no socket");
    for p in ["t42", "t43"] {
        let s = port_stats(&sw, p);
        assert!(s.rx.packets > 0, "{p}: {s:?}");
        assert_eq!(
            (s.rx.drop_filtered, s.rx.drop_malformed),
            (0, 0),
            "{p} got no datagram of the other VNI: {s:?}"
        );
    }
    // A third port for VNI 42 on the same UDP port is refused, naming the clash.
    let err = sw
        .add_port(vswitch::PortConfig::parse("t42b=vxlan:172.31.95.2,vni=42").unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("VNI 42 already has a port on UDP 0.0.0.0:4789"), "{err}");
    // Removed and added again at once: the slot is free, the datagrams steered again.
    sw.del_port("t43").expect("port-del");
    sw.add_port(vswitch::PortConfig::parse("t43=vxlan:172.31.95.2,vni=43,vlan=11").unwrap())
        .expect("port-add");
    nc.ping("10.95.43.1", 3, &["-i", "0.05"])
        .unwrap_or_else(|e| panic!("VNI 43 after re-adding: {e} {:?}", sw.stats()));
}

/// A private Open vSwitch in namespace `ns`: database and run directory in the test's scratch
/// directory, `ovsdb-server` and `ovs-vswitchd` in the foreground, stopped by PID on drop. No
/// DPDK is started: the bridges are the userspace (`netdev`) datapath, whose Geneve is
/// Open vSwitch's own (the host kernel has none).
struct Ovs {
    rundir: std::path::PathBuf,
    // Dropped in this order: the switch daemon before its database.
    _vswitchd: e2e_tests::Proc,
    _db: e2e_tests::Proc,
}

impl Ovs {
    fn start(ns: &Netns, dir: &Scratch) -> Ovs {
        for p in ["ovsdb-server", "ovsdb-tool", "ovs-vsctl", "ovs-vswitchd", "ovs-ofctl"] {
            let found = std::process::Command::new("sh").args(["-c", &format!("command -v {p}")]).output();
            assert!(
                found.is_ok_and(|o| o.status.success()),
                "{p} is not installed: run scripts/install-bench-peers.sh (Open vSwitch 3.1)"
            );
        }
        let rundir = dir.path("ovs");
        std::fs::create_dir_all(&rundir).expect("OVS run directory");
        let r = rundir.to_string_lossy().to_string();
        let schema = "/usr/share/openvswitch/vswitch.ovsschema";
        let out = std::process::Command::new("ovsdb-tool")
            .args(["create", &format!("{r}/conf.db"), schema])
            .output()
            .expect("ovsdb-tool runs");
        assert!(out.status.success(), "ovsdb-tool create: {}", String::from_utf8_lossy(&out.stderr));
        let env = [
            "env".to_string(),
            format!("OVS_RUNDIR={r}"),
            format!("OVS_LOGDIR={r}"),
            format!("OVS_DBDIR={r}"),
            format!("OVS_SYSCONFDIR={r}"),
        ];
        let spawn = |args: &[String], log: &str| {
            let all: Vec<&str> = env.iter().chain(args).map(String::as_str).collect();
            ns.spawn(&all, &rundir.join(log))
        };
        let db = spawn(
            &[
                "ovsdb-server".into(),
                format!("{r}/conf.db"),
                format!("--remote=punix:{r}/db.sock"),
                format!("--unixctl={r}/ovsdb.ctl"),
            ],
            "ovsdb-server.log",
        );
        let sock = rundir.join("db.sock");
        assert!(
            e2e_tests::wait_until(Duration::from_secs(10), || sock.exists()),
            "ovsdb-server did not open its socket: {}",
            db.log_text()
        );
        tool(&rundir, "ovs-vsctl", &[&format!("--db=unix:{r}/db.sock"), "--no-wait", "init"]);
        let vswitchd = spawn(
            &["ovs-vswitchd".into(), format!("unix:{r}/db.sock"), format!("--unixctl={r}/vswitchd.ctl")],
            "ovs-vswitchd.log",
        );
        Ovs { rundir, _vswitchd: vswitchd, _db: db }
    }

    fn tool(&self, prog: &str, args: &[&str]) -> String {
        tool(&self.rundir, prog, args)
    }

    /// `ovs-vsctl` on the private database, bounded (it waits for ovs-vswitchd to apply).
    fn vsctl(&self, args: &[&str]) -> String {
        let db = format!("--db=unix:{}/db.sock", self.rundir.display());
        let mut all = vec![db.as_str(), "--timeout=20"];
        all.extend_from_slice(args);
        self.tool("ovs-vsctl", &all)
    }
}

#[test]
fn test_geneve_port_and_open_vswitchs_userspace_geneve_ping_tcp_and_options() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("geneve-ovs");
    let u = Underlay::new("o", "172.31.96.1/24");
    // Open vSwitch's userspace datapath checks a received outer UDP checksum in software, and a
    // veth hands it the switch's datagrams with that checksum still to be filled in by
    // "hardware": checksums done before the veth, as a real NIC's would be on the wire.
    let out =
        std::process::Command::new("ethtool").args(["-K", &u.0, "tx", "off"]).output().expect("ethtool");
    assert!(out.status.success(), "ethtool: {}", String::from_utf8_lossy(&out.stderr));
    let tap = format!("gv{}o", std::process::id() % 100_000);
    let sw = start(&dir, &["t=geneve:172.31.96.2,local=172.31.96.1,vni=7".into(), format!("b=tap:{tap}")]);
    // The Open vSwitch host: the underlay's far end in a netdev bridge whose internal port
    // holds the VTEP address, and a second bridge with the Geneve port (key 7) and the inner
    // address on its internal port (Open vSwitch's userspace-tunneling layout).
    let no = Netns::new("gvo");
    ip(&["link", "set", &u.1, "netns", &no.name]);
    no.ip(&["link", "set", &u.1, "up"]);
    let ovs = Ovs::start(&no, &dir);
    ovs.vsctl(&["add-br", "brp", "--", "set", "bridge", "brp", "datapath_type=netdev"]);
    ovs.vsctl(&["add-port", "brp", &u.1]);
    no.ip(&["addr", "add", "172.31.96.2/24", "dev", "brp"]);
    no.ip(&["link", "set", "brp", "up"]);
    ovs.vsctl(&["add-br", "br0", "--", "set", "bridge", "br0", "datapath_type=netdev"]);
    ovs.vsctl(&[
        "add-port",
        "br0",
        "gnv0",
        "--",
        "set",
        "interface",
        "gnv0",
        "type=geneve",
        "options:remote_ip=172.31.96.1",
        "options:key=7",
    ]);
    no.ip(&["addr", "add", "10.96.0.1/24", "dev", "br0"]);
    no.ip(&["link", "set", "br0", "mtu", "1450", "up"]);
    let nb = Netns::new("gvb");
    nb.adopt(&tap, "10.96.0.2/24");
    nb.ip(&["link", "set", &tap, "mtu", "1450"]);
    // Open vSwitch resolves the switch's underlay address (ARP) on its first packets.
    assert!(
        e2e_tests::wait_until(Duration::from_secs(10), || nb.ping("10.96.0.1", 1, &[]).is_ok()),
        "no ping over Geneve to Open vSwitch: {:?}\n{}",
        sw.stats(),
        std::fs::read_to_string(ovs.rundir.join("ovs-vswitchd.log")).unwrap_or_default()
    );
    // tcpdump on the underlay decodes both directions.
    let cap = dir.path("tcpdump.txt");
    let cap_s = cap.to_string_lossy().to_string();
    let pcap = dir.path("geneve.pcap").to_string_lossy().to_string();
    let dump_cmd = |v: &str| format!("exec tcpdump -l -n {v} -i {} udp port 6081 > {cap_s}", u.1);
    let mut dump = no
        .spawn(&["sh", "-c", &dump_cmd(&format!("--immediate-mode -U -w {pcap}"))], &dir.path("tcpdump.log"));
    listening(&dump);
    nb.ping("10.96.0.1", 2, &[]).unwrap_or_else(|e| panic!("ping over Geneve: {e}"));
    std::thread::sleep(Duration::from_millis(300));
    // SIGINT: tcpdump writes out what it holds and exits.
    dump.stop(Duration::from_secs(3));
    assert_tshark_decodes(&pcap, "geneve.vni == 7 && ip.src == 172.31.96.1 && icmp.type == 8", 2);
    assert_tshark_decodes(&pcap, "geneve.vni == 7 && ip.src == 172.31.96.2 && icmp.type == 0", 2);
    let seen = read_pcap(&["tcpdump", "-n", "-r", &pcap]);
    let count = |pat: &str| seen.lines().filter(|l| l.contains(pat)).count();
    // Each end's datagrams, decoded down to the inner ICMP.
    let ours = count("172.31.96.1.") - count("> 172.31.96.1.");
    assert!(ours > 0, "tcpdump saw our datagrams: {seen}");
    assert!(
        count("Geneve, Flags [none], vni 0x7: IP 10.96.0.2 > 10.96.0.1: ICMP echo request") >= 2
            && count("Geneve, Flags [none], vni 0x7: IP 10.96.0.1 > 10.96.0.2: ICMP echo reply") >= 2,
        "tcpdump decodes both ends' Geneve: {seen}"
    );
    let hosts = Hosts { near: &nb, near_ip: "10.96.0.2", far: &no, far_ip: "10.96.0.1" };
    hosts.ping_every_size_and_stream(
        &["1422", "1600", "3200"],
        2,
        &dir,
        "Geneve to Open vSwitch's userspace datapath",
    );
    // Open vSwitch puts an option (class 0xffff, 4 bytes) on what its host sends: the switch
    // skips options and takes the frame.
    ovs.tool("ovs-ofctl", &["add-tlv-map", "br0", "{class=0xffff,type=0,len=4}->tun_metadata0"]);
    ovs.tool(
        "ovs-ofctl",
        &["add-flow", "br0", "priority=10,in_port=LOCAL,actions=set_field:0x1234->tun_metadata0,NORMAL"],
    );
    let mut dump = no.spawn(&["sh", "-c", &dump_cmd("--immediate-mode -v")], &dir.path("tcpdump2.log"));
    listening(&dump);
    let before = port_stats(&sw, "t").rx.packets;
    nb.ping("10.96.0.1", 3, &[]).unwrap_or_else(|e| panic!("ping with Geneve options: {e}"));
    std::thread::sleep(Duration::from_millis(300));
    dump.stop(Duration::from_secs(3));
    let seen = std::fs::read_to_string(&cap).unwrap_or_default();
    assert!(
        seen.contains("options [class Experimental (0xffff) type 0x0 len 8]"),
        "OVS sent an option: {seen}"
    );
    let s = port_stats(&sw, "t");
    assert!(s.rx.packets >= before + 3, "{s:?}");
    assert_eq!(s.rx.drop_malformed, 0, "{s:?}");
}

/// Runs an Open vSwitch tool with the private run directory `rundir`; its output (panics with
/// its errors if it fails).
fn tool(rundir: &std::path::Path, prog: &str, args: &[&str]) -> String {
    let mut c = std::process::Command::new(prog);
    for var in ["OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR"] {
        c.env(var, rundir);
    }
    let out = c.args(args).output().unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(out.status.success(), "{prog} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text a pcap reader (`cmd`) prints.
fn read_pcap(cmd: &[&str]) -> String {
    let out = std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", cmd[0]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// tshark (Wireshark's dissectors, an implementation of its own) finds at least `n` packets of
/// `pcap` matching `filter`, and none it calls malformed or in error.
fn assert_tshark_decodes(pcap: &str, filter: &str, n: usize) {
    let all = read_pcap(&["tshark", "-n", "-r", pcap]);
    let matched = read_pcap(&["tshark", "-n", "-r", pcap, "-Y", filter]);
    assert!(matched.lines().count() >= n, "tshark finds {n} packets with {filter}: {matched}\nof: {all}");
    let bad = read_pcap(&["tshark", "-n", "-r", pcap, "-Y", "_ws.malformed || _ws.expert.severity == error"]);
    assert!(bad.trim().is_empty(), "tshark calls these malformed: {bad}\nof: {all}");
}

/// Waits (up to 10 s) until tcpdump says it captures: what is sent after this is seen.
fn listening(dump: &e2e_tests::Proc) {
    assert!(
        e2e_tests::wait_until(Duration::from_secs(10), || dump.log_text().contains("listening on")),
        "tcpdump did not start: {}",
        dump.log_text()
    );
}

/// The two hosts at the ends of a tunnel: `near` behind the switch's TAP port, `far` behind
/// the other VTEP.
struct Hosts<'a> {
    near: &'a Netns,
    near_ip: &'a str,
    far: &'a Netns,
    far_ip: &'a str,
}

impl Hosts<'_> {
    /// Pings at each of `sizes` (`count` echoes out, 2 back; the larger ones fragment), then
    /// streams iperf3 TCP both ways, printed as `what`.
    fn ping_every_size_and_stream(&self, sizes: &[&str], count: u32, dir: &Scratch, what: &str) {
        for size in sizes {
            let out = self.near.ping(self.far_ip, count, &["-s", size]);
            out.unwrap_or_else(|e| panic!("ping -s {size}: {e}"));
            let back = self.far.ping(self.near_ip, 2, &["-s", size]);
            back.unwrap_or_else(|e| panic!("ping back -s {size}: {e}"));
        }
        let mut server = self.far.spawn(&["iperf3", "-s", "-B", self.far_ip], &dir.path("iperf3.log"));
        std::thread::sleep(Duration::from_millis(300));
        let up = self.near.iperf3(self.far_ip, 2, false);
        let down = self.near.iperf3(self.far_ip, 2, true);
        server.kill();
        println!("iperf3 TCP over {what}: {up:.2} Gbit/s, back {down:.2} Gbit/s");
        assert!(up > 0.0 && down > 0.0);
    }
}
