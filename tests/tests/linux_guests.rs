//! Real Linux guests (Debian's cloud kernel under QEMU 7.2, the kit of `tests/guest/build.sh`)
//! whose virtio-net NICs are ports of our switch: the kernel's own virtio-net driver against
//! the switch, over real vhost-user sockets, with QEMU as the frontend.
//!
//! The guests run under TCG here (this machine's KVM cannot run a stock kernel), so each run
//! takes tens of seconds; the tests in this file run one at a time (two TCG guests already
//! fill two cores).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e_tests::linux::{Guest, GuestResult, GuestSpec, Kit};
use e2e_tests::{find, port_info, sock, start_switch, wait_stats, Scratch};
use vswitch::vhost::iotlb::IotlbInfo;

/// One guest test at a time in this process.
static SERIAL: Mutex<()> = Mutex::new(());

const IP_A: &str = "10.77.0.1";
const IP_B: &str = "10.77.0.2";

/// A client guest on port `a` and a server guest on port `b`; both results, or a panic that
/// shows both consoles. `watch` is called every 100 ms while the client runs (the switch
/// forgets a connection's state when its guest powers off).
fn run_pair(
    dir: &Scratch,
    client: GuestSpec,
    server: GuestSpec,
    mut watch: impl FnMut(),
) -> (GuestResult, GuestResult) {
    let kit = Kit::get();
    let mut b = Guest::start(&kit, dir, &server);
    let mut a = Guest::start(&kit, dir, &client);
    let wait = Duration::from_secs(client.timeout_s.max(server.timeout_s) + 10);
    let t = Instant::now();
    while a.result().is_none() && a.running() && t.elapsed() < wait {
        watch();
        std::thread::sleep(Duration::from_millis(100));
    }
    let ra = a.wait_result(Duration::from_secs(5));
    let rb = b.wait_result(Duration::from_secs(30));
    match (ra, rb) {
        (Some(ra), Some(rb)) if ra.pass && rb.pass => (ra, rb),
        (ra, rb) => panic!(
            "guest test failed\nclient: {}\nserver: {}\n{}\n{}",
            ra.map_or("no result".into(), |r| r.line),
            rb.map_or("no result".into(), |r| r.line),
            a.report(),
            b.report()
        ),
    }
}

fn pair_specs(dir: &Scratch, tests: &str, extra: &[&str]) -> (GuestSpec, GuestSpec) {
    let mut client_words = vec![
        "role=client".to_string(),
        format!("ip={IP_A}/24"),
        format!("peer={IP_B}"),
        format!("tests={tests}"),
    ];
    client_words.extend(extra.iter().map(|s| s.to_string()));
    let cw: Vec<&str> = client_words.iter().map(String::as_str).collect();
    let client = GuestSpec::new("a", &sock(dir, "a"), "52:54:00:4b:00:01", &cw);
    let server = GuestSpec::new(
        "b",
        &sock(dir, "b"),
        "52:54:00:4b:00:02",
        &["role=server", &format!("ip={IP_B}/24"), &format!("peer={IP_A}"), &format!("tests={tests}")],
    );
    (client, server)
}

#[test]
fn two_linux_guests_ping_and_iperf3_through_the_switch() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("linux-pair");
    let sw = start_switch(&dir, &["a", "b"]);
    let (client, server) = pair_specs(&dir, "ping,iperf3", &["iperf_t=3"]);
    let (ra, rb) = run_pair(&dir, client, server, || {});
    println!("client: {}\nserver: {}", ra.line, rb.line);
    assert_eq!(ra.get("ping_loss"), "0%", "{}", ra.line);
    assert_ne!(ra.get("iperf3_gbps"), "none", "{}", ra.line);
    // The traffic went through the switch, both ways, one copy per delivered frame.
    let s = wait_stats(&sw, Duration::from_secs(2), |_| true);
    let (pa, pb) = (find(&s, "a"), find(&s, "b"));
    println!("switch port a: from guest {:?}\n  to guest {:?}", pa.rx, pa.tx);
    println!("switch port b: from guest {:?}\n  to guest {:?}", pb.rx, pb.tx);
    // iperf3's data goes a -> b, its acknowledgements b -> a.
    assert!(pa.rx.packets > 1000 && pb.tx.packets > 1000, "a: {:?}\nb: {:?}", pa.rx, pb.tx);
    assert!(pb.rx.packets > 100 && pa.tx.packets > 100, "b: {:?}\na: {:?}", pb.rx, pa.tx);
    assert_eq!(pa.tx.copies, pa.tx.packets, "one copy per frame delivered to a");
    assert_eq!(pb.tx.copies, pb.tx.packets, "one copy per frame delivered to b");
}

#[test]
fn linux_guests_behind_an_intel_viommu_ping_through_the_iotlb() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("linux-viommu");
    let sw = start_switch(&dir, &["a", "b"]);
    let (mut client, mut server) = pair_specs(&dir, "ping", &["ping_n=20"]);
    client.viommu = true;
    server.viommu = true;
    // The last counters seen while the guests ran.
    let mut seen: [Option<(IotlbInfo, u64)>; 2] = [None, None];
    let (ra, rb) = run_pair(&dir, client, server, || {
        for (k, port) in ["a", "b"].iter().enumerate() {
            let d = port_info(&sw, port).device;
            if let Some(t) = d.iotlb {
                seen[k] = Some((t, d.dma_faults));
            }
        }
    });
    println!("client: {}\nserver: {}", ra.line, rb.line);
    // Every ping arrived: a reply whose receive buffer was not translated yet waited for it.
    assert_eq!(ra.get("ping_loss"), "0%", "{}", ra.line);
    for (k, port) in ["a", "b"].iter().enumerate() {
        let (tlb, dma_faults) = seen[k]
            .clone()
            .unwrap_or_else(|| panic!("port {port}: the guest did not negotiate ACCESS_PLATFORM"));
        println!(
            "port {port}: iotlb entries={} updates={} invalidations={} misses_sent={} rx_parked={} \
             rx_miss_drops={} tx_miss_timeouts={} refused={} dma_faults={}",
            tlb.entries,
            tlb.updates,
            tlb.invalidations,
            tlb.misses_sent,
            tlb.rx_parked,
            tlb.rx_miss_drops,
            tlb.tx_miss_timeouts,
            tlb.refused,
            dma_faults
        );
        // The guest's driver maps and unmaps every buffer (strict mode): the switch asked for
        // translations and QEMU sent updates and invalidations.
        assert!(tlb.misses_sent > 0 && tlb.updates > 0 && tlb.invalidations > 0, "port {port}: {tlb:?}");
        assert_eq!(tlb.refused, 0, "port {port}: QEMU's updates lie inside the guest's memory");
        assert_eq!(dma_faults, 0, "port {port}: {:?}", tlb.recent_faults);
    }
}
