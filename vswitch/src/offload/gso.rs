//! Software segmentation: one TCP frame of up to 64 KiB cut into segments of the sender's MSS,
//! each a packet of its own, for a receiver that did not negotiate TSO. Headers are rewritten
//! as the kernel's own GSO rewrites them (`inet_gso_segment`, `ipv6_gso_segment`,
//! `tcp_gso_segment`): IP total or payload length, IPv4 ID counting up from the sender's and
//! its header checksum, TCP sequence numbers, FIN and PSH on the last segment only, CWR on the
//! first only, and the TCP checksum.
//!
//! The segmenter works on the switch's snapshot of the frame's headers, with the receiver's
//! VLAN edit applied; payload bytes stay in the sender's memory and go straight into the
//! receiver's buffers (still one copy per byte).

use super::csum::{pseudo_v4, pseudo_v6, Sum};
use super::{NetHdr, F_NEEDS_CSUM};
use crate::l2::TagEdit;

/// Longest header: a tagged Ethernet header, IPv4 with 40 bytes of options, TCP with 40.
pub const MAX_HDR: usize = 18 + 60 + 60;
/// Most segments one frame may be cut into (a 64 KiB frame at an MSS of 32).
pub const MAX_SEGMENTS: u32 = 2048;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;
const PROTO_TCP: u8 = 6;

/// Why a GSO frame cannot be segmented (the sender's fault: dropped, counted malformed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GsoError {
    /// Not IPv4 or IPv6 behind Ethernet (and at most one 802.1Q tag).
    #[error("not an IP frame")]
    NotIp,
    /// The GSO type says IPv4 and the frame is IPv6, or the other way round.
    #[error("IP version does not match the GSO type")]
    WrongFamily,
    /// A bad IPv4 header length or a fragment.
    #[error("bad IP header")]
    BadIp,
    /// Not TCP (IPv6 extension headers included: the kernel does not send them with TSO).
    #[error("not TCP")]
    NotTcp,
    /// A TCP header shorter than 20 bytes or past the frame's end.
    #[error("bad TCP header")]
    BadTcp,
    /// More than [`MAX_SEGMENTS`] segments.
    #[error("{0} segments")]
    TooManySegments(u32),
}

/// One GSO frame ready to be cut for one receiver.
#[derive(Clone, Copy)]
pub struct Segmenter {
    /// The headers after the receiver's tag edit.
    hdr: [u8; MAX_HDR + 4],
    /// Header length (payload offset) after the edit.
    hlen: u32,
    l3: u32,
    l4: u32,
    v6: bool,
    mss: u32,
    payload: u32,
    /// Payload offset in the sender's frame.
    src_payload: u32,
    ip_id: u16,
    seq: u32,
}

impl Segmenter {
    /// Parses a GSO frame: `head` its first bytes as the switch snapshot them (the whole
    /// header at least), `len` its length, `mss` the segment size, `v6` whether the GSO type
    /// is TCPv6, `edit` the receiver's tag edit.
    pub fn new(head: &[u8], len: u32, mss: u16, v6: bool, edit: TagEdit) -> Result<Self, GsoError> {
        let mut hdr = [0u8; MAX_HDR + 4];
        let src = &head[..head.len().min(MAX_HDR).min(len as usize)];
        if src.len() < 14 {
            return Err(GsoError::NotIp);
        }
        // The edit on the header bytes (the payload is untouched by it).
        let n = match edit {
            TagEdit::Keep => {
                hdr[..src.len()].copy_from_slice(src);
                src.len()
            }
            TagEdit::Retag(tci) => {
                hdr[..src.len()].copy_from_slice(src);
                hdr[14..16].copy_from_slice(&tci.to_be_bytes());
                src.len()
            }
            TagEdit::Pop => {
                if src.len() < 18 {
                    return Err(GsoError::NotIp);
                }
                hdr[..12].copy_from_slice(&src[..12]);
                hdr[12..src.len() - 4].copy_from_slice(&src[16..]);
                src.len() - 4
            }
            TagEdit::Push(tci) => {
                hdr[..12].copy_from_slice(&src[..12]);
                hdr[12..16].copy_from_slice(&[0x81, 0x00, (tci >> 8) as u8, tci as u8]);
                hdr[16..src.len() + 4].copy_from_slice(&src[12..]);
                src.len() + 4
            }
        };
        let delta = super::edit_delta(edit);
        let h = &hdr[..n];
        let be16 = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
        let (mut l3, mut ethertype) = (14usize, be16(12));
        if ethertype == crate::l2::vlan::TPID_8021Q {
            if n < 18 {
                return Err(GsoError::NotIp);
            }
            (l3, ethertype) = (18, be16(16));
        }
        let (is_v6, l4) = match ethertype {
            0x0800 => {
                if n < l3 + 20 || h[l3] >> 4 != 4 {
                    return Err(GsoError::BadIp);
                }
                let ihl = (h[l3] & 0xf) as usize * 4;
                if ihl < 20 || n < l3 + ihl || be16(l3 + 6) & 0x3fff != 0 {
                    return Err(GsoError::BadIp);
                }
                if h[l3 + 9] != PROTO_TCP {
                    return Err(GsoError::NotTcp);
                }
                (false, l3 + ihl)
            }
            0x86dd => {
                if n < l3 + 40 || h[l3] >> 4 != 6 {
                    return Err(GsoError::BadIp);
                }
                if h[l3 + 6] != PROTO_TCP {
                    return Err(GsoError::NotTcp);
                }
                (true, l3 + 40)
            }
            _ => return Err(GsoError::NotIp),
        };
        if is_v6 != v6 {
            return Err(GsoError::WrongFamily);
        }
        if n < l4 + 20 {
            return Err(GsoError::BadTcp);
        }
        let thl = (h[l4 + 12] >> 4) as usize * 4;
        let hlen = l4 + thl;
        let out_len = (len as i64 + delta as i64) as u32;
        if thl < 20 || n < hlen || hlen as u32 > out_len {
            return Err(GsoError::BadTcp);
        }
        let payload = out_len - hlen as u32;
        let mss = (mss as u32).max(1);
        let count = payload.div_ceil(mss).max(1);
        if count > MAX_SEGMENTS {
            return Err(GsoError::TooManySegments(count));
        }
        Ok(Segmenter {
            hdr,
            hlen: hlen as u32,
            l3: l3 as u32,
            l4: l4 as u32,
            v6,
            mss,
            payload,
            src_payload: (hlen as i64 - delta as i64) as u32,
            ip_id: if v6 { 0 } else { be16(l3 + 4) },
            seq: u32::from_be_bytes([h[l4 + 4], h[l4 + 5], h[l4 + 6], h[l4 + 7]]),
        })
    }

    /// Number of segments.
    pub fn count(&self) -> u32 {
        self.payload.div_ceil(self.mss).max(1)
    }

    /// Header bytes in front of each segment's payload.
    pub fn header_len(&self) -> u32 {
        self.hlen
    }

    /// Where the TCP header starts (after the edit).
    pub fn l4_offset(&self) -> u32 {
        self.l4
    }

    /// Segment `k`'s payload: its offset in the sender's frame and its length.
    pub fn payload(&self, k: u32) -> (u32, u32) {
        let at = k * self.mss;
        (self.src_payload + at, self.mss.min(self.payload.saturating_sub(at)))
    }

    /// Writes segment `k`'s headers into `out` (at least [`header_len`](Self::header_len)
    /// bytes). `payload_sum`: the sum of the segment's payload, for a full TCP checksum; None
    /// for a receiver that completes checksums (`GUEST_CSUM`), which gets the pseudo-header
    /// sum and a `NEEDS_CSUM` request. Returns the receiver's virtio-net header.
    pub fn header(&self, k: u32, payload_sum: Option<Sum>, out: &mut [u8]) -> NetHdr {
        let (hlen, l3, l4) = (self.hlen as usize, self.l3 as usize, self.l4 as usize);
        let (_, plen) = self.payload(k);
        let out = &mut out[..hlen];
        out.copy_from_slice(&self.hdr[..hlen]);
        let l4_len = (hlen - l4) as u32 + plen;
        let pseudo = if self.v6 {
            out[l3 + 4..l3 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            pseudo_v6(&out[l3 + 8..l3 + 24], &out[l3 + 24..l3 + 40], PROTO_TCP, l4_len)
        } else {
            let total = (l4 - l3) as u32 + l4_len;
            out[l3 + 2..l3 + 4].copy_from_slice(&(total as u16).to_be_bytes());
            out[l3 + 4..l3 + 6].copy_from_slice(&self.ip_id.wrapping_add(k as u16).to_be_bytes());
            out[l3 + 10..l3 + 12].fill(0);
            let mut s = Sum::new();
            s.add(&out[l3..l4]);
            out[l3 + 10..l3 + 12].copy_from_slice(&s.checksum().to_be_bytes());
            pseudo_v4(&out[l3 + 12..l3 + 16], &out[l3 + 16..l3 + 20], PROTO_TCP, l4_len)
        };
        let seq = self.seq.wrapping_add(k.wrapping_mul(self.mss));
        out[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = out[l4 + 13];
        if k + 1 < self.count() {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if k > 0 {
            flags &= !TCP_CWR;
        }
        out[l4 + 13] = flags;
        out[l4 + 16..l4 + 18].fill(0);
        match payload_sum {
            Some(ps) => {
                let mut s = pseudo;
                s.add(&out[l4..]); // a TCP header is a whole number of 32-bit words
                s.add_sum(ps);
                out[l4 + 16..l4 + 18].copy_from_slice(&s.checksum().to_be_bytes());
                NetHdr::default()
            }
            None => {
                out[l4 + 16..l4 + 18].copy_from_slice(&pseudo.fold().to_be_bytes());
                NetHdr {
                    flags: F_NEEDS_CSUM,
                    hdr_len: hlen as u16,
                    csum_start: l4 as u16,
                    csum_offset: 16,
                    ..NetHdr::default()
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pnet_packet::ethernet::{EtherTypes, MutableEthernetPacket};
    use pnet_packet::ip::IpNextHeaderProtocols;
    use pnet_packet::ipv4::{self, Ipv4Packet, MutableIpv4Packet};
    use pnet_packet::ipv6::{Ipv6Packet, MutableIpv6Packet};
    use pnet_packet::tcp::{self, MutableTcpPacket, TcpPacket};
    use pnet_packet::Packet;
    use std::net::{Ipv4Addr, Ipv6Addr};

    pub(crate) const V4: (Ipv4Addr, Ipv4Addr) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
    const V6: (Ipv6Addr, Ipv6Addr) =
        (Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1), Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2));

    /// A GSO frame as a guest hands it over: Ethernet (tagged if `tci`), IPv4 or IPv6, TCP
    /// with 12 bytes of options, `payload` bytes; lengths and checksums as the sender left
    /// them (the TCP checksum field holds garbage: the device recomputes it).
    pub(crate) fn gso_frame(v6: bool, tci: Option<u16>, payload: usize, flags: u8) -> Vec<u8> {
        let tcp_len = 32 + payload;
        let ip_len = if v6 { 40 } else { 20 };
        let l2 = if tci.is_some() { 18 } else { 14 };
        let mut f = vec![0u8; l2 + ip_len + tcp_len];
        {
            let mut e = MutableEthernetPacket::new(&mut f).unwrap();
            e.set_destination([2, 0, 0, 0, 0, 2].into());
            e.set_source([2, 0, 0, 0, 0, 1].into());
            e.set_ethertype(if v6 { EtherTypes::Ipv6 } else { EtherTypes::Ipv4 });
        }
        if let Some(t) = tci {
            let et = [f[12], f[13]];
            f[12..14].copy_from_slice(&[0x81, 0x00]);
            f[14..16].copy_from_slice(&t.to_be_bytes());
            f[16..18].copy_from_slice(&et);
        }
        if v6 {
            let mut ip = MutableIpv6Packet::new(&mut f[l2..]).unwrap();
            ip.set_version(6);
            ip.set_payload_length(tcp_len as u16);
            ip.set_next_header(IpNextHeaderProtocols::Tcp);
            ip.set_hop_limit(64);
            ip.set_source(V6.0);
            ip.set_destination(V6.1);
        } else {
            let mut ip = MutableIpv4Packet::new(&mut f[l2..]).unwrap();
            ip.set_version(4);
            ip.set_header_length(5);
            ip.set_total_length((20 + tcp_len).min(65535) as u16);
            ip.set_identification(0xfffe); // wraps during the frame
            ip.set_flags(2); // DF
            ip.set_ttl(64);
            ip.set_next_level_protocol(IpNextHeaderProtocols::Tcp);
            ip.set_source(V4.0);
            ip.set_destination(V4.1);
        }
        {
            let mut t = MutableTcpPacket::new(&mut f[l2 + ip_len..]).unwrap();
            t.set_source(5201);
            t.set_destination(40000);
            t.set_sequence(0xffff_f000); // wraps during the frame
            t.set_acknowledgement(77);
            t.set_data_offset(8);
            t.set_flags(flags);
            t.set_window(512);
            t.set_checksum(0xdead);
            t.set_options(&[]);
        }
        for (i, b) in f[l2 + ip_len + 32..].iter_mut().enumerate() {
            *b = (i * 7 + i / 251) as u8;
        }
        f
    }

    /// Cuts `f` and returns each segment as delivered (payload summed in full, or the
    /// receiver completing a partial checksum).
    fn cut(f: &[u8], mss: u16, v6: bool, edit: TagEdit, partial: bool) -> Vec<Vec<u8>> {
        let sg = Segmenter::new(f, f.len() as u32, mss, v6, edit).unwrap();
        (0..sg.count())
            .map(|k| {
                let (off, plen) = sg.payload(k);
                let pay = &f[off as usize..(off + plen) as usize];
                let mut out = vec![0u8; sg.header_len() as usize];
                let ps = (!partial).then(|| {
                    let mut s = Sum::new();
                    s.add(pay);
                    s
                });
                let vh = sg.header(k, ps, &mut out);
                out.extend_from_slice(pay);
                if partial {
                    // What the receiving kernel does with NEEDS_CSUM.
                    assert_eq!(vh.flags, F_NEEDS_CSUM);
                    let (st, at) = (vh.csum_start as usize, vh.csum_start as usize + vh.csum_offset as usize);
                    let mut s = Sum::new();
                    s.add(&out[st..]);
                    out[at..at + 2].copy_from_slice(&s.checksum().to_be_bytes());
                } else {
                    assert_eq!(vh, NetHdr::default());
                }
                out
            })
            .collect()
    }

    /// Checks every segment with pnet's parsers and checksums, and that the payloads add up.
    pub(crate) fn check(
        orig: &[u8],
        segs: &[Vec<u8>],
        v6: bool,
        mss: usize,
        flags: u8,
        out_tci: Option<u16>,
    ) {
        let l2 = if out_tci.is_some() { 18 } else { 14 };
        let ol2 = if orig[12] == 0x81 { 18 } else { 14 };
        let ip_len = if v6 { 40 } else { 20 };
        let orig_payload = &orig[ol2 + ip_len + 32..];
        assert_eq!(segs.len(), orig_payload.len().div_ceil(mss).max(1));
        let mut joined = Vec::new();
        for (k, s) in segs.iter().enumerate() {
            let last = k + 1 == segs.len();
            assert_eq!(&s[..12], &orig[..12], "MACs");
            match out_tci {
                Some(t) => assert_eq!(&s[12..16], &[0x81, 0x00, (t >> 8) as u8, t as u8]),
                None => assert_ne!(&s[12..14], &[0x81, 0x00]),
            }
            let tcp_bytes = if v6 {
                let ip = Ipv6Packet::new(&s[l2..]).unwrap();
                assert_eq!(ip.get_payload_length() as usize, s.len() - l2 - 40);
                let t = TcpPacket::new(ip.payload()).unwrap();
                assert_eq!(
                    t.get_checksum(),
                    tcp::ipv6_checksum(&t, &V6.0, &V6.1),
                    "segment {k} TCP checksum"
                );
                ip.payload().to_vec()
            } else {
                let ip = Ipv4Packet::new(&s[l2..]).unwrap();
                assert_eq!(ip.get_total_length() as usize, s.len() - l2);
                assert_eq!(ip.get_identification(), 0xfffeu16.wrapping_add(k as u16));
                assert_eq!(ip.get_checksum(), ipv4::checksum(&ip), "segment {k} IP checksum");
                assert_eq!(ip.get_flags(), 2);
                let t = TcpPacket::new(ip.payload()).unwrap();
                assert_eq!(
                    t.get_checksum(),
                    tcp::ipv4_checksum(&t, &V4.0, &V4.1),
                    "segment {k} TCP checksum"
                );
                ip.payload().to_vec()
            };
            let t = TcpPacket::new(&tcp_bytes).unwrap();
            assert_eq!(t.get_sequence(), 0xffff_f000u32.wrapping_add((k * mss) as u32));
            assert_eq!(t.get_acknowledgement(), 77);
            let want =
                flags & !(if last { 0 } else { TCP_FIN | TCP_PSH }) & !(if k > 0 { TCP_CWR } else { 0 });
            assert_eq!(t.get_flags(), want, "segment {k} flags");
            assert!(t.payload().len() <= mss);
            joined.extend_from_slice(t.payload());
        }
        assert_eq!(joined, orig_payload, "payloads add up to the original");
    }

    pub(crate) const FLAGS: u8 = 0x80 | 0x10 | TCP_PSH | TCP_FIN; // CWR ACK PSH FIN

    #[test]
    fn test_ipv4_segments_match_the_kernels_rules() {
        for (payload, mss) in [(64_000, 1448), (4097, 1000), (1, 1448), (1448 * 3, 1448), (0, 536)] {
            for partial in [false, true] {
                let f = gso_frame(false, None, payload, FLAGS);
                let segs = cut(&f, mss, false, TagEdit::Keep, partial);
                check(&f, &segs, false, mss as usize, FLAGS, None);
            }
        }
    }

    #[test]
    fn test_ipv6_segments() {
        for (payload, mss) in [(65_000, 1428), (3001, 999)] {
            let f = gso_frame(true, None, payload, FLAGS);
            check(&f, &cut(&f, mss, true, TagEdit::Keep, false), true, mss as usize, FLAGS, None);
            check(&f, &cut(&f, mss, true, TagEdit::Keep, true), true, mss as usize, FLAGS, None);
        }
    }

    #[test]
    fn test_vlan_edits_apply_to_every_segment() {
        let tagged = gso_frame(false, Some(0x2005), 5000, 0x18);
        check(&tagged, &cut(&tagged, 1448, false, TagEdit::Keep, false), false, 1448, 0x18, Some(0x2005));
        check(&tagged, &cut(&tagged, 1448, false, TagEdit::Pop, false), false, 1448, 0x18, None);
        check(&tagged, &cut(&tagged, 1448, false, TagEdit::Retag(7), true), false, 1448, 0x18, Some(7));
        let plain = gso_frame(true, None, 3333, 0x18);
        check(&plain, &cut(&plain, 1000, true, TagEdit::Push(0x0123), false), true, 1000, 0x18, Some(0x0123));
    }

    #[test]
    fn test_frames_that_cannot_be_segmented_are_refused() {
        let f = gso_frame(false, None, 3000, 0x10);
        let len = f.len() as u32;
        assert_eq!(Segmenter::new(&f, len, 1448, true, TagEdit::Keep).err(), Some(GsoError::WrongFamily));
        let mut udp = f.clone();
        udp[14 + 9] = 17;
        assert_eq!(Segmenter::new(&udp, len, 1448, false, TagEdit::Keep).err(), Some(GsoError::NotTcp));
        let mut frag = f.clone();
        frag[14 + 6] = 0x20; // MF
        assert_eq!(Segmenter::new(&frag, len, 1448, false, TagEdit::Keep).err(), Some(GsoError::BadIp));
        let mut short_tcp = f.clone();
        short_tcp[14 + 20 + 12] = 0x40; // data offset 16 bytes
        assert_eq!(Segmenter::new(&short_tcp, len, 1448, false, TagEdit::Keep).err(), Some(GsoError::BadTcp));
        // Header longer than the frame.
        assert_eq!(Segmenter::new(&f[..60], 60, 1448, false, TagEdit::Keep).err(), Some(GsoError::BadTcp));
        assert_eq!(
            Segmenter::new(&f, len, 1, false, TagEdit::Keep).err(),
            Some(GsoError::TooManySegments(3000))
        );
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(Segmenter::new(&arp, len, 1448, false, TagEdit::Keep).err(), Some(GsoError::NotIp));
        // Every prefix of a header fails cleanly, never panics.
        for n in 0..f.len().min(80) {
            let _ = Segmenter::new(&f[..n], len, 1448, false, TagEdit::Pop);
            let _ = Segmenter::new(&f[..n], n as u32, 1448, false, TagEdit::Push(1));
        }
    }
}
