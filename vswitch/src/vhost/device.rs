//! [`VhostDevice`]: the backend request handler of one port's connection.

use std::fs::File;
use std::sync::Arc;

use iommu::{AddressSpace, Dma, FaultLog, Iotlb, IotlbEntry, MemoryRegionDesc, Region};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtq::{RingAddrs, RingError, MAX_RING_SIZE};

use super::dirty_log::DirtyLog;
use super::eventfd::{vring_eventfd, VringFdError};
use super::iotlb::{
    BackendChannel, IotlbInfo, IotlbLink, IotlbMsg, IotlbStats, IOTLB_INVALIDATE, IOTLB_UPDATE,
    MISS_TIMEOUT_NS, RESEND_NS,
};
use crate::port::Port;
use crate::virtio::features::{self, Negotiated};
use crate::virtio::queue::QueueSetup;
use crate::virtio::VirtQueue;
pub use log::DirtyLogInfo;

mod log;

/// Memory slots offered with CONFIGURE_MEM_SLOTS: as many regions as an address space holds.
pub const MAX_MEM_SLOTS: u64 = iommu::MAX_REGIONS as u64;

/// Protocol features offered. REPLY_ACK is added by the `vhost` crate itself.
fn offered_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::RARP
}

#[derive(Default)]
struct Vring {
    num: u32,
    addrs: Option<RingAddrs>,
    base: u16,
    kick: Option<(Arc<File>, u64)>,
    call: Option<Arc<File>>,
    _err: Option<File>,
    /// Set by SET_VRING_ENABLE; until then a ring is enabled only if PROTOCOL_FEATURES was not
    /// negotiated (QEMU may enable rings before it sends SET_FEATURES).
    enabled: Option<bool>,
    /// Has a kick fd (or was told to poll): the frontend started it.
    started: bool,
    /// Cannot start until the IOTLB translates its ring addresses (a miss was asked for).
    waiting_iotlb: bool,
    /// When the last miss for the ring addresses was asked for (ns, `now_ns` clock).
    asked: u64,
    /// The ring address that missed, and whether it was a write.
    missing: (u64, bool),
    /// Packets parked on this (receive) queue when it was stopped to be rebuilt: the next
    /// queue built here delivers them.
    parked: std::collections::VecDeque<(Vec<u8>, u64)>,
}

impl Vring {
    /// Whether `[iova, iova + size)` overlaps any part of this ring (IOVA mode).
    fn overlaps(&self, iova: u64, size: u64) -> bool {
        let Some(a) = self.addrs else { return false };
        let n = self.num as u64;
        let end = iova.saturating_add(size);
        [(a.desc, 16 * n), (a.avail, 6 + 2 * n), (a.used, 6 + 8 * n)]
            .iter()
            .any(|&(s, len)| s < end && s.saturating_add(len) > iova)
    }
}

/// What `vswitch ctl ports` shows of a connection.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    /// Acked virtio features by name.
    pub features: Vec<String>,
    /// Acked protocol features (raw).
    pub protocol_features: u64,
    /// Memory regions mapped.
    pub mem_regions: usize,
    /// Bytes of guest memory mapped.
    pub mem_bytes: u64,
    /// Virtqueues running.
    pub running_queues: Vec<usize>,
    /// Protocol errors seen on this connection.
    pub protocol_errors: u64,
    /// Connections dropped because their guest memory lost pages (a truncated memory file
    /// caught by the SIGBUS guard).
    #[serde(default)]
    pub memory_faults: u64,
    /// DMA faults of this port so far (bad guest addresses, refused accesses).
    #[serde(default)]
    pub dma_faults: u64,
    /// Call eventfds revoked so far because writing them blocked the switch (each disconnects
    /// the frontend).
    #[serde(default)]
    pub calls_revoked: u64,
    /// With a vIOMMU (ACCESS_PLATFORM acked): the IOTLB's state and activity.
    #[serde(default)]
    pub iotlb: Option<IotlbInfo>,
    /// Live migration: the dirty log the frontend handed over, if any.
    #[serde(default)]
    pub dirty_log: Option<DirtyLogInfo>,
}

/// What guest memory a port accepts (switch-wide settings).
#[derive(Clone, Copy, Debug)]
pub struct MemPolicy {
    /// Regions whose file could lose pages: refused or guarded.
    pub unsealed: iommu::Unsealed,
    /// Most bytes of guest memory the port may map.
    pub max_bytes: u64,
}

impl Default for MemPolicy {
    fn default() -> Self {
        MemPolicy { unsealed: iommu::Unsealed::Refuse, max_bytes: crate::config::DEFAULT_MAX_GUEST_MEM }
    }
}

impl From<&crate::SwitchConfig> for MemPolicy {
    fn from(c: &crate::SwitchConfig) -> Self {
        MemPolicy { unsealed: c.unsealed_memory.into(), max_bytes: c.max_guest_mem() }
    }
}

/// Backend state of one port's vhost-user connection.
pub struct VhostDevice {
    port: Arc<Port>,
    acked: Negotiated,
    protocol: u64,
    mem: Arc<AddressSpace>,
    /// Extra ADD_MEM_REGs of a region already mapped, by guest address: QEMU gives every queue
    /// pair of a multi-queue NIC its own vhost device over the one connection, and each adds
    /// (and later removes) the same regions.
    mem_dups: std::collections::HashMap<u64, u32>,
    vrings: Vec<Vring>,
    kick_gen: u64,
    wake: Arc<dyn Fn() + Send + Sync>,
    /// The device's IOTLB (each running queue has a copy, changed with it).
    iotlb: Iotlb,
    /// Where misses go (SET_BACKEND_REQ_FD).
    backend: Option<Arc<BackendChannel>>,
    iotlb_stats: Arc<IotlbStats>,
    faults: Arc<FaultLog>,
    mem_policy: MemPolicy,
    /// Protocol errors so far (refused requests).
    pub protocol_errors: u64,
    /// Connections dropped because their guest memory lost pages (the guard caught it).
    pub memory_faults: u64,
    /// The dirty log (SET_LOG_BASE), used while VHOST_F_LOG_ALL is acked.
    log: Option<Arc<DirtyLog>>,
    log_bases: u64,
    /// Why the last SET_LOG_BASE was refused.
    log_refused: Option<String>,
}

fn refuse_fd(e: VringFdError) -> VuError {
    refuse(e.to_string())
}

/// A refused request: the control loop logs it (within the connection's log budget) and counts
/// it.
fn refuse(why: String) -> VuError {
    VuError::ReqHandlerError(std::io::Error::other(why))
}

impl VhostDevice {
    /// A fresh device for `port`; `wake` nudges the polling threads after a queue starts.
    pub fn new(port: Arc<Port>, wake: Arc<dyn Fn() + Send + Sync>) -> Self {
        let n = 2 * port.pairs() as usize;
        let vrings = (0..n).map(|_| Vring::default()).collect();
        VhostDevice {
            port,
            acked: Negotiated::default(),
            protocol: 0,
            mem: Arc::default(),
            mem_dups: Default::default(),
            vrings,
            kick_gen: 0,
            wake,
            iotlb: Iotlb::default(),
            backend: None,
            iotlb_stats: Arc::default(),
            faults: Arc::default(),
            mem_policy: MemPolicy::default(),
            protocol_errors: 0,
            memory_faults: 0,
            log: None,
            log_bases: 0,
            log_refused: None,
        }
    }

    /// RESET_OWNER / RESET_DEVICE: stops every queue and forgets the device's state, but not
    /// the connection's (the protocol features and the backend channel are negotiated once
    /// per connection, and the vhost crate keeps its copy of the former).
    fn reset_device_state(&mut self) {
        let (protocol, backend) = (self.protocol, self.backend.take());
        self.reset();
        self.protocol = protocol;
        self.backend = backend;
    }

    /// The device with `policy` for the guest memory it accepts.
    pub fn with_mem_policy(mut self, policy: MemPolicy) -> Self {
        self.mem_policy = policy;
        self
    }

    /// Whether a page of the guest's memory was lost under the SIGBUS guard: the frontend
    /// truncated its memory file, and the connection should be dropped.
    pub fn mem_faulted(&self) -> bool {
        self.mem.faulted()
    }

    /// Maps `r` from `file` under the port's policy, if its memory fits the budget with
    /// `others` bytes already mapped.
    fn map_region(&self, r: MemoryRegionDesc, file: File, others: u64) -> VuResult<Region> {
        let total = others.saturating_add(r.memory_size);
        if total > self.mem_policy.max_bytes {
            return Err(refuse(format!(
                "memory region at guest address {:#x} would bring this port's guest memory to {total} bytes, \
                 more than the switch's max_guest_mem of {} (raise it with --max-guest-mem)",
                r.guest_phys_addr, self.mem_policy.max_bytes
            )));
        }
        Region::map(r, file, self.mem_policy.unsealed).map_err(|e| match e {
            iommu::Error::CanLosePages { .. } => refuse(format!(
                "{e}. QEMU's memory-backend-memfd seals by default (seal=on); for DPDK virtio-user, \
                 hugetlbfs or file-backed memory start the switch with --unsealed-memory guard"
            )),
            e => refuse(e.to_string()),
        })
    }

    /// Stops every queue and forgets the connection's state (disconnect).
    pub fn reset(&mut self) {
        for i in 0..self.vrings.len() {
            if let Some(slot) = self.port.slot(i) {
                let q = slot.lock().take_virtio();
                let parked = q.as_ref().and_then(|q| q.iotlb.as_deref()).map_or(0, |l| l.parked.len());
                // Packets waiting for a receive buffer of a device being reset are lost.
                self.count_lost(i, (parked + self.vrings[i].parked.len()) as u64);
            }
        }
        let n = self.vrings.len();
        self.vrings = (0..n).map(|_| Vring::default()).collect();
        self.acked = Negotiated::default();
        self.protocol = 0;
        self.mem = Arc::default();
        self.mem_dups.clear();
        self.iotlb.clear();
        self.backend = None;
        self.log = None;
        self.log_refused = None;
        self.port.iova.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the guest's addresses are IOVAs (it sits behind a vIOMMU).
    fn iova_mode(&self) -> bool {
        self.acked.has(features::F_ACCESS_PLATFORM)
    }

    /// Whether the frontend acked REPLY_ACK (it then expects a status reply to requests that
    /// ask for one).
    pub fn reply_ack(&self) -> bool {
        self.protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    /// What is negotiated and running.
    pub fn info(&self) -> DeviceInfo {
        DeviceInfo {
            features: self.acked.names().into_iter().map(String::from).collect(),
            protocol_features: self.protocol,
            mem_regions: self.mem.regions().len(),
            mem_bytes: self.mem.total_size(),
            running_queues: (0..self.vrings.len())
                .filter(|i| self.port.slot(*i).is_some_and(|s| s.is_running()))
                .collect(),
            protocol_errors: self.protocol_errors,
            memory_faults: self.memory_faults,
            dma_faults: {
                let (a, b, c) = self.faults.counts();
                a + b + c
            },
            calls_revoked: self.port.call_fault.revoked.load(std::sync::atomic::Ordering::Relaxed),
            iotlb: self.iova_mode().then(|| self.iotlb_info()),
            dirty_log: self.log_info(),
        }
    }

    fn iotlb_info(&self) -> IotlbInfo {
        use std::sync::atomic::Ordering::Relaxed;
        let c = self.iotlb.counters;
        let s = &self.iotlb_stats;
        let (nm, perm, cross) = self.faults.counts();
        IotlbInfo {
            entries: self.iotlb.len() as u64,
            updates: c.updates,
            refused: c.refused,
            invalidations: c.invalidations,
            evictions: c.evictions,
            misses_sent: s.misses_sent.load(Relaxed),
            misses_unsent: s.misses_unsent.load(Relaxed),
            rx_parked: s.rx_parked.load(Relaxed),
            rx_miss_drops: s.rx_miss_drops.load(Relaxed),
            tx_miss_timeouts: s.tx_miss_timeouts.load(Relaxed),
            faults_not_mapped: nm,
            faults_permission: perm,
            faults_crossing: cross,
            recent_faults: self.faults.recent().iter().rev().take(8).map(|f| f.to_string()).collect(),
        }
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        let n = self.vrings.len();
        self.vrings
            .get_mut(index as usize)
            .ok_or_else(|| refuse(format!("queue index {index} is beyond the {n} queues of this port")))
    }

    /// Rebuilds queue `idx` from its configuration, carrying the ring position over.
    fn refresh(&mut self, idx: usize) {
        let Some(slot) = self.port.slot(idx) else { return };
        let mut g = slot.lock();
        if let Some(mut q) = g.take_virtio() {
            self.vrings[idx].base = q.ring.state().last_avail;
            if let Some(l) = q.iotlb.as_deref_mut() {
                self.vrings[idx].parked.extend(l.parked.drain(..));
            }
        }
        // Waiting for a translation again only if this attempt misses.
        self.vrings[idx].waiting_iotlb = false;
        let v = &self.vrings[idx];
        let Some(addrs) = v.addrs else { return };
        let enabled = v.enabled.unwrap_or(!self.acked.has(features::VHOST_USER_F_PROTOCOL_FEATURES));
        if !(v.started && enabled && v.num > 0) || self.mem.regions().is_empty() {
            return;
        }
        let setup = QueueSetup {
            addrs,
            size: v.num,
            last_avail: v.base,
            event_idx: self.acked.has(features::RING_F_EVENT_IDX),
            hdr_len: self.acked.net_hdr_len(),
            mrg_rxbuf: self.acked.has(features::NET_F_MRG_RXBUF),
            indirect: self.acked.has(features::RING_F_INDIRECT_DESC),
            caps: crate::offload::Caps::from_features(self.acked),
            packed: self.acked.has(features::F_RING_PACKED),
        };
        let domain = self.port.id as u32;
        let dma = if self.iova_mode() {
            Dma::iova(self.mem.clone(), self.iotlb.clone(), domain, self.faults.clone())
        } else {
            Dma::gpa(self.mem.clone(), domain, self.faults.clone())
        };
        let (call, kick) = (v.call.clone(), v.kick.clone());
        match VirtQueue::new(dma, &setup, call, kick) {
            Ok(mut q) => {
                if self.iova_mode() {
                    let mut link = IotlbLink::new(self.backend.clone(), self.iotlb_stats.clone());
                    link.parked = std::mem::take(&mut self.vrings[idx].parked);
                    q.iotlb = Some(Box::new(link));
                }
                q.call_fault = Some(self.port.call_fault.clone());
                q.log = self.logging().cloned();
                *g = Some(q.into());
                drop(g);
                (self.wake)();
            }
            Err(RingError::Miss { what, iova, write }) => {
                // Starts when the translation arrives (see `iotlb_msg`).
                tracing::debug!(port = %self.port.name, queue = idx, "{what} ring at IOVA {iova:#x} not in the IOTLB yet: asking");
                let now = crate::clock::now_ns();
                self.vrings[idx].waiting_iotlb = true;
                self.vrings[idx].asked = now;
                self.vrings[idx].missing = (iova, write);
                let mut link = IotlbLink::new(self.backend.clone(), self.iotlb_stats.clone());
                link.miss(iova, write, now);
            }
            Err(e) => {
                self.protocol_errors += 1;
                tracing::warn!(port = %self.port.name, queue = idx, "cannot start queue: {e}");
            }
        }
    }

    /// Rings waiting for the translation of their addresses ask again every [`RESEND_NS`]:
    /// the first ask may never have gone out (the backend channel was full) or may have been
    /// lost, and nothing else would restart the queue. Packets parked for a stopped ring
    /// longer than [`MISS_TIMEOUT_NS`] are dropped and counted as no buffer, as the datapath
    /// drops those parked on a running queue. Returns whether a ring still waits or holds
    /// parked packets (call again soon).
    pub fn retry_waiting(&mut self, now: u64) -> bool {
        let mut waiting = false;
        for i in 0..self.vrings.len() {
            let v = &mut self.vrings[i];
            if !v.waiting_iotlb && v.parked.is_empty() {
                continue;
            }
            let before = v.parked.len();
            v.parked.retain(|&(_, since)| now.wrapping_sub(since) <= MISS_TIMEOUT_NS);
            let lost = (before - v.parked.len()) as u64;
            self.count_lost(i, lost);
            if self.vrings[i].waiting_iotlb && now.wrapping_sub(self.vrings[i].asked) >= RESEND_NS {
                // Asks again without rebuilding the queue (which copies the whole IOTLB): the
                // update that answers rebuilds it (see `iotlb_update`).
                let (iova, write) = self.vrings[i].missing;
                self.vrings[i].asked = now;
                IotlbLink::new(self.backend.clone(), self.iotlb_stats.clone()).miss(iova, write, now);
            }
            waiting |= self.vrings[i].waiting_iotlb || !self.vrings[i].parked.is_empty();
        }
        waiting
    }

    /// Counts `lost` packets that were parked for queue `i` as dropped (no buffer).
    fn count_lost(&self, i: usize, lost: u64) {
        if lost == 0 {
            return;
        }
        self.iotlb_stats.rx_miss_drops.fetch_add(lost, std::sync::atomic::Ordering::Relaxed);
        if let Some(slot) = self.port.slot(i) {
            slot.stats.drop(crate::counters::DropReason::NoBuffer, lost);
        }
    }

    fn refresh_all(&mut self) {
        for i in 0..self.vrings.len() {
            self.refresh(i);
        }
    }

    fn any_running(&self) -> bool {
        (0..self.vrings.len()).any(|i| self.port.slot(i).is_some_and(|s| s.is_running()))
    }

    fn set_mem(&mut self, mem: AddressSpace) {
        self.mem = Arc::new(mem);
        // IOTLB entries point into the old table's mappings: forget them (they are a cache;
        // misses bring back what is still valid).
        self.iotlb.clear();
        // Re-translate every running ring in the new table; the old mappings go away when the
        // last queue lets go of them.
        self.refresh_all();
    }

    /// Takes the backend channel the frontend set up (SET_BACKEND_REQ_FD).
    pub fn set_backend_channel(&mut self, sock: std::os::unix::net::UnixStream) -> Result<(), String> {
        if self.protocol & VhostUserProtocolFeatures::BACKEND_REQ.bits() == 0 {
            return Err("SET_BACKEND_REQ_FD before the BACKEND_REQ protocol feature was acked".into());
        }
        self.backend = Some(Arc::new(BackendChannel::new(sock)));
        // Queues built before keep asking through the old link: rebuild them.
        self.refresh_all();
        Ok(())
    }

    /// Applies an IOTLB_MSG (update or invalidation) to the device's IOTLB and, under each
    /// queue's lock, to every running queue's copy: once this returns, no queue translates
    /// through an invalidated entry. Queues whose rings were waiting for a translation start;
    /// queues whose rings lost theirs stop until it comes back.
    pub fn iotlb_msg(&mut self, m: IotlbMsg) -> Result<(), String> {
        if !self.iova_mode() {
            return Err("IOTLB_MSG without VIRTIO_F_ACCESS_PLATFORM acked (the guest has no vIOMMU)".into());
        }
        match m.kind {
            IOTLB_UPDATE => self.iotlb_update(m),
            IOTLB_INVALIDATE => {
                tracing::trace!(port = %self.port.name, "IOTLB invalidate {:#x}+{:#x}", m.iova, m.size);
                self.iotlb.invalidate(m.iova, m.size);
                let mut lost = Vec::new();
                for i in 0..self.vrings.len() {
                    let Some(slot) = self.port.slot(i) else { continue };
                    let mut g = slot.lock();
                    if g.has_iotlb() {
                        g.each_iotlb(|t| {
                            t.invalidate(m.iova, m.size);
                        });
                        if self.vrings[i].overlaps(m.iova, m.size) {
                            lost.push(i);
                        }
                    }
                }
                for i in lost {
                    self.refresh(i);
                }
                Ok(())
            }
            k => {
                Err(format!("IOTLB_MSG of type {k} is not one a frontend sends (2 = update, 3 = invalidate)"))
            }
        }
    }

    fn iotlb_update(&mut self, m: IotlbMsg) -> Result<(), String> {
        tracing::trace!(port = %self.port.name, "IOTLB update {:#x}+{:#x} -> {:#x}", m.iova, m.size, m.uaddr);
        let Some(perm) = m.perm() else {
            self.iotlb.counters.refused += 1;
            return Err(format!(
                "IOTLB update at IOVA {:#x} has permission {} (1 = RO, 2 = WO, 3 = RW)",
                m.iova, m.perm
            ));
        };
        let whole = IotlbEntry { iova: m.iova, size: m.size, uaddr: m.uaddr, perm };
        // The target, cut at region edges, each piece resolved to where it is mapped here.
        // Nothing is applied unless all of it is inside the frontend's memory.
        let pieces = match (m.size, m.iova.checked_add(m.size)) {
            (1.., Some(_)) => self.mem.uva_pieces(m.uaddr, m.size),
            _ => None,
        };
        let Some(pieces) = pieces else {
            // Refused (and counted) with the reason.
            return self.iotlb.update(whole, |_, _| None).map_err(|e| e.to_string());
        };
        for (uaddr, size, host) in pieces {
            let e = IotlbEntry { iova: m.iova + (uaddr - m.uaddr), size, uaddr, perm };
            self.iotlb.update(e, |_, _| Some(host)).map_err(|e| e.to_string())?;
            for i in 0..self.vrings.len() {
                let Some(slot) = self.port.slot(i) else { continue };
                slot.lock().each_iotlb(|t| {
                    let _ = t.update(e, |_, _| Some(host));
                });
            }
        }
        for i in 0..self.vrings.len() {
            if self.vrings[i].waiting_iotlb && self.vrings[i].overlaps(m.iova, m.size) {
                self.refresh(i);
            }
        }
        // A polling thread asleep on a stalled queue retries now.
        (self.wake)();
        Ok(())
    }

    fn config_space(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.port.mac);
        c[6..8].copy_from_slice(&1u16.to_le_bytes()); // VIRTIO_NET_S_LINK_UP
        c[8..10].copy_from_slice(&self.port.pairs().to_le_bytes());
        c[10..12].copy_from_slice(&1500u16.to_le_bytes());
        c
    }
}

fn desc_of(r: &VhostUserMemoryRegion) -> MemoryRegionDesc {
    MemoryRegionDesc {
        guest_phys_addr: r.guest_phys_addr,
        memory_size: r.memory_size,
        userspace_addr: r.user_addr,
        mmap_offset: r.mmap_offset,
    }
}

fn unsupported<T>(what: &str) -> VuResult<T> {
    Err(refuse(format!("{what} is not supported by this switch")))
}

impl VhostUserBackendReqHandlerMut for VhostDevice {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset_device_state();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.reset_device_state();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(features::offered(self.port.offloads, self.port.packed))
    }

    fn set_features(&mut self, bits: u64) -> VuResult<()> {
        tracing::debug!(port = %self.port.name, "SET_FEATURES {bits:#x}");
        let offered = features::offered(self.port.offloads, self.port.packed);
        if bits & !offered != 0 {
            return Err(refuse(format!("features {:#x} were not offered", bits & !offered)));
        }
        // Only dirty logging may start or stop under running queues (QEMU acks LOG_ALL when
        // a migration starts, with the guest running).
        if (bits ^ self.acked.bits) & !features::VHOST_F_LOG_ALL != 0 && self.any_running() {
            return Err(refuse("features cannot change while queues run".into()));
        }
        // The vhost-user spec's IOMMU support: IOTLB_MSG both ways, misses over the backend
        // channel (there is no separate "IOTLB" protocol feature).
        let backend_req = VhostUserProtocolFeatures::BACKEND_REQ.bits();
        if bits & features::F_ACCESS_PLATFORM != 0 && self.protocol & backend_req == 0 {
            return Err(refuse(
                "VIRTIO_F_ACCESS_PLATFORM (a vIOMMU) needs the BACKEND_REQ protocol feature for IOTLB misses, which was not acked".into(),
            ));
        }
        self.check_log_all(bits)?;
        let was_logging = self.logging().is_some();
        self.acked = Negotiated { bits };
        self.port.iova.store(self.iova_mode(), std::sync::atomic::Ordering::Relaxed);
        if was_logging != self.logging().is_some() {
            tracing::info!(port = %self.port.name, "dirty logging {}", if was_logging { "stopped" } else { "started: the guest is migrating" });
            self.apply_log();
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        tracing::debug!(port = %self.port.name, "SET_MEM_TABLE {} regions", regions.len());
        let mut total = 0u64;
        let mut mapped = Vec::with_capacity(regions.len());
        for (r, f) in regions.iter().zip(files) {
            let region = self.map_region(desc_of(r), f, total)?;
            total += region.size();
            mapped.push(region);
        }
        let space = AddressSpace::new(mapped).map_err(|e| refuse(e.to_string()))?;
        self.mem_dups.clear();
        self.set_mem(space);
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        tracing::debug!(port = %self.port.name, "SET_VRING_NUM {index} {num}");
        if num == 0 || num > MAX_RING_SIZE as u32 || !num.is_power_of_two() {
            return Err(refuse(format!(
                "ring size {num} of queue {index} is not a power of two in 1..32768"
            )));
        }
        self.vring(index)?.num = num;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        tracing::debug!(port = %self.port.name, "SET_VRING_ADDR {index} desc={descriptor:#x} avail={available:#x} used={used:#x}");
        let addrs = Some(RingAddrs { desc: descriptor, avail: available, used });
        let running = self.port.slot(index as usize).is_some_and(|s| s.is_running());
        let v = self.vring(index)?;
        if running && v.addrs == addrs {
            // QEMU sends the same addresses again, with VHOST_VRING_F_LOG, when a migration
            // starts: nothing moves, and the running ring is left alone. (Its used ring is
            // logged by where it is mapped, whatever `log_guest_addr` says.)
            return Ok(());
        }
        v.addrs = addrs;
        self.refresh(index as usize);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        tracing::debug!(port = %self.port.name, "SET_VRING_BASE {index} {base}");
        let v = self.vring(index)?;
        v.base = base as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        tracing::debug!(port = %self.port.name, "GET_VRING_BASE {index}");
        // Stop the ring: once the slot is empty no burst can touch it, and every descriptor a
        // burst took has been returned.
        let idx = index as usize;
        if let Some(slot) = self.port.slot(idx) {
            if let Some(q) = slot.lock().take_virtio() {
                self.vrings[idx].base = q.ring.state().last_avail;
            }
        }
        if idx >= self.vrings.len() {
            // The vhost crate sends no reply for an error here, and the frontend would wait
            // for one for ever: answer, and count the mistake.
            self.protocol_errors += 1;
            tracing::debug!(port = %self.port.name, "GET_VRING_BASE of queue {index}, beyond the {} queues", self.vrings.len());
            return Ok(VhostUserVringState::new(index, 0));
        }
        let packed = self.acked.has(features::F_RING_PACKED);
        let v = self.vring(index)?;
        v.started = false;
        v.kick = None;
        // A packed ring's position is a token (slot, wrap counter in bit 15); QEMU reads the
        // used position from the upper half, which is the same token: every chain the switch
        // took has been returned. (DPDK reads the lower half only.)
        let num = if packed { u32::from(v.base) | u32::from(v.base) << 16 } else { u32::from(v.base) };
        Ok(VhostUserVringState::new(index, num))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        tracing::debug!(port = %self.port.name, "SET_VRING_KICK {index} fd={}", fd.is_some());
        let fd = fd.map(|f| vring_eventfd(f, "kick", index, true)).transpose().map_err(refuse_fd)?;
        self.kick_gen += 1;
        let gen = self.kick_gen;
        let v = self.vring(index as u32)?;
        v.kick = fd.map(|f| (Arc::new(f), gen));
        v.started = true;
        self.refresh(index as usize);
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let fd = fd.map(|f| vring_eventfd(f, "call", index, true)).transpose().map_err(refuse_fd)?;
        self.vring(index as u32)?.call = fd.map(Arc::new);
        self.refresh(index as usize);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let fd = fd.map(|f| vring_eventfd(f, "err", index, false)).transpose().map_err(refuse_fd)?;
        self.vring(index as u32)?._err = fd;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(offered_protocol())
    }

    fn set_protocol_features(&mut self, bits: u64) -> VuResult<()> {
        tracing::debug!(port = %self.port.name, "SET_PROTOCOL_FEATURES {bits:#x}");
        let known = (offered_protocol() | VhostUserProtocolFeatures::REPLY_ACK).bits();
        // The vhost crate takes the value whatever we answer (and acks by its REPLY_ACK bit);
        // the replies this switch sends itself follow the same bit, or a frontend waiting
        // for one would wait for ever.
        self.protocol = bits & known;
        if bits & !known != 0 {
            return Err(refuse(format!("protocol features {:#x} were not offered", bits & !known)));
        }
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.port.pairs() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        tracing::debug!(port = %self.port.name, "SET_VRING_ENABLE {index} {enable}");
        self.vring(index)?.enabled = Some(enable);
        self.refresh(index as usize);
        Ok(())
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        let c = self.config_space();
        let end = offset.checked_add(size).filter(|e| *e as usize <= c.len());
        match end {
            Some(end) => Ok(c[offset as usize..end as usize].to_vec()),
            None => Err(refuse(format!(
                "config read of {size} bytes at {offset} is outside the 12-byte config space"
            ))),
        }
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        unsupported("writing the config space")
    }

    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> VuResult<()> {
        unsupported("GPU_SET_SOCKET")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        unsupported("GET_SHARED_OBJECT")
    }

    fn get_inflight_fd(&mut self, _i: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        unsupported("GET_INFLIGHT_FD")
    }

    fn set_inflight_fd(&mut self, _i: &VhostUserInflight, _file: File) -> VuResult<()> {
        unsupported("SET_INFLIGHT_FD")
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        tracing::debug!(port = %self.port.name, "ADD_MEM_REG gpa={:#x} size={:#x}", { region.guest_phys_addr }, { region.memory_size });
        let d = desc_of(region);
        let same = |r: &iommu::Region| {
            let e = r.desc();
            (e.guest_phys_addr, e.memory_size, e.userspace_addr)
                == (d.guest_phys_addr, d.memory_size, d.userspace_addr)
        };
        if self.mem.regions().iter().any(same) {
            // The same region from another queue pair's vhost device: already mapped.
            *self.mem_dups.entry(d.guest_phys_addr).or_default() += 1;
            return Ok(None);
        }
        let r = self.map_region(d, fd, self.mem.total_size())?;
        let space = self.mem.with_region(r).map_err(|e| refuse(e.to_string()))?;
        self.set_mem(space);
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        tracing::debug!(port = %self.port.name, "REM_MEM_REG gpa={:#x} size={:#x}", { region.guest_phys_addr }, { region.memory_size });
        if let Some(n) = self.mem_dups.get_mut(&{ region.guest_phys_addr }) {
            // Another queue pair's vhost device still has it.
            *n -= 1;
            if *n == 0 {
                self.mem_dups.remove(&{ region.guest_phys_addr });
            }
            return Ok(());
        }
        let space = self
            .mem
            .without_region(region.guest_phys_addr, region.memory_size)
            .map_err(|e| refuse(e.to_string()))?;
        self.set_mem(space);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _d: VhostTransferStateDirection,
        _p: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        unsupported("SET_DEVICE_STATE_FD")
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        unsupported("CHECK_DEVICE_STATE")
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        unsupported("GET_SHMEM_CONFIG")
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        self.take_log_base(log, &file)
    }
}
