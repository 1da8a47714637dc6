//! Accelerator modules: a guest port plugged into a Level 1 NIC model (the device's MAC demux
//! writes the wire's frames into the guest's buffers) or a Level 2 one (the device drives the
//! guest's own rings) and unplugged again, under traffic both ways, losing nothing.
//! An in-process wire (`nic:wire:NAME`) with the test at its far end; needs no root.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use e2e_tests::{connect_default, drain, init_log, port_stats, wait_until, Scratch};
use vswitch::config::{PortConfig, SwitchConfig};
use vswitch::control::AccelReport;
use vswitch::switch::Switch;
use vswitch::uplink::link::LinkEnd;
use vswitch_bench::frame::{build_frame, frame_seq};
use vswitch_bench::frontend::{Frontend, FrontendConfig, IommuConfig, IotlbMsg, IOTLB_INVALIDATE};

const A: [u8; 6] = [0x52, 0x54, 0x00, 0x5a, 0x00, 0x0a];
const B: [u8; 6] = [0x52, 0x54, 0x00, 0x5a, 0x00, 0x0b];
const WIRE: [u8; 6] = [0x52, 0x54, 0x00, 0x5a, 0x00, 0xee];
/// Frames in flight per direction: below every ring and queue on the way, so a frame can only
/// go missing if a hand-over loses it.
const WINDOW: u64 = 48;
/// Frames each way the plug loop waits for at least.
const LEAST: u64 = 1000;

fn start(dir: &Scratch, specs: &[String]) -> Switch {
    e2e_tests::start_specs(dir, specs)
}

fn hello(mac: [u8; 6]) -> Vec<u8> {
    build_frame([0xff; 6], mac, None, 18, 0)
}

/// Checks that `got` is exactly 0..n in order; says what is wrong otherwise.
fn in_order(what: &str, got: &[u64], n: u64) {
    let dups = got.windows(2).filter(|w| w[1] <= w[0]).count();
    let missing = (0..n).filter(|s| got.binary_search(s).is_err()).count();
    assert!(
        got.len() as u64 == n && dups == 0 && missing == 0,
        "{what}: {} of {n} arrived, {dups} out of order or repeated, {missing} missing",
        got.len()
    );
}

/// A switch with a Level 2 NIC on an in-process wire and guests a and b, the wire's far end,
/// and both guests known to the switch and the device.
/// Guest a's frontend is configured as `a`.
fn setup_with(dir: &Scratch, wire: &str, a: FrontendConfig) -> (Switch, LinkEnd, Frontend, Frontend) {
    setup_opts(dir, wire, "", a)
}

/// [`setup_with`], port a's spec ending in `a_opts` (",nic-rate=8M").
fn setup_opts(
    dir: &Scratch,
    wire: &str,
    a_opts: &str,
    a: FrontendConfig,
) -> (Switch, LinkEnd, Frontend, Frontend) {
    let sw = start(
        dir,
        &[
            format!("up=nic:wire:{wire},level=2,pools=4"),
            format!("a=SOCK:a.sock{a_opts}"),
            "b=SOCK:b.sock".into(),
        ],
    );
    let end = LinkEnd::attach(wire).expect("the wire's far end");
    let mut fa = e2e_tests::connect(dir, "a", a);
    let mut fb = connect_default(dir, "b");
    assert_eq!(end.send([hello(WIRE).as_slice()]), 1);
    e2e_tests::send(&mut fa, 0, &hello(A));
    e2e_tests::send(&mut fb, 0, &hello(B));
    let ok = wait_until(Duration::from_secs(5), || {
        sw.nic("up").is_ok_and(|r| r.bound.iter().filter(|b| !b.macs.is_empty()).count() == 2)
    });
    assert!(ok, "the NIC binds both guests: {:?}", sw.nic("up"));
    drain(&mut fa, Duration::from_millis(50));
    drain(&mut fb, Duration::from_millis(50));
    let mut back = Vec::new();
    end.recv(&mut back, 64);
    (sw, end, fa, fb)
}

#[test]
fn plugged_at_l1_and_l2_alternately_and_unplugged_100_times_under_traffic_both_ways_nothing_is_lost_or_repeated(
) {
    plug_loop(false);
}

/// The same behind a vIOMMU, the guest unmapping its buffers every few dozen frames as a guest
/// in strict mode does: the device's DMA misses, asks the frontend and waits (a transmit chain
/// stays posted, a received frame is parked in order), plugged or not.
#[test]
fn behind_a_viommu_plugged_at_l1_and_l2_alternately_100_times_nothing_is_lost_or_repeated() {
    plug_loop(true);
}

/// The IOTLB invalidation of vring `i`'s buffers (whole pages inside the area only).
fn unmap_bufs(f: &Frontend, i: usize) -> IotlbMsg {
    let (start, len) = f.buffer_area(i);
    let (from, to) = (start.div_ceil(4096) * 4096, (start + len) / 4096 * 4096);
    IotlbMsg { iova: from, size: to - from, uaddr: 0, perm: 0, kind: IOTLB_INVALIDATE }
}

fn viommu_cfg() -> FrontendConfig {
    FrontendConfig { iommu: Some(IommuConfig::default()), ..FrontendConfig::default() }
}

fn iotlb_info(sw: &Switch, port: &str) -> vswitch::vhost::iotlb::IotlbInfo {
    e2e_tests::port_info(sw, port).device.iotlb.expect("a port behind a vIOMMU")
}

fn plug_loop(viommu: bool) {
    let dir = Scratch::new(if viommu { "accel-loop-iommu" } else { "accel-loop" });
    let wire = format!("accel-{}{}", std::process::id(), if viommu { "v" } else { "" });
    let cfg = if viommu { viommu_cfg() } else { FrontendConfig::default() };
    let (sw, end, mut fa, _fb) = setup_with(&dir, &wire, cfg);
    let misses0 = viommu.then(|| iotlb_info(&sw, "a"));
    // (A guest behind a vIOMMU may lose set-up's broadcast while its ring's translation comes.)
    let s0 = port_stats(&sw, "a");
    let stop = AtomicBool::new(false);
    // Each side has stopped sending (it saw `stop`): only then is the other's count final.
    let (a_quiet, w_quiet) = (AtomicBool::new(false), AtomicBool::new(false));
    // Sent by the wire to a, received by a; sent by a to the wire, received by the wire.
    let (w_sent, a_got, a_sent, w_got) =
        (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let mut reports: Vec<AccelReport> = Vec::new();
    // A Level 1 NIC serves every guest it can; the loop starts from the software path.
    assert_eq!(sw.accel_status(Some("a")).unwrap()[0].tier.as_deref(), Some("l1"), "bound by default");
    let off = sw.accel_unplug("a").expect("unplug from l1");
    assert_eq!(off.tier, None, "unplugged: {off:?}");
    let dma0 = sw.nic("up").expect("nic").dma_packets;
    let (to_a, to_wire) = std::thread::scope(|s| {
        // The wire's far end: sends to a within the window, takes what a sends.
        let far = s.spawn(|| {
            let (mut seqs, mut back) = (Vec::new(), Vec::new());
            let mut next = 0u64;
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(60) {
                let done = stop.load(Ordering::Relaxed);
                w_quiet.store(done, Ordering::Release);
                if !done && next.saturating_sub(a_got.load(Ordering::Relaxed)) < WINDOW {
                    let f = build_frame(A, WIRE, None, 100, next);
                    if end.send([f.as_slice()]) == 1 {
                        next += 1;
                        w_sent.store(next, Ordering::Relaxed);
                    }
                }
                if end.recv(&mut back, 64) > 0 {
                    for f in back.drain(..) {
                        if let Some(q) = frame_seq(&f[12..]) {
                            seqs.push(q);
                        }
                    }
                    w_got.store(seqs.len() as u64, Ordering::Relaxed);
                } else if a_quiet.load(Ordering::Acquire)
                    && seqs.len() as u64 >= a_sent.load(Ordering::Relaxed)
                {
                    // Sends no more (it may leave before it read `stop` itself).
                    w_quiet.store(true, Ordering::Release);
                    break;
                } else {
                    std::thread::yield_now();
                }
            }
            seqs
        });
        // Guest a: sends to the wire within the window, takes what the wire sends.
        let guest = s.spawn(|| {
            let mut seqs = Vec::new();
            let mut next = 0u64;
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(60) {
                let done = stop.load(Ordering::Relaxed);
                a_quiet.store(done, Ordering::Release);
                fa.reclaim_tx(0);
                if !done && next.saturating_sub(w_got.load(Ordering::Relaxed)) < WINDOW {
                    let f = build_frame(WIRE, A, None, 100, next);
                    if fa.send(0, &f) {
                        next += 1;
                        a_sent.store(next, Ordering::Relaxed);
                    }
                }
                let before = seqs.len();
                let n = fa.poll_rx(0, |f| {
                    if let Some(q) = frame_seq(f) {
                        seqs.push(q);
                    }
                });
                a_got.store(seqs.len() as u64, Ordering::Relaxed);
                // Strict mode: the buffers go unmapped every 64 frames received.
                if viommu && seqs.len() / 64 != before / 64 {
                    for i in [0, 1] {
                        assert_eq!(fa.iotlb_raw(unmap_bufs(&fa, i)).expect("invalidate"), 0);
                    }
                }
                if n == 0 {
                    if w_quiet.load(Ordering::Acquire) && seqs.len() as u64 >= w_sent.load(Ordering::Relaxed)
                    {
                        a_quiet.store(true, Ordering::Release);
                        break;
                    }
                    std::thread::yield_now();
                }
            }
            seqs
        });
        // 100 plugs, and more (in pairs) on a slow machine until enough traffic went through.
        let t = Instant::now();
        let mut i = 0;
        while i < 100
            || (i % 2 == 1 || a_sent.load(Ordering::Relaxed).min(w_sent.load(Ordering::Relaxed)) < 2 * LEAST)
                && t.elapsed() < Duration::from_secs(30)
        {
            let tier = if i % 2 == 0 { "l1" } else { "l2" };
            let r = sw.accel_plug("a", tier).unwrap_or_else(|e| panic!("plug {i} ({tier}): {e}"));
            assert_eq!(r.tier.as_deref(), Some(tier));
            i += 1;
            std::thread::sleep(Duration::from_millis(if viommu { 12 } else { 3 }));
            let r = sw.accel_unplug("a").unwrap_or_else(|e| panic!("unplug {i} ({tier}): {e}"));
            assert_eq!(r.tier, None, "unplug {i}: back on the software path: {r:?}");
            reports.push(r);
            std::thread::sleep(Duration::from_millis(if viommu { 6 } else { 2 }));
        }
        stop.store(true, Ordering::Relaxed);
        (guest.join().expect("guest"), far.join().expect("far end"))
    });
    let (sent_to_a, sent_by_a) = (w_sent.load(Ordering::Relaxed), a_sent.load(Ordering::Relaxed));
    let last = reports.last().expect("reports").clone();
    println!(
        "{sent_to_a} frames wire->a, {sent_by_a} a->wire across 100 plugs; the device sent {} and received {}; \
         {} in-flight transmits drained; last plug {} us, unplug {} us",
        last.tx_frames,
        last.rx_frames,
        last.drained,
        last.last.as_ref().map_or(0, |h| h.plug_us),
        last.last.as_ref().map_or(0, |h| h.unplug_us)
    );
    assert!(sent_to_a > LEAST && sent_by_a > LEAST, "traffic flowed: {sent_to_a} and {sent_by_a}");
    in_order("wire -> a", &to_a, sent_to_a);
    in_order("a -> wire", &to_wire, sent_by_a);
    for (i, r) in reports.iter().enumerate() {
        let h = r.last.as_ref().expect("a hand-over report");
        assert_eq!(h.tier, if i % 2 == 0 { "l1" } else { "l2" });
        assert!(h.balanced, "unplug {i}: every descriptor the device took was completed once: {h:?}");
    }
    let plugs = reports.len() as u64;
    assert!(plugs >= 100 && plugs.is_multiple_of(2), "{plugs} plugs");
    assert_eq!((last.plugs, last.unplugs, last.refusals), (plugs, plugs + 1, 0));
    assert!(last.tx_frames > 0 && last.rx_frames > 0, "the device carried traffic while plugged: {last:?}");
    // The NIC's DMA wrote frames into a at both tiers (at Level 2 its pair's work is counted
    // while plugged only, so more than that is Level 1's).
    let dma = sw.nic("up").expect("nic").dma_packets - dma0;
    assert!(dma > 0, "the device wrote into a's ring while plugged");
    let s = port_stats(&sw, "a");
    let dropped = (s.tx.drop_no_buffer - s0.tx.drop_no_buffer, s.tx.drop_malformed - s0.tx.drop_malformed);
    assert_eq!(dropped, (0, 0), "nothing dropped on the way to a: {s:?}");
    if let Some(m0) = misses0 {
        let m = iotlb_info(&sw, "a");
        println!(
            "vIOMMU: {} misses asked, {} frames parked, {} invalidations",
            m.misses_sent - m0.misses_sent,
            m.rx_parked - m0.rx_parked,
            m.invalidations - m0.invalidations
        );
        assert!(
            m.misses_sent - m0.misses_sent > 50 && m.rx_parked > m0.rx_parked,
            "the DMA really missed: {m:?}"
        );
        assert_eq!((m.rx_miss_drops, m.tx_miss_timeouts, m.faults_not_mapped), (0, 0, 0), "{m:?}");
    }
}

/// Plugged at Level 2 behind a vIOMMU with every buffer unmapped: the device itself misses,
/// asks the frontend and waits, and every frame gets through in order, both ways.
#[test]
fn a_level_2_device_behind_a_viommu_asks_for_missing_translations_and_loses_nothing() {
    let dir = Scratch::new("accel-iommu");
    let wire = format!("accel-i{}", std::process::id());
    let (sw, end, mut fa, _fb) = setup_with(&dir, &wire, viommu_cfg());
    sw.accel_plug("a", "l2").expect("a guest behind a vIOMMU is plugged");
    for round in 0..3u64 {
        let m0 = iotlb_info(&sw, "a");
        let tx0 = sw.accel_status(Some("a")).unwrap()[0].tx_frames;
        for i in [0, 1] {
            assert_eq!(fa.iotlb_raw(unmap_bufs(&fa, i)).expect("invalidate"), 0);
        }
        // From the wire into a's unmapped buffers: parked by the device, in order.
        for k in 0..24 {
            assert_eq!(
                end.send([build_frame(A, WIRE, None, 60 + k * 50, round * 100 + k as u64).as_slice()]),
                1
            );
        }
        let got: Vec<u64> =
            fa.recv_frames(0, 24, Duration::from_secs(5)).iter().filter_map(|f| frame_seq(f)).collect();
        assert_eq!(got, (0..24).map(|k| round * 100 + k).collect::<Vec<_>>(), "round {round}: wire -> a");
        // From a's unmapped buffers to the wire: each chain waits for its translation.
        for k in 0..24u64 {
            e2e_tests::send(&mut fa, 0, &build_frame(WIRE, A, None, 100, round * 100 + k));
        }
        let on_wire: Vec<u64> = e2e_tests::from_wire_end(&end, Duration::from_millis(1500))
            .iter()
            .filter_map(|f| frame_seq(f))
            .collect();
        assert_eq!(on_wire, (0..24).map(|k| round * 100 + k).collect::<Vec<_>>(), "round {round}: a -> wire");
        let (m, st) = (iotlb_info(&sw, "a"), &sw.accel_status(Some("a")).unwrap()[0]);
        assert_eq!(st.tier.as_deref(), Some("l2"), "plugged all along: {st:?}");
        assert!(
            m.rx_parked > m0.rx_parked && m.misses_sent > m0.misses_sent,
            "round {round}: the device missed: {m:?}"
        );
        assert_eq!(st.tx_frames - tx0, 24, "the device sent a's frames: {st:?}");
        assert_eq!((m.rx_miss_drops, m.tx_miss_timeouts), (0, 0), "{m:?}");
    }
    let h = sw.accel_unplug("a").expect("unplug").last.expect("a hand-over");
    assert!(h.balanced, "{h:?}");
}

/// Frames from the wire's far end with source `WIRE` seen since the last call.
#[test]
fn a_plugged_guest_keeps_the_software_path_for_broadcast_and_other_guests_and_the_device_enforces_its_policy()
{
    use vswitch::policy::spoof::SpoofConfig;
    use vswitch::policy::PolicyConfig;
    let dir = Scratch::new("accel-paths");
    let wire = format!("accel-p{}", std::process::id());
    // pools=2: pool 0 is the host's, so the device has one queue pair for guests.
    let sw = start(
        &dir,
        &[format!("up=nic:wire:{wire},level=2,pools=2"), "a=SOCK:a.sock".into(), "b=SOCK:b.sock".into()],
    );
    let end = LinkEnd::attach(&wire).expect("the wire's far end");
    let mut fa = connect_default(&dir, "a");
    let mut fb = connect_default(&dir, "b");
    assert_eq!(end.send([hello(WIRE).as_slice()]), 1);
    e2e_tests::send(&mut fa, 0, &hello(A));
    e2e_tests::send(&mut fb, 0, &hello(B));
    assert!(wait_until(Duration::from_secs(5), || sw.nic("up").is_ok_and(|r| !r.bound.is_empty())));
    drain(&mut fa, Duration::from_millis(50));
    drain(&mut fb, Duration::from_millis(50));
    e2e_tests::from_wire_end(&end, Duration::from_millis(20));

    // Refusals say why, and leave the port on the software path.
    let err = |r: Result<AccelReport, vswitch::switch::SwitchError>| r.expect_err("refused").to_string();
    assert!(err(sw.accel_plug("up", "l2")).contains("is an uplink"));
    assert!(err(sw.accel_plug("a", "l3")).contains("no VF is given to it"));
    // One guest pool: a has it (Level 1, by default), b is on the software path.
    assert!(err(sw.accel_unplug("b")).contains("not plugged"));
    assert!(err(sw.accel_plug("a", "l1")).contains("already plugged"));
    sw.accel_plug("a", "l2").expect("plug a");
    assert!(err(sw.accel_plug("a", "l2")).contains("already plugged"));
    let no_pair = err(sw.accel_plug("b", "l2"));
    assert!(no_pair.contains("no free queue pair"), "{no_pair}");
    let st = sw.accel_status(Some("b")).unwrap();
    assert_eq!((st[0].tier.as_deref(), st[0].refusals), (None, 1), "{st:?}");
    assert!(st[0].last_refusal.as_deref().is_some_and(|w| w.contains("no free queue pair")));
    let no_pool = err(sw.accel_plug("b", "l1"));
    assert!(no_pool.contains("l1 NIC 'up' has no free queue pair"), "{no_pool}");

    // Plugged, a still gets the wire's broadcast and b's unicast (the software path hands
    // them to the device), and what a sends to b or to everyone takes the software path.
    assert_eq!(end.send([build_frame([0xff; 6], WIRE, None, 60, 1).as_slice()]), 1);
    e2e_tests::send(&mut fb, 0, &build_frame(A, B, None, 60, 2));
    let got = fa.recv_frames(0, 2, Duration::from_secs(5));
    // Two sources: either order.
    let mut seqs: Vec<_> = got.iter().filter_map(|f| frame_seq(f)).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, vec![1, 2], "broadcast from the wire and unicast from b");
    e2e_tests::send(&mut fa, 0, &build_frame(B, A, None, 60, 3));
    e2e_tests::send(&mut fa, 0, &build_frame([0xff; 6], A, None, 60, 4));
    e2e_tests::send(&mut fa, 0, &build_frame(WIRE, A, None, 60, 5));
    let got = fb.recv_frames(0, 3, Duration::from_secs(5));
    assert_eq!(
        got.iter().filter_map(|f| frame_seq(f)).collect::<Vec<_>>(),
        vec![1, 3, 4],
        "b: the wire's broadcast, a's unicast and broadcast"
    );
    let on_wire: Vec<_> = e2e_tests::from_wire_end(&end, Duration::from_millis(300))
        .iter()
        .filter_map(|f| frame_seq(f))
        .collect();
    assert_eq!(on_wire, vec![4, 5], "a's broadcast and its unicast for the wire");
    let st = &sw.accel_status(Some("a")).unwrap()[0];
    assert!(st.rx_frames >= 2 && st.tx_frames >= 3, "the device carried them: {st:?}");

    // One policy, two enforcers: a may only send from A. Plugged, the device drops a forged
    // source; unplugged, the software path drops the same frame.
    let spoof = SpoofConfig { macs: vec!["52:54:00:5a:00:0a".into()], ips: None };
    sw.set_policy("a", PolicyConfig { anti_spoof: Some(spoof), ..Default::default() }).expect("policy");
    let forged = |seq| build_frame(WIRE, [0x52, 0x54, 0, 0x5a, 0, 0x66], None, 60, seq);
    e2e_tests::send(&mut fa, 0, &forged(10));
    e2e_tests::send(&mut fa, 0, &build_frame(WIRE, A, None, 60, 11));
    let on_wire: Vec<_> = e2e_tests::from_wire_end(&end, Duration::from_millis(300))
        .iter()
        .filter_map(|f| frame_seq(f))
        .collect();
    assert_eq!(on_wire, vec![11], "the device stopped the forged frame");
    assert_eq!(sw.accel_status(Some("a")).unwrap()[0].spoofed, 1);
    let h = sw.accel_unplug("a").expect("unplug").last.expect("hand-over");
    assert!(h.balanced, "{h:?}");
    let before = sw.policy("a").unwrap().counters;
    e2e_tests::send(&mut fa, 0, &forged(12));
    e2e_tests::send(&mut fa, 0, &build_frame(WIRE, A, None, 60, 13));
    let on_wire: Vec<_> = e2e_tests::from_wire_end(&end, Duration::from_millis(300))
        .iter()
        .filter_map(|f| frame_seq(f))
        .collect();
    assert_eq!(on_wire, vec![13], "the software path stopped the same frame");
    assert_ne!(sw.policy("a").unwrap().counters, before, "counted by the software path's policy");

    // A guest that goes away while plugged leaves the device clean for the next one.
    sw.set_policy("a", PolicyConfig::default()).expect("policy off");
    sw.accel_plug("a", "l2").expect("plug a again");
    drop(fa);
    let freed =
        wait_until(Duration::from_secs(5), || sw.accel_status(Some("a")).is_ok_and(|s| s[0].tier.is_none()));
    assert!(freed, "a's disconnect handed its rings back: {:?}", sw.accel_status(Some("a")));
    sw.accel_plug("b", "l2").expect("b takes the freed queue pair");
    e2e_tests::send(&mut fb, 0, &build_frame(WIRE, B, None, 60, 20));
    let on_wire: Vec<_> = e2e_tests::from_wire_end(&end, Duration::from_millis(300))
        .iter()
        .filter_map(|f| frame_seq(f))
        .collect();
    assert_eq!(on_wire, vec![20]);
    assert!(sw.accel_unplug("b").unwrap().last.unwrap().balanced);
}

#[test]
fn a_port_that_asks_for_a_tier_in_its_configuration_is_plugged_whenever_its_rings_run() {
    let dir = Scratch::new("accel-config");
    let wire = format!("accel-c{}", std::process::id());
    let sw = start(
        &dir,
        &[
            format!("up=nic:wire:{wire},level=2,pools=4"),
            "a=SOCK:a.sock,accel=l2".into(),
            "b=SOCK:b.sock".into(),
        ],
    );
    let end = LinkEnd::attach(&wire).expect("the wire's far end");
    let plugged = |want: bool| {
        wait_until(Duration::from_secs(5), || {
            sw.accel_status(Some("a")).is_ok_and(|s| (s[0].tier.as_deref() == Some("l2")) == want)
        })
    };
    for round in 0..2 {
        let mut fa = connect_default(&dir, "a");
        assert!(plugged(true), "round {round}: plugged once its rings ran: {:?}", sw.accel_status(Some("a")));
        e2e_tests::send(&mut fa, 0, &build_frame(WIRE, A, None, 60, round));
        let on_wire: Vec<_> = e2e_tests::from_wire_end(&end, Duration::from_millis(300))
            .iter()
            .filter_map(|f| frame_seq(f))
            .collect();
        assert_eq!(on_wire, vec![round], "round {round}: a's frame reached the wire");
        drop(fa);
        assert!(plugged(false), "round {round}: its rings came back when it went away");
    }
    let st = &sw.accel_status(Some("a")).unwrap()[0];
    assert!(st.plugs >= 2 && st.refusals == 0, "{st:?}");
    // Unplugged by hand, it stays on the software path until plugged by hand.
    let _fa = connect_default(&dir, "a");
    assert!(plugged(true));
    sw.accel_unplug("a").expect("unplug");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        sw.accel_status(Some("a")).unwrap()[0].tier,
        None,
        "not plugged again behind the user's back, at any tier"
    );
    assert!(sw.nic("up").unwrap().bound.iter().all(|b| b.port != "a"), "the NIC unbound it");
}

#[test]
fn without_a_level_2_nic_a_port_asking_for_one_stays_at_level_1_and_says_why() {
    let dir = Scratch::new("accel-none");
    let wire = format!("accel-n{}", std::process::id());
    let sw = start(
        &dir,
        &[format!("up=nic:wire:{wire},level=1"), "a=SOCK:a.sock,accel=l2".into(), "b=SOCK:b.sock".into()],
    );
    let mut fa = connect_default(&dir, "a");
    let mut fb = connect_default(&dir, "b");
    let refused = wait_until(Duration::from_secs(5), || {
        sw.accel_status(Some("a"))
            .is_ok_and(|s| s[0].last_refusal.as_deref().is_some_and(|w| w.contains("level=2")))
    });
    assert!(refused, "{:?}", sw.accel_status(Some("a")));
    std::thread::sleep(Duration::from_millis(300));
    let st = &sw.accel_status(Some("a")).unwrap()[0];
    assert_eq!((st.tier.as_deref(), st.refusals), (Some("l1"), 1), "refused once, not every retry: {st:?}");
    assert!(
        sw.accel_plug("b", "l2").unwrap_err().to_string().contains("no Level 2 NIC"),
        "a hand plug says the same"
    );
    e2e_tests::send(&mut fa, 0, &build_frame(B, A, None, 60, 7));
    let got = fb.recv_frames(0, 1, Duration::from_secs(5));
    assert_eq!(
        got.iter().filter_map(|f| frame_seq(f)).collect::<Vec<_>>(),
        vec![7],
        "the software path serves a"
    );
}

/// A switch with a Level 2 NIC on an in-process wire (`accel-<tag><pid>`) and guest port `d`,
/// and DPDK's virtio-user (testpmd, macswap, MAC `mac`, vdev options `extra`) on `d`.
fn testpmd_behind_a_level2_nic(
    dir: &Scratch,
    tag: &str,
    mac: [u8; 6],
    extra: &str,
) -> (Switch, LinkEnd, e2e_tests::Proc) {
    let wire = format!("accel-{tag}{}", std::process::id());
    let sock = dir.path("d.sock");
    let sw = Switch::start(SwitchConfig {
        fdb_aging_secs: 300,
        ports: vec![
            PortConfig::parse(&format!("up=nic:wire:{wire},level=2,pools=4")).unwrap(),
            // Packed rings offered, for the frontend that asks (`packed_vq=1`).
            PortConfig::parse(&format!("d={},packed=on", sock.display())).unwrap(),
        ],
        // testpmd --no-huge hands over memfds it never seals.
        unsealed_memory: vswitch::UnsealedMemory::Guard,
        ..Default::default()
    })
    .expect("switch starts");
    let end = LinkEnd::attach(&wire).expect("the wire's far end");
    let prefix = format!("vsw-accel-{tag}{}", std::process::id());
    let mut cmd = std::process::Command::new(e2e_tests::testpmd());
    cmd.args(["--lcores", "0@1,1@1", "--main-lcore", "0", "--no-pci", "--no-huge", "-m", "1024"])
        .args(["--single-file-segments", &format!("--file-prefix={prefix}"), "--vdev"])
        .arg(format!(
            "net_virtio_user0,path={},queues=1,mac={}{extra}",
            sock.display(),
            e2e_tests::mac_str(mac)
        ))
        .args(["--", "--forward-mode=macswap", "--port-topology=loop", "--nb-cores=1", "--auto-start"])
        .args(["--stats-period", "1"]);
    let pmd = e2e_tests::Proc::spawn(cmd, &dir.path("testpmd.log"))
        .cleanup_dir(format!("/var/run/dpdk/{prefix}").into());
    (sw, end, pmd)
}

/// DPDK's virtio-user (testpmd, macswap: every frame goes back where it came from) as the
/// guest, plugged at Level 1 and Level 2 alternately and unplugged 100 times while the wire's
/// far end keeps a window of numbered frames in flight through it: each comes back exactly once
/// and in order, and every hand-over's ledger balances. A poll-mode driver uses its rings
/// unlike Linux (no interrupts, notifications off, its own batching).
#[test]
fn dpdk_virtio_user_plugged_at_l1_and_l2_alternately_echoes_every_frame_once_and_in_order() {
    const D: [u8; 6] = [0x52, 0x54, 0x00, 0x5a, 0x00, 0x0d];
    const WINDOW: u64 = 128;
    init_log();
    let dir = Scratch::new("accel-dpdk");
    let (sw, end, mut pmd) = testpmd_behind_a_level2_nic(&dir, "d", D, "");
    // Probes until testpmd echoes (frames before its rings run are lost, not late).
    let echo = |back: &mut Vec<Vec<u8>>| {
        end.recv(back, 256);
        back.drain(..).any(|f| f.len() > 24 && f[12..18] == WIRE && f[18..24] == D)
    };
    let mut back = Vec::new();
    let answered = wait_until(Duration::from_secs(30), || {
        end.send([build_frame(D, WIRE, None, 60, u64::MAX >> 1).as_slice()]);
        std::thread::sleep(Duration::from_millis(20));
        echo(&mut back)
    });
    assert!(answered, "testpmd never echoed: {}", pmd.log_text());
    std::thread::sleep(Duration::from_millis(100));
    echo(&mut back);
    let stop = AtomicBool::new(false);
    let (sent, got) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut reports: Vec<AccelReport> = Vec::new();
    let echoed = std::thread::scope(|s| {
        let far = s.spawn(|| {
            let (mut seqs, mut back) = (Vec::new(), Vec::new());
            let mut next = 0u64;
            let (t, mut heard) = (Instant::now(), Instant::now());
            while t.elapsed() < Duration::from_secs(90) {
                let done = stop.load(Ordering::Relaxed);
                while !done && next.saturating_sub(seqs.len() as u64) < WINDOW {
                    let f = build_frame(D, WIRE, None, 60, next);
                    if end.send([f.as_slice()]) != 1 {
                        break;
                    }
                    next += 1;
                    sent.store(next, Ordering::Relaxed);
                }
                if end.recv(&mut back, 256) > 0 {
                    for f in back.drain(..) {
                        if f.len() > 24 && f[12..18] == WIRE && f[18..24] == D {
                            seqs.extend(frame_seq(&f[12..]));
                        }
                    }
                    got.store(seqs.len() as u64, Ordering::Relaxed);
                    heard = Instant::now();
                } else if done && (seqs.len() as u64 >= next || heard.elapsed() > Duration::from_secs(2)) {
                    break;
                } else {
                    std::thread::yield_now();
                }
            }
            seqs
        });
        // testpmd answers and the NIC serves it at Level 1 (its MAC learned from the echoes).
        let ok = wait_until(Duration::from_secs(30), || {
            got.load(Ordering::Relaxed) > 1000
                && sw.nic("up").is_ok_and(|r| r.bound.iter().any(|b| b.port == "d" && !b.macs.is_empty()))
        });
        if !ok {
            stop.store(true, Ordering::Relaxed);
            panic!("testpmd did not echo ({} back): {}", got.load(Ordering::Relaxed), pmd.log_text());
        }
        sw.accel_unplug("d").expect("off Level 1");
        for i in 0..100 {
            let tier = if i % 2 == 0 { "l1" } else { "l2" };
            sw.accel_plug("d", tier).unwrap_or_else(|e| panic!("plug {i} ({tier}): {e}"));
            std::thread::sleep(Duration::from_millis(20));
            reports.push(sw.accel_unplug("d").unwrap_or_else(|e| panic!("unplug {i} ({tier}): {e}")));
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        far.join().expect("far end")
    });
    let log = pmd.stop(Duration::from_secs(5));
    let n = sent.load(Ordering::Relaxed);
    let last = reports.last().expect("reports").clone();
    println!(
        "{n} frames echoed by testpmd across 100 plugs; at Level 2 the device sent {} and received {}, drained {}",
        last.tx_frames, last.rx_frames, last.drained
    );
    assert!(n > 10_000, "traffic flowed: {n}\n{log}");
    in_order("wire -> testpmd -> wire", &echoed, n);
    for (i, r) in reports.iter().enumerate() {
        let h = r.last.as_ref().expect("a hand-over report");
        assert!(h.balanced, "unplug {i}: every descriptor the device took was completed once: {h:?}");
    }
    assert!(last.tx_frames > 0 && last.rx_frames > 0, "the device carried traffic at Level 2: {last:?}");
    assert_eq!(sw.nic("up").expect("nic").dma_faults, 0);
}

/// One policy, two enforcers, for source IPs and for the rate too; and a plugged guest's
/// receive buffers outside its memory are the device's DMA faults: nothing written, nobody else
/// disturbed, the hand-over still balanced.
#[test]
fn a_plugged_guest_is_held_to_its_memory_its_source_ip_and_its_rate_by_the_device_as_by_the_software_path() {
    use vswitch::policy::spoof::SpoofConfig;
    use vswitch::policy::PolicyConfig;
    let dir = Scratch::new("accel-held");
    let wire = format!("accel-h{}", std::process::id());
    let (sw, end, mut fa, mut fb) = setup_opts(&dir, &wire, ",nic-rate=8M", FrontendConfig::default());
    let on_wire = |wait| -> Vec<u64> {
        e2e_tests::from_wire_end(&end, wait).iter().filter_map(|f| frame_seq(f)).collect()
    };

    // Source IP: a may send from 198.18.0.1 only (build_frame's source).
    let spoof = SpoofConfig { macs: vec!["52:54:00:5a:00:0a".into()], ips: Some(vec!["198.18.0.1".into()]) };
    sw.set_policy("a", PolicyConfig { anti_spoof: Some(spoof), ..Default::default() }).expect("policy");
    let forged_ip = |seq| {
        let mut f = build_frame(WIRE, A, None, 60, seq);
        f[26..30].copy_from_slice(&[198, 18, 0, 9]);
        f[24..26].fill(0);
        let c = vswitch_bench::frame::ipv4_checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f
    };
    sw.accel_plug("a", "l2").expect("plug");
    e2e_tests::send(&mut fa, 0, &forged_ip(30));
    e2e_tests::send(&mut fa, 0, &build_frame(WIRE, A, None, 60, 31));
    assert_eq!(on_wire(Duration::from_millis(300)), vec![31], "the device stopped the forged source IP");
    assert_eq!(sw.accel_status(Some("a")).unwrap()[0].spoofed, 1);
    sw.accel_unplug("a").expect("unplug");
    let before = sw.policy("a").unwrap().counters.spoof_ip;
    e2e_tests::send(&mut fa, 0, &forged_ip(32));
    e2e_tests::send(&mut fa, 0, &build_frame(WIRE, A, None, 60, 33));
    assert_eq!(on_wire(Duration::from_millis(300)), vec![33], "the software path stopped the same frame");
    assert_eq!(sw.policy("a").unwrap().counters.spoof_ip, before + 1);
    sw.set_policy("a", PolicyConfig::default()).expect("policy off");

    // The rate (nic-rate=8M: 1 MB/s after a 65,600-byte burst), enforced by the NIC's pool
    // at Level 1 and by the device at Level 2: 300 frames of 1 KB take at least
    // (300 KB - burst) / 1 MB/s, whichever enforces it.
    for (k, tier) in ["l1", "l2"].into_iter().enumerate() {
        sw.accel_plug("a", tier).unwrap_or_else(|e| panic!("plug {tier}: {e}"));
        let base = 1000 * (k as u64 + 1);
        let t = Instant::now();
        let (mut got, mut back) = (Vec::new(), Vec::new());
        let (mut next, mut last) = (0u64, t);
        // Until all 300 arrived, or none for half a second after the last was sent.
        while t.elapsed() < Duration::from_secs(10)
            && (next < 300 || (got.len() < 300 && last.elapsed() < Duration::from_millis(500)))
        {
            fa.reclaim_tx(0);
            while next < 300 && fa.send(0, &build_frame(WIRE, A, None, 1000, base + next)) {
                next += 1;
            }
            if end.recv(&mut back, 256) > 0 {
                got.extend(back.drain(..).filter_map(|f| frame_seq(&f[12..])));
                last = Instant::now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let took = last - t;
        let bytes = got.len() as f64 * 1042.0;
        let least = Duration::from_secs_f64(((bytes - 65_600.0) / 1e6 * 0.8).max(0.0));
        println!(
            "{tier}: {} of 300 frames reached the wire in {took:?} (the rate allows no less than {least:?})",
            got.len()
        );
        assert!(took >= least, "{tier}: {} frames in {took:?}: faster than 8 Mbit/s", got.len());
        if tier == "l2" {
            let want: Vec<u64> = (0..300).map(|i| base + i).collect();
            assert_eq!(got, want, "the device holds over-rate frames back, losing none");
            assert!(sw.accel_status(Some("a")).unwrap()[0].shaped > 0, "the device's rate held some back");
        } else {
            assert!(got.windows(2).all(|w| w[0] < w[1]) && got.len() > 50, "in order: {}", got.len());
        }
        let r = sw.accel_unplug("a").expect("unplug");
        assert!(r.last.is_some_and(|h| h.balanced));
    }

    // Receive buffers past the end of a's memory, then at an address that wraps: the device's
    // DMA faults, writes nothing, and b's frames still arrive.
    sw.accel_plug("a", "l2").expect("plug");
    let (mem_base, mem_len) = fa.guest_region();
    let faults0 = sw.accel_status(Some("a")).unwrap()[0].rx_faults;
    for (round, bad) in [mem_base + mem_len, u64::MAX - 100].into_iter().enumerate() {
        fa.poison_rx(0, bad, 2048);
        let r = round as u64 * 100;
        for i in 0..10 {
            assert_eq!(end.send([build_frame(A, WIRE, None, 500, 500 + r + i).as_slice()]), 1);
            assert_eq!(end.send([build_frame(B, WIRE, None, 500, 600 + r + i).as_slice()]), 1);
        }
        let got: Vec<u64> =
            fb.recv_frames(0, 10, Duration::from_secs(5)).iter().filter_map(|f| frame_seq(f)).collect();
        assert_eq!(got, (0..10).map(|i| 600 + r + i).collect::<Vec<_>>(), "b gets its frames");
        let faulted = wait_until(Duration::from_secs(3), || {
            sw.accel_status(Some("a")).unwrap()[0].rx_faults >= faults0 + 10 * (round as u64 + 1)
        });
        assert!(faulted, "a's bad buffers are DMA faults: {:?}", sw.accel_status(Some("a")));
    }
    assert!(
        drain(&mut fa, Duration::from_millis(100)).iter().all(|f| f.len() < 12 || f[6..12] != WIRE),
        "nothing written into a"
    );
    let h = sw.accel_unplug("a").expect("unplug").last.expect("hand-over");
    assert!(h.balanced, "{h:?}");
}

/// A guest on packed rings (DPDK virtio-user `packed_vq=1`) is served by the software path;
/// a plug at Level 1 or Level 2 is refused saying so, and its traffic goes on.
#[test]
fn a_guest_on_packed_rings_is_refused_a_plug_and_stays_on_the_software_path() {
    const D: [u8; 6] = [0x52, 0x54, 0x00, 0x5a, 0x00, 0x0e];
    init_log();
    let dir = Scratch::new("accel-packed");
    let (sw, end, mut pmd) = testpmd_behind_a_level2_nic(&dir, "k", D, ",packed_vq=1");
    let mut back = Vec::new();
    let mut echoes = |seq: u64| {
        end.send([build_frame(D, WIRE, None, 60, seq).as_slice()]);
        std::thread::sleep(Duration::from_millis(20));
        end.recv(&mut back, 256);
        back.drain(..).any(|f| f.len() > 24 && f[12..18] == WIRE && f[18..24] == D)
    };
    assert!(wait_until(Duration::from_secs(30), || echoes(1)), "testpmd never echoed: {}", pmd.log_text());
    let features = e2e_tests::port_info(&sw, "d").device.features;
    assert!(features.iter().any(|f| f == "RING_PACKED"), "{features:?}");
    for tier in ["l1", "l2"] {
        let e = sw.accel_plug("d", tier).expect_err("a packed port is not plugged").to_string();
        assert!(e.contains("packed rings") && e.contains("software path"), "{tier}: {e}");
        assert_eq!(sw.accel_status(Some("d")).unwrap()[0].tier, None);
        assert!(wait_until(Duration::from_secs(5), || echoes(2)), "{tier}: the echo goes on");
    }
    let _ = pmd.stop(Duration::from_secs(5));
}
