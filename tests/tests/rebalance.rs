//! Source queues move between polling threads while traffic flows, by the user's pin
//! (`queue-pin`) or by the load the threads measure (`rebalance`, and by itself): nothing is
//! lost, nothing reordered, and the measured load is what places them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use e2e_tests::{
    connect_default, drain, frame_of_size, init_log, mac, recv_n, send, switch_config, wait_stats, Scratch,
};
use vswitch::control::{RebalanceReport, Request, Stats};
use vswitch::{Switch, SwitchConfig};
use vswitch_bench::frontend::Frontend;

const T: Duration = Duration::from_secs(20);
/// Frames in flight per stream (the receive ring has 256 buffers).
const WINDOW: u64 = 128;

fn start(dir: &Scratch, specs: &[&str], tune: impl FnOnce(&mut SwitchConfig)) -> Switch {
    init_log();
    let mut cfg =
        SwitchConfig { pmd_cores: vec![0, 1], rebalance_interval_secs: Some(0), ..switch_config(dir, specs) };
    tune(&mut cfg);
    Switch::start(cfg).expect("switch starts")
}

fn frame(src: [u8; 6], dst: [u8; 6], i: u64) -> Vec<u8> {
    frame_of_size(dst, src, None, 60 + (i as usize * 97) % 1455, i)
}

/// Frames from one frontend to another, sent and received on threads of their own until
/// stopped. The sender stays at most [`WINDOW`] frames ahead of the receiver, so the receive
/// ring never runs out of buffers however slowly the receiving thread gets a CPU: any frame
/// missing was lost by the switch.
struct Stream {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    tx: JoinHandle<Frontend>,
    rx: JoinHandle<(Frontend, Vec<Vec<u8>>)>,
    src: [u8; 6],
    dst: [u8; 6],
}

fn stream(mut from: Frontend, mut to: Frontend, src: [u8; 6], dst: [u8; 6]) -> Stream {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    // Set by the sender once `sent` is final: `stop` alone may be seen while a last batch is
    // still going out, and the receiver would end before it.
    let sender_done = Arc::new(AtomicBool::new(false));
    let tx = std::thread::spawn({
        let (stop, sent, received, sender_done) =
            (stop.clone(), sent.clone(), received.clone(), sender_done.clone());
        move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                if i - received.load(Ordering::Acquire) > WINDOW - 32 {
                    std::thread::sleep(Duration::from_micros(100));
                    continue;
                }
                for _ in 0..32 {
                    send(&mut from, 0, &frame(src, dst, i));
                    i += 1;
                }
                sent.store(i, Ordering::Release);
                // Leave the two CPUs some room for the switch's threads.
                std::thread::sleep(Duration::from_micros(200));
            }
            sender_done.store(true, Ordering::Release);
            from
        }
    });
    let rx = std::thread::spawn({
        let (sent, received) = (sent.clone(), received.clone());
        move || {
            let deadline = Instant::now() + T;
            let mut got = Vec::new();
            loop {
                let done =
                    sender_done.load(Ordering::Acquire) && got.len() as u64 >= sent.load(Ordering::Acquire);
                if done || Instant::now() > deadline {
                    return (to, got);
                }
                got.extend(recv_n(&mut to, 1, Duration::from_millis(20)));
                received.store(got.len() as u64, Ordering::Release);
            }
        }
    });
    Stream { stop, sent, tx, rx, src, dst }
}

impl Stream {
    /// Stops sending; checks every frame sent arrived, intact and in order. Returns the
    /// frontends and how many frames went.
    fn finish(self) -> (Frontend, Frontend, u64) {
        self.stop.store(true, Ordering::Release);
        let from = self.tx.join().expect("sender");
        let (to, got) = self.rx.join().expect("receiver");
        let n = self.sent.load(Ordering::Acquire);
        assert_eq!(
            got.len() as u64,
            n,
            "frames {:x?} -> {:x?}: {} of {n} arrived",
            self.src,
            self.dst,
            got.len()
        );
        for (i, g) in got.iter().enumerate() {
            assert!(
                *g == frame(self.src, self.dst, i as u64),
                "frame {i} of {n} arrived altered or out of order"
            );
        }
        (from, to, n)
    }
}

/// The polling thread that polls `port`'s queue pair 0, and whether it is pinned there.
fn owner(s: &Stats, port: &str) -> (usize, bool) {
    s.pmds
        .iter()
        .find_map(|p| {
            p.queues.iter().find(|q| q.port == port && q.queue_pair == 0).map(|q| (p.pmd, q.pinned))
        })
        .unwrap_or_else(|| panic!("no thread polls {port}: {:?}", s.pmds))
}

fn load(s: &Stats, port: &str) -> f64 {
    s.pmds.iter().flat_map(|p| &p.queues).find(|q| q.port == port).map_or(0.0, |q| q.load_pct)
}

fn pin(sw: &Switch, port: &str, pmd: Option<usize>) -> serde_json::Value {
    sw.request(Request::QueuePin { name: port.into(), queue_pair: 0, pmd }).expect("queue-pin")
}

/// Ports a, b, c, d with a's and c's queue on thread 0, b's and d's on thread 1 (new queues
/// go to the thread with the fewest), MACs learned, and streams a -> b and c -> d running.
fn four_ports(dir: &Scratch, tune: impl FnOnce(&mut SwitchConfig)) -> (Switch, Stream, Stream) {
    let sw = start(dir, &["a", "b", "c", "d"], tune);
    let mut f: Vec<Frontend> = ["a", "b", "c", "d"].iter().map(|n| connect_default(dir, n)).collect();
    let macs = [mac(0xa), mac(0xb), mac(0xc), mac(0xd)];
    // Each announces itself with a broadcast (so the streams are unicast), and every copy of
    // those is taken out of the way.
    for (fe, m) in f.iter_mut().zip(macs) {
        send(fe, 0, &frame(m, [0xff; 6], 1 << 40));
    }
    for fe in &mut f {
        assert_eq!(drain(fe, Duration::from_millis(50)).len(), 3, "the other three ports' broadcasts");
    }
    let s = sw.stats().unwrap();
    let owners: Vec<_> = ["a", "b", "c", "d"].iter().map(|n| owner(&s, n)).collect();
    assert_eq!(owners, [(0, false), (1, false), (0, false), (1, false)], "placed by count: {:?}", s.pmds);
    let mut f = f.into_iter();
    let (a, b, c, d) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
    let ab = stream(a, b, macs[0], macs[1]);
    let cd = stream(c, d, macs[2], macs[3]);
    (sw, ab, cd)
}

/// Switch counters agree with what the streams saw: every frame the sources sent was
/// forwarded once, none dropped.
fn counted(sw: &Switch, ab: u64, cd: u64) {
    let s = wait_stats(sw, Duration::from_secs(5), |s| {
        e2e_tests::find(s, "b").tx.packets >= ab && e2e_tests::find(s, "d").tx.packets >= cd
    });
    for (src, dst, n) in [("a", "b", ab), ("c", "d", cd)] {
        // And the broadcasts: one from each port, three to each.
        assert_eq!(e2e_tests::find(&s, src).rx.packets, n + 1, "{src}'s frames taken: {:?}", s.ports);
        assert_eq!(e2e_tests::find(&s, dst).tx.packets, n + 3, "{dst}'s frames delivered: {:?}", s.ports);
    }
    e2e_tests::assert_one_copy_each(&s);
}

#[test]
fn test_queues_pinned_from_thread_to_thread_100_times_under_traffic_lose_and_reorder_nothing() {
    let dir = Scratch::new("rebal-pin");
    let (sw, ab, cd) = four_ports(&dir, |_| {});
    for i in 0..100usize {
        // a's and c's queues swap threads each round, so a burst of each may be under way on
        // one thread while the other is told to take the queue.
        assert_eq!(pin(&sw, "a", Some((i + 1) % 2))["pmd"], (i + 1) % 2);
        assert_eq!(pin(&sw, "c", Some(i % 2))["pmd"], i % 2);
        std::thread::sleep(Duration::from_millis(3));
    }
    let (_, _, n_ab) = ab.finish();
    let (_, _, n_cd) = cd.finish();
    assert!(n_ab > 1000 && n_cd > 1000, "traffic flowed through the moves: {n_ab} and {n_cd} frames");
    counted(&sw, n_ab, n_cd);
    let s = sw.stats().unwrap();
    // i = 99: a on thread 0, c on thread 1, both pinned; b and d where they were.
    let owners: Vec<_> = ["a", "b", "c", "d"].iter().map(|n| owner(&s, n)).collect();
    assert_eq!(owners, [(0, true), (1, false), (1, true), (1, false)]);
    assert!(s.pmds.iter().all(|p| p.packets > 0), "both threads polled: {:?}", s.pmds);
    // A pinned queue stays through a rebalance, whatever the loads say.
    std::thread::sleep(Duration::from_millis(1100));
    let r: RebalanceReport = serde_json::from_value(sw.request(Request::Rebalance).unwrap()).unwrap();
    assert!(r.moves.iter().all(|m| m.port != "a" && m.port != "c"), "{r:?}");
    // Refusals say what was wrong.
    let e = sw.request(Request::QueuePin { name: "a".into(), queue_pair: 0, pmd: Some(2) }).unwrap_err();
    assert!(e.to_string().contains("no polling thread 2") && e.to_string().contains("runs 2"), "{e}");
    let e = sw.request(Request::QueuePin { name: "a".into(), queue_pair: 1, pmd: Some(0) }).unwrap_err();
    assert!(e.to_string().contains("no queue pair 1"), "{e}");
    // Unpinned, it is rebalancing's again (and stays where it is until then).
    assert_eq!(pin(&sw, "a", None)["pmd"], 0);
    assert_eq!(owner(&sw.stats().unwrap(), "a"), (0, false));
}

/// Waits until both a's and c's queue show load in the thread's window (sampled each second).
fn until_loaded(sw: &Switch) -> Stats {
    let s = wait_stats(sw, Duration::from_secs(10), |s| load(s, "a") > 0.0 && load(s, "c") > 0.0);
    assert!(load(&s, "a") > 0.0 && load(&s, "c") > 0.0, "loads measured: {:?}", s.pmds);
    s
}

#[test]
fn test_rebalance_splits_two_busy_queues_sharing_a_thread_by_measured_load_under_traffic() {
    let dir = Scratch::new("rebal-load");
    let (sw, ab, cd) = four_ports(&dir, |_| {});
    let s = until_loaded(&sw);
    // Both busy queues on thread 0; thread 1 polls only idle ones (their broadcasts aside).
    assert!(s.pmds[0].load_pct > 10.0 * s.pmds[1].load_pct, "{:?}", s.pmds);
    let r: RebalanceReport = serde_json::from_value(sw.request(Request::Rebalance).unwrap()).unwrap();
    assert!(r.applied, "{r:?}");
    assert_eq!(r.moves.len(), 1, "one of the two busy queues moves: {r:?}");
    let m = &r.moves[0];
    assert!((m.port == "a" || m.port == "c") && m.from == 0 && m.to == 1 && m.load_pct > 0.0, "{r:?}");
    assert!(r.improvement_pct > 0.0 && r.after_pct[1] > 0.0, "{r:?}");
    // Traffic goes on after the move, on both threads.
    std::thread::sleep(Duration::from_millis(300));
    let (_, _, n_ab) = ab.finish();
    let (_, _, n_cd) = cd.finish();
    counted(&sw, n_ab, n_cd);
    let s = sw.stats().unwrap();
    assert_ne!(owner(&s, "a").0, owner(&s, "c").0, "{:?}", s.pmds);
    // Balanced now: asking again moves nothing, and says why.
    let r: RebalanceReport = serde_json::from_value(sw.request(Request::Rebalance).unwrap()).unwrap();
    assert!(!r.applied && r.why.contains("no better assignment"), "{r:?}");
}

#[test]
fn test_the_switch_rebalances_by_itself_when_a_thread_is_loaded() {
    let dir = Scratch::new("rebal-auto");
    let (sw, ab, cd) = four_ports(&dir, |c| {
        c.rebalance_interval_secs = Some(1);
        // Any load counts (this test's streams are paced; a real threshold is 70 %).
        c.rebalance_load_pct = Some(0);
    });
    until_loaded(&sw);
    let s = wait_stats(&sw, Duration::from_secs(10), |s| owner(s, "a").0 != owner(s, "c").0);
    assert_ne!(owner(&s, "a").0, owner(&s, "c").0, "moved without being asked: {:?}", s.pmds);
    let (_, _, n_ab) = ab.finish();
    let (_, _, n_cd) = cd.finish();
    counted(&sw, n_ab, n_cd);
}

#[test]
fn test_one_polling_thread_has_nothing_to_rebalance() {
    let dir = Scratch::new("rebal-one");
    init_log();
    let sw = Switch::start(switch_config(&dir, &["a"])).expect("switch starts");
    let r: RebalanceReport = serde_json::from_value(sw.request(Request::Rebalance).unwrap()).unwrap();
    assert!(!r.applied && r.why.contains("one polling thread"), "{r:?}");
}

#[test]
fn test_a_ports_pmd_option_pins_its_queues_where_it_says() {
    let dir = Scratch::new("rebal-opt");
    let sw = start(&dir, &["a,pmd=1", "b,queues=2,pmd=0:1", "c"], |_| {});
    let s = sw.stats().unwrap();
    let place = |port: &str, pair: u16| {
        s.pmds
            .iter()
            .find_map(|p| {
                p.queues.iter().find(|q| q.port == port && q.queue_pair == pair).map(|q| (p.pmd, q.pinned))
            })
            .unwrap_or_else(|| panic!("no thread polls {port}/{pair}: {:?}", s.pmds))
    };
    assert_eq!(place("a", 0), (1, true));
    assert_eq!((place("b", 0), place("b", 1)), ((0, true), (1, true)));
    assert_eq!(place("c", 0), (0, false), "an unpinned queue goes to the thread with fewest");
    // A thread that does not exist is refused, at start and at port-add, saying how many do.
    let e = sw.add_port(e2e_tests::port_config(&dir, "d,pmd=2")).unwrap_err().to_string();
    assert!(e.contains("pmd=2: the switch runs 2 polling thread(s)"), "{e}");
    assert!(!e2e_tests::sock(&dir, "d").exists(), "nothing of the refused port was left behind");
    let other = Scratch::new("rebal-opt2");
    let cfg = SwitchConfig { pmd_cores: vec![0], ..switch_config(&other, &["x,pmd=1"]) };
    let e = Switch::start(cfg).err().expect("refused").to_string();
    assert!(e.contains("pmd=1: the switch runs 1 polling thread(s)"), "{e}");
    let e = vswitch::PortConfig::parse("y=/tmp/y.sock,queues=3,pmd=0:1").unwrap_err().to_string();
    assert!(e.contains("pmd= names 2 polling threads for 3 queue pairs"), "{e}");
}
