//! Virtio-net offloads: checksum and segmentation requests in the virtio-net header, carried
//! whole to receivers that negotiated them, done in software for those that did not.
//!
//! A sender that negotiated `CSUM` may leave a TCP/UDP checksum for "the device" to complete
//! (`NEEDS_CSUM`, with where it starts and where it goes); one that negotiated `HOST_TSO4/6`
//! may hand over one TCP frame of up to 64 KiB with the segment size to cut it at. The switch
//! is that device for each receiver in turn:
//!
//! | the packet | receiver negotiated | delivered |
//! | --- | --- | --- |
//! | `NEEDS_CSUM` | `GUEST_CSUM` | as is, the request passed on ([`How::Pass`]) |
//! | `NEEDS_CSUM` | not | checksum completed in the copy ([`How::Complete`]) |
//! | GSO TCPv4/v6 (ECN) | `GUEST_TSO4/6` (`GUEST_ECN`) | whole, one copy ([`How::Pass`]) |
//! | GSO | not | cut into segments in the copy ([`How::Segment`], [`gso`]) |
//!
//! UFO and USO (UDP segmentation) are not offered: QEMU 7.2 and the 6.1 kernels this
//! project tests with do not use them.

pub mod csum;
pub mod gso;

use crate::l2::TagEdit;
use virtq::features::{self, Negotiated};

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`.
pub const F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_ECN`: the flow uses ECN (its first segment may carry CWR).
pub const GSO_ECN: u8 = 0x80;

/// Smallest segment size accepted in a GSO request: Linux's `TCP_MIN_MSS`. Smaller ones only
/// multiply the packets a receiver that segments must take (2048 of them per frame at 32).
pub const MIN_GSO_SIZE: u16 = 88;

/// Largest GSO frame: an IPv4 or IPv6 datagram of 64 KiB behind a tagged Ethernet header.
pub const MAX_GSO_FRAME: u32 = 65_535 + 18;

/// The offload fields of a virtio-net header (`num_buffers` is the receive side's own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHdr {
    /// `NEEDS_CSUM`, `DATA_VALID`.
    pub flags: u8,
    /// `GSO_*`, with `GSO_ECN` or'ed in.
    pub gso_type: u8,
    /// Length of the headers (a hint; the switch parses them itself).
    pub hdr_len: u16,
    /// Segment payload size.
    pub gso_size: u16,
    /// Frame offset where checksumming starts.
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
}

impl NetHdr {
    /// Reads the first 10 bytes of a virtio-net header (little-endian, VERSION_1 or legacy
    /// on a little-endian host).
    pub fn parse(b: &[u8; 10]) -> Self {
        let w = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        NetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: w(2),
            gso_size: w(4),
            csum_start: w(6),
            csum_offset: w(8),
        }
    }

    /// Writes the first 10 bytes of a header.
    pub fn write(&self, out: &mut [u8; 10]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    /// A GSO request for TCPv6 (else TCPv4, once checked).
    pub fn gso_v6(&self) -> bool {
        self.gso_type & !GSO_ECN == GSO_TCPV6
    }

    /// Asks nothing of the device.
    pub fn is_plain(&self) -> bool {
        self.flags & F_NEEDS_CSUM == 0 && self.gso_type == GSO_NONE
    }

    /// The request a receiver is given for a GSO frame the switch parsed (`seg`): built from
    /// the parse, not from what the sender wrote (checksum at the TCP header's checksum field,
    /// `hdr_len` the real header length), so no sender's odd values reach another guest's
    /// kernel.
    pub fn canonical_gso(&self, seg: &gso::Segmenter) -> NetHdr {
        NetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: self.gso_type,
            hdr_len: seg.header_len() as u16,
            gso_size: self.gso_size,
            csum_start: seg.l4_offset() as u16,
            csum_offset: 16,
        }
    }

    /// Segments and wire bytes a frame of `len` bytes with this (checked, canonical) request
    /// becomes: one and `len` without GSO.
    pub fn wire_cost(&self, len: u32) -> (u32, u32) {
        if self.gso_type == GSO_NONE || self.gso_size == 0 {
            return (1, len);
        }
        let hlen = self.hdr_len as u32;
        let segs = len.saturating_sub(hlen).div_ceil(self.gso_size as u32).max(1);
        (segs, len + (segs - 1) * hlen)
    }

    /// The same request for the frame after a VLAN tag edit (offsets past the MACs move).
    pub fn edited(&self, edit: TagEdit) -> NetHdr {
        let d = |v: u16| if v >= 12 { (v as i32 + edit_delta(edit)).max(0) as u16 } else { v };
        NetHdr { csum_start: d(self.csum_start), hdr_len: d(self.hdr_len), ..*self }
    }
}

/// How far a tag edit moves the bytes after the MACs.
pub fn edit_delta(edit: TagEdit) -> i32 {
    match edit {
        TagEdit::Push(_) => 4,
        TagEdit::Pop => -4,
        TagEdit::Keep | TagEdit::Retag(_) => 0,
    }
}

/// What one queue's guest negotiated, as the datapath asks it: what it may hand the switch
/// (`tx_*`) and what it takes from it (`rx_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caps {
    /// `CSUM`: may send `NEEDS_CSUM`.
    pub tx_csum: bool,
    /// `HOST_TSO4`.
    pub tx_tso4: bool,
    /// `HOST_TSO6`.
    pub tx_tso6: bool,
    /// `HOST_ECN`.
    pub tx_ecn: bool,
    /// `GUEST_CSUM`: takes `NEEDS_CSUM` (and `DATA_VALID`).
    pub rx_csum: bool,
    /// `GUEST_TSO4`.
    pub rx_tso4: bool,
    /// `GUEST_TSO6`.
    pub rx_tso6: bool,
    /// `GUEST_ECN`.
    pub rx_ecn: bool,
}

impl Caps {
    /// From a negotiated set, with the spec's dependencies (TSO needs the checksum offload
    /// of the same direction, ECN needs TSO): a bit acked without its prerequisite is not used.
    pub fn from_features(n: Negotiated) -> Caps {
        let tx_csum = n.has(features::NET_F_CSUM);
        let rx_csum = n.has(features::NET_F_GUEST_CSUM);
        let tx_tso4 = tx_csum && n.has(features::NET_F_HOST_TSO4);
        let tx_tso6 = tx_csum && n.has(features::NET_F_HOST_TSO6);
        let rx_tso4 = rx_csum && n.has(features::NET_F_GUEST_TSO4);
        let rx_tso6 = rx_csum && n.has(features::NET_F_GUEST_TSO6);
        Caps {
            tx_csum,
            tx_tso4,
            tx_tso6,
            tx_ecn: (tx_tso4 || tx_tso6) && n.has(features::NET_F_HOST_ECN),
            rx_csum,
            rx_tso4,
            rx_tso6,
            rx_ecn: (rx_tso4 || rx_tso6) && n.has(features::NET_F_GUEST_ECN),
        }
    }

    /// Whether the sender's headers must be read at all.
    pub fn any_tx(&self) -> bool {
        self.tx_csum
    }
}

/// Why a sender's offload request was refused (the packet is dropped as malformed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    /// A GSO type the sender did not negotiate (or no GSO type the switch knows).
    #[error("GSO type {0:#x} not negotiated")]
    GsoType(u8),
    /// A GSO request with a segment size below [`MIN_GSO_SIZE`].
    #[error("GSO with segment size {0} (at least {MIN_GSO_SIZE})")]
    GsoSize(u16),
    /// A checksum request that points outside the frame or into the Ethernet header.
    #[error("checksum at {start}+{offset} outside a {len}-byte frame")]
    Csum {
        /// csum_start.
        start: u16,
        /// csum_offset.
        offset: u16,
        /// Frame length.
        len: u32,
    },
    /// Longer than a frame may be without GSO, or than any GSO frame.
    #[error("{0}-byte frame too long")]
    TooLong(u32),
    /// A GSO frame whose headers cannot be segmented.
    #[error("GSO frame: {0}")]
    Gso(gso::GsoError),
}

/// Checks a sender's request against what it negotiated and the frame it came with
/// (`l2_len`: 14, or 18 for a tagged frame). Flags the device ignores on transmit are
/// cleared. Ok: the request to act on.
pub fn check_tx(h: NetHdr, caps: Caps, len: u32, l2_len: u32, max_plain: u32) -> Result<NetHdr, BadRequest> {
    let mut h = NetHdr { flags: h.flags & F_NEEDS_CSUM, ..h };
    if !caps.tx_csum {
        return Ok(NetHdr::default());
    }
    if h.gso_type != GSO_NONE {
        let base = h.gso_type & !GSO_ECN;
        let ok = match base {
            GSO_TCPV4 => caps.tx_tso4,
            GSO_TCPV6 => caps.tx_tso6,
            _ => false,
        } && (h.gso_type & GSO_ECN == 0 || caps.tx_ecn);
        if !ok {
            return Err(BadRequest::GsoType(h.gso_type));
        }
        if h.gso_size < MIN_GSO_SIZE {
            return Err(BadRequest::GsoSize(h.gso_size));
        }
        if len > MAX_GSO_FRAME {
            return Err(BadRequest::TooLong(len));
        }
    } else {
        h.gso_size = 0;
        if len > max_plain {
            return Err(BadRequest::TooLong(len));
        }
    }
    if h.flags & F_NEEDS_CSUM != 0 {
        let end = h.csum_start as u32 + h.csum_offset as u32 + 2;
        if (h.csum_start as u32) < l2_len || end > len {
            return Err(BadRequest::Csum { start: h.csum_start, offset: h.csum_offset, len });
        }
    }
    Ok(h)
}

/// How a packet with request `h` reaches a receiver with `rx`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    /// Nothing asked: a zero header.
    Plain,
    /// The request goes to the receiver as is.
    Pass,
    /// The switch completes the checksum in the copy.
    Complete,
    /// The switch cuts the frame into segments, each a packet of its own.
    Segment,
}

/// Decides [`How`] for one packet and one receiver.
#[inline]
pub fn how(h: &NetHdr, rx: Caps) -> How {
    if h.gso_type != GSO_NONE {
        let whole = match h.gso_type & !GSO_ECN {
            GSO_TCPV4 => rx.rx_tso4,
            GSO_TCPV6 => rx.rx_tso6,
            _ => false,
        } && (h.gso_type & GSO_ECN == 0 || rx.rx_ecn);
        if whole {
            How::Pass
        } else {
            How::Segment
        }
    } else if h.flags & F_NEEDS_CSUM != 0 {
        if rx.rx_csum {
            How::Pass
        } else {
            How::Complete
        }
    } else {
        How::Plain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Caps {
        Caps::from_features(Negotiated { bits: crate::virtio::features::OFFLOADS })
    }

    #[test]
    fn test_header_round_trip() {
        let h =
            NetHdr { flags: 1, gso_type: 0x81, hdr_len: 66, gso_size: 1448, csum_start: 34, csum_offset: 16 };
        let mut b = [0u8; 10];
        h.write(&mut b);
        assert_eq!(b, [1, 0x81, 66, 0, 0xa8, 0x05, 34, 0, 16, 0]);
        assert_eq!(NetHdr::parse(&b), h);
    }

    #[test]
    fn test_caps_follow_the_spec_dependencies() {
        let c = all();
        assert!(
            c.tx_csum
                && c.tx_tso4
                && c.tx_tso6
                && c.tx_ecn
                && c.rx_csum
                && c.rx_tso4
                && c.rx_tso6
                && c.rx_ecn
        );
        // TSO acked without the checksum offload it depends on is not used.
        let n = Negotiated { bits: features::NET_F_HOST_TSO4 | features::NET_F_GUEST_TSO4 };
        assert_eq!(Caps::from_features(n), Caps::default());
    }

    #[test]
    fn test_sender_requests_are_checked() {
        let c = all();
        let tso = NetHdr {
            flags: 1,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        assert_eq!(check_tx(tso, c, 60_000, 14, 9220), Ok(tso));
        let no_tso = Caps { tx_tso4: false, ..c };
        assert_eq!(check_tx(tso, no_tso, 60_000, 14, 9220), Err(BadRequest::GsoType(1)));
        assert_eq!(check_tx(NetHdr { gso_size: 0, ..tso }, c, 60_000, 14, 9220), Err(BadRequest::GsoSize(0)));
        assert!(matches!(check_tx(tso, c, 70_000, 14, 9220), Err(BadRequest::TooLong(_))));
        let plain_csum = NetHdr { gso_type: 0, gso_size: 0, ..tso };
        assert!(matches!(check_tx(plain_csum, c, 10_000, 14, 9220), Err(BadRequest::TooLong(_))));
        // The checksum field must lie inside the frame, after the Ethernet header.
        assert!(matches!(check_tx(plain_csum, c, 51, 14, 9220), Err(BadRequest::Csum { .. })));
        assert_eq!(check_tx(plain_csum, c, 52, 14, 9220), Ok(plain_csum));
        assert!(matches!(check_tx(plain_csum, c, 100, 36, 9220), Err(BadRequest::Csum { .. })));
        // A sender without CSUM asks nothing, whatever its header says.
        assert_eq!(check_tx(tso, Caps::default(), 100, 14, 9220), Ok(NetHdr::default()));
        // DATA_VALID means nothing on transmit.
        assert_eq!(
            check_tx(NetHdr { flags: F_DATA_VALID, ..NetHdr::default() }, c, 60, 14, 9220),
            Ok(NetHdr::default())
        );
    }

    #[test]
    fn test_how_each_receiver_gets_it() {
        let full = all();
        let none = Caps::default();
        let csum_only = Caps { rx_csum: true, ..none };
        let tso4 = NetHdr { flags: 1, gso_type: GSO_TCPV4, gso_size: 1448, ..NetHdr::default() };
        assert_eq!(how(&tso4, full), How::Pass);
        assert_eq!(how(&tso4, csum_only), How::Segment);
        assert_eq!(how(&tso4, Caps { rx_tso4: false, ..full }), How::Segment);
        let ecn = NetHdr { gso_type: GSO_TCPV6 | GSO_ECN, ..tso4 };
        assert_eq!(how(&ecn, full), How::Pass);
        assert_eq!(how(&ecn, Caps { rx_ecn: false, ..full }), How::Segment);
        let csum = NetHdr { flags: 1, csum_start: 34, csum_offset: 16, ..NetHdr::default() };
        assert_eq!(how(&csum, csum_only), How::Pass);
        assert_eq!(how(&csum, none), How::Complete);
        assert_eq!(how(&NetHdr::default(), full), How::Plain);
    }

    #[test]
    fn test_tag_edits_move_the_offsets() {
        let h = NetHdr { flags: 1, csum_start: 34, hdr_len: 54, csum_offset: 16, ..NetHdr::default() };
        assert_eq!(h.edited(TagEdit::Push(5)).csum_start, 38);
        assert_eq!(h.edited(TagEdit::Push(5)).hdr_len, 58);
        assert_eq!(h.edited(TagEdit::Pop).csum_start, 30);
        assert_eq!(h.edited(TagEdit::Keep), h);
        assert_eq!(h.edited(TagEdit::Push(5)).csum_offset, 16);
    }
}
