//! Level 0's offload engines, as a NIC runs them on frames it moves: checksum insert and
//! verify ([`csum`]), TCP segmentation on transmit ([`tso`]) and large-receive coalescing
//! ([`lro`]). They work on a frame in the device's own buffer (the RX FIFO or the TX packet
//! buffer), as the silicon does, and say what they did; the switch's software path has its own
//! versions that work in place in guest memory.

pub mod csum;
pub mod lro;
pub mod tso;

/// Where the headers of an Ethernet/IP/TCP-or-UDP frame are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Offset of the IP header (after the Ethernet header and one 802.1Q tag, if any).
    pub l3: usize,
    /// Offset of the TCP or UDP header.
    pub l4: usize,
    /// Offset of the payload.
    pub payload: usize,
    /// IPv6 (else IPv4).
    pub v6: bool,
    /// The L4 protocol (6 TCP, 17 UDP).
    pub proto: u8,
}

/// IP protocol number of TCP.
pub const TCP: u8 = 6;
/// IP protocol number of UDP.
pub const UDP: u8 = 17;

/// Parses the headers of a TCP or UDP frame over IPv4 (any IHL) or IPv6 (no extension
/// headers), with at most one VLAN tag. `None` for anything else or a frame too short for its
/// headers; the IP length fields must agree with the frame (trailing padding allowed).
pub fn layout(f: &[u8]) -> Option<Layout> {
    let mut l3 = 14;
    let mut ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    if ethertype == 0x8100 {
        ethertype = u16::from_be_bytes([*f.get(16)?, *f.get(17)?]);
        l3 = 18;
    }
    let (l4, proto, v6, ip_end) = match ethertype {
        0x0800 => {
            let vihl = *f.get(l3)?;
            let ihl = (vihl & 0xf) as usize * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return None;
            }
            let total = u16::from_be_bytes([*f.get(l3 + 2)?, *f.get(l3 + 3)?]) as usize;
            // Fragments have no L4 header to offload (offset or more-fragments set).
            let frag = u16::from_be_bytes([*f.get(l3 + 6)?, *f.get(l3 + 7)?]) & 0x3fff;
            if frag != 0 || total < ihl {
                return None;
            }
            (l3 + ihl, *f.get(l3 + 9)?, false, l3 + total)
        }
        0x86dd => {
            if *f.get(l3)? >> 4 != 6 {
                return None;
            }
            let plen = u16::from_be_bytes([*f.get(l3 + 4)?, *f.get(l3 + 5)?]) as usize;
            (l3 + 40, *f.get(l3 + 6)?, true, l3 + 40 + plen)
        }
        _ => return None,
    };
    let l4_len = match proto {
        TCP => (*f.get(l4 + 12)? >> 4) as usize * 4,
        UDP => 8,
        _ => return None,
    };
    if (proto == TCP && l4_len < 20) || l4 + l4_len > ip_end || ip_end > f.len() {
        return None;
    }
    Some(Layout { l3, l4, payload: l4 + l4_len, v6, proto })
}

/// Makes the IP header's length field say the datagram runs to the end of `f` (and, for IPv4,
/// gives it identification `id` if asked and a fresh header checksum).
pub fn set_ip_len(f: &mut [u8], l: &Layout, id: Option<u16>) {
    if l.v6 {
        let plen = (f.len() - l.l3 - 40) as u16;
        f[l.l3 + 4..l.l3 + 6].copy_from_slice(&plen.to_be_bytes());
    } else {
        let total = (f.len() - l.l3) as u16;
        f[l.l3 + 2..l.l3 + 4].copy_from_slice(&total.to_be_bytes());
        if let Some(id) = id {
            f[l.l3 + 4..l.l3 + 6].copy_from_slice(&id.to_be_bytes());
        }
        csum::insert_ip4(f, l);
    }
}

/// The end of the IP datagram (the frame may carry Ethernet padding after it).
pub fn ip_end(f: &[u8], l: &Layout) -> usize {
    match l.v6 {
        true => l.l3 + 40 + u16::from_be_bytes([f[l.l3 + 4], f[l.l3 + 5]]) as usize,
        false => l.l3 + u16::from_be_bytes([f[l.l3 + 2], f[l.l3 + 3]]) as usize,
    }
}
