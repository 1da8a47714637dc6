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
use nic_models::{DeviceCounters, Level, Moderator, Nic, Profile, RxScratch, TableSizes};

use crate::uplink::tap::TapQueue;

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
}

/// One queue of a NIC-model uplink as a polling thread uses it (under its slot's lock): the
/// wire, the device's filters and DMA engine, and what the device did.
pub struct NicQueue {
    /// The wire: frames arrive from (and leave to) the TAP device.
    pub wire: TapQueue,
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
    pub fn new(wire: TapQueue, p: NicParams) -> Result<Self, nic_models::TableError> {
        let (level, sizes) = (p.level, p.sizes);
        // With offloads on, the kernel hands over frames it has coalesced already.
        let lro = (p.lro && !wire.caps.any_tx()).then(|| {
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
