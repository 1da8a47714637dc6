//! Level 3: an SR-IOV physical function with N virtual functions and an embedded switch (VEB),
//! each VF with the policy `ip link set PF vf N ...` sets on a real NIC (82576/82599 semantics,
//! as Linux's igb/ixgbe PF drivers apply them).
//!
//! A VF attached to a guest port is that guest's queue pair, driven by the device (the
//! [`crate::direct`] engine): what the guest sends passes the VF's **egress** checks in the
//! device, what comes to it passes its **ingress** filter, and unicast between two VFs is
//! switched inside the device ([`veb`]): read from one guest's memory, written into the
//! other's, two crossings of the bus and no host CPU.
//!
//! The policy, in iproute2's words ([`vfpolicy::VfSet`] is the one vocabulary of the model and
//! of a real PF):
//! - `mac`: the VF's address. Its receive filter takes unicast for it only; with `spoofchk on`
//!   the device drops what the guest sends from any other source address. Left unset, the VF
//!   takes the address its driver asks for (here: the guest port's); an untrusted VF cannot
//!   change an address the administrator set.
//! - `vlan V qos Q proto P`: a port VLAN. The device tags everything the VF sends with V
//!   (priority Q, TPID P), delivers to it only frames tagged V and strips the tag; a guest that
//!   tags its own frames behind a port VLAN is spoofing a VLAN (dropped with `spoofchk on`,
//!   like the 82576's VLAN anti-spoofing).
//! - `trust on`: the VF may change its MAC and be promiscuous (every multicast group, unknown
//!   unicast, every VLAN); off, it takes broadcast and its own address, untagged (or on its
//!   port VLAN), and nothing else, and what it sends tagged on a VLAN of its own is spoofed.
//! - `state auto|enable|disable`: disable takes the VF's link down (nothing in, nothing out;
//!   counted as dropped); auto follows the PF's link.
//! - `max_tx_rate`/`min_tx_rate` (Mbit/s): a token bucket on what the VF sends (over the rate
//!   the guest's next frame waits in its ring: back-pressure, not loss) and a weight in the
//!   device's transmit scheduler.
//! - `query_rss`: whether the VF may read the RSS key and table (recorded and reported; a
//!   virtio guest has no mailbox to ask with).
//!
//! Statistics are kept as the kernel reports them (`IFLA_VF_STATS`).
//!
//! Changes are checked as a whole before any is applied: a request the device refuses leaves
//! the VF as it was (a real PF applies the attributes one by one and stops at the first the
//! driver refuses).

use vfpolicy::{LinkState, VfInfo, VfSet, VfStats, VlanProto};

/// Most VFs a modelled PF offers (the 82599's 63 VF pools; the 82576 has 7).
pub const MAX_VFS: u16 = 63;

/// Why the device refused a change, with the errno a real PF driver returns for it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{why}")]
pub struct VfError {
    /// The errno (`libc::EINVAL` and friends, as numbers: this crate has no libc).
    pub errno: i32,
    /// What was wrong and what to do.
    pub why: String,
}

/// EINVAL.
pub const EINVAL: i32 = 22;
/// EPERM.
pub const EPERM: i32 = 1;

fn einval(why: String) -> VfError {
    VfError { errno: EINVAL, why }
}

/// One VF's policy (what `ip link show` prints for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VfPolicy {
    /// Administrative MAC (all zero: none set).
    pub mac: [u8; 6],
    /// Port VLAN (0: none).
    pub vlan: u16,
    /// Its 802.1p priority.
    pub qos: u8,
    /// Its TPID.
    pub proto: VlanProto,
    /// Source MAC and VLAN checking of what the VF sends.
    pub spoofchk: bool,
    /// May change its MAC and be promiscuous.
    pub trust: bool,
    /// Link state.
    pub link_state: LinkState,
    /// Guaranteed transmit rate, Mbit/s (0: none).
    pub min_tx_rate: u32,
    /// Transmit rate cap, Mbit/s (0: none).
    pub max_tx_rate: u32,
    /// May query the RSS configuration.
    pub query_rss: bool,
}

impl Default for VfPolicy {
    /// What a PF driver gives a new VF: no address, no VLAN, spoof checking on, untrusted.
    fn default() -> Self {
        VfPolicy {
            mac: [0; 6],
            vlan: 0,
            qos: 0,
            proto: VlanProto::Dot1Q,
            spoofchk: true,
            trust: false,
            link_state: LinkState::Auto,
            min_tx_rate: 0,
            max_tx_rate: 0,
            query_rss: false,
        }
    }
}

impl VfPolicy {
    /// The 4-byte tag the device inserts (none without a port VLAN).
    pub fn tag(&self) -> Option<[u8; 4]> {
        (self.vlan != 0).then(|| {
            let tpid = tpid(self.proto).to_be_bytes();
            let tci = ((u16::from(self.qos) << 13) | self.vlan).to_be_bytes();
            [tpid[0], tpid[1], tci[0], tci[1]]
        })
    }
}

fn tpid(p: VlanProto) -> u16 {
    match p {
        VlanProto::Dot1Q => 0x8100,
        VlanProto::Dot1AD => 0x88a8,
    }
}

fn is_tagged(frame: &[u8]) -> Option<(u16, u16)> {
    if frame.len() < 18 {
        return None;
    }
    let et = u16::from_be_bytes([frame[12], frame[13]]);
    (et == 0x8100 || et == 0x88a8).then(|| (et, u16::from_be_bytes([frame[14], frame[15]]) & 0xfff))
}

/// Why the device did not pass a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VfDrop {
    /// `state disable` (or the PF's link is down under `auto`).
    LinkDown,
    /// Shorter than an Ethernet header.
    Runt,
    /// Sent from a source MAC that is not the VF's (`spoofchk on`).
    SpoofedMac,
    /// Sent tagged behind a port VLAN (`spoofchk on`), or with a VLAN the port VLAN forbids.
    SpoofedVlan,
    /// Received on another VLAN than the port VLAN, or untagged behind one.
    VlanFilter,
    /// Received for an address the VF does not take (not its own, not broadcast; untrusted).
    AddressFilter,
}

/// What the device does with a frame a VF sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Egress {
    /// It leaves, with this tag inserted after the source address (if any).
    Pass(Option<[u8; 4]>),
    /// It is dropped (counted in the VF's `tx_dropped`).
    Drop(VfDrop),
}

/// What the device does with a frame for a VF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingress {
    /// Written into the VF's buffers; `strip`: without its (port VLAN) tag.
    Deliver {
        /// Remove the 4-byte tag after the source address.
        strip: bool,
    },
    /// Not for this VF (counted in its `rx_dropped`).
    Drop(VfDrop),
}

/// One VF.
#[derive(Clone, Debug, Default)]
pub struct Vf {
    /// The administrator's policy.
    pub policy: VfPolicy,
    /// The address the VF's driver asked for (used when no administrative MAC is set).
    pub driver_mac: Option<[u8; 6]>,
    /// As the kernel reports them.
    pub stats: VfStats,
    /// The switch port it is attached to.
    pub attached: Option<u16>,
}

impl Vf {
    /// The address the VF uses: the administrator's, else its driver's (zero: none).
    pub fn mac(&self) -> [u8; 6] {
        if self.policy.mac != [0; 6] {
            self.policy.mac
        } else {
            self.driver_mac.unwrap_or([0; 6])
        }
    }

    fn link_up(&self, pf_up: bool) -> bool {
        match self.policy.link_state {
            LinkState::Auto => pf_up,
            LinkState::Enable => true,
            LinkState::Disable => false,
        }
    }
}

/// A physical function: its VFs and the embedded switch between them.
#[derive(Clone, Debug)]
pub struct Pf {
    vfs: Vec<Vf>,
    link_mbps: u32,
    /// The PF's link (what `state auto` follows).
    pub link_up: bool,
    /// Unicast frames switched VF to VF inside the device.
    pub veb_frames: u64,
}

impl Pf {
    /// A PF with `vfs` VFs on a `link_mbps` link (rates are checked against it).
    pub fn new(vfs: u16, link_mbps: u32) -> Result<Pf, VfError> {
        if vfs == 0 || vfs > MAX_VFS {
            return Err(einval(format!("a PF has 1..={MAX_VFS} VFs, not {vfs}")));
        }
        Ok(Pf { vfs: vec![Vf::default(); usize::from(vfs)], link_mbps, link_up: true, veb_frames: 0 })
    }

    /// How many VFs (`IFLA_NUM_VF`).
    pub fn num_vfs(&self) -> u16 {
        self.vfs.len() as u16
    }

    /// The link speed, Mbit/s.
    pub fn link_mbps(&self) -> u32 {
        self.link_mbps
    }

    /// VF `n`.
    pub fn vf(&self, n: u32) -> Result<&Vf, VfError> {
        let total = self.vfs.len();
        self.vfs.get(n as usize).ok_or_else(|| {
            einval(format!("VF {n} does not exist: the PF has {total} VFs (0..={})", total - 1))
        })
    }

    /// VF `n`, to change.
    pub fn vf_mut(&mut self, n: u32) -> Result<&mut Vf, VfError> {
        self.vf(n)?;
        Ok(&mut self.vfs[n as usize])
    }

    /// Applies `ip link set PF vf N ...` (`s`), all of it or, if the device refuses a part,
    /// none of it.
    pub fn set(&mut self, s: &VfSet) -> Result<(), VfError> {
        let link = self.link_mbps;
        let others_min: u64 = self
            .vfs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as u32 != s.vf)
            .map(|(_, v)| u64::from(v.policy.min_tx_rate))
            .sum();
        let vf = self.vf_mut(s.vf)?;
        let mut p = vf.policy;
        if let Some(mac) = s.mac {
            if mac[0] & 1 != 0 {
                return Err(einval(format!(
                    "{} is a multicast address; a VF's MAC must be unicast (or 00:00:00:00:00:00 to clear it)",
                    fmt_mac(&mac)
                )));
            }
            p.mac = mac;
        }
        if let Some(v) = s.vlan {
            if v.vid > 4095 || v.qos > 7 {
                return Err(einval(format!(
                    "vlan {} qos {}: VLAN ids are 0..4095, priorities 0..7",
                    v.vid, v.qos
                )));
            }
            if v.vid == 0 && v.qos != 0 {
                return Err(einval("qos needs a port VLAN (vlan 0 clears the port VLAN)".into()));
            }
            (p.vlan, p.qos, p.proto) = (v.vid, v.qos, v.proto);
        }
        if let Some(on) = s.spoofchk {
            p.spoofchk = on;
        }
        if let Some(on) = s.trust {
            p.trust = on;
        }
        if let Some(st) = s.state {
            p.link_state = st;
        }
        if let Some(on) = s.query_rss {
            p.query_rss = on;
        }
        if let Some(r) = s.max_tx_rate {
            p.max_tx_rate = r;
        }
        if let Some(r) = s.min_tx_rate {
            p.min_tx_rate = r;
        }
        if s.max_tx_rate.is_some() || s.min_tx_rate.is_some() {
            if p.max_tx_rate != 0 && p.min_tx_rate > p.max_tx_rate {
                return Err(einval(format!(
                    "min_tx_rate {} is above max_tx_rate {} (Mbit/s)",
                    p.min_tx_rate, p.max_tx_rate
                )));
            }
            if p.max_tx_rate > link {
                return Err(einval(format!(
                    "max_tx_rate {} Mbit/s is above the link speed ({link} Mbit/s)",
                    p.max_tx_rate
                )));
            }
            if others_min + u64::from(p.min_tx_rate) > u64::from(link) {
                return Err(einval(format!(
                    "the VFs' min_tx_rate would add up to {} Mbit/s, above the link speed ({link} Mbit/s)",
                    others_min + u64::from(p.min_tx_rate)
                )));
            }
        }
        vf.policy = p;
        Ok(())
    }

    /// The VFs as `ip link show` reads them (`IFLA_VFINFO_LIST`).
    pub fn info(&self) -> Vec<VfInfo> {
        (self.vfs.iter().enumerate())
            .map(|(i, v)| VfInfo {
                vf: i as u32,
                mac: v.policy.mac,
                vlan: v.policy.vlan,
                qos: v.policy.qos,
                vlan_proto: v.policy.proto,
                spoofchk: Some(v.policy.spoofchk),
                trust: Some(v.policy.trust),
                link_state: Some(v.policy.link_state),
                min_tx_rate: v.policy.min_tx_rate,
                max_tx_rate: v.policy.max_tx_rate,
                query_rss: Some(v.policy.query_rss),
                stats: Some(v.stats),
            })
            .collect()
    }

    /// The VF's driver asks for `mac` (the igbvf mailbox's SET_MAC_ADDR; here, the address the
    /// guest was given): granted unless an untrusted VF would replace an administrative MAC.
    pub fn request_mac(&mut self, n: u32, mac: [u8; 6]) -> Result<(), VfError> {
        let vf = self.vf_mut(n)?;
        let admin = vf.policy.mac;
        if admin != [0; 6] && admin != mac && !vf.policy.trust {
            return Err(VfError {
                errno: EPERM,
                why: format!(
                    "VF {n} asked for {} but its MAC was set to {} by the administrator and it is not trusted (`trust on` lets it change its MAC)",
                    fmt_mac(&mac),
                    fmt_mac(&admin)
                ),
            });
        }
        if vf.policy.trust && admin != [0; 6] {
            vf.policy.mac = mac;
        }
        vf.driver_mac = Some(mac);
        Ok(())
    }

    /// What the device does with `frame` (Ethernet header first) that VF `n` sends.
    pub fn egress(&self, n: u32, frame: &[u8]) -> Egress {
        let Ok(vf) = self.vf(n) else { return Egress::Drop(VfDrop::LinkDown) };
        egress(vf, self.link_up, frame)
    }

    /// What the device does with `frame` for VF `n`.
    pub fn ingress(&self, n: u32, frame: &[u8]) -> Ingress {
        let Ok(vf) = self.vf(n) else { return Ingress::Drop(VfDrop::LinkDown) };
        ingress(vf, self.link_up, frame)
    }

    /// The VFs given to switch ports: (VF, port).
    pub fn vfs_attached(&self) -> impl Iterator<Item = (u32, u16)> + '_ {
        (self.vfs.iter().enumerate()).filter_map(|(i, v)| v.attached.map(|p| (i as u32, p)))
    }

    /// The embedded switch's forwarding table: each VF attached to a port, by its address and
    /// port VLAN.
    pub fn veb_table(&self) -> Vec<VebEntry> {
        (self.vfs.iter().enumerate())
            .filter_map(|(i, v)| {
                let port = v.attached?;
                let mac = v.mac();
                (mac != [0; 6]).then_some(VebEntry { mac, vlan: v.policy.vlan, vf: i as u32, port })
            })
            .collect()
    }
}

/// One entry of the embedded switch's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VebEntry {
    /// The VF's address.
    pub mac: [u8; 6],
    /// Its port VLAN (0: none).
    pub vlan: u16,
    /// The VF.
    pub vf: u32,
    /// The switch port it is attached to.
    pub port: u16,
}

/// The embedded switch: the VF (other than `from`) that unicast `frame` (as it left `from`,
/// its tag inserted) is for, if one is. Group frames and frames for other addresses leave the
/// VEB (to the wire or the PF's host side).
pub fn veb(table: &[VebEntry], from: u32, frame: &[u8]) -> Option<VebEntry> {
    if frame.len() < 14 || frame[0] & 1 != 0 {
        return None;
    }
    let vid = is_tagged(frame).map_or(0, |(_, v)| v);
    table.iter().find(|e| e.vf != from && frame[..6] == e.mac && e.vlan == vid).copied()
}

/// [`Pf::egress`] for one VF (the polling thread holds a copy of the VF).
pub fn egress(vf: &Vf, pf_up: bool, frame: &[u8]) -> Egress {
    let p = &vf.policy;
    if !vf.link_up(pf_up) {
        return Egress::Drop(VfDrop::LinkDown);
    }
    if frame.len() < 14 {
        return Egress::Drop(VfDrop::Runt);
    }
    if p.spoofchk {
        let mac = vf.mac();
        if mac != [0; 6] && frame[6..12] != mac {
            return Egress::Drop(VfDrop::SpoofedMac);
        }
        // Behind a port VLAN any tag of the guest's is spoofed; without one, a VLAN the VF is
        // no member of (it joins none without `trust on`; priority tags, VID 0, pass).
        match is_tagged(frame) {
            Some(_) if p.vlan != 0 => return Egress::Drop(VfDrop::SpoofedVlan),
            Some((_, vid)) if vid != 0 && !p.trust => return Egress::Drop(VfDrop::SpoofedVlan),
            _ => {}
        }
    }
    Egress::Pass(p.tag())
}

/// [`Pf::ingress`] for one VF.
pub fn ingress(vf: &Vf, pf_up: bool, frame: &[u8]) -> Ingress {
    let p = &vf.policy;
    if !vf.link_up(pf_up) {
        return Ingress::Drop(VfDrop::LinkDown);
    }
    if frame.len() < 14 {
        return Ingress::Drop(VfDrop::Runt);
    }
    let tag = is_tagged(frame);
    let strip = match (p.vlan, tag) {
        (0, None) => false,
        (0, Some((_, vid))) if vid == 0 || p.trust => false,
        (v, Some((tp, vid))) if vid == v && tp == tpid(p.proto) => true,
        _ => return Ingress::Drop(VfDrop::VlanFilter),
    };
    let dst = &frame[..6];
    let ok = dst == [0xff; 6] || p.trust || (dst[0] & 1 == 0 && dst == vf.mac());
    if !ok {
        return Ingress::Drop(VfDrop::AddressFilter);
    }
    Ingress::Deliver { strip }
}

/// Adds a frame to a VF's statistics (`tx`: it sent it; else received).
pub fn count(stats: &mut VfStats, tx: bool, frame: &[u8]) {
    let len = frame.len() as u64;
    if tx {
        stats.tx_packets += 1;
        stats.tx_bytes += len;
    } else {
        stats.rx_packets += 1;
        stats.rx_bytes += len;
        if frame.len() >= 6 && frame[0] & 1 != 0 {
            if frame[..6] == [0xff; 6] {
                stats.broadcast += 1;
            } else {
                stats.multicast += 1;
            }
        }
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(m: &[u8; 6]) -> String {
    format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
}
