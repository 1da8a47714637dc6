//! Configuration of a [`Frontend`](super::Frontend).

use std::time::Duration;

/// Parameters of the emulated virtio-net device and of its guest memory.
///
/// Feature flags (`mrg_rxbuf`, `event_idx`, `indirect`, `version_1`) are
/// requests: each is negotiated only if the backend offers it. Check
/// [`Frontend::negotiated_features`](super::Frontend::negotiated_features)
/// for the outcome.
#[derive(Clone, Debug)]
pub struct FrontendConfig {
    /// Number of RX/TX queue pairs (vring `2k` is RX of pair `k`, `2k + 1` its TX).
    pub queue_pairs: u16,
    /// Entries per vring; a power of two in `1..=32768`.
    pub ring_size: u16,
    /// Size of the single shared-memory region holding rings and buffers
    /// (see [`required_mem_size`](Self::required_mem_size)).
    pub mem_size: usize,
    /// Back the region with 2 MiB huge pages (`MFD_HUGETLB`), falling back to
    /// ordinary pages when none are available.
    pub hugepages: bool,
    /// Seal the memfd against shrinking and growing (as QEMU's memory-backend-memfd does;
    /// the switch refuses unsealed memory by default). Off only for tests that truncate it.
    pub seal_memory: bool,
    /// Guest-physical address of the first byte of the region. Descriptor
    /// addresses are guest-physical; vring addresses in `SET_VRING_ADDR` are
    /// our virtual addresses, as QEMU sends them.
    pub gpa_base: u64,
    /// Negotiate `VIRTIO_F_VERSION_1` (modern device, 12-byte header).
    pub version_1: bool,
    /// Negotiate `VIRTIO_NET_F_MRG_RXBUF` (frames may span several RX buffers).
    pub mrg_rxbuf: bool,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` (used_event / avail_event suppression).
    pub event_idx: bool,
    /// Negotiate `VIRTIO_RING_F_INDIRECT_DESC` and send every TX frame through
    /// a two-entry indirect table (header, frame).
    pub indirect: bool,
    /// Send TX frames as two chained descriptors (header, frame) instead of one.
    /// Ignored when `indirect` is negotiated (the indirect table is already split).
    pub split_header: bool,
    /// Ack `CONFIGURE_MEM_SLOTS` when offered and then register memory with
    /// `ADD_MEM_REG` instead of `SET_MEM_TABLE` (as QEMU does).
    pub mem_slots: bool,
    /// Size of each RX buffer (one descriptor per buffer), virtio-net header included.
    pub rx_buf_size: u32,
    /// Size of each TX buffer slot, header included: the largest frame
    /// [`enqueue_tx`](super::Frontend::enqueue_tx) accepts is this minus the header.
    pub tx_buf_size: u32,
    /// Bytes reserved for [`guest_mem`](super::Frontend::guest_mem) (hostile-input tests).
    pub scratch_size: usize,
    /// Ask for `GUEST_CSUM`, `GUEST_TSO4` and `GUEST_TSO6`: take frames with checksums left to
    /// do and TCP frames of up to 64 KiB (with mergeable buffers, as Linux's driver does).
    pub guest_offloads: bool,
    /// Ask for `CSUM`, `HOST_TSO4` and `HOST_TSO6`: send frames with checksums left to do and
    /// TCP frames of up to 64 KiB ([`send_offloaded`](super::Frontend::send_offloaded)).
    pub host_offloads: bool,
    /// Upper bound for every control-socket send and receive.
    pub control_timeout: Duration,
    /// Put the device behind a vIOMMU played by this frontend (needs the backend to offer
    /// `VIRTIO_F_ACCESS_PLATFORM` and `BACKEND_REQ`): descriptors and rings carry IOVAs.
    pub iommu: Option<super::IommuConfig>,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            queue_pairs: 1,
            ring_size: 256,
            mem_size: 16 << 20,
            hugepages: false,
            seal_memory: true,
            gpa_base: 0,
            version_1: true,
            mrg_rxbuf: true,
            event_idx: false,
            indirect: false,
            split_header: false,
            mem_slots: true,
            rx_buf_size: 2048,
            tx_buf_size: 2048,
            scratch_size: 64 << 10,
            guest_offloads: false,
            host_offloads: false,
            control_timeout: Duration::from_secs(5),
            iommu: None,
        }
    }
}
