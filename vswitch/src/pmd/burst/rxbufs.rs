//! Taking receive buffers from a guest's virtio receive ring for one packet (one buffer, or a
//! mergeable set), and giving them back used. Shared by the copy pass and the vIOMMU drain.

use super::*;
use virtq::ChainError;

use crate::virtio::VirtQueue;

/// The usual case: the next receive chain is one buffer with room for `need` bytes. Leaves
/// the ring untouched otherwise (the general `take_rx` decides).
#[inline(always)]
pub(super) fn take_one_rx(rq: &mut VirtQueue, need: u32) -> Option<(u16, Grant<Rw>)> {
    let (head, d) = rq.ring.next_desc()?;
    if d.flags != virtq::ring::DESC_F_WRITE || d.len < need {
        return None;
    }
    let g = rq.dma.grant::<Rw>(d.addr, d.len).ok()?;
    rq.ring.pop_head();
    Some((head, g))
}

/// Reserves receive buffers for `need` bytes: one chain, or several with MRG_RXBUF.
/// On shortage the chains taken go back to the available ring untouched.
pub(super) fn take_rx(
    rq: &mut VirtQueue,
    need: u32,
    segs: &mut [Grant<Rw>; RX_SEGS],
    chains: &mut [(u16, u32); MAX_RX_CHAINS],
) -> Result<(usize, usize), RxFail> {
    let (mut nseg, mut nch, mut cap) = (0usize, 0usize, 0u32);
    while cap < need {
        let limit = if rq.mrg_rxbuf { MAX_RX_CHAINS } else { 1 };
        let pending = rq.ring.avail_pending().unwrap_or_else(|_| {
            rq.broken = true;
            0
        });
        if nch == limit || pending == 0 || nseg == RX_SEGS {
            rq.ring.unpop(nch as u16);
            return Err(RxFail::NoBuffer);
        }
        let head = rq.ring.pop_head();
        match rq.ring.walk(&mut rq.dma, head, rq.indirect, u32::MAX >> 1, &mut segs[nseg..]) {
            Ok(ch) => {
                chains[nch] = (head, ch.len);
                nch += 1;
                nseg += ch.nseg as usize;
                cap = cap.saturating_add(ch.len);
            }
            Err(ChainError::Miss { iova }) => {
                rq.ring.unpop(nch as u16 + 1);
                return Err(RxFail::Miss(iova));
            }
            Err(e) => {
                // A bad buffer is consumed (returned empty) along with any taken before it:
                // the guest sees zero-length completions, never our bytes in a bad place.
                if e != ChainError::BadHead {
                    chains[nch] = (head, 0);
                    nch += 1;
                }
                return Err(RxFail::Malformed(nch));
            }
        }
    }
    Ok((nseg, nch))
}

/// Used entries for a packet spread over `chains` (head, capacity): each buffer reports
/// what it holds of the `wrote` bytes.
pub(super) fn push_used_spread(rq: &mut VirtQueue, chains: &[(u16, u32)], wrote: u32) {
    let mut left = wrote;
    for &(head, cap) in chains {
        let k = left.min(cap);
        rq.ring.push_used(head, k);
        left -= k;
    }
}
