//! One burst from one source queue, in stages, one file each:
//!
//! ```text
//! receive ──▶ describe ──▶ decide ──▶ deliver ──▶ (fill | render) ──▶ complete
//! heads       chains,      policy,    per         the one copy,         sources back,
//! taken       snapshot     learn, FDB destination into each sink        publish, signal
//! ```
//!
//! The cold vIOMMU parking path is in `viommu`, the shaper's release in `shaped`.
//! Nothing here allocates, takes a lock other than the destination queue's slot (once per
//! destination per burst), or makes a syscall other than an interrupt a guest asked for.

mod accel;
mod complete;
mod decide;
mod deliver;
mod describe;
mod fill;
mod nic;
mod receive;
mod render;
mod rxbufs;
mod send;
mod shaped;
mod viommu;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use iommu::{Grant, Ro, Rw};

use crate::counters::DropReason;
use crate::l2::{Fdb, Mac, TagEdit};
use crate::offload::gso::{self, Segmenter};
use crate::offload::NetHdr;
use crate::policy::spoof;
use crate::port::{Port, Queue, QueueSlot};
use crate::virtio::queue::bump;
use crate::virtio::MAX_SEGS;
use crate::virtio::{QueueStats, VirtQueue};

pub use crate::limits::{BURST, MAX_FRAME};

use complete::complete;
pub use nic::tx_wait_ns;

/// Most receive buffers (chains) one packet may fill with MRG_RXBUF: a 64 KiB TSO frame in
/// Linux's smallest mergeable buffers (1536 bytes) takes 43.
const MAX_RX_CHAINS: usize = 64;
/// Most receive segments one packet may fill.
const RX_SEGS: usize = 2 * MAX_SEGS;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Action {
    /// Dropped (already counted).
    #[default]
    Drop,
    /// To one port.
    Unicast(u16),
    /// To every other member of the VLAN.
    Flood,
}

/// What the describe and decide stages know of a packet: where its bytes are (in the sender's
/// memory, not copied) and where it goes.
#[derive(Clone, Copy, Debug, Default)]
struct PacketRef {
    head: u16,
    /// Whether the head is a real descriptor index that must go back to the used ring.
    give_back: bool,
    nseg: u8,
    /// Frame length (after the virtio-net header).
    len: u32,
    dst: Mac,
    src: Mac,
    tci: Option<u16>,
    vlan: u16,
    action: Action,
    /// Destination ports that took the packet on (delivered it or counted its drop).
    targets: u16,
    /// Bytes of the frame's snapshot in `Datapath::heads` (what decisions were made on, and
    /// what is delivered for those bytes).
    head_len: u8,
    /// The sender asked for an offload (its request is in `Datapath::vhdrs`).
    offload: bool,
}

/// The per-thread forwarding state and burst scratch space (no allocation per burst).
pub struct Datapath {
    /// Polling-thread index (picks which receive queue of a multi-queue port it fills).
    pub idx: usize,
    /// Live ports by id.
    pub ports: Vec<Option<Arc<Port>>>,
    /// Ids of live ports, for flooding.
    pub port_ids: Vec<u16>,
    /// The shared forwarding table.
    pub fdb: Arc<Fdb>,
    /// The burst's packets as receive and describe leave them (decide fills in their fate).
    desc: Described,
    /// Delivery's choice of receive queue on a multi-queue destination.
    spread: Spread,
    /// The copy pass's plans for the destination being filled.
    copy: Plans,
    /// The frame being cut into segments for one receiver.
    seg: Option<Segmenter>,
    /// Batching under load (see `batch_hold`).
    pub batch: Batching,
    /// The port whose burst is being forwarded (a NIC's transmit side queues by sender).
    cur_src: u16,
    /// A burst's frames on their way to a packet socket that sends them in one call.
    tx_outs: Box<[send::Out]>,
    /// By destination port: the packets of the burst being delivered that it is named by
    /// (set by `deliver` and emptied as each destination is served).
    dest_sets: Box<[deliver::PktSet; crate::port::MAX_PORTS]>,
}

/// What the receive and describe stages know of each packet of a burst, by packet index. Kept
/// as arrays of one kind each (the decide and deliver loops scan only the `PacketRef`s, 32 of
/// them in a few cache lines), typed as this stage's output.
struct Described {
    pkts: [PacketRef; BURST],
    /// Each packet's chain in the sender's memory (read grants).
    segs: [[Grant<Ro>; MAX_SEGS]; BURST],
    /// Each packet's first bytes, read once from the sender's memory: decisions and policy
    /// checks use them and the copy delivers them (no double fetch of what was checked).
    heads: Box<[[u8; HEAD]; BURST]>,
    /// Offload requests of the packets whose `offload` is set, checked when received.
    vhdrs: [NetHdr; BURST],
}

/// Delivery's scratch for a multi-queue destination.
struct Spread {
    /// Flow hashes of the burst's packets (those whose bit is set in `hashed`).
    hashes: [u32; BURST],
    hashed: u32,
    /// The receive queue each packet goes to, for the multi-queue port being delivered to.
    qsel: [u8; BURST],
}

/// The copy pass's scratch: per planned unit, where it goes.
struct Plans {
    plans: [Plan; BURST],
    /// The receive buffers of plans that need more than one.
    rx: Box<[RxBufs; BURST]>,
}

/// Batching under load: a transmit queue whose guest sends full bursts is taken from only
/// when two bursts are queued, or after waiting `wait`, so one burst stays in the guest's
/// ring. See `batch_hold`.
#[derive(Debug, Default)]
pub struct Batching {
    /// Longest wait, in `ticks()` (0 = off).
    pub wait: u64,
    /// Times a queue started waiting for a second burst.
    pub holds: u64,
    /// Waits that ran out (the guest slowed down; a wait that often runs out is too short
    /// or not worth having).
    pub expired: u64,
}

/// Largest snapshot of a frame's first bytes: anti-spoofing's longest look (at neighbour
/// discovery options), and the whole L2-L4 header of a frame to segment.
const HEAD: usize = 160;
const _: () = assert!(HEAD >= spoof::MAX_LOOK && HEAD >= gso::MAX_HDR && HEAD <= u8::MAX as usize);
/// Snapshot of a frame's L2 header: MACs and one VLAN tag.
const L2_HEAD: usize = 18;

/// A packet's reserved place in one destination: which packet, its tag edit, and how many
/// buffers (`rx` at the same index holds them).
#[derive(Clone, Copy, Default)]
struct Plan {
    pkt: u8,
    edit: TagEdit,
    /// 0: the whole packet; k: its segment k - 1.
    seg: u16,
    nseg: u8,
    nch: u8,
    /// Not a delivery: `nch` bad or abandoned buffers to return empty.
    empty: bool,
    /// The usual case, one buffer: its head and where it is (else `rx` holds them all).
    head: u16,
    one: Grant<Rw>,
}

/// Receive buffers reserved for one packet.
struct RxBufs {
    segs: [Grant<Rw>; RX_SEGS],
    chains: [(u16, u32); MAX_RX_CHAINS],
}

impl Default for RxBufs {
    fn default() -> Self {
        RxBufs { segs: [Grant::default(); RX_SEGS], chains: [(0, 0); MAX_RX_CHAINS] }
    }
}

// SAFETY: the raw pointers in the scratch arrays are only meaningful during one burst, under
// the locks of the queues they point into; between bursts they are dead values.
unsafe impl Send for Datapath {}

#[derive(Default)]
struct SrcCounts {
    packets: u64,
    bytes: u64,
    malformed: u64,
    filtered: u64,
    no_route: u64,
    policy: u64,
    /// Frames an uplink's kernel copied into the switch's staging buffers.
    kernel_copies: u64,
}

enum RxFail {
    NoBuffer,
    /// A bad buffer: it and the chains taken before it (`.0` of them in all, listed in the
    /// chains array) go back empty, in ring order.
    Malformed(usize),
    /// A buffer whose IOVA the IOTLB cannot translate yet: everything taken went back.
    Miss(u64),
}

impl Datapath {
    /// An empty datapath for thread `idx`.
    pub fn new(idx: usize, fdb: Arc<Fdb>) -> Self {
        Datapath {
            idx,
            ports: Vec::new(),
            port_ids: Vec::new(),
            fdb,
            desc: Described {
                pkts: [PacketRef::default(); BURST],
                segs: [[Grant::default(); MAX_SEGS]; BURST],
                heads: Box::new([[0u8; HEAD]; BURST]),
                vhdrs: [NetHdr::default(); BURST],
            },
            spread: Spread { hashes: [0; BURST], hashed: 0, qsel: [0; BURST] },
            copy: Plans {
                plans: [Plan::default(); BURST],
                rx: Box::new(std::array::from_fn(|_| RxBufs::default())),
            },
            seg: None,
            batch: Batching::default(),
            cur_src: 0,
            tx_outs: (0..BURST).map(|_| send::Out::new()).collect(),
            dest_sets: Box::new([0; crate::port::MAX_PORTS]),
        }
    }

    /// Adds or replaces a port in this thread's table.
    pub fn add_port(&mut self, port: Arc<Port>) {
        let id = port.id as usize;
        if self.ports.len() <= id {
            self.ports.resize(id + 1, None);
        }
        self.ports[id] = Some(port);
        self.port_ids = self.ports.iter().flatten().map(|p| p.id).collect();
    }

    /// Forgets a port.
    pub fn del_port(&mut self, id: u16) {
        if let Some(p) = self.ports.get_mut(id as usize) {
            *p = None;
        }
        self.port_ids = self.ports.iter().flatten().map(|p| p.id).collect();
    }

    /// Processes one burst from `src`'s source queue `pair` (a guest's transmit queue, an
    /// uplink's receive side). Returns packets taken.
    #[inline(never)]
    pub fn poll_queue(&mut self, src: &Port, pair: usize, now: u32) -> usize {
        let slot: &QueueSlot = &src.txq[pair];
        let Some(mut guard) = slot.try_lock() else { return 0 };
        let mut c = SrcCounts::default();
        match guard.as_mut() {
            Some(Queue::Virtio(q)) => self.burst_virtio(src, q, slot, pair, now, &mut c),
            Some(Queue::Tap(t)) => {
                let n = self.burst_tap(src, t, now, &mut c);
                c.count(&slot.stats);
                let lost = t.kernel_drops(n == 0);
                if lost > 0 {
                    slot.stats.drop(DropReason::NoBuffer, lost);
                }
                n
            }
            Some(Queue::Nic(nq)) => {
                let n = self.burst_nic(src, nq, now, &mut c);
                c.count(&slot.stats);
                n
            }
            Some(Queue::AccelTx(a)) => {
                let n = self.burst_accel(src, a, now, &mut c);
                c.count(&slot.stats);
                n
            }
            // A transmit side sits in a receive slot, never here.
            Some(Queue::NicTx(_) | Queue::AccelRx(_)) => 0,
            None => 0,
        }
    }

    /// One burst from a guest's virtio transmit ring.
    #[inline(always)]
    fn burst_virtio(
        &mut self,
        src: &Port,
        q: &mut VirtQueue,
        slot: &QueueSlot,
        pair: usize,
        now: u32,
        c: &mut SrcCounts,
    ) -> usize {
        let Some(n) = receive::heads(q, &mut self.batch, &slot.stats, &src.name, pair) else { return 0 };
        let spoof = src.policy.ingress_on() && src.policy.spoof_on();
        let n = self.describe(q, n, spoof, c);
        if n == 0 {
            return 0; // the first chain waits for an IOTLB translation
        }
        self.forward(src, q.hdr_len as u32, n, now, c);
        // Counted before the sender sees its buffers back.
        c.count(&slot.stats);
        complete(q, &self.desc.pkts[..n], &slot.stats);
        n
    }

    /// What every source shares once its packets are described: policy, decisions, delivery.
    #[inline(always)]
    fn forward(&mut self, src: &Port, hdr: u32, n: usize, now: u32, c: &mut SrcCounts) {
        self.cur_src = src.id;
        if src.policy.ingress_on() {
            self.ingress(src, hdr, n, c);
        }
        self.decide(src, n, now, c);
        self.deliver(src, hdr, n, c);
    }
}

impl SrcCounts {
    /// Adds a burst's counts to its source queue's counters.
    #[inline(always)]
    fn count(&self, s: &QueueStats) {
        bump(&s.packets, self.packets);
        bump(&s.bytes, self.bytes);
        s.drop(DropReason::Malformed, self.malformed);
        s.drop(DropReason::Filtered, self.filtered);
        s.drop(DropReason::NoRoute, self.no_route);
        s.drop(DropReason::Policy, self.policy);
        bump(&s.kernel_copies, self.kernel_copies);
    }
}

/// One thing to deliver into one receive queue: a packet, or one segment of it.
#[derive(Clone, Copy)]
pub(super) struct Unit {
    pub(super) pkt: usize,
    pub(super) edit: TagEdit,
    /// 0: the whole packet; k: segment k - 1.
    pub(super) seg: u16,
    /// Bytes after the receiver's virtio-net header.
    pub(super) wire_len: u32,
}
