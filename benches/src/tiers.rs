//! `vswitch-bench tiers`: the co-design table. The same traffic (a wire, the uplink, sending
//! to two guests: unicast to each, one frame in 16 broadcast) goes through tier 0 (the
//! software switch on a TAP uplink), a Level 0 NIC model and a Level 1 NIC model, and the
//! table says per tier what the host paid and what the device did. `--traffic back` measures
//! the way back: both guests send to the wire's far end (the device's DMA reads, its pools'
//! scheduler), on the generator wire.
//!
//! ```text
//!  netns: AF_PACKET sender ──▶ TAP (the wire) ──▶ switch port `up` (tap: | nic:,level=0 | nic:,level=1)
//!                                                  ├─▶ guest g0 (in-process virtio-net, polled)
//!                                                  └─▶ guest g1
//! ```
//!
//! With `--wire gen` (the default) the wire is an in-process one (`nic:wire:NAME`) whose far
//! end is this harness's generator: no kernel read per frame, so host cycles show what each
//! tier takes off the host. Tier 0 is then a NIC model with nothing switched on (`level=0,
//! lro=off`: a plain NIC handing every frame to the software switch). `--wire tap` is the
//! namespace and TAP device above (needs root).
//!
//! Each tier runs twice: at the highest rate the sender reaches (throughput and cost per
//! packet) and at a tenth of the rate delivered then (one-way latency, sender's clock to the
//! guest's, both CLOCK_MONOTONIC on this machine). Host cycles per packet are the switch's
//! busy polling-thread cycles (the wire reads included, which every tier pays alike) less the
//! device's, which the NIC model times apart. Needs root (network namespaces, TAP devices).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::ScopedJoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use vswitch::control::Stats;
use vswitch::uplink::link::LinkEnd;
use vswitch::{PortConfig, Switch, SwitchConfig};

use crate::frame::{build_frame, build_tcp_segment, frame_seq};
use crate::frontend::{Frontend, FrontendConfig};

mod dpdk;
mod far;
mod report;
use far::{ip, now_ns, recv_wire, send_wire, Netns};
pub use report::{print, write_svg};

/// The tiers measured, in table order.
pub const TIERS: &[(&str, &str)] =
    &[("tier 0 (software)", "tap:"), ("Level 0 NIC", "nic:,level=0"), ("Level 1 NIC", "nic:,level=1")];

/// What the wire carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Traffic {
    /// UDP frames (one flow per guest), one in 16 broadcast; timed for latency.
    #[default]
    Udp,
    /// Two in-order TCP streams (one per guest, segments of the frame size) and one frame in
    /// 16 a UDP broadcast; the guests take TSO frames (what LRO makes). Not timed.
    Tcp,
    /// The way back: both guests send UDP frames to the wire's far end (generator wire only);
    /// timed for latency, guest to wire.
    Back,
    /// Between the guests (inter-VM): each sends UDP frames to the other, the wire idle
    /// (generator wire only); timed for latency, guest to guest. At Level 3 the NIC's embedded
    /// switch carries them (two crossings of the bus); below, the software path.
    Vm,
}

impl Traffic {
    /// Its name on the command line and in the table.
    pub fn name(self) -> &'static str {
        match self {
            Traffic::Udp => "udp",
            Traffic::Tcp => "tcp",
            Traffic::Back => "back",
            Traffic::Vm => "vm",
        }
    }
}

impl std::str::FromStr for Traffic {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "udp" => Ok(Traffic::Udp),
            "tcp" => Ok(Traffic::Tcp),
            "back" => Ok(Traffic::Back),
            "vm" => Ok(Traffic::Vm),
            _ => Err(format!("traffic '{s}' is not udp, tcp, back or vm")),
        }
    }
}

/// What the uplink's wire is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireKind {
    /// An in-process wire, the harness's generator at its far end.
    #[default]
    Gen,
    /// A TAP device, an AF_PACKET sender in a network namespace at its far end.
    Tap,
    /// The software path's two ways onto a Linux device, side by side: a TAP port and an
    /// `afpacket:` port on a veth, the same sender in a namespace at the far end.
    Afpacket,
    /// The kernel-bypass ways onto a Linux device beside AF_PACKET: `afxdp:` ports on a veth
    /// in native copy and generic (skb) modes, the same sender.
    Afxdp,
}

impl std::str::FromStr for WireKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gen" => Ok(WireKind::Gen),
            "tap" => Ok(WireKind::Tap),
            "afpacket" => Ok(WireKind::Afpacket),
            "afxdp" => Ok(WireKind::Afxdp),
            _ => Err(format!("wire '{s}' is not gen, tap, afpacket or afxdp")),
        }
    }
}

/// `--wire afpacket`: the uplinks of the software path, TAP and AF_PACKET (on a veth).
pub const AFPACKET_TIERS: &[(&str, &str)] =
    &[("TAP (software)", "tap:"), ("AF_PACKET (software)", "afpacket:")];

/// `--wire afxdp`: AF_PACKET and AF_XDP's two modes a veth offers (a veth has no zero copy),
/// then DPDK testpmd on the same veth through its own AF_PACKET and AF_XDP drivers (`dpdk:`).
pub const AFXDP_TIERS: &[(&str, &str)] = &[
    ("AF_PACKET", "afpacket:"),
    ("AF_XDP copy", "afxdp:,mode=copy"),
    ("AF_XDP skb", "afxdp:,mode=skb"),
    ("DPDK af_packet", "dpdk:af_packet"),
    ("DPDK af_xdp", "dpdk:af_xdp"),
];

/// The tiers on a generator wire: tier 0 is a NIC with no engines on.
/// Level 2 (the generator wire only): both guests' queue pairs plugged into the device.
/// Level 3: each guest given a VF (`vswitch vf up attach N gN`).
pub const GEN_TIERS: &[(&str, &str)] = &[
    ("tier 0 (software)", "nic:,level=0,lro=off,itr=off"),
    ("Level 0 NIC", "nic:,level=0"),
    ("Level 1 NIC", "nic:,level=1"),
    ("Level 2 NIC", "nic:,level=2"),
    ("Level 3 NIC (VFs)", "nic:,level=3,vfs=2"),
];

/// Settings.
#[derive(Clone, Debug)]
pub struct TiersConfig {
    /// The wire.
    pub wire: WireKind,
    /// Nominal frame sizes (with FCS), 64..1518.
    pub sizes: Vec<usize>,
    /// What the wire carries, each a set of rows.
    pub traffic: Vec<Traffic>,
    /// Measured seconds per run.
    pub duration: Duration,
    /// Where sockets go.
    pub dir: PathBuf,
    /// CPU for the switch's polling thread.
    pub pmd_core: Option<usize>,
    /// The fixed rate (frames per second) of the run that measures latency, the same for every
    /// tier (None: 100,000 on a generator wire, 20,000 on a TAP).
    pub rate: Option<u64>,
}

/// One row of the table.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TierRow {
    /// The tier.
    pub tier: String,
    /// The wire.
    #[serde(default)]
    pub wire: WireKind,
    /// What the wire carried.
    pub traffic: Traffic,
    /// Nominal frame size.
    pub size: usize,
    /// Frames the sender put on the wire, millions per second.
    pub offered_mpps: f64,
    /// Wire frames delivered into the guests, millions per second (a broadcast counts per
    /// guest; a coalesced TCP frame counts as the segments it holds), the sender as fast as
    /// it goes. The cost figures below are from the same run.
    pub mpps: f64,
    /// Wire frames delivered per frame offered (a broadcast once): below 1, the cost figures
    /// also paid for frames dropped.
    #[serde(default)]
    pub delivered: f64,
    /// Frames the uplink's kernel dropped for want of room in the switch's socket (its
    /// `no_buffer` count: an AF_XDP or AF_PACKET socket's rings full) per frame offered.
    #[serde(default)]
    pub socket_drops: f64,
    /// The switch's polling-thread cycles per delivered frame, the device's excluded.
    pub host_cycles: f64,
    /// The modelled device's time per delivered frame, ns.
    pub device_ns: f64,
    /// Copies the switch's CPU made per delivered frame.
    pub cpu_copies: f64,
    /// Copies the kernel made per delivered frame (the TAP wire's read).
    pub kernel_copies: f64,
    /// Descriptors the device fetched per delivered frame.
    pub desc_fetches: f64,
    /// Bytes the device's DMA moved per delivered frame (writes and reads).
    pub dma_bytes: f64,
    /// PCIe transactions per delivered frame.
    pub tlps: f64,
    /// Interrupts (guest notifications) per delivered frame.
    pub irqs: f64,
    /// One-way latency at a fixed rate (`rate`), the same for every tier, µs: 50th, 99th,
    /// 99.9th percentile.
    pub latency_us: [f64; 3],
    /// The latency the tier adds (or saves): its median less tier 0's in the same run, µs.
    #[serde(default)]
    pub latency_added_us: f64,
    /// Level 2 rows: guest g0 unplugged and plugged again 100 times at the fixed rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<Handover>,
}

/// What 100 hand-overs of a plugged guest cost, at the fixed rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Handover {
    /// Plug (the swap under the pair's locks), µs: median, max of 100.
    pub plug_us: [u64; 2],
    /// Unplug (quiesce, drain, hand back), µs: median, max.
    pub unplug_us: [u64; 2],
    /// In-flight transmits the drains carried, all 100.
    pub drained: u64,
    /// Hand-overs whose ledger did not balance (must be 0).
    pub unbalanced: u64,
}

/// The generator and the guests' receiver on one thread (a thread each would put three busy
/// threads on two CPUs beside the switch's): `frames` into the wire's far end, 32 at a time
/// under one lock, each stamped with the send time, until `stop_tx` (`pps` 0: as fast as the
/// wire takes them; a full wire means the switch is the bottleneck, as it should be), the
/// guests polled between batches until `stop_rx`. Frames the switch sends back to the wire
/// are taken off and recycled. Returns frames sent.
#[allow(clippy::too_many_arguments)]
fn gen_and_receive(
    end: &LinkEnd,
    frames: &[Vec<u8>],
    pps: u64,
    stop_tx: &AtomicBool,
    guests: &mut [Frontend],
    rx: &Rx,
    stop_rx: &AtomicBool,
    hist: &mut Histogram<u64>,
    timed: &AtomicBool,
    mss: usize,
) -> u64 {
    let mut frames = frames.to_vec();
    let n = frames.len();
    const B: usize = 32;
    let (mut sent, mut k) = (0u64, 0usize);
    let mut back = Vec::new();
    let start = Instant::now();
    // The way back: the guests send (each its own frames), the wire's far end receives; or
    // they send to each other.
    if frames.first().is_some_and(|f| G.iter().any(|g| f[6..12] == *g)) {
        return guests_to_wire(Some(end), &mut frames, pps, stop_tx, guests, rx, stop_rx, hist, timed);
    }
    while !stop_rx.load(Ordering::Relaxed) {
        let due = pps == 0 || start.elapsed() >= Duration::from_secs_f64(sent as f64 / pps as f64);
        if due && !stop_tx.load(Ordering::Relaxed) {
            let batch = if pps > 0 { ((pps / 10_000).clamp(1, B as u64)) as usize } else { B };
            let t = now_ns();
            for j in 0..batch {
                let f = &mut frames[(k + j) % n];
                if frame_seq(f).is_some() {
                    let off = crate::frame::SEQ_OFFSET;
                    f[off..off + 8].copy_from_slice(&t.to_be_bytes());
                }
            }
            let took = end.send((0..batch).map(|j| frames[(k + j) % n].as_slice()));
            sent += took as u64;
            k = (k + took) % n;
        }
        poll_guests(guests, rx, hist, timed, mss);
        if end.recv(&mut back, 256) > 0 {
            end.recycle(back.drain(..));
        }
    }
    sent
}

/// [`gen_and_receive`] the other way: `frames` (each from one guest, by source MAC) sent by
/// their guests, 32 per pass (16 each), the wire's far end `end` counting what arrives (a Linux
/// wire's far end is a thread of its own, [`far::recv_wire`]: `None`); or, for frames to the
/// other guest, the guests counting what arrives.
#[allow(clippy::too_many_arguments)]
fn guests_to_wire(
    end: Option<&LinkEnd>,
    frames: &mut [Vec<u8>],
    pps: u64,
    stop_tx: &AtomicBool,
    guests: &mut [Frontend],
    rx: &Rx,
    stop_rx: &AtomicBool,
    hist: &mut Histogram<u64>,
    timed: &AtomicBool,
) -> u64 {
    let n = frames.len();
    let (mut sent, mut k) = (0u64, 0usize);
    let mut back = Vec::new();
    let start = Instant::now();
    let hdr = vswitch::uplink::tap::VNET_HDR as usize;
    let to_guests = frames.first().is_some_and(|f| f[..6] != WIRE);
    // The far end speaks first, so the switch learns where WIRE is and does not flood.
    if let Some(end) = end {
        end.send([hello().as_slice()]);
    }
    while !stop_rx.load(Ordering::Relaxed) {
        let due = pps == 0 || start.elapsed() >= Duration::from_secs_f64(sent as f64 / pps as f64);
        if due && !stop_tx.load(Ordering::Relaxed) {
            let batch = if pps > 0 { ((pps / 10_000).clamp(1, 32)) as usize } else { 32 };
            let t = now_ns();
            let mut queued = [false; 2];
            for _ in 0..batch {
                let f = &mut frames[k % n];
                // By source MAC; with one guest (testpmd's), all from it.
                let g = G.iter().position(|m| f[6..12] == *m).unwrap_or(0).min(guests.len() - 1);
                let off = crate::frame::SEQ_OFFSET;
                f[off..off + 8].copy_from_slice(&t.to_be_bytes());
                guests[g].reclaim_tx(0);
                if !guests[g].enqueue_tx(0, f) {
                    break;
                }
                queued[g] = true;
                sent += 1;
                k += 1;
            }
            for (g, _) in queued.iter().enumerate().filter(|q| *q.1) {
                guests[g].flush_tx(0);
            }
        }
        if to_guests {
            poll_guests(guests, rx, hist, timed, usize::MAX);
        } else {
            for g in guests.iter_mut() {
                g.poll_rx(0, |_| {});
            }
        }
        let Some(end) = end else { continue };
        let got = end.recv(&mut back, 256);
        if got > 0 && to_guests {
            end.recycle(back.drain(..));
        } else if got > 0 {
            if timed.load(Ordering::Relaxed) {
                for f in back.iter().filter_map(|b| frame_seq(&b[hdr..])) {
                    let _ = hist.record(now_ns().saturating_sub(f).max(1));
                }
            }
            rx.frames.fetch_add(got as u64, Ordering::Relaxed);
            end.recycle(back.drain(..));
        }
    }
    sent
}

/// The far end of the uplink's wire.
enum Far {
    Tap { ns: Netns, ifname: String },
    Gen(LinkEnd),
}

/// What the guests' receiver saw.
struct Rx {
    frames: AtomicU64,
}

/// The wire frames a received frame stands for: a TCP frame of more than `mss` payload bytes
/// is that many segments coalesced.
fn wire_frames(f: &[u8], mss: usize) -> usize {
    if f.len() > 54 && f[12..14] == [0x08, 0x00] && f[23] == 6 {
        (f.len() - 54).div_ceil(mss.max(1)).max(1)
    } else {
        1
    }
}

/// Polls both guests until `stop`, counting wire frames and recording latency when `timed`
/// is on.
fn receive(
    guests: &mut [Frontend],
    rx: &Rx,
    stop: &AtomicBool,
    hist: &mut Histogram<u64>,
    timed: &AtomicBool,
    mss: usize,
) {
    while !stop.load(Ordering::Relaxed) {
        if poll_guests(guests, rx, hist, timed, mss) == 0 {
            std::hint::spin_loop();
        }
    }
}

/// One pass over both guests' receive rings: the wire frames found.
fn poll_guests(
    guests: &mut [Frontend],
    rx: &Rx,
    hist: &mut Histogram<u64>,
    timed: &AtomicBool,
    mss: usize,
) -> usize {
    let mut got = 0usize;
    let on = timed.load(Ordering::Relaxed);
    for g in guests.iter_mut() {
        g.poll_rx(0, |f| {
            got += wire_frames(f, mss);
            if on {
                if let Some(t) = frame_seq(f) {
                    let _ = hist.record(now_ns().saturating_sub(t).max(1));
                }
            }
        });
    }
    rx.frames.fetch_add(got as u64, Ordering::Relaxed);
    got
}

const G: [[u8; 6]; 2] = [[0x52, 0x54, 0, 0x7b, 0, 1], [0x52, 0x54, 0, 0x7b, 0, 2]];

/// The wire's far end's first frame on the way back (a broadcast from WIRE).
fn hello() -> Vec<u8> {
    build_frame([0xff; 6], WIRE, None, 18, 0)
}
const WIRE: [u8; 6] = [0x52, 0x54, 0, 0x7b, 0, 0xee];

/// Counters summed over ports and threads, and the NIC's.
#[derive(Default, Clone, Copy)]
struct Snap {
    busy: u64,
    /// The uplink's receive drops for want of buffers.
    no_buffer: u64,
    copies: u64,
    kernel: u64,
    irqs: u64,
    device_ns: u64,
    device_ticks: u64,
    desc: u64,
    dma_bytes: u64,
    tlps: u64,
}

fn snap(sw: &Switch, nic: bool) -> Snap {
    let s: Stats = sw.stats().unwrap_or(Stats { ports: Vec::new(), pmds: Vec::new() });
    let mut x = Snap { busy: s.pmds.iter().map(|p| p.busy_ticks).sum(), ..Snap::default() };
    for p in &s.ports {
        x.copies += p.tx.copies;
        x.kernel += p.rx.kernel_copies;
        if p.name == "up" {
            x.no_buffer = p.rx.drop_no_buffer;
        }
        if p.name != "up" {
            x.irqs += p.tx.interrupts;
        }
    }
    if nic {
        if let Ok(r) = sw.nic("up") {
            x.device_ns = r.device_ns;
            x.device_ticks = r.device_ticks;
            x.desc = r.desc_fetches;
            x.dma_bytes = r.dma_write_bytes + r.dma_read_bytes;
            x.tlps = r.tlps;
        }
    }
    x
}

/// The sender's frames (64, one in 16 a broadcast, the rest for the two guests in turn) and
/// the TCP segments' payload size.
fn wire_frames_for(traffic: Traffic, size: usize) -> (Vec<Vec<u8>>, usize) {
    let udp = size.saturating_sub(4 + 42).max(18);
    let mss = size.saturating_sub(4 + 54).max(6);
    let mut seq = [1000u32; 2];
    let frames = (0..64)
        .map(|i| {
            if traffic == Traffic::Back {
                return build_frame(WIRE, G[i % 2], None, udp, 0);
            }
            if traffic == Traffic::Vm {
                return build_frame(G[1 - i % 2], G[i % 2], None, udp, 0);
            }
            if i % 16 == 15 {
                return build_frame([0xff; 6], WIRE, None, udp, 0);
            }
            match traffic {
                Traffic::Udp | Traffic::Back | Traffic::Vm => build_frame(G[i % 2], WIRE, None, udp, 0),
                Traffic::Tcp => {
                    let f = build_tcp_segment(G[i % 2], WIRE, seq[i % 2], (i / 2) as u16, mss);
                    seq[i % 2] += mss as u32;
                    f
                }
            }
        })
        .collect();
    (frames, mss)
}

/// Measures one tier at one size.
fn one(
    cfg: &TiersConfig,
    traffic: Traffic,
    tier: (&str, &str),
    size: usize,
    k: usize,
) -> Result<TierRow, String> {
    let ifname = format!("vbt{}{k}", std::process::id() % 100_000);
    let dir = cfg.dir.join(format!("t{k}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (kind, opts) = tier.1.split_once(':').unwrap_or((tier.1, ""));
    // An afpacket: or afxdp: port's device is a veth; the sender uses its peer.
    let peer = if kind == "afpacket" || kind == "afxdp" {
        let peer = format!("{ifname}p");
        let _ = Command::new("ip").args(["link", "del", &ifname]).output();
        ip(&["link", "add", &ifname, "type", "veth", "peer", "name", &peer])?;
        peer
    } else {
        ifname.clone()
    };
    let up = match cfg.wire {
        WireKind::Tap | WireKind::Afpacket | WireKind::Afxdp => {
            format!("up={kind}:{ifname}{opts},offloads=off")
        }
        WireKind::Gen => format!("up=nic:wire:{ifname}{opts}"),
    };
    if traffic == Traffic::Vm && cfg.wire != WireKind::Gen {
        return Err("traffic 'vm' needs the generator wire (--wire gen)".into());
    }
    let mut ports = vec![PortConfig::parse(&up).map_err(|e| e.to_string())?];
    for (g, m) in G.iter().enumerate() {
        let mac = format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]);
        ports.push(
            PortConfig::parse(&format!("g{g}={}/g{g}.sock,mac={mac}", dir.display()))
                .map_err(|e| e.to_string())?,
        );
    }
    let sw = Switch::start(SwitchConfig {
        ports,
        pmd_cores: cfg.pmd_core.into_iter().collect(),
        fdb_aging_secs: 300,
        ..SwitchConfig::default()
    })
    .map_err(|e| e.to_string())?;
    let far = match cfg.wire {
        WireKind::Tap | WireKind::Afpacket | WireKind::Afxdp => {
            Far::Tap { ns: Netns::new(&peer)?, ifname: peer.clone() }
        }
        WireKind::Gen => Far::Gen(LinkEnd::attach(&ifname).map_err(|e| e.to_string())?),
    };
    let mut guests = Vec::new();
    for (g, mac) in G.iter().enumerate() {
        let path = dir.join(format!("g{g}.sock"));
        let mut fe = Frontend::connect(
            &path,
            FrontendConfig {
                ring_size: 1024,
                guest_offloads: traffic == Traffic::Tcp,
                ..FrontendConfig::default()
            },
            Duration::from_secs(5),
        )
        .map_err(|e| format!("guest g{g}: {e}"))?;
        fe.send(0, &build_frame([0xff; 6], *mac, None, 18, 0));
        guests.push(fe);
    }
    let nic = kind == "nic";
    if nic && (opts.contains("level=1") || opts.contains("level=2")) {
        let t = Instant::now();
        while sw.nic("up").map(|r| r.bound.iter().filter(|b| !b.macs.is_empty()).count()).unwrap_or(0) < 2 {
            if t.elapsed() > Duration::from_secs(5) {
                return Err("the Level 1 NIC did not bind both guests in 5 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if opts.contains("level=2") {
            for g in ["g0", "g1"] {
                sw.accel_plug(g, "l2").map_err(|e| format!("plugging {g}: {e}"))?;
            }
        }
    }
    let level3 = nic && opts.contains("level=3");
    if level3 {
        // The guests' rings run once they have sent their hello.
        std::thread::sleep(Duration::from_millis(100));
        for g in 0..2u32 {
            let r = sw.vf_attach("up", g, &format!("g{g}")).map_err(|e| format!("attaching VF {g}: {e}"))?;
            if !r.plugged[g as usize] {
                return Err(format!("VF {g} is not plugged: {:?}", r.notes));
            }
        }
    }
    let (frames, mss) = wire_frames_for(traffic, size);
    // Phase 1: as fast as the sender goes (the switch is the bottleneck), for throughput and
    // cost per frame.
    let (got, sent, d, delivered, _) =
        run_phase(&sw, &far, &frames, 0, cfg.duration, &mut guests, nic, false, mss)?;
    let per = |x: u64| if delivered > 0 { x as f64 / delivered as f64 } else { 0.0 };
    let mut row = TierRow {
        tier: tier.0.to_string(),
        wire: cfg.wire,
        traffic,
        size,
        offered_mpps: sent,
        mpps: got,
        // A broadcast (one frame in 16; none on the way back) is delivered to both guests.
        delivered: match (sent > 0.0, traffic) {
            (false, _) => 0.0,
            (true, Traffic::Back | Traffic::Vm) => got / sent,
            (true, _) => got / (sent * 17.0 / 16.0),
        },
        socket_drops: if sent > 0.0 {
            d.no_buffer as f64 / (sent * 1e6 * cfg.duration.as_secs_f64())
        } else {
            0.0
        },
        host_cycles: per(d.busy.saturating_sub(d.device_ticks)),
        device_ns: per(d.device_ns),
        cpu_copies: per(d.copies),
        kernel_copies: per(d.kernel),
        desc_fetches: per(d.desc),
        dma_bytes: per(d.dma_bytes),
        tlps: per(d.tlps),
        irqs: per(d.irqs),
        latency_us: [0.0; 3],
        latency_added_us: 0.0,
        handover: None,
    };
    // Phase 2: a fixed rate, the same for every tier, for latency.
    if traffic != Traffic::Tcp {
        let pps = cfg.rate.unwrap_or(if cfg.wire == WireKind::Gen { 100_000 } else { 20_000 });
        let (.., hist) = run_phase(&sw, &far, &frames, pps, cfg.duration, &mut guests, nic, true, mss)?;
        row.latency_us = [0.5, 0.99, 0.999].map(|q| hist.value_at_quantile(q) as f64 / 1000.0);
        // Phase 3 (Levels 2 and 3): the same rate while g0 is unplugged and plugged 100 times.
        if nic && (opts.contains("level=2") || level3) {
            let tier = if level3 { "l3" } else { "l2" };
            row.handover = Some(handovers(&sw, &far, &frames, pps, &mut guests, mss, tier)?);
        }
    }
    drop(guests);
    drop(sw);
    drop(far);
    Ok(row)
}

/// Unplugs and plugs guest g0 100 times while the wire sends at `pps`; what the hand-overs
/// cost.
fn handovers(
    sw: &Switch,
    far: &Far,
    frames: &[Vec<u8>],
    pps: u64,
    guests: &mut [Frontend],
    mss: usize,
    tier: &str,
) -> Result<Handover, String> {
    let (mut plug, mut unplug) = (Vec::new(), Vec::new());
    let mut h = Handover::default();
    std::thread::scope(|s| -> Result<(), String> {
        let traffic =
            s.spawn(|| run_phase(sw, far, frames, pps, Duration::from_secs(3), guests, true, false, mss));
        std::thread::sleep(Duration::from_millis(700));
        for _ in 0..100 {
            let r = sw.accel_unplug("g0").map_err(|e| format!("unplugging g0: {e}"))?;
            let last = r.last.ok_or("no hand-over report")?;
            // Each unplug's report carries the plug before it.
            plug.push(last.plug_us);
            unplug.push(last.unplug_us);
            h.drained += last.drained;
            h.unbalanced += u64::from(!last.balanced);
            sw.accel_plug("g0", tier).map_err(|e| format!("plugging g0: {e}"))?;
            std::thread::sleep(Duration::from_millis(10));
        }
        traffic.join().map_err(|_| "the traffic thread panicked")??;
        Ok(())
    })?;
    let mid_max = |v: &mut Vec<u64>| {
        v.sort_unstable();
        [v[v.len() / 2], v[v.len() - 1]]
    };
    h.unplug_us = mid_max(&mut unplug);
    h.plug_us = mid_max(&mut plug);
    Ok(h)
}

#[allow(clippy::too_many_arguments)]
fn run_phase(
    sw: &Switch,
    far: &Far,
    frames: &[Vec<u8>],
    pps: u64,
    dur: Duration,
    guests: &mut [Frontend],
    nic: bool,
    timed: bool,
    mss: usize,
) -> Result<(f64, f64, Snap, u64, Histogram<u64>), String> {
    let stop_tx = Arc::new(AtomicBool::new(false));
    let stop_rx = AtomicBool::new(false);
    let on = AtomicBool::new(false);
    let rx = Rx { frames: AtomicU64::new(0) };
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| e.to_string())?;
    let warmup = Duration::from_millis(500);
    // The way back: the guests send, the wire's far end receives.
    let back = frames.first().is_some_and(|f| G.iter().any(|g| f[6..12] == *g));
    let res = std::thread::scope(|s| -> Result<_, String> {
        let (sender, receiver) = match far {
            Far::Tap { ns, ifname } if back => {
                let (tx, rx) = spawn_back(
                    s,
                    &ns.0,
                    ifname,
                    frames,
                    pps,
                    &stop_tx,
                    &stop_rx,
                    guests,
                    far::FarRx { frames: &rx.frames, hist: &mut hist, timed: &on },
                );
                (Some(tx), rx)
            }
            Far::Tap { ns, ifname } => {
                let (ns, ifname, frames, stop) =
                    (ns.0.clone(), ifname.to_string(), frames.to_vec(), stop_tx.clone());
                let tx = s.spawn(move || send_wire(&ns, &ifname, frames, pps, stop));
                let (rx, stop_rx, hist, on) = (&rx, &stop_rx, &mut hist, &on);
                let rx = s.spawn(move || -> Result<u64, String> {
                    receive(guests, rx, stop_rx, hist, on, mss);
                    Ok(0)
                });
                (Some(tx), rx)
            }
            Far::Gen(end) => {
                let stop = stop_tx.clone();
                let (rx, stop_rx, hist, on) = (&rx, &stop_rx, &mut hist, &on);
                let gen = s.spawn(move || -> Result<u64, String> {
                    Ok(gen_and_receive(end, frames, pps, &stop, guests, rx, stop_rx, hist, on, mss))
                });
                (None, gen)
            }
        };
        std::thread::sleep(warmup);
        let (s0, r0, t0) = (snap(sw, nic), rx.frames.load(Ordering::Relaxed), Instant::now());
        on.store(timed, Ordering::Relaxed);
        std::thread::sleep(dur);
        on.store(false, Ordering::Relaxed);
        let (s1, r1, el) = (snap(sw, nic), rx.frames.load(Ordering::Relaxed), t0.elapsed());
        stop_tx.store(true, Ordering::Relaxed);
        let sender = sender.map(|t| t.join());
        std::thread::sleep(Duration::from_millis(100));
        stop_rx.store(true, Ordering::Relaxed);
        // Both joined before either's failure is passed on (a receiver left running would
        // keep the scope waiting).
        let received = receiver.join().map_err(|_| "receiver panicked".to_string())?;
        let mut sent = match sender {
            Some(r) => r.map_err(|_| "sender panicked".to_string())??,
            None => 0,
        };
        sent += received?;
        let d = Snap {
            busy: s1.busy - s0.busy,
            no_buffer: s1.no_buffer - s0.no_buffer,
            copies: s1.copies - s0.copies,
            kernel: s1.kernel - s0.kernel,
            irqs: s1.irqs - s0.irqs,
            device_ns: s1.device_ns - s0.device_ns,
            device_ticks: s1.device_ticks - s0.device_ticks,
            desc: s1.desc - s0.desc,
            dma_bytes: s1.dma_bytes - s0.dma_bytes,
            tlps: s1.tlps - s0.tlps,
        };
        let delivered = r1 - r0;
        let total = el + warmup;
        Ok((delivered as f64 / el.as_secs_f64() / 1e6, sent as f64 / total.as_secs_f64() / 1e6, d, delivered))
    })?;
    Ok((res.0, res.1, res.2, res.3, hist))
}

/// A thread of a phase: frames sent (0 for a receiver), or what failed.
type Side<'scope> = ScopedJoinHandle<'scope, Result<u64, String>>;

/// The way back on a Linux wire: the guests send `frames` from one thread until `stop_tx` (so
/// its result, frames sent, comes when the sending is done), the far end's receiver in
/// namespace `ns` counts them into `far_rx` from another until `stop_rx` (result 0).
#[allow(clippy::too_many_arguments)]
fn spawn_back<'scope, 'env>(
    s: &'scope std::thread::Scope<'scope, 'env>,
    ns: &'env str,
    ifname: &'env str,
    frames: &'env [Vec<u8>],
    pps: u64,
    stop_tx: &'env AtomicBool,
    stop_rx: &'env AtomicBool,
    guests: &'env mut [Frontend],
    far_rx: far::FarRx<'env>,
) -> (Side<'scope>, Side<'scope>) {
    let rx = s.spawn(move || recv_wire(ns, ifname, &hello(), &G, far_rx, stop_rx).map(|()| 0));
    let tx = s.spawn(move || -> Result<u64, String> {
        let mut frames = frames.to_vec();
        let (unused, off) = (Rx { frames: AtomicU64::new(0) }, AtomicBool::new(false));
        let mut h = Histogram::<u64>::new(1).map_err(|e| e.to_string())?;
        Ok(guests_to_wire(None, &mut frames, pps, stop_tx, guests, &unused, stop_tx, &mut h, &off))
    });
    (tx, rx)
}

/// Runs every tier at every size; the rows in table order.
pub fn run(cfg: &TiersConfig) -> Result<Vec<TierRow>, String> {
    let mut rows = Vec::new();
    let mut k = 0;
    for &traffic in &cfg.traffic {
        for &size in &cfg.sizes {
            if !(64..=1518).contains(&size) {
                return Err(format!("size {size} is outside 64..1518 (nominal, with FCS)"));
            }
            let tiers = match cfg.wire {
                WireKind::Gen => GEN_TIERS,
                WireKind::Tap => TIERS,
                WireKind::Afpacket => AFPACKET_TIERS,
                WireKind::Afxdp => AFXDP_TIERS,
            };
            let mut base = None;
            for &tier in tiers {
                let mut row = match tier.1.strip_prefix("dpdk:") {
                    Some(_) if !matches!(traffic, Traffic::Udp | Traffic::Back) => continue,
                    Some(pmd) => match dpdk::row(cfg, tier.0, pmd, size, k, traffic) {
                        Ok(r) => r,
                        Err(e) => {
                            eprintln!("{}: skipped: {e}", tier.0);
                            k += 1;
                            continue;
                        }
                    },
                    None => one(cfg, traffic, tier, size, k)?,
                };
                k += 1;
                let p50 = row.latency_us[0];
                row.latency_added_us = p50 - *base.get_or_insert(p50);
                eprintln!("{:<18} {traffic:?} {:>5} B: {:.3} Mpps", row.tier, size, row.mpps);
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_draws_as_svg_with_every_tier() {
        let mut rows = Vec::new();
        for traffic in [Traffic::Udp, Traffic::Tcp, Traffic::Vm] {
            for (t, (name, _)) in GEN_TIERS.iter().enumerate() {
                rows.push(TierRow {
                    tier: name.to_string(),
                    traffic,
                    size: 64,
                    cpu_copies: 1.0 - 0.4 * t as f64,
                    host_cycles: 1500.0,
                    tlps: 2.0 * t as f64,
                    ..TierRow::default()
                });
            }
        }
        let path = std::env::temp_dir().join(format!("tiers-{}.svg", std::process::id()));
        write_svg(&path, &rows).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        for name in [
            "tier 0 (software)",
            "Level 0 NIC",
            "Level 1 NIC",
            "Level 3 NIC (VFs)",
            "udp 64 B",
            "tcp 64 B",
            "vm 64 B",
            "CPU copies per frame",
        ] {
            assert!(svg.contains(name), "{name} in the plot");
        }
    }

    #[test]
    fn a_coalesced_tcp_frame_counts_as_its_segments() {
        let f = build_tcp_segment([2; 6], WIRE, 1, 1, 4000);
        assert_eq!(wire_frames(&f, 1000), 4);
        assert_eq!(wire_frames(&build_frame([2; 6], WIRE, None, 100, 0), 1000), 1);
    }
}
