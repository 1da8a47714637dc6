//! Reading the kernel's answers: link messages with their VF list, and
//! NLMSG_ERROR/NLMSG_DONE with the extended ack.
//!
//! The VF attributes are read by hand, not through netlink-packet-route's
//! parser, because that parser turns the kernel's "driver did not say" (-1)
//! for spoofchk, trust and query_rss into `false`; iproute2 prints nothing
//! for -1, and so must `show`. netlink-packet-route is the oracle in tests.

use netlink_packet_core::{NlaBuffer, NlasIterator};

use crate::error::DecodeError;
use crate::types::{LinkState, VfInfo, VfStats, VlanProto};

const NLMSG_HDR: usize = 16;
const IFINFOMSG: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;

const IFLA_ADDRESS: u16 = 1;
const IFLA_NUM_VF: u16 = 21;
const IFLA_VFINFO_LIST: u16 = 22;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_VF_INFO: u16 = 1;

const IFLA_VF_MAC: u16 = 1;
const IFLA_VF_VLAN: u16 = 2;
const IFLA_VF_SPOOFCHK: u16 = 4;
const IFLA_VF_LINK_STATE: u16 = 5;
const IFLA_VF_RATE: u16 = 6;
const IFLA_VF_RSS_QUERY_EN: u16 = 7;
const IFLA_VF_STATS: u16 = 8;
const IFLA_VF_TRUST: u16 = 9;
const IFLA_VF_VLAN_LIST: u16 = 12;
const IFLA_VF_VLAN_INFO: u16 = 1;

/// One netlink message of a received datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Msg<'a> {
    pub kind: u16,
    pub seq: u32,
    /// The whole message, header included.
    pub bytes: &'a [u8],
}

/// Splits a datagram into its netlink messages.
pub(crate) fn split(datagram: &[u8]) -> Result<Vec<Msg<'_>>, DecodeError> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while rest.len() >= NLMSG_HDR {
        let len = u32_at(rest, 0)? as usize;
        if len < NLMSG_HDR || len > rest.len() {
            return Err(DecodeError(format!("nlmsg_len {len} with {} bytes left", rest.len())));
        }
        out.push(Msg { kind: u16_at(rest, 4)?, seq: u32_at(rest, 8)?, bytes: &rest[..len] });
        rest = &rest[align4(len).min(rest.len())..];
    }
    Ok(out)
}

/// What an NLMSG_ERROR or NLMSG_DONE says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Status {
    /// Not a status message.
    Data,
    /// Success (an ACK, or the end of a dump).
    Ok,
    /// Failure: positive errno and the extended-ack text if any.
    Err(i32, Option<String>),
}

/// Reads the errno and the extended ack of an NLMSG_ERROR / NLMSG_DONE
/// (lib/libnetlink.c `nl_dump_ext_ack`).
pub(crate) fn status(m: &Msg<'_>) -> Result<Status, DecodeError> {
    if m.kind != NLMSG_ERROR && m.kind != NLMSG_DONE {
        return Ok(Status::Data);
    }
    let b = m.bytes;
    let code = if b.len() >= NLMSG_HDR + 4 { u32_at(b, NLMSG_HDR)? as i32 } else { 0 };
    if code == 0 {
        return Ok(Status::Ok);
    }
    let flags = u16_at(b, 6)?;
    // NLMSG_ERROR carries the request back (only its header when capped);
    // NLMSG_DONE carries only the code.
    let mut tlv_at = NLMSG_HDR + 4;
    if m.kind == NLMSG_ERROR {
        tlv_at += if flags & NLM_F_CAPPED != 0 {
            NLMSG_HDR
        } else {
            u32_at(b, tlv_at).map(|l| l as usize).unwrap_or(0)
        };
    }
    let extack =
        if flags & NLM_F_ACK_TLVS != 0 { b.get(align4(tlv_at)..).and_then(extack_msg) } else { None };
    Ok(Status::Err(-code, extack))
}

fn extack_msg(tlvs: &[u8]) -> Option<String> {
    let nla = attrs(tlvs).find(|a| a.kind() == NLMSGERR_ATTR_MSG)?;
    let v = nla.value();
    let text = v.split(|&c| c == 0).next().unwrap_or(v);
    Some(String::from_utf8_lossy(text).into_owned())
}

/// The parts of an RTM_NEWLINK this crate reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Link {
    pub ifindex: i32,
    /// Length of IFLA_ADDRESS, if present.
    pub addr_len: Option<usize>,
    pub num_vf: Option<u32>,
    /// VFs, each with whether IFLA_VF_RATE was present.
    pub vfs: Option<Vec<(VfInfo, bool)>>,
    /// The XDP hook: (IFLA_XDP_ATTACHED, IFLA_XDP_PROG_ID), if a program is attached.
    pub xdp: Option<(u8, u32)>,
}

/// The ifinfomsg's ifindex of a link message.
pub(crate) fn link_index(msg: &[u8]) -> Option<i32> {
    u32_at(msg, NLMSG_HDR + 4).ok().map(|i| i as i32)
}

/// Reads one RTM_NEWLINK message (header included).
pub(crate) fn parse_link(msg: &[u8]) -> Result<Link, DecodeError> {
    if msg.len() < NLMSG_HDR + IFINFOMSG {
        return Err(DecodeError(format!("link message of {} bytes", msg.len())));
    }
    let len = (u32_at(msg, 0)? as usize).min(msg.len());
    let mut link = Link { ifindex: u32_at(msg, NLMSG_HDR + 4)? as i32, ..Link::default() };
    for a in try_attrs(&msg[NLMSG_HDR + IFINFOMSG..len]) {
        let a = a?;
        match a.kind() {
            IFLA_ADDRESS => link.addr_len = Some(a.value().len()),
            IFLA_NUM_VF => link.num_vf = Some(u32_at(a.value(), 0)?),
            IFLA_VFINFO_LIST => link.vfs = Some(parse_vf_infos(a.value())?),
            IFLA_XDP => {
                let (mut mode, mut id) = (0u8, 0u32);
                for x in try_attrs(a.value()) {
                    let x = x?;
                    match x.kind() {
                        IFLA_XDP_ATTACHED => mode = x.value().first().copied().unwrap_or(0),
                        IFLA_XDP_PROG_ID => id = u32_at(x.value(), 0)?,
                        _ => {}
                    }
                }
                link.xdp = (mode != 0).then_some((mode, id));
            }
            _ => {}
        }
    }
    Ok(link)
}

/// Reads the VFs of an RTM_NEWLINK message (nlmsghdr, ifinfomsg and
/// attributes, as the kernel answers [`crate::show_request`]): `IFLA_NUM_VF`
/// and every `IFLA_VF_INFO` of `IFLA_VFINFO_LIST`.
///
/// A device without SR-IOV gives `(None, [])`; a PF whose driver cannot
/// report VF configuration gives `(Some(n), [])`.
pub fn parse_vf_list(link_msg_bytes: &[u8]) -> Result<(Option<u32>, Vec<VfInfo>), DecodeError> {
    let kind = u16_at(link_msg_bytes, 4)?;
    if kind != crate::msg::RTM_NEWLINK {
        return Err(DecodeError(format!("message type {kind}, not RTM_NEWLINK")));
    }
    let link = parse_link(link_msg_bytes)?;
    let vfs = link.vfs.unwrap_or_default().into_iter().map(|(v, _)| v).collect();
    Ok((link.num_vf, vfs))
}

fn parse_vf_infos(list: &[u8]) -> Result<Vec<(VfInfo, bool)>, DecodeError> {
    let mut out = Vec::new();
    for a in try_attrs(list) {
        let a = a?;
        if a.kind() == IFLA_VF_INFO {
            out.push(parse_vf_info(a.value())?);
        }
    }
    Ok(out)
}

/// One `IFLA_VF_INFO`, read like iproute2's `print_vfinfo`: the VF index is
/// the one in IFLA_VF_MAC, and IFLA_VF_VLAN_LIST wins over IFLA_VF_VLAN.
fn parse_vf_info(nest: &[u8]) -> Result<(VfInfo, bool), DecodeError> {
    let mut vf = VfInfo::default();
    let (mut has_mac, mut has_rate, mut has_list) = (false, false, false);
    for a in try_attrs(nest) {
        let a = a?;
        let v = a.value();
        match a.kind() {
            IFLA_VF_MAC => {
                vf.vf = u32_at(v, 0)?;
                vf.mac = v.get(4..10).and_then(|m| m.try_into().ok()).ok_or_else(short)?;
                has_mac = true;
            }
            IFLA_VF_VLAN if !has_list => {
                vf.vlan = u32_at(v, 4)? as u16;
                vf.qos = u32_at(v, 8)? as u8;
            }
            IFLA_VF_VLAN_LIST => {
                if let Some(info) = attrs(v).find(|i| i.kind() == IFLA_VF_VLAN_INFO) {
                    let i = info.value();
                    vf.vlan = u32_at(i, 4)? as u16;
                    vf.qos = u32_at(i, 8)? as u8;
                    let proto = i.get(12..14).ok_or_else(short)?;
                    vf.vlan_proto = match u16::from_be_bytes([proto[0], proto[1]]) {
                        0x88a8 => VlanProto::Dot1AD,
                        _ => VlanProto::Dot1Q,
                    };
                    has_list = true;
                }
            }
            IFLA_VF_RATE => {
                vf.min_tx_rate = u32_at(v, 4)?;
                vf.max_tx_rate = u32_at(v, 8)?;
                has_rate = true;
            }
            IFLA_VF_SPOOFCHK => vf.spoofchk = setting(v)?,
            IFLA_VF_TRUST => vf.trust = setting(v)?,
            IFLA_VF_RSS_QUERY_EN => vf.query_rss = setting(v)?,
            IFLA_VF_LINK_STATE => {
                // iproute2 prints anything but 0 and 1 as "disable".
                vf.link_state = Some(match u32_at(v, 4)? {
                    0 => LinkState::Auto,
                    1 => LinkState::Enable,
                    _ => LinkState::Disable,
                });
            }
            IFLA_VF_STATS => vf.stats = Some(parse_stats(v)?),
            _ => {}
        }
    }
    if !has_mac {
        return Err(DecodeError("IFLA_VF_INFO without IFLA_VF_MAC".into()));
    }
    Ok((vf, has_rate))
}

/// `{u32 vf; u32 setting}` where the kernel presets -1 for "not reported".
fn setting(v: &[u8]) -> Result<Option<bool>, DecodeError> {
    Ok(match u32_at(v, 4)? {
        u32::MAX => None,
        s => Some(s != 0),
    })
}

fn parse_stats(nest: &[u8]) -> Result<VfStats, DecodeError> {
    let mut s = VfStats::default();
    for a in try_attrs(nest) {
        let a = a?;
        let slot = match a.kind() {
            0 => &mut s.rx_packets,
            1 => &mut s.tx_packets,
            2 => &mut s.rx_bytes,
            3 => &mut s.tx_bytes,
            4 => &mut s.broadcast,
            5 => &mut s.multicast,
            7 => &mut s.rx_dropped,
            8 => &mut s.tx_dropped,
            _ => continue,
        };
        let v = a.value().get(..8).ok_or_else(short)?;
        *slot = u64::from_ne_bytes(v.try_into().map_err(|_| short())?);
    }
    Ok(s)
}

fn try_attrs(b: &[u8]) -> impl Iterator<Item = Result<NlaBuffer<&[u8]>, DecodeError>> {
    NlasIterator::new(b).map(|r| r.map_err(DecodeError::from))
}

/// Attributes up to the first malformed one.
fn attrs(b: &[u8]) -> impl Iterator<Item = NlaBuffer<&[u8]>> {
    NlasIterator::new(b).map_while(Result::ok)
}

fn short() -> DecodeError {
    DecodeError("attribute shorter than its kernel struct".into())
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, DecodeError> {
    let v = b.get(at..at + 4).ok_or_else(short)?;
    Ok(u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, DecodeError> {
    let v = b.get(at..at + 2).ok_or_else(short)?;
    Ok(u16::from_ne_bytes([v[0], v[1]]))
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsg(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m
    }

    fn error(errno: i32, flags: u16, request: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut p = (-errno).to_ne_bytes().to_vec();
        p.extend_from_slice(request);
        p.extend_from_slice(tlvs);
        nlmsg(NLMSG_ERROR, flags, 9, &p)
    }

    fn msg_tlv(text: &str) -> Vec<u8> {
        let mut v = text.as_bytes().to_vec();
        v.push(0);
        let mut t = ((4 + v.len()) as u16).to_ne_bytes().to_vec();
        t.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        t.extend_from_slice(&v);
        while !t.len().is_multiple_of(4) {
            t.push(0);
        }
        t
    }

    fn status_of(bytes: &[u8]) -> Status {
        let msgs = split(bytes).unwrap();
        assert_eq!(msgs.len(), 1);
        status(&msgs[0]).unwrap()
    }

    #[test]
    fn test_ack_and_done_are_ok() {
        let req = nlmsg(16, 5, 9, &[0; 16]);
        assert_eq!(status_of(&error(0, 0x100, &req[..16], &[])), Status::Ok);
        assert_eq!(status_of(&nlmsg(NLMSG_DONE, 2, 9, &0i32.to_ne_bytes())), Status::Ok);
        assert_eq!(status_of(&nlmsg(16, 0, 9, &[0; 16])), Status::Data);
    }

    #[test]
    fn test_errno_without_extack() {
        let req = nlmsg(16, 5, 9, &[0; 16]);
        assert_eq!(status_of(&error(95, 0, &req, &[])), Status::Err(95, None));
    }

    #[test]
    fn test_extack_after_capped_and_full_request() {
        let req = nlmsg(16, 5, 9, &[0; 20]);
        let tlv = msg_tlv("VF out of range");
        let capped = error(22, NLM_F_CAPPED | NLM_F_ACK_TLVS, &req[..16], &tlv);
        let want = Status::Err(22, Some("VF out of range".into()));
        assert_eq!(status_of(&capped), want);
        let full = error(22, NLM_F_ACK_TLVS, &req, &tlv);
        assert_eq!(status_of(&full), want);
    }

    #[test]
    fn test_split_reads_several_messages_and_refuses_bad_lengths() {
        let mut d = nlmsg(16, 2, 1, &[0; 17]);
        d.extend_from_slice(&[0; 3]);
        d.extend_from_slice(&nlmsg(NLMSG_DONE, 2, 1, &[0; 4]));
        let m = split(&d).unwrap();
        assert_eq!(m.iter().map(|m| m.kind).collect::<Vec<_>>(), [16, NLMSG_DONE]);
        let mut bad = nlmsg(16, 0, 1, &[0; 4]);
        bad[0] = 200;
        assert!(split(&bad).is_err());
    }

    #[test]
    fn test_parse_vf_list_refuses_other_messages_and_short_structs() {
        assert!(parse_vf_list(&nlmsg(NLMSG_ERROR, 0, 1, &[0; 20])).is_err());
        // IFLA_VFINFO_LIST { IFLA_VF_INFO { IFLA_VF_MAC of 4 bytes } }
        let mut attrs = vec![16, 0, 22, 0, 12, 0, 1, 0, 8, 0, 1, 0, 0, 0, 0, 0];
        let mut p = vec![0u8; 16];
        p.append(&mut attrs);
        let msg = nlmsg(16, 0, 1, &p);
        assert!(parse_vf_list(&msg).is_err());
    }
}
