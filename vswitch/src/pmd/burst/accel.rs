//! A guest's transmit ring plugged into a Level 2 NIC: the device's transmit work, run by the
//! thread that polls the slot and timed apart from the host's.
//!
//! The device fetches what the guest posted (DMA reads through the port's domain), checks each
//! frame's source with the port's own anti-spoofing filter (one policy, two enforcers), charges
//! the guest's `nic-rate=` bucket (back-pressure: an over-rate chain stays posted), and sends
//! unicast for the uplink's side straight onto its wire through its pool's transmit queue.
//! Broadcast, multicast and frames for other guests go to the software path, which switches
//! them as frames from this port (Level 2 keeps a software path for inter-domain traffic).

use super::*;
use crate::accel::{AccelTx, Took};
use crate::clock::ticks;
use crate::l2::{is_group, mac_from_bytes};
use crate::policy::spoof::{SpoofFilter, Verdict};
use nic_models::direct::{SourceCheck, Wire};
use nic_models::sriov::{self, Egress};

/// The port's anti-spoofing filter as the device's source check.
struct PortCheck<'a>(Option<&'a SpoofFilter>);

impl SourceCheck for PortCheck<'_> {
    fn check(&self, frame: &[u8]) -> Result<(), &'static str> {
        match self.0.map_or(Verdict::Pass, |s| s.check(frame)) {
            Verdict::Pass => Ok(()),
            Verdict::Drop(_) => Err("source not allowed"),
            // The whole frame was given: it is shorter than what the check must see.
            Verdict::NeedBytes(_) => Err("too short to check"),
        }
    }
}

impl Datapath {
    /// One poll of a plugged transmit ring; returns chains the device took.
    pub(super) fn burst_accel(&mut self, src: &Port, a: &mut AccelTx, now: u32, c: &mut SrcCounts) -> usize {
        let t0 = ticks();
        let hdr = a.shell.hdr_len as usize;
        let nic = self.ports.get(a.nic as usize).and_then(|p| p.clone());
        let nic_id = a.nic;
        let vlan = src.vlan.ingress(None);
        let now_ns = crate::clock::now_ns();
        let (mut wired, mut wired_bytes) = (0u64, 0u64);
        let mut learn: Option<(Mac, u16)> = None;
        let polled = {
            let ing = src.policy.ingress.lock();
            let check = PortCheck(if src.policy.spoof_on() { ing.spoof.as_ref() } else { None });
            let mut nic_tx = nic.as_ref().map(|p| p.rxq[0].lock());
            let fdb = &self.fdb;
            let soft = &mut a.soft;
            let mut vf = a.vf.as_deref_mut();
            let mut wire = |mut f: Vec<u8>| -> Result<(), Wire> {
                if f.len() < hdr + 14 {
                    return Err(Wire::Lost);
                }
                // Level 3: the VF's policy, then the embedded switch.
                if let Some(v) = vf.as_deref_mut() {
                    match sriov::egress(&v.vf, true, &f[hdr..]) {
                        Egress::Drop(_) => {
                            v.stats.tx_dropped += 1;
                            return Err(Wire::Lost);
                        }
                        Egress::Pass(Some(tag)) => drop(f.splice(hdr + 12..hdr + 12, tag)),
                        Egress::Pass(None) => {}
                    }
                    v.stats.tx_packets += 1;
                    v.stats.tx_bytes += (f.len() - hdr) as u64;
                    if let Some(e) = sriov::veb(&v.veb, v.n, &f[hdr..]) {
                        v.veb_out.push((e, f));
                        return Ok(());
                    }
                }
                let dst = mac_from_bytes(f[hdr..hdr + 6].try_into().expect("6 bytes"));
                let tag = (f.len() >= hdr + 18 && matches!(f[hdr + 12..hdr + 14], [0x81, 0] | [0x88, 0xa8]))
                    .then(|| u16::from_be_bytes([f[hdr + 14], f[hdr + 15]]) & 0xfff);
                // A VF's frames carry its port VLAN on the PF's wire (a trunk); Level 2's leave
                // untagged.
                let fv = match (tag, vf.is_some()) {
                    (None, _) => vlan,
                    (Some(t), true) => Some(t),
                    (Some(_), false) => None,
                };
                let uplink = !is_group(dst) && fv.is_some_and(|v| fdb.lookup(v, dst, now) == Some(nic_id));
                // After a frame for the software path, the rest of the poll follows it there:
                // what the guest sent reaches the wire in the order it was sent.
                let t = match nic_tx.as_deref_mut() {
                    Some(Some(Queue::NicTx(t))) if uplink && soft.is_empty() => t,
                    _ => {
                        soft.push(f);
                        return Ok(());
                    }
                };
                // The wire side's frames carry a 12-byte header.
                if hdr == 10 {
                    f.splice(10..10, [0, 0]);
                }
                let len = (f.len() - 12) as u64;
                let src_mac = mac_from_bytes(f[18..24].try_into().expect("6 bytes"));
                match t.sched.enqueue(t.pool_of(src.id), f) {
                    Ok(()) => {
                        wired += 1;
                        wired_bytes += len;
                        learn = fv.map(|v| (src_mac, v));
                        Ok(())
                    }
                    Err(mut f) => {
                        if hdr == 10 {
                            f.drain(10..12);
                        }
                        Err(Wire::Full(f))
                    }
                }
            };
            let r = a.q.poll(BURST, &check, a.rate.as_mut(), now_ns, &mut wire, &mut a.k);
            // What the device queued goes out now, as its own scheduler allows.
            if let Some(Some(Queue::NicTx(t))) = nic_tx.as_deref_mut() {
                if wired > 0 {
                    let (sent, bytes, gone) = t.service(now_ns);
                    let s = &nic.as_ref().expect("locked").rxq[0].stats;
                    bump(&s.packets, sent);
                    bump(&s.bytes, bytes);
                    s.drop(DropReason::NoBuffer, gone);
                }
            }
            r
        };
        a.device_ticks += ticks().wrapping_sub(t0);
        let (fetched, _done, irq, miss) = match polled {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(port = %src.name, "stopping a plugged transmit queue: {e}");
                a.shell.broken = true;
                return 0;
            }
        };
        // Behind a vIOMMU: the device asks the frontend for a missing translation and the
        // chain waits, posted, until it comes or the miss times out (then it is a fault).
        if let Some(iova) = miss {
            if !super::viommu::tx_miss(&mut a.shell, a.q.next_avail(), iova) {
                let _ = a.q.fault_next(&mut a.k);
            }
        } else if fetched > 0 {
            if let Some(l) = a.shell.iotlb.as_deref_mut() {
                l.tx_moved();
            }
        }
        if irq && a.shell.signal() {
            bump(&src.txq[0].stats.interrupts, 1);
        }
        c.packets += wired;
        c.bytes += wired_bytes;
        if let Some((mac, v)) = learn {
            self.fdb.learn(v, mac, src.id, now);
        }
        if a.vf.as_ref().is_some_and(|v| !v.veb_out.is_empty()) {
            self.veb_deliver(src, a);
        }
        // The rest through the software path, as frames this port sent.
        let spoof = src.policy.ingress_on() && src.policy.spoof_on();
        for chunk in a.soft.chunks(BURST) {
            let n = chunk.len();
            for (j, f) in chunk.iter().enumerate() {
                // SAFETY: the buffer stays in `a.soft`, untouched, until the burst is done.
                let g = unsafe { Grant::<Ro>::from_raw(f.as_ptr() as *mut u8, f.len() as u32) };
                self.desc.pkts[j] = PacketRef {
                    give_back: false,
                    nseg: 1,
                    len: g.len() - hdr as u32,
                    action: Action::Flood,
                    ..PacketRef::default()
                };
                self.desc.segs[j][0] = g;
            }
            self.describe_frames(n, hdr as u32, a.shell.caps, spoof, c);
            self.forward(src, hdr as u32, n, now, c);
        }
        for f in a.soft.drain(..) {
            a.q.recycle(f);
        }
        fetched
    }

    /// Level 3's embedded switch: the device writes what one VF sent to another straight into
    /// that guest's receive buffers (read from one guest's memory, written into the other's:
    /// two crossings of the bus, no host copy), each run of frames for one guest under one
    /// lock, one publish and at most one interrupt. A VF detached meanwhile gets its frames
    /// through the software path. Timed as the device's work.
    #[cold]
    fn veb_deliver(&mut self, src: &Port, a: &mut AccelTx) {
        let t0 = ticks();
        let hdr = a.shell.hdr_len as usize;
        let Some(v) = a.vf.as_deref_mut() else { return };
        let mut out = std::mem::take(&mut v.veb_out);
        let mut missed = Vec::new();
        let mut i = 0;
        while i < out.len() {
            let e = out[i].0;
            let n = out[i..].iter().take_while(|(x, _)| x.port == e.port && x.vf == e.vf).count();
            let run = i..i + n;
            i += n;
            let dst = self.ports.get(e.port as usize).and_then(|p| p.clone()).filter(|d| d.id != src.id);
            let Some(d) = dst else {
                missed.extend(run);
                continue;
            };
            let mut g = d.rxq[0].lock();
            let r = match g.as_mut() {
                Some(Queue::AccelRx(r)) if r.nic == a.nic && r.vf.as_ref().is_some_and(|x| x.n == e.vf) => r,
                _ => {
                    missed.extend(run);
                    continue;
                }
            };
            let (mut sent, mut bytes, mut no_buf) = (0u64, 0u64, 0u64);
            for (_, f) in &out[run] {
                let mut h = [0u8; 12];
                h[..hdr.min(12)].copy_from_slice(&f[..hdr.min(12)]);
                match r.receive(&h, &[&f[hdr..]]) {
                    Ok(Took::Now) => {
                        sent += 1;
                        bytes += (f.len() - hdr) as u64;
                    }
                    Ok(Took::Parked) => v.veb_frames += 1,
                    Ok(Took::Filtered) => {}
                    Err(_) => no_buf += 1,
                }
            }
            v.veb_frames += sent;
            let s = &d.rxq[0].stats;
            bump(&s.packets, sent);
            bump(&s.bytes, bytes);
            bump(&s.device_dma, sent);
            s.drop(DropReason::NoBuffer, no_buf);
            if sent > 0 && r.q.publish() && r.shell.signal() {
                bump(&s.interrupts, 1);
            }
        }
        // In order, behind what the poll already gave the software path.
        for k in missed {
            a.soft.push(std::mem::take(&mut out[k].1));
        }
        out.clear();
        v.veb_out = out;
        a.device_ticks += ticks().wrapping_sub(t0);
    }
}
