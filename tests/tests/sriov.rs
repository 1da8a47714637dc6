//! Level 3: a modelled SR-IOV PF on an in-process wire, VFs given to guest ports with
//! `vf DEV attach N PORT` and their policy set with iproute2's words (`vf DEV N mac .. vlan ..`),
//! the device enforcing it (what QEMU's emulated igb does not: spoof checking, link state,
//! rates), unicast between VFs switched inside the device, guests without a VF on the software
//! path, and a VF unplugged and plugged again under traffic losing nothing. Needs no root.

use std::time::{Duration, Instant};

use e2e_tests::{connect_default, drain, Scratch};
use vswitch::control::VfReport;
use vswitch::switch::Switch;
use vswitch::uplink::link::LinkEnd;
use vswitch_bench::frame::{build_frame, frame_seq};
use vswitch_bench::frontend::Frontend;

const A: [u8; 6] = [0x52, 0x54, 0x00, 0x5b, 0x00, 0x0a];
const B: [u8; 6] = [0x52, 0x54, 0x00, 0x5b, 0x00, 0x0b];
const C: [u8; 6] = [0x52, 0x54, 0x00, 0x5b, 0x00, 0x0c];
const WIRE: [u8; 6] = [0x52, 0x54, 0x00, 0x5b, 0x00, 0xee];

fn vf(sw: &Switch, words: &str) -> Result<VfReport, String> {
    let w: Vec<String> = words.split_whitespace().map(String::from).collect();
    sw.vf_set("pf", &w).map_err(|e| e.to_string())
}

fn seqs(frames: &[Vec<u8>]) -> Vec<u64> {
    frames.iter().filter_map(|f| frame_seq(f)).collect()
}

/// A PF with 2 VFs on wire `wire`, guests a and b (given VFs 0 and 1) and c (none: more guests
/// than VFs), every guest known to the switch.
fn setup(dir: &Scratch, wire: &str) -> (Switch, LinkEnd, Frontend, Frontend, Frontend) {
    let m = e2e_tests::mac_str;
    let sw = e2e_tests::start_specs(
        dir,
        &[
            format!("pf=nic:wire:{wire},level=3,vfs=2"),
            format!("a=SOCK:a.sock,mac={}", m(A)),
            format!("b=SOCK:b.sock,mac={}", m(B)),
            format!("c=SOCK:c.sock,mac={}", m(C)),
        ],
    );
    let end = LinkEnd::attach(wire).expect("the wire's far end");
    let mut fa = connect_default(dir, "a");
    let mut fb = connect_default(dir, "b");
    let mut fc = connect_default(dir, "c");
    for (f, mac) in [(&mut fa, A), (&mut fb, B), (&mut fc, C)] {
        e2e_tests::send(f, 0, &build_frame([0xff; 6], mac, None, 18, 0));
    }
    assert_eq!(end.send([build_frame([0xff; 6], WIRE, None, 18, 0).as_slice()]), 1);
    // The switch has taken each guest's announcement before the VFs plug: one still in a's
    // ring would be the VF's to send, and counted among its frames.
    let taken = e2e_tests::wait_until(Duration::from_secs(5), || {
        ["a", "b", "c", "pf"].iter().all(|p| e2e_tests::port_stats(&sw, p).rx.packets >= 1)
    });
    assert!(taken, "the switch took the guests' and the wire's announcements");
    let r = sw.vf_attach("pf", 0, "a").expect("attach VF 0 to a");
    assert!(r.notes.is_empty(), "{:?}", r.notes);
    sw.vf_attach("pf", 1, "b").expect("attach VF 1 to b");
    for f in [&mut fa, &mut fb, &mut fc] {
        drain(f, Duration::from_millis(50));
    }
    e2e_tests::from_wire_end(&end, Duration::from_millis(20));
    (sw, end, fa, fb, fc)
}

#[test]
fn vfs_carry_unicast_between_them_in_the_device_and_the_software_path_reaches_the_rest() {
    let dir = Scratch::new("sriov-paths");
    let wire = format!("sriov-p{}", std::process::id());
    let (sw, end, mut fa, mut fb, mut fc) = setup(&dir, &wire);
    let r = sw.vf_show("pf").unwrap();
    assert_eq!(
        (r.num_vfs, r.ports.clone(), r.plugged.clone()),
        (2, vec![Some("a".into()), Some("b".into())], vec![true, true])
    );
    assert_eq!(sw.accel_status(Some("a")).unwrap()[0].tier.as_deref(), Some("l3"));
    assert_eq!(sw.accel_status(Some("c")).unwrap()[0].tier, None, "c has no VF: software path");
    // Without an administrative MAC each VF takes its guest's address.
    let s0 = e2e_tests::port_stats(&sw, "b");
    for i in 0..20 {
        e2e_tests::send(&mut fa, 0, &build_frame(B, A, None, 60, 100 + i));
    }
    let got = fb.recv_frames(0, 20, Duration::from_secs(5));
    assert_eq!(seqs(&got), (100..120).collect::<Vec<_>>(), "a -> b through the embedded switch");
    let r = sw.vf_show("pf").unwrap();
    assert_eq!(r.veb_frames, 20, "VF to VF inside the device: {r:?}");
    let (va, vb) = (r.vfs[0].stats.unwrap(), r.vfs[1].stats.unwrap());
    assert_eq!((va.tx_packets, vb.rx_packets), (20, 20), "{r:?}");
    let s1 = e2e_tests::port_stats(&sw, "b");
    assert_eq!(s1.tx.device_dma - s0.tx.device_dma, 20, "written by the device's DMA, no host copy");
    // To a guest without a VF, to the wire, and broadcast: out of the VEB.
    e2e_tests::send(&mut fa, 0, &build_frame(C, A, None, 60, 200));
    e2e_tests::send(&mut fa, 0, &build_frame(WIRE, A, None, 60, 201));
    e2e_tests::send(&mut fa, 0, &build_frame([0xff; 6], A, None, 60, 202));
    assert_eq!(seqs(&fc.recv_frames(0, 2, Duration::from_secs(5))), vec![200, 202]);
    assert_eq!(seqs(&fb.recv_frames(0, 1, Duration::from_secs(5))), vec![202]);
    assert_eq!(seqs(&e2e_tests::from_wire_end(&end, Duration::from_millis(300))), vec![201, 202]);
    // From the software guest and the wire to a VF.
    e2e_tests::send(&mut fc, 0, &build_frame(A, C, None, 60, 300));
    assert_eq!(end.send([build_frame(A, WIRE, None, 60, 301).as_slice()]), 1);
    let mut got = seqs(&fa.recv_frames(0, 2, Duration::from_secs(5)));
    got.sort_unstable();
    assert_eq!(got, vec![300, 301]);
    assert_eq!(sw.vf_show("pf").unwrap().veb_frames, 20, "none of these crossed the VEB");

    // A guest that goes gives its VF back; a PF that goes takes its VFs back from their guests,
    // which stay on the software path.
    drop(fb);
    sw.del_port("b").unwrap();
    let r = sw.vf_show("pf").unwrap();
    assert_eq!((r.ports[1].as_deref(), r.veb_frames), (None, 20), "{r:?}");
    assert_eq!(r.vfs[1].stats.unwrap().rx_packets, 21, "counts of an ended plug are kept");
    sw.del_port("pf").unwrap();
    assert_eq!(sw.accel_status(Some("a")).unwrap()[0].tier, None);
    e2e_tests::send(&mut fa, 0, &build_frame(C, A, None, 60, 400));
    assert_eq!(seqs(&fc.recv_frames(0, 1, Duration::from_secs(5))), vec![400]);
}

#[test]
fn the_device_enforces_vf_policy_set_with_iproute2s_words() {
    let dir = Scratch::new("sriov-policy");
    let wire = format!("sriov-e{}", std::process::id());
    let (sw, end, mut fa, mut fb, _fc) = setup(&dir, &wire);
    let forged = |seq| build_frame(WIRE, [0x52, 0x54, 0, 0x5b, 0, 0x66], None, 60, seq);

    // spoofchk: on by default (the VF's address is a's), off lets a forged source through.
    e2e_tests::send(&mut fa, 0, &forged(1));
    e2e_tests::send(&mut fa, 0, &build_frame(WIRE, A, None, 60, 2));
    assert_eq!(seqs(&e2e_tests::from_wire_end(&end, Duration::from_millis(300))), vec![2]);
    assert_eq!(sw.vf_show("pf").unwrap().vfs[0].stats.unwrap().tx_dropped, 1);
    vf(&sw, "0 spoofchk off").unwrap();
    e2e_tests::send(&mut fa, 0, &forged(3));
    assert_eq!(seqs(&e2e_tests::from_wire_end(&end, Duration::from_millis(300))), vec![3]);
    vf(&sw, "0 spoofchk on").unwrap();

    // A port VLAN: the device tags what a sends (priority 5), takes only that VLAN for it and
    // strips the tag.
    vf(&sw, "0 vlan 42 qos 5").unwrap();
    e2e_tests::send(&mut fa, 0, &build_frame(WIRE, A, None, 60, 10));
    let got = e2e_tests::from_wire_end(&end, Duration::from_millis(300));
    assert_eq!(seqs(&got), vec![10]);
    assert_eq!(got[0][12..16], [0x81, 0x00, 0xa0, 42], "tagged 802.1Q, PCP 5, VID 42");
    // a's own tag behind a port VLAN is a spoofed VLAN.
    e2e_tests::send(&mut fa, 0, &build_frame(WIRE, A, Some(7), 60, 11));
    assert!(seqs(&e2e_tests::from_wire_end(&end, Duration::from_millis(200))).is_empty());
    end.send([build_frame(A, WIRE, Some(42), 60, 12).as_slice()]);
    end.send([build_frame(A, WIRE, Some(43), 60, 13).as_slice()]);
    end.send([build_frame(A, WIRE, None, 60, 14).as_slice()]);
    let got = drain(&mut fa, Duration::from_millis(200));
    assert_eq!(seqs(&got), vec![12], "only VLAN 42 reaches a");
    assert_eq!(got[0][12..14], [0x08, 0x00], "and untagged");
    // b is on no VLAN: the VEB does not carry a's frames to it now.
    e2e_tests::send(&mut fa, 0, &build_frame(B, A, None, 60, 15));
    assert!(drain(&mut fb, Duration::from_millis(200)).is_empty(), "VLAN 42 does not reach b");
    vf(&sw, "1 vlan 42").unwrap();
    e2e_tests::send(&mut fa, 0, &build_frame(B, A, None, 60, 16));
    assert_eq!(seqs(&fb.recv_frames(0, 1, Duration::from_secs(5))), vec![16], "both on VLAN 42");
    // (Frame 15, unknown in VLAN 42, was flooded to the wire by the software path.)
    assert_eq!(seqs(&e2e_tests::from_wire_end(&end, Duration::from_millis(100))), vec![15]);
    vf(&sw, "0 vlan 0").unwrap();
    vf(&sw, "1 vlan 0").unwrap();

    // state disable: nothing in or out; auto: back.
    vf(&sw, "0 state disable").unwrap();
    e2e_tests::send(&mut fa, 0, &build_frame(WIRE, A, None, 60, 20));
    end.send([build_frame(A, WIRE, None, 60, 21).as_slice()]);
    assert_eq!(seqs(&e2e_tests::from_wire_end(&end, Duration::from_millis(200))), Vec::<u64>::new());
    assert!(drain(&mut fa, Duration::from_millis(100)).is_empty());
    vf(&sw, "0 state auto").unwrap();
    e2e_tests::send(&mut fa, 0, &build_frame(WIRE, A, None, 60, 22));
    assert_eq!(seqs(&e2e_tests::from_wire_end(&end, Duration::from_millis(300))), vec![22]);

    // max_tx_rate: a 1 Mbit/s cap holds a's frames in its ring (back-pressure, not loss).
    vf(&sw, "0 max_tx_rate 1").unwrap();
    let frames = 120u64;
    let t = Instant::now();
    for i in 0..frames {
        e2e_tests::send(&mut fa, 0, &build_frame(WIRE, A, None, 1000, 1000 + i));
    }
    let mut got = Vec::new();
    while got.len() < frames as usize && t.elapsed() < Duration::from_secs(10) {
        got.extend(seqs(&e2e_tests::from_wire_end(&end, Duration::from_millis(50))));
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(got, (1000..1000 + frames).collect::<Vec<_>>(), "every frame, in order");
    // 120 x 1042 bytes at 1 Mbit/s after a 65,600-byte burst: at least ~0.48 s.
    assert!(secs > 0.4, "{frames} frames of 1 KB at 1 Mbit/s took only {secs:.2} s");
    vf(&sw, "0 max_tx_rate 0").unwrap();

    // Refusals: the device's reason in iproute2's words; nothing changes.
    let e = vf(&sw, "0 mac 02:00:00:00:00:01 max_tx_rate 20000").unwrap_err();
    assert!(e.contains("RTNETLINK answers: Invalid argument") && e.contains("link speed"), "{e}");
    assert_eq!(sw.vf_show("pf").unwrap().vfs[0].mac, [0; 6]);
    let e = vf(&sw, "5 trust on").unwrap_err();
    assert!(e.contains("VF 5 does not exist"), "{e}");
    let e = vf(&sw, "0 vlan 5000").unwrap_err();
    assert!(e.to_lowercase().contains("vlan"), "{e}");
    assert!(sw
        .vf_set("a", &["0".into(), "trust".into(), "on".into()])
        .unwrap_err()
        .to_string()
        .contains("not a Level 3 NIC"));

    // An administrative MAC other than the guest's: an untrusted VF keeps it, so the guest's
    // frames are spoofed; `trust on` lets the guest's driver have its own.
    sw.vf_detach("pf", 0).unwrap();
    vf(&sw, "0 mac 02:00:00:00:00:01").unwrap();
    let r = sw.vf_attach("pf", 0, "a").unwrap();
    assert!(r.notes.iter().any(|n| n.contains("not trusted")), "{:?}", r.notes);
    e2e_tests::send(&mut fa, 0, &build_frame(WIRE, A, None, 60, 30));
    assert!(e2e_tests::from_wire_end(&end, Duration::from_millis(200)).is_empty());
    sw.vf_detach("pf", 0).unwrap();
    vf(&sw, "0 trust on").unwrap();
    let r = sw.vf_attach("pf", 0, "a").unwrap();
    assert!(r.notes.is_empty(), "{:?}", r.notes);
    assert_eq!(r.vfs[0].mac, A, "the trusted VF took its guest's address");
    e2e_tests::send(&mut fa, 0, &build_frame(WIRE, A, None, 60, 31));
    assert_eq!(seqs(&e2e_tests::from_wire_end(&end, Duration::from_millis(300))), vec![31]);
}

#[test]
fn a_vf_unplugged_and_plugged_again_under_traffic_between_two_vfs_loses_nothing() {
    let dir = Scratch::new("sriov-loop");
    let wire = format!("sriov-l{}", std::process::id());
    let (sw, _end, mut fa, mut fb, _fc) = setup(&dir, &wire);
    let total = 4000u64;
    let mut got = Vec::new();
    let (mut next, mut plugs, mut last) = (0u64, 0u32, 0u64);
    let t = Instant::now();
    while (got.len() as u64) < total && t.elapsed() < Duration::from_secs(60) {
        fa.reclaim_tx(0);
        // At most 48 in flight: below every ring, so only a hand-over could lose one.
        while next < total && next - got.len() as u64 <= 48 && fa.send(0, &build_frame(B, A, None, 60, next))
        {
            next += 1;
        }
        fb.poll_rx(0, |f| got.extend(frame_seq(f)));
        if next >= last + 100 && plugs < 40 {
            last = next;
            let port = if plugs % 2 == 0 { "a" } else { "b" };
            let h = sw.accel_unplug(port).expect("unplug").last.expect("a hand-over");
            assert!(h.balanced && h.tier == "l3", "{h:?}");
            sw.accel_plug(port, "l3").expect("plug back into its VF");
            plugs += 1;
        }
    }
    assert!(plugs >= 20, "only {plugs} hand-overs in the run");
    let dups = got.windows(2).filter(|w| w[1] <= w[0]).count();
    assert_eq!((got.len() as u64, dups), (total, 0), "every frame once and in order");
    let r = sw.vf_show("pf").unwrap();
    assert!(r.veb_frames > 0 && r.vfs[0].stats.unwrap().tx_packets >= r.veb_frames, "{r:?}");
}
