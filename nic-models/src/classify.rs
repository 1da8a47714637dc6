//! The receive classifier: which pools (and so which RX queues) a frame from the wire goes to.
//!
//! The semantics are the 82576's with VMDq on, as QEMU's igb implements them
//! (`igb_receive_assign` in `hw/net/igb_core.c`; a transcription of it is this module's test
//! oracle, `tests/igb_oracle.rs`):
//!
//! 1. an oversized frame is dropped (RCTL.LPE/RLPML, unless RCTL.SBP);
//! 2. a tagged frame whose VLAN is not in the VFTA is dropped (RCTL.VFE);
//! 3. broadcast goes to every pool with VMOLR.BAM; other destinations are matched exactly
//!    against the receive-address table (RAR: MAC → pool bitmap), and on a miss the MTA
//!    (multicast) or UTA (unicast) hash sends them to the pools with VMOLR.ROMPE;
//! 4. with VLAN filtering on, the pools are masked by the VLAN's VLVF entries (tagged) or by
//!    VMOLR.AUPE (untagged);
//! 5. unicast that reached no pool goes to the default pool (VT_CTL), unless disabled;
//! 6. pools not enabled for receive (VFRE) are removed, then pools the frame is too long for.
//!
//! The tables are finite (the 82576 has 24 RAR and 32 VLVF entries and 8 pools; the 82599 128,
//! 64 and 64), and that is the point: what does not fit goes to the default pool, which in this
//! product is the switch's software path. RSS inside a pool and EtherType filters are not
//! modelled (one queue per pool).

use crate::regs::TA_SHIFT;

/// A set of pools, bit `i` for pool `i`.
pub type PoolMask = u64;
/// Most pools a model may have.
pub const MAX_POOLS: usize = 64;

/// The classifier's table sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableSizes {
    /// Pools (VMDq), at most [`MAX_POOLS`].
    pub pools: u8,
    /// Exact-MAC receive-address entries.
    pub rar: u16,
    /// VLAN pool filter entries.
    pub vlvf: u16,
}

impl TableSizes {
    /// The 82576: 8 pools, 24 addresses, 32 VLAN filters.
    pub const I82576: TableSizes = TableSizes { pools: 8, rar: 24, vlvf: 32 };
    /// The 82599: 64 pools, 128 addresses, 64 VLAN filters.
    pub const I82599: TableSizes = TableSizes { pools: 64, rar: 128, vlvf: 64 };
}

/// Why a table size was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// pools out of range
    #[error("a model has 1 to {MAX_POOLS} pools, not {0}")]
    Pools(u8),
    /// table sizes out of range
    #[error("filter tables hold 1 to 4096 entries (asked for {rar} addresses and {vlvf} VLAN filters)")]
    Entries {
        /// Receive-address entries asked for.
        rar: u16,
        /// VLAN filter entries asked for.
        vlvf: u16,
    },
    /// an index past the table
    #[error("entry {index} is past the table's {size} entries")]
    Index {
        /// The index given.
        index: usize,
        /// The table's size.
        size: usize,
    },
    /// a pool past the model's pools
    #[error("pool {pool} is past the model's {pools} pools")]
    Pool {
        /// The pool given.
        pool: u8,
        /// The model's pools.
        pools: u8,
    },
    /// every entry of a table is in use
    #[error("the {table} table is full ({size} entries); the frames go to the default pool (software path)")]
    Full {
        /// Which table.
        table: &'static str,
        /// Its size.
        size: usize,
    },
}

/// Per-pool receive options (VMOLR and the pool's VFRE bit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolOptions {
    /// Receive enabled (VFRE).
    pub enabled: bool,
    /// Accept untagged frames when VLAN filtering is on (AUPE).
    pub accept_untagged: bool,
    /// Accept broadcast (BAM).
    pub accept_broadcast: bool,
    /// Accept frames that hit the MTA/UTA hash (ROMPE).
    pub accept_hashed: bool,
    /// Accept long frames up to `max_len` (LPE); otherwise 1500-byte payloads.
    pub long_packets: bool,
    /// Longest frame with FCS when `long_packets` (RLPML).
    pub max_len: u16,
    /// Strip the VLAN tag on receive (STRVLAN).
    pub strip_vlan: bool,
}

/// One exact-MAC entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RarEntry {
    /// The address (6 bytes, in wire order).
    pub mac: [u8; 6],
    /// The pools it goes to.
    pub pools: PoolMask,
}

/// One VLAN pool filter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VlvfEntry {
    /// The VLAN id (12 bits).
    pub vid: u16,
    /// The pools that accept it.
    pub pools: PoolMask,
}

/// Where a frame goes, or why nowhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// These pools (never empty).
    Pools(PoolMask),
    /// Too long for the port (ROC).
    Oversized,
    /// Tagged with a VLAN the VFTA does not hold.
    VlanFiltered,
    /// Matched no pool (multicast without a hash hit, unicast with the default pool off, or
    /// every matching pool disabled or too small).
    NoPool,
    /// Shorter than an Ethernet header.
    Runt,
}

/// 48-bit key of a MAC (wire order).
#[inline(always)]
fn key(mac: &[u8; 6]) -> u64 {
    u64::from(mac[0]) << 40
        | u64::from(mac[1]) << 32
        | u64::from(mac[2]) << 24
        | u64::from(mac[3]) << 16
        | u64::from(mac[4]) << 8
        | u64::from(mac[5])
}

/// The receive filters of one modelled port.
#[derive(Clone, Debug)]
pub struct Classifier {
    sizes: TableSizes,
    rar: Vec<Option<RarEntry>>,
    vlvf: Vec<Option<VlvfEntry>>,
    pool: Vec<PoolOptions>,
    /// VT_CTL's default pool; `None` with DISABLE_DEF_POOL.
    default_pool: Option<u8>,
    /// RCTL.VFE.
    vlan_filter: bool,
    vfta: Box<[u32; 128]>,
    mta: Box<[u32; 128]>,
    uta: Box<[u32; 128]>,
    /// RCTL.MO.
    mo: u8,
    /// RCTL.LPE and RLPML: the port-wide length check.
    long_packets: bool,
    max_len: u16,
    /// RCTL.SBP: no port-wide length check.
    store_bad: bool,
    // Derived on every change, so a lookup scans only live entries.
    live_rar: Vec<(u64, PoolMask)>,
    live_vlvf: Vec<(u16, PoolMask)>,
    bam: PoolMask,
    aupe: PoolMask,
    rompe: PoolMask,
    vfre: PoolMask,
}

impl Classifier {
    /// Empty tables (no address, no VLAN, every pool disabled, default pool 0, VLAN filtering
    /// off, standard frame lengths).
    pub fn new(sizes: TableSizes) -> Result<Self, TableError> {
        if sizes.pools == 0 || sizes.pools as usize > MAX_POOLS {
            return Err(TableError::Pools(sizes.pools));
        }
        if !(1..=4096).contains(&sizes.rar) || !(1..=4096).contains(&sizes.vlvf) {
            return Err(TableError::Entries { rar: sizes.rar, vlvf: sizes.vlvf });
        }
        let mut c = Classifier {
            sizes,
            rar: vec![None; sizes.rar as usize],
            vlvf: vec![None; sizes.vlvf as usize],
            pool: vec![PoolOptions::default(); sizes.pools as usize],
            default_pool: Some(0),
            vlan_filter: false,
            vfta: Box::new([0; 128]),
            mta: Box::new([0; 128]),
            uta: Box::new([0; 128]),
            mo: 0,
            long_packets: false,
            max_len: 1522,
            store_bad: false,
            live_rar: Vec::new(),
            live_vlvf: Vec::new(),
            bam: 0,
            aupe: 0,
            rompe: 0,
            vfre: 0,
        };
        c.derive();
        Ok(c)
    }

    /// The table sizes.
    pub fn sizes(&self) -> TableSizes {
        self.sizes
    }

    fn all_pools(&self) -> PoolMask {
        if self.sizes.pools as usize == MAX_POOLS {
            u64::MAX
        } else {
            (1u64 << self.sizes.pools) - 1
        }
    }

    fn check_pool(&self, pool: u8) -> Result<(), TableError> {
        match pool < self.sizes.pools {
            true => Ok(()),
            false => Err(TableError::Pool { pool, pools: self.sizes.pools }),
        }
    }

    fn derive(&mut self) {
        let all = self.all_pools();
        self.live_rar = self.rar.iter().flatten().map(|e| (key(&e.mac), e.pools & all)).collect();
        self.live_vlvf = self.vlvf.iter().flatten().map(|e| (e.vid & 0xfff, e.pools & all)).collect();
        let mask = |f: fn(&PoolOptions) -> bool| -> PoolMask {
            self.pool.iter().enumerate().filter(|(_, o)| f(o)).fold(0, |m, (i, _)| m | 1 << i)
        };
        self.bam = mask(|o| o.accept_broadcast);
        self.aupe = mask(|o| o.accept_untagged);
        self.rompe = mask(|o| o.accept_hashed);
        self.vfre = mask(|o| o.enabled);
    }

    /// Sets receive-address entry `index` (`None` clears it, RAH.AV off).
    pub fn set_rar(&mut self, index: usize, entry: Option<RarEntry>) -> Result<(), TableError> {
        let size = self.rar.len();
        let slot = self.rar.get_mut(index).ok_or(TableError::Index { index, size })?;
        *slot = entry;
        self.derive();
        Ok(())
    }

    /// Receive-address entry `index`.
    pub fn rar(&self, index: usize) -> Option<RarEntry> {
        self.rar.get(index).copied().flatten()
    }

    /// Adds `pool` to `mac`'s entry, or takes a free entry for it; where it went.
    pub fn add_mac(&mut self, mac: [u8; 6], pool: u8) -> Result<usize, TableError> {
        self.check_pool(pool)?;
        let at = self.rar.iter().position(|e| e.is_some_and(|e| e.mac == mac));
        let at = at.or_else(|| self.rar.iter().position(Option::is_none));
        let size = self.rar.len();
        let i = at.ok_or(TableError::Full { table: "receive-address", size })?;
        let pools = self.rar[i].map_or(0, |e| e.pools) | 1 << pool;
        self.set_rar(i, Some(RarEntry { mac, pools }))?;
        Ok(i)
    }

    /// Removes `pool` from `mac`'s entry (freeing it when no pool is left).
    pub fn remove_mac(&mut self, mac: [u8; 6], pool: u8) {
        if let Some(i) = self.rar.iter().position(|e| e.is_some_and(|e| e.mac == mac)) {
            let pools = self.rar[i].map_or(0, |e| e.pools) & !(1u64 << pool);
            self.rar[i] = (pools != 0).then_some(RarEntry { mac, pools });
            self.derive();
        }
    }

    /// Sets VLAN filter entry `index` (`None` clears it).
    pub fn set_vlvf(&mut self, index: usize, entry: Option<VlvfEntry>) -> Result<(), TableError> {
        let size = self.vlvf.len();
        let slot = self.vlvf.get_mut(index).ok_or(TableError::Index { index, size })?;
        *slot = entry;
        self.derive();
        Ok(())
    }

    /// Adds `pool` to VLAN `vid`'s filter (taking a free entry) and lets the VLAN through the
    /// VFTA; where it went.
    pub fn add_vlan(&mut self, vid: u16, pool: u8) -> Result<usize, TableError> {
        self.check_pool(pool)?;
        let vid = vid & 0xfff;
        let at = self.vlvf.iter().position(|e| e.is_some_and(|e| e.vid == vid));
        let at = at.or_else(|| self.vlvf.iter().position(Option::is_none));
        let size = self.vlvf.len();
        let i = at.ok_or(TableError::Full { table: "VLAN filter", size })?;
        let pools = self.vlvf[i].map_or(0, |e| e.pools) | 1 << pool;
        self.set_vlvf(i, Some(VlvfEntry { vid, pools }))?;
        self.set_vfta(vid, true);
        Ok(i)
    }

    /// Sets pool `pool`'s options.
    pub fn set_pool(&mut self, pool: u8, opts: PoolOptions) -> Result<(), TableError> {
        self.check_pool(pool)?;
        self.pool[pool as usize] = opts;
        self.derive();
        Ok(())
    }

    /// Pool `pool`'s options.
    pub fn pool(&self, pool: u8) -> Option<PoolOptions> {
        self.pool.get(pool as usize).copied()
    }

    /// Sets the default pool (`None`: unmatched unicast is dropped).
    pub fn set_default_pool(&mut self, pool: Option<u8>) -> Result<(), TableError> {
        if let Some(p) = pool {
            self.check_pool(p)?;
        }
        self.default_pool = pool;
        Ok(())
    }

    /// The default pool.
    pub fn default_pool(&self) -> Option<u8> {
        self.default_pool
    }

    /// Turns VLAN filtering (RCTL.VFE) on or off.
    pub fn set_vlan_filter(&mut self, on: bool) {
        self.vlan_filter = on;
    }

    /// Lets VLAN `vid` through the VFTA, or not.
    pub fn set_vfta(&mut self, vid: u16, on: bool) {
        let (w, b) = (((vid >> 5) & 0x7f) as usize, vid & 0x1f);
        match on {
            true => self.vfta[w] |= 1 << b,
            false => self.vfta[w] &= !(1 << b),
        }
    }

    /// Which MTA/UTA bit a destination hashes to, under the current RCTL.MO.
    pub fn hash_bit(&self, mac: &[u8; 6]) -> u16 {
        let v = u32::from(mac[5]) << 8 | u32::from(mac[4]);
        ((v >> TA_SHIFT[self.mo as usize & 3]) & 0xfff) as u16
    }

    /// Sets RCTL.MO (0-3).
    pub fn set_hash_offset(&mut self, mo: u8) {
        self.mo = mo & 3;
    }

    /// Sets or clears bit `bit` of the multicast (MTA) or unicast (UTA) hash table.
    pub fn set_hash(&mut self, multicast: bool, bit: u16, on: bool) {
        let t = if multicast { &mut self.mta } else { &mut self.uta };
        let (w, b) = (((bit >> 5) & 0x7f) as usize, bit & 0x1f);
        match on {
            true => t[w] |= 1 << b,
            false => t[w] &= !(1 << b),
        }
    }

    /// Sets the port-wide length check: RCTL.LPE with RLPML, and RCTL.SBP (no check).
    pub fn set_port_lengths(&mut self, long_packets: bool, max_len: u16, store_bad: bool) {
        self.long_packets = long_packets;
        self.max_len = max_len;
        self.store_bad = store_bad;
    }

    /// The registers these tables amount to, for checking against a register-level model.
    pub fn registers(&self) -> Registers {
        Registers {
            rar: self.rar.clone(),
            vlvf: self.vlvf.clone(),
            pool: self.pool.clone(),
            default_pool: self.default_pool,
            vlan_filter: self.vlan_filter,
            vfta: *self.vfta,
            mta: *self.mta,
            uta: *self.uta,
            mo: self.mo,
            long_packets: self.long_packets,
            max_len: self.max_len,
            store_bad: self.store_bad,
        }
    }

    /// Where `frame` (from the destination MAC on, without FCS) goes.
    #[inline]
    pub fn classify(&self, frame: &[u8]) -> Verdict {
        self.classify_len(frame, frame.len())
    }

    /// [`classify`](Self::classify) for a frame that stands for wire frames of `wire_len`
    /// bytes: a TSO/GSO frame from a host stack is checked as the segments it becomes.
    #[inline]
    pub fn classify_len(&self, frame: &[u8], wire_len: usize) -> Verdict {
        if frame.len() < 14 {
            return Verdict::Runt;
        }
        let dst: &[u8; 6] = frame[0..6].try_into().expect("6 bytes");
        let tpid = u16::from_be_bytes([frame[12], frame[13]]);
        let tagged = tpid == 0x8100 && frame.len() >= 18;
        let vid = if tagged { u16::from_be_bytes([frame[14], frame[15]]) & 0xfff } else { 0 };
        let size = wire_len;
        if !self.store_bad && oversized(size, tagged, self.long_packets, self.max_len) {
            return Verdict::Oversized;
        }
        if tagged && self.vlan_filter && self.vfta[(vid >> 5) as usize] & 1 << (vid & 0x1f) == 0 {
            return Verdict::VlanFiltered;
        }
        let d = key(dst);
        let multicast = dst[0] & 1 != 0;
        let mut pools = if d == 0xffff_ffff_ffff {
            self.bam
        } else {
            let exact = self.live_rar.iter().filter(|(m, _)| *m == d).fold(0, |a, (_, p)| a | p);
            if exact != 0 {
                exact
            } else {
                let t = if multicast { &self.mta } else { &self.uta };
                let f = self.hash_bit(dst);
                match t[(f >> 5) as usize] & 1 << (f & 0x1f) != 0 {
                    true => self.rompe,
                    false => 0,
                }
            }
        };
        if self.vlan_filter {
            let mask = match tagged {
                true => self.live_vlvf.iter().filter(|(v, _)| *v == vid).fold(0, |a, (_, p)| a | p),
                false => self.aupe,
            };
            pools &= mask;
        }
        if !multicast && pools == 0 {
            if let Some(p) = self.default_pool {
                pools = 1 << p;
            }
        }
        pools &= self.vfre;
        let mut it = pools;
        while it != 0 {
            let i = it.trailing_zeros();
            it &= it - 1;
            let o = &self.pool[i as usize];
            if oversized(size, tagged, o.long_packets, o.max_len & 0x3fff) {
                pools &= !(1 << i);
            }
        }
        match pools {
            0 => Verdict::NoPool,
            p => Verdict::Pools(p),
        }
    }
}

/// The 82576's length rule: with LPE, the frame plus its 4-byte FCS must fit `max_len`;
/// without, the payload must fit 1500 bytes.
#[inline(always)]
fn oversized(size: usize, tagged: bool, long_packets: bool, max_len: u16) -> bool {
    match long_packets {
        true => size + 4 > max_len as usize,
        false => size > 14 + 4 * tagged as usize + 1500,
    }
}

/// The classifier's state as register contents (for checking against a register-level
/// model). Bit-exact encodings of the 82576's registers are [`Registers::rah`] and friends.
#[derive(Clone, Debug)]
pub struct Registers {
    /// Receive-address entries.
    pub rar: Vec<Option<RarEntry>>,
    /// VLAN filter entries.
    pub vlvf: Vec<Option<VlvfEntry>>,
    /// Pool options.
    pub pool: Vec<PoolOptions>,
    /// Default pool.
    pub default_pool: Option<u8>,
    /// RCTL.VFE.
    pub vlan_filter: bool,
    /// The VLAN filter table.
    pub vfta: [u32; 128],
    /// The multicast hash table.
    pub mta: [u32; 128],
    /// The unicast hash table.
    pub uta: [u32; 128],
    /// RCTL.MO.
    pub mo: u8,
    /// RCTL.LPE.
    pub long_packets: bool,
    /// RLPML.
    pub max_len: u16,
    /// RCTL.SBP.
    pub store_bad: bool,
}

impl Registers {
    /// RAL and RAH of entry `i` (82576 layout: pools in RAH bits 25:18).
    pub fn ral_rah(&self, i: usize) -> (u32, u32) {
        use crate::regs::{RAH_AV, RAH_POOL_1, RAH_POOL_MASK};
        match self.rar.get(i).copied().flatten() {
            None => (0, 0),
            Some(e) => {
                let m = e.mac;
                let ral = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
                let pools = (e.pools as u32).wrapping_mul(RAH_POOL_1) & RAH_POOL_MASK;
                (ral, u32::from(u16::from_le_bytes([m[4], m[5]])) | pools | RAH_AV)
            }
        }
    }

    /// VLVF entry `i`.
    pub fn vlvf_reg(&self, i: usize) -> u32 {
        use crate::regs::{VLVF_POOLSEL_MASK, VLVF_POOLSEL_SHIFT, VLVF_VLANID_ENABLE, VLVF_VLANID_MASK};
        match self.vlvf.get(i).copied().flatten() {
            None => 0,
            Some(e) => {
                let pools = ((e.pools as u32) << VLVF_POOLSEL_SHIFT) & VLVF_POOLSEL_MASK;
                (u32::from(e.vid) & VLVF_VLANID_MASK) | pools | VLVF_VLANID_ENABLE
            }
        }
    }

    /// VMOLR of pool `i`.
    pub fn vmolr(&self, i: usize) -> u32 {
        use crate::regs::*;
        let o = self.pool.get(i).copied().unwrap_or_default();
        let bit = |on: bool, b: u32| if on { b } else { 0 };
        (u32::from(o.max_len) & VMOLR_RLPML_MASK)
            | bit(o.long_packets, VMOLR_LPE)
            | bit(o.accept_untagged, VMOLR_AUPE)
            | bit(o.accept_hashed, VMOLR_ROMPE)
            | bit(o.accept_broadcast, VMOLR_BAM)
            | bit(o.strip_vlan, VMOLR_STRVLAN)
    }

    /// VFRE: the pools enabled for receive.
    pub fn vfre(&self) -> u32 {
        self.pool.iter().enumerate().filter(|(_, o)| o.enabled).fold(0, |m, (i, _)| m | 1 << i)
    }

    /// VT_CTL.
    pub fn vt_ctl(&self) -> u32 {
        use crate::regs::{VT_CTL_DEFAULT_POOL_MASK, VT_CTL_DEFAULT_POOL_SHIFT, VT_CTL_DISABLE_DEF_POOL};
        match self.default_pool {
            Some(p) => (u32::from(p) << VT_CTL_DEFAULT_POOL_SHIFT) & VT_CTL_DEFAULT_POOL_MASK,
            None => VT_CTL_DISABLE_DEF_POOL,
        }
    }

    /// RCTL (the bits the classifier reads).
    pub fn rctl(&self) -> u32 {
        use crate::regs::{RCTL_LPE, RCTL_MO_SHIFT, RCTL_SBP, RCTL_VFE};
        let bit = |on: bool, b: u32| if on { b } else { 0 };
        bit(self.vlan_filter, RCTL_VFE)
            | bit(self.long_packets, RCTL_LPE)
            | bit(self.store_bad, RCTL_SBP)
            | u32::from(self.mo) << RCTL_MO_SHIFT
    }
}

#[cfg(test)]
mod tests;
