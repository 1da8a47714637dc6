//! Per-port policy end to end, with in-process frontends: shaping and policing deliver their
//! rate under overload without touching other ports, rates change at run time on a live
//! connection, and spoofed frames are dropped before any copy and counted by reason.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use e2e_tests::{
    assert_one_copy_each, connect_default, drain, exchange, find, mac, mac_str, port_info, recv_n, send,
    start_switch, wait_stats, wait_until, Scratch, BCAST,
};
use vswitch::control::PolicyReport;
use vswitch::policy::spoof::SpoofConfig;
use vswitch::policy::{BitRate, PolicerConfig, PolicyConfig, ShaperConfig};
use vswitch::Switch;
use vswitch_bench::frame::build_frame;
use vswitch_bench::frontend::Frontend;

const T: Duration = Duration::from_secs(5);
/// Frame size used for rate tests (bytes on the wire, without FCS).
const SIZE: usize = 1000;

fn set_policy(sw: &Switch, name: &str, policy: PolicyConfig) -> PolicyReport {
    sw.set_policy(name, policy).expect("policy-set accepted")
}

fn policy(sw: &Switch, name: &str) -> PolicyReport {
    sw.policy(name).expect("policy report")
}

fn shaper(rate: u64, queue: u32) -> ShaperConfig {
    ShaperConfig { rate: BitRate(rate), burst: None, queue: Some(queue), pps: None }
}

fn policer(rate: u64) -> PolicerConfig {
    PolicerConfig { rate: BitRate(rate), burst: None, excess_burst: None, excess_rate: None, pps: None }
}

/// Lets each side learn the other's MAC.
fn learn(x: &mut Frontend, mx: [u8; 6], y: &mut Frontend, my: [u8; 6]) {
    send(x, 0, &build_frame(BCAST, mx, None, 60, 0));
    assert_eq!(recv_n(y, 1, T).len(), 1, "{} heard {}", mac_str(my), mac_str(mx));
    send(y, 0, &build_frame(BCAST, my, None, 60, 0));
    assert_eq!(recv_n(x, 1, T).len(), 1, "{} heard {}", mac_str(mx), mac_str(my));
}

/// Sends SIZE-byte frames src → dst at `pps` (paced by the clock, so the test thread does not
/// spin) until `stop`; returns frames sent. Frames a full ring refuses are skipped.
fn pace(fe: &mut Frontend, src: [u8; 6], dst: [u8; 6], pps: u64, stop: &AtomicBool) -> u64 {
    let t0 = Instant::now();
    let mut sent = 0u64;
    let mut offered = 0u64;
    let frame = build_frame(dst, src, None, SIZE - 42, 1);
    while !stop.load(Ordering::Relaxed) {
        let due = (t0.elapsed().as_secs_f64() * pps as f64) as u64;
        while offered < due {
            offered += 1;
            if fe.enqueue_tx(0, &frame) {
                sent += 1;
            }
        }
        fe.flush_tx(0);
        fe.reclaim_tx(0);
        std::thread::sleep(Duration::from_micros(500));
    }
    sent
}

/// Reads `fe` until `stop`; returns (bytes, frames) received in the window [from, to) after
/// the start, and frames in all.
fn measure(fe: &mut Frontend, from: Duration, to: Duration, stop: &AtomicBool) -> (u64, u64, u64) {
    let t0 = Instant::now();
    let (mut bytes, mut frames, mut all) = (0u64, 0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let now = t0.elapsed();
        fe.poll_rx(0, |f| {
            all += 1;
            if now >= from && now < to {
                bytes += f.len() as u64;
                frames += 1;
            }
        });
        std::thread::sleep(Duration::from_micros(300));
    }
    (bytes, frames, all)
}

/// Rate seen by `rx` over [from, to) while `tx` sends to it at `pps`.
fn rate_through(
    tx: &mut Frontend,
    mtx: [u8; 6],
    rx: &mut Frontend,
    mrx: [u8; 6],
    pps: u64,
    from: Duration,
    to: Duration,
) -> f64 {
    let stop = AtomicBool::new(false);
    let (bytes, _, _) = std::thread::scope(|s| {
        let stop = &stop;
        let h = s.spawn(move || measure(rx, from, to, stop));
        let sender = s.spawn(move || pace(tx, mtx, mrx, pps, stop));
        std::thread::sleep(to + Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        sender.join().unwrap();
        h.join().unwrap()
    });
    bytes as f64 * 8.0 / (to - from).as_secs_f64()
}

fn assert_near(what: &str, got: f64, want: f64, tol: f64) {
    let err = got / want - 1.0;
    eprintln!("{what}: {:.2} Mbit/s, want {:.2} ({:+.2}%)", got / 1e6, want / 1e6, err * 100.0);
    assert!(
        err.abs() <= tol,
        "{what}: {:.3} Mbit/s is not within {}% of {:.3}",
        got / 1e6,
        tol * 100.0,
        want / 1e6
    );
}

#[test]
fn test_shaped_port_gets_its_rate_under_overload_and_others_are_unaffected() {
    let dir = Scratch::new("policy-shape");
    let sw = start_switch(&dir, &["a", "b,shape=20M", "c", "d"]);
    let (mut fa, mut fb, mut fc, mut fd) = (
        connect_default(&dir, "a"),
        connect_default(&dir, "b"),
        connect_default(&dir, "c"),
        connect_default(&dir, "d"),
    );
    let (ma, mb, mc, md) = (mac(0xa), mac(0xb), mac(0xc), mac(0xd));
    learn(&mut fa, ma, &mut fb, mb);
    learn(&mut fc, mc, &mut fd, md);
    for fe in [&mut fa, &mut fb, &mut fc, &mut fd] {
        drain(fe, Duration::from_millis(30)); // the other pair's broadcasts
    }
    set_policy(&sw, "b", PolicyConfig { egress: Some(shaper(20_000_000, 64)), ..Default::default() });
    let s0 = sw.stats().unwrap();

    // a → b at 4x b's rate (10k frames/s of 1000 B = 80 Mbit/s); c → d at 5k frames/s alongside.
    let stop = AtomicBool::new(false);
    let (b_bytes, c_sent, d_got, a_sent) = std::thread::scope(|s| {
        let stop = &stop;
        let (fa, fb, fc, fd) = (&mut fa, &mut fb, &mut fc, &mut fd);
        let rb = s.spawn(move || measure(fb, Duration::from_millis(500), Duration::from_millis(2500), stop));
        let rd = s.spawn(move || measure(fd, Duration::ZERO, Duration::from_secs(3600), stop));
        let sa = s.spawn(move || pace(fa, ma, mb, 10_000, stop));
        let sc = s.spawn(move || pace(fc, mc, md, 5_000, stop));
        std::thread::sleep(Duration::from_millis(2600));
        stop.store(true, Ordering::Relaxed);
        let a_sent = sa.join().unwrap();
        let c_sent = sc.join().unwrap();
        let (b_bytes, _, _) = rb.join().unwrap();
        let (_, _, d_all) = rd.join().unwrap();
        (b_bytes, c_sent, d_all, a_sent)
    });
    let d_got = d_got + drain(&mut fd, Duration::from_millis(50)).len() as u64;
    assert_near("b (shaped to 20 Mbit/s)", b_bytes as f64 * 8.0 / 2.0, 20e6, 0.05);
    assert_eq!(d_got, c_sent, "the unshaped pair lost nothing");
    // The sender was never held up: every descriptor came back, and what b did not get was
    // dropped by the shaper before any copy.
    assert!(wait_until(T, || fa.tx_completed(0) == a_sent + 1), "a's buffers all returned");
    let st = wait_stats(&sw, T, |s| find(s, "a").rx.packets - find(&s0, "a").rx.packets == a_sent);
    let (a, b) = (find(&st, "a"), find(&st, "b"));
    let (a0, b0) = (find(&s0, "a"), find(&s0, "b"));
    assert!(b.policy.shaped_dropped > 0 && b.policy.shaped_held > 0, "{:?}", b.policy);
    assert_eq!(b.tx.drop_policy, b.policy.shaped_dropped);
    let b_took = (b.tx.packets + b.tx.drop_policy + b.tx.drop_no_buffer)
        - (b0.tx.packets + b0.tx.drop_policy + b0.tx.drop_no_buffer);
    assert_eq!(a.rx.packets - a0.rx.packets, b_took, "each frame delivered or counted");
    assert_one_copy_each(&st);
    // Whatever the shaper still held reaches b in time (nothing stays stuck).
    let rest = drain(&mut fb, Duration::from_millis(200)).len();
    eprintln!("a sent {a_sent}, b got {} in all, {rest} after the stop", b.tx.packets);
    assert_eq!(policy(&sw, "b").shaper_queued, 0);
}

#[test]
fn test_policer_rate_changes_at_run_time_on_a_live_connection() {
    let dir = Scratch::new("policy-police");
    let sw = start_switch(&dir, &["a,police=10M", "b"]);
    let (mut fa, mut fb) = (connect_default(&dir, "a"), connect_default(&dir, "b"));
    let (ma, mb) = (mac(0xa), mac(0xb));
    learn(&mut fa, ma, &mut fb, mb);
    let w = (Duration::from_millis(400), Duration::from_millis(2400));

    let r1 = rate_through(&mut fa, ma, &mut fb, mb, 5_000, w.0, w.1);
    assert_near("policed at 10 Mbit/s", r1, 10e6, 0.05);
    let red = policy(&sw, "a").counters.policed;
    assert!(red > 0, "overload was policed");

    // Raise the rate; the guest stays connected and sees the new rate.
    let rep = set_policy(&sw, "a", PolicyConfig { ingress: Some(policer(25_000_000)), ..Default::default() });
    assert_eq!(rep.policy.ingress.unwrap().rate, BitRate(25_000_000));
    drain(&mut fb, Duration::from_millis(50));
    let r2 = rate_through(&mut fa, ma, &mut fb, mb, 8_000, w.0, w.1);
    assert_near("policed at 25 Mbit/s", r2, 25e6, 0.05);

    // Off: everything offered arrives.
    set_policy(&sw, "a", PolicyConfig::default());
    drain(&mut fb, Duration::from_millis(50));
    let r3 = rate_through(&mut fa, ma, &mut fb, mb, 5_000, w.0, w.1);
    assert_near("not policed (offered 40 Mbit/s)", r3, 40e6, 0.05);
    assert_eq!(port_info(&sw, "a").connects, 1, "never reconnected");
    assert_eq!(port_info(&sw, "b").connects, 1);
    drain(&mut fb, Duration::from_millis(50));
    exchange(&mut fa, &mut fb, ma, mb, 20, 1000);
}

#[test]
fn test_shaper_rate_change_and_removal_on_a_live_connection() {
    let dir = Scratch::new("policy-reshape");
    let sw = start_switch(&dir, &["a", "b,shape=10M"]);
    let (mut fa, mut fb) = (connect_default(&dir, "a"), connect_default(&dir, "b"));
    let (ma, mb) = (mac(0xa), mac(0xb));
    learn(&mut fa, ma, &mut fb, mb);
    let w = (Duration::from_millis(400), Duration::from_millis(2400));
    let r1 = rate_through(&mut fa, ma, &mut fb, mb, 5_000, w.0, w.1);
    assert_near("shaped at 10 Mbit/s", r1, 10e6, 0.05);
    set_policy(&sw, "b", PolicyConfig { egress: Some(shaper(30_000_000, 256)), ..Default::default() });
    drain(&mut fb, Duration::from_millis(100));
    let r2 = rate_through(&mut fa, ma, &mut fb, mb, 8_000, w.0, w.1);
    assert_near("shaped at 30 Mbit/s", r2, 30e6, 0.05);

    // Fill the shaper's queue (100 kbit/s: about 12 frames a second go out), then remove the
    // shaper: what it held arrives at once.
    drain(&mut fb, Duration::from_millis(300)); // what the 30 Mbit/s shaper still held
    assert_eq!(policy(&sw, "b").shaper_queued, 0);
    set_policy(&sw, "b", PolicyConfig { egress: Some(shaper(100_000, 100)), ..Default::default() });
    for i in 0..300 {
        send(&mut fa, 0, &build_frame(mb, ma, None, SIZE - 42, 10_000 + i));
    }
    assert!(wait_until(T, || policy(&sw, "b").shaper_queued >= 90), "the shaper holds packets back");
    let before = drain(&mut fb, Duration::from_millis(20)).len();
    let held = policy(&sw, "b").shaper_queued;
    assert!(held <= 100, "the queue is bounded: {held}");
    set_policy(&sw, "b", PolicyConfig::default());
    let after = drain(&mut fb, Duration::from_millis(100)).len();
    eprintln!("held {held}, got {before} before and {after} after removing the shaper");
    assert!(after as u64 + 2 >= held, "held packets delivered when the shaper went away");
    assert_eq!(port_info(&sw, "b").connects, 1, "never reconnected");
    exchange(&mut fa, &mut fb, ma, mb, 20, 1000);
}

#[test]
fn test_spoofed_frames_are_dropped_before_any_copy_and_counted_by_reason() {
    let dir = Scratch::new("policy-spoof");
    let sw = start_switch(&dir, &["a", "b"]);
    let (mut fa, mut fb) = (connect_default(&dir, "a"), connect_default(&dir, "b"));
    let (ma, mb, evil) = (mac(0xa), mac(0xb), mac(0x66));
    learn(&mut fa, ma, &mut fb, mb);
    let spoof =
        SpoofConfig { macs: vec![mac_str(ma)], ips: Some(vec!["198.18.0.1".into(), "fd00::a".into()]) };
    set_policy(&sw, "a", PolicyConfig { anti_spoof: Some(spoof), ..Default::default() });

    let legit = |seq| build_frame(mb, ma, None, 100, seq);
    let with_ip = |seq, ip: [u8; 4]| {
        let mut f = legit(seq);
        f[26..30].copy_from_slice(&ip);
        f
    };
    let mut arp = vec![0xff; 6];
    arp.extend(ma);
    arp.extend([0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend(ma);
    arp.extend([198, 18, 0, 2]); // claims b's address
    arp.extend([0; 6]);
    arp.extend([198, 18, 0, 1]);
    arp.resize(60, 0);
    let before = wait_stats(&sw, T, |_| true);
    for i in 0..10 {
        send(&mut fa, 0, &legit(i));
        send(&mut fa, 0, &build_frame(mb, evil, None, 100, 100 + i)); // foreign MAC
        send(&mut fa, 0, &with_ip(200 + i, [198, 18, 0, 99])); // foreign IP
        send(&mut fa, 0, &build_frame(BCAST, evil, None, 100, 300 + i)); // foreign MAC, flooded
    }
    send(&mut fa, 0, &arp);
    // Neighbour advertisements are longer than the usual snapshot: the switch takes a longer
    // one. Its own address passes, a claim on b's address does not.
    send(&mut fa, 0, &neighbour_advert(ma, mb, "fd00::a"));
    send(&mut fa, 0, &neighbour_advert(ma, mb, "fd00::b"));
    let got = recv_n(&mut fb, 11, T);
    assert_eq!(got.len(), 11);
    assert!(
        got[..10].iter().enumerate().all(|(i, f)| *f == legit(i as u64)),
        "exactly the legitimate frames, in order"
    );
    assert_eq!(got[10], neighbour_advert(ma, mb, "fd00::a"));
    assert!(drain(&mut fb, Duration::from_millis(50)).is_empty(), "nothing spoofed leaked");
    let st = wait_stats(&sw, T, |s| find(s, "a").rx.drop_policy - find(&before, "a").rx.drop_policy == 32);
    let c = find(&st, "a").policy;
    assert_eq!((c.spoof_mac, c.spoof_ip, c.spoof_arp, c.spoof_nd), (20, 10, 1, 1), "{c:?}");
    let b_copies = find(&st, "b").tx.copies - find(&before, "b").tx.copies;
    assert_eq!(b_copies, 11, "dropped frames cost no copy");
    assert_one_copy_each(&st);
    assert!(!sw.fdb().unwrap().iter().any(|e| e.mac == mac_str(evil)), "a spoofed source is never learned");

    // Turned off at run time: the foreign MAC passes now.
    set_policy(&sw, "a", PolicyConfig::default());
    send(&mut fa, 0, &build_frame(mb, evil, None, 100, 999));
    assert_eq!(recv_n(&mut fb, 1, T).len(), 1);
    assert_eq!(port_info(&sw, "a").connects, 1);
}

/// An unsolicited neighbour advertisement from `src` (fd00::a) for `target`, with a target
/// link-layer option naming `src`: 86 bytes.
fn neighbour_advert(src: [u8; 6], dst: [u8; 6], target: &str) -> Vec<u8> {
    let ip = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
    let mut f = dst.to_vec();
    f.extend(src);
    f.extend([0x86, 0xdd, 0x60, 0, 0, 0, 0, 32, 58, 255]);
    f.extend(ip("fd00::a"));
    f.extend(ip("fd00::b"));
    f.extend([136, 0, 0, 0, 0x20, 0, 0, 0]);
    f.extend(ip(target));
    f.extend([2, 1]);
    f.extend(src);
    f
}

#[test]
fn test_bad_policy_is_refused_and_the_old_one_stays() {
    let dir = Scratch::new("policy-bad");
    let sw = start_switch(&dir, &["a,police=10M"]);
    let bad = PolicyConfig {
        ingress: Some(policer(1_000_000)),
        anti_spoof: Some(SpoofConfig { macs: vec![], ips: Some(vec!["10.0.0.256".into()]) }),
        ..Default::default()
    };
    let e = sw.set_policy("a", bad).unwrap_err().to_string();
    assert!(e.contains("10.0.0.256") && e.contains("port 'a'"), "{e}");
    assert_eq!(policy(&sw, "a").policy.ingress.unwrap().rate, BitRate(10_000_000), "old policy kept");
    let e = sw.policy("nope").unwrap_err().to_string();
    assert!(e.contains("no port named 'nope'"), "{e}");
}
