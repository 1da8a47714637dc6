//! TCP segmentation on transmit: one large TCP frame (up to 64 KiB, from a guest's TSO
//! request) cut into frames of at most `mss` payload bytes, as the 82576 does it (datasheet
//! 7.2.4): the headers are replicated; IPv4's total length and identification (incremented per
//! segment) and IPv6's payload length are rewritten; TCP's sequence number advances; FIN and
//! PSH stay only on the last segment and CWR only on the first (the DTXTCPFLGL/H defaults);
//! every checksum is computed anew.

use super::csum::insert_l4;
use super::{ip_end, layout, set_ip_len, TCP};

/// Why a frame could not be segmented.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TsoError {
    /// not TCP over IPv4 or IPv6 with well-formed headers
    #[error("not a well-formed TCP frame")]
    NotTcp,
    /// an MSS of zero, or headers longer than the frame size the wire takes
    #[error("MSS {0} does not fit a frame")]
    BadMss(u16),
}

const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const CWR: u8 = 0x80;

/// Cuts `frame` into segments of at most `mss` payload bytes, each written into `out` (cleared
/// first) and handed to `emit`. Returns the number of segments. A frame whose payload fits one
/// segment is emitted once, with its checksums computed.
pub fn segment(
    frame: &[u8],
    mss: u16,
    out: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, TsoError> {
    let l = layout(frame).filter(|l| l.proto == TCP).ok_or(TsoError::NotTcp)?;
    if mss == 0 || l.payload + mss as usize > 65_535 + l.l3 {
        return Err(TsoError::BadMss(mss));
    }
    let end = ip_end(frame, &l);
    let payload = &frame[l.payload..end];
    let seq0 = u32::from_be_bytes(frame[l.l4 + 4..l.l4 + 8].try_into().expect("4 bytes"));
    let id0 = u16::from_be_bytes([frame[l.l3 + 4], frame[l.l3 + 5]]);
    let flags = frame[l.l4 + 13];
    let chunks = payload.len().div_ceil(mss as usize).max(1);
    for i in 0..chunks {
        let lo = i * mss as usize;
        let hi = (lo + mss as usize).min(payload.len());
        out.clear();
        out.extend_from_slice(&frame[..l.payload]);
        out.extend_from_slice(&payload[lo..hi]);
        let (first, last) = (i == 0, i + 1 == chunks);
        set_ip_len(out, &l, Some(id0.wrapping_add(i as u16)));
        let seq = seq0.wrapping_add(lo as u32);
        out[l.l4 + 4..l.l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut fl = flags;
        if !last {
            fl &= !(FIN | PSH);
        }
        if !first {
            fl &= !CWR;
        }
        out[l.l4 + 13] = fl;
        insert_l4(out, &l);
        emit(out);
    }
    Ok(chunks)
}
