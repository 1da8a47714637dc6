//! `vswitch vf`: a Level 3 NIC model's VFs, their policy (iproute2's words, the same command a
//! real PF takes), and which guest port each is given to.
//!
//! A VF given to a port (`vf DEV attach N PORT`) is an administrative assignment, as a VF
//! passed to a VM is: the switch plugs the port's queue pair into the VF through the
//! accelerator contract while the guest's rings run, and again after the guest reconnects.
//! `ctl accel unplug PORT` puts it on the software path (held there until `ctl accel plug`);
//! `vf DEV detach N` unplugs it and ends the assignment. Every change of a VF's policy reaches
//! the device between two bursts, under the pair's slot locks.

use std::collections::HashMap;
use std::sync::Arc;

use accel::{DeviceFacts, Refusal, Tier};
use nic_models::sriov::{Pf, VebEntry, VfError};
use shaping::RateLimiter;
use vfpolicy::VfStats;

use super::{Control, SwitchError};
use crate::accel::{add_stats as add, VfOn, VfSink};
use crate::control::VfReport;
use crate::port::Queue;

/// A modelled PF's link speed, Mbit/s (an 82599's): what `max_tx_rate` is checked against.
pub const LINK_MBPS: u32 = 10_000;

/// The PFs of the Level 3 NIC ports, by port id.
pub(super) type Pfs = HashMap<u16, Pf>;

/// Each VF's counts of its ended plugs, by (PF port, VF).
pub(super) type VfSinks = HashMap<(u16, u32), VfSink>;

/// The kernel's error in iproute2's words, and the device's reason.
fn rtnl_words(e: VfError) -> SwitchError {
    let text = std::io::Error::from_raw_os_error(e.errno).to_string();
    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
    SwitchError::Refused(format!("RTNETLINK answers: {text}\n{}", e.why))
}

/// A VF's transmit cap as the device's bucket.
fn vf_rate(max_mbps: u32) -> Option<RateLimiter> {
    let bits = u64::from(max_mbps) * 1_000_000;
    (bits > 0).then(|| {
        RateLimiter::bits(bits, (bits / 800).max(65_600))
            .expect("a rate within the link's is a valid bucket")
            .starting_at(crate::clock::now_ns())
    })
}

impl Control {
    /// The Level 3 NIC port named `dev`.
    fn pf_id(&mut self, dev: &str) -> Result<u16, SwitchError> {
        let st = self.port_named(dev)?;
        match st.cfg.nic.as_ref().map(|n| n.level) {
            Some(3) => Ok(st.port.id),
            _ => Err(SwitchError::Refused(format!(
                "port '{dev}' is not a Level 3 NIC: VFs are an SR-IOV PF's (add one as \
                 NAME=nic:IFNAME,level=3,vfs=N or nic:wire:WIRE,level=3,vfs=N)"
            ))),
        }
    }

    /// Port `id`'s PF (made when first asked for: one VF per guest pool).
    pub(super) fn pf(&mut self, id: u16) -> &mut Pf {
        let vfs = self.ports.get(&id).and_then(|p| p.cfg.nic.as_ref()).map_or(1, |n| n.pools.max(2) - 1);
        self.pfs.entry(id).or_insert_with(|| Pf::new(u16::from(vfs), LINK_MBPS).expect("1..=63 VFs"))
    }

    /// `vswitch vf DEV N ...`: changes VF N's policy (all of it, or none if the device
    /// refuses a part) and applies it to the device at once.
    pub(super) fn vf_set(&mut self, dev: &str, args: &[String]) -> Result<VfReport, SwitchError> {
        let set = vfpolicy::parse_vf_args(args).map_err(|e| SwitchError::Refused(e.to_string()))?;
        let id = self.pf_id(dev)?;
        self.pf(id).set(&set).map_err(rtnl_words)?;
        self.vf_refresh(id);
        self.vf_show(dev)
    }

    /// `vswitch vf DEV attach N PORT`: gives VF N to guest port PORT and plugs the port's
    /// queue pair into it (now if its rings run, else when they do).
    pub(super) fn vf_attach(&mut self, dev: &str, n: u32, port: &str) -> Result<VfReport, SwitchError> {
        let id = self.pf_id(dev)?;
        let gst = self.port_named(port)?;
        let (gid, gmac) = (gst.port.id, gst.port.mac);
        if gst.uplink.is_some() || gst.cfg.nic.is_some() {
            return Err(SwitchError::Refused(format!("port '{port}' is an uplink, not a guest port")));
        }
        if let Some(other) = self.pfs.values().flat_map(|p| p.vfs_attached()).find(|(_, p)| *p == gid) {
            return Err(SwitchError::Refused(format!(
                "port '{port}' already has VF {}: detach it first (vswitch vf DEV detach {})",
                other.0, other.0
            )));
        }
        let pf = self.pf(id);
        let vf = pf.vf(n).map_err(rtnl_words)?;
        if let Some(p) = vf.attached {
            let owner =
                self.ports.get(&p).map_or("a removed port".into(), |s| format!("port '{}'", s.cfg.name));
            return Err(SwitchError::Refused(format!("VF {n} is given to {owner}: detach it first")));
        }
        let mut notes = Vec::new();
        let pf = self.pf(id);
        // The guest's driver asks for the address it was given (config space).
        if let Err(e) = pf.request_mac(n, gmac) {
            notes.push(format!(
                "{}; its frames are dropped while spoof checking is on (set the VF's mac to the port's, \
                 or trust on)",
                e.why
            ));
        }
        pf.vf_mut(n).map_err(rtnl_words)?.attached = Some(gid);
        self.accel.entry(gid).or_default().held_off = false;
        match self.try_plug_vf(gid, port) {
            Ok(us) => {
                let book = self.accel.entry(gid).or_default();
                book.plugs += 1;
                book.plug_us = us;
                tracing::info!(port, vf = n, "VF attached, plugged in {us} us");
            }
            Err(Refusal::Port { why, .. }) if why.contains("not running") => {
                notes.push(format!("port '{port}' has no running rings yet: it is plugged when they run"));
            }
            Err(e) => {
                self.pf(id).vf_mut(n).map_err(rtnl_words)?.attached = None;
                return Err(SwitchError::Refused(e.to_string()));
            }
        }
        self.vf_refresh(id);
        let mut r = self.vf_show(dev)?;
        r.notes = notes;
        Ok(r)
    }

    /// `vswitch vf DEV detach N`: unplugs VF N's port (quiesce, drain, hand back) and ends the
    /// assignment; the port stays on the software path.
    pub(super) fn vf_detach(&mut self, dev: &str, n: u32) -> Result<VfReport, SwitchError> {
        let id = self.pf_id(dev)?;
        let gid = self.pf(id).vf(n).map_err(rtnl_words)?.attached;
        let Some(gid) = gid else {
            return Err(SwitchError::Refused(format!("VF {n} is not given to any port")));
        };
        if let Some(name) = self.ports.get(&gid).map(|p| p.cfg.name.clone()) {
            if self.vf_plugged(gid) {
                self.accel_unplug(&name)?;
            }
        }
        let vf = self.pf(id).vf_mut(n).map_err(rtnl_words)?;
        vf.attached = None;
        vf.driver_mac = None;
        self.accel.entry(gid).or_default().held_off = false;
        self.vf_refresh(id);
        self.vf_show(dev)
    }

    /// Before port `id` goes: a PF takes its VFs back from their guests (each unplugged to the
    /// software path); a guest gives its VF back.
    pub(super) fn vf_port_gone(&mut self, id: u16) {
        if let Some(pf) = self.pfs.get(&id) {
            let given: Vec<u16> = pf.vfs_attached().map(|(_, g)| g).collect();
            for g in given {
                let name = self.ports.get(&g).map(|p| p.cfg.name.clone());
                if let Some(name) = name.filter(|_| self.vf_plugged(g)) {
                    let _ = self.accel_unplug(&name);
                }
                self.accel.entry(g).or_default().held_off = false;
            }
            self.pfs.remove(&id);
            self.vf_sinks.retain(|(p, _), _| *p != id);
        }
        let mine: Vec<(u16, u32)> = (self.pfs.iter())
            .flat_map(|(p, pf)| pf.vfs_attached().filter(|(_, g)| *g == id).map(|(n, _)| (*p, n)))
            .collect();
        for (p, n) in mine {
            if let Some(vf) = self.pfs.get_mut(&p).and_then(|pf| pf.vf_mut(n).ok()) {
                vf.attached = None;
                vf.driver_mac = None;
            }
            self.vf_refresh(p);
        }
    }

    /// Whether port `id`'s pair is plugged into a VF.
    fn vf_plugged(&self, id: u16) -> bool {
        let Some(st) = self.ports.get(&id) else { return false };
        matches!(st.port.txq.first().map(|s| s.lock()).as_deref(), Some(Some(Queue::AccelTx(a))) if a.vf.is_some())
    }

    /// `vswitch vf DEV show`: the VFs as `ip link show` reads them, with the ports they are
    /// given to and their statistics (the plugged pairs' live counts included).
    pub(super) fn vf_show(&mut self, dev: &str) -> Result<VfReport, SwitchError> {
        let id = self.pf_id(dev)?;
        let pf = self.pf(id).clone();
        let mut r = VfReport {
            dev: dev.to_string(),
            num_vfs: pf.num_vfs(),
            link_mbps: pf.link_mbps(),
            vfs: pf.info(),
            ports: vec![None; usize::from(pf.num_vfs())],
            plugged: vec![false; usize::from(pf.num_vfs())],
            veb_frames: pf.veb_frames,
            notes: Vec::new(),
        };
        for (&(_, n), sink) in self.vf_sinks.iter().filter(|((p, _), _)| *p == id) {
            let s = sink.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(st) = r.vfs.get_mut(n as usize).and_then(|v| v.stats.as_mut()) {
                add(st, &s.0);
            }
            r.veb_frames += s.1;
        }
        for (n, gid) in pf.vfs_attached() {
            let Some(st) = self.ports.get(&gid) else { continue };
            r.ports[n as usize] = Some(st.cfg.name.clone());
            let mut live = VfStats::default();
            if let Some(Some(Queue::AccelTx(a))) = st.port.txq.first().map(|s| s.lock()).as_deref() {
                if let Some(v) = a.vf.as_deref().filter(|v| v.n == n && a.nic == id) {
                    add(&mut live, &v.stats);
                    r.veb_frames += v.veb_frames;
                    r.plugged[n as usize] = true;
                }
            }
            if let Some(Some(Queue::AccelRx(a))) = st.port.rxq.first().map(|s| s.lock()).as_deref() {
                if let Some(v) = a.vf.as_deref().filter(|v| v.n == n && a.nic == id) {
                    add(&mut live, &v.stats);
                }
            }
            if let Some(s) = r.vfs[n as usize].stats.as_mut() {
                add(s, &live);
            }
        }
        Ok(r)
    }

    /// Plugs guest port `id` into the VF it is given (Level 3), with the VF's policy.
    pub(super) fn try_plug_vf(&mut self, id: u16, name: &str) -> Result<u64, Refusal> {
        let bad = |why: &str| Refusal::Port { port: name.into(), why: why.into() };
        let Some((pf_id, n)) =
            self.pfs.iter().find_map(|(k, p)| p.vfs_attached().find(|(_, g)| *g == id).map(|(n, _)| (*k, n)))
        else {
            return Err(bad("no VF is given to it: vswitch vf DEV attach N PORT"));
        };
        let pf = &self.pfs[&pf_id];
        let vf = pf.vf(n).map_err(|e| bad(&e.why))?.clone();
        let (vfs, in_use) = (pf.num_vfs(), pf.vfs_attached().count() as u16);
        let nic_name = self.ports.get(&pf_id).map_or(String::new(), |p| p.cfg.name.clone());
        let port = self.ports[&id].port.clone();
        if vf.policy.vlan != 0 && matches!(port.vlan, crate::l2::VlanMode::Access(_)) {
            return Err(bad(&format!(
                "VF {n} tags what it sends with port VLAN {}, and an access port takes untagged frames \
                 only: make the port a trunk (no vlan=, or trunk=..:{}) or clear the VF's vlan",
                vf.policy.vlan, vf.policy.vlan
            )));
        }
        let facts = super::accel::port_facts(&port);
        if !facts.running && !facts.plugged {
            return Err(bad("its rings are not running"));
        }
        // The VF counts itself among those in use: it is given to this port already.
        let dev = DeviceFacts { tier: Tier::L3, pairs: vfs, in_use: in_use - 1, follows_viommu: true };
        accel::admit(name, &nic_name, &facts, &dev)?;
        if port.policy.config().ingress.is_some() {
            return Err(bad(
                "its policer (police=) is enforced by the software path; a VF's cap is its max_tx_rate",
            ));
        }
        let veb: Arc<[VebEntry]> = self.pfs[&pf_id].veb_table().into();
        let sink = self.vf_sinks.entry((pf_id, n)).or_default().clone();
        let pair = (VfOn::new(n, vf.clone(), veb.clone(), sink.clone()), VfOn::new(n, vf.clone(), veb, sink));
        let took = super::accel::swap_in(&port, pf_id, vf_rate(vf.policy.max_tx_rate), Some(pair))
            .map_err(|why| bad(&why))?;
        (self.wake_pmds)();
        self.vf_refresh(pf_id);
        Ok(took)
    }

    /// Brings PF `pf_id`'s device up to date with its VFs: each plugged pair's policy, rate
    /// and embedded-switch table, and the classifier's pools (each attached VF's address
    /// steered from the wire into its guest's buffers).
    pub(super) fn vf_refresh(&mut self, pf_id: u16) {
        let pf = self.pf(pf_id).clone();
        let veb: Arc<[VebEntry]> = pf.veb_table().into();
        for (n, gid) in pf.vfs_attached() {
            let Some(st) = self.ports.get(&gid) else { continue };
            let Ok(vf) = pf.vf(n) else { continue };
            let mut gt = st.port.txq[0].lock();
            let mut gr = st.port.rxq[0].lock();
            if let Some(Queue::AccelTx(a)) = gt.as_mut() {
                if let Some(v) = a.vf.as_deref_mut().filter(|v| v.n == n && a.nic == pf_id) {
                    let cap_changed = v.vf.policy.max_tx_rate != vf.policy.max_tx_rate;
                    v.vf = vf.clone();
                    v.veb = veb.clone();
                    if cap_changed {
                        a.rate = vf_rate(vf.policy.max_tx_rate);
                    }
                }
            }
            if let Some(Queue::AccelRx(a)) = gr.as_mut() {
                if let Some(v) = a.vf.as_deref_mut().filter(|v| v.n == n && a.nic == pf_id) {
                    v.vf = vf.clone();
                }
            }
        }
        self.sync_pf(pf_id);
    }

    /// The classifier of Level 3 NIC `pf_id`: a pool for each plugged VF with its address (the
    /// VF's own filter then checks VLAN and link state as it writes).
    pub(super) fn sync_pf(&mut self, pf_id: u16) {
        let Some(nic) = self.ports.get(&pf_id).map(|p| p.port.clone()) else { return };
        let pf = self.pf(pf_id).clone();
        let want: Vec<(u16, [u8; 6])> = (pf.vfs_attached())
            .filter(|(_, g)| self.vf_plugged(*g))
            .filter_map(|(n, g)| pf.vf(n).ok().map(|v| (g, v.mac())))
            .collect();
        self.program_nic(&nic, |nm| {
            for (_, owner, _) in nm.bindings() {
                if !want.iter().any(|w| w.0 == owner) {
                    nm.unbind(owner);
                }
            }
            for (g, mac) in &want {
                if nm.bind(*g, None).is_ok() {
                    let macs: &[[u8; 6]] = if *mac == [0; 6] { &[] } else { std::slice::from_ref(mac) };
                    nm.set_macs(*g, macs);
                }
            }
        });
    }
}
