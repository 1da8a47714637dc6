//! [`Dma`]: how a device turns the addresses a guest hands it into host memory.
//!
//! Without a vIOMMU a guest's rings and descriptors carry guest-physical addresses, checked
//! against the memory table. With one (`VIRTIO_F_IOMMU_PLATFORM`), they carry IOVAs: each goes
//! through the IOTLB first, whose entries were resolved to host addresses when they arrived, so
//! a hit is one lookup either way. A miss is not an error: the caller asks the frontend for the
//! translation and retries. A refused access is a fault, recorded in the device's [`FaultLog`].
//!
//! Each user (a virtqueue) owns its `Dma`, IOTLB copy included, and uses it from one thread at a
//! time; whoever changes the IOTLB changes every user's copy under that user's lock, so once the
//! change is acknowledged no user can still translate through the old entry.

use std::ptr::NonNull;
use std::sync::Arc;

use crate::fault::{Access, Fault, FaultLog, FaultReason};
use crate::grant::{Direction, Grant};
use crate::iotlb::{Iotlb, IotlbHint};
use crate::space::{AddressSpace, RegionHint};

/// Why a translation did not give host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaError {
    /// The IOTLB has no entry for `iova` yet: ask the frontend, try again later.
    Miss {
        /// The address to ask for.
        iova: u64,
        /// The access wanted.
        access: Access,
    },
    /// Refused (recorded in the fault log unless it is a split the caller may still make).
    Fault(FaultReason),
}

struct Iova {
    tlb: Iotlb,
    hint: IotlbHint,
}

/// One user's translation state: the guest's memory and, with a vIOMMU, an IOTLB copy.
pub struct Dma {
    mem: Arc<AddressSpace>,
    hint: RegionHint,
    iova: Option<Box<Iova>>,
    domain: u32,
    faults: Arc<FaultLog>,
}

impl Dma {
    /// Addresses are guest-physical (descriptors) and frontend-virtual (rings).
    pub fn gpa(mem: Arc<AddressSpace>, domain: u32, faults: Arc<FaultLog>) -> Self {
        Dma { mem, hint: 0, iova: None, domain, faults }
    }

    /// Addresses are IOVAs translated by `tlb`, whose entries must have been resolved against
    /// `mem` (the host addresses they hold point into its regions, which `mem` keeps mapped).
    pub fn iova(mem: Arc<AddressSpace>, tlb: Iotlb, domain: u32, faults: Arc<FaultLog>) -> Self {
        let iova = Some(Box::new(Iova { tlb, hint: IotlbHint::default() }));
        Dma { mem, hint: 0, iova, domain, faults }
    }

    /// Another user's translator over the same memory, domain and fault log, with a copy of
    /// this one's IOTLB (a device taking over a queue: from then on, updates and invalidations
    /// must reach both copies).
    pub fn fork(&self) -> Dma {
        let iova =
            self.iova.as_ref().map(|i| Box::new(Iova { tlb: i.tlb.clone(), hint: IotlbHint::default() }));
        Dma { mem: self.mem.clone(), hint: 0, iova, domain: self.domain, faults: self.faults.clone() }
    }

    /// The IOMMU domain (the port) these translations belong to, as faults name it.
    pub fn domain(&self) -> u32 {
        self.domain
    }

    /// The guest memory behind the translations.
    pub fn mem(&self) -> &Arc<AddressSpace> {
        &self.mem
    }

    /// Whether addresses are IOVAs.
    pub fn is_iova(&self) -> bool {
        self.iova.is_some()
    }

    /// The IOTLB copy, to apply updates and invalidations to (IOVA mode only).
    pub fn iotlb_mut(&mut self) -> Option<&mut Iotlb> {
        self.iova.as_mut().map(|i| &mut i.tlb)
    }

    /// Where faults are recorded.
    pub fn faults(&self) -> &Arc<FaultLog> {
        &self.faults
    }

    /// Records a fault of this user's domain.
    #[cold]
    pub fn fault(&self, addr: u64, len: u64, access: Access, reason: FaultReason) -> DmaError {
        self.faults.record(Fault { domain: self.domain, addr, len, access, reason });
        DmaError::Fault(reason)
    }

    /// Host address of `[addr, addr + len)` (`len` ≥ 1) as one contiguous range.
    ///
    /// A range the IOVA space maps in separate pieces gives `Fault(CrossesBoundary)` without
    /// recording it: the caller may split it with [`pieces`](Self::pieces).
    #[inline(always)]
    pub fn translate(&mut self, addr: u64, len: u32, access: Access) -> Result<NonNull<u8>, DmaError> {
        match &mut self.iova {
            None => match self.mem.translate(addr, len, &mut self.hint) {
                Some(p) => Ok(p),
                None => Err(self.gpa_fault(addr, len as u64, access)),
            },
            Some(io) => {
                if let Ok((host, n)) = io.tlb.lookup(addr, len as u64, access, &mut io.hint) {
                    if n == len as u64 {
                        // A host address the IOTLB resolved inside one of `mem`'s regions.
                        if let Some(p) = NonNull::new(host as *mut u8) {
                            return Ok(p);
                        }
                    }
                }
                self.translate_iova_slow(addr, len as u64, access)
            }
        }
    }

    #[cold]
    #[inline(never)]
    fn translate_iova_slow(&mut self, addr: u64, len: u64, access: Access) -> Result<NonNull<u8>, DmaError> {
        let Some(io) = &mut self.iova else { return Err(DmaError::Fault(FaultReason::NotMapped)) };
        match io.tlb.lookup_contiguous(addr, len, access, &mut io.hint) {
            Ok(h) => NonNull::new(h as *mut u8).ok_or(DmaError::Fault(FaultReason::NotMapped)),
            Err((at, FaultReason::NotMapped)) => Err(DmaError::Miss { iova: at, access }),
            Err((_, FaultReason::CrossesBoundary)) => Err(DmaError::Fault(FaultReason::CrossesBoundary)),
            Err((at, r)) => Err(self.fault(at, len, access, r)),
        }
    }

    #[cold]
    fn gpa_fault(&self, addr: u64, len: u64, access: Access) -> DmaError {
        let mut h = 0;
        let starts_mapped = self.mem.translate(addr, 1, &mut h).is_some();
        let reason = if starts_mapped { FaultReason::CrossesBoundary } else { FaultReason::NotMapped };
        self.fault(addr, len, access, reason)
    }

    /// Translates `[addr, addr + len)` into contiguous host pieces, in order, handing each to
    /// `out` (which returns false to stop: the caller has no room for more, and this returns
    /// `Fault(CrossesBoundary)`). Guest-physical ranges must lie within one region.
    pub fn pieces(
        &mut self,
        addr: u64,
        len: u32,
        access: Access,
        mut out: impl FnMut(NonNull<u8>, u32) -> bool,
    ) -> Result<(), DmaError> {
        if self.iova.is_none() {
            let p = self.translate(addr, len, access)?;
            out(p, len);
            return Ok(());
        }
        let mut done = 0u64;
        let len = len as u64;
        while done < len {
            let at = addr.wrapping_add(done);
            let Some(io) = &mut self.iova else { break };
            let (host, n) = match io.tlb.lookup(at, len - done, access, &mut io.hint) {
                Ok(x) => x,
                Err(FaultReason::NotMapped) => return Err(DmaError::Miss { iova: at, access }),
                Err(r) => return Err(self.fault(at, len - done, access, r)),
            };
            // Merge what continues in host memory into one piece.
            let mut n = n;
            while done + n < len {
                let next = at.wrapping_add(n);
                match io.tlb.lookup(next, len - done - n, access, &mut io.hint) {
                    Ok((h, m)) if h == host + n => n += m,
                    _ => break,
                }
            }
            let Some(p) = NonNull::new(host as *mut u8) else {
                return Err(self.fault(at, n, access, FaultReason::NotMapped));
            };
            if !out(p, n as u32) {
                // The caller's limit, not a fault.
                return Err(DmaError::Fault(FaultReason::CrossesBoundary));
            }
            done += n;
        }
        Ok(())
    }

    /// Grants the device the buffer `[addr, addr + len)` for access `D`: the buffer a
    /// descriptor posts, checked as [`translate`](Self::translate) checks it.
    #[inline(always)]
    pub fn grant<D: Direction>(&mut self, addr: u64, len: u32) -> Result<Grant<D>, DmaError> {
        self.translate(addr, len, D::ACCESS).map(|p| Grant::new(p, len))
    }

    /// [`pieces`](Self::pieces) as grants for access `D`.
    pub fn grant_pieces<D: Direction>(
        &mut self,
        addr: u64,
        len: u32,
        mut out: impl FnMut(Grant<D>) -> bool,
    ) -> Result<(), DmaError> {
        self.pieces(addr, len, D::ACCESS, |p, n| out(Grant::new(p, n)))
    }

    /// Host address of a ring part at `addr` (a frontend virtual address without a vIOMMU, an
    /// IOVA with one), which must be one contiguous range.
    pub fn translate_ring(&mut self, addr: u64, len: u64, access: Access) -> Result<NonNull<u8>, DmaError> {
        match &mut self.iova {
            None => match self.mem.translate_uva(addr, len) {
                Some(p) => Ok(p),
                None => Err(self.fault(addr, len, access, FaultReason::NotMapped)),
            },
            Some(io) => match io.tlb.lookup_contiguous(addr, len, access, &mut io.hint) {
                Ok(h) => NonNull::new(h as *mut u8).ok_or(DmaError::Fault(FaultReason::NotMapped)),
                Err((at, FaultReason::NotMapped)) => Err(DmaError::Miss { iova: at, access }),
                Err((at, r)) => Err(self.fault(at, len, access, r)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IotlbEntry, Perm, Region};

    const UVA: u64 = 0x7f00_0000;

    fn setup(iova: bool) -> (Dma, u64) {
        let r = Region::anonymous(0x10_0000, 0x10000, UVA).unwrap();
        let base = r.host() as u64;
        let mem = Arc::new(AddressSpace::new(vec![r]).unwrap());
        let faults = Arc::new(FaultLog::default());
        if !iova {
            return (Dma::gpa(mem, 7, faults), base);
        }
        let mut tlb = Iotlb::default();
        let resolve = |u: u64, s: u64| mem.translate_uva(u, s).map(|p| p.as_ptr() as u64);
        // IOVA 0x1000.. → two adjacent pages, then IOVA 0x3000 → a page far away, read-only.
        tlb.update(IotlbEntry { iova: 0x1000, size: 0x1000, uaddr: UVA, perm: Perm::RW }, resolve).unwrap();
        tlb.update(IotlbEntry { iova: 0x2000, size: 0x1000, uaddr: UVA + 0x1000, perm: Perm::RW }, resolve)
            .unwrap();
        tlb.update(IotlbEntry { iova: 0x3000, size: 0x1000, uaddr: UVA + 0x8000, perm: Perm::RO }, resolve)
            .unwrap();
        (Dma::iova(mem, tlb, 7, faults), base)
    }

    #[test]
    fn test_gpa_translation_and_fault_record() {
        let (mut d, base) = setup(false);
        assert_eq!(d.translate(0x10_0010, 16, Access::Read).unwrap().as_ptr() as u64, base + 0x10);
        assert_eq!(d.translate(0x20_0000, 1, Access::Write), Err(DmaError::Fault(FaultReason::NotMapped)));
        assert_eq!(
            d.translate(0x10_fff0, 0x20, Access::Read),
            Err(DmaError::Fault(FaultReason::CrossesBoundary))
        );
        assert_eq!(d.faults().counts(), (1, 0, 1));
        assert_eq!(d.faults().recent()[0].domain, 7);
        assert_eq!(d.translate_ring(UVA + 0x100, 64, Access::Read).unwrap().as_ptr() as u64, base + 0x100);
    }

    #[test]
    fn test_iova_hits_misses_and_faults() {
        let (mut d, base) = setup(true);
        assert_eq!(d.translate(0x1010, 16, Access::Write).unwrap().as_ptr() as u64, base + 0x10);
        // Contiguous across the page boundary: one range.
        assert_eq!(d.translate(0x1ff0, 0x20, Access::Read).unwrap().as_ptr() as u64, base + 0xff0);
        assert_eq!(
            d.translate(0x5000, 1, Access::Read),
            Err(DmaError::Miss { iova: 0x5000, access: Access::Read })
        );
        assert_eq!(d.translate(0x3000, 1, Access::Write), Err(DmaError::Fault(FaultReason::Permission)));
        // Not contiguous: not one range, and not a recorded fault (it can be split).
        assert_eq!(
            d.translate(0x2ff0, 0x20, Access::Read),
            Err(DmaError::Fault(FaultReason::CrossesBoundary))
        );
        assert_eq!(d.faults().counts(), (0, 1, 0), "misses are not faults");
        let mut got = vec![];
        d.pieces(0x1ff0, 0x1020, Access::Read, |p, n| {
            got.push((p.as_ptr() as u64 - base, n));
            true
        })
        .unwrap();
        assert_eq!(got, vec![(0xff0, 0x1010), (0x8000, 0x10)]);
        assert_eq!(
            d.pieces(0x3ff0, 0x20, Access::Read, |_, _| true),
            Err(DmaError::Miss { iova: 0x4000, access: Access::Read })
        );
        assert!(d.pieces(0x2ff0, 0x20, Access::Read, |_, _| false).is_err(), "no room for a second piece");
        assert_eq!(
            d.translate_ring(0x2f00, 0x200, Access::Read),
            Err(DmaError::Fault(FaultReason::CrossesBoundary))
        );
        assert_eq!(d.translate_ring(0x1000, 0x2000, Access::Write).unwrap().as_ptr() as u64, base);
    }
}
