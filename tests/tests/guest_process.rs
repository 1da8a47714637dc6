//! Guests in their own processes (`src/bin/guest.rs`): one SIGKILLed mid-traffic, and guests
//! coming and going while the switch keeps waking up for the ones that stay.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use e2e_tests::{
    assert_one_copy_each, connect_default, drain, exchange, find, mac, mac_str, port_info, sock,
    start_switch, wait_until, Proc, Scratch,
};
use vswitch::Switch;
use vswitch_bench::frame::{build_frame, verify_frame};

const T: Duration = Duration::from_secs(5);

/// Tests here count on the switch's file descriptor numbers: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Starts `guest MODE` on port `port` with MAC byte `src`, talking to MAC byte `dst`.
fn guest(dir: &Scratch, mode: &str, port: &str, src: u8, dst: u8, rate: u64) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_guest"));
    cmd.arg(mode).arg(sock(dir, port)).arg(format!("{src:x}")).arg(format!("{dst:x}")).arg(rate.to_string());
    Proc::spawn(cmd, &dir.path(&format!("guest-{port}-{mode}.log")))
}

/// Waits (through the switch, without opening files) until port `port` runs both vrings.
fn wait_running(sw: &Switch, port: &str, g: &mut Proc) {
    let up = wait_until(Duration::from_secs(10), || {
        let i = port_info(sw, port);
        (i.connected && i.device.running_queues == [0, 1]) || !g.running()
    });
    assert!(up && g.running(), "guest on {port} did not come up:\n{}", g.log_text());
}

fn wait_disconnected(sw: &Switch, port: &str) {
    let down = wait_until(T, || !port_info(sw, port).connected);
    assert!(down, "the switch did not notice the guest on {port} died: {:?}", port_info(sw, port));
}

/// Last `received=N` the guest printed.
fn guest_received(g: &Proc) -> u64 {
    let log = g.log_text();
    let last = log.lines().rev().find_map(|l| l.split("received=").nth(1).map(str::to_owned));
    last.and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn test_sigkilled_guest_only_disconnects_its_port_which_accepts_a_new_guest() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("proc-kill");
    let sw = start_switch(&dir, &["a", "b", "c"]);
    let (ma, mb, mc) = (mac(0xa), mac(0xb), mac(0xc));
    let mut fb = connect_default(&dir, "b");
    let mut fc = connect_default(&dir, "c");
    // B and C make themselves known (so traffic to them never floods).
    e2e_tests::send(&mut fc, 0, &build_frame(e2e_tests::BCAST, mc, None, 60, 0));
    e2e_tests::send(&mut fb, 0, &build_frame(e2e_tests::BCAST, mb, None, 60, 0));
    assert_eq!(e2e_tests::recv_n(&mut fb, 1, T).len(), 1);
    assert_eq!(e2e_tests::recv_n(&mut fc, 1, T).len(), 1);
    let mut g = guest(&dir, "send", "a", 0xa, 0xb, 4);
    wait_running(&sw, "a", &mut g);

    // B receives the guest's stream and sends to the guest, both ways at once, while the guest
    // is killed.
    let stop = AtomicBool::new(false);
    let to_guest = AtomicBool::new(true);
    let (received, gaps, bad, sent_to_guest) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let (mut next, mut received, mut gaps, mut bad, mut sent) = (0u64, 0u64, 0u64, 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                fb.poll_rx(0, |f| match verify_frame(f) {
                    Some(seq) if f[6..12] == ma && seq >= next => {
                        gaps += seq - next;
                        next = seq + 1;
                        received += 1;
                    }
                    _ => bad += 1,
                });
                if received > 0
                    && to_guest.load(Ordering::Relaxed)
                    && fb.send(0, &build_frame(ma, mb, None, 200, sent))
                {
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (received, gaps, bad, sent)
        });
        let flowing = wait_until(T, || guest_received(&g) > 50);
        assert!(flowing, "B -> guest traffic did not flow:\n{}", g.log_text());
        let status = g.kill().expect("killed");
        to_guest.store(false, Ordering::Relaxed);
        assert!(!status.success());
        wait_disconnected(&sw, "a");
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap()
    });
    assert!(received > 100, "B got {received} frames from the guest");
    assert_eq!(bad, 0, "every frame from the guest intact, in order");
    assert!(sent_to_guest > 50);

    // The switch is fine; the dead guest's port is idle and forgotten.
    let info = port_info(&sw, "a");
    assert!(!info.connected && info.device.running_queues.is_empty(), "{info:?}");
    assert_eq!(info.device.mem_regions, 0, "the dead guest's memory is unmapped");
    assert!(sw.fdb().unwrap().iter().all(|e| e.mac != mac_str(ma)), "the dead guest's MAC is forgotten");
    let s = sw.stats().unwrap();
    let (a, b) = (find(&s, "a"), find(&s, "b"));
    assert_eq!(gaps, b.tx.drop_no_buffer, "frames from the guest missing at B are all counted drops");
    assert_eq!(a.rx.drop_malformed + a.tx.drop_malformed, 0, "{a:?}");
    assert_eq!(b.rx.drop_malformed + b.tx.drop_malformed, 0, "{b:?}");
    // B's frames sent after the guest's MAC was forgotten flooded to C; nothing else did.
    for f in drain(&mut fc, Duration::from_millis(50)) {
        assert_eq!((&f[0..6], &f[6..12]), (&ma[..], &mb[..]), "C got only B's frames for the dead guest");
    }
    // The other ports still talk.
    exchange(&mut fb, &mut fc, mb, mc, 50, 10_000);
    exchange(&mut fc, &mut fb, mc, mb, 50, 20_000);
    // A new guest (in-process this time) takes the dead one's port.
    let mut fa = connect_default(&dir, "a");
    let info = port_info(&sw, "a");
    assert_eq!((info.connected, info.connects, info.device.running_queues), (true, 2, vec![0, 1]));
    exchange(&mut fa, &mut fb, ma, mb, 50, 30_000);
    exchange(&mut fb, &mut fa, mb, ma, 50, 40_000);
    assert!(drain(&mut fc, Duration::from_millis(30)).is_empty(), "C saw none of it");
    assert_one_copy_each(&sw.stats().unwrap());
}

/// Round trips (µs) of the next `n` pings the `ping` guest reports.
fn next_pings(ping: &Proc, n: usize) -> Vec<u64> {
    let count = || ping.log_text().lines().filter(|l| l.starts_with("rtt_us=")).count();
    let already = count();
    let enough = wait_until(T, || count() >= already + n);
    let log = ping.log_text();
    assert!(enough, "pings did not come back:\n{log}");
    let mut rtt: Vec<u64> = log
        .lines()
        .filter_map(|l| l.strip_prefix("rtt_us="))
        .skip(already)
        .map(|n| n.parse().unwrap())
        .collect();
    rtt.sort();
    rtt
}

/// An idle switch sleeps (adaptive polling); a kick must wake it well before its 100 ms
/// timeout: the median round trip stays far below that.
fn assert_quick(rtt: &[u64]) {
    eprintln!("round trips (µs): {rtt:?}");
    let median = Duration::from_micros(rtt[rtt.len() / 2]);
    assert!(median < Duration::from_millis(30), "round trips through an idle switch (µs): {rtt:?}");
}

#[test]
fn test_kicks_wake_an_idle_switch_between_guest_processes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("proc-ping");
    let sw = start_switch(&dir, &["a", "b"]);
    let mut echo = guest(&dir, "echo", "a", 0xa, 0xb, 0);
    wait_running(&sw, "a", &mut echo);
    let mut ping = guest(&dir, "ping", "b", 0xb, 0xa, 0);
    wait_running(&sw, "b", &mut ping);
    assert_quick(&next_pings(&ping, 15));
    let s = sw.stats().unwrap();
    assert!(s.pmds[0].sleeps >= 10, "the switch slept between pings: {:?}", s.pmds);
}

#[test]
fn test_kicks_wake_the_switch_after_guests_come_and_go() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("proc-kicks");
    let sw = start_switch(&dir, &["a", "b"]);
    // Two guests connect, the switch sleeps watching both kick fds, both guests die.
    let mut g1 = guest(&dir, "echo", "a", 0xa, 0xb, 0);
    wait_running(&sw, "a", &mut g1);
    let mut g2 = guest(&dir, "echo", "b", 0xb, 0xa, 0);
    wait_running(&sw, "b", &mut g2);
    std::thread::sleep(Duration::from_millis(300));
    g1.kill();
    g2.kill();
    wait_disconnected(&sw, "a");
    wait_disconnected(&sw, "b");
    // They come back in the other order: the switch's new descriptors take the freed numbers,
    // so port b's kick fd now has the number port a's had.
    let mut ping = guest(&dir, "ping", "b", 0xb, 0xa, 0);
    wait_running(&sw, "b", &mut ping);
    std::thread::sleep(Duration::from_millis(300));
    let mut echo = guest(&dir, "echo", "a", 0xa, 0xb, 0);
    wait_running(&sw, "a", &mut echo);
    std::thread::sleep(Duration::from_millis(300));
    // Pings every 100 ms: the switch is idle (asleep) when each arrives; B's kick must wake it.
    assert_quick(&next_pings(&ping, 15));
}
