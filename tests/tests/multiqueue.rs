//! Multi-queue ports (VIRTIO_NET_F_MQ): traffic on every TX queue is delivered, every queue
//! runs, per-queue counters add up; with one and with two polling threads.

use std::time::Duration;

use e2e_tests::{
    assert_one_copy_each, connect, drain, find, frame_of_size, init_log, mac, port_info, recv_n, send,
    switch_config, wait_stats, Scratch,
};
use vswitch::{Switch, SwitchConfig};
use vswitch_bench::frame::verify_frame;
use vswitch_bench::frontend::{Error, Frontend, FrontendConfig, VIRTIO_NET_F_MQ};

const T: Duration = Duration::from_secs(5);

fn pairs(n: u16) -> FrontendConfig {
    FrontendConfig { queue_pairs: n, ..FrontendConfig::default() }
}

fn start(dir: &Scratch, specs: &[&str], pmds: usize) -> Switch {
    init_log();
    let cfg = SwitchConfig { pmd_cores: (0..pmds).collect(), ..switch_config(dir, specs) };
    Switch::start(cfg).unwrap()
}

/// Sends `per_queue` frames on each TX queue of `from` (queue q carries sequence numbers
/// `q * 10000 + i`, interleaved across queues) and checks `to` gets every one, intact, each
/// queue's frames in order.
fn all_queues(from: &mut Frontend, to: &mut Frontend, src: [u8; 6], dst: [u8; 6], per_queue: u64) {
    let nq = from.queue_pairs();
    for i in 0..per_queue {
        for q in 0..nq {
            send(
                from,
                q,
                &frame_of_size(dst, src, None, 60 + (i as usize * 61) % 1455, q as u64 * 10000 + i),
            );
        }
    }
    let total = (per_queue * nq as u64) as usize;
    let mut got = recv_n(to, total, T);
    got.extend(drain(to, Duration::from_millis(30)));
    assert_eq!(got.len(), total, "frames from {nq} TX queues");
    for q in 0..nq as u64 {
        let seqs: Vec<u64> = got
            .iter()
            .map(|f| verify_frame(f).expect("intact"))
            .filter(|s| s / 10000 == q)
            .map(|s| s % 10000)
            .collect();
        assert_eq!(seqs, (0..per_queue).collect::<Vec<_>>(), "TX queue {q}: all, in order");
    }
}

fn check_queues(sw: &Switch, port: &str, nq: usize, per_queue: u64) {
    let info = port_info(sw, port);
    assert_eq!(info.queue_pairs as usize, nq);
    assert_eq!(info.device.running_queues, (0..2 * nq).collect::<Vec<_>>(), "{port}: every vring runs");
    assert!(info.device.features.contains(&"MQ".to_string()), "{info:?}");
    let s = wait_stats(sw, T, |s| find(s, port).rx.packets == nq as u64 * per_queue);
    let p = find(&s, port);
    for q in &p.queues {
        if q.queue % 2 == 1 {
            assert_eq!(q.counters.packets, per_queue, "{port}: guest TX queue {}", q.queue);
        }
    }
    let delivered: u64 = p.queues.iter().filter(|q| q.queue % 2 == 0).map(|q| q.counters.packets).sum();
    assert_eq!(delivered, p.tx.packets, "{port}: per-queue counters add up");
    assert_one_copy_each(&s);
}

#[test]
fn test_two_queue_pairs_deliver_traffic_from_both_tx_queues() {
    let dir = Scratch::new("mq-2");
    let sw = start(&dir, &["a,queues=2", "b,queues=2"], 0);
    let mut fa = connect(&dir, "a", pairs(2));
    let mut fb = connect(&dir, "b", pairs(2));
    assert_ne!(fa.negotiated_features() & VIRTIO_NET_F_MQ, 0);
    all_queues(&mut fa, &mut fb, mac(0xa), mac(0xb), 100);
    all_queues(&mut fb, &mut fa, mac(0xb), mac(0xa), 100);
    check_queues(&sw, "a", 2, 100);
    check_queues(&sw, "b", 2, 100);
}

#[test]
fn test_four_queue_pairs_with_two_polling_threads() {
    let dir = Scratch::new("mq-4");
    let sw = start(&dir, &["a,queues=4", "b,queues=4"], 2);
    assert_eq!(sw.stats().unwrap().pmds.len(), 2);
    let mut fa = connect(&dir, "a", pairs(4));
    let mut fb = connect(&dir, "b", pairs(4));
    all_queues(&mut fa, &mut fb, mac(0xa), mac(0xb), 50);
    all_queues(&mut fb, &mut fa, mac(0xb), mac(0xa), 50);
    check_queues(&sw, "a", 4, 50);
    check_queues(&sw, "b", 4, 50);
    let s = sw.stats().unwrap();
    assert!(s.pmds.iter().all(|p| p.packets > 0), "both threads moved packets: {:?}", s.pmds);
}

#[test]
fn test_more_queue_pairs_than_the_port_offers_are_refused() {
    let dir = Scratch::new("mq-refuse");
    let sw = start(&dir, &["a", "b,queues=2"], 0);
    let e = Frontend::connect(&e2e_tests::sock(&dir, "a"), pairs(2), T).err().expect("refused");
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    let e = Frontend::connect(&e2e_tests::sock(&dir, "b"), pairs(3), T).err().expect("refused");
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    // The ports are still usable afterwards.
    let _fa = connect(&dir, "a", pairs(1));
    let _fb = connect(&dir, "b", pairs(2));
    assert!(e2e_tests::wait_until(T, || sw.ports().unwrap().iter().all(|p| p.connected)));
}

/// A guest may use fewer queue pairs than its port offers (Linux: `ethtool -L eth0 combined 1`;
/// QEMU then enables only those vrings). Traffic to it must use the pairs it enabled.
fn fewer_pairs_than_offered(pmds: usize) {
    let dir = Scratch::new(&format!("mq-fewer-{pmds}"));
    let sw = start(&dir, &["a,queues=2", "b,queues=2"], pmds);
    let mut fa = connect(&dir, "a", pairs(1));
    let mut fb = connect(&dir, "b", pairs(2));
    assert_eq!(port_info(&sw, "a").device.running_queues, vec![0, 1]);
    // B sends on both of its TX queues to A, which only has RX queue 0.
    all_queues(&mut fb, &mut fa, mac(0xb), mac(0xa), 50);
    all_queues(&mut fa, &mut fb, mac(0xa), mac(0xb), 50);
    let s = sw.stats().unwrap();
    assert_eq!(find(&s, "a").tx.drop_no_buffer, 0);
}

#[test]
fn test_guest_using_fewer_pairs_than_offered_one_polling_thread() {
    fewer_pairs_than_offered(1);
}

#[test]
fn test_guest_using_fewer_pairs_than_offered_two_polling_threads() {
    fewer_pairs_than_offered(2);
}
