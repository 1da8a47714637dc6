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
use shaping::RateLimiter;
use virtq::{RingHandoff, RingState, SplitRing};

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

/// The device's view of a queue's memory: the same guest memory and fault log, a translator of
/// its own (guest-physical: a port behind a vIOMMU is not plugged).
fn device_dma(q: &VirtQueue) -> iommu::Dma {
    iommu::Dma::gpa(q.dma.mem().clone(), q.dma.domain(), q.dma.faults().clone())
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
    shell
}

impl AccelRx {
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
