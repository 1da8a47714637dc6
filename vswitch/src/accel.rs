//! The switch's side of the accelerator contract (`accel`): a guest's virtio queue pair
//! handed to a Level 2 NIC and back.
//!
//! Plugged, the pair's two slots hold the device's halves instead of the software path's
//! [`VirtQueue`]s: [`AccelTx`] in the transmit slot (the device fetches what the guest posts)
//! and [`AccelRx`] in the receive slot (the device's DMA fills what the guest posts). Each keeps
//! the queue's shell (its eventfds, negotiated format, counters' identity) for the way back.
//! Polling threads skip nothing and lock nothing new: a plugged transmit slot is polled as the
//! device's work, a plugged receive slot is a sink the device writes. Plug and unplug swap the
//! slots' contents under the slots' own locks, between two bursts.

use std::time::Instant;

use nic_models::direct::{DirectCounters, DirectTx, Wire};
use nic_models::rxq::RxQueue;
use nic_models::RxDrop;
use shaping::RateLimiter;
use std::sync::atomic::Ordering;
use virtq::{RingHandoff, RingState, SplitRing};

use crate::vhost::iotlb::{MISS_TIMEOUT_NS, PARK_MAX};
use crate::virtio::queue::VirtQueue;
use nic_models::sriov::{self, Ingress, VebEntry, Vf};
use std::sync::Arc;
use vfpolicy::VfStats;

/// A Level 3 pair's VF: its policy as the device applies it, and what it counted since the
/// plug. The control thread replaces `vf` and `veb` under the slot's lock when `vswitch vf`
/// changes the policy or another VF comes or goes.
pub struct VfOn {
    /// The VF's index on its PF.
    pub n: u32,
    /// Its policy and address.
    pub vf: Vf,
    /// The embedded switch's table (every attached VF of the PF).
    pub veb: Arc<[VebEntry]>,
    /// Counted since the plug (`IFLA_VF_STATS`).
    pub stats: VfStats,
    /// Unicast switched to another VF inside the device (transmit side).
    pub veb_frames: u64,
    /// Frames for other VFs fetched this poll.
    pub veb_out: Vec<(VebEntry, Vec<u8>)>,
    /// Where the counts go when the plug ends, however it ends (an unplug, or the guest
    /// resetting its rings): the VF's counts of earlier plugs and the VEB's frames.
    pub sink: VfSink,
}

/// A VF's counts of its ended plugs.
pub type VfSink = Arc<std::sync::Mutex<(VfStats, u64)>>;

impl VfOn {
    /// A VF as attached now.
    pub fn new(n: u32, vf: Vf, veb: Arc<[VebEntry]>, sink: VfSink) -> Box<VfOn> {
        Box::new(VfOn { n, vf, veb, stats: VfStats::default(), veb_frames: 0, veb_out: Vec::new(), sink })
    }
}

impl Drop for VfOn {
    fn drop(&mut self) {
        let mut s = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        add_stats(&mut s.0, &self.stats);
        s.1 += self.veb_frames;
    }
}

/// `a += b`, counter by counter.
pub fn add_stats(a: &mut VfStats, b: &VfStats) {
    a.rx_packets += b.rx_packets;
    a.tx_packets += b.tx_packets;
    a.rx_bytes += b.rx_bytes;
    a.tx_bytes += b.tx_bytes;
    a.broadcast += b.broadcast;
    a.multicast += b.multicast;
    a.rx_dropped += b.rx_dropped;
    a.tx_dropped += b.tx_dropped;
}

/// `parts` without bytes `from..to` of their concatenation, into `out`; how many parts.
fn cut<'a>(parts: &[&'a [u8]], from: usize, to: usize, out: &mut [&'a [u8]]) -> usize {
    let (mut at, mut n) = (0usize, 0usize);
    for p in parts {
        let (s, e) = (at, at + p.len());
        at = e;
        for (a, b) in [(s, e.min(from)), (s.max(to), e)] {
            if a < b && n < out.len() {
                out[n] = &p[a - s..b - s];
                n += 1;
            }
        }
    }
    n
}

/// A plugged receive ring: the device's queue and the software path's shell.
pub struct AccelRx {
    /// The device's receive queue over the guest's ring.
    pub q: RxQueue,
    /// The queue the software path had (its ring is stale until the hand-back).
    pub shell: VirtQueue,
    /// The NIC port that owns it.
    pub nic: u16,
    /// The ring's state at plug (for the ledger).
    pub start: RingState,
    /// Level 3: the VF's receive filter (address, port VLAN, link state).
    pub vf: Option<Box<VfOn>>,
}

/// A plugged transmit ring.
pub struct AccelTx {
    /// The device's transmit engine over the guest's ring.
    pub q: DirectTx,
    /// The queue the software path had.
    pub shell: VirtQueue,
    /// The NIC port that owns it.
    pub nic: u16,
    /// The ring's state at plug.
    pub start: RingState,
    /// What the device did for this guest.
    pub k: DirectCounters,
    /// The device's transmit shaping for this guest (`nic-rate=`), if any.
    pub rate: Option<RateLimiter>,
    /// Polling-thread ticks spent as the device for this ring.
    pub device_ticks: u64,
    /// Frames for the software path (broadcast, other guests) fetched this poll.
    pub soft: Vec<Vec<u8>>,
    /// When it was plugged.
    pub since: Instant,
    /// Level 3: the VF's transmit policy and the embedded switch.
    pub vf: Option<Box<VfOn>>,
}

/// A ring's hand-off from a running software queue (every used entry published first).
pub fn handoff_of(q: &mut VirtQueue) -> RingHandoff {
    q.publish();
    RingHandoff { addrs: q.addrs, size: q.ring.size(), state: q.ring.state(), event_idx: q.event_idx }
}

/// The device's view of a queue's memory: the same guest memory, domain and fault log, a
/// translator of its own (behind a vIOMMU, a copy of the queue's IOTLB, which the port's IOTLB
/// messages keep up to date like every other copy).
fn device_dma(q: &VirtQueue) -> iommu::Dma {
    q.dma.fork()
}

/// A pair the device would not take: the queues as they were (rx, tx), and why.
pub type Unplugged = (VirtQueue, VirtQueue, String);

/// Plugs a running pair: the device's halves, or the queues back with the reason.
pub fn plug(
    mut rx: VirtQueue,
    mut tx: VirtQueue,
    nic: u16,
    rate: Option<RateLimiter>,
) -> Result<(Box<AccelRx>, Box<AccelTx>), Box<Unplugged>> {
    if rx.ring.is_packed() || tx.ring.is_packed() {
        let why = "the guest negotiated packed rings, and the device models serve split rings only";
        return Err(Box::new((rx, tx, why.into())));
    }
    let (rh, th) = (handoff_of(&mut rx), handoff_of(&mut tx));
    let rxq = RxQueue::new(
        device_dma(&rx),
        rh.addrs,
        u32::from(rh.size),
        rh.state,
        rh.event_idx,
        u32::from(rx.hdr_len),
        rx.mrg_rxbuf,
    );
    let txq = DirectTx::new(device_dma(&tx), th, u32::from(tx.hdr_len), tx.indirect);
    match (rxq, txq) {
        (Ok(q), Ok(mut t)) => {
            t.set_kicks(false);
            Ok((
                Box::new(AccelRx { q, shell: rx, nic, start: rh.state, vf: None }),
                Box::new(AccelTx {
                    q: t,
                    shell: tx,
                    nic,
                    start: th.state,
                    k: DirectCounters::default(),
                    rate,
                    device_ticks: 0,
                    soft: Vec::new(),
                    since: Instant::now(),
                    vf: None,
                }),
            ))
        }
        (Err(e), _) | (_, Err(e)) => {
            Err(Box::new((rx, tx, format!("the device could not map the rings: {e}"))))
        }
    }
}

/// Resumes the software path's queue at `h` (the contract's last step), signalling the guest
/// if the device owed it an interrupt.
pub fn resume(mut shell: VirtQueue, h: &RingHandoff, owed_irq: bool) -> VirtQueue {
    match SplitRing::new(&mut shell.dma, h.addrs, u32::from(h.size), h.state.last_avail, h.event_idx) {
        Ok(mut ring) => {
            ring.set_kicks(false);
            shell.ring = virtq::Ring::Split(ring);
        }
        // The same addresses mapped at plug: only a memory table changed under us gets here.
        Err(e) => {
            tracing::warn!("cannot resume a ring handed back by the device: {e}; stopping the queue");
            shell.broken = true;
        }
    }
    if owed_irq {
        shell.signal();
    }
    // The device moved the ring on: the look-ahead for translations starts afresh.
    if let Some(l) = shell.iotlb.as_deref_mut() {
        l.rx_checked = None;
        l.tx_moved();
    }
    shell
}

/// What became of a frame offered to a plugged receive ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Took {
    /// Written into the guest's buffers.
    Now,
    /// Not for this VF (Level 3: its address or VLAN filter, or its link is down); counted in
    /// its statistics.
    Filtered,
    /// Waiting, behind any before it, for a buffer's translation (the frontend was asked).
    Parked,
}

/// What a pass over a plugged ring's parked frames did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unparked {
    /// Frames written into the guest's buffers.
    pub packets: u64,
    /// Their bytes (without the header).
    pub bytes: u64,
    /// Frames dropped: parked past the miss time-out.
    pub timed_out: u64,
    /// Frames dropped: the guest's buffer was refused (a DMA fault).
    pub faults: u64,
}

impl AccelRx {
    /// Whether frames wait for a receive buffer's translation (new ones queue behind them).
    #[inline(always)]
    pub fn has_parked(&self) -> bool {
        self.shell.iotlb.as_deref().is_some_and(|l| !l.parked.is_empty())
    }

    /// Has the device write a frame (`hdr`: its 12-byte virtio-net header; `parts`: its bytes)
    /// into the guest's next buffers. Behind a vIOMMU a buffer whose translation is missing
    /// makes the device ask the frontend and park the frame (in the queue's own parking, which
    /// the software path drains after an unplug), as do frames arriving while others are
    /// parked, so that nothing overtakes. A full parking drops the frame (counted).
    #[inline]
    pub fn receive(&mut self, hdr: &[u8; 12], parts: &[&[u8]]) -> Result<Took, RxDrop> {
        if self.vf.is_some() {
            return self.receive_vf(hdr, parts);
        }
        self.receive_now(hdr, parts)
    }

    /// Level 3: the VF's receive filter first; a port VLAN's tag is stripped as the device
    /// writes.
    #[inline(never)]
    fn receive_vf(&mut self, hdr: &[u8; 12], parts: &[&[u8]]) -> Result<Took, RxDrop> {
        let v = self.vf.as_deref_mut().expect("a VF");
        let mut head = [0u8; 18];
        let mut n = 0;
        let mut len = 0usize;
        for p in parts {
            let k = p.len().min(head.len() - n);
            head[n..n + k].copy_from_slice(&p[..k]);
            n += k;
            len += p.len();
        }
        let strip = match sriov::ingress(&v.vf, true, &head[..n]) {
            Ingress::Drop(_) => {
                v.stats.rx_dropped += 1;
                return Ok(Took::Filtered);
            }
            Ingress::Deliver { strip } => strip,
        };
        let r = if strip {
            let mut out: [&[u8]; virtq::chain::MAX_SEGS + 2] = [&[]; virtq::chain::MAX_SEGS + 2];
            let k = cut(parts, 12, 16, &mut out);
            len -= 4;
            self.receive_now(hdr, &out[..k])
        } else {
            self.receive_now(hdr, parts)
        };
        if matches!(r, Ok(Took::Now | Took::Parked)) {
            let v = self.vf.as_deref_mut().expect("a VF");
            v.stats.rx_packets += 1;
            v.stats.rx_bytes += len as u64;
            if head[0] & 1 != 0 {
                if head[..6] == [0xff; 6] {
                    v.stats.broadcast += 1;
                } else {
                    v.stats.multicast += 1;
                }
            }
        }
        r
    }

    #[inline(always)]
    fn receive_now(&mut self, hdr: &[u8; 12], parts: &[&[u8]]) -> Result<Took, RxDrop> {
        let mut miss = None;
        if !self.has_parked() {
            match self.q.receive_parts(hdr, parts) {
                Err(RxDrop::Miss { iova }) => miss = Some(iova),
                r => return r.map(|()| Took::Now),
            }
        }
        self.park(hdr, parts, miss)
    }

    #[cold]
    #[inline(never)]
    fn park(&mut self, hdr: &[u8; 12], parts: &[&[u8]], miss: Option<u64>) -> Result<Took, RxDrop> {
        let now = crate::clock::now_ns();
        let h = usize::from(self.shell.hdr_len).min(12);
        let Some(l) = self.shell.iotlb.as_deref_mut() else {
            return Err(RxDrop::Miss { iova: miss.unwrap_or(0) });
        };
        if let Some(iova) = miss {
            l.miss(iova, true, now);
            // The buffers posted after this one are looked at afresh (`lookahead`).
            l.rx_checked = None;
        }
        if l.parked.len() >= PARK_MAX {
            l.stats().rx_miss_drops.fetch_add(1, Ordering::Relaxed);
            return Err(RxDrop::Miss { iova: 0 });
        }
        let mut buf = Vec::with_capacity(h + parts.iter().map(|p| p.len()).sum::<usize>());
        buf.extend_from_slice(&hdr[..h]);
        parts.iter().for_each(|p| buf.extend_from_slice(p));
        l.parked.push_back((buf, now));
        l.stats().rx_parked.fetch_add(1, Ordering::Relaxed);
        Ok(Took::Parked)
    }

    /// Writes parked frames, oldest first, while the guest's buffers translate; drops
    /// (counted) those parked past the miss time-out. The caller publishes.
    pub fn unpark(&mut self, now: u64) -> Unparked {
        let mut u = Unparked::default();
        let h = usize::from(self.shell.hdr_len).min(12);
        // A guest posting bad buffers must not keep the thread here.
        while u.faults < 32 {
            let Some(l) = self.shell.iotlb.as_deref_mut() else { break };
            let Some((frame, since)) = l.parked.pop_front() else { break };
            if now.wrapping_sub(since) > MISS_TIMEOUT_NS {
                l.stats().rx_miss_drops.fetch_add(1, Ordering::Relaxed);
                u.timed_out += 1;
                continue;
            }
            let mut hdr = [0u8; 12];
            let h = h.min(frame.len());
            hdr[..h].copy_from_slice(&frame[..h]);
            match self.q.receive_parts(&hdr, &[&frame[h..]]) {
                Ok(()) => {
                    u.packets += 1;
                    u.bytes += (frame.len() - h) as u64;
                }
                Err(RxDrop::Fault(_)) => u.faults += 1,
                Err(e) => {
                    l.parked.push_front((frame, since));
                    match e {
                        RxDrop::Miss { iova } => l.miss(iova, true, now),
                        RxDrop::Broken(why) => {
                            tracing::warn!("stopping a plugged receive queue: {why}");
                            self.shell.broken = true;
                        }
                        _ => {}
                    }
                    break;
                }
            }
        }
        u
    }

    /// Hands the receive ring back (quiesced: the caller holds its slot).
    pub fn unplug(mut self) -> (VirtQueue, RingHandoff) {
        let irq = self.q.publish();
        let h = self.q.handoff();
        (resume(self.shell, &h, irq), h)
    }
}

impl AccelTx {
    /// Hands the transmit ring back, in-flight frames to `wire` first.
    pub fn unplug(
        mut self,
        wire: &mut dyn FnMut(Vec<u8>) -> Result<(), Wire>,
    ) -> (VirtQueue, RingHandoff, u64) {
        let (drained, irq) = self.q.drain(wire, &mut self.k);
        let h = self.q.handoff();
        (resume(self.shell, &h, irq), h, drained)
    }
}
