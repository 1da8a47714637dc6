//! One modelled NIC: a tier's capabilities over the classifier and engines, with pools bound
//! to the switch's guest ports.
//!
//! Pool 0 is the default pool: the host's own queue, which in this product is the switch's
//! software path (broadcast, multicast, unknown unicast, whatever the tables cannot hold).
//! Level 1 binds a guest port to each further pool and programs its unicast MACs into the
//! receive-address table; frames for them are DMAed by the device straight into that guest's
//! receive ring ([`crate::rxq::dma_rx`]). Level 0 has one queue: everything goes to the host.

use crate::classify::{Classifier, PoolOptions, TableError, TableSizes, Verdict};

/// The tier a model offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// A conventional NIC: one RX queue to the host, offload engines.
    L0,
    /// VMDq: pools bound to guests' receive rings, a classifier to choose them.
    L1,
}

/// Where the device puts a frame from the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Steer {
    /// Into the receive ring of the guest port bound to this pool (`owner`); `strip`: the
    /// device removes the 802.1Q tag as it writes.
    Pool {
        /// The pool.
        pool: u8,
        /// The switch's port bound to it.
        owner: u16,
        /// Strip the VLAN tag (VMOLR.STRVLAN).
        strip: bool,
    },
    /// To the host: the switch's software path.
    Default,
    /// Nowhere (oversized or runt).
    Drop(Verdict),
}

/// Why a guest port could not have a pool.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// Level 0 has no pools
    #[error(
        "a Level 0 NIC has one queue; guests are served by the software path (level=1 gives them pools)"
    )]
    NoPools,
    /// every pool is taken
    #[error("every pool of the NIC is bound ({0} guests); this guest stays on the software path")]
    Full(u8),
    /// a table refused
    #[error(transparent)]
    Table(#[from] TableError),
}

/// Counters of a NIC's receive side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerCounters {
    /// Frames from the wire.
    pub wire_frames: u64,
    /// Frames steered into a guest pool.
    pub to_pools: u64,
    /// Frames given to the host's default queue.
    pub to_default: u64,
    /// Frames the filters dropped.
    pub filtered: u64,
    /// MACs that found no free receive-address entry (their frames use the software path).
    pub mac_overflow: u64,
}

/// A modelled NIC's filters and pool bindings.
pub struct Nic {
    level: Level,
    classifier: Classifier,
    /// The switch port bound to each pool (pool 0: none, the host).
    owners: Vec<Option<u16>>,
    /// The MACs programmed for each pool.
    macs: Vec<Vec<[u8; 6]>>,
    /// Whether each pool strips the VLAN tag.
    strip: Vec<bool>,
    /// What the receive side did.
    pub counters: SteerCounters,
}

impl Nic {
    /// A NIC of `level` with `sizes` tables. Pool 0 takes broadcast, multicast and unmatched
    /// unicast; the others take nothing until bound.
    pub fn new(level: Level, sizes: TableSizes) -> Result<Self, TableError> {
        let mut classifier = Classifier::new(sizes)?;
        let host = PoolOptions {
            enabled: true,
            accept_untagged: true,
            accept_broadcast: true,
            accept_hashed: true,
            long_packets: true,
            max_len: 0x3fff,
            strip_vlan: false,
        };
        classifier.set_pool(0, host)?;
        classifier.set_default_pool(Some(0))?;
        // The host asks for every multicast group (its bridge floods them): the whole hash.
        for bit in 0..4096 {
            classifier.set_hash(true, bit, true);
        }
        classifier.set_port_lengths(true, 0x3fff, false);
        let pools = sizes.pools as usize;
        Ok(Nic {
            level,
            classifier,
            owners: vec![None; pools],
            macs: vec![Vec::new(); pools],
            strip: vec![false; pools],
            counters: SteerCounters::default(),
        })
    }

    /// The tier.
    pub fn level(&self) -> Level {
        self.level
    }

    /// The classifier (to read its tables).
    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }

    /// The switch port bound to `pool`.
    pub fn owner_of(&self, pool: u8) -> Option<u16> {
        self.owners.get(pool as usize).copied().flatten()
    }

    /// The pool bound to `owner`.
    pub fn pool_of(&self, owner: u16) -> Option<u8> {
        self.owners.iter().position(|o| *o == Some(owner)).map(|p| p as u8)
    }

    /// Pools and their owners and MACs, for display.
    pub fn bindings(&self) -> Vec<(u8, u16, Vec<[u8; 6]>)> {
        let bound = self.owners.iter().enumerate().filter_map(|(p, o)| o.map(|o| (p, o)));
        bound.map(|(p, o)| (p as u8, o, self.macs[p].clone())).collect()
    }

    /// Binds switch port `owner` to a free pool. `vlan`: the tagged VLAN its frames arrive
    /// with on the wire, which the device filters on and strips (None: untagged on the wire).
    pub fn bind(&mut self, owner: u16, vlan: Option<u16>) -> Result<u8, BindError> {
        if self.level == Level::L0 {
            return Err(BindError::NoPools);
        }
        if let Some(p) = self.pool_of(owner) {
            return Ok(p);
        }
        let free = self.owners.iter().skip(1).position(Option::is_none);
        let pool = free.map(|i| i as u8 + 1).ok_or(BindError::Full(self.owners.len() as u8 - 1))?;
        let opts = PoolOptions {
            enabled: true,
            accept_untagged: vlan.is_none(),
            long_packets: true,
            max_len: 0x3fff,
            strip_vlan: vlan.is_some(),
            ..PoolOptions::default()
        };
        if let Some(v) = vlan {
            self.classifier.add_vlan(v, pool)?;
            // The host is VLAN promiscuous (the i350's VMOLR.VPE; the 82576 would need a VLVF
            // entry per host VLAN): every VLAN passes the VFTA, and a tagged frame no guest
            // pool takes goes to the host, which applies the switch's own VLAN rules.
            for vid in 0..4096 {
                self.classifier.set_vfta(vid, true);
            }
            self.classifier.set_vlan_filter(true);
        }
        self.classifier.set_pool(pool, opts)?;
        self.owners[pool as usize] = Some(owner);
        self.strip[pool as usize] = vlan.is_some();
        Ok(pool)
    }

    /// Unbinds `owner`: its MACs leave the table, its frames go to the host again.
    pub fn unbind(&mut self, owner: u16) {
        let Some(pool) = self.pool_of(owner) else { return };
        for mac in std::mem::take(&mut self.macs[pool as usize]) {
            self.classifier.remove_mac(mac, pool);
        }
        let _ = self.classifier.set_pool(pool, PoolOptions::default());
        self.owners[pool as usize] = None;
        self.strip[pool as usize] = false;
    }

    /// Programs `owner`'s unicast MACs (what the switch learned or configured for it), adding
    /// new ones and removing those gone. MACs that find no free entry are counted and their
    /// frames keep using the software path. Returns how many are programmed.
    pub fn set_macs(&mut self, owner: u16, macs: &[[u8; 6]]) -> usize {
        let Some(pool) = self.pool_of(owner) else { return 0 };
        let p = pool as usize;
        let gone: Vec<_> = self.macs[p].iter().filter(|m| !macs.contains(m)).copied().collect();
        for m in gone {
            self.classifier.remove_mac(m, pool);
            self.macs[p].retain(|x| *x != m);
        }
        for m in macs {
            if m[0] & 1 != 0 || self.macs[p].contains(m) {
                continue;
            }
            match self.classifier.add_mac(*m, pool) {
                Ok(_) => self.macs[p].push(*m),
                Err(_) => self.counters.mac_overflow += 1,
            }
        }
        self.macs[p].len()
    }

    /// Where a frame from the wire goes.
    #[inline]
    pub fn steer(&mut self, frame: &[u8]) -> Steer {
        self.steer_len(frame, frame.len())
    }

    /// [`steer`](Self::steer) for a frame that stands for wire frames of `wire_len` bytes (a
    /// host stack's TSO frame: its length is checked as its segments').
    #[inline]
    pub fn steer_len(&mut self, frame: &[u8], wire_len: usize) -> Steer {
        self.counters.wire_frames += 1;
        if self.level == Level::L0 {
            self.counters.to_default += 1;
            return Steer::Default;
        }
        match self.classifier.classify_len(frame, wire_len) {
            Verdict::Pools(m) if m & 1 == 0 && m.count_ones() == 1 => {
                let pool = m.trailing_zeros() as u8;
                match self.owners[pool as usize] {
                    Some(owner) => {
                        self.counters.to_pools += 1;
                        Steer::Pool { pool, owner, strip: self.strip[pool as usize] }
                    }
                    None => {
                        self.counters.to_default += 1;
                        Steer::Default
                    }
                }
            }
            // The host's pool, or several (replication is the software path's job), or none
            // of the guests' (the host is VLAN promiscuous, see `bind`).
            Verdict::Pools(_) | Verdict::NoPool | Verdict::VlanFiltered => {
                self.counters.to_default += 1;
                Steer::Default
            }
            v => {
                self.counters.filtered += 1;
                Steer::Drop(v)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: [u8; 6], vlan: Option<u16>) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 9]);
        if let Some(v) = vlan {
            f.extend_from_slice(&[0x81, 0, (v >> 8) as u8, v as u8]);
        }
        f.extend_from_slice(&[0x08, 0]);
        f.resize(f.len() + 46, 0);
        f
    }

    const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xa];
    const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xb];

    #[test]
    fn level1_steers_bound_guests_unicast_and_leaves_the_rest_to_the_host() {
        let mut n = Nic::new(Level::L1, TableSizes::I82576).unwrap();
        let pa = n.bind(7, None).unwrap();
        assert_eq!(n.set_macs(7, &[A]), 1);
        assert_eq!(n.steer(&frame(A, None)), Steer::Pool { pool: pa, owner: 7, strip: false });
        // B has no pool yet: the software path.
        assert_eq!(n.steer(&frame(B, None)), Steer::Default);
        assert_eq!(n.steer(&frame([0xff; 6], None)), Steer::Default);
        assert_eq!(n.steer(&frame([0x33, 0x33, 0, 0, 0, 1], None)), Steer::Default);
        // A's MAC moves away: its frames go to the host again.
        n.set_macs(7, &[]);
        assert_eq!(n.steer(&frame(A, None)), Steer::Default);
        n.set_macs(7, &[A]);
        n.unbind(7);
        assert_eq!(n.steer(&frame(A, None)), Steer::Default);
        assert_eq!(n.counters.to_pools, 1);
    }

    #[test]
    fn a_host_stacks_tso_frame_is_checked_as_its_segments() {
        let mut n = Nic::new(Level::L1, TableSizes::I82576).unwrap();
        let p = n.bind(7, None).unwrap();
        n.set_macs(7, &[A]);
        let mut big = frame(A, None);
        big.resize(20_000, 0);
        assert_eq!(n.steer(&big), Steer::Drop(Verdict::Oversized));
        assert_eq!(n.steer_len(&big, 1514), Steer::Pool { pool: p, owner: 7, strip: false });
    }

    #[test]
    fn more_guests_than_pools_and_more_macs_than_entries_fall_back_to_the_software_path() {
        let mut n = Nic::new(Level::L1, TableSizes { pools: 3, rar: 2, vlvf: 4 }).unwrap();
        n.bind(1, None).unwrap();
        n.bind(2, None).unwrap();
        let e = n.bind(3, None).unwrap_err();
        assert_eq!(e, BindError::Full(2));
        assert!(e.to_string().contains("software path"));
        assert_eq!(n.set_macs(1, &[A, B, [2, 0, 0, 0, 0, 1]]), 2);
        assert_eq!(n.counters.mac_overflow, 1);
        assert_eq!(n.steer(&frame([2, 0, 0, 0, 0, 1], None)), Steer::Default);
        assert!(matches!(
            Nic::new(Level::L0, TableSizes::I82576).unwrap().bind(1, None),
            Err(BindError::NoPools)
        ));
    }

    #[test]
    fn a_guest_on_a_tagged_vlan_is_steered_by_vlan_and_mac_and_stripped() {
        let mut n = Nic::new(Level::L1, TableSizes::I82576).unwrap();
        let p = n.bind(4, Some(10)).unwrap();
        n.set_macs(4, &[A]);
        assert_eq!(n.steer(&frame(A, Some(10))), Steer::Pool { pool: p, owner: 4, strip: true });
        // A's MAC on another VLAN is not A's: the host decides, on every VLAN.
        assert_eq!(n.steer(&frame(A, Some(11))), Steer::Default);
        assert_eq!(n.steer(&frame([0xff; 6], Some(11))), Steer::Default);
        assert_eq!(n.steer(&frame(B, Some(12))), Steer::Default);
        assert_eq!(n.steer(&frame(A, None)), Steer::Default);
    }
}
