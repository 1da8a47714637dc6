//! Guest address spaces for the switch and the NIC models.
//!
//! A vhost-user frontend describes its guest's memory as a table of regions, each a file
//! descriptor plus three addresses: guest-physical (what descriptors carry), frontend virtual
//! (what ring addresses carry) and an offset into the file. This crate maps those regions once,
//! keeps them in a flat table sorted by guest-physical address, and answers the only question the
//! datapath asks: "is `[gpa, gpa + len)` wholly inside one region, and if so where is it here?"
//!
//! Every guest-supplied address goes through [`AddressSpace::translate`] (or its user-address
//! twin) before it is dereferenced; nothing else in the workspace turns a guest address into a
//! pointer. Later tiers (IOVA page tables, the vhost-user IOTLB, grant tables) put their
//! translation in front of this one rather than beside it.
#![deny(missing_docs)]

pub mod dma;
pub mod fault;
pub mod grant;
pub mod guard;
pub mod iotlb;
pub mod iotlb_msg;
pub mod pagetable;
mod region;
mod space;

pub use dma::{Dma, DmaError};
pub use fault::{Access, Fault, FaultLog, FaultReason, Perm};
pub use grant::{
    grant_copy, CopySide, DomId, Domain, EventChannel, Grant, GrantError, GrantMapping, GrantRef,
    GrantTables, GrantWriter, Ro, Rw,
};
pub use iotlb::{Iotlb, IotlbEntry, IotlbError, IotlbHint};
pub use pagetable::{IoPageTable, MapError, TlbCache};
pub use region::{Backing, MemoryRegionDesc, Region, Unsealed};
pub use space::{AddressSpace, RegionHint, MAX_REGIONS};

/// Why a memory table or region was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// memory region at guest address {gpa:#x} has size 0
    #[error("memory region at guest address {gpa:#x} has size 0")]
    EmptyRegion {
        /// Guest-physical start of the region.
        gpa: u64,
    },
    /// region wraps the address space
    #[error("memory region at guest address {gpa:#x} (size {size:#x}) wraps around the address space")]
    Wraps {
        /// Guest-physical start of the region.
        gpa: u64,
        /// Size of the region.
        size: u64,
    },
    /// regions overlap
    #[error("memory regions at guest addresses {a:#x} and {b:#x} overlap")]
    Overlap {
        /// Start of the first region.
        a: u64,
        /// Start of the second region.
        b: u64,
    },
    /// the file is smaller than the region
    #[error("memory region at guest address {gpa:#x} needs {need:#x} bytes of its file but the file has only {have:#x}")]
    FileTooSmall {
        /// Guest-physical start of the region.
        gpa: u64,
        /// Bytes of file the region needs.
        need: u64,
        /// Bytes the file has.
        have: u64,
    },
    /// the file could lose pages and the policy refuses such files
    #[error("memory region at guest address {gpa:#x} ({backing}, {size} bytes) can lose pages: {why}, and a frontend that truncated it would crash the switch")]
    CanLosePages {
        /// Guest-physical start of the region.
        gpa: u64,
        /// Size of the region.
        size: u64,
        /// What backs it (`Backing::name`).
        backing: &'static str,
        /// Why it can lose pages (`Backing::why`).
        why: &'static str,
    },
    /// no guard slot left
    #[error("cannot guard memory region at guest address {gpa:#x}: {max} guarded regions are already mapped", max = guard::GUARD_SLOTS)]
    GuardFull {
        /// Guest-physical start of the region.
        gpa: u64,
    },
    /// mmap failed
    #[error("cannot map memory region at guest address {gpa:#x}: {source}")]
    Map {
        /// Guest-physical start of the region.
        gpa: u64,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// too many regions
    #[error("memory table has {0} regions, more than the {max} this switch accepts", max = space::MAX_REGIONS)]
    TooManyRegions(usize),
    /// no such region
    #[error("no memory region at guest address {0:#x} to remove")]
    NoSuchRegion(u64),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
