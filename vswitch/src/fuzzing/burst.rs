//! The whole burst: `Datapath::poll_queue` (with `translate_rx_ahead` and `release_shaped`)
//! over two or three mock guests whose rings, descriptors and buffer bytes the fuzzer writes.
//! Each guest's memory has an inaccessible page on both sides, so a stray access faults.
//!
//! Layout of each 64 KiB guest: rings and indirect tables below `DATA`, which the switch may
//! only read or write through descriptors; every buffer address lands at or above `DATA` (or
//! outside memory altogether), so what the switch writes cannot change the rings under it and
//! the checks below can trust a snapshot of them.
//!
//! Invariants: no panic; a receive used entry never claims more than its chain holds; nothing
//! outside the used rings and device-writable buffers changes; every transmit head taken is
//! returned exactly once; each poll takes at most a burst.

use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};

use crate::l2::vlan::VlanSet;
use crate::l2::{Fdb, VlanMode};
use crate::offload::Caps;
use crate::pmd::burst::Datapath;
use crate::port::Port;
use virtq::features::{self, Negotiated};
use virtq::mock::{MockGuest, UVA_BASE};
use virtq::ring::{Desc, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use virtq::RingAddrs;

use crate::virtio::queue::QueueSetup;
use crate::virtio::VirtQueue;

const MEM: u64 = 0x10000;
const DATA: u64 = 0x8000;
/// Per direction (0 = guest TX, 1 = guest RX): descriptor table, available, used ring, and
/// an indirect table.
const DESC: [u64; 2] = [0x1000, 0x2000];
const AVAIL: [u64; 2] = [0x3000, 0x3800];
const USED: [u64; 2] = [0x4000, 0x5000];
const TABLE: [u64; 2] = [0x6000, 0x7000];
const BURST: usize = 32;

#[derive(Arbitrary, Debug, Clone, Copy)]
struct D {
    addr: Addr,
    len: u16,
    flags: u8,
    next: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    /// An offset into the data area.
    Data(u16),
    /// The direction's indirect table.
    Table,
    /// Anywhere (refused unless it falls in the data area, where it is moved).
    Far(u64),
}

impl D {
    fn desc(&self, dir: usize) -> Desc {
        let addr = match self.addr {
            Addr::Data(a) => DATA + a as u64 % (MEM - DATA),
            Addr::Table => TABLE[dir],
            Addr::Far(a) if a < MEM => DATA + a % (MEM - DATA),
            Addr::Far(a) => a,
        };
        Desc { addr, len: self.len as u32, flags: self.flags as u16 & 0x7, next: self.next as u16 }
    }
}

/// One direction of one guest: its descriptors, indirect table, and available ring.
#[derive(Arbitrary, Debug)]
struct Ring {
    descs: Vec<D>,
    table: Vec<D>,
    heads: Vec<u8>,
    extra_idx: u8,
}

#[derive(Arbitrary, Debug)]
enum Vlan {
    Access(u16),
    TrunkAll,
    Trunk(Vec<u16>),
}

#[derive(Arbitrary, Debug)]
struct Guest {
    vlan: Vlan,
    mrg: bool,
    caps: u8,
    size_log2: u8,
    tx: Ring,
    rx: Ring,
    data: Vec<u8>,
}

/// Two or three guests and the order their transmit queues are polled.
#[derive(Arbitrary, Debug)]
pub struct Input {
    guests: [Guest; 2],
    third: Option<Guest>,
    polls: Vec<u8>,
}

fn caps(bits: u8) -> Caps {
    let b = |i: u8| bits & (1 << i) != 0;
    Caps::from_features(Negotiated {
        bits: [
            (0, features::NET_F_CSUM),
            (1, features::NET_F_GUEST_CSUM),
            (2, features::NET_F_HOST_TSO4),
            (3, features::NET_F_HOST_TSO6),
            (4, features::NET_F_GUEST_TSO4),
            (5, features::NET_F_GUEST_TSO6),
            (6, features::NET_F_HOST_ECN),
            (7, features::NET_F_GUEST_ECN),
        ]
        .iter()
        .filter(|(i, _)| b(*i))
        .fold(0, |a, (_, f)| a | f),
    })
}

fn write_desc(g: &MockGuest, at: u64, d: Desc) {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&d.addr.to_le_bytes());
    b[8..12].copy_from_slice(&d.len.to_le_bytes());
    b[12..14].copy_from_slice(&d.flags.to_le_bytes());
    b[14..16].copy_from_slice(&d.next.to_le_bytes());
    g.write(at, &b);
}

/// A guest as the harness built it.
struct Built {
    g: MockGuest,
    size: u16,
    /// Per direction: descriptor table and indirect table as written.
    descs: [Vec<Desc>; 2],
    tables: [Vec<Desc>; 2],
}

fn build(spec: &Guest, id: u16, dp: &mut Datapath) -> (Built, Arc<Port>) {
    let (g, _) = MockGuest::guarded(MEM);
    let size = 1u16 << (spec.size_log2 % 7);
    if !spec.data.is_empty() {
        // The fuzzer's bytes repeated over the data area, doubled by whole copies: a loop per
        // byte cost most of this harness's time under coverage instrumentation.
        let n = (MEM - DATA) as usize;
        let mut data = spec.data.clone();
        data.truncate(n);
        while data.len() < n {
            data.extend_from_within(..data.len().min(n - data.len()));
        }
        g.write(DATA, &data);
    }
    let mut descs: [Vec<Desc>; 2] = Default::default();
    let mut tables: [Vec<Desc>; 2] = Default::default();
    for (dir, r) in [&spec.tx, &spec.rx].into_iter().enumerate() {
        descs[dir] = r.descs.iter().take(size as usize).map(|d| d.desc(dir)).collect();
        descs[dir].resize(size as usize, Desc::default());
        tables[dir] = r.table.iter().take(16).map(|d| d.desc(dir)).collect();
        for (i, d) in descs[dir].iter().enumerate() {
            write_desc(&g, DESC[dir] + 16 * i as u64, *d);
        }
        for (i, d) in tables[dir].iter().enumerate() {
            write_desc(&g, TABLE[dir] + 16 * i as u64, *d);
        }
        let heads: Vec<u16> = r.heads.iter().take(size as usize).map(|&h| h as u16).collect();
        for (i, h) in heads.iter().enumerate() {
            g.write_u16(AVAIL[dir] + 4 + 2 * i as u64, *h);
        }
        // An index past the entries written claims more than the ring holds (or stale ones).
        let idx = heads.len() as u16 + (r.extra_idx % 4 == 3) as u16 * r.extra_idx as u16;
        g.write_u16(AVAIL[dir] + 2, idx);
    }
    let mode = match &spec.vlan {
        Vlan::Access(v) => VlanMode::Access(1 + v % 4094),
        Vlan::TrunkAll => VlanMode::Trunk(None),
        Vlan::Trunk(v) => {
            VlanMode::Trunk(Some(Box::new(VlanSet::new(v.iter().take(8).map(|x| 1 + x % 4094)))))
        }
    };
    let port = Arc::new(Port::new(id, format!("g{id}"), mode, [0x52, 0, 0, 0, 0, id as u8 + 1], 1));
    let caps = caps(spec.caps);
    for (dir, slot) in [&port.txq[0], &port.rxq[0]].into_iter().enumerate() {
        let s = QueueSetup {
            addrs: RingAddrs {
                desc: UVA_BASE + DESC[dir],
                avail: UVA_BASE + AVAIL[dir],
                used: UVA_BASE + USED[dir],
            },
            size: size as u32,
            last_avail: 0,
            event_idx: false,
            hdr_len: 12,
            mrg_rxbuf: spec.mrg,
            indirect: true,
            caps,
            packed: false,
        };
        *slot.lock() = Some(VirtQueue::new(g.dma(), &s, None, None).expect("rings inside memory").into());
    }
    dp.add_port(port.clone());
    (Built { g, size, descs, tables }, port)
}

/// Byte ranges a chain at `head` may have the device write, and their total (a naive walk:
/// it follows more than the switch accepts, never less).
fn writable(b: &Built, dir: usize, head: u16) -> (Vec<(u64, u64)>, u64) {
    let mut out = Vec::new();
    let mut table: &[Desc] = &b.descs[dir];
    let mut i = head as usize;
    let mut indirect = false;
    for _ in 0..(b.size as usize + 16 + 1) {
        let Some(d) = table.get(i) else { break };
        if d.flags & DESC_F_INDIRECT != 0 && !indirect {
            table = &b.tables[dir];
            indirect = true;
            i = 0;
            continue;
        }
        if d.flags & DESC_F_WRITE != 0 {
            out.push((d.addr, d.len as u64));
        }
        if d.flags & DESC_F_NEXT == 0 {
            break;
        }
        i = d.next as usize;
    }
    let total = out.iter().map(|r| r.1).sum();
    (out, total)
}

/// The libFuzzer entry point.
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(input);
    }
}

/// Runs the polls; panics on a broken invariant.
pub fn run(input: Input) {
    let mut dp = Datapath::new(0, Arc::new(Fdb::new(64, 300)));
    let specs: Vec<&Guest> = input.guests.iter().chain(input.third.as_ref()).collect();
    let (built, ports): (Vec<Built>, Vec<Arc<Port>>) =
        specs.iter().enumerate().map(|(i, s)| build(s, i as u16, &mut dp)).unzip();
    let before: Vec<Vec<u8>> = built.iter().map(|b| b.g.read(0, MEM as usize)).collect();
    for (step, &p) in input.polls.iter().take(16).enumerate() {
        let port = &ports[p as usize % ports.len()];
        let n = dp.poll_queue(port, 0, step as u32 + 1);
        assert!(n <= BURST, "{n} packets in one burst");
        dp.translate_rx_ahead();
        dp.release_shaped();
    }
    for (b, port) in built.iter().zip(&ports) {
        check_guest(b, port, &before[port.id as usize]);
    }
}

fn check_guest(b: &Built, port: &Port, before: &[u8]) {
    let after = b.g.read(0, MEM as usize);
    let size = b.size as u64;
    // Transmit: every head taken comes back once.
    // A head outside the table is not returned (it names no chain the guest could reuse), and
    // a queue stopped as broken returns nothing more.
    let (taken, broken) =
        port.txq[0].lock().virtio_mut().map_or((0, true), |q| (q.ring.state().last_avail, q.broken));
    let tx_used = b.g.read_u16(USED[0] + 2);
    let mut returned: Vec<u16> =
        (0..tx_used as u64).map(|k| b.g.read_u32(USED[0] + 4 + 8 * (k % size)) as u16).collect();
    let mut popped: Vec<u16> = (0..taken as u64)
        .map(|k| b.g.read_u16(AVAIL[0] + 4 + 2 * (k % size)))
        .filter(|&h| h < b.size)
        .collect();
    returned.sort_unstable();
    popped.sort_unstable();
    if tx_used as u64 <= size && !broken {
        assert_eq!(returned, popped, "transmit heads returned (used idx {tx_used}, taken {taken})");
    }
    // Receive: used entries within their chains; writes only where allowed.
    let mut allowed: Vec<(u64, u64)> = (0..2).map(|d| (USED[d], 6 + 8 * size)).collect();
    let rx_used = b.g.read_u16(USED[1] + 2) as u64;
    let rx_heads: Vec<u16> = (0..size).map(|k| b.g.read_u16(AVAIL[1] + 4 + 2 * k)).collect();
    for head in rx_heads {
        allowed.extend(writable(b, 1, head).0);
    }
    for k in 0..rx_used.min(size) {
        let e = USED[1] + 4 + 8 * k;
        let (id, len) = (b.g.read_u32(e), b.g.read_u32(e + 4));
        let cap = if id < size as u32 { writable(b, 1, id as u16).1 } else { 0 };
        assert!(len as u64 <= cap, "receive used entry {k}: {len} bytes in a chain of {cap}");
    }
    // Bytes the switch may write, as a mask; memory compared a block at a time and byte by
    // byte only where a block changed (per-byte loops over all of memory cost most of this
    // harness's time under coverage instrumentation).
    let mut mask = vec![false; MEM as usize];
    for (s, l) in allowed {
        let end = s.saturating_add(l).min(MEM);
        if s < end {
            mask[s as usize..end as usize].fill(true);
        }
    }
    const BLOCK: usize = 256;
    for (k, (x, y)) in before.chunks(BLOCK).zip(after.chunks(BLOCK)).enumerate() {
        if x == y {
            continue;
        }
        let base = k * BLOCK;
        if let Some(i) = (0..x.len()).find(|&i| x[i] != y[i] && !mask[base + i]) {
            let at = base + i;
            panic!("guest {} byte {at:#x} changed outside used rings and receive buffers", port.id);
        }
    }
}
