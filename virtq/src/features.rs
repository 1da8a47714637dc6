//! Feature bits, as masks of the 64-bit feature word, and what a negotiated set means for a
//! device's datapath.
//!
//! One copy for the workspace: the switch, the frontends and the NIC models take their bits
//! from here. What the switch chooses to offer is the switch's business (`vswitch::virtio::features`).

/// `VIRTIO_NET_F_CSUM`: the guest may leave checksums for the device to complete.
pub const NET_F_CSUM: u64 = 1 << 0;
/// `VIRTIO_NET_F_GUEST_CSUM`: the guest takes packets with partial checksums.
pub const NET_F_GUEST_CSUM: u64 = 1 << 1;
/// `VIRTIO_NET_F_GUEST_TSO4`: the guest takes TCPv4 frames of up to 64 KiB.
pub const NET_F_GUEST_TSO4: u64 = 1 << 7;
/// `VIRTIO_NET_F_GUEST_TSO6`: the same for TCPv6.
pub const NET_F_GUEST_TSO6: u64 = 1 << 8;
/// `VIRTIO_NET_F_GUEST_ECN`: the guest takes TSO frames of ECN flows.
pub const NET_F_GUEST_ECN: u64 = 1 << 9;
/// `VIRTIO_NET_F_HOST_TSO4`: the guest may send TCPv4 frames of up to 64 KiB to be segmented.
pub const NET_F_HOST_TSO4: u64 = 1 << 11;
/// `VIRTIO_NET_F_HOST_TSO6`: the same for TCPv6.
pub const NET_F_HOST_TSO6: u64 = 1 << 12;
/// `VIRTIO_NET_F_HOST_ECN`: the guest may send TSO frames of ECN flows.
pub const NET_F_HOST_ECN: u64 = 1 << 13;
/// `VIRTIO_NET_F_MAC`: the device has a MAC address in config space.
pub const NET_F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_MRG_RXBUF`: a received packet may span several buffers.
pub const NET_F_MRG_RXBUF: u64 = 1 << 15;
/// `VIRTIO_NET_F_STATUS`: link status in config space.
pub const NET_F_STATUS: u64 = 1 << 16;
/// `VIRTIO_NET_F_CTRL_VQ`: control queue (served by the frontend, as QEMU and virtio-user do).
pub const NET_F_CTRL_VQ: u64 = 1 << 17;
/// `VIRTIO_NET_F_MQ`: several queue pairs.
pub const NET_F_MQ: u64 = 1 << 22;
/// `VIRTIO_F_ANY_LAYOUT` (legacy): header and frame may share or split buffers freely.
pub const F_ANY_LAYOUT: u64 = 1 << 27;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const RING_F_EVENT_IDX: u64 = 1 << 29;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_ACCESS_PLATFORM` (once `IOMMU_PLATFORM`): the guest's addresses are IOVAs behind
/// its vIOMMU, translated through the vhost-user IOTLB (QEMU acks it only when the device
/// really sits behind a vIOMMU).
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
/// `VIRTIO_F_IN_ORDER`: buffers are used in the order they were made available. The datapath
/// always does so (malformed buffers included), and DPDK's virtio-user takes its fast
/// single-descriptor paths only when this is negotiated.
pub const F_IN_ORDER: u64 = 1 << 35;

/// What a negotiated feature set means for the datapath.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// Raw acked bits.
    pub bits: u64,
}

impl Negotiated {
    /// Whether `bit` was acked.
    pub fn has(&self, bit: u64) -> bool {
        self.bits & bit == bit
    }

    /// Length of the virtio-net header this guest uses: 12 bytes with VERSION_1 or
    /// MRG_RXBUF (it carries num_buffers), 10 in legacy mode.
    pub fn net_hdr_len(&self) -> u8 {
        if self.has(F_VERSION_1) || self.has(NET_F_MRG_RXBUF) {
            12
        } else {
            10
        }
    }

    /// Names of the acked bits, for `vswitch ctl ports`.
    pub fn names(&self) -> Vec<&'static str> {
        const NAMES: &[(u64, &str)] = &[
            (NET_F_CSUM, "CSUM"),
            (NET_F_GUEST_CSUM, "GUEST_CSUM"),
            (NET_F_GUEST_TSO4, "GUEST_TSO4"),
            (NET_F_GUEST_TSO6, "GUEST_TSO6"),
            (NET_F_GUEST_ECN, "GUEST_ECN"),
            (NET_F_HOST_TSO4, "HOST_TSO4"),
            (NET_F_HOST_TSO6, "HOST_TSO6"),
            (NET_F_HOST_ECN, "HOST_ECN"),
            (NET_F_MAC, "MAC"),
            (NET_F_MRG_RXBUF, "MRG_RXBUF"),
            (NET_F_STATUS, "STATUS"),
            (NET_F_CTRL_VQ, "CTRL_VQ"),
            (NET_F_MQ, "MQ"),
            (F_ANY_LAYOUT, "ANY_LAYOUT"),
            (RING_F_INDIRECT_DESC, "INDIRECT_DESC"),
            (RING_F_EVENT_IDX, "EVENT_IDX"),
            (VHOST_USER_F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
            (F_VERSION_1, "VERSION_1"),
            (F_ACCESS_PLATFORM, "ACCESS_PLATFORM"),
            (F_IN_ORDER, "IN_ORDER"),
        ];
        NAMES.iter().filter(|(b, _)| self.has(*b)).map(|(_, n)| *n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_header_length_follows_features() {
        assert_eq!(Negotiated { bits: 0 }.net_hdr_len(), 10);
        assert_eq!(Negotiated { bits: NET_F_MRG_RXBUF }.net_hdr_len(), 12);
        assert_eq!(Negotiated { bits: F_VERSION_1 }.net_hdr_len(), 12);
    }
}
