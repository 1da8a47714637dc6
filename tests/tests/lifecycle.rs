//! Ports added and removed while traffic flows: the traffic between other ports goes on
//! without loss, the added port works at once, a removed port leaves nothing behind.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use e2e_tests::{
    assert_one_copy_each, connect_default, exchange, find, mac, port_config, recv_n, send, sock,
    start_switch, wait_stats, Scratch, BCAST,
};
use vswitch::Switch;
use vswitch_bench::frame::{build_frame, verify_frame};
use vswitch_bench::frontend::Frontend;

const T: Duration = Duration::from_secs(5);
/// Frames in flight per direction: well under the 256 RX buffers of a receiver, so no frame
/// can be lost to a full ring.
const WINDOW: u64 = 32;

#[derive(Debug, Default)]
struct Flow {
    sent: u64,
    received: u64,
    /// Frames that arrived corrupted or out of sequence.
    bad: u64,
}

#[derive(Debug, Default)]
struct Report {
    ab: Flow,
    ba: Flow,
    /// Frames that arrived at A / B from anyone but the peer.
    foreign_a: Vec<Vec<u8>>,
    foreign_b: Vec<Vec<u8>>,
    /// Longest time without any frame arriving while traffic was being sent.
    max_gap: Duration,
}

fn frame(dst: [u8; 6], src: [u8; 6], seq: u64) -> Vec<u8> {
    build_frame(dst, src, None, 18 + (seq as usize * 131) % 1400, seq)
}

/// Receives on `fe`: frames from `peer` must carry the next sequence number.
fn take(fe: &mut Frontend, peer: [u8; 6], flow: &mut Flow, foreign: &mut Vec<Vec<u8>>) -> usize {
    fe.poll_rx(0, |f| {
        if f[6..12] != peer {
            foreign.push(f.to_vec());
        } else {
            if verify_frame(f) != Some(flow.received) {
                flow.bad += 1;
            }
            flow.received += 1;
        }
    })
}

/// A <-> B with at most WINDOW frames in flight each way, until `stop`; then waits (3 s at
/// most) for what is in flight.
fn traffic(fa: &mut Frontend, fb: &mut Frontend, stop: &AtomicBool) -> Report {
    let (ma, mb) = (mac(0xa), mac(0xb));
    let mut r = Report::default();
    let mut last_rx = Instant::now();
    let mut stopped_at: Option<Instant> = None;
    loop {
        if stopped_at.is_none() && stop.load(Ordering::Relaxed) {
            stopped_at = Some(Instant::now());
        }
        let mut progress = false;
        if stopped_at.is_none() {
            while r.ab.sent - r.ab.received < WINDOW && fa.send(0, &frame(mb, ma, r.ab.sent)) {
                r.ab.sent += 1;
                progress = true;
            }
            while r.ba.sent - r.ba.received < WINDOW && fb.send(0, &frame(ma, mb, r.ba.sent)) {
                r.ba.sent += 1;
                progress = true;
            }
        }
        let n = take(fb, ma, &mut r.ab, &mut r.foreign_b) + take(fa, mb, &mut r.ba, &mut r.foreign_a);
        if n > 0 {
            progress = true;
            if stopped_at.is_none() {
                r.max_gap = r.max_gap.max(last_rx.elapsed());
            }
            last_rx = Instant::now();
        }
        match stopped_at {
            Some(_) if r.ab.received == r.ab.sent && r.ba.received == r.ba.sent => return r,
            Some(t) if t.elapsed() > Duration::from_secs(3) => return r,
            _ => {}
        }
        if !progress {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

fn names(sw: &Switch) -> Vec<String> {
    sw.ports().unwrap().into_iter().map(|p| p.name).collect()
}

#[test]
fn test_ports_added_and_removed_under_traffic_cost_the_other_ports_nothing() {
    let dir = Scratch::new("life-churn");
    let sw = start_switch(&dir, &["a", "b", "c"]);
    let (ma, mb, mc, md) = (mac(0xa), mac(0xb), mac(0xc), mac(0xd));
    let mut fa = connect_default(&dir, "a");
    let mut fb = connect_default(&dir, "b");
    let mut fc = connect_default(&dir, "c");
    // A and B make themselves known, so their traffic never floods to C.
    send(&mut fa, 0, &build_frame(BCAST, ma, None, 60, 0));
    send(&mut fb, 0, &build_frame(BCAST, mb, None, 60, 0));
    assert_eq!(recv_n(&mut fa, 1, T).len(), 1);
    assert_eq!(recv_n(&mut fb, 1, T).len(), 1);
    assert_eq!(recv_n(&mut fc, 2, T).len(), 2);

    let stop = AtomicBool::new(false);
    const ROUNDS: u64 = 3;
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| traffic(&mut fa, &mut fb, &stop));
        std::thread::sleep(Duration::from_millis(200));
        for round in 0..ROUNDS {
            // Add D, use it with C, remove it.
            sw.add_port(port_config(&dir, "d")).unwrap();
            assert_eq!(names(&sw), ["a", "b", "c", "d"]);
            let mut fd = connect_default(&dir, "d");
            // C -> D: D is unknown, so this one floods (to A, B and D).
            let f = build_frame(md, mc, None, 100, 1000 + round);
            send(&mut fc, 0, &f);
            let got = recv_n(&mut fd, 1, T);
            assert!(got == vec![f], "round {round}: D got C's frame");
            exchange(&mut fd, &mut fc, md, mc, 20, 100 * round);
            exchange(&mut fc, &mut fd, mc, md, 20, 100 * round + 50);
            sw.del_port("d").unwrap();
            assert_eq!(names(&sw), ["a", "b", "c"]);
            assert!(!sock(&dir, "d").exists(), "the removed port's socket is gone");
            assert!(sw.fdb().unwrap().iter().all(|e| e.mac != e2e_tests::mac_str(md)), "D forgotten");
        }
        sw.del_port("c").unwrap();
        assert_eq!(names(&sw), ["a", "b"]);
        assert!(sw.del_port("c").is_err(), "already gone");
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap()
    });

    eprintln!("A->B {:?}, B->A {:?}, longest gap {:?}", r.ab, r.ba, r.max_gap);
    assert!(r.ab.sent > 500 && r.ba.sent > 500, "traffic flowed: {:?} {:?}", r.ab, r.ba);
    assert_eq!((r.ab.received, r.ab.bad), (r.ab.sent, 0), "A->B: every frame, intact, in order");
    assert_eq!((r.ba.received, r.ba.bad), (r.ba.sent, 0), "B->A: every frame, intact, in order");
    assert!(r.max_gap < Duration::from_secs(1), "traffic stalled for {:?}", r.max_gap);
    // The only other frames A and B saw: C's first frame to D each round (D unknown: flooded).
    for foreign in [&r.foreign_a, &r.foreign_b] {
        let seqs: Vec<u64> = foreign
            .iter()
            .map(|f| {
                assert_eq!((&f[0..6], &f[6..12]), (&md[..], &mc[..]));
                verify_frame(f).unwrap()
            })
            .collect();
        assert_eq!(seqs, (0..ROUNDS).map(|r| 1000 + r).collect::<Vec<_>>());
    }
    let s = wait_stats(&sw, T, |s| {
        let (a, b) = (find(s, "a"), find(s, "b"));
        (a.rx.packets, b.rx.packets, a.tx.packets, b.tx.packets)
            == (r.ab.sent + 1, r.ba.sent + 1, r.ba.sent + 1 + ROUNDS, r.ab.sent + 1 + ROUNDS)
    });
    let (a, b) = (find(&s, "a"), find(&s, "b"));
    assert_eq!(a.rx.packets, r.ab.sent + 1, "A: traffic plus its first broadcast");
    assert_eq!(b.rx.packets, r.ba.sent + 1);
    assert_eq!(a.tx.packets, r.ba.sent + 1 + ROUNDS);
    assert_eq!(b.tx.packets, r.ab.sent + 1 + ROUNDS);
    for p in [a, b] {
        assert_eq!(p.tx.drop_no_buffer + p.rx.drop_no_route + p.rx.drop_malformed, 0, "{}: {p:?}", p.name);
    }
    assert_one_copy_each(&s);
}

#[test]
fn test_removed_port_can_be_added_again_and_a_new_port_reuses_its_id() {
    let dir = Scratch::new("life-readd");
    let sw = start_switch(&dir, &["a", "b", "c"]);
    let mut fa = connect_default(&dir, "a");
    let mut fc = connect_default(&dir, "c");
    let (ma, mb, mc, me) = (mac(0xa), mac(0xb), mac(0xc), mac(0xe));
    send(&mut fc, 0, &build_frame(BCAST, mc, None, 60, 0));
    send(&mut fa, 0, &build_frame(BCAST, ma, None, 60, 0));
    assert_eq!(recv_n(&mut fa, 1, T).len(), 1);
    assert_eq!(recv_n(&mut fc, 1, T).len(), 1);
    {
        let mut fb = connect_default(&dir, "b");
        exchange(&mut fb, &mut fa, mb, ma, 10, 100);
        exchange(&mut fa, &mut fb, ma, mb, 10, 0);
    }
    let old_id = e2e_tests::port_info(&sw, "b").id;
    // A was known when B first sent, so C saw nothing of the A <-> B exchange.
    assert!(e2e_tests::drain(&mut fc, Duration::from_millis(30)).is_empty());
    sw.del_port("b").unwrap();
    assert!(sw.fdb().unwrap().iter().all(|e| e.port != old_id), "B's MACs forgotten with it");
    // Refusals.
    assert!(sw.add_port(port_config(&dir, "a")).is_err(), "name taken");
    let mut dup = port_config(&dir, "x");
    dup.socket = sock(&dir, "a");
    assert!(sw.add_port(dup).is_err(), "socket taken");
    // A new port takes the freed id, but not B's MAC: a frame to B's MAC floods (reaches C).
    sw.add_port(port_config(&dir, "e")).unwrap();
    assert_eq!(e2e_tests::port_info(&sw, "e").id, old_id);
    let mut fe = connect_default(&dir, "e");
    let f = build_frame(mb, ma, None, 100, 7);
    send(&mut fa, 0, &f);
    assert!(recv_n(&mut fc, 1, T) == vec![f.clone()], "unknown again: flooded to C");
    assert!(recv_n(&mut fe, 1, T) == vec![f], "and to E");
    exchange(&mut fe, &mut fa, me, ma, 10, 300);
    exchange(&mut fa, &mut fe, ma, me, 10, 200);
    // And B comes back under its old name.
    sw.add_port(port_config(&dir, "b")).unwrap();
    let mut fb = connect_default(&dir, "b");
    exchange(&mut fb, &mut fa, mb, ma, 10, 400);
    exchange(&mut fa, &mut fb, ma, mb, 10, 500);
    assert_eq!(e2e_tests::port_info(&sw, "b").connects, 1, "a fresh port");
    let s = sw.stats().unwrap();
    assert_eq!(find(&s, "b").tx.packets, 10, "counters start afresh too");
    assert_one_copy_each(&s);
}
