//! Client-mode ports: the switch connects to a frontend that listens (QEMU `server=on`,
//! virtio-user `server=1`), retries every second until it can, and connects again after the
//! frontend or the switch went away.

use std::time::{Duration, Instant};

use e2e_tests::{
    connect_default, exchange, init_log, mac, port_info, sock, start_switch, switch_config, wait_until,
    Scratch,
};
use vswitch::Switch;
use vswitch_bench::frontend::{Frontend, FrontendConfig};

const T: Duration = Duration::from_secs(5);
/// The switch retries every second; allow for one missed retry and a slow machine.
const RECONNECT: Duration = Duration::from_millis(2500);

/// Listens on port `name`'s socket until the switch connects (5 s at most); returns the
/// frontend and how long that took.
fn listen(dir: &Scratch, name: &str) -> (Frontend, Duration) {
    let t = Instant::now();
    let fe = Frontend::listen_accept(&sock(dir, name), FrontendConfig::default(), T)
        .unwrap_or_else(|e| panic!("the switch did not connect to {name}: {e}"));
    (fe, t.elapsed())
}

fn both_ways(fa: &mut Frontend, fb: &mut Frontend, seq0: u64) {
    exchange(fa, fb, mac(0xa), mac(0xb), 20, seq0);
    exchange(fb, fa, mac(0xb), mac(0xa), 20, seq0 + 1000);
}

#[test]
fn test_client_port_connects_once_the_frontend_listens() {
    let dir = Scratch::new("client-late");
    let sw = start_switch(&dir, &["a,client", "b"]);
    // The switch has tried and failed (nobody listens yet).
    std::thread::sleep(Duration::from_millis(1200));
    let info = port_info(&sw, "a");
    assert_eq!((info.mode.as_str(), info.connected, info.connects), ("client", false, 0));
    let (mut fa, took) = listen(&dir, "a");
    assert!(took < RECONNECT, "connected after {took:?}");
    assert!(wait_until(T, || port_info(&sw, "a").connected));
    let mut fb = connect_default(&dir, "b");
    both_ways(&mut fa, &mut fb, 0);
    assert_eq!(port_info(&sw, "a").connects, 1);
}

#[test]
fn test_client_port_reconnects_after_the_frontend_goes_away() {
    let dir = Scratch::new("client-again");
    let sw = start_switch(&dir, &["a,client", "b"]);
    let mut fb = connect_default(&dir, "b");
    let (mut fa, _) = listen(&dir, "a");
    both_ways(&mut fa, &mut fb, 0);
    drop(fa);
    assert!(wait_until(T, || !port_info(&sw, "a").connected), "the switch noticed the frontend left");
    assert!(sw.fdb().unwrap().iter().all(|e| e.mac != e2e_tests::mac_str(mac(0xa))), "its MACs forgotten");
    let (mut fa, took) = listen(&dir, "a");
    assert!(took < RECONNECT, "reconnected after {took:?}");
    both_ways(&mut fa, &mut fb, 100);
    assert_eq!(port_info(&sw, "a").connects, 2);
}

#[test]
fn test_client_port_reconnects_after_the_switch_restarts() {
    let dir = Scratch::new("client-restart");
    init_log();
    let cfg = switch_config(&dir, &["a,client", "b"]);
    // The frontend listens first, the switch starts and connects.
    let (mut fa, mut fb) = std::thread::scope(|s| {
        let l = s.spawn(|| listen(&dir, "a").0);
        let sw = Switch::start(cfg.clone()).unwrap();
        let mut fa = l.join().unwrap();
        let mut fb = connect_default(&dir, "b");
        both_ways(&mut fa, &mut fb, 0);
        drop(sw); // stops the switch: every connection closes
        (fa, fb)
    });
    assert!(!sock(&dir, "b").exists(), "the stopped switch removed its listening socket");
    // The old frontends' connections are dead: nothing they send goes anywhere.
    assert!(fa.send(0, &vswitch_bench::frame::build_frame(mac(0xb), mac(0xa), None, 60, 1)));
    assert!(fb.recv_frames(0, 1, Duration::from_millis(100)).is_empty());
    drop((fa, fb));

    // A new switch, same configuration; a new frontend listening on the same path.
    let sw = Switch::start(cfg).unwrap();
    let (mut fa, took) = listen(&dir, "a");
    assert!(took < RECONNECT, "connected after {took:?}");
    let mut fb = connect_default(&dir, "b");
    both_ways(&mut fa, &mut fb, 100);
    let info = port_info(&sw, "a");
    assert_eq!((info.connected, info.connects), (true, 1));
    assert_eq!(info.device.running_queues, vec![0, 1]);
}
