//! Switch and port configuration: from the command line (`--port NAME=PATH,..`) or TOML.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::l2::vlan::VlanSet;
use crate::l2::{parse_mac, VlanMode};
use crate::policy::spoof::SpoofConfig;
use crate::policy::{BitRate, ByteSize, PolicerConfig, PolicyConfig, ShaperConfig};

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

/// A NIC model on an uplink port (`nic:IFNAME[,level=0|1|2|3][,pools=N][,filters=N]`). Level 2
/// is Level 1 plus direct queue pairs: `ctl accel plug PORT` gives a guest's rings to the
/// device. Level 3 is an SR-IOV PF with `pools - 1` VFs (`vfs=N`), each given to a guest port
/// by `vswitch vf DEV attach N PORT` with the policy `vswitch vf DEV N ...` sets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// The tier: 0 (one queue to the host, offload engines), 1 (pools bound to guests'
    /// receive rings, a MAC/VLAN classifier to choose them), 2 (and direct queue pairs) or 3
    /// (SR-IOV VFs with policy and an embedded switch).
    #[serde(default = "level_one")]
    pub level: u8,
    /// Pools, the host's default pool included (the 82576 has 8, the 82599 64): at most
    /// `pools - 1` guests are served by the device, the rest by the software path.
    #[serde(default = "eight")]
    pub pools: u8,
    /// Exact-MAC filter entries (the 82576 has 24, the 82599 128): guests' MACs beyond them
    /// are served by the software path.
    #[serde(default = "twenty_four")]
    pub filters: u16,
    /// Large receive offload: TCP segments from the wire coalesced by the kernel's GRO rules
    /// before they reach the host or a guest (only with `offloads=off` on the wire: with
    /// offloads on, the kernel hands over frames it already coalesced).
    #[serde(default = "yes")]
    pub lro: bool,
    /// Interrupt moderation of the guests the device serves: `adaptive` (igb's three load
    /// classes, 14-250 us between interrupts), `off`, or a fixed interval in microseconds.
    /// Held interrupts are raised when the interval is up or the device goes idle.
    #[serde(default = "adaptive")]
    pub itr: String,
    /// Each guest pool's transmit rate (`100M`, `1G`): the device shapes what a guest sends to
    /// the wire. None: the wire's rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_rate: Option<BitRate>,
    /// An in-process wire instead of a TAP device (`nic:wire:NAME`): its other end is another
    /// switch's NIC model in this process (back to back) or a traffic generator. It carries
    /// plain frames, so the device segments (TSO) and checksums what it sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wire: Option<String>,
}

fn adaptive() -> String {
    "adaptive".into()
}

impl NicConfig {
    /// What the model is built with.
    pub fn params(&self) -> Result<crate::uplink::nic::NicParams, String> {
        let level = if self.level == 0 { nic_models::Level::L0 } else { nic_models::Level::L1 };
        let sizes = nic_models::TableSizes { pools: self.pools, rar: self.filters, vlvf: 32 };
        let pool_rate = self.pool_rate.map(|r| r.0);
        Ok(crate::uplink::nic::NicParams { level, sizes, lro: self.lro, itr: self.itr_profile()?, pool_rate })
    }

    /// The moderation profile `itr` names.
    pub fn itr_profile(&self) -> Result<nic_models::Profile, String> {
        match self.itr.as_str() {
            "adaptive" => Ok(nic_models::Profile::Adaptive),
            "off" | "0" => Ok(nic_models::Profile::Off),
            us => match us.parse::<u64>() {
                Ok(n) if n <= 10_000 => Ok(nic_models::Profile::Fixed(n * 1000)),
                _ => Err(format!("itr={us} is not adaptive, off or microseconds (at most 10000)")),
            },
        }
    }
}

impl Default for NicConfig {
    fn default() -> Self {
        NicConfig { level: 1, pools: 8, filters: 24, lro: true, itr: adaptive(), pool_rate: None, wire: None }
    }
}

fn level_one() -> u8 {
    1
}

fn eight() -> u8 {
    8
}

fn twenty_four() -> u16 {
    24
}

/// Default MAC limit of an uplink port (a quarter of the forwarding table).
pub const UPLINK_MAC_LIMIT: u32 = 16384;

impl PortConfig {
    /// Whether the port is an uplink (a TAP device or a NIC model's wire), not a guest's.
    pub fn is_uplink(&self) -> bool {
        self.tap.is_some() || self.afpacket.is_some() || self.nic.as_ref().is_some_and(|n| n.wire.is_some())
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
    #[error("bad --port '{spec}': {why} (expected NAME=SOCKET_PATH[,client], NAME=tap:IFNAME[,mtu=N], NAME=afpacket:IFNAME[,mtu=N] or NAME=nic:IFNAME|nic:wire:WIRE[,level=0|1|2|3][,pools=N|,vfs=N][,filters=N][,lro=on|off][,itr=adaptive|off|US][,pool-rate=RATE][,mtu=N][,vlan=N|,trunk=N:M:...][,queues=N][,mac=XX:XX:XX:XX:XX:XX][,police=RATE][,shape=RATE][,anti-spoof][,offloads=on|off][,max-macs=N][,allow-uid=U:U..][,allow-gid=G:G..][,nic-rate=RATE][,nic-weight=N][,accel=l1|l2|l3])")]
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
        let mut pc = PortConfig {
            name: name.to_string(),
            socket: socket.into(),
            tap,
            afpacket,
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
                Some(("mac", v)) => pc.mac = Some(v.to_string()),
                Some(("mtu", v)) => pc.mtu = Some(v.parse().map_err(|_| bad("mtu must be a number"))?),
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
                _ => return Err(bad(&format!("unknown option '{opt}'"))),
            }
        }
        pc.validate()?;
        Ok(pc)
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |why: String| ConfigError::Port { port: self.name.clone(), why };
        if self.name.is_empty() || self.name.len() > 64 || self.name.contains(char::is_whitespace) {
            return Err(err("name must be 1-64 characters without spaces".into()));
        }
        let wire = self.nic.as_ref().and_then(|n| n.wire.as_deref());
        if let Some(a) = &self.afpacket {
            if self.tap.is_some() || !self.socket.as_os_str().is_empty() || self.nic.is_some() {
                return Err(err("a port has one of a socket, a tap device, a NIC model or afpacket:".into()));
            }
            if !crate::uplink::tap::valid_name(a) {
                return Err(err(format!("device name '{a}' must be 1-15 bytes")));
            }
            if self.client {
                return Err(err("client mode is for sockets, not network devices".into()));
            }
        }
        match (&self.tap, self.socket.as_os_str().is_empty()) {
            (None, true) if self.afpacket.is_some() => {}
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
            if self.tap.is_none() && self.afpacket.is_none() {
                return Err(err("mtu= is for tap and afpacket devices (a guest sets its own)".into()));
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
        }
        if self.fdb_aging_secs == 0 {
            return Err(ConfigError::Other("fdb_aging_secs must be at least 1".into()));
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

    /// The most guest memory one port may map, in bytes.
    pub fn max_guest_mem(&self) -> u64 {
        self.max_guest_mem.map_or(DEFAULT_MAX_GUEST_MEM, |m| m.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_port_spec_forms() {
        let p = PortConfig::parse("vm1=/tmp/vm1.sock,client,vlan=10").unwrap();
        assert!(p.client);
        assert_eq!(p.vlan_mode(), VlanMode::Access(10));
        let t = PortConfig::parse("up=/tmp/u.sock,trunk=10:20:30,queues=2").unwrap();
        assert_eq!(t.trunk, vec![10, 20, 30]);
        assert_eq!(t.queues, 2);
        assert!(t.offloads, "offloads are on unless turned off");
        assert!(!PortConfig::parse("a=/tmp/a.sock,offloads=off").unwrap().offloads);
        assert!(PortConfig::parse("a=/tmp/a.sock,offloads=maybe").is_err());
        assert_eq!(PortConfig::parse("a=/s").unwrap().vlan_mode(), VlanMode::Trunk(None));
    }

    #[test]
    fn test_port_spec_errors_say_what() {
        let e = PortConfig::parse("vm1").unwrap_err().to_string();
        assert!(e.contains("missing '='"), "{e}");
        let e = PortConfig::parse("vm1=/s,vlan=5000").unwrap_err().to_string();
        assert!(e.contains("outside 1..4094"), "{e}");
        let e = PortConfig::parse("vm1=/s,vlan=5,trunk=6").unwrap_err().to_string();
        assert!(e.contains("not both"), "{e}");
        let e = PortConfig::parse("vm1=/s,bogus").unwrap_err().to_string();
        assert!(e.contains("unknown option 'bogus'"), "{e}");
        let e = PortConfig::parse("vm1=/s,police=10 furlongs").unwrap_err().to_string();
        assert!(e.contains("unknown rate unit"), "{e}");
        let e = PortConfig::parse("vm1=/s,shape=0").unwrap_err().to_string();
        assert!(e.contains("above 0"), "{e}");
    }

    #[test]
    fn test_port_spec_policy_options() {
        let p = PortConfig::parse("vm1=/s,police=100M,shape=50Mbit,anti-spoof").unwrap();
        assert_eq!(p.ingress.unwrap().rate, BitRate(100_000_000));
        assert_eq!(p.egress.unwrap().rate, BitRate(50_000_000));
        assert_eq!(p.anti_spoof, Some(SpoofConfig::default()));
    }

    #[test]
    fn test_toml_port_policy() {
        let cfg: SwitchConfig = toml::from_str(
            r#"
            [[port]]
            name = "a"
            socket = "/tmp/a.sock"
            ingress = { rate = "100Mbit", excess_burst = "32KiB" }
            egress = { rate = "1G", burst = "1MiB", queue = 512 }
            anti_spoof = { macs = ["52:54:00:00:00:0a"], ips = ["10.0.0.10", "fd00::a"] }
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        let p = cfg.ports[0].policy();
        assert_eq!(p.egress.unwrap().queue, Some(512));
        let bad: SwitchConfig = toml::from_str(
            "[[port]]\nname = \"a\"\nsocket = \"/s\"\nanti_spoof = { ips = [\"10.0.0.999\"] }\n",
        )
        .unwrap();
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("port 'a'") && e.contains("10.0.0.999"), "{e}");
    }

    #[test]
    fn test_toml_config() {
        let cfg: SwitchConfig = toml::from_str(
            r#"
            pmd_cores = [0]
            [[port]]
            name = "a"
            socket = "/tmp/a.sock"
            vlan = 10
            [[port]]
            name = "b"
            socket = "/tmp/b.sock"
            client = true
            "#,
        )
        .unwrap();
        assert_eq!(cfg.ports.len(), 2);
        assert_eq!(cfg.fdb_aging_secs, 300);
        assert_eq!(cfg.batch_wait_us, 0, "batching is off unless asked for");
        cfg.validate().unwrap();
        let batched: SwitchConfig = toml::from_str("batch_wait_us = 10").unwrap();
        assert_eq!(batched.batch_wait_us, 10);
        assert_eq!(batched.unsealed_memory, UnsealedMemory::Refuse, "unsealed memory is refused by default");
        assert_eq!(batched.max_guest_mem(), DEFAULT_MAX_GUEST_MEM);
        let guarded: SwitchConfig =
            toml::from_str("unsealed_memory = \"guard\"\nmax_guest_mem = \"64GiB\"").unwrap();
        assert_eq!(guarded.unsealed_memory, UnsealedMemory::Guard);
        assert_eq!(guarded.max_guest_mem(), 64 << 30);
        assert!(toml::from_str::<SwitchConfig>("unsealed_memory = \"maybe\"").is_err());
        batched.validate().unwrap();
        let e = SwitchConfig { batch_wait_us: 5000, ..batched }.validate().unwrap_err().to_string();
        assert!(e.contains("batch_wait_us 5000 is above 1000"), "{e}");
    }

    #[test]
    fn test_derived_mac_is_local_unicast_and_stable() {
        let p = PortConfig::parse("vm1=/s").unwrap();
        assert_eq!(p.mac_bytes(), p.mac_bytes());
        assert_eq!(p.mac_bytes()[0] & 1, 0);
    }

    #[test]
    fn test_nic_port_spec_and_its_errors() {
        let p = PortConfig::parse("up=nic:tap0,level=1,pools=4,filters=128,trunk=10:20").unwrap();
        assert_eq!(p.tap.as_deref(), Some("tap0"));
        assert_eq!(p.nic, Some(NicConfig { level: 1, pools: 4, filters: 128, ..NicConfig::default() }));
        assert_eq!(
            PortConfig::parse("up=nic:t0,itr=50").unwrap().nic.unwrap().itr_profile(),
            Ok(nic_models::Profile::Fixed(50_000))
        );
        assert!(!PortConfig::parse("up=nic:tap0,lro=off").unwrap().nic.unwrap().lro);
        assert_eq!(PortConfig::parse("up=nic:tap0").unwrap().nic, Some(NicConfig::default()));
        let err = |s: &str| PortConfig::parse(s).unwrap_err().to_string();
        assert!(err("up=nic:tap0,itr=fast").contains("not adaptive, off or microseconds"));
        assert!(err("up=tap:tap0,level=1").contains("level= is for nic: ports"));
        assert!(err("up=nic:tap0,level=4").contains("not a tier"));
        assert_eq!(PortConfig::parse("up=nic:tap0,level=3,vfs=4").unwrap().nic.unwrap().pools, 5);
        assert!(err("up=nic:tap0,level=3,vlan=5").contains("leave vlan= off"));
        assert_eq!(PortConfig::parse("up=nic:tap0,level=2").unwrap().nic.unwrap().level, 2);
        assert!(err("up=nic:tap0,pools=1").contains("outside 2..64"));
        assert!(err("up=nic:tap0,filters=0").contains("outside 1..4096"));
        let g = PortConfig::parse("vm=/s,nic-rate=10M,nic-weight=3").unwrap();
        assert_eq!((g.nic_rate.map(|r| r.0), g.nic_weight), (Some(10_000_000), Some(3)));
        assert_eq!(PortConfig::parse("g=/tmp/g.sock,accel=l2").unwrap().accel.as_deref(), Some("l2"));
        assert!(err("g=/tmp/g.sock,accel=l9").contains("none of l1, l2, l3"));
        assert_eq!(PortConfig::parse("g=/tmp/g.sock,accel=l1").unwrap().accel.as_deref(), Some("l1"));
        assert!(err("up=nic:wire:w,accel=l2").contains("for guest ports"));
        assert!(err("vm=/s,nic-weight=0").contains("outside 1..100"));
        assert!(err("up=nic:tap0,nic-rate=1M").contains("a guest port's"));
        let w = PortConfig::parse("up=nic:wire:w-1,level=0").unwrap();
        assert!(w.tap.is_none() && w.is_uplink() && w.socket.as_os_str().is_empty());
        assert_eq!(w.nic, Some(NicConfig { level: 0, wire: Some("w-1".into()), ..NicConfig::default() }));
        assert!(err("up=nic:wire:a b").contains("wire name 'a b'"));
        assert!(err("up=nic:wire:w,queues=2").contains("one queue pair"));
        assert!(err("up=nic:wire:w,mtu=9000").contains("mtu= is for tap and afpacket devices"));
        let t: SwitchConfig =
            toml::from_str("[[port]]\nname = \"up\"\nnic = { wire = \"w\", level = 1 }\n").unwrap();
        assert!(t.ports[0].is_uplink());
        t.ports[0].validate().unwrap();
        let t: SwitchConfig =
            toml::from_str("[[port]]\nname = \"up\"\ntap = \"t\"\nnic = { wire = \"w\" }\n").unwrap();
        assert!(t.ports[0].validate().unwrap_err().to_string().contains("not both"));
        let t: SwitchConfig =
            toml::from_str("[[port]]\nname = \"up\"\ntap = \"t1\"\nnic = { level = 0 }\n").unwrap();
        assert_eq!(t.ports[0].nic, Some(NicConfig { level: 0, ..NicConfig::default() }));
        let t: SwitchConfig = toml::from_str("[[port]]\nname = \"up\"\nsocket = \"/x\"\nnic = {}\n").unwrap();
        assert!(t.ports[0].validate().unwrap_err().to_string().contains("needs a wire"));
    }

    #[test]
    fn test_tap_port_spec_and_its_errors() {
        let p = PortConfig::parse("up=tap:tap0,queues=2,mtu=9000,vlan=5").unwrap();
        assert_eq!((p.tap.as_deref(), p.queues, p.mtu, p.vlan), (Some("tap0"), 2, Some(9000), Some(5)));
        assert!(p.socket.as_os_str().is_empty());
        // An uplink has a network segment behind it: it may learn more MACs than a guest.
        assert_eq!(p.mac_limit(), UPLINK_MAC_LIMIT);
        assert_eq!(PortConfig::parse("up=tap:tap0,max-macs=50").unwrap().mac_limit(), 50);
        assert_eq!(
            PortConfig::parse("g=/run/g.sock").unwrap().mac_limit(),
            crate::l2::fdb::DEFAULT_MAC_LIMIT
        );
        let err = |s: &str| PortConfig::parse(s).unwrap_err().to_string();
        assert!(err("up=tap:tap0,client").contains("client mode is for sockets"));
        assert!(err("up=tap:waytoolongname0123").contains("1-15 bytes"));
        assert!(err("up=tap:tap0,mtu=20000").contains("outside 68.."));
        assert!(err("g=/run/x.sock,mtu=9000").contains("mtu= is for tap and afpacket devices"));
        let a = PortConfig::parse("up=afpacket:eth1,queues=4,mtu=9000,trunk=10:20").unwrap();
        assert_eq!(
            (a.afpacket.as_deref(), a.queues, a.mtu, a.tap.as_deref()),
            (Some("eth1"), 4, Some(9000), None)
        );
        assert!(a.is_uplink() && a.socket.as_os_str().is_empty());
        assert!(err("up=afpacket:eth1,client").contains("client mode is for sockets"));
        assert!(err("up=afpacket:waytoolongname0123").contains("1-15 bytes"));
        assert!(err("up=afpacket:eth1,level=1").contains("level= is for nic: ports"));
        let t: SwitchConfig = toml::from_str("[[port]]\nname = \"up\"\ntap = \"tap1\"\n").unwrap();
        t.validate().unwrap();
        assert_eq!(t.ports[0].tap.as_deref(), Some("tap1"));
        let t: SwitchConfig = toml::from_str("[[port]]\nname = \"up\"\n").unwrap();
        assert!(t.validate().unwrap_err().to_string().contains("needs a socket path"));
    }
}
