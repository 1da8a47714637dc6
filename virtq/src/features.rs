//! Feature bits, as masks of the 64-bit feature word, and what a negotiated set means for a
//! device's datapath.
//!
//! One copy for the workspace: the switch, the frontends and the NIC models take their bits
//! from here. What the switch chooses to offer is the switch's business (`vswitch::virtio::features`).

use virtio_bindings::{virtio_config, virtio_net, virtio_ring};

/// `VIRTIO_NET_F_CSUM`: the guest may leave checksums for the device to complete.
pub const NET_F_CSUM: u64 = 1 << virtio_net::VIRTIO_NET_F_CSUM;
/// `VIRTIO_NET_F_GUEST_CSUM`: the guest takes packets with partial checksums.
pub const NET_F_GUEST_CSUM: u64 = 1 << virtio_net::VIRTIO_NET_F_GUEST_CSUM;
/// `VIRTIO_NET_F_GUEST_TSO4`: the guest takes TCPv4 frames of up to 64 KiB.
pub const NET_F_GUEST_TSO4: u64 = 1 << virtio_net::VIRTIO_NET_F_GUEST_TSO4;
/// `VIRTIO_NET_F_GUEST_TSO6`: the same for TCPv6.
pub const NET_F_GUEST_TSO6: u64 = 1 << virtio_net::VIRTIO_NET_F_GUEST_TSO6;
/// `VIRTIO_NET_F_GUEST_ECN`: the guest takes TSO frames of ECN flows.
pub const NET_F_GUEST_ECN: u64 = 1 << virtio_net::VIRTIO_NET_F_GUEST_ECN;
/// `VIRTIO_NET_F_HOST_TSO4`: the guest may send TCPv4 frames of up to 64 KiB to be segmented.
pub const NET_F_HOST_TSO4: u64 = 1 << virtio_net::VIRTIO_NET_F_HOST_TSO4;
/// `VIRTIO_NET_F_HOST_TSO6`: the same for TCPv6.
pub const NET_F_HOST_TSO6: u64 = 1 << virtio_net::VIRTIO_NET_F_HOST_TSO6;
/// `VIRTIO_NET_F_HOST_ECN`: the guest may send TSO frames of ECN flows.
pub const NET_F_HOST_ECN: u64 = 1 << virtio_net::VIRTIO_NET_F_HOST_ECN;
/// `VIRTIO_NET_F_MAC`: the device has a MAC address in config space.
pub const NET_F_MAC: u64 = 1 << virtio_net::VIRTIO_NET_F_MAC;
/// `VIRTIO_NET_F_MRG_RXBUF`: a received packet may span several buffers.
pub const NET_F_MRG_RXBUF: u64 = 1 << virtio_net::VIRTIO_NET_F_MRG_RXBUF;
/// `VIRTIO_NET_F_STATUS`: link status in config space.
pub const NET_F_STATUS: u64 = 1 << virtio_net::VIRTIO_NET_F_STATUS;
/// `VIRTIO_NET_F_CTRL_VQ`: control queue (served by the frontend, as QEMU and virtio-user do).
pub const NET_F_CTRL_VQ: u64 = 1 << virtio_net::VIRTIO_NET_F_CTRL_VQ;
/// `VIRTIO_NET_F_MQ`: several queue pairs.
pub const NET_F_MQ: u64 = 1 << virtio_net::VIRTIO_NET_F_MQ;
/// `VIRTIO_F_ANY_LAYOUT` (legacy): header and frame may share or split buffers freely.
pub const F_ANY_LAYOUT: u64 = 1 << virtio_config::VIRTIO_F_ANY_LAYOUT;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const RING_F_INDIRECT_DESC: u64 = 1 << virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const RING_F_EVENT_IDX: u64 = 1 << virtio_ring::VIRTIO_RING_F_EVENT_IDX;
/// `VHOST_USER_F_PROTOCOL_FEATURES`: the vhost-user protocol's bit in the virtio feature word
/// (the vhost-user spec's, not virtio's: `virtio-bindings` does not have it).
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VHOST_F_LOG_ALL`: the backend marks every page it writes in the frontend's dirty log
/// (acked by the frontend only while it migrates the guest).
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
/// `VIRTIO_F_ACCESS_PLATFORM` (once `IOMMU_PLATFORM`): the guest's addresses are IOVAs behind
/// its vIOMMU, translated through the vhost-user IOTLB (QEMU acks it only when the device
/// really sits behind a vIOMMU).
pub const F_ACCESS_PLATFORM: u64 = 1 << virtio_config::VIRTIO_F_ACCESS_PLATFORM;
/// `VIRTIO_F_IN_ORDER`: buffers are used in the order they were made available. (The switch's
/// datapath always does so, malformed buffers included, and DPDK's virtio-user takes its fast
/// single-descriptor paths only when this is negotiated.)
pub const F_IN_ORDER: u64 = 1 << virtio_config::VIRTIO_F_IN_ORDER;

/// `VIRTIO_F_RING_PACKED`: the queues are packed rings (virtio 1.1), not split ones.
pub const F_RING_PACKED: u64 = 1 << virtio_config::VIRTIO_F_RING_PACKED;

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
            (VHOST_F_LOG_ALL, "LOG_ALL"),
            (F_VERSION_1, "VERSION_1"),
            (F_ACCESS_PLATFORM, "ACCESS_PLATFORM"),
            (F_RING_PACKED, "RING_PACKED"),
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

    #[test]
    fn test_bits_are_the_spec_numbers() {
        let bits = [
            (NET_F_CSUM, 0),
            (NET_F_GUEST_CSUM, 1),
            (NET_F_MAC, 5),
            (NET_F_GUEST_TSO4, 7),
            (NET_F_GUEST_TSO6, 8),
            (NET_F_GUEST_ECN, 9),
            (NET_F_HOST_TSO4, 11),
            (NET_F_HOST_TSO6, 12),
            (NET_F_HOST_ECN, 13),
            (NET_F_MRG_RXBUF, 15),
            (NET_F_STATUS, 16),
            (NET_F_CTRL_VQ, 17),
            (NET_F_MQ, 22),
            (F_ANY_LAYOUT, 27),
            (RING_F_INDIRECT_DESC, 28),
            (RING_F_EVENT_IDX, 29),
            (VHOST_USER_F_PROTOCOL_FEATURES, 30),
            (F_VERSION_1, 32),
            (F_ACCESS_PLATFORM, 33),
            (F_RING_PACKED, 34),
            (F_IN_ORDER, 35),
        ];
        for (mask, bit) in bits {
            assert_eq!(mask, 1 << bit, "bit {bit}");
        }
    }
}
