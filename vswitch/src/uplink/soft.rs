//! Offloads finished in software for uplinks whose other side takes no virtio-net header (a
//! tunnel's UDP socket, an AF_XDP socket): a TSO frame is cut into segments and a partial
//! checksum completed before the frame goes, with the NIC models' engines.

use super::tap::Sent;

/// A frame with an offload request gathered to be finished, and one segment of it (kept to
/// reuse their allocations).
#[derive(Default)]
pub struct Soft {
    whole: Vec<u8>,
    seg: Vec<u8>,
    /// TSO frames cut into segments here and sent (all their segments taken).
    segmented: u64,
    /// Frames whose partial checksum was completed here and sent.
    csummed: u64,
}

impl Soft {
    /// TSO frames segmented and frames checksummed since the last call (the port's
    /// `gso_segmented` and `csum_completed`).
    pub fn take_counts(&mut self) -> (u64, u64) {
        (std::mem::take(&mut self.segmented), std::mem::take(&mut self.csummed))
    }

    /// Hands the frame `iov` (virtio-net header first) to `one` as finished frames (their
    /// pieces, no header): as it is without an offload request, else gathered and cut into
    /// segments or checksummed. The first failure of `one` is the result.
    pub fn send(&mut self, iov: &[libc::iovec], mut one: impl FnMut(&[libc::iovec]) -> Sent) -> Sent {
        use crate::offload::{F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6};
        use nic_models::engines::{csum, tso};
        if iov.len() < 2 || iov.len() > virtq::chain::MAX_SEGS + 2 || iov[0].iov_len < 10 {
            return Sent::Refused;
        }
        // SAFETY: iov[0] is the switch's own header buffer, at least 10 bytes.
        let vh = unsafe { std::slice::from_raw_parts(iov[0].iov_base as *const u8, 10) };
        let (flags, gso) = (vh[0], vh[1] & 0x7f);
        if gso == GSO_NONE && flags & F_NEEDS_CSUM == 0 {
            return one(&iov[1..]);
        }
        let (mss, start, off) = (
            u16::from_le_bytes([vh[4], vh[5]]),
            usize::from(u16::from_le_bytes([vh[6], vh[7]])),
            usize::from(u16::from_le_bytes([vh[8], vh[9]])),
        );
        let mut whole = std::mem::take(&mut self.whole);
        whole.clear();
        for v in &iov[1..] {
            // SAFETY: each piece is the switch's checked head or a grant of guest memory the
            // burst holds mapped.
            whole
                .extend_from_slice(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) });
        }
        let r = if gso == GSO_TCPV4 || gso == GSO_TCPV6 {
            let mut seg = std::mem::take(&mut self.seg);
            let mut res = Sent::Ok;
            let cut = tso::segment(&whole, mss, &mut seg, |f| {
                let piece = [libc::iovec { iov_base: f.as_ptr() as *mut _, iov_len: f.len() }];
                if res == Sent::Ok {
                    res = one(&piece);
                }
            });
            self.seg = seg;
            match (cut, res) {
                (Err(_), _) => Sent::Refused,
                (Ok(_), Sent::Ok) => {
                    self.segmented += 1;
                    Sent::Ok
                }
                (Ok(_), r) => r,
            }
        } else if gso != GSO_NONE
            || !{
                let end = whole.len();
                csum::complete_partial(&mut whole, start, off, end)
            }
        {
            Sent::Refused
        } else {
            let piece = [libc::iovec { iov_base: whole.as_ptr() as *mut _, iov_len: whole.len() }];
            let r = one(&piece);
            self.csummed += u64::from(r == Sent::Ok);
            r
        };
        self.whole = whole;
        r
    }
}
