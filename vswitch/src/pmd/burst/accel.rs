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
use crate::accel::AccelTx;
use crate::clock::ticks;
use crate::l2::{is_group, mac_from_bytes};
use crate::policy::spoof::{SpoofFilter, Verdict};
use nic_models::direct::{SourceCheck, Wire};

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
        let mut learn: Option<Mac> = None;
        let polled = {
            let ing = src.policy.ingress.lock();
            let check = PortCheck(if src.policy.spoof_on() { ing.spoof.as_ref() } else { None });
            let mut nic_tx = nic.as_ref().map(|p| p.rxq[0].lock());
            let fdb = &self.fdb;
            let soft = &mut a.soft;
            let mut wire = |mut f: Vec<u8>| -> Result<(), Wire> {
                if f.len() < hdr + 14 {
                    return Err(Wire::Lost);
                }
                let dst = mac_from_bytes(f[hdr..hdr + 6].try_into().expect("6 bytes"));
                let tagged = f[hdr + 12] == 0x81 && f[hdr + 13] == 0;
                let uplink = !is_group(dst)
                    && !tagged
                    && vlan.is_some_and(|v| fdb.lookup(v, dst, now) == Some(nic_id));
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
                        learn = Some(src_mac);
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
        if let (Some(mac), Some(v)) = (learn, vlan) {
            self.fdb.learn(v, mac, src.id, now);
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
}
