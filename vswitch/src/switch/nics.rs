//! The control thread's side of NIC-model uplinks: which guest ports the device serves
//! (Level 1 pools), the MACs programmed for them, and `ctl nic`.
//!
//! A guest port gets a pool when the device can deliver its frames exactly as the software
//! path would: its VLAN rule matches the uplink's without a tag to add (an access port of the
//! uplink's access VLAN; an access port of a VLAN the uplink trunks, the device stripping the
//! tag; two ports trunking every VLAN), no egress shaper holds its receive ring, and its guest
//! runs split rings (the device models walk no packed ones). Its
//! unicast MACs are the ones the switch learned on it, re-read every `SYNC`; until a MAC is
//! learned, or when pools or filters run out, its frames take the software path.

use std::time::{Duration, Instant};

use super::Control;
use crate::control::{NicBinding, NicReport};
use crate::l2::{format_mac, mac_to_bytes, VlanMode};
use crate::port::Queue;

/// How often the filters follow the forwarding table.
pub(super) const SYNC: Duration = Duration::from_millis(100);

/// How frames for a guest port arrive on the wire and in the forwarding table, if the device
/// can serve it: (the tag the device strips, the VLAN its MACs are learned in).
pub(super) fn served(nic: &VlanMode, guest: &VlanMode) -> Option<(Option<u16>, u16)> {
    match (nic, guest) {
        (VlanMode::Access(a), VlanMode::Access(b)) if a == b => Some((None, *b)),
        (VlanMode::Trunk(set), VlanMode::Access(b)) if set.as_ref().is_none_or(|s| s.contains(*b)) => {
            Some((Some(*b), *b))
        }
        (VlanMode::Trunk(None), VlanMode::Trunk(None)) => Some((None, 0)),
        _ => None,
    }
}

/// Adds one queue's device work (and its polling-thread ticks as the device) to `r`.
fn add_device(r: &mut NicReport, d: &nic_models::DeviceCounters, ticks: u64, tpu: u64) {
    r.dma_packets += d.packets;
    r.dma_write_bytes += d.dma_write_bytes;
    r.dma_read_bytes += d.dma_read_bytes;
    r.desc_fetches += d.desc_fetches;
    r.desc_writebacks += d.desc_writebacks;
    r.tlps += d.tlps;
    r.dma_faults += d.dma_faults;
    r.cpu_copies += d.cpu_copies;
    r.iotlb_lookups += d.iotlb_lookups;
    r.iotlb_misses += d.iotlb_misses;
    r.device_ns += ticks * 1000 / tpu;
    r.device_ticks += ticks;
}

impl Control {
    /// Binds guest ports to every NIC model's pools and programs their learned MACs.
    pub(super) fn sync_nics(&mut self) {
        let nics: Vec<u16> = self.ports.values().filter(|p| p.cfg.nic.is_some()).map(|p| p.port.id).collect();
        if nics.is_empty() {
            return;
        }
        let mut guests = vec![false; crate::port::MAX_PORTS];
        for p in self.ports.values().filter(|p| p.uplink.is_none()) {
            guests[p.port.id as usize] = true;
        }
        let learned = self.fdb.learned_on(&guests, self.now());
        for id in nics {
            // A Level 3 PF's pools are its VFs, given by hand.
            if self.ports[&id].cfg.nic.as_ref().is_some_and(|n| n.level == 3) {
                self.sync_pf(id);
                continue;
            }
            let nic = self.ports[&id].port.clone();
            let mut want: Vec<(u16, Option<u16>, Vec<[u8; 6]>)> = Vec::new();
            let mut ids: Vec<u16> = self.ports.keys().copied().filter(|k| guests[*k as usize]).collect();
            ids.sort_unstable();
            for g in ids {
                let gp = &self.ports[&g].port;
                let Some((strip, vlan)) = served(&nic.vlan, &gp.vlan) else { continue };
                if gp.policy.egress_on()
                    || super::accel::runs_packed(gp)
                    || self.accel.get(&g).is_some_and(|b| b.held_off)
                    || self.migrating(g)
                {
                    continue;
                }
                let macs =
                    learned.iter().filter(|e| e.0 == g && e.1 == vlan).map(|e| mac_to_bytes(e.2)).collect();
                want.push((g, strip, macs));
            }
            self.program_nic(&nic, |nic| {
                for (_, owner, _) in nic.bindings() {
                    if !want.iter().any(|w| w.0 == owner) {
                        nic.unbind(owner);
                    }
                }
                for (g, strip, macs) in &want {
                    if nic.bind(*g, *strip).is_ok() {
                        nic.set_macs(*g, macs);
                    }
                }
            });
        }
    }

    /// Changes NIC port `nic`'s filters with `change` (under its queue's lock, between two of
    /// its bursts) and its transmit pools to match.
    pub(super) fn program_nic(
        &self,
        nic: &crate::port::Port,
        mut change: impl FnMut(&mut nic_models::nic::Nic),
    ) {
        let mut bindings = Vec::new();
        for slot in nic.txq.iter() {
            let mut q = slot.lock();
            let Some(Queue::Nic(nq)) = q.as_mut() else { continue };
            change(&mut nq.nic);
            bindings = nq.nic.bindings();
        }
        // A guest sends from its pool's TX queue, shaped and weighted as its port says;
        // everyone else from the host's.
        let ports = &self.ports;
        // A VF's min_tx_rate is its pool's share of the wire (its cap is enforced where the
        // device fetches).
        let pf = self.pfs.get(&nic.id);
        let vf_weight = |owner: u16| {
            let pf = pf?;
            let (n, _) = pf.vfs_attached().find(|(_, g)| *g == owner)?;
            pf.vf(n).ok().map(|v| v.policy.min_tx_rate.max(1))
        };
        let tx = |owner: u16| match vf_weight(owner) {
            Some(w) => (None, w),
            None => ports
                .get(&owner)
                .map_or((None, 1), |g| (g.cfg.nic_rate.map(|r| r.0), g.cfg.nic_weight.unwrap_or(1))),
        };
        for slot in nic.rxq.iter() {
            if let Some(Queue::NicTx(t)) = slot.lock().as_mut() {
                t.set_pools(&bindings, tx, crate::clock::now_ns());
            }
        }
    }

    /// Binds guest port `id` to every NIC model that serves it (as the periodic sync does),
    /// with the MACs it had there last (the sync programs what is learned since). No FDB scan: a hand plug stays
    /// cheap for the control thread, which also answers the guests' IOTLB misses. Whether a
    /// NIC bound it.
    pub(super) fn bind_one(&mut self, id: u16, macs: &[[u8; 6]]) -> bool {
        let Some(guest) = self.ports.get(&id).map(|p| p.port.clone()) else { return false };
        let mut nics: Vec<_> = (self.ports.values())
            .filter(|p| p.cfg.nic.as_ref().is_some_and(|n| n.level < 3))
            .map(|p| p.port.clone())
            .collect();
        nics.sort_by_key(|p| p.id);
        let mut bound = false;
        for nic in nics {
            let Some((strip, _)) = served(&nic.vlan, &guest.vlan) else { continue };
            self.program_nic(&nic, |n| {
                if n.bind(id, strip).is_ok() {
                    n.set_macs(id, macs);
                    bound = true;
                }
            });
        }
        bound
    }

    /// Unbinds guest port `id` from every NIC model; the MACs it had in the filters.
    pub(super) fn unbind_one(&mut self, id: u16) -> Vec<[u8; 6]> {
        let nics: Vec<_> =
            self.ports.values().filter(|p| p.cfg.nic.is_some()).map(|p| p.port.clone()).collect();
        let mut macs = Vec::new();
        for nic in nics {
            self.program_nic(&nic, |n| {
                if let Some((_, _, m)) = n.bindings().into_iter().find(|b| b.1 == id) {
                    macs.extend(m);
                    n.unbind(id);
                }
            });
        }
        macs
    }

    /// Whether a NIC model needs its filters synced now.
    pub(super) fn nics_due(&mut self) -> bool {
        if !self.ports.values().any(|p| p.cfg.nic.is_some()) {
            return false;
        }
        let now = Instant::now();
        if now < self.next_nic_sync {
            return false;
        }
        self.next_nic_sync = now + SYNC;
        true
    }

    /// `ctl nic NAME`.
    pub(super) fn nic_report(&mut self, name: &str) -> Result<NicReport, super::SwitchError> {
        let st = self.port_named(name)?;
        let Some(cfg) = st.cfg.nic.clone() else {
            return Err(super::SwitchError::Refused(format!(
                "port '{name}' is not a NIC model (nic:IFNAME or nic:wire:NAME)"
            )));
        };
        let nic = st.port.clone();
        let itr = cfg.itr.clone();
        let wire = st.uplink.as_ref().map(|u| u.label()).unwrap_or_default();
        let mut r = NicReport {
            name: name.to_string(),
            level: cfg.level,
            pools: cfg.pools,
            filters: cfg.filters,
            itr,
            wire,
            ..NicReport::default()
        };
        let tpu = crate::clock::ticks_per_us().max(1);
        let mut bound: Vec<(u8, u16, Vec<[u8; 6]>)> = Vec::new();
        for slot in nic.txq.iter() {
            let q = slot.lock();
            let Some(Queue::Nic(nq)) = q.as_ref() else { continue };
            let (s, d) = (&nq.nic.counters, &nq.device);
            r.wire_frames += s.wire_frames;
            r.to_pools += s.to_pools;
            r.to_default += s.to_default;
            r.filtered += s.filtered;
            r.mac_overflow += s.mac_overflow;
            r.fallbacks += nq.fallbacks;
            add_device(&mut r, d, nq.device_ticks, tpu);
            r.csum_verified += nq.csum_verified;
            let (raised, folded) = nq.irq_counts();
            r.irqs_raised += raised;
            r.irqs_folded += folded;
            if let Some(l) = &nq.lro {
                r.lro_merged += l.counters.merged;
                r.lro_coalesced += l.counters.coalesced;
            }
            if bound.is_empty() {
                bound = nq.nic.bindings();
                r.filters_used = (0..cfg.filters as usize)
                    .filter(|i| nq.nic.classifier().rar(*i).is_some())
                    .count() as u16;
            }
        }
        for slot in nic.rxq.iter() {
            if let Some(Queue::NicTx(t)) = slot.lock().as_ref() {
                for p in 0..cfg.pools as usize {
                    let c = t.sched.counters(p);
                    r.tx_sent += c.sent;
                    r.tx_dropped += c.dropped;
                    r.tx_shaped += c.shaped;
                }
                r.tx_queued += t.sched.queued() as u64;
                r.tso_frames += t.tso_frames;
                r.tso_segments += t.tso_segments;
                r.csum_inserted += t.csum_inserted;
                add_device(&mut r, &t.device, t.device_ticks, tpu);
            }
        }
        // Guest queue pairs plugged into the device (Level 2): its work for them.
        for g in self.ports.values() {
            if let Some(Some(Queue::AccelTx(a))) = g.port.txq.first().map(|s| s.lock()).as_deref() {
                if a.nic == nic.id {
                    add_device(&mut r, &a.q.counters, a.device_ticks, tpu);
                }
            }
            if let Some(Some(Queue::AccelRx(a))) = g.port.rxq.first().map(|s| s.lock()).as_deref() {
                if a.nic == nic.id {
                    add_device(&mut r, &a.q.counters, 0, tpu);
                }
            }
        }
        let mut pool_tx = vec![(None, 1); cfg.pools as usize];
        for slot in nic.rxq.iter().take(1) {
            if let Some(Queue::NicTx(t)) = slot.lock().as_ref() {
                for (p, x) in pool_tx.iter_mut().enumerate() {
                    *x = t.pool_tx(p);
                }
            }
        }
        for (pool, owner, macs) in bound {
            let Some(g) = self.ports.get(&owner) else { continue };
            let (tx_rate, tx_weight) = pool_tx.get(pool as usize).copied().unwrap_or((None, 1));
            r.bound.push(NicBinding {
                tx_rate,
                tx_weight,
                pool,
                port: g.cfg.name.clone(),
                macs: macs.iter().map(|m| format_mac(crate::l2::mac_from_bytes(*m))).collect(),
                strip_vlan: served(&nic.vlan, &g.port.vlan).and_then(|s| s.0),
            });
        }
        let mut others: Vec<_> = self.ports.values().filter(|p| p.uplink.is_none()).collect();
        others.sort_by_key(|p| p.port.id);
        for g in others {
            if r.bound.iter().any(|b| b.port == g.cfg.name) {
                continue;
            }
            let why = if cfg.level == 0 {
                "Level 0 has one queue: the software path serves every guest"
            } else if served(&nic.vlan, &g.port.vlan).is_none() {
                "its VLAN rule would need a tag added on delivery: the software path does that"
            } else if g.port.policy.egress_on() {
                "an egress shaper holds its receive ring: the software path serves it"
            } else {
                "every pool is bound: the software path serves it"
            };
            r.unserved.push((g.cfg.name.clone(), why.to_string()));
        }
        Ok(r)
    }
}
