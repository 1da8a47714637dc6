//! Deliver into an uplink device: one vectored write per packet (a packet socket: one
//! `sendmmsg` per burst), straight from the sender's buffers, so the kernel's copy is the only
//! one. An offload request passes in the virtio-net
//! header: the kernel checksums or segments as the header asks, wherever the frame goes next.

use super::*;
use crate::uplink::nic::NicTxQueue;
use crate::uplink::tap::{Sent, TapQueue, VNET_HDR};

use super::super::copy::{frame_iov, out_len, Frame};
use super::deliver::{each, Dest, PktSet};

/// What one delivery into a device did.
#[derive(Default)]
struct Sends {
    sent: u64,
    bytes: u64,
    full: u64,
    refused: u64,
    /// TCP frames of up to 64 KiB handed over whole (the kernel segments them if it must).
    whole: u64,
    /// TCP frames the sink cut into segments itself (a tunnel, an XDP socket).
    segmented: u64,
    /// Partial checksums the sink completed itself.
    csummed: u64,
}

/// One packet as it leaves for a device: its virtio-net header, the checked head (edited),
/// and pieces of the sender's buffers.
pub(super) struct Out {
    hdr: [u8; VNET_HDR as usize],
    head: [u8; HEAD + 4],
    iov: [libc::iovec; MAX_SEGS + 2],
}

impl Out {
    pub(super) fn new() -> Self {
        Out {
            hdr: [0; VNET_HDR as usize],
            head: [0; HEAD + 4],
            iov: [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_SEGS + 2],
        }
    }
}

impl Datapath {
    /// Points `out.iov` at packet `i` as it leaves (header first, `edit` applied); the number
    /// of pieces, 0 if the frame cannot be expressed.
    fn packet_iov(&self, i: usize, edit: TagEdit, src_hdr: u32, out: &mut Out) -> usize {
        let p = &self.desc.pkts[i];
        if p.offload {
            let (vh, mut b) = (self.desc.vhdrs[i].edited(edit), [0u8; 10]);
            vh.write(&mut b);
            out.hdr[..10].copy_from_slice(&b);
        }
        let f = Frame {
            segs: &self.desc.segs[i][..p.nseg as usize],
            skip: src_hdr,
            len: p.len,
            head: &self.desc.heads[i][..p.head_len as usize],
        };
        out.iov[0] = libc::iovec { iov_base: out.hdr.as_mut_ptr().cast(), iov_len: out.hdr.len() };
        match frame_iov(&f, edit, &mut out.head, &mut out.iov[1..]) {
            0 => 0,
            m => m + 1,
        }
    }

    /// A NIC model's transmit side: every packet bound to `d` is read by the device's DMA into
    /// its packet buffer, queued on the sender's pool, and the scheduler puts what it may on
    /// the wire.
    pub(super) fn send_nic(
        &mut self,
        d: &Dest<'_>,
        t: &mut NicTxQueue,
        src_hdr: u32,
        set: PktSet,
        c: &mut SrcCounts,
    ) {
        let pool = t.pool_of(self.cur_src);
        let (mut queued, mut full, mut refused) = (0u64, 0u64, 0u64);
        // The device's work (descriptor fetches, the DMA read, queueing) is timed apart.
        let t0 = crate::clock::ticks();
        let cost = nic_models::PcieCost::default();
        for i in each(set) {
            let Some(edit) = self.edit_for(d, i, c) else { continue };
            let mut out = Out::new();
            let m = self.packet_iov(i, edit, src_hdr, &mut out);
            if m == 0 {
                refused += 1;
                continue;
            }
            let mut buf = t.buffer();
            // One descriptor per piece, read by the device, and one completion written back.
            t.device.desc_fetches += m as u64;
            t.device.desc_writebacks += 1;
            t.device.tlps += 1;
            for v in &out.iov[..m] {
                t.device.tlps += cost.read_tlps(v.iov_len as u32);
                // SAFETY: each piece is the header or head above, or a grant of the sender's
                // memory, which the sender's queue lock (held by our caller) keeps mapped.
                buf.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                });
            }
            t.device.dma_read_bytes += buf.len() as u64;
            t.device.packets += 1;
            t.device.bytes += buf.len() as u64;
            match t.sched.enqueue(pool, buf) {
                Ok(()) => queued += 1,
                Err(b) => {
                    t.recycle(b);
                    full += 1;
                }
            }
        }
        let _ = queued;
        t.device_ticks += crate::clock::ticks().wrapping_sub(t0);
        let (sent, bytes, gone) = t.service(crate::clock::now_ns());
        let s = &d.slot.stats;
        bump(&s.packets, sent);
        bump(&s.bytes, bytes);
        bump(&s.kernel_copies, sent);
        s.drop(DropReason::NoBuffer, full + gone);
        s.drop(DropReason::Malformed, refused);
    }

    /// Writes every packet bound to `d` to the TAP queue `t`.
    pub(super) fn send_tap(
        &mut self,
        d: &Dest<'_>,
        t: &mut TapQueue,
        src_hdr: u32,
        set: PktSet,
        c: &mut SrcCounts,
    ) {
        if t.sends_batched() {
            return self.send_tap_batched(d, t, src_hdr, set, c);
        }
        let mut k = Sends::default();
        for i in each(set) {
            let Some(edit) = self.edit_for(d, i, c) else { continue };
            if t.broken() {
                k.full += 1;
                continue;
            }
            let p = &self.desc.pkts[i];
            let mut out = Out::new();
            let m = self.packet_iov(i, edit, src_hdr, &mut out);
            if m == 0 {
                k.refused += 1;
                continue;
            }
            match t.send(&out.iov[..m]) {
                Sent::Ok => {
                    k.sent += 1;
                    k.whole += (p.offload && self.desc.vhdrs[i].gso_type != crate::offload::GSO_NONE) as u64;
                    k.bytes += out_len(p.len, edit) as u64;
                }
                Sent::Full | Sent::Gone => k.full += 1,
                Sent::Refused => k.refused += 1,
            }
        }
        t.flush();
        // A sink that finishes offloads itself sent those TSO frames as segments, not whole.
        (k.segmented, k.csummed) = t.soft_counts();
        k.whole = k.whole.saturating_sub(k.segmented);
        k.count(d);
    }

    /// [`Datapath::send_tap`] for a packet socket: every packet bound to `d` laid out first
    /// (header, head, pieces of the sender's buffers), then all of them in one `sendmmsg`.
    fn send_tap_batched(
        &mut self,
        d: &Dest<'_>,
        t: &mut TapQueue,
        src_hdr: u32,
        set: PktSet,
        c: &mut SrcCounts,
    ) {
        let mut k = Sends::default();
        let mut outs = std::mem::take(&mut self.tx_outs);
        // Per frame laid out: its pieces, whether it is a TSO frame, its length.
        let mut laid = [(0usize, false, 0u32); BURST];
        let mut m = 0;
        for i in each(set) {
            let Some(edit) = self.edit_for(d, i, c) else { continue };
            if t.broken() {
                k.full += 1;
                continue;
            }
            let p = &self.desc.pkts[i];
            // An earlier burst's header must not stay (a frame without offloads has none).
            outs[m].hdr = [0; VNET_HDR as usize];
            let pieces = self.packet_iov(i, edit, src_hdr, &mut outs[m]);
            if pieces == 0 {
                k.refused += 1;
                continue;
            }
            let tso = p.offload && self.desc.vhdrs[i].gso_type != crate::offload::GSO_NONE;
            laid[m] = (pieces, tso, out_len(p.len, edit));
            m += 1;
        }
        let mut frames: [&[libc::iovec]; BURST] = [&[]; BURST];
        for (f, (o, l)) in frames.iter_mut().zip(outs.iter().zip(&laid[..m])) {
            *f = &o.iov[..l.0];
        }
        let mut sent = [Sent::Ok; BURST];
        t.send_many(&frames[..m], &mut sent[..m]);
        for (r, l) in sent[..m].iter().zip(&laid[..m]) {
            match r {
                Sent::Ok => {
                    k.sent += 1;
                    k.whole += l.1 as u64;
                    k.bytes += l.2 as u64;
                }
                Sent::Full | Sent::Gone => k.full += 1,
                Sent::Refused => k.refused += 1,
            }
        }
        self.tx_outs = outs;
        k.count(d);
    }
}

impl Sends {
    /// Adds what the delivery to `d` did to its counters.
    fn count(&self, d: &Dest<'_>) {
        let s = &d.slot.stats;
        bump(&s.packets, self.sent);
        bump(&s.bytes, self.bytes);
        bump(&s.kernel_copies, self.sent);
        s.drop(DropReason::NoBuffer, self.full);
        s.drop(DropReason::Malformed, self.refused);
        bump(&s.gso_whole, self.whole);
        bump(&s.gso_segmented, self.segmented);
        bump(&s.csum_completed, self.csummed);
    }
}

impl Datapath {
    /// A guest's receive ring plugged into a Level 2 NIC: the software path hands each packet
    /// bound to it to the device (a host transmit the device loops back to the guest's pool),
    /// whose DMA writes it into the guest's posted buffer, so no CPU copies it. An offload
    /// request the guest did not negotiate cannot be handed over as it is: dropped, counted.
    pub(super) fn send_accel(
        &mut self,
        d: &Dest<'_>,
        a: &mut crate::accel::AccelRx,
        src_hdr: u32,
        set: PktSet,
        c: &mut SrcCounts,
    ) {
        use crate::accel::Took;
        use crate::offload::{F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6};
        use nic_models::RxDrop;
        let (mut sent, mut bytes, mut no_buf, mut bad) = (0u64, 0u64, 0u64, 0u64);
        let caps = a.shell.caps;
        for i in each(set) {
            let Some(edit) = self.edit_for(d, i, c) else { continue };
            let mut out = Out::new();
            let m = self.packet_iov(i, edit, src_hdr, &mut out);
            let (flags, gso) = (out.hdr[0], out.hdr[1]);
            let takes = match gso & 0x7f {
                GSO_NONE => true,
                GSO_TCPV4 => caps.rx_tso4,
                GSO_TCPV6 => caps.rx_tso6,
                _ => false,
            } && (flags & F_NEEDS_CSUM == 0 || caps.rx_csum);
            if m == 0 || !takes {
                bad += 1;
                continue;
            }
            let mut parts: [&[u8]; MAX_SEGS + 1] = [&[]; MAX_SEGS + 1];
            let mut len = 0usize;
            for (k, v) in out.iov[1..m].iter().enumerate() {
                // SAFETY: each piece is the head above or a grant of the sender's memory, which
                // the sender's queue lock (held by our caller) keeps mapped.
                parts[k] = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
                len += v.iov_len;
            }
            match a.receive(&out.hdr, &parts[..m - 1]) {
                Ok(Took::Now) => {
                    sent += 1;
                    bytes += len as u64;
                }
                // Counted when the device writes it; or the VF's filter (Level 3) took it,
                // counted in the VF's statistics.
                Ok(Took::Parked | Took::Filtered) => {}
                // No buffer, or a full parking behind a vIOMMU.
                Err(RxDrop::NoBuffer | RxDrop::TooSmall | RxDrop::Miss { .. }) => no_buf += 1,
                Err(_) => bad += 1,
            }
        }
        let s = &d.slot.stats;
        bump(&s.packets, sent);
        bump(&s.bytes, bytes);
        bump(&s.device_dma, sent);
        s.drop(DropReason::NoBuffer, no_buf);
        s.drop(DropReason::Malformed, bad);
        if sent > 0 && a.q.publish() && a.shell.signal() {
            bump(&s.interrupts, 1);
        }
    }
}
