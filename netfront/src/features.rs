//! virtio and vhost-user feature bits as masks under their spec names (virtq's, the
//! workspace's one copy, made from `virtio-bindings`), and their names for logs.

/// `VIRTIO_F_ACCESS_PLATFORM` (the device sits behind a vIOMMU).
pub use virtq::features::F_ACCESS_PLATFORM as VIRTIO_F_ACCESS_PLATFORM;
/// `VIRTIO_F_ANY_LAYOUT` (legacy devices).
pub use virtq::features::F_ANY_LAYOUT as VIRTIO_F_ANY_LAYOUT;
/// `VIRTIO_F_VERSION_1`.
pub use virtq::features::F_VERSION_1 as VIRTIO_F_VERSION_1;
/// `VIRTIO_NET_F_CSUM`: the device takes partially checksummed frames.
pub use virtq::features::NET_F_CSUM as VIRTIO_NET_F_CSUM;
/// `VIRTIO_NET_F_GUEST_CSUM`: the driver takes partially checksummed frames.
pub use virtq::features::NET_F_GUEST_CSUM as VIRTIO_NET_F_GUEST_CSUM;
/// `VIRTIO_NET_F_GUEST_ECN`.
pub use virtq::features::NET_F_GUEST_ECN as VIRTIO_NET_F_GUEST_ECN;
/// `VIRTIO_NET_F_GUEST_TSO4`.
pub use virtq::features::NET_F_GUEST_TSO4 as VIRTIO_NET_F_GUEST_TSO4;
/// `VIRTIO_NET_F_GUEST_TSO6`.
pub use virtq::features::NET_F_GUEST_TSO6 as VIRTIO_NET_F_GUEST_TSO6;
/// `VIRTIO_NET_F_HOST_ECN`.
pub use virtq::features::NET_F_HOST_ECN as VIRTIO_NET_F_HOST_ECN;
/// `VIRTIO_NET_F_HOST_TSO4`.
pub use virtq::features::NET_F_HOST_TSO4 as VIRTIO_NET_F_HOST_TSO4;
/// `VIRTIO_NET_F_HOST_TSO6`.
pub use virtq::features::NET_F_HOST_TSO6 as VIRTIO_NET_F_HOST_TSO6;
/// `VIRTIO_NET_F_MAC`: the config space holds the MAC.
pub use virtq::features::NET_F_MAC as VIRTIO_NET_F_MAC;
/// `VIRTIO_NET_F_MQ`.
pub use virtq::features::NET_F_MQ as VIRTIO_NET_F_MQ;
/// `VIRTIO_NET_F_MRG_RXBUF`.
pub use virtq::features::NET_F_MRG_RXBUF as VIRTIO_NET_F_MRG_RXBUF;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub use virtq::features::RING_F_EVENT_IDX as VIRTIO_RING_F_EVENT_IDX;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub use virtq::features::RING_F_INDIRECT_DESC as VIRTIO_RING_F_INDIRECT_DESC;
/// `VHOST_F_LOG_ALL` (acked while migrating).
pub use virtq::features::VHOST_F_LOG_ALL;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub use virtq::features::VHOST_USER_F_PROTOCOL_FEATURES;

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
