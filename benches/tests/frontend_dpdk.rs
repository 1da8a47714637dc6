//! The vhost-user frontend against a real backend: DPDK's vhost PMD inside
//! `dpdk-testpmd` in io forwarding mode (port 0 <-> port 1).
//!
//! Each test starts its own testpmd (they run one at a time: testpmd busy-polls
//! a core), connects two frontends, pushes sequence-numbered frames both ways
//! and checks that every frame arrives exactly once and bit-for-bit intact.
//! Skipped with a message when `dpdk-testpmd` is not on PATH.

use std::collections::HashSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use vswitch_bench::frame::{build_frame, frame_len, verify_frame, write_frame};
use vswitch_bench::frontend::{
    feature_names, Frontend, FrontendConfig, RawDesc, VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
/// Frames per direction and configuration.
const FRAMES: u64 = 1000;
/// Sequence numbers at and above this are warm-up probes.
const PROBE_BASE: u64 = 1 << 60;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// testpmd instances must not overlap.
static SERIAL: Mutex<()> = Mutex::new(());
static INSTANCE: AtomicU32 = AtomicU32::new(0);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// A running testpmd, stopped (SIGINT, then SIGKILL) and cleaned up on drop.
struct Testpmd {
    child: Child,
    prefix: String,
    dir: PathBuf,
}

impl Testpmd {
    /// Starts testpmd with two vhost ports whose sockets live in a fresh
    /// directory. `client`: testpmd connects to us instead of listening.
    /// Returns `None` (after printing why) if testpmd is not installed.
    fn start(queues: u16, client: bool) -> Option<Testpmd> {
        if !on_path("dpdk-testpmd") {
            eprintln!("SKIP: dpdk-testpmd not on PATH; DPDK frontend tests not run");
            return None;
        }
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("fetest{}_{n}", std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create socket dir");
        let log = fs::File::create(dir.join("testpmd.log")).expect("create log");
        let vdev = |i: u32| {
            format!(
                "net_vhost{i},iface={},queues={queues}{}",
                dir.join(format!("vh{i}.sock")).display(),
                if client { ",client=1" } else { "" }
            )
        };
        // `timeout` is a safety net should this process die without running
        // Drop; it relays our SIGINT to testpmd.
        let child = Command::new("timeout")
            .args(["-s", "KILL", "60", "dpdk-testpmd"])
            // testpmd needs a main lcore plus one forwarding lcore.
            .args(["-l", "0,1", "--no-pci", "--no-huge", "-m", "512"])
            .args(["--file-prefix", &prefix, "--no-telemetry"])
            .args(["--vdev", &vdev(0), "--vdev", &vdev(1)])
            .args(["--", "--forward-mode=io", "--auto-start", "--nb-cores=1"])
            .arg(format!("--rxq={queues}"))
            .arg(format!("--txq={queues}"))
            .args(["--total-num-mbufs=16384", "--disable-link-check"])
            // Non-interactive: without a stats period testpmd waits for Enter
            // on stdin and exits at once on EOF.
            .args(["--stats-period", "3600"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn testpmd");
        Some(Testpmd { child, prefix, dir })
    }

    fn sock(&self, i: u32) -> PathBuf {
        self.dir.join(format!("vh{i}.sock"))
    }

    /// Waits (bounded) until testpmd has created both listening sockets.
    fn wait_sockets(&mut self) {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        while !(self.sock(0).exists() && self.sock(1).exists()) {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("testpmd exited early ({st}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "testpmd sockets did not appear:\n{}", self.log());
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(self.dir.join("testpmd.log")) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(200)..].join("\n")
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: plain kill(2) on the PID of our own, not yet reaped child.
            unsafe { libc::kill(pid, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() >= deadline {
                    let _ = self.child.kill(); // SIGKILL
                    let _ = self.child.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        if thread::panicking() || std::env::var_os("FRONTEND_DPDK_LOG").is_some() {
            eprintln!("---- testpmd log (tail) ----\n{}", self.log());
        }
        let mut runtime_dirs = vec![PathBuf::from("/var/run/dpdk"), PathBuf::from("/tmp/dpdk")];
        if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
            runtime_dirs.push(Path::new(&x).join("dpdk"));
        }
        for d in runtime_dirs {
            let _ = fs::remove_dir_all(d.join(&self.prefix));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Frame number `seq` sent from `src` to `dst`: sizes from 60 to ~1500
/// bytes, every third one VLAN-tagged.
fn test_frame(buf: &mut [u8], dst: [u8; 6], src: [u8; 6], seq: u64) -> usize {
    let vlan = match seq % 3 {
        0 => Some((seq % 4094 + 1) as u16),
        _ => None,
    };
    let payload = (seq as usize * 37) % 1440;
    write_frame(buf, dst, src, vlan, payload, seq)
}

/// Receive-side bookkeeping for one direction.
struct Sink {
    src: [u8; 6],
    dst: [u8; 6],
    seen: HashSet<u64>,
    probes: u64,
}

impl Sink {
    fn new(src: [u8; 6], dst: [u8; 6]) -> Sink {
        Sink { src, dst, seen: HashSet::new(), probes: 0 }
    }

    fn check(&mut self, frame: &[u8], what: &str) {
        let seq =
            verify_frame(frame).unwrap_or_else(|| panic!("{what}: corrupt frame of {} bytes", frame.len()));
        if seq >= PROBE_BASE {
            self.probes += 1;
            return;
        }
        let mut expect = vec![0u8; 2048];
        let n = test_frame(&mut expect, self.dst, self.src, seq);
        assert_eq!(frame, &expect[..n], "{what}: frame {seq} differs");
        assert!(self.seen.insert(seq), "{what}: frame {seq} received twice");
    }
}

/// Sends probes both ways until each side has received one: DPDK drops
/// frames for a vhost port whose device is not running yet, and the device
/// starts only after our last setup message was answered.
fn warm_up(a: &mut Frontend, b: &mut Frontend, q: u16, ab: &mut Sink, ba: &mut Sink) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seq = PROBE_BASE;
    while ab.probes == 0 || ba.probes == 0 {
        assert!(Instant::now() < deadline, "no traffic through testpmd");
        a.send(q, &build_frame(MAC_B, MAC_A, None, 20, seq));
        b.send(q, &build_frame(MAC_A, MAC_B, None, 20, seq));
        seq += 1;
        thread::sleep(Duration::from_millis(2));
        b.poll_rx(q, |f| ab.check(f, "warm-up A->B"));
        a.poll_rx(q, |f| ba.check(f, "warm-up B->A"));
    }
    // Let stragglers arrive, then drain them.
    thread::sleep(Duration::from_millis(20));
    b.poll_rx(q, |f| ab.check(f, "warm-up A->B"));
    a.poll_rx(q, |f| ba.check(f, "warm-up B->A"));
}

/// Pushes `FRAMES` frames each way on queue `q`, keeping at most `window`
/// in flight per direction so testpmd never meets a full RX ring, and checks
/// they all arrive intact and exactly once.
fn exchange(a: &mut Frontend, b: &mut Frontend, q: u16, window: u64, what: &str) {
    let mut ab = Sink::new(MAC_A, MAC_B);
    let mut ba = Sink::new(MAC_B, MAC_A);
    warm_up(a, b, q, &mut ab, &mut ba);
    let base_a = a.stats(q);
    let base_b = b.stats(q);

    let mut buf = vec![0u8; 2048];
    let (mut sent_a, mut sent_b) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(20);
    while (ab.seen.len() as u64) < FRAMES || (ba.seen.len() as u64) < FRAMES {
        assert!(
            Instant::now() < deadline,
            "{what}: timeout: A->B {}/{FRAMES}, B->A {}/{FRAMES} (sent {sent_a}/{sent_b})",
            ab.seen.len(),
            ba.seen.len()
        );
        while sent_a < FRAMES && sent_a - (ab.seen.len() as u64) < window {
            let n = test_frame(&mut buf, MAC_B, MAC_A, sent_a);
            if !a.enqueue_tx(q, &buf[..n]) {
                break;
            }
            sent_a += 1;
        }
        a.flush_tx(q);
        while sent_b < FRAMES && sent_b - (ba.seen.len() as u64) < window {
            let n = test_frame(&mut buf, MAC_A, MAC_B, sent_b);
            if !b.enqueue_tx(q, &buf[..n]) {
                break;
            }
            sent_b += 1;
        }
        b.flush_tx(q);
        let got = b.poll_rx(q, |f| ab.check(f, &format!("{what} A->B")))
            + a.poll_rx(q, |f| ba.check(f, &format!("{what} B->A")));
        if got == 0 {
            thread::yield_now();
        }
    }

    // Every TX buffer comes back, and nobody saw malformed ring entries.
    let deadline = Instant::now() + Duration::from_secs(5);
    for (fe, base, name) in [(&mut *a, base_a, "A"), (&mut *b, base_b, "B")] {
        let sent = fe.stats(q).tx_enqueued;
        while fe.tx_completed(q) < sent {
            assert!(Instant::now() < deadline, "{what}: {name} TX not all completed");
            thread::sleep(Duration::from_millis(1));
        }
        fe.reclaim_tx(q);
        let s = fe.stats(q);
        assert_eq!(s.tx_enqueued - base.tx_enqueued, FRAMES, "{what}: {name} sent");
        assert_eq!(s.tx_completed, s.tx_enqueued, "{what}: {name} completed");
        assert_eq!(s.rx_frames - base.rx_frames, FRAMES, "{what}: {name} received");
        assert_eq!((s.tx_errors, s.rx_errors), (0, 0), "{what}: {name} ring errors");
        let bytes: u64 =
            (0..FRAMES).map(|seq| frame_len(seq % 3 == 0, (seq as usize * 37) % 1440) as u64).sum();
        assert_eq!(s.rx_bytes - base.rx_bytes, bytes, "{what}: {name} bytes");
    }
}

/// Connects A and B, checks negotiation, exchanges traffic, stops the rings.
fn run_config(pmd: &Testpmd, cfg: FrontendConfig, window: u64, what: &str) {
    let mut a = Frontend::connect(&pmd.sock(0), cfg.clone(), CONNECT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: connect A: {e}"));
    let mut b = Frontend::connect(&pmd.sock(1), cfg.clone(), CONNECT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: connect B: {e}"));
    check_negotiation(&a, &cfg, what);
    for q in 0..cfg.queue_pairs {
        exchange(&mut a, &mut b, q, window, &format!("{what} q{q}"));
        if cfg.mrg_rxbuf && cfg.rx_buf_size < 1024 {
            // Large frames must have been spread over several RX buffers.
            assert!(a.stats(q).rx_merged > 0 && b.stats(q).rx_merged > 0, "{what}: no merged RX");
        }
    }
    for (fe, name) in [(&mut a, "A"), (&mut b, "B")] {
        let sent: Vec<u64> = (0..cfg.queue_pairs).map(|q| fe.stats(q).tx_enqueued).collect();
        let bases = fe.stop().unwrap_or_else(|e| panic!("{what}: stop {name}: {e}"));
        assert_eq!(bases.len(), 2 * cfg.queue_pairs as usize);
        for q in 0..cfg.queue_pairs as usize {
            // TX: the backend consumed exactly the chains we published.
            assert_eq!(bases[2 * q + 1], sent[q] as u32 & 0xffff, "{what}: {name} TX base");
        }
    }
}

fn check_negotiation(fe: &Frontend, cfg: &FrontendConfig, what: &str) {
    let f = fe.negotiated_features();
    eprintln!("{what}: features {} header {} hugepages {}", feature_names(f), fe.hdr_len(), fe.hugepages());
    // DPDK 22.11 offers all of these.
    assert_eq!(f & VIRTIO_NET_F_MRG_RXBUF != 0, cfg.mrg_rxbuf, "{what}: MRG_RXBUF");
    assert_eq!(f & VIRTIO_F_VERSION_1 != 0, cfg.version_1, "{what}: VERSION_1");
    assert_eq!(f & VIRTIO_RING_F_EVENT_IDX != 0, cfg.event_idx, "{what}: EVENT_IDX");
    assert_eq!(f & VIRTIO_RING_F_INDIRECT_DESC != 0, cfg.indirect, "{what}: INDIRECT");
    let hdr = if cfg.version_1 || cfg.mrg_rxbuf { 12 } else { 10 };
    assert_eq!(fe.hdr_len(), hdr, "{what}: header length");
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Client mode (testpmd listens), one testpmd, one connection pair per
/// configuration: also exercises DPDK accepting reconnects.
#[test]
fn dpdk_client_mode_matrix() {
    init_tracing();
    let _g = serial();
    let Some(mut pmd) = Testpmd::start(1, false) else {
        return;
    };
    pmd.wait_sockets();
    let d = FrontendConfig::default;
    let configs: [(&str, FrontendConfig, u64); 7] = [
        ("default (mrg on, contiguous)", d(), 128),
        ("mrg off, split header", FrontendConfig { mrg_rxbuf: false, split_header: true, ..d() }, 100),
        (
            "mrg on, split header, 512-byte RX buffers",
            FrontendConfig { split_header: true, rx_buf_size: 512, ..d() },
            // Up to 4 RX buffers per frame in a 256-entry ring.
            48,
        ),
        ("mrg off, contiguous", FrontendConfig { mrg_rxbuf: false, ..d() }, 128),
        (
            "legacy 10-byte header",
            FrontendConfig { mrg_rxbuf: false, version_1: false, split_header: true, ..d() },
            100,
        ),
        ("indirect + event_idx", FrontendConfig { indirect: true, event_idx: true, ..d() }, 128),
        (
            "event_idx, small ring, high gpa base, hugepages requested",
            FrontendConfig {
                event_idx: true,
                ring_size: 64,
                gpa_base: 0x1_0000_0000,
                hugepages: true,
                ..d()
            },
            32,
        ),
    ];
    let start = Instant::now();
    for (what, cfg, window) in configs {
        run_config(&pmd, cfg, window, what);
    }
    eprintln!("client-mode matrix took {:?}", start.elapsed());
}

/// Server mode: we listen, testpmd (`client=1`) connects to us.
#[test]
fn dpdk_server_mode() {
    init_tracing();
    let _g = serial();
    let Some(pmd) = Testpmd::start(1, true) else {
        return;
    };
    let accept = |path: PathBuf| {
        thread::spawn(move || Frontend::listen_accept(&path, FrontendConfig::default(), CONNECT_TIMEOUT))
    };
    let ha = accept(pmd.sock(0));
    let hb = accept(pmd.sock(1));
    let mut a = ha.join().expect("thread").expect("accept A");
    let mut b = hb.join().expect("thread").expect("accept B");
    check_negotiation(&a, &FrontendConfig::default(), "server mode");
    exchange(&mut a, &mut b, 0, 128, "server mode");
    a.stop().expect("stop A");
    b.stop().expect("stop B");
    assert!(!pmd.sock(0).exists(), "listening socket removed once accepted");
}

/// Two queue pairs: testpmd forwards port0/queue i to port1/queue i.
#[test]
fn dpdk_multiqueue() {
    init_tracing();
    let _g = serial();
    let Some(mut pmd) = Testpmd::start(2, false) else {
        return;
    };
    pmd.wait_sockets();
    let cfg = FrontendConfig { queue_pairs: 2, ..FrontendConfig::default() };
    run_config(&pmd, cfg, 128, "two queue pairs");
}

/// `recv_frames` blocks until the frames arrive (DPDK signals the call
/// eventfd once notifications are enabled) and honours its timeout; with and
/// without EVENT_IDX (used_event instead of VRING_AVAIL_F_NO_INTERRUPT).
#[test]
fn dpdk_recv_frames_blocking() {
    init_tracing();
    let _g = serial();
    let Some(mut pmd) = Testpmd::start(1, false) else {
        return;
    };
    pmd.wait_sockets();
    for event_idx in [false, true] {
        let cfg = FrontendConfig { event_idx, ..FrontendConfig::default() };
        let what = format!("recv_frames event_idx={event_idx}");
        let mut a = Frontend::connect(&pmd.sock(0), cfg.clone(), CONNECT_TIMEOUT).expect("A");
        let mut b = Frontend::connect(&pmd.sock(1), cfg, CONNECT_TIMEOUT).expect("B");
        let mut ab = Sink::new(MAC_A, MAC_B);
        let mut ba = Sink::new(MAC_B, MAC_A);
        warm_up(&mut a, &mut b, 0, &mut ab, &mut ba);

        // Nothing pending: returns empty after about the timeout.
        let t = Instant::now();
        assert!(b.recv_frames(0, 1, Duration::from_millis(100)).is_empty());
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(100) && waited < Duration::from_secs(2));

        // One frame at a time from a helper thread while B blocks: B must be
        // woken through the call eventfd.
        let calls_before = b.stats(0).rx_calls;
        let sender = thread::spawn(move || {
            let mut buf = vec![0u8; 2048];
            for seq in 0..20 {
                thread::sleep(Duration::from_millis(10));
                let n = test_frame(&mut buf, MAC_B, MAC_A, seq);
                assert!(a.send(0, &buf[..n]));
            }
            a
        });
        let got = b.recv_frames(0, 20, Duration::from_secs(5));
        let mut a = sender.join().expect("sender");
        assert_eq!(got.len(), 20, "{what}");
        for f in &got {
            ab.check(f, &what);
        }
        assert!(b.stats(0).rx_calls > calls_before, "{what}: DPDK never signalled");

        // A burst, then asking for fewer than available leaves the rest.
        let mut buf = vec![0u8; 2048];
        for seq in 20..84 {
            let n = test_frame(&mut buf, MAC_B, MAC_A, seq);
            assert!(a.enqueue_tx(0, &buf[..n]));
        }
        a.flush_tx(0);
        let first = b.recv_frames(0, 4, Duration::from_secs(5));
        assert_eq!(first.len(), 4, "{what}");
        let rest = b.recv_frames(0, 60, Duration::from_secs(5));
        assert_eq!(rest.len(), 60, "{what}");
        for f in first.iter().chain(&rest) {
            ab.check(f, &what);
        }
        assert_eq!(ab.seen.len(), 84, "{what}");
        assert_eq!(b.stats(0).rx_errors, 0);
    }
}

/// Hand-made TX chains (`push_raw_tx_chain` + `guest_mem`) are transmitted
/// like ordinary ones, and the probe for a bad address shows how DPDK reacts.
#[test]
fn dpdk_raw_tx_chain() {
    init_tracing();
    let _g = serial();
    let Some(mut pmd) = Testpmd::start(1, false) else {
        return;
    };
    pmd.wait_sockets();
    let cfg = FrontendConfig::default();
    let mut a = Frontend::connect(&pmd.sock(0), cfg.clone(), CONNECT_TIMEOUT).expect("A");
    let mut b = Frontend::connect(&pmd.sock(1), cfg, CONNECT_TIMEOUT).expect("B");
    let mut ab = Sink::new(MAC_A, MAC_B);
    let mut ba = Sink::new(MAC_B, MAC_A);
    warm_up(&mut a, &mut b, 0, &mut ab, &mut ba);

    // Header (12 zero bytes) and a frame split in three pieces, scattered
    // over the scratch area.
    let mut buf = vec![0u8; 2048];
    let n = test_frame(&mut buf, MAC_B, MAC_A, 500);
    let (gpa, mem) = a.guest_mem();
    mem[..12].fill(0);
    mem[1000..1000 + 20].copy_from_slice(&buf[..20]);
    mem[3000..3000 + n - 20].copy_from_slice(&buf[20..n]);
    let chain = [
        RawDesc::chained(gpa, 12, 1),
        RawDesc::chained(gpa + 1000, 10, 2),
        RawDesc::chained(gpa + 1010, 10, 3),
        RawDesc::last(gpa + 3000, (n - 20) as u32),
    ];
    let before = a.tx_completed(0);
    let head = a.push_raw_tx_chain(0, &chain).expect("free descriptors");
    let got = b.recv_frames(0, 1, Duration::from_secs(5));
    assert_eq!(got.len(), 1, "raw chain (head {head}) not delivered");
    ab.check(&got[0], "raw chain");
    assert!(ab.seen.contains(&500));
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.tx_completed(0) == before {
        assert!(Instant::now() < deadline, "raw chain not completed");
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(a.reclaim_tx(0), 1);
    assert_eq!(a.stats(0).tx_errors, 0);
}
