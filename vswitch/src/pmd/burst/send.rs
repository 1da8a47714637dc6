//! Deliver into an uplink device: one vectored write per packet, straight from the sender's
//! buffers, so the kernel's copy is the only one. An offload request passes in the virtio-net
//! header: the kernel checksums or segments as the header asks, wherever the frame goes next.

use super::*;
use crate::uplink::tap::{Sent, TapQueue, VNET_HDR};

use super::super::copy::{frame_iov, out_len, Frame};
use super::deliver::Dest;

/// What one delivery into a device did.
#[derive(Default)]
struct Sends {
    sent: u64,
    bytes: u64,
    full: u64,
    refused: u64,
    /// TCP frames of up to 64 KiB handed over whole (the kernel segments them if it must).
    whole: u64,
}

impl Datapath {
    /// Writes every packet bound to `d` to the TAP queue `t`.
    pub(super) fn send_tap(
        &mut self,
        d: &Dest<'_>,
        t: &mut TapQueue,
        src_hdr: u32,
        n: usize,
        c: &mut SrcCounts,
    ) {
        let mut k = Sends::default();
        for i in 0..n {
            let Some(edit) = self.edit_for(d, i, c) else { continue };
            if t.broken() {
                k.full += 1;
                continue;
            }
            let p = &self.desc.pkts[i];
            let mut hdr = [0u8; VNET_HDR as usize];
            if p.offload {
                let (vh, mut b) = (self.desc.vhdrs[i].edited(edit), [0u8; 10]);
                vh.write(&mut b);
                hdr[..10].copy_from_slice(&b);
            }
            let f = Frame {
                segs: &self.desc.segs[i][..p.nseg as usize],
                skip: src_hdr,
                len: p.len,
                head: &self.desc.heads[i][..p.head_len as usize],
            };
            let mut head = [0u8; HEAD + 4];
            let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_SEGS + 2];
            iov[0] = libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: hdr.len() };
            let m = frame_iov(&f, edit, &mut head, &mut iov[1..]);
            if m == 0 {
                k.refused += 1;
                continue;
            }
            match t.send(&iov[..m + 1]) {
                Sent::Ok => {
                    k.sent += 1;
                    k.whole += (p.offload && self.desc.vhdrs[i].gso_type != crate::offload::GSO_NONE) as u64;
                    k.bytes += out_len(p.len, edit) as u64;
                }
                Sent::Full | Sent::Gone => k.full += 1,
                Sent::Refused => k.refused += 1,
            }
        }
        let s = &d.slot.stats;
        bump(&s.packets, k.sent);
        bump(&s.bytes, k.bytes);
        bump(&s.kernel_copies, k.sent);
        s.drop(DropReason::NoBuffer, k.full);
        s.drop(DropReason::Malformed, k.refused);
        bump(&s.gso_whole, k.whole);
    }
}
