//! Anti-spoofing: a guest may only send from its own MAC and IP addresses.
//!
//! Checked on the frame's first bytes, read in place from the sender's memory before any copy:
//! - the source MAC must be an allowed one (a group address never is);
//! - with IP checking on, only IPv4, IPv6 and ARP frames pass (one 802.1Q tag is looked
//!   through), and:
//!   - IPv4: the source is allowed, or 0.0.0.0 for a DHCP client (UDP 68 → 67);
//!   - IPv6: the source is allowed, or `::` for the messages a host sends before it has an
//!     address (router solicitation, neighbour solicitation for DAD, MLD reports);
//!   - ARP: the sender MAC is allowed (always) and the sender IP is allowed or 0.0.0.0 (probe);
//!   - neighbour discovery: a solicitation's source link-layer option and an advertisement's
//!     target address and target link-layer option name allowed addresses (an NA is how a
//!     guest would claim someone else's IPv6 address).
//!
//! Without IP checking only the MAC rules apply (the ARP sender MAC included).

use super::error::PolicyError;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::l2::{mac_from_bytes, parse_mac, Mac};

/// Anti-spoofing settings of a port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoofConfig {
    /// Source MACs the guest may use; empty means the port's own MAC.
    #[serde(default)]
    pub macs: Vec<String>,
    /// Source addresses or prefixes (`10.0.0.5`, `fd00::/64`) the guest may use. Absent: IP
    /// sources are not checked. Empty: no IP traffic is allowed.
    #[serde(default)]
    pub ips: Option<Vec<String>>,
}

/// Why a frame was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpoofReason {
    /// Source MAC not allowed.
    Mac,
    /// IPv4/IPv6 source not allowed (or the header is too short to tell).
    Ip,
    /// ARP sender MAC or IP not allowed, or malformed ARP.
    Arp,
    /// Neighbour-discovery address or link-layer option not allowed.
    Nd,
    /// Not IPv4, IPv6 or ARP while IP checking is on.
    Ethertype,
}

/// What the check needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed.
    Pass,
    /// Refused.
    Drop(SpoofReason),
    /// Give me the frame's first `n` bytes (a neighbour-discovery message longer than the
    /// usual prefix).
    NeedBytes(usize),
}

/// Bytes of a frame that almost every check needs (IPv4, IPv6 and ARP sources, VLAN tag
/// included).
pub const PREFIX: usize = 64;
/// The longest look the check takes: a neighbour advertisement or solicitation with its
/// options. A frame whose checked part is longer is refused.
pub const MAX_LOOK: usize = 128;

const ETH_IPV4: u16 = 0x0800;
const ETH_ARP: u16 = 0x0806;
const ETH_IPV6: u16 = 0x86dd;
const ETH_VLAN: u16 = 0x8100;

/// A compiled filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoofFilter {
    macs: Vec<Mac>,
    ips: Option<IpRules>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct IpRules {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl IpRules {
    fn v4_ok(&self, a: u32) -> bool {
        self.v4.iter().any(|&(net, mask)| a & mask == net)
    }
    fn v6_ok(&self, a: u128) -> bool {
        self.v6.iter().any(|&(net, mask)| a & mask == net)
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be128(b: &[u8], at: usize) -> Option<u128> {
    Some(u128::from_be_bytes(b.get(at..at + 16)?.try_into().ok()?))
}
fn mac_at(b: &[u8], at: usize) -> Option<Mac> {
    Some(mac_from_bytes(b.get(at..at + 6)?.try_into().ok()?))
}

/// Parses `addr` or `addr/len`.
fn parse_prefix(s: &str) -> Result<(IpAddr, u8), PolicyError> {
    let (a, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u8>().map_err(|_| PolicyError::BadPrefixLen(s.to_string()))?)),
        None => (s, None),
    };
    let ip: IpAddr = a.parse().map_err(|_| PolicyError::BadIp(s.to_string()))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    if len > max {
        return Err(PolicyError::PrefixTooLong { text: s.to_string(), len, max });
    }
    Ok((ip, len))
}

impl SpoofFilter {
    /// Compiles settings; `port_mac` is the default allowed MAC.
    pub fn new(cfg: &SpoofConfig, port_mac: [u8; 6]) -> Result<Self, PolicyError> {
        let mut macs = Vec::new();
        for m in &cfg.macs {
            let b = parse_mac(m).ok_or_else(|| PolicyError::BadMac(m.clone()))?;
            if b[0] & 1 != 0 {
                return Err(PolicyError::GroupMac(m.clone()));
            }
            macs.push(mac_from_bytes(b));
        }
        if macs.is_empty() {
            macs.push(mac_from_bytes(port_mac));
        }
        let ips = match &cfg.ips {
            None => None,
            Some(list) => {
                let mut r = IpRules::default();
                for s in list {
                    match parse_prefix(s)? {
                        (IpAddr::V4(a), len) => {
                            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                            r.v4.push((u32::from(a) & mask, mask));
                        }
                        (IpAddr::V6(a), len) => {
                            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
                            r.v6.push((u128::from(a) & mask, mask));
                        }
                    }
                }
                Some(r)
            }
        };
        Ok(SpoofFilter { macs, ips })
    }

    #[inline(always)]
    fn mac_ok(&self, m: Mac) -> bool {
        self.macs.contains(&m)
    }

    /// Checks a frame, given its first bytes `b` (at least `min(len, PREFIX)` of them).
    #[inline]
    pub fn check(&self, b: &[u8]) -> Verdict {
        use SpoofReason::*;
        match mac_at(b, 6) {
            Some(src) if self.mac_ok(src) => {}
            _ => return Verdict::Drop(Mac),
        }
        let mut l3 = 14;
        let mut ethertype = be16(b, 12).unwrap_or(0);
        if ethertype == ETH_VLAN {
            ethertype = be16(b, 16).unwrap_or(0);
            l3 = 18;
        }
        match ethertype {
            ETH_ARP => self.check_arp(b, l3),
            _ if self.ips.is_none() => Verdict::Pass,
            ETH_IPV4 => self.check_v4(b, l3),
            ETH_IPV6 => self.check_v6(b, l3),
            _ => Verdict::Drop(Ethertype),
        }
    }

    fn check_arp(&self, b: &[u8], l3: usize) -> Verdict {
        // htype 1, ptype IPv4, hlen 6, plen 4; sender MAC at 8, sender IP at 14.
        let ok_shape = be16(b, l3) == Some(1)
            && be16(b, l3 + 2) == Some(ETH_IPV4)
            && b.get(l3 + 4) == Some(&6)
            && b.get(l3 + 5) == Some(&4);
        let (Some(sha), Some(spa)) = (mac_at(b, l3 + 8), be32(b, l3 + 14)) else {
            return Verdict::Drop(SpoofReason::Arp);
        };
        if !ok_shape || !self.mac_ok(sha) {
            return Verdict::Drop(SpoofReason::Arp);
        }
        match &self.ips {
            Some(r) if spa != 0 && !r.v4_ok(spa) => Verdict::Drop(SpoofReason::Arp),
            _ => Verdict::Pass,
        }
    }

    #[inline]
    fn check_v4(&self, b: &[u8], l3: usize) -> Verdict {
        let Some(rules) = &self.ips else { return Verdict::Pass };
        let (Some(&vihl), Some(src)) = (b.get(l3), be32(b, l3 + 12)) else {
            return Verdict::Drop(SpoofReason::Ip);
        };
        if vihl >> 4 != 4 || (vihl & 0xf) < 5 {
            return Verdict::Drop(SpoofReason::Ip);
        }
        if rules.v4_ok(src) {
            return Verdict::Pass;
        }
        // A DHCP client has no address yet.
        let l4 = l3 + (vihl & 0xf) as usize * 4;
        let dhcp =
            src == 0 && b.get(l3 + 9) == Some(&17) && be16(b, l4) == Some(68) && be16(b, l4 + 2) == Some(67);
        if dhcp {
            Verdict::Pass
        } else {
            Verdict::Drop(SpoofReason::Ip)
        }
    }

    fn check_v6(&self, b: &[u8], l3: usize) -> Verdict {
        let Some(rules) = &self.ips else { return Verdict::Pass };
        let (Some(&v), Some(mut next), Some(src)) = (b.get(l3), b.get(l3 + 6).copied(), be128(b, l3 + 8))
        else {
            return Verdict::Drop(SpoofReason::Ip);
        };
        if v >> 4 != 6 {
            return Verdict::Drop(SpoofReason::Ip);
        }
        let mut l4 = l3 + 40;
        let hop_by_hop = next == 0;
        if hop_by_hop {
            // Hop-by-hop options (MLD reports carry one): skip it.
            let (Some(&n), Some(&len)) = (b.get(l4), b.get(l4 + 1)) else {
                return Verdict::Drop(SpoofReason::Ip);
            };
            next = n;
            l4 += 8 * (len as usize + 1);
        }
        if next == 58 && b.get(l4).is_none() {
            return Verdict::NeedBytes(l4 + 1);
        }
        let icmp_type = if next == 58 { b.get(l4).copied() } else { None };
        let src_ok = rules.v6_ok(src) || (src == 0 && matches!(icmp_type, Some(133) | Some(135) | Some(143)));
        if !src_ok {
            return Verdict::Drop(SpoofReason::Ip);
        }
        // RFC 4861 ND has no extension headers; behind one, refuse rather than guess.
        match icmp_type {
            Some(135 | 136) if hop_by_hop => Verdict::Drop(SpoofReason::Nd),
            Some(135) => self.check_nd(b, l3, l4, 1),
            Some(136) => match be128(b, l4 + 8) {
                Some(target) if rules.v6_ok(target) => self.check_nd(b, l3, l4, 2),
                Some(_) => Verdict::Drop(SpoofReason::Nd),
                None => Verdict::NeedBytes(l4 + 24),
            },
            _ => Verdict::Pass,
        }
    }

    /// Walks ND options after the 24-byte NS/NA body; the link-layer option of `kind` must name
    /// an allowed MAC.
    fn check_nd(&self, b: &[u8], l3: usize, icmp: usize, kind: u8) -> Verdict {
        // The IPv6 payload length bounds the options.
        let Some(plen) = be16(b, l3 + 4) else { return Verdict::Drop(SpoofReason::Nd) };
        let end = l3 + 40 + plen as usize;
        if b.len() < end {
            return Verdict::NeedBytes(end);
        }
        let mut at = icmp + 24;
        while at + 2 <= end {
            let (t, len) = (b[at], b[at + 1] as usize * 8);
            if len == 0 {
                return Verdict::Drop(SpoofReason::Nd); // RFC 4861: a zero-length option is invalid
            }
            if t == kind {
                match mac_at(b, at + 2) {
                    Some(m) if self.mac_ok(m) => {}
                    _ => return Verdict::Drop(SpoofReason::Nd),
                }
            }
            at += len;
        }
        Verdict::Pass
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const OTHER: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

    fn filter(ips: Option<&[&str]>) -> SpoofFilter {
        let cfg = SpoofConfig { macs: vec![], ips: ips.map(|l| l.iter().map(|s| s.to_string()).collect()) };
        SpoofFilter::new(&cfg, GUEST).unwrap()
    }

    fn eth(src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend(src);
        f.extend(ethertype.to_be_bytes());
        f.extend(payload);
        f
    }

    fn ipv4(src: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
        h.extend(src);
        h.extend([10, 0, 0, 9]);
        h.extend(l4);
        h
    }

    fn udp(sport: u16, dport: u16) -> Vec<u8> {
        let mut u = sport.to_be_bytes().to_vec();
        u.extend(dport.to_be_bytes());
        u.extend([0, 8, 0, 0]);
        u
    }

    fn arp(sha: [u8; 6], spa: [u8; 4]) -> Vec<u8> {
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
        a.extend(sha);
        a.extend(spa);
        a.extend([0; 6]);
        a.extend([10, 0, 0, 9]);
        a
    }

    fn v6(s: &str) -> [u8; 16] {
        s.parse::<std::net::Ipv6Addr>().unwrap().octets()
    }

    fn ipv6(src: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend((payload.len() as u16).to_be_bytes());
        h.extend([next, 255]);
        h.extend(src);
        h.extend(v6("ff02::1"));
        h.extend(payload);
        h
    }

    /// NS (135) or NA (136) with a target and one link-layer option (1 source, 2 target).
    fn nd(ty: u8, target: [u8; 16], opt: Option<(u8, [u8; 6])>) -> Vec<u8> {
        let mut m = vec![ty, 0, 0, 0, 0, 0, 0, 0];
        m.extend(target);
        if let Some((kind, mac)) = opt {
            m.extend([kind, 1]);
            m.extend(mac);
        }
        m
    }

    #[test]
    fn test_source_mac_must_be_allowed() {
        let f = filter(None);
        assert_eq!(f.check(&eth(GUEST, 0x88cc, &[0; 46])), Verdict::Pass);
        assert_eq!(f.check(&eth(OTHER, 0x88cc, &[0; 46])), Verdict::Drop(SpoofReason::Mac));
        let mut group = GUEST;
        group[0] |= 1;
        assert_eq!(f.check(&eth(group, 0x0800, &[0; 46])), Verdict::Drop(SpoofReason::Mac));
        assert_eq!(f.check(&[0u8; 10]), Verdict::Drop(SpoofReason::Mac), "runt");
    }

    #[test]
    fn test_ipv4_source_and_dhcp_exception() {
        let f = filter(Some(&["10.0.0.1", "10.1.0.0/16"]));
        assert_eq!(f.check(&eth(GUEST, ETH_IPV4, &ipv4([10, 0, 0, 1], 6, &[0; 20]))), Verdict::Pass);
        assert_eq!(f.check(&eth(GUEST, ETH_IPV4, &ipv4([10, 1, 200, 3], 6, &[0; 20]))), Verdict::Pass);
        assert_eq!(
            f.check(&eth(GUEST, ETH_IPV4, &ipv4([10, 0, 0, 2], 6, &[0; 20]))),
            Verdict::Drop(SpoofReason::Ip)
        );
        assert_eq!(f.check(&eth(GUEST, ETH_IPV4, &ipv4([0; 4], 17, &udp(68, 67)))), Verdict::Pass, "DHCP");
        assert_eq!(
            f.check(&eth(GUEST, ETH_IPV4, &ipv4([0; 4], 17, &udp(68, 53)))),
            Verdict::Drop(SpoofReason::Ip)
        );
        // Truncated or not IPv4 at all.
        assert_eq!(f.check(&eth(GUEST, ETH_IPV4, &[0x45, 0, 0])), Verdict::Drop(SpoofReason::Ip));
        assert_eq!(
            f.check(&eth(GUEST, ETH_IPV4, &ipv4([10, 0, 0, 1], 6, &[])[..0])),
            Verdict::Drop(SpoofReason::Ip)
        );
    }

    #[test]
    fn test_vlan_tag_is_looked_through() {
        let f = filter(Some(&["10.0.0.1"]));
        let mut tagged = vec![0, 10];
        tagged.extend(ETH_IPV4.to_be_bytes());
        tagged.extend(ipv4([10, 0, 0, 66], 6, &[0; 20]));
        assert_eq!(f.check(&eth(GUEST, ETH_VLAN, &tagged)), Verdict::Drop(SpoofReason::Ip));
    }

    #[test]
    fn test_other_ethertypes_only_without_ip_checking() {
        assert_eq!(
            filter(Some(&[])).check(&eth(GUEST, 0x88cc, &[0; 46])),
            Verdict::Drop(SpoofReason::Ethertype)
        );
        assert_eq!(filter(None).check(&eth(GUEST, 0x88cc, &[0; 46])), Verdict::Pass);
    }

    #[test]
    fn test_arp_sender_must_be_ours() {
        let f = filter(Some(&["10.0.0.1"]));
        assert_eq!(f.check(&eth(GUEST, ETH_ARP, &arp(GUEST, [10, 0, 0, 1]))), Verdict::Pass);
        assert_eq!(f.check(&eth(GUEST, ETH_ARP, &arp(GUEST, [0; 4]))), Verdict::Pass, "probe");
        assert_eq!(
            f.check(&eth(GUEST, ETH_ARP, &arp(OTHER, [10, 0, 0, 1]))),
            Verdict::Drop(SpoofReason::Arp)
        );
        assert_eq!(
            f.check(&eth(GUEST, ETH_ARP, &arp(GUEST, [10, 0, 0, 7]))),
            Verdict::Drop(SpoofReason::Arp)
        );
        assert_eq!(
            f.check(&eth(GUEST, ETH_ARP, &arp(GUEST, [10, 0, 0, 1])[..12])),
            Verdict::Drop(SpoofReason::Arp)
        );
        // Without IP checking the sender MAC still counts.
        assert_eq!(
            filter(None).check(&eth(GUEST, ETH_ARP, &arp(OTHER, [1, 2, 3, 4]))),
            Verdict::Drop(SpoofReason::Arp)
        );
    }

    #[test]
    fn test_ipv6_source_and_unspecified_exceptions() {
        let f = filter(Some(&["fd00::1", "fe80::/64"]));
        let ok = v6("fd00::1");
        assert_eq!(f.check(&eth(GUEST, ETH_IPV6, &ipv6(ok, 17, &udp(1, 2)))), Verdict::Pass);
        assert_eq!(
            f.check(&eth(GUEST, ETH_IPV6, &ipv6(v6("fe80::5054:ff:fe00:1"), 17, &udp(1, 2)))),
            Verdict::Pass
        );
        assert_eq!(
            f.check(&eth(GUEST, ETH_IPV6, &ipv6(v6("fd00::2"), 17, &udp(1, 2)))),
            Verdict::Drop(SpoofReason::Ip)
        );
        // DAD: NS from :: passes, other traffic from :: does not.
        let dad = ipv6([0; 16], 58, &nd(135, ok, None));
        assert_eq!(f.check(&eth(GUEST, ETH_IPV6, &dad)), Verdict::Pass);
        assert_eq!(
            f.check(&eth(GUEST, ETH_IPV6, &ipv6([0; 16], 17, &udp(1, 2)))),
            Verdict::Drop(SpoofReason::Ip)
        );
    }

    #[test]
    fn test_neighbour_discovery_claims_are_checked() {
        let f = filter(Some(&["fd00::1"]));
        let me = v6("fd00::1");
        let na = |target, opt| eth(GUEST, ETH_IPV6, &ipv6(me, 58, &nd(136, target, opt)));
        assert_eq!(f.check(&na(me, Some((2, GUEST)))), Verdict::Pass);
        assert_eq!(
            f.check(&na(v6("fd00::99"), Some((2, GUEST)))),
            Verdict::Drop(SpoofReason::Nd),
            "foreign target"
        );
        assert_eq!(f.check(&na(me, Some((2, OTHER)))), Verdict::Drop(SpoofReason::Nd), "foreign link-layer");
        let ns = |opt| eth(GUEST, ETH_IPV6, &ipv6(me, 58, &nd(135, v6("fd00::7"), opt)));
        assert_eq!(f.check(&ns(Some((1, GUEST)))), Verdict::Pass);
        assert_eq!(f.check(&ns(Some((1, OTHER)))), Verdict::Drop(SpoofReason::Nd));
    }

    #[test]
    fn test_long_advertisement_asks_for_more_bytes() {
        let f = filter(Some(&["fd00::1"]));
        let me = v6("fd00::1");
        // Padding options first push the link-layer option past the usual prefix.
        let mut body = nd(136, me, None);
        for _ in 0..12 {
            body.extend([14, 1, 0, 0, 0, 0, 0, 0]); // nonce-sized filler
        }
        body.extend([2, 1]);
        body.extend(OTHER);
        let frame = eth(GUEST, ETH_IPV6, &ipv6(me, 58, &body));
        assert!(frame.len() > MAX_LOOK);
        assert!(matches!(f.check(&frame[..PREFIX]), Verdict::NeedBytes(_)));
        assert_eq!(f.check(&frame[..MAX_LOOK]), Verdict::NeedBytes(frame.len()));
        assert_eq!(f.check(&frame), Verdict::Drop(SpoofReason::Nd));
        // A usual advertisement fits the longer look.
        let na = eth(GUEST, ETH_IPV6, &ipv6(me, 58, &nd(136, me, Some((2, GUEST)))));
        assert!(na.len() > PREFIX && na.len() <= MAX_LOOK);
        assert!(matches!(f.check(&na[..PREFIX]), Verdict::NeedBytes(_)));
        assert_eq!(f.check(&na), Verdict::Pass);
    }

    #[test]
    fn test_bad_settings_say_what_is_wrong() {
        let bad = |macs: &[&str], ips: &[&str]| {
            let cfg = SpoofConfig {
                macs: macs.iter().map(|s| s.to_string()).collect(),
                ips: Some(ips.iter().map(|s| s.to_string()).collect()),
            };
            SpoofFilter::new(&cfg, GUEST).unwrap_err()
        };
        assert!(bad(&["52:54:00"], &[]).to_string().contains("not of the form"));
        assert!(bad(&["01:00:5e:00:00:01"], &[]).to_string().contains("group address"));
        assert!(bad(&[], &["10.0.0.300"]).to_string().contains("not an IPv4 or IPv6"));
        assert!(bad(&[], &["10.0.0.0/33"]).to_string().contains("longer than 32"));
    }
}
