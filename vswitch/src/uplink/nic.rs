//! A NIC-model uplink (`nic:IFNAME`): a modelled 82576-class NIC between the wire (a TAP
//! device) and the guests.
//!
//! ```text
//!  wire (TAP) ──read──▶ device: classifier ──pool──▶ DMA into the bound guest's own receive
//!                                 │                 ring (through its IOMMU domain): no CPU copy
//!                                 └──default pool──▶ the switch's software path (broadcast,
//!                                                    multicast, unknown, unbound guests)
//! ```
//!
//! At Level 1 the control thread binds guest ports to pools (`switch::nics`) and programs the
//! MACs the switch learned for them; a frame the classifier puts in a guest's pool is written
//! by the model's DMA engine into that guest's receive ring, under the ring's slot lock, so the
//! software path's deliveries to the same guest (broadcast, other guests) interleave with the
//! device's in ring order. At Level 0 every frame goes to the host.
//!
//! The device's work runs on the polling thread (this machine has two CPUs; a device thread
//! would take the other one) and is timed apart (`device_ticks`), so the host's cost per
//! packet can be read without it.

use nic_models::engines::lro::{Lro, LroConfig, Out};
use nic_models::itr::Signal;
use nic_models::{DeviceCounters, Level, Moderator, Nic, Profile, RxScratch, TableSizes, TxScheduler};

use nic_models::engines::{csum, layout, tso};

use crate::offload::{self, Caps};
use crate::port::MAX_PORTS;
use crate::uplink::link::LinkQueue;
use crate::uplink::tap::{Recv, Sent, TapQueue, VNET_HDR};

/// A NIC model's wire: a TAP device (the host's stack; it takes and gives TSO frames whole) or
/// an in-process wire (another model back to back, or a generator), which carries plain frames
/// only, so the device segments and checksums what it sends.
pub enum Wire {
    /// A TAP device.
    Tap(TapQueue),
    /// An in-process wire.
    Link(LinkQueue),
}

impl Wire {
    /// The offloads frames on the wire may ask of the device (`tx_*`) and the wire takes
    /// (`rx_*`), in guest terms.
    #[inline]
    pub fn caps(&self) -> Caps {
        match self {
            Wire::Tap(t) => t.caps,
            Wire::Link(_) => Caps::default(),
        }
    }

    /// Whether the wire has gone away.
    #[inline]
    pub fn broken(&self) -> bool {
        match self {
            Wire::Tap(t) => t.broken(),
            Wire::Link(_) => false,
        }
    }

    /// What a polling thread watches for frames.
    pub fn file(&self) -> &std::sync::Arc<std::fs::File> {
        match self {
            Wire::Tap(t) => t.file(),
            Wire::Link(l) => l.file(),
        }
    }

    /// Before the polling thread sleeps: true if frames already wait (an in-process wire rings
    /// its bell only for an armed receiver; a TAP's file is watched edge-triggered).
    pub fn arm(&self) -> bool {
        match self {
            Wire::Tap(_) => false,
            Wire::Link(l) => l.arm(),
        }
    }

    /// Reads one frame into staging buffer `i`.
    #[inline]
    pub fn recv(&mut self, i: usize) -> Recv {
        match self {
            Wire::Tap(t) => t.recv(i),
            Wire::Link(l) => l.recv(i),
        }
    }
}

/// What a NIC model is built with (from the port's `nic` settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NicParams {
    /// The tier.
    pub level: Level,
    /// Pools and filter tables.
    pub sizes: TableSizes,
    /// Coalesce TCP segments (when the wire carries plain frames).
    pub lro: bool,
    /// Interrupt moderation.
    pub itr: Profile,
    /// Each guest pool's transmit rate, bits/s (None: the wire's).
    pub pool_rate: Option<u64>,
}

/// One queue of a NIC-model uplink as a polling thread uses it (under its slot's lock): the
/// wire, the device's filters and DMA engine, and what the device did.
pub struct NicQueue {
    /// The wire frames arrive from.
    pub wire: Wire,
    /// The device's filters and pool bindings.
    pub nic: Nic,
    /// The DMA engine's scratch.
    pub scratch: RxScratch,
    /// What the device's DMA engine did.
    pub device: DeviceCounters,
    /// Time-stamp-counter ticks spent in the device's work (steering and DMA).
    pub device_ticks: u64,
    /// Frames the device steered that the guest could not take as they were (an offload it
    /// did not negotiate, an IOTLB miss, a shaper or held packets): the software path took them.
    pub fallbacks: u64,
    /// Frames whose checksums the device verified for a guest (virtio `DATA_VALID`).
    pub csum_verified: u64,
    /// The large-receive-offload engine, when the wire carries plain frames.
    pub lro: Option<Lro>,
    /// The engine's output of the burst being processed.
    pub lro_out: Vec<Out>,
    /// This burst's coalesced frames, each behind its virtio-net header (the burst's grants
    /// point into them until the next burst).
    pub lro_bufs: Vec<Vec<u8>>,
    /// Buffers for `lro_bufs`, reused.
    pub lro_pool: Vec<Vec<u8>>,
    /// Interrupt moderation, one vector per pool.
    pub itr: Profile,
    mods: Vec<Moderator>,
    /// Pools whose interrupt is held back.
    pub irq_held: u64,
}

impl NicQueue {
    /// A queue over `wire` with a model built as `p` says.
    pub fn new(wire: Wire, p: NicParams) -> Result<Self, nic_models::TableError> {
        let (level, sizes) = (p.level, p.sizes);
        // With offloads on, the kernel hands over frames it has coalesced already.
        let lro = (p.lro && !wire.caps().any_tx()).then(|| {
            Lro::new(LroConfig {
                partial: true,
                max_segs: crate::limits::BURST as u16,
                // The switch refuses smaller GSO segments (F12), as Linux does.
                min_mss: crate::offload::MIN_GSO_SIZE,
                ..LroConfig::default()
            })
        });
        Ok(NicQueue {
            wire,
            nic: Nic::new(level, sizes)?,
            scratch: RxScratch::default(),
            device: DeviceCounters::default(),
            device_ticks: 0,
            fallbacks: 0,
            csum_verified: 0,
            lro,
            lro_out: Vec::new(),
            lro_bufs: Vec::new(),
            lro_pool: Vec::new(),
            itr: p.itr,
            mods: Vec::new(),
            irq_held: 0,
        })
    }

    /// `packets` frames of `bytes` were written into pool `pool`'s ring at `now`: whether to
    /// interrupt its guest now (else it is held, `irq_held`).
    pub fn moderate(&mut self, pool: u8, now: u64, packets: u64, bytes: u64) -> bool {
        let m = self.moderator(pool);
        match m.complete(now, packets, bytes) {
            Signal::Now => {
                self.irq_held &= !(1u64 << pool);
                true
            }
            Signal::At(_) => {
                self.irq_held |= 1u64 << pool;
                false
            }
        }
    }

    /// Whether pool `pool`'s held interrupt is due at `now` (`idle`: the device has nothing
    /// more to do, so nothing is gained by holding it).
    pub fn due(&mut self, pool: u8, now: u64, idle: bool) -> bool {
        if self.irq_held & (1u64 << pool) == 0 {
            return false;
        }
        let m = self.moderator(pool);
        let fire = if idle { m.flush(now) } else { m.poll(now) == Some(Signal::Now) };
        if fire {
            self.irq_held &= !(1u64 << pool);
        }
        fire
    }

    fn moderator(&mut self, pool: u8) -> &mut Moderator {
        let p = pool as usize;
        while self.mods.len() <= p {
            self.mods.push(Moderator::new(self.itr));
        }
        &mut self.mods[p]
    }

    /// Interrupts raised and held back over all pools.
    pub fn irq_counts(&self) -> (u64, u64) {
        self.mods.iter().fold((0, 0), |(r, s), m| (r + m.raised, s + m.suppressed))
    }
}

/// The transmit side of a NIC-model uplink (under its slot's lock): the device's per-pool TX
/// queues in its packet buffer, scheduled onto the wire by DRR, each guest pool shaped.
pub struct NicTxQueue {
    /// The wire frames leave on.
    pub wire: Wire,
    /// The TX queues and their scheduler.
    pub sched: TxScheduler,
    /// The pool each switch port sends from (0: the host's, for ports without a pool).
    pools: Box<[u8]>,
    free: Vec<Vec<u8>>,
    /// What the device's DMA read for transmit.
    pub device: DeviceCounters,
    /// Polling-thread ticks spent as the device (descriptor fetches, DMA reads, queueing).
    pub device_ticks: u64,
    /// Frames the wire refused.
    pub refused: u64,
    /// A guest pool's rate unless its guest has its own.
    pool_rate: Option<u64>,
    /// Each pool's rate and weight in force.
    applied: Vec<(Option<u64>, u32)>,
    /// Engines' work for a wire of plain frames: TSO frames cut, the segments they made,
    /// partial checksums completed.
    pub tso_frames: u64,
    /// See `tso_frames`.
    pub tso_segments: u64,
    /// See `tso_frames`.
    pub csum_inserted: u64,
    seg: Vec<u8>,
}

/// A pool's token bucket at `bps`: 10 ms at the rate, and never less than one TSO frame.
fn bucket(bps: u64) -> (u64, u64) {
    (bps, (bps / 800).max(65_600))
}

/// Why a frame did not go onto the wire.
enum Put {
    /// Not now: put it back at the head of its queue.
    Later(Vec<u8>),
    /// Lost (the wire refused it or went away).
    Refused,
    Gone,
}

impl NicTxQueue {
    /// A transmit side over `wire` with `p`'s pools and rates.
    pub fn new(wire: Wire, p: NicParams, now: u64) -> Result<Self, nic_models::TxError> {
        let pools = if p.level == Level::L0 { 1 } else { p.sizes.pools as usize };
        // A pool's share of the packet buffer: 256 KiB, room for four 64 KiB TSO frames.
        let mut sched = TxScheduler::new(&vec![1; pools], 65_600, 256 << 10)?;
        for pool in 1..pools {
            sched.set_rate(pool, p.pool_rate.map(bucket), now)?;
        }
        Ok(NicTxQueue {
            pool_rate: p.pool_rate,
            applied: vec![(p.pool_rate, 1); pools],
            wire,
            sched,
            pools: vec![0; MAX_PORTS].into_boxed_slice(),
            free: Vec::new(),
            device: DeviceCounters::default(),
            device_ticks: 0,
            refused: 0,
            tso_frames: 0,
            tso_segments: 0,
            csum_inserted: 0,
            seg: Vec::new(),
        })
    }

    /// The pool switch port `port` sends from.
    #[inline]
    pub fn pool_of(&self, port: u16) -> usize {
        self.pools.get(port as usize).copied().unwrap_or(0) as usize
    }

    /// Sets which port sends from which pool (every other port: the host's), and each guest
    /// pool's rate and DRR weight: `tx(owner)` gives the guest's own (rate, weight), a rate of
    /// None meaning the NIC's `pool_rate`. A pool whose settings did not change keeps its
    /// bucket.
    pub fn set_pools(
        &mut self,
        bindings: &[(u8, u16, Vec<[u8; 6]>)],
        tx: impl Fn(u16) -> (Option<u64>, u32),
        now: u64,
    ) {
        let n = self.pools.len();
        let old = std::mem::replace(&mut self.pools, vec![0; n].into_boxed_slice());
        let mut want = vec![(self.pool_rate, 1); self.applied.len()];
        for (pool, owner, _) in bindings {
            if let Some(p) = self.pools.get_mut(*owner as usize) {
                *p = *pool;
            }
            let (rate, weight) = tx(*owner);
            if let Some(w) = want.get_mut(*pool as usize) {
                *w = (rate.or(self.pool_rate), weight.max(1));
            }
        }
        // A port that leaves its pool (unbound, or bound elsewhere) takes what it queued there
        // along, behind what its new queue holds, so its new frames do not overtake them.
        for (&was, &now) in old.iter().zip(self.pools.iter()) {
            if was != 0 && was != now {
                self.sched.move_queued(was as usize, now as usize);
            }
        }
        for (pool, w) in want.into_iter().enumerate().skip(1) {
            if self.applied[pool] == w {
                continue;
            }
            // Both are valid (a rate from a parsed BitRate, a weight of at least 1).
            let _ = self.sched.set_rate(pool, w.0.map(bucket), now);
            let _ = self.sched.set_weight(pool, w.1);
            self.applied[pool] = w;
        }
    }

    /// Pool `pool`'s transmit rate (bits/s; None: the wire's) and DRR weight.
    pub fn pool_tx(&self, pool: usize) -> (Option<u64>, u32) {
        self.applied.get(pool).copied().unwrap_or((None, 1))
    }

    /// An empty packet buffer.
    pub fn buffer(&mut self) -> Vec<u8> {
        let mut b = self.free.pop().unwrap_or_default();
        b.clear();
        b
    }

    /// Takes back a packet buffer.
    pub fn recycle(&mut self, b: Vec<u8>) {
        if self.free.len() < 256 {
            self.free.push(b);
        }
    }

    /// Puts on the wire what the scheduler lets go at `now`; (frames sent, their bytes without
    /// the header, frames lost to a wire that went away).
    pub fn service(&mut self, now: u64) -> (u64, u64, u64) {
        let (mut sent, mut bytes, mut gone) = (0, 0, 0);
        while let Some((pool, f)) = self.sched.next(now) {
            let len = f.len().saturating_sub(VNET_HDR as usize) as u64;
            match self.put(f) {
                Ok(()) => {
                    sent += 1;
                    bytes += len;
                }
                Err(Put::Later(f)) => {
                    self.sched.requeue(pool, f);
                    break;
                }
                // Nothing at the far end (a deleted TAP, an unplugged wire): dropped, counted.
                Err(Put::Gone) => gone += 1,
                Err(Put::Refused) => self.refused += 1,
            }
        }
        (sent, bytes, gone)
    }

    /// One frame (header first) onto the wire.
    fn put(&mut self, mut f: Vec<u8>) -> Result<(), Put> {
        let l = match &mut self.wire {
            Wire::Tap(t) => {
                let iov = [libc::iovec { iov_base: f.as_ptr() as *mut _, iov_len: f.len() }];
                let r = match t.send(&iov) {
                    Sent::Ok => Ok(()),
                    Sent::Full => return Err(Put::Later(f)),
                    Sent::Gone => Err(Put::Gone),
                    Sent::Refused => Err(Put::Refused),
                };
                self.recycle(f);
                return r;
            }
            Wire::Link(l) => l,
        };
        let h = VNET_HDR as usize;
        let (flags, gso) = (f[0], f[1] & 0x7f);
        if gso != offload::GSO_NONE {
            // The device's TSO engine: the wire carries frames of at most MSS payload.
            let mss = u16::from_le_bytes([f[4], f[5]]);
            let Some(lay) =
                layout(&f[h..]).filter(|_| matches!(gso, offload::GSO_TCPV4 | offload::GSO_TCPV6))
            else {
                self.recycle(f);
                return Err(Put::Refused);
            };
            if mss == 0 {
                self.recycle(f);
                return Err(Put::Refused);
            }
            let payload = nic_models::engines::ip_end(&f[h..], &lay).saturating_sub(lay.payload);
            if l.room() < payload.div_ceil(mss as usize).max(1) {
                return Err(Put::Later(f));
            }
            let mut lost = false;
            let r = tso::segment(&f[h..], mss, &mut self.seg, |s| {
                let mut b = l.buffer();
                b.resize(h, 0);
                b.extend_from_slice(s);
                lost |= l.send_owned(b).is_err();
            });
            self.recycle(f);
            return match r {
                Ok(n) if !lost => {
                    self.tso_frames += 1;
                    self.tso_segments += n as u64;
                    Ok(())
                }
                _ => Err(Put::Refused),
            };
        }
        if flags & offload::F_NEEDS_CSUM != 0 {
            // The checksum insertion engine completes what the sender left partial.
            let start = u16::from_le_bytes([f[6], f[7]]) as usize;
            let off = u16::from_le_bytes([f[8], f[9]]) as usize;
            let end = f.len() - h;
            if !csum::complete_partial(&mut f[h..], start, off, end) {
                self.recycle(f);
                return Err(Put::Refused);
            }
            self.csum_inserted += 1;
        }
        f[..h].fill(0);
        match l.send_owned(f) {
            Ok(()) => Ok(()),
            Err((Sent::Full, f)) => Err(Put::Later(f)),
            Err((s, f)) => {
                self.recycle(f);
                Err(if s == Sent::Gone { Put::Gone } else { Put::Refused })
            }
        }
    }
}
