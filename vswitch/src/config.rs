//! Switch and port configuration: from the command line (`--port NAME=PATH,..`) or TOML.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::l2::vlan::VlanSet;
use crate::l2::{parse_mac, VlanMode};
use crate::policy::spoof::SpoofConfig;
use crate::policy::{BitRate, ByteSize, PolicerConfig, PolicyConfig, ShaperConfig};

mod kinds;
pub use kinds::{NicConfig, TunnelConfig};

/// One port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// Name (unique).
    pub name: String,
    /// vhost-user socket path (a guest's port).
    #[serde(default)]
    pub socket: PathBuf,
    /// TAP device to create or attach to (an uplink port to the host's network stack)
    /// instead of a socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// An existing network device (a NIC, a VF, a veth) reached through packet sockets
    /// (`afpacket:IFNAME`, an uplink) instead of a socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub afpacket: Option<String>,
    /// An existing network device reached through XDP sockets (`afxdp:IFNAME`, an uplink)
    /// instead of a socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub afxdp: Option<String>,
    /// How an `afxdp:` port's sockets reach the device (`mode=`; default `auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xdp_mode: Option<crate::uplink::afxdp::XdpMode>,
    /// A VXLAN or Geneve tunnel to other machines (`vxlan:REMOTE_IP`, `geneve:REMOTE_IP`, an
    /// uplink) instead of a socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelConfig>,
    /// A modelled NIC between the TAP device (its wire) and the guests (`nic:IFNAME`): the
    /// tier and its table sizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nic: Option<NicConfig>,
    /// MTU to give the TAP device (default: the kernel's, 1500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Connect to the frontend's socket (and keep retrying) instead of listening.
    #[serde(default)]
    pub client: bool,
    /// Access VLAN (1..=4094).
    #[serde(default)]
    pub vlan: Option<u16>,
    /// Trunk VLAN list; empty with no `vlan` means all VLANs.
    #[serde(default)]
    pub trunk: Vec<u16>,
    /// Queue pairs offered (MQ).
    #[serde(default = "one")]
    pub queues: u16,
    /// MAC offered to the guest; derived from the name when absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// Policer on what the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<PolicerConfig>,
    /// Shaper on what the guest receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<ShaperConfig>,
    /// Source address checks on what the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_spoof: Option<SpoofConfig>,
    /// Offer the checksum and TCP segmentation offloads (default on). Off: the guest
    /// checksums and segments itself, and the switch does it for it when a sender with
    /// offloads sends to it.
    #[serde(default = "yes")]
    pub offloads: bool,
    /// Offer packed virtqueues (`VIRTIO_F_RING_PACKED`; default off). Off, a frontend asking
    /// for them (QEMU `packed=on`, virtio-user `packed_vq=1`) gets split rings. A packed ring
    /// does not survive a switch restart: it has no used index in guest memory, so QEMU
    /// resumes it where the switch started it and the guest's NIC stops; split rings, which
    /// cost the switch the same, resume.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub packed: bool,
    /// The polling thread (pmdN, by index in `pmd_cores`) of each queue pair, kept there by
    /// rebalancing (`pmd=1`, or one per pair `pmd=0:1`); empty: placed and moved by load.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pmd: Vec<usize>,
    /// Only frontends running as one of these users (or, with `allow_gids`, groups) may be
    /// this port's guest, checked with `SO_PEERCRED` on every connection, in client mode too
    /// (so a process squatting the path is not served). Empty (both): anyone who can reach
    /// the socket file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_uids: Vec<u32>,
    /// See `allow_uids`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_gids: Vec<u32>,
    /// Most MAC addresses learned from this port (a guest cannot fill the forwarding table;
    /// frames from further source MACs are forwarded but not learned, and counted). Default:
    /// 1024 for a guest; 16384 for an uplink, which has a whole network segment behind it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_macs: Option<u32>,
    /// When a NIC model's pool serves this guest, the rate the device shapes what it sends to
    /// the wire to (`nic-rate=100M`; default: the NIC's `pool_rate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nic_rate: Option<BitRate>,
    /// ... and its pool's weight in the device's DRR onto the wire (`nic-weight=N`, 1..=100,
    /// default 1; the host's pool has 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nic_weight: Option<u32>,
    /// A NIC tier to plug this guest port into whenever its rings run (`accel=l2`): tried again
    /// after each reconnect; refused (the reason logged once), the port stays on the software
    /// path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
}

/// Default MAC limit of an uplink port (a quarter of the forwarding table).
pub const UPLINK_MAC_LIMIT: u32 = 16384;

impl PortConfig {
    /// Whether the port is an uplink (a TAP device or a NIC model's wire), not a guest's.
    pub fn is_uplink(&self) -> bool {
        self.tap.is_some()
            || self.afpacket.is_some()
            || self.afxdp.is_some()
            || self.tunnel.is_some()
            || self.nic.as_ref().is_some_and(|n| n.wire.is_some())
    }

    /// The MAC limit in force: the one set, else the default for the port's kind.
    pub fn mac_limit(&self) -> u32 {
        self.max_macs.unwrap_or(if self.is_uplink() {
            UPLINK_MAC_LIMIT
        } else {
            crate::l2::fdb::DEFAULT_MAC_LIMIT
        })
    }
}

fn one() -> u16 {
    1
}

fn yes() -> bool {
    true
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// bad port spec
    #[error("bad --port '{spec}': {why} (expected NAME=SOCKET_PATH[,client], NAME=tap:IFNAME[,mtu=N], NAME=afpacket:IFNAME[,mtu=N], NAME=afxdp:IFNAME[,mode=auto|zerocopy|copy|skb][,mtu=N], NAME=vxlan:REMOTE|geneve:REMOTE[,vni=N][,local=IP][,dstport=N][,remote=IP][,csum=on|off] or NAME=nic:IFNAME|nic:wire:WIRE[,level=0|1|2|3][,pools=N|,vfs=N][,filters=N][,lro=on|off][,itr=adaptive|off|US][,pool-rate=RATE][,mtu=N][,vlan=N|,trunk=N:M:...][,queues=N][,mac=XX:XX:XX:XX:XX:XX][,police=RATE][,shape=RATE][,anti-spoof][,offloads=on|off][,packed=on|off][,pmd=N[:N..]][,max-macs=N][,allow-uid=U:U..][,allow-gid=G:G..][,nic-rate=RATE][,nic-weight=N][,accel=l1|l2|l3])")]
    PortSpec {
        /// What the user wrote.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
    /// bad config value
    #[error("port '{port}': {why}")]
    Port {
        /// Port name.
        port: String,
        /// What is wrong.
        why: String,
    },
    /// refused policy
    #[error("port '{port}': {source}")]
    Policy {
        /// Port name.
        port: String,
        /// What is wrong.
        source: crate::policy::PolicyError,
    },
    /// unreadable file
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// bad TOML
    #[error("config file {path}: {source}")]
    Toml {
        /// File.
        path: PathBuf,
        /// Cause.
        source: toml::de::Error,
    },
    /// other
    #[error("{0}")]
    Other(String),
}

impl PortConfig {
    /// Parses `NAME=SOCKET_PATH[,client][,vlan=N|,trunk=N:M:...][,queues=N][,mac=..]`.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::PortSpec { spec: spec.to_string(), why: why.to_string() };
        let (name, rest) = spec.split_once('=').ok_or_else(|| bad("missing '='"))?;
        let mut parts = rest.split(',');
        let socket = parts.next().filter(|s| !s.is_empty()).ok_or_else(|| bad("missing socket path"))?;
        let (socket, tap, nic) = match (socket.strip_prefix("tap:"), socket.strip_prefix("nic:")) {
            (Some(ifname), _) => ("", Some(ifname.to_string()), None),
            (_, Some(w)) if w.starts_with("wire:") => (
                "",
                None,
                Some(NicConfig { wire: Some(w["wire:".len()..].to_string()), ..NicConfig::default() }),
            ),
            (_, Some(ifname)) => ("", Some(ifname.to_string()), Some(NicConfig::default())),
            _ => (socket, None, None),
        };
        let (socket, afpacket) = match socket.strip_prefix("afpacket:") {
            Some(ifname) => ("", Some(ifname.to_string())),
            None => (socket, None),
        };
        let (socket, afxdp) = match socket.strip_prefix("afxdp:") {
            Some(ifname) => ("", Some(ifname.to_string())),
            None => (socket, None),
        };
        let kind = |p: &str| match p {
            "vxlan" => Some(crate::uplink::tunnel::TunnelKind::Vxlan),
            "geneve" => Some(crate::uplink::tunnel::TunnelKind::Geneve),
            _ => None,
        };
        let (socket, tunnel) = match socket.split_once(':').and_then(|(k, r)| Some((kind(k)?, r))) {
            Some((kind, remote)) => {
                let ip = remote
                    .parse()
                    .map_err(|_| bad(&format!("'{remote}' is not an IP address (the remote VTEP)")))?;
                (
                    "",
                    Some(TunnelConfig {
                        kind,
                        remotes: vec![ip],
                        vni: 0,
                        local: None,
                        dstport: None,
                        csum: true,
                    }),
                )
            }
            None => (socket, None),
        };
        let mut pc = PortConfig {
            name: name.to_string(),
            socket: socket.into(),
            tap,
            afpacket,
            afxdp,
            xdp_mode: None,
            tunnel,
            nic,
            mtu: None,
            client: false,
            vlan: None,
            trunk: Vec::new(),
            queues: 1,
            mac: None,
            ingress: None,
            egress: None,
            anti_spoof: None,
            offloads: true,
            packed: false,
            pmd: Vec::new(),
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            max_macs: None,
            nic_rate: None,
            nic_weight: None,
            accel: None,
        };
        let ids = |v: &str, what: &str| {
            v.split(':').map(|x| x.parse::<u32>()).collect::<Result<Vec<_>, _>>().map_err(|_| bad(what))
        };
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "client" => pc.client = true,
                None if opt == "server" => pc.client = false,
                Some(("vlan", v)) => pc.vlan = Some(v.parse().map_err(|_| bad("vlan must be a number"))?),
                Some(("trunk", v)) => {
                    pc.trunk = v
                        .split(':')
                        .map(|x| x.parse::<u16>())
                        .collect::<Result<_, _>>()
                        .map_err(|_| bad("trunk must be VLAN numbers separated by ':'"))?;
                }
                Some(("queues", v)) => pc.queues = v.parse().map_err(|_| bad("queues must be a number"))?,
                Some(("pmd", v)) => {
                    pc.pmd = v
                        .split(':')
                        .map(|x| x.trim_start_matches("pmd").parse::<usize>())
                        .collect::<Result<_, _>>()
                        .map_err(|_| bad("pmd must be polling-thread numbers (0, 1, ..) separated by ':'"))?;
                }
                Some(("mac", v)) => pc.mac = Some(v.to_string()),
                Some(("mtu", v)) => pc.mtu = Some(v.parse().map_err(|_| bad("mtu must be a number"))?),
                Some(("mode", v)) => pc.xdp_mode = Some(v.parse().map_err(|e: String| bad(&e))?),
                Some(("police", v)) => {
                    let rate = v.parse::<BitRate>().map_err(|e| bad(&e.to_string()))?;
                    pc.ingress = Some(PolicerConfig {
                        rate,
                        burst: None,
                        excess_burst: None,
                        excess_rate: None,
                        pps: None,
                    });
                }
                Some(("shape", v)) => {
                    let rate = v.parse::<BitRate>().map_err(|e| bad(&e.to_string()))?;
                    pc.egress = Some(ShaperConfig { rate, burst: None, queue: None, pps: None });
                }
                None if opt == "anti-spoof" => pc.anti_spoof = Some(SpoofConfig::default()),
                Some(("max-macs", v)) => {
                    pc.max_macs = Some(v.parse().map_err(|_| bad("max-macs must be a number"))?)
                }
                Some(("allow-uid", v)) => {
                    pc.allow_uids = ids(v, "allow-uid must be user ids separated by ':'")?
                }
                Some(("allow-gid", v)) => {
                    pc.allow_gids = ids(v, "allow-gid must be group ids separated by ':'")?
                }
                Some(("nic-rate", v)) => {
                    pc.nic_rate = Some(v.parse::<BitRate>().map_err(|e| bad(&e.to_string()))?)
                }
                Some(("accel", v)) => pc.accel = Some(v.to_string()),
                Some(("nic-weight", v)) => {
                    pc.nic_weight = Some(v.parse().map_err(|_| bad("nic-weight must be a number"))?)
                }
                Some(("pool-rate", v)) => {
                    let n = pc.nic.as_mut().ok_or_else(|| bad("pool-rate= is for nic: ports"))?;
                    n.pool_rate = Some(v.parse::<BitRate>().map_err(|e| bad(&e.to_string()))?);
                }
                Some(("itr", v)) => {
                    let n = pc.nic.as_mut().ok_or_else(|| bad("itr= is for nic: ports"))?;
                    n.itr = v.to_string();
                }
                Some(("lro", v)) => {
                    let n = pc.nic.as_mut().ok_or_else(|| bad("lro= is for nic: ports"))?;
                    n.lro = match v {
                        "on" => true,
                        "off" => false,
                        _ => return Err(bad("lro must be 'on' or 'off'")),
                    }
                }
                Some((k @ ("vni" | "local" | "dstport" | "remote" | "csum"), v)) => {
                    let t = pc
                        .tunnel
                        .as_mut()
                        .ok_or_else(|| bad(&format!("{k}= is for vxlan: and geneve: ports")))?;
                    let ip = || v.parse().map_err(|_| bad(&format!("{k}={v} is not an IP address")));
                    match k {
                        "vni" => t.vni = v.parse().map_err(|_| bad("vni must be a number"))?,
                        "local" => t.local = Some(ip()?),
                        "remote" => t.remotes.push(ip()?),
                        "dstport" => {
                            t.dstport = Some(v.parse().map_err(|_| bad("dstport must be a UDP port"))?)
                        }
                        _ => {
                            t.csum = match v {
                                "on" => true,
                                "off" => false,
                                _ => return Err(bad("csum must be 'on' or 'off'")),
                            }
                        }
                    }
                }
                Some(("vfs", v)) => {
                    let n = pc.nic.as_mut().ok_or_else(|| bad("vfs= is for nic: ports at level=3"))?;
                    let vfs: u8 = v.parse().map_err(|_| bad("vfs must be a number (1..63)"))?;
                    n.pools = vfs.saturating_add(1);
                }
                Some((k @ ("level" | "pools" | "filters"), v)) => {
                    let n = pc.nic.as_mut().ok_or_else(|| bad(&format!("{k}= is for nic: ports")))?;
                    let num = |what: &str| bad(&format!("{what} must be a number"));
                    match k {
                        "level" => n.level = v.parse().map_err(|_| num("level"))?,
                        "pools" => n.pools = v.parse().map_err(|_| num("pools"))?,
                        _ => n.filters = v.parse().map_err(|_| num("filters"))?,
                    }
                }
                Some(("offloads", v)) => {
                    pc.offloads = match v {
                        "on" => true,
                        "off" => false,
                        _ => return Err(bad("offloads must be 'on' or 'off'")),
                    }
                }
                Some(("packed", v)) => {
                    pc.packed = match v {
                        "on" => true,
                        "off" => false,
                        _ => return Err(bad("packed must be 'on' or 'off'")),
                    }
                }
                _ => return Err(bad(&format!("unknown option '{opt}'"))),
            }
        }
        pc.validate()?;
        Ok(pc)
    }

    /// The polling thread queue pair `pair` is pinned to by the `pmd=` option, if any.
    pub fn pmd_of(&self, pair: u16) -> Option<usize> {
        match self.pmd.as_slice() {
            [] => None,
            [t] => Some(*t),
            v => v.get(pair as usize).copied(),
        }
    }

    /// Checks that the threads `pmd=` names are among a switch's `threads`.
    pub fn check_pmds(&self, threads: usize) -> Result<(), ConfigError> {
        match self.pmd.iter().find(|t| **t >= threads) {
            Some(t) => Err(ConfigError::Port {
                port: self.name.clone(),
                why: format!(
                    "pmd={t}: the switch runs {threads} polling thread(s), pmd0..pmd{} (pmd_cores adds more)",
                    threads.saturating_sub(1)
                ),
            }),
            None => Ok(()),
        }
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |why: String| ConfigError::Port { port: self.name.clone(), why };
        if self.name.is_empty() || self.name.len() > 64 || self.name.contains(char::is_whitespace) {
            return Err(err("name must be 1-64 characters without spaces".into()));
        }
        let wire = self.nic.as_ref().and_then(|n| n.wire.as_deref());
        if let Some(t) = &self.tunnel {
            if self.tap.is_some()
                || self.afpacket.is_some()
                || self.afxdp.is_some()
                || !self.socket.as_os_str().is_empty()
                || self.nic.is_some()
            {
                return Err(err(
                    "a port has one of a socket, a tap device, a NIC model, afpacket: or a tunnel".into(),
                ));
            }
            if t.remotes.is_empty() {
                return Err(err("a tunnel needs a remote VTEP address".into()));
            }
            let v6 = t.remotes[0].is_ipv6();
            if t.remotes.iter().chain(t.local.iter()).any(|a| a.is_ipv6() != v6) {
                return Err(err("a tunnel's remote and local addresses are all IPv4 or all IPv6".into()));
            }
            if t.vni > 0xff_ffff {
                return Err(err(format!("vni={} is outside 0..16777215", t.vni)));
            }
            if t.dstport == Some(0) {
                return Err(err("dstport=0 is not a UDP port".into()));
            }
            if self.queues != 1 || self.client || self.mtu.is_some() {
                return Err(err("a tunnel port has one queue, no client mode and no mtu= (the inner MTU is the underlay's less the headers)".into()));
            }
        }
        if self.xdp_mode.is_some() && self.afxdp.is_none() {
            return Err(err("mode= is for afxdp: ports".into()));
        }
        if !self.pmd.is_empty() && self.pmd.len() != 1 && self.pmd.len() != self.queues as usize {
            return Err(err(format!(
                "pmd= names {} polling threads for {} queue pairs: give one for all, or one per pair",
                self.pmd.len(),
                self.queues
            )));
        }
        if self.packed && self.is_uplink() {
            return Err(err("packed=on is for a guest's port (virtio rings over vhost-user)".into()));
        }
        if let Some(a) = self.afpacket.as_ref().or(self.afxdp.as_ref()) {
            if self.tap.is_some()
                || !self.socket.as_os_str().is_empty()
                || self.nic.is_some()
                || (self.afpacket.is_some() && self.afxdp.is_some())
            {
                return Err(err(
                    "a port has one of a socket, a tap device, a NIC model, afpacket: or afxdp:".into(),
                ));
            }
            if !crate::uplink::tap::valid_name(a) {
                return Err(err(format!("device name '{a}' must be 1-15 bytes")));
            }
            if self.client {
                return Err(err("client mode is for sockets, not network devices".into()));
            }
        }
        match (&self.tap, self.socket.as_os_str().is_empty()) {
            (None, true) if self.afpacket.is_some() || self.afxdp.is_some() || self.tunnel.is_some() => {}
            (Some(_), false) => return Err(err("a port has a socket or a tap device, not both".into())),
            (None, false) if wire.is_some() => {
                return Err(err("a port has a socket or a NIC model's wire, not both".into()))
            }
            (None, true) if wire.is_none() => {
                return Err(err("a port needs a socket path (or a tap device, or nic:wire:NAME)".into()))
            }
            (None, true) if self.client => return Err(err("client mode is for sockets, not wires".into())),
            (Some(t), true) if !crate::uplink::tap::valid_name(t) => {
                return Err(err(format!("tap device name '{t}' must be 1-15 bytes")));
            }
            (Some(_), true) if self.client => {
                return Err(err("client mode is for sockets, not tap devices".into()))
            }
            _ => {}
        }
        if let Some(n) = &self.nic {
            match (&self.tap, &n.wire) {
                (None, None) => {
                    return Err(err(
                        "a NIC model needs a wire: nic:IFNAME (a TAP device) or nic:wire:NAME (in-process)"
                            .into(),
                    ))
                }
                (Some(_), Some(_)) => {
                    return Err(err("a NIC model has one wire: a TAP device or wire=, not both".into()))
                }
                (None, Some(w)) if !crate::uplink::link::valid_name(w) => {
                    return Err(err(format!(
                        "wire name '{w}' must be 1-64 bytes of letters, digits, '-', '_' or '.'"
                    )))
                }
                (None, Some(_)) if self.queues != 1 => {
                    return Err(err(format!("queues={}: an in-process wire has one queue pair", self.queues)))
                }
                _ => {}
            }
            if n.level > 3 {
                return Err(err(format!("level={} is not a tier (0, 1, 2 and 3 are)", n.level)));
            }
            if n.level == 3 && self.vlan.is_some() {
                return Err(err(
                    "a Level 3 PF's wire carries its VFs' port VLANs tagged: leave vlan= off (trunk=.. is fine)"
                        .into(),
                ));
            }
            if !(2..=64).contains(&n.pools) {
                return Err(err(format!(
                    "pools={} is outside 2..64 (the host's pool and one or more guests')",
                    n.pools
                )));
            }
            if !(1..=4096).contains(&n.filters) {
                return Err(err(format!("filters={} is outside 1..4096", n.filters)));
            }
            n.itr_profile().map_err(err)?;
        }
        if (self.nic_rate.is_some() || self.nic_weight.is_some()) && self.is_uplink() {
            return Err(err("nic-rate= and nic-weight= are a guest port's (its pool's on a NIC model); a NIC's own is pool-rate=".into()));
        }
        if let Some(t) = &self.accel {
            t.parse::<accel::Tier>().map_err(err)?;
            if self.is_uplink() {
                return Err(err("accel= is for guest ports (an uplink is the device)".into()));
            }
        }
        if let Some(w) = self.nic_weight {
            if !(1..=100).contains(&w) {
                return Err(err(format!("nic-weight={w} is outside 1..100")));
            }
        }
        if let Some(m) = self.mtu {
            let max = crate::uplink::tap::MAX_MTU;
            if self.tap.is_none() && self.afpacket.is_none() && self.afxdp.is_none() {
                return Err(err("mtu= is for tap, afpacket and afxdp devices (a guest sets its own)".into()));
            }
            if !(68..=max).contains(&m) {
                return Err(err(format!("mtu={m} is outside 68..{max}")));
            }
        }
        if self.vlan.is_some() && !self.trunk.is_empty() {
            return Err(err("a port is either an access port (vlan=) or a trunk (trunk=), not both".into()));
        }
        if let Some(v) = self.vlan {
            if !(1..=4094).contains(&v) {
                return Err(err(format!("access VLAN {v} is outside 1..4094")));
            }
        }
        if let Some(v) = self.trunk.iter().find(|v| **v > 4094) {
            return Err(err(format!("trunk VLAN {v} is outside 0..4094")));
        }
        if !(1..=16).contains(&self.queues) {
            return Err(err(format!("queues={} is outside 1..16", self.queues)));
        }
        if !(1..=65536).contains(&self.mac_limit()) {
            return Err(err(format!("max_macs={} is outside 1..65536", self.mac_limit())));
        }
        if let Some(m) = &self.mac {
            parse_mac(m).ok_or_else(|| err(format!("mac '{m}' is not of the form 52:54:00:12:34:56")))?;
        }
        self.policy()
            .validate(self.mac_bytes())
            .map_err(|source| ConfigError::Policy { port: self.name.clone(), source })?;
        Ok(())
    }

    /// The port's policy settings.
    pub fn policy(&self) -> PolicyConfig {
        PolicyConfig {
            ingress: self.ingress.clone(),
            egress: self.egress.clone(),
            anti_spoof: self.anti_spoof.clone(),
        }
    }

    /// Replaces the port's policy settings.
    pub fn set_policy(&mut self, p: PolicyConfig) {
        self.ingress = p.ingress;
        self.egress = p.egress;
        self.anti_spoof = p.anti_spoof;
    }

    /// The VLAN rule.
    pub fn vlan_mode(&self) -> VlanMode {
        match (self.vlan, self.trunk.is_empty()) {
            (Some(v), _) => VlanMode::Access(v),
            (None, true) => VlanMode::Trunk(None),
            (None, false) => VlanMode::Trunk(Some(Box::new(VlanSet::new(self.trunk.iter().copied())))),
        }
    }

    /// Whether the process at the other end of `fd` (a connected unix socket) may be this
    /// port's frontend; the reason if not.
    pub fn peer_allowed(&self, fd: std::os::fd::RawFd) -> Result<(), String> {
        if self.allow_uids.is_empty() && self.allow_gids.is_empty() {
            return Ok(());
        }
        let c = crate::switch::sockets::peer(fd).map_err(|e| format!("cannot tell who it is: {e}"))?;
        if self.allow_uids.contains(&c.uid) || self.allow_gids.contains(&c.gid) {
            return Ok(());
        }
        Err(format!(
            "pid {} runs as uid {} gid {}, not one of allow_uids {:?} / allow_gids {:?}",
            c.pid, c.uid, c.gid, self.allow_uids, self.allow_gids
        ))
    }

    /// The configured MAC, or a locally administered one derived from the name.
    pub fn mac_bytes(&self) -> [u8; 6] {
        if let Some(m) = self.mac.as_deref().and_then(parse_mac) {
            return m;
        }
        let h = self
            .name
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let b = h.to_be_bytes();
        [0x52, 0x54, 0x00, b[0], b[1], b[2]]
    }
}

/// The whole switch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchConfig {
    /// CPUs for polling threads, one thread each; empty = one unpinned thread.
    #[serde(default)]
    pub pmd_cores: Vec<usize>,
    /// Never sleep (benchmarks); otherwise sleep on kicks when idle.
    #[serde(default)]
    pub busy_poll: bool,
    /// Batching under load: a guest sending full bursts is left one burst in its transmit
    /// ring for up to this many microseconds while the next one queues (0 = off). Spares
    /// DPDK guests a mempool-cache thrash; costs up to that much latency while engaged.
    #[serde(default)]
    pub batch_wait_us: u32,
    /// Seconds between checks whether moving source queues between polling threads would
    /// lower the busiest thread's load (default [`DEFAULT_REBALANCE_INTERVAL_SECS`]; 0 = only
    /// when asked, `ctl rebalance`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance_interval_secs: Option<u32>,
    /// The busiest polling thread's load (percent of the last seconds in bursts) below which
    /// the switch does not rebalance by itself (default [`DEFAULT_REBALANCE_LOAD_PCT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance_load_pct: Option<u32>,
    /// How much lower (percent) the busiest thread's load must get for queues to move by
    /// themselves (default [`DEFAULT_REBALANCE_IMPROVEMENT_PCT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance_improvement_pct: Option<u32>,
    /// Control socket path (created owner-only; only this user and root are served).
    #[serde(default)]
    pub control: Option<PathBuf>,
    /// Permission bits of the ports' socket files (default 0o660: the switch's user and
    /// group; connecting needs write permission). Set before the socket listens, whatever
    /// the umask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_mode: Option<u32>,
    /// Group (name or number) of the ports' socket files, e.g. the group QEMU runs as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    /// Seconds before an unseen MAC is forgotten.
    #[serde(default = "default_aging")]
    pub fdb_aging_secs: u32,
    /// Slots of the forwarding table (default [`DEFAULT_FDB_ENTRIES`]; rounded up to a power
    /// of two, four to a cache line). Size it for the MACs every port may learn together
    /// (their `max-macs`), with room: a full bucket evicts its oldest entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fdb_entries: Option<u32>,
    /// Memory regions whose file could lose pages (a memfd without F_SEAL_SHRINK, hugetlbfs,
    /// plain files): refused, or mapped under the SIGBUS guard.
    #[serde(default)]
    pub unsealed_memory: UnsealedMemory,
    /// Most guest memory one port may map (default [`DEFAULT_MAX_GUEST_MEM`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_guest_mem: Option<ByteSize>,
    /// Ports.
    #[serde(default, rename = "port")]
    pub ports: Vec<PortConfig>,
}

/// Forwarding-table slots unless configured (1 MiB of table).
pub const DEFAULT_FDB_ENTRIES: u32 = 65536;
/// The most forwarding-table slots taken (256 MiB of table).
pub const MAX_FDB_ENTRIES: u32 = 1 << 24;

/// Mode of port socket files unless configured: owner and group may connect, others not.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// What to do with a memory region whose file could lose pages under the switch (a truncated
/// file, a hole punched in hugetlbfs while its pool is empty): accessing such a page raises
/// SIGBUS, which would kill the whole switch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UnsealedMemory {
    /// Refuse the region; only memfds sealed with F_SEAL_SHRINK are mapped (QEMU's
    /// memory-backend-memfd seals by default).
    #[default]
    Refuse,
    /// Map it; a SIGBUS in it maps a zero page over the lost page and drops that port only
    /// (DPDK virtio-user, hugetlbfs, QEMU's memory-backend-file).
    Guard,
}

impl From<UnsealedMemory> for iommu::Unsealed {
    fn from(u: UnsealedMemory) -> Self {
        match u {
            UnsealedMemory::Refuse => iommu::Unsealed::Refuse,
            UnsealedMemory::Guard => iommu::Unsealed::Guard,
        }
    }
}

/// Guest memory one port may map unless configured otherwise: 1 TiB. Mappings take address
/// space whether or not the pages exist; with a 47-bit (128 TiB) user address space, 64
/// ports at this limit take half of it and leave the rest for the switch's own memory.
pub const DEFAULT_MAX_GUEST_MEM: u64 = 1 << 40;

/// Longest batching wait accepted (µs).
pub const MAX_BATCH_WAIT_US: u32 = 1000;

/// Seconds between automatic rebalancing checks (Open vSwitch's `pmd-auto-lb-rebal-interval`
/// is a minute too).
pub const DEFAULT_REBALANCE_INTERVAL_SECS: u32 = 60;
/// The busiest thread's load from which queues may move by themselves.
pub const DEFAULT_REBALANCE_LOAD_PCT: u32 = 70;
/// The improvement of the busiest thread's load worth moving queues for (OVS: 25 %).
pub const DEFAULT_REBALANCE_IMPROVEMENT_PCT: u32 = 25;

fn default_aging() -> u32 {
    300
}

impl SwitchConfig {
    /// Reads a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let cfg: SwitchConfig =
            toml::from_str(&text).map_err(|source| ConfigError::Toml { path: path.into(), source })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ports and their names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::HashSet::new();
        for p in &self.ports {
            p.validate()?;
            if !names.insert(&p.name) {
                return Err(ConfigError::Other(format!("two ports are named '{}'", p.name)));
            }
            p.check_pmds(self.pmd_cores.len().max(1))?;
        }
        if self.fdb_aging_secs == 0 {
            return Err(ConfigError::Other("fdb_aging_secs must be at least 1".into()));
        }
        if let Some(n) = self.fdb_entries.filter(|n| !(4..=MAX_FDB_ENTRIES).contains(n)) {
            return Err(ConfigError::Other(format!(
                "fdb_entries {n} is outside 4..={MAX_FDB_ENTRIES} (the forwarding table's slots)"
            )));
        }
        self.socket_access()?;
        if self.batch_wait_us > MAX_BATCH_WAIT_US {
            return Err(ConfigError::Other(format!(
                "batch_wait_us {} is above {MAX_BATCH_WAIT_US}: a longer wait only adds latency \
                 (10-20 µs is enough for a guest sending bursts back to back)",
                self.batch_wait_us
            )));
        }
        if self.max_guest_mem.is_some_and(|m| m.0 == 0) {
            return Err(ConfigError::Other("max_guest_mem must be above 0".into()));
        }
        for (name, v) in [
            ("rebalance_load_pct", self.rebalance_load_pct),
            ("rebalance_improvement_pct", self.rebalance_improvement_pct),
        ] {
            if v.is_some_and(|v| v > 100) {
                return Err(ConfigError::Other(format!("{name} is a percentage: 0 to 100")));
            }
        }
        Ok(())
    }

    /// Mode and group of the ports' socket files.
    pub fn socket_access(&self) -> Result<crate::switch::sockets::Access, ConfigError> {
        let mode = self.socket_mode.unwrap_or(DEFAULT_SOCKET_MODE);
        if mode & !0o777 != 0 {
            return Err(ConfigError::Other(format!("socket_mode {mode:#o} has bits beyond 0o777")));
        }
        let gid = match &self.socket_group {
            None => None,
            Some(g) => Some(crate::switch::sockets::gid_of(g).ok_or_else(|| {
                ConfigError::Other(format!("socket_group '{g}' is neither a group name nor a number"))
            })?),
        };
        Ok(crate::switch::sockets::Access { mode, gid })
    }

    /// When the switch moves queues between polling threads by itself.
    pub fn auto_rebalance(&self) -> crate::switch::AutoRebalance {
        crate::switch::AutoRebalance {
            interval_secs: self.rebalance_interval_secs.unwrap_or(DEFAULT_REBALANCE_INTERVAL_SECS),
            load_pct: self.rebalance_load_pct.unwrap_or(DEFAULT_REBALANCE_LOAD_PCT),
            improvement_pct: self.rebalance_improvement_pct.unwrap_or(DEFAULT_REBALANCE_IMPROVEMENT_PCT),
        }
    }

    /// Slots of the forwarding table.
    pub fn fdb_entries(&self) -> usize {
        self.fdb_entries.unwrap_or(DEFAULT_FDB_ENTRIES) as usize
    }

    /// The most guest memory one port may map, in bytes.
    pub fn max_guest_mem(&self) -> u64 {
        self.max_guest_mem.map_or(DEFAULT_MAX_GUEST_MEM, |m| m.0)
    }
}

#[cfg(test)]
mod tests;
