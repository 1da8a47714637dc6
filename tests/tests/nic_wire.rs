//! Two switches cabled back to back: each has a NIC model (`nic:wire:NAME`) on the two ends
//! of one in-process wire, and guests behind it. A wire carries plain frames, so the sending
//! device segments a guest's TSO frames and completes its partial checksums, and the receiving
//! device steers, coalesces and DMAs them into the receiving guests' rings. Needs no root.

use std::time::Duration;

use e2e_tests::{connect, connect_default, drain, port_stats, wait_until, Scratch};
use nic_models::engines::{csum, layout};
use vswitch::control::NicReport;
use vswitch::switch::Switch;
use vswitch::uplink::link::LinkEnd;
use vswitch_bench::frame::{build_frame, build_tcp_segment};
use vswitch_bench::frontend::FrontendConfig;

const A: [u8; 6] = [0x52, 0x54, 0x00, 0x57, 0x00, 0x0a];
const B: [u8; 6] = [0x52, 0x54, 0x00, 0x57, 0x00, 0x0b];
const C: [u8; 6] = [0x52, 0x54, 0x00, 0x57, 0x00, 0x0c];
const WIRE: [u8; 6] = [0x52, 0x54, 0x00, 0x57, 0x00, 0xee];

fn start(dir: &Scratch, specs: &[&str]) -> Switch {
    e2e_tests::start_specs(dir, specs)
}

fn hello(mac: [u8; 6]) -> Vec<u8> {
    build_frame([0xff; 6], mac, None, 18, 0)
}

/// The TCP payload bytes of `frames`, in order.
fn tcp_payload(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        let l = layout(f).expect("a TCP frame");
        let end = 14 + u16::from_be_bytes([f[16], f[17]]) as usize;
        out.extend_from_slice(&f[l.payload..end]);
    }
    out
}

/// A virtio-net header asking for TSO over IPv4 at `mss` (checksum at TCP + 16).
fn tso_hdr(mss: u16) -> [u8; 10] {
    let mut h = [0u8; 10];
    h[0] = 1; // NEEDS_CSUM
    h[1] = 1; // GSO_TCPV4
    h[2..4].copy_from_slice(&54u16.to_le_bytes());
    h[4..6].copy_from_slice(&mss.to_le_bytes());
    h[6..8].copy_from_slice(&34u16.to_le_bytes());
    h[8..10].copy_from_slice(&16u16.to_le_bytes());
    h
}

fn wait_nic(sw: &Switch, mut pred: impl FnMut(&NicReport) -> bool) -> NicReport {
    let mut r = NicReport::default();
    let ok = wait_until(Duration::from_secs(5), || {
        r = sw.nic("up").expect("ctl nic");
        pred(&r)
    });
    assert!(ok, "{r:?}");
    r
}

#[test]
fn two_switches_back_to_back_segment_checksum_steer_and_coalesce_in_their_devices() {
    let (d1, d2) = (Scratch::new("wire-1"), Scratch::new("wire-2"));
    let sw1 = start(&d1, &["up=nic:wire:b2b-main", "a=SOCK:a.sock"]);
    let sw2 = start(&d2, &["up=nic:wire:b2b-main", "b=SOCK:b.sock", "c=SOCK:c.sock"]);
    // a sends TSO frames and partial checksums; b takes them whole; c takes neither.
    let big = FrontendConfig {
        host_offloads: true,
        ring_size: 64,
        tx_buf_size: 16 << 10,
        mem_size: 32 << 20,
        ..FrontendConfig::default()
    };
    let mut fa = connect(&d1, "a", big);
    let mut fb = connect(&d2, "b", FrontendConfig { guest_offloads: true, ..FrontendConfig::default() });
    let mut fc = connect_default(&d2, "c");
    assert_eq!(sw1.nic("up").unwrap().wire, "wire:b2b-main");
    // Each guest's hello crosses the wire (broadcast: the software path at the far end).
    for (f, m) in [(&mut fb, B), (&mut fc, C), (&mut fa, A)] {
        e2e_tests::send(f, 0, &hello(m));
    }
    assert!(
        wait_until(Duration::from_secs(5), || fa.recv_frames(0, 8, Duration::from_millis(20)).len() >= 2
            || port_stats(&sw1, "a").tx.packets >= 2),
        "b's and c's hellos reached a over the wire"
    );
    wait_nic(&sw2, |r| r.bound.iter().filter(|b| !b.macs.is_empty()).count() == 2);
    drain(&mut fb, Duration::from_millis(100));
    drain(&mut fc, Duration::from_millis(100));
    let before_b = port_stats(&sw2, "b").tx;
    let before_tx = sw1.nic("up").unwrap();

    // 1. Unicast from a to b: out of sw1's device onto the wire, into b's ring by sw2's DMA.
    let uni: Vec<Vec<u8>> = (0..20).map(|i| build_frame(B, A, None, 300, i)).collect();
    for f in &uni {
        e2e_tests::send(&mut fa, 0, f);
    }
    let mut got = Vec::new();
    wait_until(Duration::from_secs(5), || {
        got.extend(fb.recv_frames(0, 32, Duration::from_millis(20)));
        got.len() >= 20
    });
    assert_eq!(got, uni, "b gets a's unicast exactly and in order");
    let s = port_stats(&sw2, "b").tx;
    assert_eq!(s.device_dma - before_b.device_dma, 20, "sw2's device DMAed them: {s:?}");
    assert_eq!(s.copies, before_b.copies, "sw2's CPU copied none");
    // sw1's device read them out of a's memory: its transmit work is counted as device work.
    let r = wait_nic(&sw1, |r| r.dma_packets - before_tx.dma_packets == 20);
    assert!(r.desc_fetches - before_tx.desc_fetches >= 20, "{r:?}");
    assert!(r.dma_read_bytes - before_tx.dma_read_bytes >= 20 * 342, "{r:?}");
    assert!(r.device_ticks > before_tx.device_ticks && r.tlps > before_tx.tlps, "{r:?}");
    assert!(
        drain(&mut fc, Duration::from_millis(50)).iter().all(|f| f[..6] != B),
        "c saw none of b's unicast"
    );

    // 2. A partial checksum: sw1's device completes it on the way out.
    let mut f = build_frame(B, A, None, 200, 77);
    let l = layout(&f).unwrap();
    let udp_len = f.len() - l.l4;
    let ps = csum::fold(csum::pseudo(&f, &l, udp_len));
    f[l.l4 + 6..l.l4 + 8].copy_from_slice(&ps.to_be_bytes());
    let mut h = [0u8; 10];
    h[0] = 1;
    h[6..8].copy_from_slice(&(l.l4 as u16).to_le_bytes());
    h[8..10].copy_from_slice(&6u16.to_le_bytes());
    assert!(fa.send_offloaded(0, &h, &f));
    let got = fb.recv_frames(0, 1, Duration::from_secs(5));
    assert_eq!(got.len(), 1);
    assert!(csum::verify(&got[0]).data_valid(), "the UDP checksum arrived complete");
    assert_eq!(&got[0][l.payload..], &f[l.payload..]);
    wait_nic(&sw1, |r| r.csum_inserted == 1);

    // 3. TSO frames of 10,000 bytes at MSS 1000 to b and to c: sw1's device cuts each into
    // 10 segments; sw2 coalesces what arrives together (LRO) and b takes it whole, while c
    // gets segments cut back by the software path. Both get every byte in order.
    let to_b = build_tcp_segment(B, A, 5000, 9, 10_000);
    let to_c = build_tcp_segment(C, A, 90_000, 19, 10_000);
    assert!(fa.send_offloaded(0, &tso_hdr(1000), &to_b));
    assert!(fa.send_offloaded(0, &tso_hdr(1000), &to_c));
    let r1 = wait_nic(&sw1, |r| r.tso_frames == 2);
    assert_eq!(r1.tso_segments, 20, "{r1:?}");
    let (mut gb, mut gc) = (Vec::new(), Vec::new());
    wait_until(Duration::from_secs(5), || {
        gb.extend(fb.recv_frames(0, 16, Duration::from_millis(20)));
        gc.extend(fc.recv_frames(0, 16, Duration::from_millis(20)));
        tcp_payload(&gb).len() >= 10_000 && tcp_payload(&gc).len() >= 10_000
    });
    assert_eq!(tcp_payload(&gb), to_b[54..].to_vec(), "b's stream, byte for byte");
    assert_eq!(tcp_payload(&gc), to_c[54..].to_vec(), "c's stream, byte for byte");
    assert!(gc.iter().all(|f| f.len() <= 1054 && csum::verify(f).data_valid()), "c got checked MSS segments");
    let r2 = sw2.nic("up").unwrap();
    assert_eq!(r2.dma_faults, 0);
    println!(
        "b got {} frame(s) for 10 segments; sw2 LRO merged {} into {}; sw2 fallbacks {}",
        gb.len(),
        r2.lro_merged,
        r2.lro_coalesced,
        r2.fallbacks
    );

    // 4. Unplugged: with sw2 gone, sw1's device drops what it sends, counted; nothing hangs.
    drop(fb);
    drop(fc);
    drop(sw2);
    let before = port_stats(&sw1, "up").tx;
    for i in 0..5 {
        e2e_tests::send(&mut fa, 0, &build_frame(B, A, None, 100, 1000 + i));
    }
    assert!(
        wait_until(Duration::from_secs(5), || {
            let s = port_stats(&sw1, "up").tx;
            s.drop_no_buffer - before.drop_no_buffer >= 5
        }),
        "the frames to an unplugged wire are counted as dropped: {:?}",
        port_stats(&sw1, "up").tx
    );
    // A new far end takes the freed end of the wire.
    let sw3 = start(&d2, &["up=nic:wire:b2b-main"]);
    assert_eq!(sw3.nic("up").unwrap().wire, "wire:b2b-main");
}

#[test]
fn a_guests_own_nic_rate_shapes_only_its_pool_on_the_device() {
    let d = Scratch::new("wire-rate");
    let sw = start(&d, &["up=nic:wire:rate-main", "a=SOCK:a.sock,nic-rate=2M,nic-weight=3", "b=SOCK:b.sock"]);
    let far = LinkEnd::attach("rate-main").expect("the wire's free end");
    let (mut fa, mut fb) = (connect_default(&d, "a"), connect_default(&d, "b"));
    e2e_tests::send(&mut fa, 0, &hello(A));
    e2e_tests::send(&mut fb, 0, &hello(B));
    let r = wait_nic(&sw, |r| r.bound.iter().filter(|b| !b.macs.is_empty()).count() == 2);
    let tx = |p: &str| r.bound.iter().find(|b| b.port == p).map(|b| (b.tx_rate, b.tx_weight));
    assert_eq!(tx("a"), Some((Some(2_000_000), 3)), "{r:?}");
    assert_eq!(tx("b"), Some((None, 1)));
    // The wire's far end says hello, so the guests' frames to it are unicast to the uplink.
    assert_eq!(far.send([hello(WIRE).as_slice()]), 1);
    wait_until(Duration::from_secs(2), || port_stats(&sw, "a").tx.packets >= 1);
    let mut back = Vec::new();
    while far.recv(&mut back, 64) > 0 {}
    back.clear();
    // a sends 200 KB (its bucket holds 64 KiB), then b 50 frames.
    let t0 = std::time::Instant::now();
    for i in 0..200 {
        e2e_tests::send(&mut fa, 0, &build_frame(WIRE, A, None, 1000, i));
    }
    for i in 0..50 {
        e2e_tests::send(&mut fb, 0, &build_frame(WIRE, B, None, 1000, i));
    }
    let (mut last_a, mut last_b, mut na, mut nb) = (Duration::ZERO, Duration::ZERO, 0, 0);
    wait_until(Duration::from_secs(5), || {
        far.wait(Duration::from_millis(10));
        let mut got = Vec::new();
        far.recv(&mut got, 256);
        for f in &got {
            match &f[12 + 6..12 + 12] {
                s if s == A => (na, last_a) = (na + 1, t0.elapsed()),
                s if s == B => (nb, last_b) = (nb + 1, t0.elapsed()),
                _ => {}
            }
        }
        far.recycle(got);
        na == 200 && nb == 50
    });
    assert_eq!((na, nb), (200, 50), "nothing lost");
    println!("a's last frame after {last_a:?}, b's after {last_b:?}");
    // (200 × 1,042 bytes − 65,600) × 8 / 2 Mbit/s ≈ 0.57 s for a; b is not held behind it.
    assert!(last_a >= Duration::from_millis(400), "a's pool is shaped to 2 Mbit/s: {last_a:?}");
    assert!(last_b < last_a / 2, "b's frames did not wait for a's: {last_b:?} vs {last_a:?}");
}
