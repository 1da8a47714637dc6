//! `ctl accel`: plugging a guest port into a NIC tier and unplugging it, from the control
//! thread.
//!
//! - Level 1 is the NIC's pool for the port (its MACs in the device's filter, its transmits from
//!   the pool's queue): binding and unbinding happen under the NIC queue's lock, between two of
//!   its bursts, and nothing is in flight between them (the device writes each frame into the
//!   guest's ring in the burst that reads it).
//! - Level 2 swaps the guest's queue pair under its two slot locks (transmit first, then
//!   receive, the polling threads' own order), so it falls between two bursts: a polling thread
//!   waits at most for the other's burst, never for the control thread's work beyond the swap.
//!
//! A port is served at Level 1 by default wherever a Level 1 NIC can (that is what such a NIC
//! does); unplugged by hand it stays on the software path, at every tier, until plugged by
//! hand.

use std::collections::HashMap;
use std::time::Instant;

use accel::{DeviceFacts, PortFacts, Refusal, Tier};
use nic_models::direct::Wire;
use shaping::RateLimiter;

use super::{Control, SwitchError};
use crate::accel::VfOn;
use crate::control::{AccelReport, HandoverReport};
use crate::port::{Port, Queue};

/// What the switch remembers of a port's plugs (it outlives each plug).
#[derive(Default)]
pub(super) struct AccelBook {
    pub(super) plugs: u64,
    unplugs: u64,
    refusals: u64,
    last_refusal: Option<String>,
    drained: u64,
    pub(super) plug_us: u64,
    last: Option<HandoverReport>,
    /// Device work of earlier plugs (the queue's own counters go with it at unplug).
    tx_frames: u64,
    /// Unplugged by hand: no NIC binds it (Level 1) and `accel=` in the configuration does not
    /// plug it again until a `ctl accel plug`.
    pub(super) held_off: bool,
    /// When it was plugged at Level 1 by hand.
    l1_since: Option<Instant>,
    /// The MACs the NIC's filters had for it when it was last unbound.
    l1_macs: Vec<[u8; 6]>,
    spoofed: u64,
    shaped: u64,
    rx_frames: u64,
    /// Unplugged because its guest is migrating (dirty logging on): the tier it left, and
    /// whether it was held off before.
    pub(super) migrating: Option<(Tier, bool)>,
}

/// Per port.
pub(super) type AccelBooks = HashMap<u16, AccelBook>;

/// What the contract's admission needs to know of a guest port's queues.
pub(super) fn port_facts(port: &Port) -> PortFacts {
    let mut facts = PortFacts { egress_shaped: port.policy.egress_on(), ..PortFacts::default() };
    for slot in port.txq.iter() {
        match slot.lock().as_ref() {
            Some(Queue::Virtio(q)) if !q.broken => {
                facts.pairs += 1;
                facts.viommu |= q.dma.is_iova();
                facts.packed |= q.ring.is_packed();
            }
            Some(Queue::AccelTx(_)) => facts.plugged = true,
            _ => {}
        }
    }
    facts.running = facts.pairs > 0
        && port.rxq.first().is_some_and(|s| matches!(s.lock().as_ref(), Some(Queue::Virtio(q)) if !q.broken));
    facts
}

/// Whether port `port`'s guest runs packed rings (its first receive queue says).
pub(super) fn runs_packed(port: &Port) -> bool {
    port.rxq
        .first()
        .is_some_and(|s| matches!(s.lock().as_ref(), Some(Queue::Virtio(q)) if q.ring.is_packed()))
}

/// The plug itself: under the pair's two slot locks (transmit first, the polling threads'
/// order), the running queues become the device's (with a VF's policy at Level 3: rx, tx).
/// How long the swap took, µs, or why the device would not take them.
pub(super) fn swap_in(
    port: &Port,
    nic: u16,
    rate: Option<RateLimiter>,
    vf: Option<(Box<VfOn>, Box<VfOn>)>,
) -> Result<u64, String> {
    let t0 = Instant::now();
    let mut gt = port.txq[0].lock();
    let mut gr = port.rxq[0].lock();
    let (tx, rx) = (gt.take_virtio(), gr.take_virtio());
    match (rx, tx) {
        (Some(rx), Some(tx)) => match crate::accel::plug(rx, tx, nic, rate) {
            Ok((mut ar, mut at)) => {
                if let Some((r, t)) = vf {
                    (ar.vf, at.vf) = (Some(r), Some(t));
                }
                *gr = Some(Queue::AccelRx(ar));
                *gt = Some(Queue::AccelTx(at));
            }
            Err(back) => {
                let (rx, tx, why) = *back;
                *gr = Some(Queue::Virtio(rx));
                *gt = Some(Queue::Virtio(tx));
                return Err(why);
            }
        },
        (rx, tx) => {
            *gr = rx.map(Queue::Virtio);
            *gt = tx.map(Queue::Virtio);
            return Err("its rings stopped meanwhile".into());
        }
    }
    Ok(t0.elapsed().as_micros() as u64)
}

impl Control {
    /// Whether the guest on port `id` is migrating: its frontend acked VHOST_F_LOG_ALL.
    pub(super) fn migrating(&self, id: u16) -> bool {
        self.ports.get(&id).is_some_and(|st| st.device.lock().is_ok_and(|d| d.log_all_acked()))
    }

    /// The tier port `id` is plugged at, if any.
    fn plugged_tier(&self, id: u16) -> Option<Tier> {
        let port = &self.ports.get(&id)?.port;
        if let Some(Some(Queue::AccelTx(a))) = port.txq.first().map(|s| s.lock()).as_deref() {
            return Some(if a.vf.is_some() { Tier::L3 } else { Tier::L2 });
        }
        let held = self.accel.get(&id).is_some_and(|b| b.held_off);
        (!held && self.l1_nic_of(id).is_some()).then_some(Tier::L1)
    }

    /// A SET_FEATURES acking VHOST_F_LOG_ALL is about to be handled: the guest on port `id`
    /// starts migrating. A device writes into the guest by DMA that the dirty log does not
    /// see, so a plugged port steps aside to the software path first, through the contract's
    /// unplug (nothing lost), before the frontend's reply, after which QEMU starts copying
    /// (DPDK vDPA's "software-assisted" live migration). It stays on the software path until
    /// logging stops with the guest still here (a cancelled migration: see
    /// [`migration_ends`](Self::migration_ends)) or the frontend goes.
    pub(super) fn migration_starts(&mut self, id: u16) {
        if self.migrating(id) {
            return;
        }
        let Some(tier) = self.plugged_tier(id) else { return };
        let name = self.ports[&id].cfg.name.clone();
        let held = self.accel.get(&id).is_some_and(|b| b.held_off);
        match self.accel_unplug(&name) {
            Ok(_) => {
                tracing::info!(port = %name, tier = %tier, "unplugged for a live migration: the software path logs what it writes");
                self.accel.entry(id).or_default().migrating = Some((tier, held));
            }
            Err(e) => tracing::error!(port = %name, "cannot unplug for a live migration: {e}"),
        }
    }

    /// Dirty logging stopped (SET_FEATURES without VHOST_F_LOG_ALL, handled) with the guest's
    /// frontend still connected: a port unplugged for the migration goes back to its tier.
    pub(super) fn migration_ends(&mut self, id: u16) {
        if self.migrating(id) {
            return;
        }
        let Some((tier, held)) = self.accel.get_mut(&id).and_then(|b| b.migrating.take()) else { return };
        let name = self.ports[&id].cfg.name.clone();
        match self.accel_plug(&name, &tier.to_string()) {
            Ok(_) => {
                tracing::info!(port = %name, tier = %tier, "plugged again: the migration did not happen")
            }
            Err(e) => {
                self.accel.entry(id).or_default().held_off = held;
                tracing::warn!(port = %name, "not plugged again after a cancelled migration: {e}");
            }
        }
    }

    /// SEND_RARP from the frontend of port `id` (the destination of a live migration): the
    /// guest's MAC moves to this port in the forwarding table at once, rather than at the
    /// guest's first frame.
    ///
    /// The MAC is the frontend's word, held to what the guest's own frames are: a group
    /// address is never learned, the port's MAC limit applies (in `learn`), and under
    /// anti-spoofing only a MAC the guest may send from is taken, so a frontend cannot pull
    /// another tenant's MAC to its port this way either.
    pub(super) fn announce(&mut self, id: u16, mac: [u8; 6]) {
        let Some(st) = self.ports.get(&id) else { return };
        let Some(vlan) = st.port.vlan.ingress(None) else { return };
        let shown = crate::l2::format_mac(crate::l2::mac_from_bytes(mac));
        let spoof = st.port.policy.config().anti_spoof.filter(|_| st.port.policy.spoof_on());
        let allowed = spoof.is_none_or(|sp| match sp.macs.is_empty() {
            true => mac == st.port.mac,
            false => sp.macs.iter().any(|m| crate::l2::parse_mac(m) == Some(mac)),
        });
        if mac[0] & 1 != 0 || mac == [0; 6] || !allowed {
            tracing::warn!(port = %st.cfg.name, "SEND_RARP for {shown} ignored: not a source MAC this port's guest may use");
            return;
        }
        let now = self.now();
        self.fdb.learn(vlan, crate::l2::mac_from_bytes(mac), id, now);
        tracing::info!(port = %st.cfg.name, "guest {shown} announced here (SEND_RARP): forwarding table moved");
    }

    /// `ctl accel plug PORT --tier T`.
    pub(super) fn accel_plug(&mut self, name: &str, tier: &str) -> Result<AccelReport, SwitchError> {
        let tier: Tier = tier.parse().map_err(SwitchError::Refused)?;
        let id = self.port_named(name)?.port.id;
        if self.migrating(id) {
            return Err(SwitchError::Refused(format!(
                "the guest on {name} is migrating (its frontend acked VHOST_F_LOG_ALL): a device's \
                 writes into it would not be in the dirty log; plug it after the migration"
            )));
        }
        let was_held = self.accel.get(&id).is_some_and(|b| b.held_off);
        let r = match tier {
            Tier::L1 => self.try_plug_l1(id, name),
            Tier::L2 => self.try_plug(id, name, tier),
            Tier::L3 => self.try_plug_vf(id, name),
        };
        // Level 2 steers the wire's frames with the port's pool: back in the filter now, not at
        // the next sync.
        if tier == Tier::L2 && was_held && r.is_ok() {
            let macs = self.accel.get(&id).map(|b| b.l1_macs.clone()).unwrap_or_default();
            self.bind_one(id, &macs);
        }
        let book = self.accel.entry(id).or_default();
        // A refused plug leaves the port as it was; a plug at either tier lets Level 1 serve it
        // again (Level 2 steers the wire's frames with the same pool).
        book.held_off = was_held && r.is_err();
        match r {
            Ok(us) => {
                book.plugs += 1;
                book.plug_us = us;
                book.l1_since = (tier == Tier::L1).then(Instant::now);
                tracing::info!(port = name, tier = %tier, "plugged into the device in {us} us");
                self.accel_report(name)
            }
            Err(e) => {
                book.refusals += 1;
                book.last_refusal = Some(e.to_string());
                tracing::info!(port = name, "plug refused: {e}");
                Err(SwitchError::Refused(e.to_string()))
            }
        }
    }

    /// The Level 1 NIC port binding guest port `id`, if one does.
    fn l1_nic_of(&self, id: u16) -> Option<u16> {
        self.ports
            .values()
            .filter(|p| p.cfg.nic.as_ref().is_some_and(|n| (1..=2).contains(&n.level)))
            .find_map(|p| {
                let bound = p.port.txq.iter().any(
                    |s| matches!(s.lock().as_ref(), Some(Queue::Nic(nq)) if nq.nic.pool_of(id).is_some()),
                );
                bound.then_some(p.port.id)
            })
    }

    /// Level 1: lets the NICs bind the port now; the reason if none can.
    fn try_plug_l1(&mut self, id: u16, name: &str) -> Result<u64, Refusal> {
        let st = &self.ports[&id];
        let bad = |why: &str| Refusal::Port { port: name.into(), why: why.into() };
        if st.uplink.is_some() || st.cfg.nic.is_some() {
            return Err(bad("it is an uplink, not a guest port"));
        }
        let guest = st.port.clone();
        if matches!(guest.txq.first().map(|s| s.lock()).as_deref(), Some(Some(Queue::AccelTx(_)))) {
            return Err(Refusal::AlreadyPlugged(name.into()));
        }
        let nics: Vec<_> = self
            .ports
            .values()
            .filter(|p| p.cfg.nic.as_ref().is_some_and(|n| (1..=2).contains(&n.level)))
            .collect();
        let nic = nics.iter().min_by_key(|p| p.port.id).ok_or(Refusal::NoDevice(Tier::L1))?;
        if runs_packed(&guest) {
            return Err(Refusal::Features {
                port: name.into(),
                tier: Tier::L1,
                what: "packed rings (the NIC DMAs into split rings only)".into(),
            });
        }
        if guest.policy.egress_on() {
            return Err(bad("an egress shaper holds its receive ring (remove the shaper: ctl policy PORT)"));
        }
        if !nics.iter().any(|n| super::nics::served(&n.port.vlan, &guest.vlan).is_some()) {
            return Err(bad(
                "no Level 1 NIC carries its VLAN (the NIC's vlan= must be the port's, or a trunk with it)",
            ));
        }
        let (nic_name, pools) = (nic.cfg.name.clone(), nic.cfg.nic.as_ref().map_or(0, |n| n.pools));
        if self.l1_nic_of(id).is_some() && !self.accel.get(&id).is_some_and(|b| b.held_off) {
            return Err(Refusal::AlreadyPlugged(name.into()));
        }
        let t0 = Instant::now();
        let book = self.accel.entry(id).or_default();
        let held = std::mem::replace(&mut book.held_off, false);
        let macs = book.l1_macs.clone();
        if !self.bind_one(id, &macs) {
            self.accel.entry(id).or_default().held_off = held;
            return Err(Refusal::NoFreePair {
                tier: Tier::L1,
                nic: nic_name,
                pairs: u16::from(pools.saturating_sub(1)),
            });
        }
        Ok(t0.elapsed().as_micros() as u64)
    }

    fn try_plug(&mut self, id: u16, name: &str, tier: Tier) -> Result<u64, Refusal> {
        let st = &self.ports[&id];
        let bad = |why: &str| Refusal::Port { port: name.into(), why: why.into() };
        if st.uplink.is_some() || st.cfg.nic.is_some() {
            return Err(bad("it is an uplink, not a guest port"));
        }
        let nic = self
            .ports
            .values()
            .filter(|p| p.cfg.nic.as_ref().is_some_and(|n| n.level == 2))
            .min_by_key(|p| p.port.id)
            .ok_or(Refusal::NoDevice(tier))?;
        let (nic_id, nic_name) = (nic.port.id, nic.cfg.name.clone());
        let pools = nic.cfg.nic.as_ref().map_or(0, |n| n.pools);
        let port = st.port.clone();
        let facts = port_facts(&port);
        let in_use = self
            .ports
            .values()
            .filter(|p| {
                matches!(p.port.txq.first().map(|s| s.lock()).as_deref(), Some(Some(Queue::AccelTx(a))) if a.nic == nic_id)
            })
            .count() as u16;
        // Pool 0 is the host's (the software path).
        let dev =
            DeviceFacts { tier, pairs: u16::from(pools.saturating_sub(1)), in_use, follows_viommu: true };
        accel::admit(name, &nic_name, &facts, &dev)?;
        if port.policy.config().ingress.is_some() {
            return Err(bad(
                "its policer (police=) is enforced by the software path; use nic-rate= for the device's shaping",
            ));
        }
        let rate = match st.cfg.nic_rate {
            Some(r) => Some(
                RateLimiter::bits(r.0, (r.0 / 800).max(65_600))
                    .map_err(|e| bad(&format!("nic-rate: {e}")))?
                    .starting_at(crate::clock::now_ns()),
            ),
            None => None,
        };
        let us = swap_in(&port, nic_id, rate, None).map_err(|why| bad(&why))?;
        (self.wake_pmds)();
        Ok(us)
    }

    /// Plugs the guest ports whose configuration asks for a tier (`accel=`) once their rings
    /// run (again after a reconnect). A refusal leaves the port on the software path; each new
    /// reason is counted and logged once.
    pub(super) fn auto_plug(&mut self) {
        let mut want: Vec<(u16, String, String)> = self
            .ports
            .values()
            .filter_map(|p| p.cfg.accel.as_ref().map(|t| (p.port.id, p.cfg.name.clone(), t.clone())))
            .collect();
        // A VF given to a port is plugged whenever the port's rings run.
        let given: Vec<u16> = self.pfs.values().flat_map(|p| p.vfs_attached().map(|(_, g)| g)).collect();
        for g in given {
            if let Some(p) = self.ports.get(&g).filter(|_| !want.iter().any(|w| w.0 == g)) {
                want.push((g, p.cfg.name.clone(), "l3".into()));
            }
        }
        for (id, name, tier) in want {
            let Ok(tier) = tier.parse::<Tier>() else { continue };
            if self.accel.get(&id).is_some_and(|b| b.held_off) || self.migrating(id) {
                continue;
            }
            let port = &self.ports[&id].port;
            let running = |s: Option<&crate::port::QueueSlot>| {
                s.is_some_and(|s| matches!(s.lock().as_ref(), Some(Queue::Virtio(q)) if !q.broken))
            };
            if !running(port.txq.first().map(|s| &**s)) || !running(port.rxq.first().map(|s| &**s)) {
                continue;
            }
            let r = match tier {
                // Level 1 NICs bind every port they can; this only says why one cannot.
                Tier::L1 if self.l1_nic_of(id).is_some() => continue,
                Tier::L1 => self.try_plug_l1(id, &name),
                Tier::L2 => self.try_plug(id, &name, tier),
                Tier::L3 => self.try_plug_vf(id, &name),
            };
            let book = self.accel.entry(id).or_default();
            match r {
                Ok(us) => {
                    book.plugs += 1;
                    book.plug_us = us;
                    book.last_refusal = None;
                    tracing::info!(port = %name, tier = %tier, "plugged into the device (accel= in its configuration)");
                }
                Err(e) => {
                    let why = e.to_string();
                    if book.last_refusal.as_deref() != Some(why.as_str()) {
                        book.refusals += 1;
                        tracing::warn!(port = %name, "accel={tier} refused, the port stays on the software path: {why}");
                        book.last_refusal = Some(why);
                    }
                }
            }
        }
    }

    /// `ctl accel unplug PORT`: quiesce, drain, hand back; the software path resumes exactly
    /// where the device stopped.
    pub(super) fn accel_unplug(&mut self, name: &str) -> Result<AccelReport, SwitchError> {
        let port = self.port_named(name)?.port.clone();
        let t0 = Instant::now();
        let mut gt = port.txq[0].lock();
        let mut gr = port.rxq[0].lock();
        if !matches!(gt.as_ref(), Some(Queue::AccelTx(_))) || !matches!(gr.as_ref(), Some(Queue::AccelRx(_)))
        {
            drop((gr, gt));
            return self.unplug_l1(name, port.id, t0);
        }
        let (Some(Queue::AccelTx(at)), Some(Queue::AccelRx(ar))) = (gt.take(), gr.take()) else {
            unreachable!("checked above under the same locks");
        };
        let (mut at, mut ar) = (*at, *ar);
        // In-flight transmits go to the wire the device was sending them to.
        let nic = self.ports.get(&at.nic).map(|p| p.port.clone());
        let mut nic_tx = nic.as_ref().map(|p| p.rxq[0].lock());
        let src = port.id;
        let mut wire = |f: Vec<u8>| -> Result<(), Wire> {
            match nic_tx.as_deref_mut() {
                Some(Some(Queue::NicTx(t))) => t.sched.enqueue(t.pool_of(src), f).map_err(|_| Wire::Lost),
                _ => Err(Wire::Lost),
            }
        };
        let h = accel::hand_back(&mut ar.q, &mut at.q, (ar.start, at.start), &mut wire, &mut at.k);
        if let Some(Some(Queue::NicTx(t))) = nic_tx.as_deref_mut() {
            t.service(crate::clock::now_ns());
        }
        drop(nic_tx);
        let k = at.k;
        let rx_frames = ar.q.counters.packets;
        let (vf, vf_rx, pf_id) = (at.vf.take(), ar.vf.take(), at.nic);
        *gr = Some(Queue::Virtio(crate::accel::resume(ar.shell, &h.rx, h.rx_irq)));
        *gt = Some(Queue::Virtio(crate::accel::resume(at.shell, &h.tx, h.tx_irq)));
        drop((gr, gt));
        (self.wake_pmds)();
        // The hand-over's time; then off Level 1 too (the port is on the software path until
        // plugged again).
        let took = t0.elapsed().as_micros() as u64;
        let macs = self.unbind_one(port.id);
        let book = self.accel.entry(port.id).or_default();
        book.held_off = true;
        book.l1_macs = macs;
        if !h.ledger.balanced() {
            tracing::error!(port = name, "the device broke the contract: {:?}", h.ledger);
        }
        let book = self.accel.entry(port.id).or_default();
        book.unplugs += 1;
        book.held_off = true;
        book.drained += h.drained;
        book.tx_frames += k.tx_frames;
        book.spoofed += k.spoofed;
        book.shaped += k.shaped;
        book.rx_frames += rx_frames;
        book.last = Some(HandoverReport {
            tier: if vf.is_some() { Tier::L3 } else { Tier::L2 }.to_string(),
            plug_us: book.plug_us,
            unplug_us: took,
            drained: h.drained,
            rx_taken: h.ledger.rx_taken,
            rx_completed: h.ledger.rx_completed,
            tx_taken: h.ledger.tx_taken,
            tx_completed: h.ledger.tx_completed,
            balanced: h.ledger.balanced(),
            rx_state: (h.rx.state.last_avail, h.rx.state.used_idx),
            tx_state: (h.tx.state.last_avail, h.tx.state.used_idx),
        });
        if vf.is_some() {
            // (Their counts join the VF's as they drop.)
            drop((vf, vf_rx));
            self.sync_pf(pf_id);
        }
        tracing::info!(port = name, "unplugged in {took} us, {} in-flight transmits drained", h.drained);
        self.accel_report(name)
    }

    /// Level 1's unplug: the NIC unbinds the port (its MACs leave the device's filter, its
    /// queued transmits move to the host's queue behind what is there), under the NIC queue's
    /// lock between two bursts.
    fn unplug_l1(&mut self, name: &str, id: u16, t0: Instant) -> Result<AccelReport, SwitchError> {
        if self.l1_nic_of(id).is_none() {
            return Err(SwitchError::Refused(Refusal::NotPlugged(name.into()).to_string()));
        }
        let macs = self.unbind_one(id);
        let took = t0.elapsed().as_micros() as u64;
        let book = self.accel.entry(id).or_default();
        book.held_off = true;
        book.l1_macs = macs;
        book.unplugs += 1;
        book.l1_since = None;
        book.last = Some(HandoverReport {
            tier: Tier::L1.to_string(),
            plug_us: book.plug_us,
            unplug_us: took,
            balanced: true,
            ..HandoverReport::default()
        });
        tracing::info!(port = name, "unplugged from Level 1 in {took} us");
        self.accel_report(name)
    }

    /// `ctl accel status [PORT]`.
    pub(super) fn accel_status(&mut self, name: Option<&str>) -> Result<Vec<AccelReport>, SwitchError> {
        let mut names: Vec<String> = match name {
            Some(n) => vec![self.port_named(n)?.cfg.name.clone()],
            None => self
                .ports
                .values()
                .filter(|p| p.uplink.is_none() && p.cfg.nic.is_none())
                .map(|p| p.cfg.name.clone())
                .collect(),
        };
        names.sort();
        names.iter().map(|n| self.accel_report(n)).collect()
    }

    fn accel_report(&mut self, name: &str) -> Result<AccelReport, SwitchError> {
        let st = self.port_named(name)?;
        let port = st.port.clone();
        let mut r = AccelReport { port: name.to_string(), ..AccelReport::default() };
        if let Some(Some(Queue::AccelTx(a))) = port.txq.first().map(|s| s.lock()).as_deref() {
            r.tier = Some(if a.vf.is_some() { Tier::L3 } else { Tier::L2 }.to_string());
            r.plugged_ms = Some(a.since.elapsed().as_millis() as u64);
            r.nic = Some(a.nic);
            r.tx_frames = a.k.tx_frames;
            r.spoofed = a.k.spoofed;
            r.shaped = a.k.shaped;
            r.tx_faults = a.k.tx_faults;
            r.device_ns = a.device_ticks * 1000 / crate::clock::ticks_per_us().max(1);
        }
        if let Some(Some(Queue::AccelRx(a))) = port.rxq.first().map(|s| s.lock()).as_deref() {
            r.rx_frames = a.q.counters.packets;
            r.rx_faults = a.q.counters.dma_faults;
        }
        if r.tier.is_none() {
            if let Some(nic) = self.l1_nic_of(port.id) {
                r.tier = Some(Tier::L1.to_string());
                r.nic = Some(nic);
                r.plugged_ms =
                    self.accel.get(&port.id).and_then(|b| b.l1_since).map(|t| t.elapsed().as_millis() as u64);
            }
        }
        let nic_name = r.nic.and_then(|id| self.ports.get(&id)).map(|p| p.cfg.name.clone());
        let book = self.accel.entry(port.id).or_default();
        r.nic_name = nic_name;
        r.plugs = book.plugs;
        r.unplugs = book.unplugs;
        r.refusals = book.refusals;
        r.last_refusal = book.last_refusal.clone();
        r.drained = book.drained;
        r.tx_frames += book.tx_frames;
        r.spoofed += book.spoofed;
        r.shaped += book.shaped;
        r.rx_frames += book.rx_frames;
        r.last = book.last.clone();
        Ok(r)
    }
}
