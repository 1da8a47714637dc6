use super::*;
use iommu::{Access, FaultReason, GrantWriter};

use crate::clock::now_ns;
use crate::vhost::iotlb::{MISS_TIMEOUT_NS, PARK_MAX};
use crate::virtio::{QueueStats, VirtQueue};

use super::render::Headers;
use super::rxbufs::{push_used_spread, take_rx};

impl Datapath {
    /// Looks at the receive buffers guests behind a vIOMMU posted since the last look and asks
    /// for the translations the IOTLB lacks, so a packet seldom finds its buffer untranslated
    /// (a guest in strict IOMMU mode maps every buffer afresh when it posts it).
    /// Returns whether any port is behind a vIOMMU.
    pub fn translate_rx_ahead(&self) -> bool {
        let mut any = false;
        for &id in &self.port_ids {
            let Some(port) = self.ports[id as usize].as_deref() else { continue };
            if !port.iova.load(std::sync::atomic::Ordering::Relaxed) {
                continue;
            }
            any = true;
            for slot in port.rxq.iter() {
                let Some(mut g) = slot.try_lock() else { continue };
                // A plugged ring: the device writes what it parked once the buffers translate.
                if let Some(Queue::AccelRx(a)) = g.as_mut() {
                    // The device asks ahead for its posted buffers' translations, as the
                    // software path does (a device with ATS): a guest that maps each buffer as
                    // it posts it costs one round trip per burst, not one per buffer.
                    if let Some(l) = a.shell.iotlb.as_deref_mut() {
                        let (ring, dma) = a.q.ring_and_dma();
                        lookahead(ring, dma, l);
                    }
                    if a.has_parked() {
                        let u = a.unpark(now_ns());
                        if u.packets > 0 && a.q.publish() && a.shell.signal() {
                            bump(&slot.stats.interrupts, 1);
                        }
                        let s = &slot.stats;
                        bump(&s.packets, u.packets);
                        bump(&s.bytes, u.bytes);
                        bump(&s.device_dma, u.packets);
                        s.drop(DropReason::NoBuffer, u.timed_out);
                        s.drop(DropReason::Malformed, u.faults);
                    }
                    continue;
                }
                if let Some(rq) = g.virtio_mut() {
                    rx_lookahead(rq);
                    if has_parked(rq) {
                        let d = drain_parked(rq);
                        if d.packets > 0 {
                            rq.publish();
                            if rq.notify() {
                                bump(&slot.stats.interrupts, 1);
                            }
                        }
                        d.count(&slot.stats);
                    }
                }
            }
        }
        any
    }

    /// Parks unit `u` on `rq`, whose next receive buffer waits for a translation: rendered
    /// (header included) into the switch's memory, the only copy made off the late-copy path.
    /// False if the queue has [`PARK_MAX`] parked already: the unit is dropped (counted).
    #[cold]
    #[inline(never)]
    pub(super) fn park(&mut self, rq: &mut VirtQueue, u: Unit, src_hdr: u32) -> bool {
        let (hdr_len, caps) = (rq.hdr_len as u32, rq.caps);
        let Some(l) = rq.iotlb.as_deref_mut() else { return false };
        if l.parked.len() >= PARK_MAX {
            l.stats().rx_miss_drops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return false;
        }
        let mut buf = vec![0u8; (hdr_len + u.wire_len) as usize];
        // SAFETY: `buf` is ours and as long as the grant says; the sender's chain was walked
        // and its queue lock is held by our caller.
        let wrote = unsafe {
            let dst = Grant::<Rw>::from_raw(buf.as_mut_ptr(), buf.len() as u32);
            let fmt = Headers { caps, hdr_len, src_hdr };
            self.render(u, 1, fmt, std::slice::from_ref(&dst)).0
        };
        buf.truncate(wrote as usize);
        l.parked.push_back((buf, now_ns()));
        l.stats().rx_parked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }
}

/// A transmit chain at `head` missed the IOTLB at `iova`: asks for the translation and says
/// whether to wait for it (true) or to drop the chain as a DMA fault, recorded (false).
#[cold]
#[inline(never)]
pub(super) fn tx_miss(q: &mut VirtQueue, head: u16, iova: u64) -> bool {
    let now = now_ns();
    let wait = q.iotlb.as_deref_mut().is_some_and(|l| {
        l.miss(iova, false, now);
        l.tx_wait(head, now)
    });
    if !wait {
        q.dma.fault(iova, 1, Access::Read, FaultReason::NotMapped);
    }
    wait
}

/// A receive buffer missed the IOTLB at `iova`: asks for it and, at once, for every other
/// posted buffer that would miss too, so the guest's first round of buffers waits for one
/// round trip rather than one per buffer page. `dropped`: the packet is lost (counted).
#[cold]
#[inline(never)]
pub(super) fn rx_misses(rq: &mut VirtQueue, iova: u64, dropped: bool) {
    let Some(l) = rq.iotlb.as_deref_mut() else { return };
    l.miss(iova, true, now_ns());
    if dropped {
        l.stats().rx_miss_drops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    l.rx_checked = None;
    rx_lookahead(rq);
}

#[inline(always)]
pub(super) fn has_parked(rq: &VirtQueue) -> bool {
    rq.iotlb.as_deref().is_some_and(|l| !l.parked.is_empty())
}

/// What a drain of parked packets did.
#[derive(Default)]
pub(super) struct Drained {
    pub(super) packets: u64,
    pub(super) bytes: u64,
    pub(super) malformed: u64,
    pub(super) timed_out: u64,
}

impl Drained {
    pub(super) fn count(&self, s: &QueueStats) {
        bump(&s.packets, self.packets);
        bump(&s.bytes, self.bytes);
        bump(&s.copies, self.packets);
        bump(&s.bytes_copied, self.bytes);
        s.drop(DropReason::Malformed, self.malformed);
        s.drop(DropReason::NoBuffer, self.timed_out);
    }
}

/// Delivers parked packets, oldest first, while receive buffers translate; drops (counted)
/// those parked longer than the miss time-out. The caller publishes.
#[cold]
#[inline(never)]
pub(super) fn drain_parked(rq: &mut VirtQueue) -> Drained {
    let mut d = Drained::default();
    let mut rx = RxBufs::default();
    let now = now_ns();
    let hdr_len = rq.hdr_len as u32;
    // A guest that keeps posting bad buffers must not keep the thread here (it holds this
    // queue's lock, and maybe a sender's): at most a burst's worth of them per call.
    while let Some(l) = rq.iotlb.as_deref_mut() {
        if d.malformed >= BURST as u64 {
            break;
        }
        let Some((frame, since)) = l.parked.pop_front() else { break };
        if now.wrapping_sub(since) > MISS_TIMEOUT_NS {
            l.stats().rx_miss_drops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            d.timed_out += 1;
            continue;
        }
        // A parked unit holds its virtio-net header: only the buffer count is new.
        let h = (hdr_len as usize).min(frame.len());
        match take_rx(rq, frame.len() as u32, &mut rx.segs, &mut rx.chains) {
            Ok((nseg, nch)) => {
                let mut hdr = [0u8; 12];
                hdr[..h].copy_from_slice(&frame[..h]);
                if h == 12 {
                    hdr[10..12].copy_from_slice(&(nch as u16).to_le_bytes());
                }
                // SAFETY: the buffers were just walked under this queue's lock, which our
                // caller holds; `frame` is ours.
                let wrote = unsafe {
                    let src = Grant::<Ro>::from_raw(frame.as_ptr() as *mut u8, frame.len() as u32);
                    let mut w = GrantWriter::new(&rx.segs[..nseg]);
                    w.put(&hdr[..h]);
                    w.copy_from(std::slice::from_ref(&src), h as u32, (frame.len() - h) as u32);
                    w.written()
                };
                rq.log_written(&rx.segs[..nseg], wrote);
                push_used_spread(rq, &rx.chains[..nch], wrote);
                d.packets += 1;
                d.bytes += (frame.len() - h) as u64;
            }
            Err(e) => {
                if let RxFail::Malformed(nch) = e {
                    // Bad buffers go back empty; the packet tries the next ones.
                    for &(head, _) in &rx.chains[..nch] {
                        rq.ring.push_used(head, 0);
                    }
                    d.malformed += 1;
                }
                let Some(l) = rq.iotlb.as_deref_mut() else { break };
                l.parked.push_front((frame, since));
                match e {
                    RxFail::Malformed(_) => continue,
                    RxFail::Miss(iova) => l.miss(iova, true, now),
                    RxFail::NoBuffer => {}
                }
                break;
            }
        }
    }
    d
}

/// Most receive buffers one look-ahead pass asks translations for.
pub(super) const LOOKAHEAD: u16 = 64;

/// Asks for the translations of posted receive buffers not looked at yet (all of them after
/// `rx_checked` was reset), [`LOOKAHEAD`] at a time.
pub(super) fn rx_lookahead(rq: &mut VirtQueue) {
    let Some(l) = rq.iotlb.as_deref_mut() else { return };
    lookahead(&mut rq.ring, &mut rq.dma, l);
}

/// [`rx_lookahead`] over any receive ring: the software path's, or one a device drives.
fn lookahead<R: virtq::AvailView>(
    ring: &mut R,
    dma: &mut iommu::Dma,
    l: &mut crate::vhost::iotlb::IotlbLink,
) {
    let pending = ring.avail_pending().unwrap_or(0).min(ring.size());
    let start = ring.taken();
    let from = match l.rx_checked {
        Some(c) if c.wrapping_sub(start) <= pending => c.wrapping_sub(start),
        _ => 0,
    };
    // At most LOOKAHEAD buffers per look: a guest posting a ring of buffers on pages it never
    // maps costs a bounded number of requests per pass, the rest on later passes.
    let to = pending.min(from.saturating_add(LOOKAHEAD));
    l.rx_checked = Some(start.wrapping_add(to));
    if from == to {
        return;
    }
    // `miss` asks once per page: consecutive buffers of one page cost one request.
    let now = now_ns();
    for k in from..to {
        let Some(slot) = ring.head_slot(ring.peek_head(k)) else { continue };
        let d = ring.desc(slot);
        if d.len == 0 || d.flags & virtq::ring::DESC_F_INDIRECT != 0 {
            continue;
        }
        if let Err(iommu::DmaError::Miss { iova, .. }) = dma.translate(d.addr, d.len, Access::Write) {
            l.miss(iova, true, now);
        }
    }
}
