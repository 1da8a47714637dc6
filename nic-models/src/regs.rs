//! The 82576's receive-filtering registers, by their datasheet names (Intel 82576 GbE
//! Controller Datasheet, sections 7.10 and 8.10-8.13; the bit values as QEMU's
//! `hw/net/igb_regs.h` and Linux's `drivers/net/ethernet/intel/igb/e1000_82575.h` define them).
//!
//! The classifier keeps its tables typed ([`crate::classify::Classifier`]); this register view
//! exists so the model can be checked against QEMU's igb, which works on the register file, and
//! so a driver-style programming interface can be added without a second vocabulary.

/// RCTL: VLAN filter enable (the VFTA is consulted for tagged frames).
pub const RCTL_VFE: u32 = 0x0004_0000;
/// RCTL: long packet enable (frames up to RLPML instead of 1518/1522 bytes).
pub const RCTL_LPE: u32 = 0x0000_0020;
/// RCTL: store bad packets (no oversize check).
pub const RCTL_SBP: u32 = 0x0000_0004;
/// RCTL: multicast offset (which 12 destination-address bits index the MTA/UTA), bits 13:12.
pub const RCTL_MO_SHIFT: u32 = 12;

/// RAH: address valid.
pub const RAH_AV: u32 = 0x8000_0000;
/// RAH: pool select bits (82576: 8 pools, bits 25:18).
pub const RAH_POOL_MASK: u32 = 0x03FC_0000;
/// RAH: pool 0's bit.
pub const RAH_POOL_1: u32 = 0x0004_0000;

/// VMOLR: maximum length for long packets in this pool.
pub const VMOLR_RLPML_MASK: u32 = 0x0000_3FFF;
/// VMOLR: long packets accepted by this pool.
pub const VMOLR_LPE: u32 = 0x0001_0000;
/// VMOLR: RSS inside the pool.
pub const VMOLR_RSSE: u32 = 0x0002_0000;
/// VMOLR: accept untagged packets.
pub const VMOLR_AUPE: u32 = 0x0100_0000;
/// VMOLR: accept packets that hit the MTA/UTA hash ("overflow" multicast).
pub const VMOLR_ROMPE: u32 = 0x0200_0000;
/// VMOLR: accept unicast that hits the UTA hash.
pub const VMOLR_ROPE: u32 = 0x0400_0000;
/// VMOLR: accept broadcast.
pub const VMOLR_BAM: u32 = 0x0800_0000;
/// VMOLR: strip the VLAN tag on receive.
pub const VMOLR_STRVLAN: u32 = 0x4000_0000;

/// VT_CTL: the default pool (bits 9:7).
pub const VT_CTL_DEFAULT_POOL_SHIFT: u32 = 7;
/// VT_CTL: the default pool's mask.
pub const VT_CTL_DEFAULT_POOL_MASK: u32 = 0x7 << VT_CTL_DEFAULT_POOL_SHIFT;
/// VT_CTL: unicast that matched no filter is dropped instead of going to the default pool.
pub const VT_CTL_DISABLE_DEF_POOL: u32 = 1 << 29;

/// VLVF: number of VLAN pool filters on the 82576.
pub const VLVF_ARRAY_SIZE: usize = 32;
/// VLVF: the VLAN id.
pub const VLVF_VLANID_MASK: u32 = 0x0000_0FFF;
/// VLVF: pool select bits.
pub const VLVF_POOLSEL_SHIFT: u32 = 12;
/// VLVF: pool select mask.
pub const VLVF_POOLSEL_MASK: u32 = 0xFF << VLVF_POOLSEL_SHIFT;
/// VLVF: entry valid.
pub const VLVF_VLANID_ENABLE: u32 = 0x8000_0000;

/// MRQC: VMDq (pools) enabled.
pub const MRQC_VMDQ: u32 = 1;

/// Receive address entries on the 82576: 16 in RAL/RAH and 8 more in RAL2/RAH2.
pub const RAR_ENTRIES_82576: usize = 24;
/// Pools (VMDq) on the 82576.
pub const POOLS_82576: usize = 8;

/// Which 12 bits of the destination address (bytes 4 and 5, shifted right by this) index the
/// 4096-bit MTA and UTA tables, per RCTL.MO.
pub const TA_SHIFT: [u32; 4] = [4, 3, 2, 0];
