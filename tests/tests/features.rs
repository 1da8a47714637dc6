//! Negotiated features and buffer layouts through real vhost-user connections: mergeable and
//! single-buffer receivers, contiguous / split-header / indirect senders, legacy 10-byte
//! headers, EVENT_IDX on and off, jumbo frames. Every frame must arrive byte for byte.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use e2e_tests::{
    assert_one_copy_each, connect, drain, find, frame_of_size, mac, port_info, recv_n, send, start_switch,
    wait_stats, Scratch,
};
use vswitch_bench::frontend::{
    feature_names, FrontendConfig, VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};

const T: Duration = Duration::from_secs(5);
const SIZES: [usize; 14] = [60, 61, 64, 100, 127, 128, 255, 256, 511, 1000, 1023, 1024, 1500, 1514];

#[derive(Clone, Copy, Debug)]
enum Tx {
    Contiguous,
    SplitHeader,
    Indirect,
    /// No VERSION_1, no MRG_RXBUF: 10-byte header.
    Legacy,
    LegacySplit,
}

#[derive(Clone, Copy, Debug)]
enum Rx {
    /// MRG_RXBUF with buffers of this size (header included).
    Mergeable(u32),
    /// VERSION_1 without MRG_RXBUF: one buffer per frame.
    Single(u32),
    /// Legacy, one buffer per frame, 10-byte header.
    Legacy(u32),
}

fn tx_cfg(t: Tx, event_idx: bool, tx_buf: u32) -> FrontendConfig {
    let mut c = FrontendConfig { event_idx, tx_buf_size: tx_buf, ..FrontendConfig::default() };
    match t {
        Tx::Contiguous => {}
        Tx::SplitHeader => c.split_header = true,
        Tx::Indirect => c.indirect = true,
        Tx::Legacy => (c.version_1, c.mrg_rxbuf) = (false, false),
        Tx::LegacySplit => (c.version_1, c.mrg_rxbuf, c.split_header) = (false, false, true),
    }
    c.mem_size = c.required_mem_size().max(c.mem_size);
    c
}

fn rx_cfg(r: Rx, event_idx: bool) -> FrontendConfig {
    let mut c = FrontendConfig { event_idx, ..FrontendConfig::default() };
    match r {
        Rx::Mergeable(b) => c.rx_buf_size = b,
        Rx::Single(b) => (c.mrg_rxbuf, c.rx_buf_size) = (false, b),
        Rx::Legacy(b) => (c.version_1, c.mrg_rxbuf, c.rx_buf_size) = (false, false, b),
    }
    c.mem_size = c.required_mem_size().max(c.mem_size);
    c
}

/// One switch, sender on port a, receiver on port b; every size goes a -> b and must arrive
/// intact, in order, with exact counters.
fn run(tx: Tx, rx: Rx, event_idx: bool, sizes: &[usize]) {
    let case = format!("{tx:?} -> {rx:?}, EVENT_IDX {event_idx}");
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let dir = Scratch::new(&format!("features-{}", RUNS.fetch_add(1, Ordering::Relaxed)));
    let sw = start_switch(&dir, &["a", "b"]);
    let tx_buf = 12 + sizes.iter().max().copied().unwrap_or(0).max(2036) as u32;
    let mut fa = connect(&dir, "a", tx_cfg(tx, event_idx, tx_buf));
    let mut fb = connect(&dir, "b", rx_cfg(rx, event_idx));

    // Negotiated as asked, on both sides of the connection.
    let (nfa, nfb) = (fa.negotiated_features(), fb.negotiated_features());
    assert_eq!(nfa & VIRTIO_RING_F_EVENT_IDX != 0, event_idx, "{case}: {}", feature_names(nfa));
    assert_eq!(nfa & VIRTIO_RING_F_INDIRECT_DESC != 0, matches!(tx, Tx::Indirect), "{case}");
    assert_eq!(nfb & VIRTIO_NET_F_MRG_RXBUF != 0, matches!(rx, Rx::Mergeable(_)), "{case}");
    let legacy_tx = matches!(tx, Tx::Legacy | Tx::LegacySplit);
    assert_eq!(fa.hdr_len(), if legacy_tx { 10 } else { 12 }, "{case}");
    assert_eq!(fb.hdr_len(), if matches!(rx, Rx::Legacy(_)) { 10 } else { 12 }, "{case}");
    assert_eq!(nfb & VIRTIO_F_VERSION_1 != 0, !matches!(rx, Rx::Legacy(_)), "{case}");
    let info = port_info(&sw, "b");
    assert_eq!(info.device.features.contains(&"EVENT_IDX".to_string()), event_idx, "{case}: {info:?}");
    assert_eq!(
        info.device.features.contains(&"MRG_RXBUF".to_string()),
        matches!(rx, Rx::Mergeable(_)),
        "{case}"
    );

    let frames: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| frame_of_size(mac(0xb), mac(0xa), None, n, i as u64))
        .collect();
    for f in &frames {
        send(&mut fa, 0, f);
    }
    let got = recv_n(&mut fb, frames.len(), T);
    assert_eq!(got.len(), frames.len(), "{case}: frames arrived");
    for (g, f) in got.iter().zip(&frames) {
        assert!(g == f, "{case}: {}-byte frame arrived as {} bytes or altered", f.len(), g.len());
    }
    assert!(drain(&mut fb, Duration::from_millis(20)).is_empty(), "{case}: nothing else");
    let n = frames.len() as u64;
    let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
    let s = wait_stats(&sw, T, |s| find(s, "b").tx.packets == n && find(s, "a").rx.packets == n);
    let (a, b) = (find(&s, "a"), find(&s, "b"));
    assert_eq!((a.rx.packets, a.rx.bytes, a.rx.drop_malformed), (n, bytes, 0), "{case}");
    assert_eq!(
        (b.tx.packets, b.tx.bytes, b.tx.bytes_copied, b.tx.drop_no_buffer),
        (n, bytes, bytes, 0),
        "{case}"
    );
    assert_one_copy_each(&s);
    let (sa, sb) = (fa.stats(0), fb.stats(0));
    assert_eq!((sa.tx_errors, sb.rx_errors), (0, 0), "{case}: the switch's used entries were sound");
    assert_eq!(fa.tx_completed(0), n, "{case}");
    let rx_buf = match rx {
        Rx::Mergeable(b) | Rx::Single(b) | Rx::Legacy(b) => b as usize,
    };
    let need_merge = sizes.iter().filter(|&&s| s + fb.hdr_len() > rx_buf).count() as u64;
    assert_eq!(sb.rx_merged, need_merge, "{case}: frames spanning several buffers");
}

#[test]
fn test_standard_sizes_across_layouts_and_receivers() {
    let cases = [
        (Tx::Contiguous, Rx::Mergeable(2048), false),
        (Tx::Contiguous, Rx::Mergeable(256), true),
        (Tx::SplitHeader, Rx::Single(2048), false),
        (Tx::SplitHeader, Rx::Mergeable(512), true),
        (Tx::Indirect, Rx::Mergeable(256), true),
        (Tx::Indirect, Rx::Single(1526), false),
        (Tx::Legacy, Rx::Mergeable(2048), false),
        (Tx::Legacy, Rx::Mergeable(128), true),
        (Tx::Contiguous, Rx::Legacy(2048), true),
        (Tx::LegacySplit, Rx::Legacy(1524), false),
        (Tx::Indirect, Rx::Legacy(2048), true),
    ];
    for (tx, rx, ev) in cases {
        run(tx, rx, ev, &SIZES);
    }
}

#[test]
fn test_jumbo_frames_up_to_the_switch_maximum() {
    let sizes = [1514, 4000, 9000, 9216, 9220];
    let cases = [
        (Tx::Contiguous, Rx::Mergeable(2048), false),
        (Tx::SplitHeader, Rx::Mergeable(4096), true),
        (Tx::Indirect, Rx::Single(9232), true),
        (Tx::Legacy, Rx::Legacy(9230), false),
    ];
    for (tx, rx, ev) in cases {
        run(tx, rx, ev, &sizes);
    }
}

#[test]
fn test_frames_that_do_not_fit_are_dropped_and_counted_not_truncated() {
    let dir = Scratch::new("features-limits");
    let sw = start_switch(&dir, &["a", "b"]);
    let mut fa = connect(&dir, "a", tx_cfg(Tx::Contiguous, false, 9300));
    let mut fb = connect(&dir, "b", rx_cfg(Rx::Single(2048), false));
    let (ma, mb) = (mac(0xa), mac(0xb));
    // Larger than the switch's largest frame (9220 bytes): malformed at the sender's port.
    send(&mut fa, 0, &frame_of_size(mb, ma, None, 9221, 1));
    // Fits the switch but not one 2048-byte buffer of a receiver without MRG_RXBUF.
    send(&mut fa, 0, &frame_of_size(mb, ma, None, 2037, 2));
    // Exactly one buffer: fine; and the buffers skipped above were left for later frames.
    let ok = [frame_of_size(mb, ma, None, 2036, 3), frame_of_size(mb, ma, None, 60, 4)];
    for f in &ok {
        send(&mut fa, 0, f);
    }
    let got = recv_n(&mut fb, 2, T);
    assert!(got == ok, "only the frames that fit arrive, intact");
    assert!(drain(&mut fb, Duration::from_millis(30)).is_empty());
    let s = wait_stats(&sw, T, |s| {
        let a = find(s, "a");
        a.rx.packets + a.rx.drop_malformed == 4 && find(s, "b").tx.drop_no_buffer == 1
    });
    let (a, b) = (find(&s, "a"), find(&s, "b"));
    assert_eq!((a.rx.packets, a.rx.drop_malformed), (3, 1));
    assert_eq!((b.tx.packets, b.tx.drop_no_buffer), (2, 1));
    assert_eq!(fa.tx_completed(0), 4, "every TX buffer returned, dropped or not");
    assert_eq!(fb.stats(0).rx_errors, 0);
}

/// The switch interrupts a guest only when it asked (flag or used_event) and wakes for kicks.
fn interrupts_and_kicks(event_idx: bool) {
    let dir = Scratch::new(&format!("features-irq-{event_idx}"));
    let sw = start_switch(&dir, &["a", "b"]);
    let cfg = FrontendConfig { event_idx, ..FrontendConfig::default() };
    let mut fa = connect(&dir, "a", cfg.clone());
    let mut fb = connect(&dir, "b", cfg);
    let (ma, mb) = (mac(0xa), mac(0xb));
    // B is not waiting: it has notifications off. No interrupt for 50 frames.
    for i in 0..50 {
        send(&mut fa, 0, &frame_of_size(mb, ma, None, 100, i));
    }
    let s = wait_stats(&sw, T, |s| find(s, "b").tx.packets == 50);
    assert_eq!(find(&s, "b").tx.packets, 50);
    assert_eq!(find(&s, "b").tx.interrupts, 0, "EVENT_IDX {event_idx}: B suppressed interrupts");
    assert_eq!(drain(&mut fb, Duration::from_millis(10)).len(), 50);

    // B waits (notifications on); frames trickle in while it sleeps: it is woken by the switch.
    // Each frame also finds the switch idle (asleep), so A's kick must wake it.
    let mut latencies = Vec::new();
    std::thread::scope(|s| {
        let rx = s.spawn(|| {
            let calls = fb.stats(0).rx_calls;
            let got = fb.recv_frames(0, 5, T);
            (got.len(), fb.stats(0).rx_calls - calls)
        });
        for i in 0..5 {
            std::thread::sleep(Duration::from_millis(150));
            let t = Instant::now();
            let kicks = fa.stats(0).tx_kicks;
            send(&mut fa, 0, &frame_of_size(mb, ma, None, 100, 100 + i));
            assert!(fa.stats(0).tx_kicks > kicks, "EVENT_IDX {event_idx}: an idle switch asks for kicks");
            let want = 51 + i;
            wait_stats(&sw, T, |s| find(s, "b").tx.packets == want);
            latencies.push(t.elapsed());
        }
        let (n, calls) = rx.join().unwrap();
        assert_eq!(n, 5, "EVENT_IDX {event_idx}");
        assert!(calls >= 1, "EVENT_IDX {event_idx}: B was never woken by the switch");
    });
    let s = sw.stats().unwrap();
    let irqs = find(&s, "b").tx.interrupts;
    assert!((1..=5).contains(&irqs), "EVENT_IDX {event_idx}: {irqs} interrupts for 5 awaited frames");
    latencies.sort();
    // A lost kick costs the switch's longest sleep (100 ms); a working one well under that.
    assert!(
        latencies[2] < Duration::from_millis(50),
        "EVENT_IDX {event_idx}: idle switch slow to pick up kicked frames: {latencies:?}"
    );
}

#[test]
fn test_interrupts_and_kicks_without_event_idx() {
    interrupts_and_kicks(false);
}

#[test]
fn test_interrupts_and_kicks_with_event_idx() {
    interrupts_and_kicks(true);
}
