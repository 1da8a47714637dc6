//! The generator and sink: one thread drives the TX and RX rings of every port.
//!
//! A [`Plan`] turns a topology into *streams*: (sending port, flow, destination) with the set
//! of ports that must receive each frame and the set that may (flooding of an unknown
//! destination within its VLAN). Every frame carries a [`Tag`] after its UDP header: stream,
//! sequence number and TX timestamp, so the sink can count loss, reordering, misdelivery and
//! one-way latency per frame without any state shared with the sender.
//!
//! The hot loop, per port: read the clock once, poll RX (each frame: tag check, counters,
//! latency), then queue up to a burst of frames and publish them with one store. A frame is
//! written in place into its TX buffer: the 42 header bytes of its stream and size, then the
//! tag; payload bytes are left as they are, as DPDK's flowgen does.
//!
//! Offered load is either "as fast as the rings take frames" (a full TX ring is back-pressure,
//! not loss) or a fixed rate, where a frame the full ring cannot take is *refused* and counted
//! as lost (a NIC would drop it), so zero-loss searches see a switch that cannot keep up.

use std::time::Duration;

use super::results::Latency;

use super::clock::Clock;
pub use super::sink::latency_of;
use super::sink::Sink;
use super::spec::{FrameSize, SpecError, Topology};
use crate::frame::ipv4_checksum;
use crate::frontend::Frontend;

/// Offset of the [`Tag`] in a frame: right after Ethernet (untagged), IPv4 and UDP headers.
pub const TAG_OFFSET: usize = 14 + 20 + 8;
/// Bytes of a [`Tag`]; with [`TAG_OFFSET`] this fills a 60-byte frame exactly.
pub const TAG_LEN: usize = 18;
const TAG_MAGIC: [u8; 4] = *b"VSBT";
pub(super) const MASK48: u64 = (1 << 48) - 1;
const MASK40: u64 = (1 << 40) - 1;
/// Stream id of the learning frames sent before traffic starts (not counted).
pub(super) const HELLO_STREAM: u32 = (1 << 24) - 1;
/// Most streams a plan may have (stream ids are 24 bits; one is reserved): enough for 64
/// ports' worth of flows, or 100,000 learned MACs between two ports.
pub const MAX_STREAMS: usize = HELLO_STREAM as usize;
/// Most ports: receiver sets are 64-bit masks.
pub const MAX_PORTS: usize = 64;
/// Most flows per sending port (MAC addresses carry the flow number in 16 bits).
pub const MAX_FLOWS: usize = 65536;
const BROADCAST: [u8; 6] = [0xff; 6];

/// What the sink reads back from a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    /// Stream index in the [`Plan`] (24 bits kept).
    pub stream: u32,
    /// Sequence number within the stream (40 bits kept: 10^12 frames).
    pub seq: u64,
    /// TX time in [`Clock`] ticks relative to the run's start (48 bits kept).
    pub stamp: u64,
}

impl Tag {
    /// Writes the tag at [`TAG_OFFSET`] of `frame` (at least 60 bytes).
    #[inline(always)]
    pub fn write(&self, frame: &mut [u8]) {
        let t = &mut frame[TAG_OFFSET..TAG_OFFSET + TAG_LEN];
        t[0..4].copy_from_slice(&TAG_MAGIC);
        t[4..7].copy_from_slice(&self.stream.to_be_bytes()[1..]);
        t[7..12].copy_from_slice(&(self.seq & MASK40).to_be_bytes()[3..]);
        t[12..18].copy_from_slice(&(self.stamp & MASK48).to_be_bytes()[2..]);
    }

    /// Reads the tag of `frame`, or `None` if it has none (too short, wrong magic).
    #[inline(always)]
    pub fn read(frame: &[u8]) -> Option<Tag> {
        let t = frame.get(TAG_OFFSET..TAG_OFFSET + TAG_LEN)?;
        if t[0..4] != TAG_MAGIC {
            return None;
        }
        let u48 = |b: &[u8]| u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]]);
        let u40 = |b: &[u8]| u64::from_be_bytes([0, 0, 0, b[0], b[1], b[2], b[3], b[4]]);
        let stream = u32::from_be_bytes([0, t[4], t[5], t[6]]);
        Some(Tag { stream, seq: u40(&t[7..12]), stamp: u48(&t[12..18]) })
    }
}

/// MAC address of flow `flow` on port `port`: locally administered, `02:56:53:PP:FF:FF`.
pub fn port_mac(port: usize, flow: usize) -> [u8; 6] {
    [0x02, 0x56, 0x53, port as u8, (flow >> 8) as u8, flow as u8]
}

/// One stream of frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSpec {
    /// Sending port.
    pub src: usize,
    /// Flow number on the sending port.
    pub flow: usize,
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Ports that must receive every frame (bit i = port i).
    pub must: u64,
    /// Ports that may receive frames (a superset of `must`); anything else is misdelivery.
    pub may: u64,
}

/// The streams of a topology and the frame sizes they cycle through.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Number of ports.
    pub ports: usize,
    /// Every stream; its index is the id carried in the [`Tag`].
    pub streams: Vec<StreamSpec>,
    /// Streams each port sends, in round-robin order.
    pub per_port: Vec<Vec<u32>>,
    /// Distinct frame lengths on the ring (FCS excluded).
    pub lengths: Vec<usize>,
    /// Index into `lengths` for each frame of the repeating size pattern.
    pub pattern: Vec<u8>,
    /// Flows per port (each has its own source MAC, learned before traffic starts).
    pub flows: usize,
    /// Header bytes per (stream, length): `headers[stream * lengths.len() + i]`.
    headers: Vec<[u8; TAG_OFFSET]>,
}

/// Why traffic cannot be planned or generated.
#[derive(thiserror::Error, Debug)]
pub enum GenError {
    /// The topology does not take that many ports (its message as is).
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// at most {MAX_PORTS} ports
    #[error("at most {MAX_PORTS} ports")]
    TooManyPorts,
    /// --flows must be in 1..={MAX_FLOWS}, not {0}
    #[error("--flows must be in 1..={MAX_FLOWS}, not {0}")]
    Flows(usize),
    /// {streams} streams ({ports} ports, {flows} flows) exceed {MAX_STREAMS}; use fewer flows
    #[error("{streams} streams ({ports} ports, {flows} flows) exceed {MAX_STREAMS}; use fewer flows")]
    TooManyStreams {
        /// Streams the plan would have.
        streams: usize,
        /// Ports.
        ports: usize,
        /// Flows per port.
        flows: usize,
    },
    /// latency histogram: {0}
    #[error("latency histogram: {0}")]
    Histogram(#[from] hdrhistogram::CreationError),
    /// port {0}: the switch does not take frames from its TX ring (learning phase)
    #[error("port {0}: the switch does not take frames from its TX ring (learning phase)")]
    Stuck(usize),
    /// a generator thread failed: {0}
    #[error("a generator thread failed: {0}")]
    Thread(String),
}

impl Plan {
    /// Builds the streams of `topology` over `ports` ports with `flows` flows per sender.
    pub fn new(topology: Topology, ports: usize, flows: usize, size: FrameSize) -> Result<Plan, GenError> {
        topology.check_ports(ports)?;
        if ports > MAX_PORTS {
            return Err(GenError::TooManyPorts);
        }
        if flows == 0 || flows > MAX_FLOWS {
            return Err(GenError::Flows(flows));
        }
        // Counted before any is built (a 64-port mesh of 65,536 flows would be 264 million).
        let per_flow = match topology {
            Topology::P2p => 2,
            Topology::P2pUni | Topology::Flood => 1,
            Topology::Mesh => ports * (ports - 1),
            Topology::Vlan => 8,
        };
        if per_flow * flows > MAX_STREAMS {
            return Err(GenError::TooManyStreams { streams: per_flow * flows, ports, flows });
        }
        let bit = |p: usize| 1u64 << p;
        let mut streams = Vec::new();
        let mut add = |src: usize, flow: usize, dst_mac: [u8; 6], must: u64, may: u64| {
            streams.push(StreamSpec { src, flow, dst_mac, must, may });
        };
        for f in 0..flows {
            match topology {
                Topology::P2p => {
                    add(0, f, port_mac(1, f), bit(1), bit(1));
                    add(1, f, port_mac(0, f), bit(0), bit(0));
                }
                Topology::P2pUni => add(0, f, port_mac(1, f), bit(1), bit(1)),
                Topology::Mesh => {
                    for s in 0..ports {
                        for d in (0..ports).filter(|&d| d != s) {
                            add(s, f, port_mac(d, f), bit(d), bit(d));
                        }
                    }
                }
                Topology::Flood => {
                    let all = (1..ports).fold(0, |m, p| m | bit(p));
                    add(0, f, BROADCAST, all, all);
                }
                Topology::Vlan => {
                    // Ports 0,1 on one VLAN, 2,3 on the other. Each port sends to its VLAN peer,
                    // and to a MAC that lives on the other VLAN: unknown on its own VLAN, so
                    // the switch may flood it to the peer, and must never deliver it to 2 or 3.
                    for s in 0..4 {
                        let peer = s ^ 1;
                        let other = (s + 2) % 4;
                        add(s, f, port_mac(peer, f), bit(peer), bit(peer));
                        add(s, f, port_mac(other, f), 0, bit(peer));
                    }
                }
            }
        }
        if streams.len() > MAX_STREAMS {
            return Err(GenError::TooManyStreams { streams: streams.len(), ports, flows });
        }
        let mut per_port = vec![Vec::new(); ports];
        for (i, s) in streams.iter().enumerate() {
            per_port[s.src].push(i as u32);
        }
        let pattern_lens = size.pattern();
        let mut lengths: Vec<usize> = pattern_lens.clone();
        lengths.sort_unstable();
        lengths.dedup();
        let pattern =
            pattern_lens.iter().map(|l| lengths.iter().position(|x| x == l).unwrap_or(0) as u8).collect();
        let mut headers = Vec::with_capacity(streams.len() * lengths.len());
        for s in &streams {
            for &len in &lengths {
                headers.push(header(s, len));
            }
        }
        Ok(Plan { ports, streams, per_port, lengths, pattern, flows, headers })
    }

    /// Header bytes of stream `s` at length index `li`.
    #[inline(always)]
    fn header(&self, s: usize, li: usize) -> &[u8; TAG_OFFSET] {
        &self.headers[s * self.lengths.len() + li]
    }

    /// Largest frame length in the pattern.
    pub fn max_len(&self) -> usize {
        self.lengths.iter().copied().max().unwrap_or(60)
    }

    /// Ports that send.
    pub fn senders(&self) -> usize {
        self.per_port.iter().filter(|s| !s.is_empty()).count()
    }
}

/// Ethernet + IPv4 + UDP header of a `len`-byte frame of stream `s`. Flows differ in MACs,
/// IP addresses and UDP source port, so flow-hashing switches see distinct flows too.
fn header(s: &StreamSpec, len: usize) -> [u8; TAG_OFFSET] {
    let mut h = [0u8; TAG_OFFSET];
    h[0..6].copy_from_slice(&s.dst_mac);
    h[6..12].copy_from_slice(&port_mac(s.src, s.flow));
    h[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut h[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((len - 14) as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 17;
    let dst_port = if s.dst_mac == BROADCAST { 255 } else { usize::from(s.dst_mac[3]) };
    ip[12..16].copy_from_slice(&[10, s.src as u8, (s.flow >> 8) as u8, s.flow as u8]);
    ip[16..20].copy_from_slice(&[10, dst_port as u8, (s.flow >> 8) as u8, s.flow as u8]);
    let c = ipv4_checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let udp = &mut h[34..42];
    udp[0..2].copy_from_slice(&(1024 + (s.flow % 60000) as u16).to_be_bytes());
    udp[2..4].copy_from_slice(&5001u16.to_be_bytes());
    udp[4..6].copy_from_slice(&((len - 34) as u16).to_be_bytes());
    h
}

/// How a generator run is driven.
#[derive(Clone, Debug)]
pub struct GenConfig {
    /// Offered frames per second summed over senders; `None` = as fast as possible.
    pub rate_pps: Option<f64>,
    /// Traffic before the measurement window (not measured).
    pub warmup: Duration,
    /// The measurement window.
    pub duration: Duration,
    /// Frames queued per port per loop iteration at most.
    pub burst: usize,
    /// Longest wait after traffic stops for frames still in flight.
    pub drain: Duration,
    /// Ports migrating (`ours+log`): how often their dirty logs are read and cleared.
    pub read_dirty_log: Option<Duration>,
    /// One generator thread per CPU, the ports split between them in contiguous runs; the
    /// first is the calling thread (pinned by the caller), the others are pinned here. Empty
    /// or one: the calling thread drives every port.
    pub cpus: Vec<usize>,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            rate_pps: None,
            warmup: Duration::from_secs(2),
            duration: Duration::from_secs(10),
            burst: 32,
            drain: Duration::from_secs(1),
            read_dirty_log: None,
            cpus: Vec::new(),
        }
    }
}

/// Something the caller may act on while traffic runs.
#[derive(Clone, Copy, Debug)]
pub enum Event {
    /// Warm-up is over: the measurement window starts now (snapshot CPU counters here).
    WindowStart,
    /// The measurement window ends now.
    WindowEnd,
    /// About once a second: seconds of traffic so far, of the total, and frames received per
    /// second over the last interval.
    Progress {
        /// Seconds since traffic started.
        elapsed_s: f64,
        /// Warm-up plus duration.
        total_s: f64,
        /// Received frames per second over the last interval.
        rx_pps: f64,
    },
}

/// What a generator run measured.
#[derive(Clone, Debug, Default)]
pub struct GenResult {
    /// Frames queued on TX rings, whole run (warm-up included).
    pub tx_frames: u64,
    /// Frames queued during the window.
    pub window_tx: u64,
    /// Tagged frames received, whole run.
    pub rx_frames: u64,
    /// Frames received during the window.
    pub window_rx: u64,
    /// Nominal bytes (FCS included) received during the window.
    pub window_rx_bytes: u64,
    /// Window length in seconds (measured).
    pub window_s: f64,
    /// Receptions the plan requires for every frame offered, whole run.
    pub expected: u64,
    /// Required receptions that did not happen (after the drain), plus receptions of frames
    /// refused by a full TX ring at a fixed rate.
    pub lost: u64,
    /// Frames whose sequence number was not above the last one seen on their stream and port.
    pub reordered: u64,
    /// Fixed rate: frames due while the TX ring was full, never offered; counted in `lost`.
    pub refused: u64,
    /// Frames received on a port their stream must not reach.
    pub misdelivered: u64,
    /// Received frames without a valid tag (not from this generator, or corrupted).
    pub foreign: u64,
    /// Times a TX ring was full during the window (max rate) or frames it refused (fixed rate).
    pub tx_ring_full: u64,
    /// Frames a fixed-rate run could not offer on time because the generator itself lagged.
    pub generator_lag: u64,
    /// TX bursts attempted during the window (one per port and loop turn with frames due).
    pub window_bursts: u64,
    /// Latency of frames received during the window.
    pub latency: Option<Latency>,
    /// `ours+log`: pages found marked in the ports' dirty logs, whole run.
    pub dirty_pages: u64,
}

impl GenResult {
    /// Received frames per second in the window.
    pub fn pps(&self) -> f64 {
        if self.window_s > 0.0 {
            self.window_rx as f64 / self.window_s
        } else {
            0.0
        }
    }

    /// True when the generator rather than the switch set the rate: at a fixed rate, when it
    /// could not offer more than 1 % of the frames on time; at the maximum rate, when fewer
    /// than 10 % of its bursts found a TX ring full (a switch that is the bottleneck leaves
    /// its input rings full nearly all the time).
    pub fn generator_limited(&self, fixed_rate: bool) -> bool {
        if fixed_rate {
            self.generator_lag > self.window_tx / 100
        } else {
            self.tx_ring_full * 10 < self.window_bursts
        }
    }
}

/// Per-port sender state.
#[derive(Default, Clone)]
struct Sender {
    rr: usize,
    slot: usize,
    /// Frames offered (queued or refused) since traffic started.
    offered: u64,
}

/// Sends the learning frames (one broadcast per flow MAC of every port) and waits until the
/// switch has forwarded them, so unicast traffic is not flooded while MACs are unknown.
fn learn(ports: &mut [Frontend], plan: &Plan, clock: &Clock, base: u64) -> Result<(), GenError> {
    for (p, fe) in ports.iter_mut().enumerate() {
        for f in 0..plan.flows {
            let s = StreamSpec { src: p, flow: f, dst_mac: BROADCAST, must: 0, may: 0 };
            let h = header(&s, 60);
            let tag = Tag { stream: HELLO_STREAM, seq: f as u64, stamp: clock.now().wrapping_sub(base) };
            let mut queued = false;
            for _ in 0..1000 {
                if fe.enqueue_tx_with(0, 60, |b| {
                    b[..TAG_OFFSET].copy_from_slice(&h);
                    tag.write(b);
                }) {
                    queued = true;
                    break;
                }
                fe.flush_tx(0);
                std::thread::sleep(Duration::from_micros(200));
                fe.reclaim_tx(0);
            }
            if !queued {
                return Err(GenError::Stuck(p));
            }
            if f % 32 == 31 {
                fe.flush_tx(0);
            }
        }
        fe.flush_tx(0);
    }
    drain(ports, clock, Duration::from_secs(2), |_, _, _| {});
    Ok(())
}

/// Polls every port's RX (handing frames to `on_frame(port, frame, now)`) and reclaims TX
/// until 50 ms pass without a frame, or `limit` in all. Sleeps between polls: traffic has
/// stopped, so there is nothing to race for.
fn drain(
    ports: &mut [Frontend],
    clock: &Clock,
    limit: Duration,
    mut on_frame: impl FnMut(usize, &[u8], u64),
) {
    let quiet = clock.ticks(Duration::from_millis(50));
    let start = clock.now();
    let end = start + clock.ticks(limit);
    let mut last_rx = start;
    loop {
        let now = clock.now();
        let mut got = 0;
        for (p, fe) in ports.iter_mut().enumerate() {
            got += fe.poll_rx(0, |frame| on_frame(p, frame, now));
            fe.reclaim_tx(0);
        }
        if got > 0 {
            last_rx = now;
        } else if now - last_rx > quiet || now > end {
            return;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Runs the plan over `ports` (port i = `ports[i]`, queue pair 0): learning frames, warm-up,
/// the measurement window, then a drain; `on` is called for each [`Event`].
///
/// Runs on the calling thread (pin it first), and on one more thread per further CPU of
/// [`GenConfig::cpus`], each driving its own run of ports (a frame is received by the thread
/// of the port it arrives on; counts and latencies are merged at the end). Returns an error
/// only when the switch stops taking frames entirely during learning.
pub fn run(
    ports: &mut [Frontend],
    plan: &Plan,
    cfg: &GenConfig,
    clock: &Clock,
    measure_latency: bool,
    on: &mut dyn FnMut(Event),
) -> Result<GenResult, GenError> {
    assert_eq!(ports.len(), plan.ports, "one frontend per plan port");
    let base = clock.now();
    learn(ports, plan, clock, base)?;

    let start = clock.now();
    let window = start + clock.ticks(cfg.warmup);
    let times = Times { base, start, window, end: window + clock.ticks(cfg.duration) };
    let threads = cfg.cpus.len().clamp(1, ports.len().max(1));
    let per = ports.len().div_ceil(threads).max(1);
    let (mut res, mut sink) = if threads == 1 {
        traffic(ports, 0, plan, cfg, clock, &times, Some(on))?
    } else {
        std::thread::scope(|sc| -> Result<(GenResult, Sink), GenError> {
            let mut chunks = ports.chunks_mut(per).enumerate();
            let (_, mine) = chunks.next().expect("at least one port");
            let mut others = Vec::new();
            for (k, chunk) in chunks {
                let (cpu, times) = (cfg.cpus[k], &times);
                others.push(sc.spawn(move || {
                    super::sys::pin_current_thread(cpu).map_err(|e| GenError::Thread(e.to_string()))?;
                    traffic(chunk, k * per, plan, cfg, clock, times, None)
                }));
            }
            let (mut res, mut sink) = traffic(mine, 0, plan, cfg, clock, &times, Some(on))?;
            for h in others {
                let (r, s) =
                    h.join().map_err(|_| GenError::Thread("a generator thread panicked".into()))??;
                res.merge(&r);
                sink.merge(s);
            }
            Ok((res, sink))
        })?
    };

    // Traffic stopped: wait for frames still in flight.
    drain(ports, clock, cfg.drain, |p, frame, now| sink.on_frame(p, frame, now.wrapping_sub(base) & MASK48));

    res.rx_frames = sink.rx;
    res.window_rx = sink.window_rx;
    res.window_rx_bytes = sink.window_bytes;
    res.lost = res.expected.saturating_sub(sink.received_must);
    res.reordered = sink.reordered;
    res.misdelivered = sink.misdelivered;
    res.foreign = sink.foreign;
    if measure_latency && !sink.hist.is_empty() {
        res.latency = Some(latency_of(&sink.hist, clock));
    }
    Ok(res)
}

/// The run's clock marks, shared by every generator thread.
struct Times {
    base: u64,
    start: u64,
    window: u64,
    end: u64,
}

impl GenResult {
    /// Adds another generator thread's sender-side counts (the window length is the first
    /// thread's).
    fn merge(&mut self, o: &GenResult) {
        self.tx_frames += o.tx_frames;
        self.window_tx += o.window_tx;
        self.expected += o.expected;
        self.refused += o.refused;
        self.tx_ring_full += o.tx_ring_full;
        self.generator_lag += o.generator_lag;
        self.window_bursts += o.window_bursts;
        self.dirty_pages += o.dirty_pages;
    }
}

/// One generator thread's traffic over `ports` (plan ports `first..first + ports.len()`) from
/// `times.start` to `times.end`: what it sent and what its ports received. `on`: the thread
/// that reports events.
fn traffic(
    ports: &mut [Frontend],
    first: usize,
    plan: &Plan,
    cfg: &GenConfig,
    clock: &Clock,
    times: &Times,
    mut on: Option<&mut dyn FnMut(Event)>,
) -> Result<(GenResult, Sink), GenError> {
    let base = times.base;
    let hz = clock.hz();
    let shared_ports = first != 0 || ports.len() != plan.ports;
    // Latencies up to 10 s, 3 significant digits.
    let mut sink = Sink::new(plan, (hz * 10.0) as u64)?;
    let must_count: Vec<u64> = plan.streams.iter().map(|s| u64::from(s.must.count_ones())).collect();
    let mut seqs = vec![0u64; plan.streams.len()];
    let mut senders = vec![Sender::default(); ports.len()];
    let per_port_rate = cfg.rate_pps.map(|r| r / plan.senders().max(1) as f64 / hz);
    let burst = cfg.burst.max(1);
    let lag_cap = 4 * burst as u64;

    let mut res = GenResult::default();
    let (t_start, t_window, t_end) = (times.start, times.window, times.end);
    let total_s = (cfg.warmup + cfg.duration).as_secs_f64();
    let tick_1s = clock.ticks(Duration::from_secs(1));
    let mut next_progress = t_start + tick_1s;
    let mut rx_at_progress = 0u64;
    let mut t_progress = t_start;
    let mut window_started = false;
    let mut ring_full = 0u64;
    let log_every = cfg.read_dirty_log.map(|d| clock.ticks(d));
    let mut next_log = t_start;
    loop {
        let now = clock.now();
        if now >= t_end {
            break;
        }
        if let Some(every) = log_every.filter(|_| now >= next_log) {
            // What QEMU's pre-copy does between passes: read and clear each log.
            for fe in ports.iter_mut() {
                res.dirty_pages += fe.take_dirty_pages().len() as u64;
            }
            next_log = now + every;
        }
        if !window_started && now >= t_window {
            window_started = true;
            sink.in_window = true;
            res.window_tx = 0;
            res.window_bursts = 0;
            ring_full = 0;
            if let Some(on) = on.as_mut() {
                on(Event::WindowStart);
            }
        }
        if now >= next_progress {
            let secs = (now - t_progress) as f64 / hz;
            if let Some(on) = on.as_mut() {
                // This thread's ports only, when there are several threads.
                on(Event::Progress {
                    elapsed_s: (now - t_start) as f64 / hz,
                    total_s,
                    rx_pps: (sink.rx - rx_at_progress) as f64 / secs,
                });
            }
            rx_at_progress = sink.rx;
            t_progress = now;
            next_progress = now + tick_1s;
        }
        for (i, fe) in ports.iter_mut().enumerate() {
            let p = first + i;
            // Read per port: a frame sent by an earlier port in this turn may already be here,
            // and must not look older than its own stamp. RX time is taken before the poll, a
            // lower bound of when the frame became visible.
            let now = if i == 0 { now } else { clock.now() };
            let stamp = now.wrapping_sub(base) & MASK48;
            if shared_ports {
                // Another thread may have stamped a frame after `now` was read: time each frame
                // as it is taken (an upper bound, a clock read per frame).
                fe.poll_rx(0, |frame| sink.on_frame(p, frame, clock.now().wrapping_sub(base) & MASK48));
            } else {
                fe.poll_rx(0, |frame| sink.on_frame(p, frame, stamp));
            }
            let streams = &plan.per_port[p];
            if streams.is_empty() {
                continue;
            }
            let snd = &mut senders[i];
            let mut want = burst as u64;
            if let Some(r) = per_port_rate {
                let allowed = (r * (now - t_start) as f64) as u64;
                let mut quota = allowed.saturating_sub(snd.offered);
                if quota > lag_cap {
                    // The generator fell behind (descheduled, or too slow): do not burst to
                    // catch up, which would distort the offered rate; count it instead.
                    let skip = quota - lag_cap;
                    snd.offered += skip;
                    if window_started {
                        res.generator_lag += skip;
                    }
                    quota = lag_cap;
                }
                want = want.min(quota);
            }
            if want > 0 && window_started {
                res.window_bursts += 1;
            }
            let mut full = false;
            for _ in 0..want {
                let s = streams[snd.rr] as usize;
                snd.rr = if snd.rr + 1 == streams.len() { 0 } else { snd.rr + 1 };
                let li = plan.pattern[snd.slot] as usize;
                snd.slot = if snd.slot + 1 == plan.pattern.len() { 0 } else { snd.slot + 1 };
                snd.offered += 1;
                if !full {
                    let seq = seqs[s];
                    let hdr = plan.header(s, li);
                    let tag = Tag { stream: s as u32, seq, stamp };
                    if fe.enqueue_tx_with(0, plan.lengths[li], |b| {
                        b[..TAG_OFFSET].copy_from_slice(hdr);
                        tag.write(b);
                    }) {
                        seqs[s] = seq + 1;
                        res.tx_frames += 1;
                        res.window_tx += u64::from(window_started);
                        res.expected += must_count[s];
                        continue;
                    }
                    full = true;
                    ring_full += u64::from(window_started);
                    if per_port_rate.is_none() {
                        snd.offered -= 1;
                        break;
                    }
                }
                // Fixed rate and the ring is full: the frame is refused, i.e. lost.
                res.expected += must_count[s];
                res.refused += 1;
                ring_full += u64::from(window_started && per_port_rate.is_some());
            }
            fe.flush_tx(0);
        }
        if sink.in_window && clock.now() >= t_end {
            break;
        }
    }
    let t_stop = clock.now();
    sink.in_window = false;
    if let Some(on) = on.as_mut() {
        on(Event::WindowEnd);
    }
    res.window_s = if window_started { (t_stop - t_window) as f64 / hz } else { 0.0 };
    res.tx_ring_full = ring_full;
    Ok((res, sink))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::Histogram;

    #[test]
    fn tag_round_trip_fills_a_minimum_frame() {
        assert_eq!(TAG_OFFSET + TAG_LEN, 60);
        let mut f = [0u8; 60];
        let t = Tag { stream: 0x12_3456, seq: (1 << 40) - 2, stamp: 0x1234_5678_9abc };
        t.write(&mut f);
        assert_eq!(Tag::read(&f), Some(t));
        // Only 40 bits of seq and 48 of the stamp are carried.
        let big = Tag { stream: 1, seq: (1 << 42) + 7, stamp: u64::MAX };
        big.write(&mut f);
        assert_eq!(Tag::read(&f), Some(Tag { stream: 1, seq: 7, stamp: MASK48 }));
        f[TAG_OFFSET] ^= 1;
        assert_eq!(Tag::read(&f), None, "bad magic");
        assert_eq!(Tag::read(&f[..59]), None, "too short");
    }

    #[test]
    fn headers_are_valid_ipv4_udp() {
        let plan = Plan::new(Topology::P2p, 2, 3, FrameSize::Imix).unwrap();
        assert_eq!(plan.streams.len(), 6);
        assert_eq!(plan.lengths, vec![60, 566, 1514]);
        assert_eq!(plan.pattern.len(), 12);
        for (s, spec) in plan.streams.iter().enumerate() {
            for (li, &len) in plan.lengths.iter().enumerate() {
                let h = plan.header(s, li);
                assert_eq!(&h[0..6], &spec.dst_mac);
                assert_eq!(&h[6..12], &port_mac(spec.src, spec.flow));
                assert_eq!(ipv4_checksum(&h[14..34]), 0, "checksum verifies");
                assert_eq!(u16::from_be_bytes([h[16], h[17]]) as usize, len - 14);
                assert_eq!(u16::from_be_bytes([h[38], h[39]]) as usize, len - 34);
            }
        }
        // Flows differ in source MAC, IPs and UDP source port.
        let (a, b) = (plan.header(0, 0), plan.header(2, 0));
        assert_eq!(plan.streams[2].flow, 1);
        assert_ne!(a[6..12], b[6..12]);
        assert_ne!(a[26..30], b[26..30]);
        assert_ne!(a[34..36], b[34..36]);
    }

    #[test]
    fn topologies_make_the_right_streams() {
        let p = Plan::new(Topology::P2pUni, 2, 2, FrameSize::Fixed(64)).unwrap();
        assert_eq!(p.per_port[0].len(), 2);
        assert!(p.per_port[1].is_empty());
        assert_eq!(p.senders(), 1);

        let m = Plan::new(Topology::Mesh, 4, 1, FrameSize::Fixed(64)).unwrap();
        assert_eq!(m.streams.len(), 12);
        assert!(m.streams.iter().all(|s| s.must.count_ones() == 1 && s.must & (1 << s.src) == 0));

        let f = Plan::new(Topology::Flood, 5, 1, FrameSize::Fixed(64)).unwrap();
        assert_eq!(f.streams.len(), 1);
        assert_eq!(f.streams[0].must, 0b11110);
        assert_eq!(f.streams[0].dst_mac, BROADCAST);

        let v = Plan::new(Topology::Vlan, 4, 1, FrameSize::Fixed(64)).unwrap();
        assert_eq!(v.streams.len(), 8);
        for s in &v.streams {
            let peer = 1u64 << (s.src ^ 1);
            assert_eq!(s.may, peer, "only the VLAN peer may see frames from {}", s.src);
            assert!(s.must == peer || s.must == 0);
        }

        assert!(Plan::new(Topology::Mesh, 64, 5000, FrameSize::Fixed(64)).is_err(), "too many streams");
        let many = Plan::new(Topology::P2p, 2, 60_000, FrameSize::Fixed(64)).expect("120,000 streams");
        assert_eq!(many.streams.len(), 120_000);
        assert!(Plan::new(Topology::P2p, 2, 0, FrameSize::Fixed(64)).is_err());
        assert!(Plan::new(Topology::P2p, 3, 1, FrameSize::Fixed(64)).is_err());
    }

    fn sink(plan: &Plan) -> Sink {
        Sink { in_window: true, ..Sink::new(plan, 1 << 40).unwrap() }
    }

    fn frame(stream: u32, seq: u64, stamp: u64) -> [u8; 60] {
        let mut f = [0u8; 60];
        Tag { stream, seq, stamp }.write(&mut f);
        f
    }

    #[test]
    fn sink_counts_reorder_misdelivery_latency() {
        let plan = Plan::new(Topology::Vlan, 4, 1, FrameSize::Fixed(64)).unwrap();
        let mut k = sink(&plan);
        // Stream 0: port 0 -> port 1.
        k.on_frame(1, &frame(0, 0, 100), 150);
        k.on_frame(1, &frame(0, 2, 100), 400);
        k.on_frame(1, &frame(0, 1, 100), 400); // late: reordered
        k.on_frame(1, &frame(0, 2, 100), 400); // duplicate: reordered
        k.on_frame(2, &frame(0, 3, 100), 400); // other VLAN: misdelivered
        k.on_frame(1, &frame(1, 0, 100), 400); // probe flooded to the peer: allowed
        k.on_frame(1, &[0u8; 60], 400); // no tag
        k.on_frame(1, &frame(HELLO_STREAM, 0, 0), 400); // learning frame: ignored
        k.on_frame(1, &frame(4000, 0, 0), 400); // unknown stream
        assert_eq!(k.rx, 6);
        assert_eq!(k.reordered, 2);
        assert_eq!(k.misdelivered, 1);
        assert_eq!(k.foreign, 2);
        assert_eq!(k.received_must, 4, "stream 0 frames on port 1");
        assert_eq!(k.hist.len(), 6);
        assert_eq!(k.hist.min(), 50);
        assert_eq!(k.window_bytes, 6 * 64);
        // 48-bit wrap of the stamp is handled.
        k.on_frame(1, &frame(0, 9, MASK48 - 9), 10);
        assert_eq!(k.hist.count_between(20, 20), 1, "wrapped stamp gives 20 ticks");
        assert_eq!(k.hist.max(), 300, "no huge value from the wrap");
    }

    #[test]
    fn latency_summary_is_monotonic() {
        let clock = Clock::calibrate(Duration::from_millis(10)).unwrap();
        let mut h = Histogram::<u64>::new_with_bounds(1, 1 << 40, 3).unwrap();
        for v in 1..=10_000u64 {
            h.record(v * 100).unwrap();
        }
        let l = latency_of(&h, &clock);
        assert_eq!(l.samples, 10_000);
        assert!(l.min_ns <= l.p50_ns && l.p50_ns <= l.p90_ns && l.p90_ns <= l.p99_ns);
        assert!(l.p99_ns <= l.p999_ns && l.p999_ns <= l.max_ns);
        assert!(l.cdf.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        assert_eq!(l.cdf.last().unwrap().0, 1.0);
    }
}
