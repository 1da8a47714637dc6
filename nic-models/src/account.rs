//! What the device does, counted apart from what the host does.
//!
//! A real NIC's work is bus transactions: it fetches descriptors, writes packet data and
//! descriptors back, and raises interrupts. The model counts those per queue in
//! [`DeviceCounters`], and [`PcieCost`] turns them into modelled bus time with a cost table
//! (payload per transaction, header bytes per TLP, link rate), after SimBricks' PCIe interface
//! (DMA read/write, MMIO, interrupt messages). Host cycles are measured by whoever drives the
//! model (the switch's polling thread), never added here.

/// Counters of one modelled queue (or a whole device, summed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    /// Frames delivered into guest buffers (RX) or taken from guest buffers (TX).
    pub packets: u64,
    /// Their bytes, virtio-net header included.
    pub bytes: u64,
    /// Descriptor reads (available-ring entries and descriptors).
    pub desc_fetches: u64,
    /// Descriptor write-backs (used-ring entries and index updates).
    pub desc_writebacks: u64,
    /// Bytes the device wrote into guest memory (packet data and write-backs).
    pub dma_write_bytes: u64,
    /// Bytes the device read from guest memory (packet data and descriptors).
    pub dma_read_bytes: u64,
    /// PCIe transactions (TLPs) those reads and writes take, split at the payload size.
    pub tlps: u64,
    /// Copies made by a host CPU for these packets (0 for a DMA engine; the software path
    /// counts its own).
    pub cpu_copies: u64,
    /// Address translations asked of the IOMMU domain.
    pub iotlb_lookups: u64,
    /// Of those, translations the domain did not have yet (a vIOMMU miss: the buffer is put
    /// back untouched until the guest's IOMMU answers).
    pub iotlb_misses: u64,
    /// Addresses the IOMMU refused (out of range, wrong permission, unmapped): the buffer is
    /// returned empty and counted, never written.
    pub dma_faults: u64,
    /// Frames dropped because the guest had posted no buffer (RX missed).
    pub no_buffer: u64,
    /// Interrupts raised.
    pub irqs: u64,
    /// Interrupts the moderation folded into a later one.
    pub irqs_suppressed: u64,
}

impl DeviceCounters {
    /// Adds `o` into `self`.
    pub fn add(&mut self, o: &DeviceCounters) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.desc_fetches += o.desc_fetches;
        self.desc_writebacks += o.desc_writebacks;
        self.dma_write_bytes += o.dma_write_bytes;
        self.dma_read_bytes += o.dma_read_bytes;
        self.tlps += o.tlps;
        self.cpu_copies += o.cpu_copies;
        self.iotlb_lookups += o.iotlb_lookups;
        self.iotlb_misses += o.iotlb_misses;
        self.dma_faults += o.dma_faults;
        self.no_buffer += o.no_buffer;
        self.irqs += o.irqs;
        self.irqs_suppressed += o.irqs_suppressed;
    }
}

/// A PCIe cost table: how transactions become bus time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PcieCost {
    /// Largest payload of one write TLP (Max Payload Size), bytes.
    pub max_payload: u32,
    /// Largest payload of one read completion (Max Read Request / completion split), bytes.
    pub max_read: u32,
    /// Per-TLP overhead on the link (framing, sequence, header, LCRC), bytes.
    pub tlp_overhead: u32,
    /// Link bandwidth one way, bytes per second.
    pub link_bytes_per_sec: f64,
}

impl PcieCost {
    /// A PCIe 2.0 x4 link (the 82576's): 2 GB/s a direction, 256-byte payloads, 24 bytes per TLP.
    pub const GEN2_X4: PcieCost =
        PcieCost { max_payload: 256, max_read: 256, tlp_overhead: 24, link_bytes_per_sec: 2.0e9 };

    /// TLPs to write `len` contiguous bytes.
    #[inline(always)]
    pub fn write_tlps(&self, len: u32) -> u64 {
        u64::from(len.div_ceil(self.max_payload.max(1)))
    }

    /// TLPs to read `len` contiguous bytes (the request and its completions).
    #[inline(always)]
    pub fn read_tlps(&self, len: u32) -> u64 {
        1 + u64::from(len.div_ceil(self.max_read.max(1)))
    }

    /// Modelled link time for what `c` counts, in nanoseconds.
    pub fn link_ns(&self, c: &DeviceCounters) -> f64 {
        let bytes = c.dma_write_bytes + c.dma_read_bytes + c.tlps * u64::from(self.tlp_overhead);
        bytes as f64 / self.link_bytes_per_sec * 1e9
    }
}

impl Default for PcieCost {
    fn default() -> Self {
        PcieCost::GEN2_X4
    }
}
