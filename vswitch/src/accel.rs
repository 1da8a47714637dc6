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
                Box::new(AccelRx { q, shell: rx, nic, start: rh.state }),
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
            shell.ring = ring;
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
