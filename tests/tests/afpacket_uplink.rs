//! AF_PACKET uplinks: the switch on existing network devices (here veth pairs, the far end of
//! each moved into a network namespace of its own, with an address), as on a NIC or a VF.
//! The namespaces talk through the switch: ping, iperf3 TCP with TSO both ways, 64-byte UDP
//! bursts counted end to end, jumbo frames, a VLAN-tagged stream, multiqueue fanout, and
//! a guest reaching a namespace.
//!
//! Needs root (CAP_NET_RAW, CAP_NET_ADMIN) and `ip`, `ping`, `iperf3`
//! (scripts/install-test-deps.sh).

use std::sync::Mutex;
use std::time::Duration;

use e2e_tests::netns::{ip, Netns};
use e2e_tests::{connect_default, find, init_log, port_info, port_stats, wait_until, Scratch};
use vswitch::config::SwitchConfig;
use vswitch::switch::Switch;
use vswitch_bench::frame::{build_frame, frame_seq};

/// One test at a time: iperf3 fills both CPUs.
static SERIAL: Mutex<()> = Mutex::new(());

/// A veth pair named after this process and `tag`: (the switch's end, the namespace's end),
/// deleted with the namespace (or by name on drop).
struct Veth(String, String);

impl Veth {
    fn new(tag: &str) -> Veth {
        let base = format!("vp{}{tag}", std::process::id() % 100_000);
        let (a, b) = (format!("{base}s"), format!("{base}n"));
        let _ = std::process::Command::new("ip").args(["link", "del", &a]).output();
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        Veth(a, b)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

fn start_on(dir: &Scratch, specs: &[String], pmd_cores: Vec<usize>) -> Switch {
    init_log();
    let ports = e2e_tests::parse_ports(dir, specs);
    Switch::start(SwitchConfig { fdb_aging_secs: 300, ports, pmd_cores, ..Default::default() })
        .expect("switch starts")
}

/// Two veths, the switch on one end of each (`a`, `b` with `opts`), the other ends in two
/// namespaces as 10.89.0.1 and .2.
fn two_hosts(dir: &Scratch, opts: &str, pmds: Vec<usize>) -> (Switch, Netns, Netns, Veth, Veth) {
    let (va, vb) = (Veth::new("a"), Veth::new("b"));
    let specs = [format!("a=afpacket:{}{opts}", va.0), format!("b=afpacket:{}{opts}", vb.0)];
    let sw = start_on(dir, &specs, pmds);
    let (na, nb) = (Netns::new("pa"), Netns::new("pb"));
    na.adopt(&va.1, "10.89.0.1/24");
    nb.adopt(&vb.1, "10.89.0.2/24");
    (sw, na, nb, va, vb)
}

#[test]
fn test_two_namespaces_ping_and_stream_tcp_with_tso_through_afpacket_ports() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("afp-tcp");
    let (sw, na, nb, va, _vb) = two_hosts(&dir, "", Vec::new());
    na.ping("10.89.0.2", 3, &[]).unwrap_or_else(|e| panic!("ping a -> b: {e} {:?}", sw.stats()));
    let mut server = nb.spawn(&["iperf3", "-s", "-B", "10.89.0.2"], &dir.path("iperf3.log"));
    std::thread::sleep(Duration::from_millis(300));
    let up = na.iperf3("10.89.0.2", 2, false);
    let down = na.iperf3("10.89.0.2", 2, true);
    server.kill();
    println!("iperf3 TCP through two AF_PACKET ports: a->b {up:.2} Gbit/s, b->a {down:.2} Gbit/s");
    assert!(up > 0.0 && down > 0.0);
    let s = sw.stats().expect("stats");
    let (pa, pb) = (find(&s, "a"), find(&s, "b"));
    // The veths' TSO frames crossed whole, in the virtio-net header both ways.
    assert!(pa.queues[0].counters.gso_whole + pb.queues[0].counters.gso_whole > 0, "{pa:?} {pb:?}");
    assert_eq!(pa.tx.copies + pb.tx.copies, 0, "no CPU copy by the switch between two uplinks");
    let info = port_info(&sw, "a");
    assert!(info.connected && info.socket == format!("afpacket:{}", va.0), "{info:?}");
    // The device was promiscuous for the port only: removing it leaves the device as it was.
    let promisc = |dev: &str| {
        let f = std::fs::read_to_string(format!("/sys/class/net/{dev}/flags")).expect("device flags");
        u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).expect("hex flags") & 0x100 != 0
    };
    assert!(promisc(&va.0), "promiscuous while the port lives");
    sw.del_port("a").expect("port-del");
    assert!(!promisc(&va.0), "not promiscuous after port-del");
    na.ping("10.89.0.2", 1, &["-W", "1"]).expect_err("no path without the port");
}

#[test]
fn test_64_byte_udp_bursts_from_a_namespace_reach_a_guest_counted_end_to_end() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("afp-burst");
    let v = Veth::new("g");
    let sw = start_on(&dir, &[format!("up=afpacket:{}", v.0), "g=SOCK:g.sock".into()], Vec::new());
    let ns = Netns::new("pg");
    ns.adopt(&v.1, "10.89.1.1/24");
    let mut g = connect_default(&dir, "g");
    let guest = [0x52, 0x54, 0, 0x5c, 0, 1];
    // The guest speaks first: the switch learns where it is and does not flood.
    e2e_tests::send(&mut g, 0, &build_frame([0xff; 6], guest, None, 18, 0));
    let far = [0x02, 0, 0, 0x5c, 0, 2];
    let n = 2000u64;
    let frames: Vec<Vec<u8>> = (1..=n).map(|i| build_frame(guest, far, None, 18, i)).collect();
    assert_eq!(frames[0].len(), 60, "64 bytes on the wire with the FCS");
    for chunk in frames.chunks(200) {
        ns.inject(&v.1, chunk);
        // Below the guest's ring: only the switch could lose one.
        let want = chunk.last().map(|f| frame_seq(f).unwrap()).unwrap();
        let mut got = Vec::new();
        assert!(
            wait_until(Duration::from_secs(5), || {
                g.poll_rx(0, |f| got.extend(frame_seq(f)));
                got.last() == Some(&want)
            }),
            "the guest got {} of {} frames up to {want}",
            got.len(),
            chunk.len()
        );
        let first = frame_seq(&chunk[0]).unwrap();
        assert_eq!(got, (first..=want).collect::<Vec<_>>(), "every frame once and in order");
    }
    let s = port_stats(&sw, "up");
    assert!(s.rx.packets >= n, "{s:?}");
    // And back: the guest's frames leave by the device.
    for i in 0..50 {
        e2e_tests::send(&mut g, 0, &build_frame(far, guest, None, 18, 10_000 + i));
    }
    assert!(
        wait_until(Duration::from_secs(5), || port_stats(&sw, "up").tx.packets >= 50),
        "{:?}",
        port_stats(&sw, "up")
    );
}

#[test]
fn test_jumbo_frames_and_a_vlan_tagged_stream_cross_afpacket_ports() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("afp-jumbo");
    let (_sw, na, nb, va, vb) = two_hosts(&dir, ",mtu=9000", Vec::new());
    na.ip(&["link", "set", &va.1, "mtu", "9000"]);
    nb.ip(&["link", "set", &vb.1, "mtu", "9000"]);
    // 8972 bytes of ICMP payload = a 9000-byte IP packet, not to be fragmented.
    na.ping("10.89.0.2", 3, &["-s", "8972", "-M", "do"]).unwrap_or_else(|e| panic!("jumbo ping: {e}"));
}

#[test]
fn test_multiqueue_afpacket_ports_fan_flows_out_over_queues_and_polling_threads() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("afp-mq");
    let (sw, na, nb, _va, _vb) = two_hosts(&dir, ",queues=2", vec![0, 1]);
    na.ping("10.89.0.2", 2, &[]).unwrap_or_else(|e| panic!("ping: {e}"));
    let mut server = nb.spawn(&["iperf3", "-s", "-B", "10.89.0.2"], &dir.path("iperf3.log"));
    std::thread::sleep(Duration::from_millis(300));
    let out = na.run(&[
        "timeout",
        "60",
        "iperf3",
        "-c",
        "10.89.0.2",
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
    assert!(a0 > 0 && a1 > 0, "the fanout spread flows over both sockets");
}

#[test]
fn test_a_vlan_tagged_stream_from_the_device_reaches_an_access_guest_untagged_and_back_tagged() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("afp-vlan");
    let v = Veth::new("v");
    let specs = [format!("up=afpacket:{},trunk=10:11", v.0), "g=SOCK:g.sock,vlan=10".into()];
    let sw = start_on(&dir, &specs, Vec::new());
    let ns = Netns::new("pv");
    ns.adopt(&v.1, "10.89.2.1/24");
    let mut g = connect_default(&dir, "g");
    let guest = [0x52, 0x54, 0, 0x5c, 0, 0x10];
    e2e_tests::send(&mut g, 0, &build_frame([0xff; 6], guest, None, 18, 0));
    let far = [0x02, 0, 0, 0x5c, 0, 0x11];
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
    assert_eq!(got, want, "VLAN 10 only, every frame once and in order");
    // And back: what the guest sends leaves the device tagged with VLAN 10.
    let cap = dir.path("tcpdump.txt");
    let cap_s = cap.to_string_lossy().to_string();
    let mut dump = ns.spawn(
        &[
            "sh",
            "-c",
            &format!("exec tcpdump -l -e -n -c 3 -i {} ether src 52:54:00:5c:00:10 > {cap_s}", v.1),
        ],
        &dir.path("tcpdump.log"),
    );
    std::thread::sleep(Duration::from_millis(800));
    for i in 0..3 {
        e2e_tests::send(&mut g, 0, &build_frame(far, guest, None, 18, 200 + i));
    }
    let _ = dump.wait_exit(Duration::from_secs(5));
    dump.kill();
    let seen = std::fs::read_to_string(&cap).unwrap_or_default();
    assert_eq!(
        seen.matches("vlan 10").count(),
        3,
        "tagged with VLAN 10 on the device: {seen:?} {:?}",
        port_stats(&sw, "up")
    );
}

#[test]
fn test_a_guests_bursts_leave_the_device_every_frame_once_and_in_order() {
    // The port's transmit is one sendmmsg per burst: the guest queues 32 frames before each
    // kick, so the switch's bursts are full ones, and the far end must see every frame of
    // every burst once, in order.
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("afp-txburst");
    let v = Veth::new("t");
    let sw = start_on(&dir, &[format!("up=afpacket:{}", v.0), "g=SOCK:g.sock".into()], Vec::new());
    let ns = Netns::new("pt");
    ns.adopt(&v.1, "10.89.2.1/24");
    let mut g = connect_default(&dir, "g");
    let (guest, far) = ([0x52, 0x54, 0, 0x5c, 0, 3], [0x02, 0, 0, 0x5c, 0, 4]);
    // The far end speaks first: the switch learns where it is and does not flood.
    ns.inject(&v.1, &[build_frame([0xff; 6], far, None, 18, 0)]);
    let cap = ns.capture(&v.1);
    let n = 3200u64;
    let frames: Vec<Vec<u8>> = (1..=n).map(|i| build_frame(far, guest, None, 18, i)).collect();
    for chunk in frames.chunks(32) {
        let t = std::time::Instant::now();
        g.reclaim_tx(0);
        for f in chunk {
            while !g.enqueue_tx(0, f) {
                assert!(t.elapsed() < Duration::from_secs(5), "the guest's TX ring stayed full");
                g.flush_tx(0);
                std::thread::sleep(Duration::from_micros(200));
                g.reclaim_tx(0);
            }
        }
        g.flush_tx(0);
        // Each burst out before the next (a veth's far end takes them at its own pace).
        assert!(
            wait_until(Duration::from_secs(5), || port_stats(&sw, "up").tx.packets
                + port_stats(&sw, "up").tx.drop_no_buffer
                >= frame_seq(chunk.last().unwrap()).unwrap()),
            "{:?}",
            port_stats(&sw, "up")
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    let got: Vec<u64> =
        cap.finish().iter().filter(|f| f[6..12] == guest).filter_map(|f| frame_seq(f)).collect();
    let s = port_stats(&sw, "up");
    assert_eq!(s.tx.drop_no_buffer + s.tx.drop_malformed, 0, "{s:?}");
    assert_eq!(got, (1..=n).collect::<Vec<_>>(), "every frame once and in order ({} of {n})", got.len());
}

#[test]
fn test_a_frame_the_kernel_refuses_mid_burst_is_counted_and_the_rest_of_the_burst_still_goes() {
    // Straight at the packet socket's sink: three frames in one send_many, the middle one with
    // a virtio-net header the kernel rejects (an unknown GSO type): it is refused, the
    // call is repeated for the third, and the far end gets the first and the third.
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    use vswitch::uplink::afpacket::PacketDevice;
    use vswitch::uplink::tap::Sent;
    let v = Veth::new("r");
    let dev = PacketDevice::open(&v.0, 1, true, None).expect("packet socket on the veth");
    let ns = Netns::new("pr");
    ns.adopt(&v.1, "10.89.3.1/24");
    let cap = ns.capture(&v.1);
    let mut sink = dev.sink(0);
    assert!(sink.sends_batched());
    let src = [0x02, 0, 0, 0x5c, 0, 5];
    let frames: Vec<Vec<u8>> = (1..=3).map(|i| build_frame([0xff; 6], src, None, 18, i)).collect();
    let good = [0u8; 12];
    let mut bad = [0u8; 12];
    bad[1] = 0x7f;
    let iov = |p: &[u8]| libc::iovec { iov_base: p.as_ptr() as *mut _, iov_len: p.len() };
    let msgs = [[iov(&good), iov(&frames[0])], [iov(&bad), iov(&frames[1])], [iov(&good), iov(&frames[2])]];
    let parts: Vec<&[libc::iovec]> = msgs.iter().map(|m| &m[..]).collect();
    let mut sent = [Sent::Full; 3];
    sink.send_many(&parts, &mut sent);
    assert_eq!(sent, [Sent::Ok, Sent::Refused, Sent::Ok]);
    std::thread::sleep(Duration::from_millis(200));
    let got: Vec<u64> =
        cap.finish().iter().filter(|f| f[6..12] == src).filter_map(|f| frame_seq(f)).collect();
    assert_eq!(got, vec![1, 3]);
}
