//! The virtio-mmio (version 2) transport of a NIC: the register file the guest's driver
//! programs. Queue notifications never arrive here (they are KVM ioeventfds straight to the
//! switch); status changes drive the [`Link`].

use std::sync::Arc;

use crate::net::{Activation, Link, QueueAddrs, QUEUES, QUEUE_MAX};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const DEVICE_NET: u32 = 1;
const VENDOR: u32 = 0x554d_4551; // "QEMU", as most VMMs report

/// Register offsets.
pub mod reg {
    #![allow(missing_docs)]
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FAILED: u32 = 0x80;
/// "Used buffer" interrupt cause.
const INT_VRING: u32 = 1;

/// Why the device refuses the driver's DRIVER_OK.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    /// FEATURES_OK was not accepted first
    #[error("FEATURES_OK was not accepted first")]
    NoFeaturesOk,
    /// queue {0} is not ready
    #[error("queue {0} is not ready")]
    NotReady(usize),
    /// queue {queue} size {size} is not a power of two up to QUEUE_MAX
    #[error("queue {queue} size {size} is not a power of two up to {QUEUE_MAX}")]
    BadSize { queue: usize, size: u16 },
    /// queue {0} rings are misaligned
    #[error("queue {0} rings are misaligned")]
    Misaligned(usize),
}

#[derive(Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
struct Queue {
    addrs: QueueAddrs,
    ready: bool,
}

/// A NIC's register state as a migration carries it (the rings themselves are guest memory).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct NicState {
    mac: [u8; 6],
    device_features: u64,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    queues: [Queue; QUEUES],
    status: u32,
}

/// A virtio-net device on the virtio-mmio transport, its datapath on a [`Link`].
pub struct VirtioMmioNet {
    link: Arc<Link>,
    /// Every register the driver sees (what a migration carries).
    st: NicState,
}

impl VirtioMmioNet {
    /// A fresh device (status 0) for `link`, with `mac` in its config space.
    pub fn new(link: Arc<Link>, mac: [u8; 6]) -> VirtioMmioNet {
        let device_features = link.device_features();
        let st = NicState {
            mac,
            device_features,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            queues: [Queue::default(); QUEUES],
            status: 0,
        };
        VirtioMmioNet { link, st }
    }

    /// The NIC's MAC.
    pub fn mac(&self) -> [u8; 6] {
        self.st.mac
    }

    /// Whether the driver set DRIVER_OK (and the device did not fail).
    pub fn live(&self) -> bool {
        self.st.status & STATUS_DRIVER_OK != 0 && self.st.status & STATUS_FAILED == 0
    }

    /// The register state, for a migration.
    pub fn snapshot(&self) -> NicState {
        self.st.clone()
    }

    /// Takes over a migrated NIC's registers; if its driver had it running, the switch gets
    /// the rings back where the source left them ([`Link::resume`]). The MAC and the features
    /// the switch offers here must be the source's: a guest driver cannot renegotiate.
    pub fn restore(&mut self, st: &NicState) -> Result<(), String> {
        if st.mac != self.st.mac {
            return Err(format!(
                "the migrated NIC has MAC {} but this one has {}: give the destination the same --net mac=",
                crate::net::Mac(st.mac),
                crate::net::Mac(self.st.mac)
            ));
        }
        let gone = st.driver_features & !self.st.device_features;
        if gone != 0 {
            return Err(format!(
                "the guest's driver uses features {gone:#x} this port's switch does not offer: connect \
                 the destination to a switch offering what the source's did"
            ));
        }
        // The MAC is the same (checked) and the features offered stay this switch's.
        self.st = NicState { device_features: self.st.device_features, ..st.clone() };
        if self.live() {
            let act =
                self.activation().map_err(|e| format!("the migrated NIC's state is inconsistent: {e}"))?;
            self.link.resume(act).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.st.queues.get_mut(self.st.queue_sel as usize)
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            let mut config = [0u8; 8];
            config[..6].copy_from_slice(&self.st.mac);
            config[6..8].copy_from_slice(&1u16.to_le_bytes()); // status: link up
            let start = (offset - reg::CONFIG) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 {
            tracing::debug!("virtio-mmio: {}-byte read at {offset:#x} ignored", data.len());
            data.fill(0);
            return;
        }
        let v = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => DEVICE_NET,
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.st.device_features_sel {
                0 => self.st.device_features as u32,
                1 => (self.st.device_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX if (self.st.queue_sel as usize) < QUEUES => u32::from(QUEUE_MAX),
            reg::QUEUE_READY => self.queue().map_or(0, |q| u32::from(q.ready)),
            // The switch signals used buffers straight into the irqfd, so hostvm cannot
            // know the cause: always "used buffers" (the driver then scans its queues).
            reg::INTERRUPT_STATUS if self.live() => INT_VRING,
            reg::STATUS => self.st.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 4 {
            tracing::debug!("virtio-mmio: {}-byte write at {offset:#x} ignored", data.len());
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(v) << 32);
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(v);
        let configurable = !self.live();
        match offset {
            reg::DEVICE_FEATURES_SEL => self.st.device_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.st.status & STATUS_FEATURES_OK == 0 {
                    match self.st.driver_features_sel {
                        0 => self.st.driver_features = lo(self.st.driver_features),
                        1 => self.st.driver_features = hi(self.st.driver_features),
                        _ => {}
                    }
                }
            }
            reg::DRIVER_FEATURES_SEL => self.st.driver_features_sel = v,
            reg::QUEUE_SEL => self.st.queue_sel = v,
            reg::QUEUE_NUM if configurable => {
                if let Some(q) = self.queue() {
                    q.addrs.size = v.min(u32::from(u16::MAX)) as u16;
                }
            }
            reg::QUEUE_READY if configurable => {
                if let Some(q) = self.queue() {
                    q.ready = v == 1;
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH if configurable => {
                if let Some(q) = self.queue() {
                    q.addrs.desc =
                        if offset == reg::QUEUE_DESC_LOW { lo(q.addrs.desc) } else { hi(q.addrs.desc) };
                }
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH if configurable => {
                if let Some(q) = self.queue() {
                    q.addrs.avail =
                        if offset == reg::QUEUE_DRIVER_LOW { lo(q.addrs.avail) } else { hi(q.addrs.avail) };
                }
            }
            reg::QUEUE_DEVICE_LOW | reg::QUEUE_DEVICE_HIGH if configurable => {
                if let Some(q) = self.queue() {
                    q.addrs.used =
                        if offset == reg::QUEUE_DEVICE_LOW { lo(q.addrs.used) } else { hi(q.addrs.used) };
                }
            }
            // Only reaches hostvm if the ioeventfd did not match: pass it on.
            reg::QUEUE_NOTIFY => {
                if (v as usize) < QUEUES {
                    let _ = self.link.kick_fd(v as usize).write(1);
                }
            }
            reg::INTERRUPT_ACK => {}
            reg::STATUS => self.set_status(v),
            _ => tracing::debug!("virtio-mmio: write {v:#x} at {offset:#x} ignored"),
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let newly = v & !self.st.status;
        let mut v = v;
        if newly & STATUS_FEATURES_OK != 0 {
            let unknown = self.st.driver_features & !self.st.device_features;
            if unknown != 0 || self.st.driver_features & crate::net::F_VERSION_1 == 0 {
                tracing::warn!(
                    "virtio-mmio: driver features {:#x} refused (offered {:#x}; VERSION_1 required)",
                    self.st.driver_features,
                    self.st.device_features
                );
                v &= !STATUS_FEATURES_OK;
            }
        }
        if newly & STATUS_DRIVER_OK != 0 {
            match self.activation() {
                Ok(act) => {
                    if let Err(e) = self.link.activate(act) {
                        tracing::error!("{e}");
                        v |= STATUS_FAILED;
                    }
                }
                Err(why) => {
                    tracing::error!("virtio-mmio: DRIVER_OK refused: {why}");
                    v |= STATUS_FAILED;
                }
            }
        }
        self.st.status = v;
    }

    fn activation(&self) -> Result<Activation, Refusal> {
        if self.st.status & STATUS_FEATURES_OK == 0 {
            return Err(Refusal::NoFeaturesOk);
        }
        let mut queues = [QueueAddrs::default(); QUEUES];
        for (i, q) in self.st.queues.iter().enumerate() {
            let a = q.addrs;
            if !q.ready {
                return Err(Refusal::NotReady(i));
            }
            if a.size == 0 || a.size > QUEUE_MAX || !a.size.is_power_of_two() {
                return Err(Refusal::BadSize { queue: i, size: a.size });
            }
            if a.desc % 16 != 0 || a.avail % 2 != 0 || a.used % 4 != 0 {
                return Err(Refusal::Misaligned(i));
            }
            queues[i] = a;
        }
        Ok(Activation { features: self.st.driver_features, queues })
    }

    fn reset(&mut self) {
        if self.st.status != 0 {
            self.link.reset();
        }
        self.st.device_features_sel = 0;
        self.st.driver_features = 0;
        self.st.driver_features_sel = 0;
        self.st.queue_sel = 0;
        self.st.queues = [Queue::default(); QUEUES];
        self.st.status = 0;
    }
}
