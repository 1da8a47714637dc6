//! Feature bits the switch offers. The bits themselves, and what a negotiated set means, are
//! `virtq`'s ([`virtq::features`], re-exported here).
//!
//! Offered: only what the datapath implements. The checksum and TCP segmentation offloads
//! ([`OFFLOADS`]) are offered unless a port turns them off ([`offered`]); what they mean for
//! each packet is in [`crate::offload`].

pub use virtq::features::*;

/// The offloads: checksum both ways, TCP segmentation both ways (with ECN).
pub const OFFLOADS: u64 = NET_F_CSUM
    | NET_F_GUEST_CSUM
    | NET_F_GUEST_TSO4
    | NET_F_GUEST_TSO6
    | NET_F_GUEST_ECN
    | NET_F_HOST_TSO4
    | NET_F_HOST_TSO6
    | NET_F_HOST_ECN;

/// What a port offers its frontend: everything, less the offloads when they are off and
/// packed rings unless they are on.
pub const fn offered(offloads: bool, packed: bool) -> u64 {
    let mut f = OFFERED;
    if !offloads {
        f &= !OFFLOADS;
    }
    if !packed {
        f &= !F_RING_PACKED;
    }
    f
}

/// Everything the switch offers to a frontend.
pub const OFFERED: u64 = OFFLOADS
    | NET_F_MAC
    | NET_F_MRG_RXBUF
    | NET_F_STATUS
    | NET_F_CTRL_VQ
    | NET_F_MQ
    | F_ANY_LAYOUT
    | RING_F_INDIRECT_DESC
    | RING_F_EVENT_IDX
    | VHOST_USER_F_PROTOCOL_FEATURES
    | VHOST_F_LOG_ALL
    | F_VERSION_1
    | F_ACCESS_PLATFORM
    | F_RING_PACKED
    | F_IN_ORDER;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_packed_rings_offered_only_when_turned_on() {
        assert_eq!(offered(true, false) & F_RING_PACKED, 0);
        assert_eq!(offered(true, true) & F_RING_PACKED, F_RING_PACKED);
        assert_eq!(offered(true, true) & !F_RING_PACKED, offered(true, false));
    }

    #[test]
    fn test_offloads_offered_unless_turned_off() {
        assert_eq!(offered(true, true) & OFFLOADS, OFFLOADS);
        // Without offloads: CSUM(0), GUEST_CSUM(1), GUEST/HOST TSO and ECN, UFO(10, 14) never.
        for bit in [0, 1, 7, 8, 9, 10, 11, 12, 13, 14] {
            assert_eq!(offered(false, true) & (1 << bit), 0, "bit {bit} offered with offloads off");
        }
        for bit in [10, 14] {
            assert_eq!(offered(true, true) & (1 << bit), 0, "UFO offered without an implementation");
        }
    }
}
