//! Overload and stopping: every frame is delivered or counted as a drop; a stopped ring gets
//! every buffer back and nothing more is taken from it or written into it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use e2e_tests::{
    assert_one_copy_each, connect_default, drain, exchange, find, mac, port_info, send, start_switch,
    wait_stats, wait_until, Scratch, BCAST,
};
use vswitch_bench::frame::{build_frame, verify_frame};

const T: Duration = Duration::from_secs(5);

#[test]
fn test_overloaded_receiver_every_frame_is_delivered_or_counted() {
    let dir = Scratch::new("overload");
    let sw = start_switch(&dir, &["a", "b"]);
    let mut fa = connect_default(&dir, "a");
    let mut fb = connect_default(&dir, "b");
    let (ma, mb) = (mac(0xa), mac(0xb));
    send(&mut fb, 0, &build_frame(BCAST, mb, None, 60, 0));
    assert_eq!(e2e_tests::recv_n(&mut fa, 1, T).len(), 1);

    // A sends 20000 frames as fast as its ring allows; B reads only now and then, so its
    // 256 buffers run out again and again.
    const N: u64 = 20_000;
    let stop = AtomicBool::new(false);
    let (seqs, sent, mut fb) = std::thread::scope(|s| {
        let stop = &stop;
        let rx = s.spawn(move || {
            let mut seqs = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                fb.poll_rx(0, |f| seqs.push(verify_frame(f)));
                std::thread::sleep(Duration::from_millis(3));
            }
            (seqs, fb)
        });
        let mut sent = 0;
        let t = Instant::now();
        while sent < N && t.elapsed() < Duration::from_secs(8) {
            if fa.send(0, &build_frame(mb, ma, None, 100 + (sent as usize % 64), sent)) {
                sent += 1;
            } else {
                std::thread::yield_now();
            }
        }
        // Everything A sent has been taken by the switch once its buffers are all back.
        assert!(wait_until(T, || fa.tx_completed(0) == sent), "A's buffers all returned");
        let s0 = wait_stats(&sw, T, |s| {
            let b = find(s, "b");
            b.tx.packets + b.tx.drop_no_buffer == sent && find(s, "a").rx.packets == sent
        });
        let b = find(&s0, "b");
        let delivered = b.tx.packets;
        // Stop the reader, then collect what it had not read yet.
        stop.store(true, Ordering::Relaxed);
        let (mut seqs, mut fb) = rx.join().unwrap();
        seqs.extend(drain(&mut fb, Duration::from_millis(50)).iter().map(|f| verify_frame(f)));
        assert_eq!(seqs.len() as u64, delivered, "B got exactly what the switch says it delivered");
        (seqs, sent, fb)
    });
    assert_eq!(sent, N, "A could send everything");
    let s = sw.stats().unwrap();
    let (a, b) = (find(&s, "a"), find(&s, "b"));
    eprintln!("delivered {} dropped {}", b.tx.packets, b.tx.drop_no_buffer);
    assert_eq!(a.rx.packets, N);
    assert_eq!(b.tx.packets + b.tx.drop_no_buffer, N, "each frame delivered or counted");
    assert!(b.tx.drop_no_buffer > 0, "the test did overload B");
    assert!(seqs.iter().all(Option::is_some), "delivered frames intact");
    let seqs: Vec<u64> = seqs.into_iter().flatten().collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order, none twice");
    assert_eq!(fb.stats(0).rx_errors, 0);
    assert_one_copy_each(&s);
    // Both directions work normally once the pressure is off.
    exchange(&mut fa, &mut fb, ma, mb, 20, 100_000);
    exchange(&mut fb, &mut fa, mb, ma, 20, 200_000);
}

#[test]
fn test_get_vring_base_stops_rings_mid_traffic_and_returns_every_buffer() {
    let dir = Scratch::new("overload-stop");
    let sw = start_switch(&dir, &["a", "b", "c"]);
    let mut fa = connect_default(&dir, "a");
    let mut fb = connect_default(&dir, "b");
    let mut fc = connect_default(&dir, "c");
    let (ma, mb, mc) = (mac(0xa), mac(0xb), mac(0xc));
    for (f, m) in [(&mut fa, ma), (&mut fb, mb), (&mut fc, mc)] {
        send(f, 0, &build_frame(BCAST, m, None, 60, 0));
    }
    for f in [&mut fa, &mut fb, &mut fc] {
        assert_eq!(e2e_tests::recv_n(f, 2, T).len(), 2);
    }
    // A streams to B while B's rings are stopped; B keeps its connection.
    let mut sent = 0u64;
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(200) {
        if fa.send(0, &build_frame(mb, ma, None, 100, sent)) {
            sent += 1;
        }
        fb.poll_rx(0, |_| {});
        std::thread::sleep(Duration::from_micros(100));
    }
    let bases = fb.stop().expect("GET_VRING_BASE");
    assert!(port_info(&sw, "b").device.running_queues.is_empty(), "B's rings stopped");
    assert!(port_info(&sw, "b").connected);
    // B's TX ring: every chain the switch took was returned (base = buffers completed).
    assert_eq!((bases[1], fb.tx_completed(0)), (1, 1), "B TX: base {bases:?}");
    // Frames for B now find no ring: counted, not written.
    assert!(wait_until(T, || fa.tx_completed(0) == 1 + sent), "A's frames so far all taken");
    fb.recv_frames(0, 10_000, Duration::from_millis(20));
    let before = find(&sw.stats().unwrap(), "b").tx.packets;
    let rx_before = fb.stats(0).rx_frames;
    assert_eq!(rx_before, before, "B read all that was delivered to it");
    for i in 0..50 {
        send(&mut fa, 0, &build_frame(mb, ma, None, 100, sent + i));
    }
    sent += 50;
    assert!(wait_until(T, || fa.tx_completed(0) == 1 + sent));
    let s = wait_stats(&sw, T, |s| find(s, "b").tx.drop_no_buffer >= 50);
    assert_eq!(find(&s, "b").tx.packets, before, "nothing delivered into a stopped ring");
    assert!(find(&s, "b").tx.drop_no_buffer >= 50);
    assert!(fb.recv_frames(0, 1, Duration::from_millis(50)).is_empty());
    assert_eq!(fb.stats(0).rx_frames, rx_before);
    // A's TX ring stopped too: base = everything A published and the switch completed.
    let bases = fa.stop().expect("GET_VRING_BASE");
    assert_eq!(bases[1] as u64, 1 + sent, "A TX base: its broadcast and the stream");
    assert_eq!(fa.tx_completed(0), 1 + sent);
    let sent = 1 + sent;
    // A stopped ring is not read: frames A queues now stay with A.
    let _ = fa.send(0, &build_frame(mc, ma, None, 100, 1));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(fa.tx_completed(0), sent, "nothing taken from a stopped ring");
    assert!(fc.recv_frames(0, 1, Duration::from_millis(20)).is_empty());
    // C is unaffected.
    let s = sw.stats().unwrap();
    assert_eq!(find(&s, "c").tx.drop_no_buffer, 0);
    assert_one_copy_each(&s);
}
