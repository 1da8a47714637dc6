use super::*;
use iommu::GrantWriter;

use crate::offload::csum::Sum;
use crate::offload::{self, Caps, How};

use super::super::copy::{copy_frame, copy_range, frame_sum, Frame};

impl Datapath {
    /// Renders packet `i` with an offload request for one receiver (tag edit `edit`, `caps`,
    /// header length `hdr_len`, `nch` buffers) into `dst`: the request passed on, the checksum
    /// completed, or segment `seg - 1` of the current segmenter. Returns the bytes written
    /// and what was done.
    ///
    /// # Safety
    /// As for [`copy_frame`].
    #[cold]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn render(
        &self,
        i: usize,
        edit: TagEdit,
        seg: u16,
        nch: u8,
        caps: Caps,
        hdr_len: u32,
        src_hdr: u32,
        dst: &[Grant<Rw>],
    ) -> (u32, How) {
        let p = &self.pkts[i];
        let vh = self.vhdrs[i];
        let f = Frame {
            segs: &self.segs[i][..p.nseg as usize],
            skip: src_hdr,
            len: p.len,
            head: &self.heads[i][..p.head_len as usize],
        };
        let mut hb = [0u8; 12 + gso::MAX_HDR + 4];
        hb[10..12].copy_from_slice(&(nch as u16).to_le_bytes());
        // The receiver's virtio-net header: the request for it, then `num_buffers` (above).
        let vnet = |h: NetHdr, hb: &mut [u8; 12 + gso::MAX_HDR + 4]| {
            let mut b = [0u8; 10];
            h.write(&mut b);
            hb[..10].copy_from_slice(&b);
        };
        let how = if p.offload { offload::how(&vh, caps) } else { How::Plain };
        let h = hdr_len as usize;
        // Every unsafe block below: the caller's contract forwarded (valid grants; every read
        // and write is bounded by them).
        let wrote = match how {
            // SAFETY: forwarded.
            How::Plain => unsafe { copy_frame(&f, edit, &hb[..h], dst) },
            How::Pass => {
                vnet(vh.edited(edit), &mut hb);
                // SAFETY: forwarded.
                unsafe { copy_frame(&f, edit, &hb[..h], dst) }
            }
            How::Complete => {
                // SAFETY: forwarded.
                let wrote = unsafe { copy_frame(&f, edit, &hb[..h], dst) };
                // Over the bytes delivered (snapshot included), the sender's pseudo-header sum
                // in the field counting as it must.
                let start = vh.csum_start as u32;
                let mut s = Sum::new();
                // SAFETY: forwarded.
                unsafe { frame_sum(&f, start, p.len - start, &mut s) };
                let mut sum = s.checksum();
                if sum == 0 && vh.csum_offset == 6 {
                    sum = 0xffff; // UDP: zero means "no checksum"
                }
                let at = (hdr_len as i64 + start as i64 + offload::edit_delta(edit) as i64) as u32
                    + vh.csum_offset as u32;
                // SAFETY: forwarded.
                unsafe { iommu::grant::write_granted(dst, at, &sum.to_be_bytes()) };
                wrote
            }
            How::Segment => {
                let Some(sg) = self.seg.as_ref() else { return (0, how) };
                let k = seg.saturating_sub(1) as u32;
                let (off, plen) = sg.payload(k);
                let ps = (!caps.rx_csum).then(|| {
                    let mut s = Sum::new();
                    // SAFETY: forwarded.
                    unsafe { frame_sum(&f, off, plen, &mut s) };
                    s
                });
                let hl = sg.header_len() as usize;
                let vh2 = sg.header(k, ps, &mut hb[h..h + hl]);
                vnet(vh2, &mut hb);
                let mut w = GrantWriter::new(dst);
                // SAFETY: forwarded.
                unsafe {
                    w.put(&hb[..h + hl]);
                    copy_range(&f, off, plen, &mut w);
                }
                w.written()
            }
        };
        (wrote, how)
    }
}
