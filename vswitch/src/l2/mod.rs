//! Layer 2: the forwarding table, VLAN rules and the frame fields decisions read.

pub mod fdb;
pub mod flow;
pub mod vlan;

pub use fdb::{Fdb, FdbEntry};
pub use vlan::{TagEdit, VlanMode};

/// A MAC address packed into the low 48 bits (first octet most significant).
pub type Mac = u64;

/// Packs six octets.
#[inline(always)]
pub fn mac_from_bytes(b: [u8; 6]) -> Mac {
    u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]])
}

/// Unpacks into six octets.
pub fn mac_to_bytes(m: Mac) -> [u8; 6] {
    let b = m.to_be_bytes();
    [b[2], b[3], b[4], b[5], b[6], b[7]]
}

/// Group (multicast or broadcast) address: the I/G bit of the first octet.
#[inline(always)]
pub fn is_group(m: Mac) -> bool {
    m & (1 << 40) != 0
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(m: Mac) -> String {
    let b = mac_to_bytes(m);
    format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for o in out.iter_mut() {
        *o = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_mac_round_trip_and_group_bit() {
        let m = parse_mac("01:00:5e:00:00:fb").unwrap();
        assert!(is_group(mac_from_bytes(m)));
        assert_eq!(mac_to_bytes(mac_from_bytes(m)), m);
        assert!(!is_group(mac_from_bytes(parse_mac("52:54:00:12:34:56").unwrap())));
        assert!(is_group(mac_from_bytes([0xff; 6])));
        assert_eq!(format_mac(mac_from_bytes(m)), "01:00:5e:00:00:fb");
        assert!(parse_mac("01:00:5e:00:00").is_none());
        assert!(parse_mac("01:00:5e:00:00:fb:00").is_none());
    }
}
