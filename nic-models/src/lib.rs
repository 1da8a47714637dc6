//! Modelled NICs, so the Xen talk's tiers can be measured rather than named.
//!
//! One device family, Intel's 82576/82599 (igb/ixgbe) as QEMU's `igb` and Snabb's `intel_mp`
//! describe it, with the capabilities of two tiers:
//!
//! - **Level 0**, a conventional NIC: one RX and one TX queue, checksum insert and verify, TSO
//!   segmentation and LRO coalescing ([`engines`]), adaptive interrupt moderation ([`itr`]).
//! - **Level 1**, VMDq: a classifier with finite exact-MAC and VLAN tables mapping frames to
//!   pools ([`classify`]); each pool's RX queue is a guest's own virtio receive ring, filled by
//!   the device's DMA engine through the port's IOMMU domain ([`rxq`]); broadcast, multicast,
//!   unknown unicast and whatever does not fit the tables go to the default pool, which is the
//!   switch's software path.
//!
//! ```text
//! wire ─▶ classifier ─▶ pool ─▶ RX queue = a guest's posted virtio buffers (DMA through its
//!          (RAR, VLVF,           IOMMU domain; faults counted, never trusted) ─▶ moderated
//!           VMOLR, VT_CTL)       interrupt
//!        └─▶ default pool = the switch's software path
//! ```
//!
//! - **Level 2**, direct queue pairs ([`direct`]): the device drives a guest's own transmit and
//!   receive rings (as a vDPA NIC does), enforcing the switch's source policy and shaping in
//!   the device, plugged and unplugged under a running guest through the accelerator contract.
//!
//! - **Level 3**, SR-IOV ([`sriov`]): a physical function with virtual functions, each a
//!   direct queue pair with the policy `ip link set PF vf N ...` sets (MAC, port VLAN and
//!   priority, spoof checking, trust, link state, rates), and an embedded switch that carries
//!   unicast between VFs inside the device.
//!
//! Device work is not host work: every engine counts what the silicon would do (descriptor
//! fetches and write-backs, DMA bytes and PCIe transactions, IOTLB lookups, interrupts raised
//! and suppressed) in [`account::DeviceCounters`], apart from the host's cycles.

#![deny(missing_docs)]

pub mod account;
pub mod classify;
pub mod direct;
pub mod engines;
pub mod itr;
pub mod nic;
pub mod regs;
pub mod rxq;
pub mod sriov;
pub mod txq;

pub use account::{DeviceCounters, PcieCost};
pub use classify::{Classifier, PoolMask, PoolOptions, RarEntry, TableError, TableSizes, Verdict, VlvfEntry};
pub use direct::{DirectCounters, DirectPair, Drained, Ledger, PairSetup, Phase, SourceCheck, Wire};
pub use itr::{Moderator, Profile};
pub use nic::{BindError, Level, Nic, Steer};
pub use rxq::{dma_rx, RxDrop, RxFormat, RxQueue, RxScratch};
pub use txq::{TxError, TxPoolCounters, TxScheduler};
