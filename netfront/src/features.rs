//! virtio and vhost-user feature bits as masks, taken from `virtio-bindings` and the vhost
//! crate (one copy of each number), and their names for logs.

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_config as config;
use virtio_bindings::virtio_net as net;
use virtio_bindings::virtio_ring as ring;

/// `VIRTIO_NET_F_CSUM`: the device takes partially checksummed frames.
pub const VIRTIO_NET_F_CSUM: u64 = 1 << net::VIRTIO_NET_F_CSUM;
/// `VIRTIO_NET_F_GUEST_CSUM`: the driver takes partially checksummed frames.
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << net::VIRTIO_NET_F_GUEST_CSUM;
/// `VIRTIO_NET_F_MAC`: the config space holds the MAC.
pub const VIRTIO_NET_F_MAC: u64 = 1 << net::VIRTIO_NET_F_MAC;
/// `VIRTIO_NET_F_GUEST_TSO4`.
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << net::VIRTIO_NET_F_GUEST_TSO4;
/// `VIRTIO_NET_F_GUEST_TSO6`.
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << net::VIRTIO_NET_F_GUEST_TSO6;
/// `VIRTIO_NET_F_GUEST_ECN`.
pub const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << net::VIRTIO_NET_F_GUEST_ECN;
/// `VIRTIO_NET_F_HOST_TSO4`.
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << net::VIRTIO_NET_F_HOST_TSO4;
/// `VIRTIO_NET_F_HOST_TSO6`.
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << net::VIRTIO_NET_F_HOST_TSO6;
/// `VIRTIO_NET_F_HOST_ECN`.
pub const VIRTIO_NET_F_HOST_ECN: u64 = 1 << net::VIRTIO_NET_F_HOST_ECN;
/// `VIRTIO_NET_F_MRG_RXBUF`.
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << net::VIRTIO_NET_F_MRG_RXBUF;
/// `VIRTIO_NET_F_MQ`.
pub const VIRTIO_NET_F_MQ: u64 = 1 << net::VIRTIO_NET_F_MQ;
/// `VIRTIO_F_ANY_LAYOUT` (legacy devices).
pub const VIRTIO_F_ANY_LAYOUT: u64 = 1 << config::VIRTIO_F_ANY_LAYOUT;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << ring::VIRTIO_RING_F_INDIRECT_DESC;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << ring::VIRTIO_RING_F_EVENT_IDX;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << config::VIRTIO_F_VERSION_1;
/// `VIRTIO_F_ACCESS_PLATFORM` (the device sits behind a vIOMMU).
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << config::VIRTIO_F_ACCESS_PLATFORM;

/// Names of the virtio feature bits this crate knows, joined with `|` (for logs and test
/// messages).
pub fn feature_names(features: u64) -> String {
    let names = [
        (VIRTIO_NET_F_CSUM, "CSUM"),
        (VIRTIO_NET_F_GUEST_CSUM, "GUEST_CSUM"),
        (VIRTIO_NET_F_MAC, "MAC"),
        (VIRTIO_NET_F_GUEST_TSO4, "GUEST_TSO4"),
        (VIRTIO_NET_F_GUEST_TSO6, "GUEST_TSO6"),
        (VIRTIO_NET_F_GUEST_ECN, "GUEST_ECN"),
        (VIRTIO_NET_F_HOST_TSO4, "HOST_TSO4"),
        (VIRTIO_NET_F_HOST_TSO6, "HOST_TSO6"),
        (VIRTIO_NET_F_HOST_ECN, "HOST_ECN"),
        (VIRTIO_NET_F_MRG_RXBUF, "MRG_RXBUF"),
        (VIRTIO_NET_F_MQ, "MQ"),
        (VIRTIO_F_ANY_LAYOUT, "ANY_LAYOUT"),
        (VIRTIO_RING_F_INDIRECT_DESC, "INDIRECT_DESC"),
        (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
        (VHOST_USER_F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
        (VIRTIO_F_VERSION_1, "VERSION_1"),
        (VIRTIO_F_ACCESS_PLATFORM, "ACCESS_PLATFORM"),
    ];
    names.iter().filter(|(b, _)| features & b != 0).map(|(_, n)| *n).collect::<Vec<_>>().join("|")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_match_the_virtio_spec() {
        assert_eq!(VIRTIO_NET_F_MAC, 1 << 5);
        assert_eq!(VIRTIO_NET_F_MRG_RXBUF, 1 << 15);
        assert_eq!(VIRTIO_NET_F_MQ, 1 << 22);
        assert_eq!(VIRTIO_F_ANY_LAYOUT, 1 << 27);
        assert_eq!(VIRTIO_RING_F_INDIRECT_DESC, 1 << 28);
        assert_eq!(VIRTIO_RING_F_EVENT_IDX, 1 << 29);
        assert_eq!(VHOST_USER_F_PROTOCOL_FEATURES, 1 << 30);
        assert_eq!(VIRTIO_F_VERSION_1, 1 << 32);
        assert_eq!(VIRTIO_F_ACCESS_PLATFORM, 1 << 33);
    }

    #[test]
    fn feature_names_lists_known_bits_only() {
        assert_eq!(feature_names(VIRTIO_NET_F_MAC | VIRTIO_F_VERSION_1 | (1 << 60)), "MAC|VERSION_1");
        assert_eq!(feature_names(0), "");
    }
}
