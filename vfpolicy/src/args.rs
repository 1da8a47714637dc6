//! `N [mac ..] [vlan ..] ...`: the words after `vf` in `ip link set DEV vf ...`,
//! read the way iproute2 6.1's `iplink_parse_vf` reads them (keyword
//! abbreviations, C number syntax, the same checks and error texts).

use crate::error::ParseError;
use crate::types::{LinkState, VfSet, VlanProto, VlanSet};

/// Parses the words after `vf` (`N mac .. vlan ..`) into a [`VfSet`].
///
/// Accepts what iproute2 accepts, with these refusals of its own: an option
/// given twice, `qos` above 7, a MAC that is not 6 bytes, `m`/`ma`, and the
/// options this crate does not implement (`rate`, `node_guid`, `port_guid`).
pub fn parse_vf_args<S: AsRef<str>>(args: &[S]) -> Result<VfSet, ParseError> {
    let mut w = Words { args, pos: 0 };
    let n = w.next().ok_or(ParseError::Incomplete("vf needs N, the VF index"))?;
    let vf = get_integer(n)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| ParseError::InvalidVf(n.to_string()))?;
    let mut set = VfSet { vf, ..VfSet::default() };
    if w.peek().is_none() {
        return Err(ParseError::Incomplete("give at least one VF option after N"));
    }
    while let Some(word) = w.next() {
        parse_option(word, &mut w, &mut set)?;
    }
    if let (Some(max), Some(min)) = (set.max_tx_rate, set.min_tx_rate) {
        check_rates(min, max)?;
    }
    Ok(set)
}

/// iproute2's rate check: a non-zero max must not be below min.
pub(crate) fn check_rates(min: u32, max: u32) -> Result<(), ParseError> {
    if max != 0 && min > max {
        return Err(ParseError::MinAboveMax { min, max });
    }
    Ok(())
}

struct Words<'a, S> {
    args: &'a [S],
    pos: usize,
}

impl<'a, S: AsRef<str>> Words<'a, S> {
    fn next(&mut self) -> Option<&'a str> {
        let w = self.args.get(self.pos)?.as_ref();
        self.pos += 1;
        Some(w)
    }

    fn peek(&self) -> Option<&'a str> {
        self.args.get(self.pos).map(AsRef::as_ref)
    }

    fn value(&mut self, option: &'static str) -> Result<&'a str, ParseError> {
        self.next().ok_or(ParseError::Incomplete(option))
    }
}

/// The option keywords in iproute2's order of testing, which decides what an
/// abbreviation means (`s` is spoofchk, `st` is state).
const KEYWORDS: [&str; 11] = [
    "mac",
    "vlan",
    "rate",
    "max_tx_rate",
    "min_tx_rate",
    "spoofchk",
    "query_rss",
    "trust",
    "state",
    "node_guid",
    "port_guid",
];

fn parse_option<S: AsRef<str>>(word: &str, w: &mut Words<'_, S>, set: &mut VfSet) -> Result<(), ParseError> {
    let Some(key) = KEYWORDS.iter().copied().find(|k| matches(word, k)) else {
        return Err(ParseError::Garbage(word.to_string()));
    };
    if key == "mac" && matches(word, "max_tx_rate") {
        return Err(ParseError::Ambiguous(word.to_string()));
    }
    match key {
        "mac" => {
            let v = w.value("mac needs an address")?;
            put(&mut set.mac, parse_mac(v)?, "mac")
        }
        "vlan" => {
            let vlan = parse_vlan(w)?;
            put(&mut set.vlan, vlan, "vlan")
        }
        "max_tx_rate" => {
            let v = w.value("max_tx_rate needs a rate in Mbit/s")?;
            put(&mut set.max_tx_rate, parse_rate(v, "max tx rate")?, "max_tx_rate")
        }
        "min_tx_rate" => {
            let v = w.value("min_tx_rate needs a rate in Mbit/s")?;
            put(&mut set.min_tx_rate, parse_rate(v, "min tx rate")?, "min_tx_rate")
        }
        "spoofchk" => {
            let v = w.value("spoofchk needs on or off")?;
            put(&mut set.spoofchk, parse_on_off("spoofchk", v)?, "spoofchk")
        }
        "query_rss" => {
            let v = w.value("query_rss needs on or off")?;
            put(&mut set.query_rss, parse_on_off("query_rss", v)?, "query_rss")
        }
        "trust" => {
            let v = w.value("trust needs on or off")?;
            put(&mut set.trust, parse_on_off("trust", v)?, "trust")
        }
        "state" => {
            let v = w.value("state needs auto, enable or disable")?;
            put(&mut set.state, parse_state(v)?, "state")
        }
        "rate" => Err(ParseError::Unsupported("rate", "the legacy IFLA_VF_TX_RATE; use max_tx_rate")),
        _ => Err(ParseError::Unsupported(key, "InfiniBand GUIDs are out of scope")),
    }
}

fn put<T>(slot: &mut Option<T>, v: T, name: &'static str) -> Result<(), ParseError> {
    if slot.is_some() {
        return Err(ParseError::Duplicate(name));
    }
    *slot = Some(v);
    Ok(())
}

/// `vlan VID [qos Q] [proto P]`, qos before proto as in
/// `iplink_parse_vf_vlan_info`.
fn parse_vlan<S: AsRef<str>>(w: &mut Words<'_, S>) -> Result<VlanSet, ParseError> {
    let v = w.value("vlan needs a VLAN id")?;
    let vid =
        get_unsigned(v).filter(|&id| id <= 4095).ok_or_else(|| ParseError::InvalidVlan(v.to_string()))?;
    let mut vlan = VlanSet { vid: vid as u16, qos: 0, proto: VlanProto::Dot1Q };
    if w.peek().is_some_and(|x| matches(x, "qos")) {
        w.next();
        let q = w.value("qos needs a priority 0-7")?;
        vlan.qos =
            get_unsigned(q).filter(|&p| p <= 7).ok_or_else(|| ParseError::InvalidQos(q.to_string()))? as u8;
    }
    if w.peek().is_some_and(|x| matches(x, "proto")) {
        w.next();
        let p = w.value("proto needs 802.1Q or 802.1ad")?;
        vlan.proto = parse_proto(p)?;
    }
    // iproute2 reads further `vlan` words into the same IFLA_VF_VLAN_LIST,
    // which the kernel caps at one entry.
    if vlan.proto != VlanProto::Dot1Q && w.peek().is_some_and(|x| matches(x, "vlan")) {
        return Err(ParseError::Duplicate("vlan"));
    }
    Ok(vlan)
}

/// `ll_proto_a2n`: a name from iproute2's table (case-insensitive) or a
/// number; only the two VLAN protocols are allowed.
fn parse_proto(p: &str) -> Result<VlanProto, ParseError> {
    let id = if p.eq_ignore_ascii_case("802.1Q") {
        0x8100
    } else if p.eq_ignore_ascii_case("802.1ad") {
        0x88a8
    } else if let Some(n) = get_unsigned(p).filter(|&n| n <= 0xffff) {
        n
    } else if OTHER_PROTOCOLS.iter().any(|n| n.eq_ignore_ascii_case(p)) {
        0
    } else {
        return Err(ParseError::InvalidProto(p.to_string()));
    };
    match id {
        0x8100 => Ok(VlanProto::Dot1Q),
        0x88a8 => Ok(VlanProto::Dot1AD),
        _ => Err(ParseError::UnsupportedProto(p.to_string())),
    }
}

/// The rest of iproute2's `llproto_names`: valid protocols, but not VLAN ones.
const OTHER_PROTOCOLS: [&str; 53] = [
    "loop",
    "pup",
    "pupat",
    "ip",
    "x25",
    "arp",
    "bpq",
    "ieeepup",
    "ieeepupat",
    "dec",
    "dna_dl",
    "dna_rc",
    "dna_rt",
    "lat",
    "diag",
    "cust",
    "sca",
    "rarp",
    "atalk",
    "aarp",
    "ipx",
    "ipv6",
    "ppp_disc",
    "ppp_ses",
    "atmmpoa",
    "atmfate",
    "802_3",
    "ax25",
    "all",
    "802_2",
    "snap",
    "ddcmp",
    "wan_ppp",
    "ppp_mp",
    "localtalk",
    "can",
    "ppptalk",
    "tr_802_2",
    "mobitex",
    "control",
    "irda",
    "econet",
    "tipc",
    "profinet",
    "aoe",
    "ethercat",
    "mpls_uc",
    "mpls_mc",
    "teb",
    "LLDP",
    "ipv4",
    "802.1Q",
    "802.1ad",
];

fn parse_rate(v: &str, what: &'static str) -> Result<u32, ParseError> {
    get_unsigned(v).ok_or_else(|| ParseError::InvalidRate { what, value: v.to_string() })
}

/// `parse_on_off`: a prefix of `off` or of `on` (`o` is off).
fn parse_on_off(option: &'static str, v: &str) -> Result<bool, ParseError> {
    if matches(v, "off") {
        Ok(false)
    } else if matches(v, "on") {
        Ok(true)
    } else {
        Err(ParseError::OnOff { option, value: v.to_string() })
    }
}

fn parse_state(v: &str) -> Result<LinkState, ParseError> {
    if matches(v, "auto") {
        Ok(LinkState::Auto)
    } else if matches(v, "enable") {
        Ok(LinkState::Enable)
    } else if matches(v, "disable") {
        Ok(LinkState::Disable)
    } else {
        Err(ParseError::InvalidState(v.to_string()))
    }
}

/// `ll_addr_a2n`: colon-separated pieces each read by `sscanf("%x")`, so a
/// piece may carry `0x` and trailing junk; a dotted quad is a 4-byte address.
fn parse_mac(v: &str) -> Result<[u8; 6], ParseError> {
    if v.contains('.') {
        let ok = v.parse::<std::net::Ipv4Addr>().is_ok();
        return Err(if ok { ParseError::MacLength(4) } else { ParseError::InvalidMac(v.to_string()) });
    }
    let mut bytes = Vec::with_capacity(6);
    for piece in v.split(':').take(32) {
        let b = scan_hex(piece)
            .filter(|b| (0..=255).contains(b))
            .ok_or_else(|| ParseError::InvalidMac(piece.to_string()))?;
        bytes.push(b as u8);
    }
    <[u8; 6]>::try_from(bytes.as_slice()).map_err(|_| ParseError::MacLength(bytes.len()))
}

/// `sscanf(s, "%x", &int)`: leading space, a sign, an optional `0x`, then
/// hex digits up to the first other character.
fn scan_hex(s: &str) -> Option<i64> {
    let s = s.trim_start();
    let (neg, s) = split_sign(s);
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .filter(|r| r.starts_with(|c: char| c.is_ascii_hexdigit()))
        .unwrap_or(s);
    let end = s.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(s.len());
    let digits = s.get(..end).filter(|d| !d.is_empty())?;
    // Too long for an int is out of range anyway.
    let v = i64::from_str_radix(digits, 16).unwrap_or(i64::MAX);
    Some(if neg { -v } else { v })
}

fn split_sign(s: &str) -> (bool, &str) {
    match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    }
}

/// C `strtoul(s, &end, 0)` magnitude: space, sign, `0x` hex, `0` octal or
/// decimal, and nothing after the digits. Returns (negative, value).
fn strto_base0(s: &str) -> Option<(bool, u64)> {
    let s = s.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let (neg, s) = split_sign(s);
    let (radix, digits) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) if h.starts_with(|c: char| c.is_ascii_hexdigit()) => (16, h),
        _ if s.len() > 1 && s.starts_with('0') => (8, &s[1..]),
        _ => (10, s),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok().map(|v| (neg, v))
}

/// iproute2's `get_unsigned(.., 0)`: a C unsigned int.
pub(crate) fn get_unsigned(s: &str) -> Option<u32> {
    match strto_base0(s)? {
        (true, 0) => Some(0),
        (true, _) => None,
        (false, v) => u32::try_from(v).ok(),
    }
}

/// iproute2's `get_integer(.., 0)`: a C int.
fn get_integer(s: &str) -> Option<i32> {
    let (neg, v) = strto_base0(s)?;
    let v = i64::try_from(v).ok()?;
    i32::try_from(if neg { -v } else { v }).ok()
}

/// iproute2's `matches(word, keyword)`: a non-empty prefix of the keyword.
fn matches(word: &str, keyword: &str) -> bool {
    !word.is_empty() && keyword.starts_with(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<VfSet, ParseError> {
        parse_vf_args(&s.split_whitespace().collect::<Vec<_>>())
    }

    fn err_text(s: &str) -> String {
        parse(s).unwrap_err().to_string()
    }

    #[test]
    fn test_every_option_parses() {
        let s = parse(
            "3 mac 02:00:00:00:00:01 vlan 10 qos 3 proto 802.1ad spoofchk off trust on \
             state disable max_tx_rate 1000 min_tx_rate 100 query_rss on",
        )
        .unwrap();
        let want = VfSet {
            vf: 3,
            mac: Some([2, 0, 0, 0, 0, 1]),
            vlan: Some(VlanSet { vid: 10, qos: 3, proto: VlanProto::Dot1AD }),
            spoofchk: Some(false),
            trust: Some(true),
            state: Some(LinkState::Disable),
            max_tx_rate: Some(1000),
            min_tx_rate: Some(100),
            query_rss: Some(true),
        };
        assert_eq!(s, want);
        assert_eq!(parse_vf_args(&want.to_args()).unwrap(), want);
    }

    #[test]
    fn test_vlan_alone_defaults_to_qos0_dot1q() {
        let v = parse("0 vlan 4095").unwrap().vlan.unwrap();
        assert_eq!((v.vid, v.qos, v.proto), (4095, 0, VlanProto::Dot1Q));
        let v = parse("0 vlan 5 proto 802.1q").unwrap().vlan.unwrap();
        assert_eq!(v.proto, VlanProto::Dot1Q);
        let v = parse("0 vlan 5 proto 0x88A8").unwrap().vlan.unwrap();
        assert_eq!(v.proto, VlanProto::Dot1AD);
    }

    #[test]
    fn test_abbreviations_follow_iproute2_order() {
        let s = parse("0 s on st enable t off q on v 7 qo 2 p 802.1AD mi 5 max 9").unwrap();
        assert_eq!(s.spoofchk, Some(true));
        assert_eq!(s.state, Some(LinkState::Enable));
        assert_eq!(s.trust, Some(false));
        assert_eq!(s.query_rss, Some(true));
        assert_eq!(s.vlan.unwrap().qos, 2);
        assert_eq!(s.vlan.unwrap().proto, VlanProto::Dot1AD);
        assert_eq!((s.min_tx_rate, s.max_tx_rate), (Some(5), Some(9)));
        assert_eq!(parse("0 spoofchk o").unwrap().spoofchk, Some(false));
        assert_eq!(parse("0 state a").unwrap().state, Some(LinkState::Auto));
        assert_eq!(parse("0 state d").unwrap().state, Some(LinkState::Disable));
    }

    #[test]
    fn test_numbers_use_c_syntax() {
        assert_eq!(parse("0x10 trust on").unwrap().vf, 16);
        assert_eq!(parse("010 trust on").unwrap().vf, 8);
        assert_eq!(parse("0 vlan 0x0a").unwrap().vlan.unwrap().vid, 10);
        assert_eq!(parse("0 max_tx_rate 4294967295").unwrap().max_tx_rate, Some(u32::MAX));
        assert_eq!(parse("0 mac 0x2:0:0:0:0:1zz").unwrap().mac, Some([2, 0, 0, 0, 0, 1]));
    }

    #[test]
    fn test_vf_index_errors() {
        assert!(err_text("x trust on").contains(r#"argument "x" is wrong: Invalid "vf" value"#));
        assert!(err_text("-1 trust on").contains("Invalid \"vf\" value"));
        assert!(err_text("2147483648 trust on").contains("Invalid \"vf\" value"));
        assert!(err_text("08 trust on").contains("Invalid \"vf\" value"));
    }

    #[test]
    fn test_incomplete_commands() {
        for s in ["", "0", "0 mac", "0 vlan", "0 vlan 1 qos", "0 vlan 1 proto", "0 trust"] {
            assert!(err_text(s).starts_with("Command line is not complete. Try option \"help\""), "{s}");
        }
    }

    #[test]
    fn test_vlan_qos_proto_errors() {
        assert!(err_text("0 vlan 4096").contains(r#"argument "4096" is wrong: Invalid "vlan" value"#));
        assert!(err_text("0 vlan ten").contains("Invalid \"vlan\" value"));
        assert!(err_text("0 vlan 1 qos 8").contains(r#"argument "8" is wrong: Invalid "qos" value"#));
        assert!(err_text("0 vlan 1 qos x").contains("Invalid \"qos\" value"));
        assert!(err_text("0 vlan 1 proto foo").contains(r#"argument "foo" is wrong: protocol is invalid"#));
        assert!(err_text("0 vlan 1 proto ipv4").contains(
            r#"argument "ipv4" is wrong: Invalid "vlan protocol" value - supported 802.1Q, 802.1ad"#
        ));
        assert!(err_text("0 vlan 1 proto 0x800").contains("Invalid \"vlan protocol\" value"));
        // proto before qos: qos is then no VF option (iproute2 takes it for a device name).
        assert!(err_text("0 vlan 1 proto 802.1Q qos 1")
            .contains(r#"either "dev" is duplicate, or "qos" is a garbage."#));
    }

    #[test]
    fn test_mac_errors() {
        assert!(err_text("0 mac zz:00:00:00:00:01").contains(r#""zz" is invalid lladdr."#));
        assert!(err_text("0 mac 100:0:0:0:0:1").contains(r#""100" is invalid lladdr."#));
        assert!(err_text("0 mac 02:00:00:00:01").contains("Invalid address length 5 - must be 6 bytes"));
        assert!(err_text("0 mac 1.2.3.4").contains("Invalid address length 4"));
        assert!(err_text("0 mac 1.2.3").contains("is invalid lladdr."));
    }

    #[test]
    fn test_on_off_and_state_errors() {
        assert_eq!(
            err_text("0 spoofchk yes"),
            r#"Error: argument of "spoofchk" must be one of "off", "on", not "yes""#
        );
        assert!(err_text("0 trust 1").contains(r#"argument of "trust" must be one of"#));
        assert!(err_text("0 query_rss x").contains(r#"argument of "query_rss" must be"#));
        assert!(err_text("0 state up").contains(r#"argument "up" is wrong: Invalid "state" value"#));
    }

    #[test]
    fn test_rate_errors() {
        assert!(err_text("0 max_tx_rate fast")
            .contains(r#"argument "fast" is wrong: Invalid "max tx rate" value"#));
        assert!(err_text("0 min_tx_rate -5").contains(r#"Invalid "min tx rate" value"#));
        assert!(err_text("0 max_tx_rate 4294967296").contains("Invalid \"max tx rate\""));
        assert!(err_text("0 max_tx_rate 100 min_tx_rate 200")
            .starts_with("Invalid min_tx_rate 200 - must be <= max_tx_rate 100"));
        // max 0 is "no limit": any min goes.
        assert!(parse("0 max_tx_rate 0 min_tx_rate 200").is_ok());
    }

    #[test]
    fn test_unknown_words_and_refusals() {
        assert!(err_text("0 trust on up")
            .starts_with(r#"Error: either "dev" is duplicate, or "up" is a garbage."#));
        assert!(err_text("0 macaddr 1").contains(r#"or "macaddr" is a garbage."#));
        assert_eq!(parse("0 trust on trust off"), Err(ParseError::Duplicate("trust")));
        assert_eq!(parse("0 vlan 1 proto 802.1ad vlan 2"), Err(ParseError::Duplicate("vlan")));
        assert_eq!(parse("0 m 02:00:00:00:00:01"), Err(ParseError::Ambiguous("m".into())));
        assert!(matches!(parse("0 rate 10"), Err(ParseError::Unsupported("rate", _))));
        assert!(matches!(parse("0 node_guid 1"), Err(ParseError::Unsupported("node_guid", _))));
    }
}
