//! The benchmark's switches under test, for real: each installed peer (ours, DPDK testpmd,
//! OVS-DPDK) is started with its ports, checked (sockets listening, processes alive, frames
//! forwarded between two of our vhost-user frontends, its self-reported cycles per packet),
//! stopped, and checked again (processes gone, sockets removed).
//!
//! A peer that is not installed is skipped with a message: `ours` needs
//! `cargo build --release -p vswitch`, `dpdk` scripts/install-test-deps.sh, `ovs`
//! scripts/install-bench-peers.sh (and root for huge pages). The tests run one at a time
//! (each peer busy-polls CPU 0). `PEERS_KEEP_LOGS=1` keeps each peer's work directory (logs)
//! under the temporary directory.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vswitch_bench::frame::build_frame;
use vswitch_bench::frontend::{Frontend, FrontendConfig};
use vswitch_bench::harness::peer::{probe, Peer, PeerOptions};
use vswitch_bench::harness::spec::{PeerKind, Topology};
use vswitch_bench::harness::sys;

/// Peers must not overlap (CPU 0, OVS's global `ovs-netdev` tap).
static SERIAL: Mutex<()> = Mutex::new(());

const BROADCAST: [u8; 6] = [0xff; 6];
/// Frames to see forwarded before stopping.
const FRAMES: usize = 2000;

fn mac(i: usize) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x10, i as u8]
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

fn is_socket(p: &Path) -> bool {
    fs::metadata(p).map(|m| m.file_type().is_socket()).unwrap_or(false)
}

/// `(tid, Cpus_allowed_list)` of every thread of `pid`.
fn thread_cpus(pid: u32) -> Vec<(String, String)> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| {
            let status = fs::read_to_string(t.path().join("status")).ok()?;
            let cpus = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
            Some((t.file_name().to_string_lossy().into_owned(), cpus.trim().to_string()))
        })
        .collect()
}

fn workdir(kind: PeerKind, topology: Topology) -> PathBuf {
    std::env::temp_dir().join(format!("vsb-peers-{}-{kind}-{topology}", std::process::id()))
}

/// Sends frames from frontend `from` (to `dst`) until `want` arrived at `to`, at most 10 s
/// (DPDK drops frames until a device is fully set up, so the first ones may be lost).
/// Returns the frames received at each frontend.
fn forward(fes: &mut [Frontend], from: usize, to: usize, dst: [u8; 6], want: usize) -> Vec<usize> {
    let mut got = vec![0usize; fes.len()];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seq = 0u64;
    while got[to] < want && Instant::now() < deadline {
        for _ in 0..32 {
            let f = build_frame(dst, mac(from), None, 64, seq);
            if !fes[from].enqueue_tx(0, &f) {
                break;
            }
            seq += 1;
        }
        fes[from].flush_tx(0);
        std::thread::sleep(Duration::from_millis(1));
        for (i, fe) in fes.iter_mut().enumerate() {
            got[i] += fe.poll_rx(0, |_| {});
        }
    }
    // Let stragglers (e.g. frames leaking into the wrong VLAN) arrive.
    std::thread::sleep(Duration::from_millis(50));
    for (i, fe) in fes.iter_mut().enumerate() {
        got[i] += fe.poll_rx(0, |_| {});
    }
    got
}

/// Starts `kind`, checks it, forwards frames and stops it. Returns false if skipped.
fn exercise(kind: PeerKind, topology: Topology, ports: usize) -> bool {
    exercise_with(kind, topology, ports, true)
}

/// [`exercise`]; `huge`: let DPDK use huge pages when they can be had.
fn exercise_with(kind: PeerKind, topology: Topology, ports: usize, huge: bool) -> bool {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let version = match probe(kind) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("SKIP peer {kind}: {e}");
            return false;
        }
    };
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let dir = workdir(kind, topology);
    let opts = PeerOptions {
        kind,
        topology,
        ports,
        backend_cpus: vec![0],
        hugepages: huge && kind == PeerKind::Dpdk && sys::hugepages(512).unwrap_or(false),
        workdir: dir.clone(),
        vswitch_bin: None,
        busy_poll: false,
        flows: 1,
    };
    let t = Instant::now();
    let mut peer = match Peer::start(&opts) {
        Ok(p) => p,
        Err(e) => panic!("starting {kind} {version}: {e}"),
    };
    eprintln!("peer {kind} {version} ({topology}, {ports} ports) listening after {:?}", t.elapsed());
    let sockets = peer.sockets().to_vec();
    assert_eq!(sockets.len(), ports);
    for s in &sockets {
        assert!(is_socket(s), "{} is not a socket", s.display());
    }
    let pids = peer.pids();
    assert!(!pids.is_empty());
    for &p in &pids {
        assert!(alive(p), "{kind}: pid {p} is not running");
        for (tid, cpus) in thread_cpus(p) {
            assert_eq!(cpus, "0", "{kind}: thread {tid} of pid {p} is not pinned to the backend CPU");
        }
    }

    let mut fes: Vec<Frontend> = sockets
        .iter()
        .map(|s| match Frontend::connect(s, FrontendConfig::default(), Duration::from_secs(10)) {
            Ok(f) => f,
            Err(e) => panic!("connecting to {}: {e}", s.display()),
        })
        .collect();
    // DPDK io forwarding ignores addresses; the learning switches flood a broadcast (to the
    // sender's VLAN only).
    let got = forward(&mut fes, 0, 1, BROADCAST, 200);
    assert!(got[1] >= 200, "{kind}: only {} frames forwarded during warm-up: {got:?}", got[1]);
    peer.begin_window();
    let got = forward(&mut fes, 0, 1, BROADCAST, FRAMES);
    eprintln!("peer {kind}: frames received per port in the window: {got:?}");
    assert!(got[1] >= FRAMES, "{kind}: {got:?}");
    if topology == Topology::Vlan {
        assert_eq!(got[2] + got[3], 0, "{kind}: frames leaked from VLAN 10 into VLAN 20: {got:?}");
    } else if ports > 2 {
        assert!(got[2..].iter().all(|&n| n >= FRAMES), "{kind}: broadcast not flooded: {got:?}");
    }
    drop(fes);

    let t = Instant::now();
    let report = match peer.stop() {
        Ok(r) => r,
        Err(e) => panic!("stopping {kind}: {e}"),
    };
    eprintln!("peer {kind} stopped after {:?}: {report:?}", t.elapsed());
    assert!(report.warnings.is_empty(), "{kind}: {:?}", report.warnings);
    // Frames were forwarded, so every peer can tell its cost per packet.
    let cycles = report.self_cycles_per_frame;
    assert!(cycles.is_some_and(|c| c > 0.0 && c < 1e7), "{kind}: self cycles/frame {cycles:?}");
    assert!(report.log.is_file(), "{}", report.log.display());
    for &p in &pids {
        assert!(!alive(p), "{kind}: pid {p} still runs after stop");
    }
    for s in &sockets {
        assert!(!s.exists(), "{kind}: {} left behind", s.display());
    }
    if std::env::var_os("PEERS_KEEP_LOGS").is_none() {
        let _ = fs::remove_dir_all(&dir);
    }
    true
}

#[test]
fn ours_p2p() {
    exercise(PeerKind::Ours, Topology::P2p, 2);
}

#[test]
fn ours_vlan() {
    exercise(PeerKind::Ours, Topology::Vlan, 4);
}

#[test]
fn dpdk_p2p() {
    exercise(PeerKind::Dpdk, Topology::P2p, 2);
}

#[test]
fn dpdk_p2p_uni_4k_pages() {
    exercise_with(PeerKind::Dpdk, Topology::P2pUni, 2, false);
}

#[test]
fn ovs_p2p() {
    exercise(PeerKind::Ovs, Topology::P2p, 2);
}

#[test]
fn ovs_vlan() {
    exercise(PeerKind::Ovs, Topology::Vlan, 4);
}

/// Dropping a peer without `stop` kills it and removes its sockets (and OVS's tap devices).
#[test]
fn drop_kills() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (kind, topology, ports) in [
        (PeerKind::Ours, Topology::Mesh, 3),
        (PeerKind::Dpdk, Topology::P2p, 2),
        (PeerKind::Ovs, Topology::Flood, 3),
    ] {
        if let Err(e) = probe(kind) {
            eprintln!("SKIP peer {kind}: {e}");
            continue;
        }
        let dir = workdir(kind, topology);
        let opts = PeerOptions {
            kind,
            topology,
            ports,
            backend_cpus: vec![0],
            hugepages: false,
            workdir: dir.clone(),
            vswitch_bin: None,
            busy_poll: false,
            flows: 1,
        };
        let peer = match Peer::start(&opts) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let (pids, sockets) = (peer.pids(), peer.sockets().to_vec());
        let taps_before = taps();
        let t = Instant::now();
        drop(peer);
        eprintln!("peer {kind} dropped in {:?}", t.elapsed());
        assert!(pids.iter().all(|&p| !alive(p)), "{kind}");
        assert!(sockets.iter().all(|s| !s.exists()), "{kind}");
        let left: Vec<String> = taps().into_iter().filter(|t| t.starts_with("vsb")).collect();
        assert!(left.is_empty(), "{kind}: tap devices left behind: {left:?} (before drop: {taps_before:?})");
        let _ = fs::remove_dir_all(&dir);
    }
}

/// Network interface names.
fn taps() -> Vec<String> {
    fs::read_dir("/sys/class/net")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Unsupported combinations fail before anything starts, saying why.
#[test]
fn dpdk_refuses_mesh() {
    let opts = PeerOptions {
        kind: PeerKind::Dpdk,
        topology: Topology::Mesh,
        ports: 4,
        backend_cpus: vec![0],
        hugepages: false,
        workdir: workdir(PeerKind::Dpdk, Topology::Mesh),
        vswitch_bin: None,
        busy_poll: false,
        flows: 1,
    };
    match Peer::start(&opts) {
        Ok(_) => panic!("dpdk accepted a mesh"),
        Err(e) => assert!(e.to_string().contains("p2p"), "{e}"),
    }
    assert!(!opts.workdir.exists(), "nothing created for a refused start");
}

/// A peer that dies at start is reported with its exit status and log, and cleaned up.
#[test]
fn start_failure_names_the_log() {
    let dir = workdir(PeerKind::Ours, Topology::Flood);
    let opts = PeerOptions {
        kind: PeerKind::Ours,
        topology: Topology::Flood,
        ports: 2,
        backend_cpus: vec![0],
        hugepages: false,
        workdir: dir.clone(),
        vswitch_bin: Some(PathBuf::from("/bin/false")),
        busy_poll: false,
        flows: 1,
    };
    match Peer::start(&opts) {
        Ok(_) => panic!("/bin/false started as a switch"),
        Err(e) => {
            eprintln!("{e}");
            let msg = e.to_string();
            assert!(msg.contains("exited") && msg.contains("vswitch.log"), "{msg}");
        }
    }
    let missing = PeerOptions { vswitch_bin: Some(dir.join("nonexistent")), ..opts.clone() };
    match Peer::start(&missing) {
        Ok(_) => panic!("a missing binary started"),
        Err(e) => {
            eprintln!("{e}");
            assert!(e.to_string().contains("not an executable"), "{e}");
        }
    }
    let long = PeerOptions { workdir: dir.join("x".repeat(100)), vswitch_bin: None, ..opts };
    if probe(PeerKind::Ours).is_ok() {
        match Peer::start(&long) {
            Ok(_) => panic!("a socket path over 107 bytes was accepted"),
            Err(e) => {
                eprintln!("{e}");
                assert!(e.to_string().contains("shorter work directory"), "{e}");
            }
        }
    }
    let _ = fs::remove_dir_all(&dir);
}
