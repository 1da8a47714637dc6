//! The control socket: one JSON request per connection, one JSON reply.
//!
//! ```text
//! → {"cmd":"ports"}                     ← {"ok":true,"result":[PortInfo,..]}
//! → {"cmd":"stats"}                     ← {"ok":true,"result":Stats}
//! → {"cmd":"fdb"} / {"cmd":"fdb-flush"}
//! → {"cmd":"port-add","port":{"name":..,"socket":..}}   → {"cmd":"port-del","name":..}
//! → {"cmd":"policy","name":..}          ← {"ok":true,"result":PolicyReport}
//! → {"cmd":"policy-set","name":..,"policy":{"ingress":..,"egress":..,"anti_spoof":..}}
//! ← {"ok":false,"error":"what went wrong and what to do"}
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::PortConfig;
use crate::policy::{PolicyConfig, PolicyCounters};
use crate::vhost::DeviceInfo;
use crate::virtio::queue::QueueCounters;

/// A request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// List ports.
    Ports,
    /// Counters.
    Stats,
    /// Dump the forwarding table.
    Fdb,
    /// Empty the forwarding table.
    FdbFlush,
    /// Assign source queues to polling threads again by their measured load.
    Rebalance,
    /// Poll a port's queue pair on one polling thread, out of rebalancing's reach (`pmd`
    /// None: back in its reach).
    QueuePin {
        /// Port name.
        name: String,
        /// Queue pair.
        queue_pair: u16,
        /// Polling thread index.
        pmd: Option<usize>,
    },
    /// Add a port.
    PortAdd {
        /// Its configuration.
        port: Box<PortConfig>,
    },
    /// Remove a port.
    PortDel {
        /// Its name.
        name: String,
    },
    /// A port's policy and its counters.
    Policy {
        /// Port name.
        name: String,
    },
    /// Replace a port's policy (parts left out are turned off); the guest stays connected.
    PolicySet {
        /// Port name.
        name: String,
        /// The new policy.
        policy: PolicyConfig,
    },
    /// A NIC model's filters, pools and device counters.
    Nic {
        /// Port name.
        name: String,
    },
    /// Give a guest port's queue pair to a NIC tier (the accelerator contract's plug).
    AccelPlug {
        /// Port name.
        name: String,
        /// The tier (`l2`).
        tier: String,
    },
    /// Take it back (quiesce, drain, hand back).
    AccelUnplug {
        /// Port name.
        name: String,
    },
    /// Which guest ports are plugged, since when, and what the device did.
    AccelStatus {
        /// One port, or all guest ports.
        name: Option<String>,
    },
    /// A Level 3 NIC's VF policy: the words after `ip link set DEV vf` (`N mac .. vlan ..`).
    Vf {
        /// The NIC port.
        dev: String,
        /// iproute2's words.
        args: Vec<String>,
    },
    /// Its VFs, as `ip link show` reads them.
    VfShow {
        /// The NIC port.
        dev: String,
    },
    /// Give VF `vf` to guest port `port` (plugged through the accelerator contract).
    VfAttach {
        /// The NIC port.
        dev: String,
        /// The VF.
        vf: u32,
        /// The guest port.
        port: String,
    },
    /// Take it back (unplug, end the assignment).
    VfDetach {
        /// The NIC port.
        dev: String,
        /// The VF.
        vf: u32,
    },
}

/// `vswitch vf DEV show` on a Level 3 NIC model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfReport {
    /// The NIC port.
    pub dev: String,
    /// Its VFs (`IFLA_NUM_VF`).
    pub num_vfs: u16,
    /// The PF's link speed, Mbit/s.
    pub link_mbps: u32,
    /// Each VF's policy and statistics, as a real PF reports them.
    pub vfs: Vec<vfpolicy::VfInfo>,
    /// The guest port each VF is given to.
    pub ports: Vec<Option<String>>,
    /// Whether that port's queue pair is plugged into it now.
    pub plugged: Vec<bool>,
    /// Unicast frames the embedded switch carried from one VF to another.
    pub veb_frames: u64,
    /// What the user should know (an address the guest will not use, a port not running).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// The last hand-over of a port's queue pair between the device and the software path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverReport {
    /// The tier the port left ("l1": no ring was handed over, the ring fields are 0).
    pub tier: String,
    /// How long the plug took (the swap under the pair's locks), µs.
    pub plug_us: u64,
    /// How long quiesce, drain and hand back took, µs.
    pub unplug_us: u64,
    /// In-flight transmits the drain completed.
    pub drained: u64,
    /// Receive chains the device took from the available ring while plugged.
    pub rx_taken: u16,
    /// Receive used entries it wrote.
    pub rx_completed: u16,
    /// Transmit chains it took.
    pub tx_taken: u16,
    /// Transmit used entries it wrote.
    pub tx_completed: u16,
    /// Every descriptor taken was completed exactly once.
    pub balanced: bool,
    /// Where the software path resumed: (last avail, used index) of the receive ring.
    pub rx_state: (u16, u16),
    /// The same for the transmit ring.
    pub tx_state: (u16, u16),
}

/// `ctl accel status`: one guest port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelReport {
    /// Port name.
    pub port: String,
    /// The tier it is plugged into, if it is.
    pub tier: Option<String>,
    /// The NIC port's id and name.
    pub nic: Option<u16>,
    /// See `nic`.
    pub nic_name: Option<String>,
    /// Plugged for, ms.
    pub plugged_ms: Option<u64>,
    /// Plugs, unplugs and refused plugs so far.
    pub plugs: u64,
    /// See `plugs`.
    pub unplugs: u64,
    /// See `plugs`.
    pub refusals: u64,
    /// Why the last plug was refused.
    pub last_refusal: Option<String>,
    /// Frames the device sent for the guest (to the wire or the software path), all plugs.
    pub tx_frames: u64,
    /// Frames the device's source check refused.
    pub spoofed: u64,
    /// Times the device's rate left the guest's next frame posted.
    pub shaped: u64,
    /// Transmit chains the device refused as malformed or outside the guest.
    pub tx_faults: u64,
    /// Frames the device wrote into the guest's buffers, all plugs.
    pub rx_frames: u64,
    /// Receive buffers the IOMMU domain refused (this plug).
    pub rx_faults: u64,
    /// In-flight transmits drains completed, all unplugs.
    pub drained: u64,
    /// The device's transmit time for this guest (this plug), ns.
    pub device_ns: u64,
    /// The last hand-over.
    pub last: Option<HandoverReport>,
}

/// A port's policy as `policy` reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyReport {
    /// Port name.
    pub name: String,
    /// Settings in force.
    pub policy: PolicyConfig,
    /// Drops and holds by reason.
    pub counters: PolicyCounters,
    /// Packets the shaper holds back now.
    pub shaper_queued: u64,
    /// Their bytes.
    pub shaper_queued_bytes: u64,
}

/// `ctl nic NAME`: a NIC model's state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NicReport {
    /// Port name.
    pub name: String,
    /// The tier (0 or 1).
    pub level: u8,
    /// Pools, the host's included.
    pub pools: u8,
    /// Exact-MAC filter entries.
    pub filters: u16,
    /// Entries in use.
    pub filters_used: u16,
    /// Guest ports with a pool.
    pub bound: Vec<NicBinding>,
    /// Guest ports the device does not serve, and why.
    pub unserved: Vec<(String, String)>,
    /// Frames from the wire.
    pub wire_frames: u64,
    /// Frames the device steered into guests' rings.
    pub to_pools: u64,
    /// Frames given to the software path (the default pool).
    pub to_default: u64,
    /// Steered frames the guest could not take as they were, handed to the software path.
    pub fallbacks: u64,
    /// Frames the filters dropped.
    pub filtered: u64,
    /// MACs that found no free filter entry.
    pub mac_overflow: u64,
    /// Packets the DMA engine wrote into guests' buffers or read from them to transmit.
    pub dma_packets: u64,
    /// Bytes it wrote (headers and used entries included).
    pub dma_write_bytes: u64,
    /// Bytes it read (descriptors, and frames to transmit).
    pub dma_read_bytes: u64,
    /// Descriptors fetched.
    pub desc_fetches: u64,
    /// Descriptors written back.
    pub desc_writebacks: u64,
    /// PCIe transactions those took.
    pub tlps: u64,
    /// Buffers the IOMMU domain refused.
    pub dma_faults: u64,
    /// CPU copies the device made (always 0: it is the DMA engine's work).
    pub cpu_copies: u64,
    /// Time in the device's work (steering, LRO, checksums and DMA, both directions), ns.
    pub device_ns: u64,
    /// The same in time-stamp-counter ticks (the unit of `ctl stats`' busy ticks).
    #[serde(default)]
    pub device_ticks: u64,
    /// TCP segments the LRO engine merged into a frame before them.
    pub lro_merged: u64,
    /// Frames it gave on with more than one segment.
    pub lro_coalesced: u64,
    /// Frames whose checksums the device verified for a guest (`DATA_VALID`).
    pub csum_verified: u64,
    /// Interrupt moderation in force (`adaptive`, `off` or microseconds).
    pub itr: String,
    /// Interrupts the device raised to guests (each still subject to the guest's own
    /// suppression).
    pub irqs_raised: u64,
    /// Completions whose interrupt moderation folded into a later one.
    pub irqs_folded: u64,
    /// Frames the device's TX queues put on the wire.
    pub tx_sent: u64,
    /// Frames dropped because their pool's TX queue was full.
    pub tx_dropped: u64,
    /// Times a pool's head frame waited for its shaper.
    pub tx_shaped: u64,
    /// Frames in the TX queues now.
    pub tx_queued: u64,
    /// Large TCP frames the device's TSO engine cut for a wire of plain frames (an in-process
    /// wire; a TAP takes them whole).
    pub tso_frames: u64,
    /// The segments it made of them.
    pub tso_segments: u64,
    /// Partial checksums the device completed on transmit.
    pub csum_inserted: u64,
    /// Address translations the DMA engine asked of the guests' IOMMU domains.
    pub iotlb_lookups: u64,
    /// Of those, vIOMMU misses (the frame took the software path, which parks it).
    #[serde(default)]
    pub iotlb_misses: u64,
    /// What the wire is: `tap:IFNAME` or `wire:NAME`.
    pub wire: String,
}

/// One guest port served by a pool.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NicBinding {
    /// The pool.
    pub pool: u8,
    /// The guest port.
    pub port: String,
    /// Its MACs in the filters.
    pub macs: Vec<String>,
    /// The VLAN tag the device strips, if any.
    pub strip_vlan: Option<u16>,
    /// The rate its pool's transmit queue is shaped to, bits/s (None: the wire's).
    #[serde(default)]
    pub tx_rate: Option<u64>,
    /// Its pool's weight in the device's DRR onto the wire.
    #[serde(default)]
    pub tx_weight: u32,
}

/// A reply.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The reason when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A port as listed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PortInfo {
    /// Id.
    pub id: u16,
    /// Name.
    pub name: String,
    /// Socket path.
    pub socket: String,
    /// "server" or "client".
    pub mode: String,
    /// VLAN rule, human readable.
    pub vlan: String,
    /// MAC offered.
    pub mac: String,
    /// Queue pairs.
    pub queue_pairs: u16,
    /// Whether a frontend is connected.
    pub connected: bool,
    /// Connections so far.
    pub connects: u64,
    /// MAC learning of this port.
    #[serde(default)]
    pub macs: MacUsage,
    /// Negotiated state.
    pub device: DeviceInfo,
}

/// A port's share of the forwarding table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacUsage {
    /// Entries it owns (recounted every second).
    pub learned: u32,
    /// Most it may own (`max_macs`).
    pub limit: u32,
    /// Source MACs not learned because it was at its limit.
    pub refused: u64,
}

/// Counters of one queue.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueueReport {
    /// Virtqueue index (2k: guest RX of pair k, 2k+1: guest TX).
    pub queue: usize,
    /// Counters.
    #[serde(flatten)]
    pub counters: QueueCounters,
}

/// Counters of one port: `rx` = from the guest (its TX queues), `tx` = to the guest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PortStats {
    /// Name.
    pub name: String,
    /// Id.
    pub id: u16,
    /// Received from the guest.
    pub rx: QueueCounters,
    /// Delivered to the guest.
    pub tx: QueueCounters,
    /// Per queue.
    pub queues: Vec<QueueReport>,
    /// Policy drops and holds by reason.
    #[serde(default)]
    pub policy: PolicyCounters,
}

/// Counters of one polling thread.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PmdReport {
    /// Index.
    pub pmd: usize,
    /// Pinned CPU.
    pub core: Option<usize>,
    /// Packets taken from guests.
    pub packets: u64,
    /// TSC ticks in bursts that moved packets.
    pub busy_ticks: u64,
    /// TSC ticks in empty polls.
    pub idle_ticks: u64,
    /// busy_ticks / packets.
    pub ticks_per_packet: f64,
    /// Mean packets per loop iteration that moved any.
    pub mean_burst: f64,
    /// Times it slept (adaptive mode).
    pub sleeps: u64,
    /// Batching under load (`batch_wait_us`): waits for a second burst started.
    #[serde(default)]
    pub batch_holds: u64,
    /// Of those, waits that ran out.
    #[serde(default)]
    pub batch_expired: u64,
    /// Times it stopped turning its loop (awake) for over a second, as the watchdog saw.
    #[serde(default)]
    pub stalls: u64,
    /// Writes to a guest's eventfd the watchdog had to interrupt (they blocked).
    #[serde(default)]
    pub fd_interrupts: u64,
    /// The source queues it polls, with their measured load.
    #[serde(default)]
    pub queues: Vec<PmdQueueReport>,
    /// Their summed load: percent of the last seconds spent on their bursts.
    #[serde(default)]
    pub load_pct: f64,
}

/// A source queue a polling thread polls.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PmdQueueReport {
    /// Port name.
    pub port: String,
    /// Queue pair (its transmit queue is the source).
    pub queue_pair: u16,
    /// Percent of the last seconds' wall clock its thread spent on its bursts.
    pub load_pct: f64,
    /// Kept on this thread by `queue-pin`.
    #[serde(default)]
    pub pinned: bool,
}

/// A queue a rebalance moved.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueueMove {
    /// Port name.
    pub port: String,
    /// Queue pair.
    pub queue_pair: u16,
    /// Thread it left.
    pub from: usize,
    /// Thread that polls it now.
    pub to: usize,
    /// Its load.
    pub load_pct: f64,
}

/// What `rebalance` did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RebalanceReport {
    /// Whether any queue moved.
    pub applied: bool,
    /// Why not, or what went wrong.
    pub why: String,
    /// Each thread's load before, in percent.
    pub before_pct: Vec<f64>,
    /// And after (as the same window's loads place them).
    pub after_pct: Vec<f64>,
    /// How much lower the busiest thread's load got, in percent.
    pub improvement_pct: f64,
    /// The queues that moved.
    pub moves: Vec<QueueMove>,
}

/// Everything `stats` returns.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    /// Per port.
    pub ports: Vec<PortStats>,
    /// Per polling thread.
    pub pmds: Vec<PmdReport>,
}

/// Why a control request failed on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// cannot connect
    #[error("cannot reach the switch at {path}: {source} (is `vswitch run --control {path}` running?)")]
    Connect {
        /// Socket.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// I/O
    #[error("control socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// bad reply
    #[error("the switch sent a reply this client does not understand: {0}")]
    Decode(#[from] serde_json::Error),
    /// the switch said no
    #[error("{0}")]
    Refused(String),
}

/// Sends one request and returns the result value.
pub fn request(path: &Path, req: &Request) -> Result<serde_json::Value, ClientError> {
    let mut s = UnixStream::connect(path)
        .map_err(|source| ClientError::Connect { path: path.display().to_string(), source })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    let r: Reply = serde_json::from_str(&reply)?;
    if r.ok {
        Ok(r.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ClientError::Refused(r.error.unwrap_or_else(|| "request failed".into())))
    }
}
