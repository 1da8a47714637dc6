//! Level 2: a direct queue pair. The device drives a guest's own virtio transmit and receive
//! rings, as a vDPA NIC does: it fetches what the guest posts for transmit and writes what
//! arrives for it into the buffers it posted, translating every address through the port's
//! IOMMU domain ([`iommu::Dma`]: the memory table, or the vIOMMU's IOTLB). The host's CPU
//! neither reads the guest's descriptors nor copies its frames.
//!
//! What the switch's software path did for the guest's transmit side, the device now does:
//! - **source enforcement**: every frame is checked by a [`SourceCheck`], which is the switch's
//!   own anti-spoofing filter (one policy definition, two enforcers); a refused frame's buffer
//!   is completed and the frame never reaches the wire;
//! - **shaping**: a [`RateLimiter`] from `shaping`; when it has no room the device leaves the
//!   guest's next chain in its ring (back-pressure, nothing dropped) until it has.
//!
//! A fetched frame sits in the device's transmit FIFO (in flight) until the wire takes it; its
//! descriptor is completed then, in fetch order, so the used ring follows the available ring
//! (VIRTIO_F_IN_ORDER holds). The accelerator contract's **quiesce** stops fetching and
//! receiving, **drain** sends the FIFO and publishes every used entry, and **hand back** gives
//! each ring's [`RingHandoff`] to the next owner: every descriptor taken is completed exactly
//! once, so nothing is lost or repeated across the hand-over.
//!
//! Hostile chains (outside the guest, wrong direction, loops) are DMA faults: counted, the
//! buffer completed with length 0, nothing read outside the guest's domain.

use std::collections::VecDeque;

use iommu::{Dma, Grant, Ro};
use shaping::RateLimiter;
use virtq::chain::{walk_chain, ChainError, MAX_SEGS};
use virtq::ring::{RingError, SplitRing};
use virtq::{RingHandoff, RingState};

use crate::account::{DeviceCounters, PcieCost};
use crate::rxq::{RxDrop, RxQueue};

/// Largest chain a guest may post for transmit: a 12-byte virtio-net header and a 64 KiB TSO
/// frame with one VLAN tag.
pub const MAX_TX: u32 = 12 + 18 + 65_535;
/// Frames the transmit FIFO holds (fetched, not yet on the wire).
pub const TX_FIFO: usize = 64;

/// The policy the device enforces on the source of what a guest sends.
pub trait SourceCheck {
    /// Whether `frame` (Ethernet header first) may leave; why not, in a word, if it may not.
    fn check(&self, frame: &[u8]) -> Result<(), &'static str>;
}

/// No enforcement: every frame passes.
pub struct AnySource;

impl SourceCheck for AnySource {
    fn check(&self, _: &[u8]) -> Result<(), &'static str> {
        Ok(())
    }
}

impl<F: Fn(&[u8]) -> Result<(), &'static str>> SourceCheck for F {
    fn check(&self, frame: &[u8]) -> Result<(), &'static str> {
        self(frame)
    }
}

/// What a direct queue pair did beyond the bus work [`DeviceCounters`] count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectCounters {
    /// Frames the wire took from the guest.
    pub tx_frames: u64,
    /// Their bytes (header excluded).
    pub tx_bytes: u64,
    /// Frames the source check refused (completed, never sent).
    pub spoofed: u64,
    /// Chains refused as malformed or outside the domain (completed with length 0).
    pub tx_faults: u64,
    /// Times the rate limiter left the guest's next chain in its ring.
    pub shaped: u64,
    /// Frames the wire refused (full or gone): completed, dropped.
    pub wire_refused: u64,
    /// Frames written into the guest's receive buffers.
    pub rx_frames: u64,
    /// Frames that found no buffer (or none big enough).
    pub rx_no_buffer: u64,
    /// Frames refused because the pair was quiesced (the caller gives them to the next owner).
    pub rx_quiesced: u64,
}

/// Why [`DirectTx::fetch`] stopped before `max`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fetched {
    /// Chains taken (sent, refused or faulted alike).
    pub chains: usize,
    /// An IOVA the domain has no translation for yet: the chain is back in the ring; ask the
    /// frontend for it.
    pub miss: Option<u64>,
}

/// The transmit half: the guest's TX ring and the device's FIFO.
pub struct DirectTx {
    ring: SplitRing,
    handoff: RingHandoff,
    dma: Dma,
    hdr_len: u32,
    indirect: bool,
    segs: [Grant<Ro>; MAX_SEGS],
    /// Fetched chains in order: the head and the frame (header first), or None for one to
    /// complete without sending (refused or faulted).
    fifo: VecDeque<(u16, Option<Vec<u8>>)>,
    free: Vec<Vec<u8>>,
    cost: PcieCost,
    /// Bus work.
    pub counters: DeviceCounters,
}

// SAFETY: `segs` holds grants only during one `fetch`, which also holds `dma` (which keeps
// their memory mapped); between calls they are dead values. The ring is `Send` itself.
unsafe impl Send for DirectTx {}

impl DirectTx {
    /// Takes over a transmit ring at `h` (the contract's plug), translating through `dma`.
    pub fn new(mut dma: Dma, h: RingHandoff, hdr_len: u32, indirect: bool) -> Result<Self, RingError> {
        let ring = SplitRing::new(&mut dma, h.addrs, u32::from(h.size), h.state.last_avail, h.event_idx)?;
        Ok(DirectTx {
            ring,
            handoff: h,
            dma,
            hdr_len,
            indirect,
            segs: [Grant::default(); MAX_SEGS],
            fifo: VecDeque::with_capacity(TX_FIFO),
            free: Vec::new(),
            cost: PcieCost::default(),
            counters: DeviceCounters::default(),
        })
    }

    /// Turns the guest's kicks (doorbells) on before the device's poller sleeps, or off while
    /// it polls; true if chains are already waiting.
    pub fn set_kicks(&mut self, on: bool) -> bool {
        self.ring.set_kicks(on)
    }

    /// Chains fetched and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.fifo.len()
    }

    /// The IOMMU domain (to add IOTLB entries after a miss).
    pub fn dma_mut(&mut self) -> &mut Dma {
        &mut self.dma
    }

    /// Fetches up to `max` chains the guest posted into the FIFO: each DMA-read into a device
    /// buffer, its source checked, its bytes charged to `rate` (at `now_ns`). Stops early when
    /// the FIFO is full, the ring is empty, the rate has no room (the chain stays posted) or a
    /// translation is missing.
    fn fetch(
        &mut self,
        max: usize,
        check: &dyn SourceCheck,
        mut rate: Option<&mut RateLimiter>,
        now_ns: u64,
        k: &mut DirectCounters,
    ) -> Result<Fetched, RingError> {
        let mut out = Fetched::default();
        if let Some(r) = rate.as_deref_mut() {
            r.advance(now_ns);
        }
        while out.chains < max && self.fifo.len() < TX_FIFO {
            if self.ring.avail_pending()? == 0 {
                break;
            }
            let head = self.ring.pop_head();
            let c = &mut self.counters;
            c.desc_fetches += 1;
            c.dma_read_bytes += 2;
            c.tlps += self.cost.read_tlps(2);
            let ch = match walk_chain::<Ro>(
                &self.ring,
                &mut self.dma,
                head,
                self.indirect,
                MAX_TX,
                &mut self.segs,
            ) {
                Ok(ch) => ch,
                Err(ChainError::Miss { iova }) => {
                    c.iotlb_lookups += 1;
                    c.iotlb_misses += 1;
                    self.ring.unpop(1);
                    out.miss = Some(iova);
                    break;
                }
                Err(_) => {
                    c.iotlb_lookups += 1;
                    c.dma_faults += 1;
                    k.tx_faults += 1;
                    self.fifo.push_back((head, None));
                    out.chains += 1;
                    continue;
                }
            };
            c.desc_fetches += u64::from(ch.nseg);
            c.dma_read_bytes += 16 * u64::from(ch.nseg);
            c.tlps += self.cost.read_tlps(16 * u32::from(ch.nseg));
            c.iotlb_lookups += u64::from(ch.nseg);
            if ch.len < self.hdr_len + 14 {
                k.tx_faults += 1;
                self.fifo.push_back((head, None));
                out.chains += 1;
                continue;
            }
            if let Some(r) = rate.as_deref_mut() {
                if !r.try_consume(ch.len - self.hdr_len) {
                    self.ring.unpop(1);
                    k.shaped += 1;
                    break;
                }
            }
            // The DMA read into the device's packet buffer.
            let mut buf = self.free.pop().unwrap_or_default();
            buf.clear();
            for g in &self.segs[..ch.nseg as usize] {
                // SAFETY: the grant was translated and bounds-checked by `walk_chain` in this
                // domain, whose memory `self.dma` keeps mapped.
                buf.extend_from_slice(unsafe { std::slice::from_raw_parts(g.as_ptr(), g.len() as usize) });
                c.tlps += self.cost.read_tlps(g.len());
            }
            c.dma_read_bytes += u64::from(ch.len);
            c.packets += 1;
            c.bytes += u64::from(ch.len);
            out.chains += 1;
            match check.check(&buf[self.hdr_len as usize..]) {
                Ok(()) => self.fifo.push_back((head, Some(buf))),
                Err(_) => {
                    k.spoofed += 1;
                    self.free.push(buf);
                    self.fifo.push_back((head, None));
                }
            }
        }
        Ok(out)
    }

    /// Gives the FIFO's frames to `wire` in order (up to `max`), completing each chain as its
    /// frame leaves (refused and faulted ones complete with it). `wire` returns the frame if
    /// it has no room now (it stays first in the FIFO), or None once taken or lost. Returns
    /// chains completed.
    fn transmit(
        &mut self,
        max: usize,
        wire: &mut dyn FnMut(Vec<u8>) -> Result<(), Wire>,
        k: &mut DirectCounters,
    ) -> usize {
        let mut n = 0;
        while n < max {
            let Some((head, frame)) = self.fifo.pop_front() else { break };
            if let Some(f) = frame {
                let len = (f.len() as u64).saturating_sub(u64::from(self.hdr_len));
                match wire(f) {
                    Ok(()) => {
                        k.tx_frames += 1;
                        k.tx_bytes += len;
                    }
                    Err(Wire::Full(f)) => {
                        self.fifo.push_front((head, Some(f)));
                        break;
                    }
                    Err(Wire::Lost) => k.wire_refused += 1,
                }
            }
            self.ring.push_used(head, 0);
            self.counters.desc_writebacks += 1;
            self.counters.dma_write_bytes += 8;
            self.counters.tlps += 1;
            n += 1;
        }
        n
    }

    /// Gives up on the chain at the head of the ring (its translation never came): it is
    /// completed, unsent, as a fault, behind what the FIFO holds. False if none is posted.
    pub fn fault_next(&mut self, k: &mut DirectCounters) -> Result<bool, RingError> {
        if self.ring.avail_pending()? == 0 {
            return Ok(false);
        }
        let head = self.ring.pop_head();
        self.counters.dma_faults += 1;
        k.tx_faults += 1;
        self.fifo.push_back((head, None));
        Ok(true)
    }

    /// Where the device takes the next chain from (the ring's last available index).
    pub fn next_avail(&self) -> u16 {
        self.ring.state().last_avail
    }

    /// One poll of the device's transmit work: fetch up to `max` chains, give the FIFO to
    /// `wire`, publish. Returns (chains fetched, chains completed, the guest asked to be
    /// interrupted, an IOVA to ask the frontend for).
    #[allow(clippy::too_many_arguments)]
    pub fn poll(
        &mut self,
        max: usize,
        check: &dyn SourceCheck,
        rate: Option<&mut RateLimiter>,
        now_ns: u64,
        wire: &mut dyn FnMut(Vec<u8>) -> Result<(), Wire>,
        k: &mut DirectCounters,
    ) -> Result<(usize, usize, bool, Option<u64>), RingError> {
        let f = self.fetch(max, check, rate, now_ns, k)?;
        let done = self.transmit(usize::MAX, wire, k);
        let irq = done > 0 && {
            self.ring.publish_used();
            self.ring.needs_interrupt()
        };
        Ok((f.chains, done, irq, f.miss))
    }

    /// The contract's drain for this ring: every in-flight frame to `wire` (one it cannot
    /// take now is dropped and counted: a hand-over does not wait on the wire), every used
    /// entry published. Returns (chains completed, the guest is owed an interrupt).
    pub fn drain(
        &mut self,
        wire: &mut dyn FnMut(Vec<u8>) -> Result<(), Wire>,
        k: &mut DirectCounters,
    ) -> (u64, bool) {
        let mut lossy = |f: Vec<u8>| match wire(f) {
            Ok(()) => Ok(()),
            Err(_) => Err(Wire::Lost),
        };
        let n = self.transmit(usize::MAX, &mut lossy, k);
        self.ring.publish_used();
        (n as u64, n > 0 && self.ring.needs_interrupt())
    }

    /// The ring as it would be handed on now (after [`drain`](Self::drain)).
    pub fn handoff(&self) -> RingHandoff {
        RingHandoff { state: self.ring.state(), ..self.handoff }
    }

    /// A buffer the wire is done with, for the next fetch.
    pub fn recycle(&mut self, b: Vec<u8>) {
        if self.free.len() < TX_FIFO {
            self.free.push(b);
        }
    }
}

/// What the wire says to a frame it did not take.
#[derive(Debug)]
pub enum Wire {
    /// No room now: the frame comes back and stays first in the FIFO.
    Full(Vec<u8>),
    /// Gone for good (no far end, refused): dropped and counted, its chain completed.
    Lost,
}

/// Where a pair is in the accelerator contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Plugged: the device owns both rings and moves packets.
    Running,
    /// Quiesced: nothing new is fetched or received; drain, then hand back.
    Quiesced,
}

/// How a queue pair is handed to the device: its two rings and what the guest negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairSetup {
    /// The receive ring (the device fills it).
    pub rx: RingHandoff,
    /// The transmit ring (the device drains it).
    pub tx: RingHandoff,
    /// The virtio-net header length (10, or 12 with VERSION_1 or mergeable buffers).
    pub hdr_len: u32,
    /// MRG_RXBUF.
    pub mergeable: bool,
    /// INDIRECT_DESC.
    pub indirect: bool,
}

/// What a drain carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// In-flight transmits completed by the drain (sent, or dropped if the wire refused).
    pub tx_completed: u64,
    /// The guest is owed an interrupt for its transmit ring (the giver signals it before the
    /// hand-over: the next owner counts what was published as signalled).
    pub tx_irq: bool,
    /// The same for its receive ring.
    pub rx_irq: bool,
}

/// A Level 2 direct queue pair: the device owns a guest's receive and transmit rings.
pub struct DirectPair {
    /// The receive half (the device's DMA into the guest's posted buffers).
    pub rx: RxQueue,
    /// The transmit half.
    pub tx: DirectTx,
    phase: Phase,
    start: (RingState, RingState),
    /// What it did.
    pub counters: DirectCounters,
}

impl DirectPair {
    /// Plugs: takes over both rings at the states in `s`, translating through `rx_dma` and
    /// `tx_dma` (the port's IOMMU domain, one view per ring).
    pub fn plug(rx_dma: Dma, tx_dma: Dma, s: &PairSetup) -> Result<Self, RingError> {
        let rx = RxQueue::new(
            rx_dma,
            s.rx.addrs,
            u32::from(s.rx.size),
            s.rx.state,
            s.rx.event_idx,
            s.hdr_len,
            s.mergeable,
        )?;
        let tx = DirectTx::new(tx_dma, s.tx, s.hdr_len, s.indirect)?;
        let start = (rx.state(), tx.handoff().state);
        Ok(DirectPair { rx, tx, phase: Phase::Running, start, counters: DirectCounters::default() })
    }

    /// Where the pair is in the contract.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The device's transmit work for one poll: fetch up to `max` chains (source checked,
    /// rate charged), then give what the FIFO holds to `wire`, completing each chain, and
    /// publish the used entries. Returns (chains fetched, chains completed, the guest asked
    /// to be interrupted, an IOVA to ask the frontend for).
    pub fn poll_tx(
        &mut self,
        max: usize,
        check: &dyn SourceCheck,
        rate: Option<&mut RateLimiter>,
        now_ns: u64,
        wire: &mut dyn FnMut(Vec<u8>) -> Result<(), Wire>,
    ) -> Result<(usize, usize, bool, Option<u64>), RingError> {
        if self.phase != Phase::Running {
            return Ok((0, 0, false, None));
        }
        self.tx.poll(max, check, rate, now_ns, wire, &mut self.counters)
    }

    /// DMAs one frame (with its virtio-net header) into the guest's next receive buffer(s).
    /// Refused once quiesced: the caller gives the frame to the ring's next owner.
    pub fn receive(&mut self, hdr: &[u8], frame: &[&[u8]]) -> Result<(), RxDrop> {
        if self.phase != Phase::Running {
            self.counters.rx_quiesced += 1;
            return Err(RxDrop::Quiesced);
        }
        let r = self.rx.receive_parts(hdr, frame);
        match r {
            Ok(()) => self.counters.rx_frames += 1,
            Err(RxDrop::NoBuffer | RxDrop::TooSmall) => self.counters.rx_no_buffer += 1,
            Err(_) => {}
        }
        r
    }

    /// Publishes the receive ring's used entries; whether the guest asked for an interrupt.
    pub fn publish_rx(&mut self) -> bool {
        self.rx.publish()
    }

    /// The contract's quiesce: from here nothing new is fetched or received.
    pub fn quiesce(&mut self) {
        self.phase = Phase::Quiesced;
    }

    /// The contract's drain (after [`quiesce`](Self::quiesce)): sends every in-flight frame
    /// (one the wire cannot take now is dropped and counted: the hand-over does not wait on
    /// the wire) and publishes both rings' used entries.
    pub fn drain(&mut self, wire: &mut dyn FnMut(Vec<u8>) -> Result<(), Wire>) -> Drained {
        debug_assert_eq!(self.phase, Phase::Quiesced, "drain before quiesce");
        let (tx_completed, tx_irq) = self.tx.drain(wire, &mut self.counters);
        let rx_irq = self.rx.publish();
        Drained { tx_completed, tx_irq, rx_irq }
    }

    /// The contract's hand back (after [`drain`](Self::drain)): each ring's handoff, at the
    /// state the next owner resumes from, and the ledger of what the device took and
    /// completed while it owned them. The pair itself is returned if it is not drained.
    pub fn hand_back(self) -> Result<(RingHandoff, RingHandoff, Ledger), Box<DirectPair>> {
        if self.phase != Phase::Quiesced || self.tx.in_flight() > 0 {
            return Err(Box::new(self));
        }
        let (rx, tx) = (self.rx.handoff(), self.tx.handoff());
        Ok((rx, tx, Ledger::between(self.start, (rx.state, tx.state))))
    }
}

/// What an owner took from and gave back to a pair's rings, from the ring states at plug and at
/// hand back: every descriptor taken from an available ring must appear once in a used ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    /// Receive chains taken from the available ring.
    pub rx_taken: u16,
    /// Receive used entries written.
    pub rx_completed: u16,
    /// Transmit chains taken.
    pub tx_taken: u16,
    /// Transmit used entries written.
    pub tx_completed: u16,
}

impl Ledger {
    /// The ledger between two (rx, tx) ring states.
    pub fn between(from: (RingState, RingState), to: (RingState, RingState)) -> Ledger {
        Ledger {
            rx_taken: to.0.last_avail.wrapping_sub(from.0.last_avail),
            rx_completed: to.0.used_idx.wrapping_sub(from.0.used_idx),
            tx_taken: to.1.last_avail.wrapping_sub(from.1.last_avail),
            tx_completed: to.1.used_idx.wrapping_sub(from.1.used_idx),
        }
    }

    /// Whether every descriptor taken was completed exactly once.
    pub fn balanced(&self) -> bool {
        self.rx_taken == self.rx_completed && self.tx_taken == self.tx_completed
    }
}
