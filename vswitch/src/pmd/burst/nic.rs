//! A NIC model's receive side. The device reads frames off the wire and steers them: frames
//! its classifier puts in a bound guest's pool are written by its DMA engine straight into
//! that guest's receive ring (through the ring's IOMMU domain, no CPU copy); the rest (the
//! default pool) take the software path like any uplink's frames. The device's part is timed
//! apart from the host's.

use super::*;
use nic_models::engines::lro::Out;
use nic_models::engines::{csum, layout, TCP};
use nic_models::{dma_rx, PcieCost, RxDrop, RxFormat, Steer};

use super::viommu::has_parked;
use crate::clock::ticks;
use crate::l2::flow::{flow_hash, FLOW_LOOK};
use crate::l2::{is_group, mac_from_bytes};
use crate::offload::{self, Caps};
use crate::uplink::nic::{NicQueue, Wire};
use crate::uplink::tap::{Recv, VNET_HDR};

/// A frame the device put in a guest's pool.
#[derive(Clone, Copy, Default)]
struct Steered {
    /// Index in the burst's wire frames.
    frame: u8,
    pool: u8,
    owner: u16,
    strip: bool,
}

/// The frames of one burst that go to the software path, by index, in arrival order.
struct Soft {
    idx: [u8; BURST],
    n: usize,
}

impl Soft {
    fn push(&mut self, i: u8) {
        self.idx[self.n] = i;
        self.n += 1;
    }
}

/// The bytes of a staging buffer the wire filled.
#[inline(always)]
fn bytes(g: &Grant<Ro>) -> &[u8] {
    // SAFETY: the grant is one of the wire queue's own staging buffers (made by `recv`), which
    // live as long as the queue whose slot lock the burst holds.
    unsafe { std::slice::from_raw_parts(g.as_ptr(), g.len() as usize) }
}

/// How long the frames on the wire are that staging buffer `b` (header, frame) stands for: a
/// TSO frame from the kernel is as long as its segments (header length plus `gso_size`).
#[inline(always)]
fn wire_len(b: &[u8]) -> usize {
    let frame = b.len() - VNET_HDR as usize;
    if b[1] & 0x7f == offload::GSO_NONE {
        return frame;
    }
    let hdr_len = u16::from_le_bytes([b[2], b[3]]) as usize;
    let gso_size = u16::from_le_bytes([b[4], b[5]]) as usize;
    frame.min(hdr_len + gso_size)
}

/// The wire frame's virtio-net header as guest `caps` may receive it, or None if the guest
/// did not negotiate what it asks (the software path then completes or cuts it).
#[inline(always)]
fn header_for(caps: Caps, h: &[u8], f: &[u8], strip: bool, verified: &mut u64) -> Option<[u8; 12]> {
    let mut out = [0u8; 12];
    out.copy_from_slice(&h[..12]);
    let (flags, gso) = (h[0], h[1]);
    let plain_gso = gso & 0x7f;
    let ok = match plain_gso {
        offload::GSO_NONE => true,
        offload::GSO_TCPV4 => caps.rx_tso4,
        offload::GSO_TCPV6 => caps.rx_tso6,
        _ => false,
    };
    let needs_csum = flags & offload::F_NEEDS_CSUM != 0;
    if !ok || (gso & offload::GSO_ECN != 0 && !caps.rx_ecn) || (needs_csum && !caps.rx_csum) {
        return None;
    }
    // An offset into the frame would move with a stripped tag: the software path does that.
    if strip && (needs_csum || plain_gso != offload::GSO_NONE) {
        return None;
    }
    if !caps.rx_csum {
        out[0] &= !offload::F_DATA_VALID;
    } else if flags == 0 && gso == 0 && csum::verify(f).data_valid() {
        // The receive checksum offload: the device checked it, the guest need not.
        out[0] |= offload::F_DATA_VALID;
        *verified += 1;
    }
    Some(out)
}

impl Datapath {
    /// One burst from a NIC model's wire queue.
    #[inline(never)]
    pub(super) fn burst_nic(&mut self, src: &Port, nq: &mut NicQueue, now: u32, c: &mut SrcCounts) -> usize {
        service_tx(src);
        let mut wire = [Grant::<Ro>::default(); BURST];
        let m = read_wire(nq, &mut wire, c);
        if nq.irq_held != 0 {
            self.raise_held(nq, m == 0);
        }
        if m == 0 {
            return 0;
        }
        // A TAP's read is the kernel's copy; an in-process wire hands its frames over whole.
        if matches!(nq.wire, Wire::Tap(_)) {
            c.kernel_copies += m as u64;
        }
        let t0 = ticks();
        let m = if nq.lro.is_some() { coalesce(nq, &mut wire, m) } else { m };
        let mut steered = [Steered::default(); BURST];
        let mut ns = 0;
        let mut soft = Soft { idx: [0; BURST], n: 0 };
        // The uplink's policy (policer, anti-spoofing) is applied by the software path: with
        // one on, the device steers nothing.
        let steer_on = !src.policy.ingress_on();
        for (i, g) in wire[..m].iter().enumerate() {
            let b = bytes(g);
            if b.len() < VNET_HDR as usize + 14 {
                c.malformed += 1;
                continue;
            }
            match steer_on.then(|| nq.nic.steer_len(&b[VNET_HDR as usize..], wire_len(b))) {
                Some(Steer::Pool { pool, owner, strip }) => {
                    // Kept in arrival order per owner (insertion; a burst is 32 frames).
                    let mut k = ns;
                    while k > 0 && steered[k - 1].owner > owner {
                        steered[k] = steered[k - 1];
                        k -= 1;
                    }
                    steered[k] = Steered { frame: i as u8, pool, owner, strip };
                    ns += 1;
                }
                Some(Steer::Drop(_)) => c.filtered += 1,
                _ => soft.push(i as u8),
            }
        }
        let before = soft.n;
        let ports = std::mem::take(&mut self.ports);
        let mut k = 0;
        while k < ns {
            let owner = steered[k].owner;
            let end = k + steered[k..ns].iter().take_while(|s| s.owner == owner).count();
            match ports.get(owner as usize).and_then(|p| p.as_deref()) {
                Some(dport) => self.device_rx(nq, dport, &wire, &steered[k..end], &mut soft, c),
                None => steered[k..end].iter().for_each(|s| soft.push(s.frame)),
            }
            k = end;
        }
        self.ports = ports;
        nq.device_ticks += ticks().wrapping_sub(t0);
        if soft.n > before {
            nq.fallbacks += (soft.n - before) as u64;
            soft.idx[..soft.n].sort_unstable();
        }
        // Host work for what the device delivered: its sources are learned as the software
        // path would have (replies must not flood).
        for s in &steered[..ns] {
            let f = &bytes(&wire[s.frame as usize])[VNET_HDR as usize..];
            let tagged = f[12] == 0x81 && f[13] == 0 && f.len() >= 18;
            let tci = tagged.then(|| u16::from_be_bytes([f[14], f[15]]));
            let mac = mac_from_bytes(f[6..12].try_into().expect("6 bytes"));
            if let (Some(vlan), false) = (src.vlan.ingress(tci), is_group(mac)) {
                self.fdb.learn(vlan, mac, src.id, now);
            }
        }
        for (j, &i) in soft.idx[..soft.n].iter().enumerate() {
            let g = wire[i as usize];
            self.desc.pkts[j] = PacketRef {
                give_back: false,
                nseg: 1,
                len: g.len() - VNET_HDR,
                action: Action::Flood,
                ..PacketRef::default()
            };
            self.desc.segs[j][0] = g;
        }
        if soft.n > 0 {
            let spoof = src.policy.ingress_on() && src.policy.spoof_on();
            // Coalesced frames carry an offload request, as a TAP's kernel frames would.
            let caps = match nq.lro.is_some() {
                true => Caps { tx_csum: true, tx_tso4: true, tx_tso6: true, ..nq.wire.caps() },
                false => nq.wire.caps(),
            };
            self.describe_frames(soft.n, VNET_HDR, caps, spoof, c);
            self.forward(src, VNET_HDR, soft.n, now, c);
        }
        m
    }

    /// Raises the guests' held interrupts that are due (all of them when the device is `idle`).
    pub fn raise_held(&mut self, nq: &mut NicQueue, idle: bool) {
        let now = crate::clock::now_ns();
        let mut held = nq.irq_held;
        while held != 0 {
            let pool = held.trailing_zeros() as u8;
            held &= held - 1;
            if !nq.due(pool, now, idle) {
                continue;
            }
            let Some(owner) = nq.nic.owner_of(pool) else { continue };
            let Some(dport) = self.ports.get(owner as usize).and_then(|p| p.as_deref()) else { continue };
            for slot in dport.rxq.iter() {
                let mut g = slot.lock();
                if let Some(Queue::Virtio(rq)) = g.as_mut() {
                    if rq.notify() {
                        bump(&slot.stats.interrupts, 1);
                    }
                }
            }
        }
    }

    /// The device's DMA of `frames` (all bound to `dport`) into the guest's receive ring(s);
    /// what the guest cannot take as it is goes to `soft`.
    fn device_rx(
        &mut self,
        nq: &mut NicQueue,
        dport: &Port,
        wire: &[Grant<Ro>; BURST],
        frames: &[Steered],
        soft: &mut Soft,
        c: &mut SrcCounts,
    ) {
        // A shaped guest's used ring holds packets back: only the software path may add to it.
        if dport.policy.egress_on() {
            return frames.iter().for_each(|s| soft.push(s.frame));
        }
        let pairs = dport.rxq.len();
        let queue_of = |s: &Steered| -> usize {
            match pairs {
                1 => 0,
                _ => {
                    let f = &bytes(&wire[s.frame as usize])[VNET_HDR as usize..];
                    flow_hash(&f[..f.len().min(FLOW_LOOK)]) as usize % pairs
                }
            }
        };
        for q in 0..pairs {
            if pairs > 1 && !frames.iter().any(|s| queue_of(s) == q) {
                continue;
            }
            let slot = &dport.rxq[q];
            let mut g = slot.lock();
            // A ring plugged into the device (Level 2): its own queue takes the frames.
            if let Some(Queue::AccelRx(a)) = g.as_mut() {
                let mine = frames.iter().filter(|s| queue_of(s) == q);
                accel_rx(nq, a, slot, wire, mine, soft, c);
                continue;
            }
            // The device models DMA into split rings only: a packed ring's frames take the
            // software path.
            let rq = match g.as_mut() {
                Some(Queue::Virtio(rq))
                    if !rq.broken && rq.held == 0 && !has_parked(rq) && !rq.ring.is_packed() =>
                {
                    rq
                }
                _ => {
                    frames.iter().filter(|s| queue_of(s) == q).for_each(|s| soft.push(s.frame));
                    continue;
                }
            };
            let fmt = RxFormat {
                hdr_len: rq.hdr_len as u32,
                mergeable: rq.mrg_rxbuf,
                indirect: rq.indirect,
                cost: PcieCost::default(),
            };
            let (mut pk, mut by, mut no_buf, mut bad) = (0u64, 0u64, 0u64, 0u64);
            for s in frames.iter().filter(|s| queue_of(s) == q) {
                let b = bytes(&wire[s.frame as usize]);
                let (h, f) = b.split_at(VNET_HDR as usize);
                let Some(hdr) = header_for(rq.caps, h, f, s.strip, &mut nq.csum_verified) else {
                    soft.push(s.frame);
                    continue;
                };
                let tagged = f.len() >= 18 && f[12] == 0x81 && f[13] == 0;
                let (p0, p1): (&[u8], &[u8]) =
                    if s.strip && tagged { (&f[..12], &f[16..]) } else { (f, &[]) };
                let virtq::Ring::Split(ring) = &mut rq.ring else {
                    soft.push(s.frame);
                    continue;
                };
                match dma_rx(ring, &mut rq.dma, &fmt, &mut nq.scratch, &mut nq.device, &hdr, &[p0, p1]) {
                    Ok(()) => {
                        pk += 1;
                        by += (p0.len() + p1.len()) as u64;
                    }
                    // The translation is the software path's to ask for (it parks the frame).
                    Err(RxDrop::Miss { .. } | RxDrop::Quiesced) => soft.push(s.frame),
                    Err(RxDrop::NoBuffer | RxDrop::TooSmall) => no_buf += 1,
                    Err(RxDrop::Fault(_)) => bad += 1,
                    Err(RxDrop::Broken(e)) => {
                        rq.broken = true;
                        no_buf += 1;
                        tracing::warn!(port = %dport.name, "stopping receive queue: {e}");
                    }
                }
            }
            count_dma(c, &slot.stats, pk, by, no_buf, bad);
            rq.publish();
            // The device's interrupt, moderated: now, or held until the interval is up.
            let pool = frames[0].pool;
            if nq.moderate(pool, crate::clock::now_ns(), pk, by) && rq.notify() {
                bump(&slot.stats.interrupts, 1);
            }
        }
    }
}

/// The device's DMA of `frames` into a receive ring plugged into it (Level 2): what the guest
/// cannot take as it is goes to `soft`.
fn accel_rx<'a>(
    nq: &mut NicQueue,
    a: &mut crate::accel::AccelRx,
    slot: &QueueSlot,
    wire: &[Grant<Ro>; BURST],
    frames: impl Iterator<Item = &'a Steered>,
    soft: &mut Soft,
    c: &mut SrcCounts,
) {
    if a.shell.broken {
        return frames.for_each(|s| soft.push(s.frame));
    }
    let (mut pk, mut by, mut no_buf, mut bad) = (0u64, 0u64, 0u64, 0u64);
    for s in frames {
        let b = bytes(&wire[s.frame as usize]);
        let (h, f) = b.split_at(VNET_HDR as usize);
        let Some(hdr) = header_for(a.shell.caps, h, f, s.strip, &mut nq.csum_verified) else {
            soft.push(s.frame);
            continue;
        };
        let tagged = f.len() >= 18 && f[12] == 0x81 && f[13] == 0;
        let (p0, p1): (&[u8], &[u8]) = if s.strip && tagged { (&f[..12], &f[16..]) } else { (f, &[]) };
        // Behind a vIOMMU a buffer's missing translation parks the frame (and those after
        // it) in the device until the frontend answers.
        match a.receive(&hdr, &[p0, p1]) {
            Ok(crate::accel::Took::Now) => {
                pk += 1;
                by += (p0.len() + p1.len()) as u64;
            }
            Ok(crate::accel::Took::Parked) => c.packets += 1,
            // The VF's filter (Level 3): counted in its statistics.
            Ok(crate::accel::Took::Filtered) => c.filtered += 1,
            Err(RxDrop::NoBuffer | RxDrop::TooSmall | RxDrop::Miss { .. }) => no_buf += 1,
            Err(RxDrop::Fault(_)) => bad += 1,
            Err(RxDrop::Quiesced) => soft.push(s.frame),
            Err(RxDrop::Broken(e)) => {
                a.shell.broken = true;
                no_buf += 1;
                tracing::warn!("stopping a plugged receive queue: {e}");
            }
        }
    }
    count_dma(c, &slot.stats, pk, by, no_buf, bad);
    if pk > 0 && a.q.publish() && a.shell.signal() {
        bump(&slot.stats.interrupts, 1);
    }
}

/// Counts a burst's frames the device wrote into a guest's ring (`pk`, `by` bytes) or dropped
/// for want of a buffer or as a DMA fault: for the wire (the source) and the guest's queue.
#[inline(always)]
fn count_dma(c: &mut SrcCounts, s: &QueueStats, pk: u64, by: u64, no_buf: u64, bad: u64) {
    c.packets += pk + no_buf + bad;
    c.bytes += by;
    bump(&s.packets, pk);
    bump(&s.bytes, by);
    bump(&s.device_dma, pk);
    s.drop(DropReason::NoBuffer, no_buf);
    s.drop(DropReason::Malformed, bad);
}

/// The device's large receive offload over a burst: plain TCP frames go through the engine
/// (flushed at the end of the burst, as NAPI flushes GRO at the end of a poll), the rest stay
/// as they are; returns how many frames the burst now has. A coalesced frame goes on behind a
/// virtio-net header asking for TSO with a partial checksum, as the kernel's own would.
fn coalesce(nq: &mut NicQueue, wire: &mut [Grant<Ro>; BURST], m: usize) -> usize {
    let Some(lro) = nq.lro.as_mut() else { return m };
    nq.lro_pool.append(&mut nq.lro_bufs);
    let mut out = std::mem::take(&mut nq.lro_out);
    out.clear();
    let mut keep = 0;
    for i in 0..m {
        let b = bytes(&wire[i]);
        let f = &b[VNET_HDR as usize..];
        if b[0] == 0 && b[1] == 0 && layout(f).is_some_and(|l| l.proto == TCP) {
            lro.receive(f, 0, &mut out);
        } else {
            wire[keep] = wire[i];
            keep += 1;
        }
    }
    lro.flush_all(&mut out);
    for o in out.drain(..) {
        let mut buf = nq.lro_pool.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(&lro_header(&o));
        buf.extend_from_slice(&o.frame);
        lro.recycle(o.frame);
        // SAFETY: the buffer is the queue's own and stays untouched in `lro_bufs` (its heap
        // block does not move with the Vec) until the next burst, under the queue's slot lock.
        wire[keep] = unsafe { Grant::from_raw(buf.as_mut_ptr(), buf.len() as u32) };
        nq.lro_bufs.push(buf);
        keep += 1;
    }
    nq.lro_out = out;
    keep
}

/// The virtio-net header of a frame the LRO engine gave back.
fn lro_header(o: &Out) -> [u8; 12] {
    let mut h = [0u8; 12];
    let Some(l) = layout(&o.frame).filter(|_| o.segs > 1) else { return h };
    h[0] = offload::F_NEEDS_CSUM;
    h[1] = if o.v6 { offload::GSO_TCPV6 } else { offload::GSO_TCPV4 };
    h[2..4].copy_from_slice(&(l.payload as u16).to_le_bytes());
    h[4..6].copy_from_slice(&o.mss.to_le_bytes());
    h[6..8].copy_from_slice(&(l.l4 as u16).to_le_bytes());
    h[8..10].copy_from_slice(&16u16.to_le_bytes());
    h
}

/// Lets a NIC's transmit side put out what its shapers allow now (no sender's burst may come
/// to do it). Skips a queue another thread holds.
fn service_tx(nic: &Port) {
    for slot in nic.rxq.iter() {
        let Some(mut g) = slot.try_lock() else { continue };
        if let Some(Queue::NicTx(t)) = g.as_mut() {
            if t.sched.queued() > 0 {
                let (sent, bytes, gone) = t.service(crate::clock::now_ns());
                bump(&slot.stats.packets, sent);
                bump(&slot.stats.bytes, bytes);
                bump(&slot.stats.kernel_copies, sent);
                slot.stats.drop(DropReason::NoBuffer, gone);
            }
        }
    }
}

/// When a NIC's transmit side has a shaped frame to put out next, ns from now.
pub fn tx_wait_ns(nic: &Port) -> Option<u64> {
    nic.rxq
        .iter()
        .filter_map(|slot| match slot.try_lock()?.as_ref() {
            Some(Queue::NicTx(t)) => t.sched.wait_ns(),
            _ => None,
        })
        .min()
}

/// Reads up to a burst of frames off the wire into the queue's staging buffers (the wire's
/// copy); frames the kernel cut are counted and skipped.
fn read_wire(nq: &mut NicQueue, wire: &mut [Grant<Ro>; BURST], c: &mut SrcCounts) -> usize {
    let mut n = 0;
    for _ in 0..2 * BURST {
        if n == BURST {
            break;
        }
        match nq.wire.recv(n) {
            Recv::Frame(g) => {
                wire[n] = g;
                n += 1;
            }
            Recv::Truncated => c.malformed += 1,
            Recv::Empty | Recv::Gone => break,
        }
    }
    n
}
