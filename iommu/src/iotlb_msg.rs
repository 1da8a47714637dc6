//! The vhost-user IOTLB message on the wire, for both ends (the switch decodes updates and
//! invalidations and encodes misses; a frontend the other way round): after the 12-byte
//! vhost-user header, `struct vhost_iotlb_msg { u64 iova; u64 size; u64 uaddr; u8 perm;
//! u8 type; }`, 32 bytes with padding (vhost-user spec, "IOTLB message").

use crate::Perm;

/// Payload bytes of an IOTLB message.
pub const IOTLB_MSG_LEN: usize = 32;
/// `VHOST_IOTLB_MISS`: backend → frontend, "translate this".
pub const IOTLB_MISS: u8 = 1;
/// `VHOST_IOTLB_UPDATE`: frontend → backend, a translation.
pub const IOTLB_UPDATE: u8 = 2;
/// `VHOST_IOTLB_INVALIDATE`: frontend → backend, forget a range.
pub const IOTLB_INVALIDATE: u8 = 3;
/// `VHOST_IOTLB_ACCESS_FAIL`: backend → frontend, an access was refused.
pub const IOTLB_ACCESS_FAIL: u8 = 4;
/// `VHOST_ACCESS_RO`, `_WO`, `_RW`.
pub const ACCESS_RO: u8 = 1;
/// See [`ACCESS_RO`].
pub const ACCESS_WO: u8 = 2;
/// See [`ACCESS_RO`].
pub const ACCESS_RW: u8 = 3;
/// One `vhost_iotlb_msg`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbMsg {
    /// IOVA.
    pub iova: u64,
    /// Bytes.
    pub size: u64,
    /// Frontend virtual address.
    pub uaddr: u64,
    /// `VHOST_ACCESS_*`.
    pub perm: u8,
    /// `VHOST_IOTLB_*`.
    pub kind: u8,
}

impl IotlbMsg {
    /// Decodes a payload (exactly [`IOTLB_MSG_LEN`] bytes).
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b: &[u8; IOTLB_MSG_LEN] = b.try_into().ok()?;
        let q = |i: usize| {
            u64::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3], b[i + 4], b[i + 5], b[i + 6], b[i + 7]])
        };
        Some(IotlbMsg { iova: q(0), size: q(8), uaddr: q(16), perm: b[24], kind: b[25] })
    }

    /// Encodes a payload.
    pub fn encode(&self) -> [u8; IOTLB_MSG_LEN] {
        let mut b = [0u8; IOTLB_MSG_LEN];
        b[0..8].copy_from_slice(&self.iova.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.uaddr.to_le_bytes());
        b[24] = self.perm;
        b[25] = self.kind;
        b
    }

    /// The permission of an update, if it is a valid `VHOST_ACCESS_*` value.
    pub fn perm(&self) -> Option<Perm> {
        match self.perm {
            ACCESS_RO => Some(Perm::RO),
            ACCESS_WO => Some(Perm::WO),
            ACCESS_RW => Some(Perm::RW),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_msg_round_trip() {
        let m = IotlbMsg {
            iova: 0x1000,
            size: 0x2000,
            uaddr: 0x7f00_0000_0000,
            perm: ACCESS_RW,
            kind: IOTLB_UPDATE,
        };
        assert_eq!(IotlbMsg::decode(&m.encode()), Some(m));
        assert_eq!(IotlbMsg::decode(&[0u8; 26]), None, "short payload");
        assert_eq!(m.perm(), Some(Perm::RW));
        assert_eq!(IotlbMsg { perm: 0, ..m }.perm(), None);
    }
}
