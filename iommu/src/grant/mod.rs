//! Grant tables, with Xen's semantics: a domain grants another domain access to a range of its
//! memory, read-only or read-write, by a small integer reference; the grantee maps it
//! (reference counted) or has the hypervisor copy between two grants (`grant_copy`, the
//! operation "extreme late copy" is built on); a page can be handed over (`grant_transfer`);
//! revoking a grant is refused while it is mapped or a copy through it is in flight.
//!
//! Here "the hypervisor" is [`GrantTables`], which holds every domain's memory
//! ([`AddressSpace`]) and table; a domain is a guest (its vhost-user memory) or the switch
//! itself. Event channels ([`EventChannel`]) are eventfd pairs, as vhost-user's kick and call.

mod copy;

pub use copy::{grant_copy, read_granted, small_copy, write_granted, Direction, Grant, GrantWriter, Ro, Rw};

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use crate::fault::Access;
use crate::space::{AddressSpace, RegionHint};

/// A domain's id.
pub type DomId = u32;
/// A grant reference: an index into the granting domain's table.
pub type GrantRef = u32;
/// Most grants a domain may have at once.
pub const MAX_GRANTS: usize = 4096;
/// The page a transfer moves.
pub const TRANSFER_PAGE: u32 = 4096;

/// Why a grant operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// unknown domain
    #[error("no domain {0}")]
    NoSuchDomain(DomId),
    /// domain exists
    #[error("domain {0} already exists")]
    DomainExists(DomId),
    /// bad reference
    #[error("domain {dom} has no grant {gref}")]
    BadRef {
        /// Granting domain.
        dom: DomId,
        /// Reference.
        gref: GrantRef,
    },
    /// caller is not the grantee
    #[error("grant {gref} of domain {dom} is not granted to domain {caller}")]
    NotGrantee {
        /// Granting domain.
        dom: DomId,
        /// Reference.
        gref: GrantRef,
        /// Who asked.
        caller: DomId,
    },
    /// write through a read-only grant
    #[error("grant {gref} of domain {dom} is read-only")]
    ReadOnly {
        /// Granting domain.
        dom: DomId,
        /// Reference.
        gref: GrantRef,
    },
    /// offset/length past the grant
    #[error("{len} bytes at offset {offset} run past grant {gref} of domain {dom}")]
    OutOfRange {
        /// Granting domain.
        dom: DomId,
        /// Reference.
        gref: GrantRef,
        /// Offset asked.
        offset: u32,
        /// Length asked.
        len: u32,
    },
    /// revoke while mapped
    #[error("grant {gref} of domain {dom} is still mapped or in use ({users} users); unmap it first")]
    InUse {
        /// Granting domain.
        dom: DomId,
        /// Reference.
        gref: GrantRef,
        /// Mappings and copies in flight.
        users: u32,
    },
    /// range not in the granter's memory
    #[error("domain {dom} cannot grant {len} bytes at {gpa:#x}: not inside one of its memory regions")]
    NotInMemory {
        /// Granting domain.
        dom: DomId,
        /// Address.
        gpa: u64,
        /// Length.
        len: u32,
    },
    /// table full
    #[error("domain {0}'s grant table is full")]
    TableFull(DomId),
    /// not a transfer slot / wrong use
    #[error("grant {gref} of domain {dom} is not an open transfer slot for domain {caller}")]
    NotTransferSlot {
        /// Receiving domain.
        dom: DomId,
        /// Reference.
        gref: GrantRef,
        /// Who tried to transfer.
        caller: DomId,
    },
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Access to `[gpa, gpa + len)`.
    Access { readonly: bool },
    /// Ready to receive a page from the grantee at `gpa`; `done` once it has.
    AcceptTransfer { done: bool },
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    grantee: DomId,
    gpa: u64,
    len: u32,
    kind: Kind,
    /// Mappings plus copies in flight.
    users: u32,
}

/// A domain: its memory and its grant table.
pub struct Domain {
    id: DomId,
    mem: Mutex<Arc<AddressSpace>>,
    table: Mutex<Vec<Option<Entry>>>,
}

impl Domain {
    /// Its id.
    pub fn id(&self) -> DomId {
        self.id
    }

    fn mem(&self) -> Arc<AddressSpace> {
        self.mem.lock().map(|m| m.clone()).unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Replaces its memory (a new vhost-user memory table). Mappings and copies in flight keep
    /// the memory they started with mapped until they end.
    pub fn set_memory(&self, mem: Arc<AddressSpace>) {
        if let Ok(mut m) = self.mem.lock() {
            *m = mem;
        }
    }

    fn insert(&self, e: Entry) -> Result<GrantRef, GrantError> {
        let mut t = self.table.lock().map_err(|_| GrantError::TableFull(self.id))?;
        let free = t.iter().position(Option::is_none);
        let i = match free {
            Some(i) => i,
            None if t.len() < MAX_GRANTS => {
                t.push(None);
                t.len() - 1
            }
            None => return Err(GrantError::TableFull(self.id)),
        };
        t[i] = Some(e);
        Ok(i as GrantRef)
    }

    /// Grants `grantee` access to `[gpa, gpa + len)` of this domain's memory.
    pub fn grant_access(
        &self,
        grantee: DomId,
        gpa: u64,
        len: u32,
        readonly: bool,
    ) -> Result<GrantRef, GrantError> {
        let mut hint: RegionHint = 0;
        if len == 0 || self.mem().translate(gpa, len, &mut hint).is_none() {
            return Err(GrantError::NotInMemory { dom: self.id, gpa, len });
        }
        self.insert(Entry { grantee, gpa, len, kind: Kind::Access { readonly }, users: 0 })
    }

    /// Offers the page at `gpa` to receive a page that `from` transfers.
    pub fn grant_transfer_slot(&self, from: DomId, gpa: u64) -> Result<GrantRef, GrantError> {
        let mut hint: RegionHint = 0;
        if self.mem().translate(gpa, TRANSFER_PAGE, &mut hint).is_none() {
            return Err(GrantError::NotInMemory { dom: self.id, gpa, len: TRANSFER_PAGE });
        }
        self.insert(Entry {
            grantee: from,
            gpa,
            len: TRANSFER_PAGE,
            kind: Kind::AcceptTransfer { done: false },
            users: 0,
        })
    }

    /// Whether the transfer slot `gref` has received its page.
    pub fn transfer_done(&self, gref: GrantRef) -> bool {
        let t = self.table.lock().ok();
        matches!(
            t.as_ref().and_then(|t| t.get(gref as usize).copied().flatten()).map(|e| e.kind),
            Some(Kind::AcceptTransfer { done: true })
        )
    }

    /// Revokes a grant; refused while it is mapped or a copy through it is in flight.
    pub fn end_access(&self, gref: GrantRef) -> Result<(), GrantError> {
        let mut t = self.table.lock().map_err(|_| GrantError::BadRef { dom: self.id, gref })?;
        let slot = t.get_mut(gref as usize).ok_or(GrantError::BadRef { dom: self.id, gref })?;
        match slot {
            None => Err(GrantError::BadRef { dom: self.id, gref }),
            Some(e) if e.users > 0 => Err(GrantError::InUse { dom: self.id, gref, users: e.users }),
            Some(_) => {
                *slot = None;
                Ok(())
            }
        }
    }

    /// Takes a use of `gref` for `caller` (checks grantee, range and direction); returns the
    /// host pointer of `[offset, offset + len)` and the memory that keeps it mapped.
    fn pin(
        &self,
        caller: DomId,
        gref: GrantRef,
        offset: u32,
        len: u32,
        access: Access,
    ) -> Result<(NonNull<u8>, Arc<AddressSpace>), GrantError> {
        let dom = self.id;
        let mut t = self.table.lock().map_err(|_| GrantError::BadRef { dom, gref })?;
        let e = t.get_mut(gref as usize).and_then(Option::as_mut).ok_or(GrantError::BadRef { dom, gref })?;
        if e.grantee != caller {
            return Err(GrantError::NotGrantee { dom, gref, caller });
        }
        let Kind::Access { readonly } = e.kind else { return Err(GrantError::BadRef { dom, gref }) };
        if readonly && access == Access::Write {
            return Err(GrantError::ReadOnly { dom, gref });
        }
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > e.len) {
            return Err(GrantError::OutOfRange { dom, gref, offset, len });
        }
        let mem = self.mem();
        let mut hint: RegionHint = 0;
        // The grant was inside memory when made; a later memory table may have dropped it.
        let p = mem.translate(e.gpa + offset as u64, len, &mut hint).ok_or(GrantError::NotInMemory {
            dom,
            gpa: e.gpa + offset as u64,
            len,
        })?;
        e.users += 1;
        Ok((p, mem))
    }

    fn unpin(&self, gref: GrantRef) {
        if let Ok(mut t) = self.table.lock() {
            if let Some(Some(e)) = t.get_mut(gref as usize) {
                e.users = e.users.saturating_sub(1);
            }
        }
    }
}

/// One side of a grant copy: `len` bytes at `offset` inside grant `gref` of domain `dom`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopySide {
    /// Granting domain.
    pub dom: DomId,
    /// Its grant.
    pub gref: GrantRef,
    /// Offset into the granted range.
    pub offset: u32,
}

/// A mapping of a grant into the grantee. The grant cannot be revoked while this lives.
pub struct GrantMapping {
    dom: Arc<Domain>,
    gref: GrantRef,
    ptr: NonNull<u8>,
    len: u32,
    writable: bool,
    _mem: Arc<AddressSpace>,
}

// SAFETY: the pointer is into memory kept mapped by `_mem`; access goes through bounds-checked
// copies below.
unsafe impl Send for GrantMapping {}

impl GrantMapping {
    /// Bytes mapped.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether nothing is mapped (never: grants are at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies out `out.len()` bytes at `offset`; false if that runs past the mapping.
    pub fn read(&self, offset: u32, out: &mut [u8]) -> bool {
        if (offset as u64 + out.len() as u64) > self.len as u64 {
            return false;
        }
        // SAFETY: inside the mapping (checked above), which `_mem` keeps mapped.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset as usize), out.as_mut_ptr(), out.len())
        };
        true
    }

    /// Copies `data` in at `offset`; false if read-only or past the mapping.
    pub fn write(&self, offset: u32, data: &[u8]) -> bool {
        if !self.writable || (offset as u64 + data.len() as u64) > self.len as u64 {
            return false;
        }
        // SAFETY: as for `read`, and the grant allows writes.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset as usize), data.len())
        };
        true
    }
}

impl Drop for GrantMapping {
    fn drop(&mut self) {
        self.dom.unpin(self.gref);
    }
}

/// The hypervisor side: every domain, and the operations between them.
#[derive(Default)]
pub struct GrantTables {
    domains: Mutex<HashMap<DomId, Arc<Domain>>>,
}

impl GrantTables {
    /// No domains.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a domain with its memory.
    pub fn add_domain(&self, id: DomId, mem: Arc<AddressSpace>) -> Result<Arc<Domain>, GrantError> {
        let mut d = self.domains.lock().map_err(|_| GrantError::NoSuchDomain(id))?;
        if d.contains_key(&id) {
            return Err(GrantError::DomainExists(id));
        }
        let dom = Arc::new(Domain { id, mem: Mutex::new(mem), table: Mutex::new(Vec::new()) });
        d.insert(id, dom.clone());
        Ok(dom)
    }

    /// A domain by id.
    pub fn domain(&self, id: DomId) -> Result<Arc<Domain>, GrantError> {
        self.domains.lock().ok().and_then(|d| d.get(&id).cloned()).ok_or(GrantError::NoSuchDomain(id))
    }

    /// Maps grant `gref` of `granter` for `caller` (who must be its grantee).
    pub fn map(
        &self,
        caller: DomId,
        granter: DomId,
        gref: GrantRef,
        access: Access,
    ) -> Result<GrantMapping, GrantError> {
        let dom = self.domain(granter)?;
        let len = {
            let t = dom.table.lock().map_err(|_| GrantError::BadRef { dom: granter, gref })?;
            t.get(gref as usize).copied().flatten().ok_or(GrantError::BadRef { dom: granter, gref })?.len
        };
        let (ptr, mem) = dom.pin(caller, gref, 0, len, access)?;
        Ok(GrantMapping { dom, gref, ptr, len, writable: access == Access::Write, _mem: mem })
    }

    /// Copies `len` bytes from one grant to another on behalf of `caller`, the grantee of both:
    /// the copy a backend asks the hypervisor for, and the late copy's primitive. Both grants
    /// are pinned for the copy, so neither can be revoked under it.
    pub fn copy(&self, caller: DomId, src: CopySide, dst: CopySide, len: u32) -> Result<(), GrantError> {
        let sd = self.domain(src.dom)?;
        let dd = self.domain(dst.dom)?;
        let (sp, _smem) = sd.pin(caller, src.gref, src.offset, len, Access::Read)?;
        let (dp, _dmem) = match dd.pin(caller, dst.gref, dst.offset, len, Access::Write) {
            Ok(x) => x,
            Err(e) => {
                sd.unpin(src.gref);
                return Err(e);
            }
        };
        // SAFETY: both ranges were checked inside their grants and their memory, which the
        // pins keep mapped. `copy` (memmove) because a domain may copy within itself.
        unsafe { std::ptr::copy(sp.as_ptr(), dp.as_ptr(), len as usize) };
        sd.unpin(src.gref);
        dd.unpin(dst.gref);
        Ok(())
    }

    /// Hands the page at `gpa` of `from` over to `to`, into its open transfer slot `gref`: the
    /// page's bytes move to the receiver and the sender's copy is cleared (it no longer owns
    /// that content). The slot closes; a second transfer into it is refused.
    pub fn transfer(&self, from: DomId, gpa: u64, to: DomId, gref: GrantRef) -> Result<(), GrantError> {
        let fd = self.domain(from)?;
        let td = self.domain(to)?;
        let fmem = fd.mem();
        let mut hint: RegionHint = 0;
        let sp = fmem.translate(gpa, TRANSFER_PAGE, &mut hint).ok_or(GrantError::NotInMemory {
            dom: from,
            gpa,
            len: TRANSFER_PAGE,
        })?;
        let mut t = td.table.lock().map_err(|_| GrantError::BadRef { dom: to, gref })?;
        let e =
            t.get_mut(gref as usize).and_then(Option::as_mut).ok_or(GrantError::BadRef { dom: to, gref })?;
        let open = matches!(e.kind, Kind::AcceptTransfer { done: false });
        if !open || e.grantee != from {
            return Err(GrantError::NotTransferSlot { dom: to, gref, caller: from });
        }
        let tmem = td.mem();
        let mut hint: RegionHint = 0;
        let dp = tmem.translate(e.gpa, TRANSFER_PAGE, &mut hint).ok_or(GrantError::NotInMemory {
            dom: to,
            gpa: e.gpa,
            len: TRANSFER_PAGE,
        })?;
        // SAFETY: both pages were translated inside their domains' memory, kept mapped by
        // `fmem`/`tmem`; memmove in case a domain transfers to itself.
        unsafe {
            std::ptr::copy(sp.as_ptr(), dp.as_ptr(), TRANSFER_PAGE as usize);
            if sp != dp {
                std::ptr::write_bytes(sp.as_ptr(), 0, TRANSFER_PAGE as usize);
            }
        }
        e.kind = Kind::AcceptTransfer { done: true };
        Ok(())
    }
}

/// An event channel: two eventfds, one per end. `notify` on one end makes the other end's fd
/// readable, as vhost-user's kick and call fds do.
pub struct EventChannel {
    fds: [File; 2],
}

impl EventChannel {
    /// A new channel.
    pub fn new() -> std::io::Result<Self> {
        let mk = || {
            // SAFETY: plain syscall; the fd is owned by the File from here on.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: a fresh fd we own.
            Ok(unsafe { File::from_raw_fd(fd) })
        };
        Ok(EventChannel { fds: [mk()?, mk()?] })
    }

    /// Signals the other end of `end` (0 or 1).
    pub fn notify(&self, end: usize) -> std::io::Result<()> {
        (&self.fds[1 - (end & 1)]).write_all(&1u64.to_ne_bytes())
    }

    /// Events pending at `end` since it last looked (0 if none); clears them.
    pub fn take(&self, end: usize) -> u64 {
        let mut b = [0u8; 8];
        match (&self.fds[end & 1]).read(&mut b) {
            Ok(8) => u64::from_ne_bytes(b),
            _ => 0,
        }
    }

    /// The fd of `end`, to poll on.
    pub fn fd(&self, end: usize) -> &File {
        &self.fds[end & 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::Region;

    /// Domain memory: 64 KiB at guest address 0x10000, filled with `fill`.
    fn domain(g: &GrantTables, id: DomId, fill: u8) -> Arc<Domain> {
        let r = Region::anonymous(0x10000, 0x10000, 0x7000_0000 + id as u64 * 0x100000).unwrap();
        // SAFETY: a fresh anonymous mapping of 64 KiB.
        unsafe { std::ptr::write_bytes(r.host(), fill, 0x10000) };
        g.add_domain(id, Arc::new(AddressSpace::new(vec![r]).unwrap())).unwrap()
    }

    #[test]
    fn test_grantee_maps_and_revoke_waits_for_unmap() {
        let g = GrantTables::new();
        let a = domain(&g, 1, 0xaa);
        domain(&g, 2, 0);
        let r = a.grant_access(2, 0x11000, 256, false).unwrap();
        let m = g.map(2, 1, r, Access::Write).unwrap();
        let mut b = [0u8; 4];
        assert!(m.read(252, &mut b) && b == [0xaa; 4]);
        assert!(!m.read(253, &mut b), "past the grant");
        assert!(m.write(0, b"hi"));
        assert!(matches!(a.end_access(r), Err(GrantError::InUse { users: 1, .. })));
        drop(m);
        a.end_access(r).unwrap();
        assert!(matches!(g.map(2, 1, r, Access::Read), Err(GrantError::BadRef { .. })));
    }

    #[test]
    fn test_only_the_grantee_and_only_as_granted() {
        let g = GrantTables::new();
        let a = domain(&g, 1, 0);
        domain(&g, 2, 0);
        domain(&g, 3, 0);
        let r = a.grant_access(2, 0x10000, 100, true).unwrap();
        assert!(matches!(g.map(3, 1, r, Access::Read), Err(GrantError::NotGrantee { caller: 3, .. })));
        assert!(matches!(g.map(2, 1, r, Access::Write), Err(GrantError::ReadOnly { .. })));
        let m = g.map(2, 1, r, Access::Read).unwrap();
        assert!(!m.write(0, b"x"), "a read mapping does not write");
        assert!(matches!(a.grant_access(2, 0x1f000, 0x2000, false), Err(GrantError::NotInMemory { .. })));
        assert!(matches!(g.map(2, 9, 0, Access::Read), Err(GrantError::NoSuchDomain(9))));
    }

    #[test]
    fn test_grant_copy_moves_bytes_between_domains() {
        let g = GrantTables::new();
        let a = domain(&g, 1, 0x11);
        let b = domain(&g, 2, 0x22);
        domain(&g, 0, 0); // the switch
        let src = a.grant_access(0, 0x12000, 1500, true).unwrap();
        let dst = b.grant_access(0, 0x13000, 2048, false).unwrap();
        g.copy(
            0,
            CopySide { dom: 1, gref: src, offset: 100 },
            CopySide { dom: 2, gref: dst, offset: 12 },
            1400,
        )
        .unwrap();
        let m = g.map(0, 2, dst, Access::Read).unwrap();
        let mut out = vec![0u8; 2048];
        assert!(m.read(0, &mut out));
        assert!(out[..12].iter().all(|&x| x == 0x22));
        assert!(out[12..1412].iter().all(|&x| x == 0x11));
        assert!(out[1412..].iter().all(|&x| x == 0x22));
        drop(m);
        // Refusals: into a read-only grant, past a grant, by a stranger.
        let side = |dom, gref, offset| CopySide { dom, gref, offset };
        assert!(matches!(g.copy(0, side(2, dst, 0), side(1, src, 0), 10), Err(GrantError::ReadOnly { .. })));
        assert!(matches!(
            g.copy(0, side(1, src, 1000), side(2, dst, 0), 501),
            Err(GrantError::OutOfRange { .. })
        ));
        assert!(matches!(g.copy(2, side(1, src, 0), side(2, dst, 0), 1), Err(GrantError::NotGrantee { .. })));
        // A failed copy leaves nothing pinned.
        a.end_access(src).unwrap();
        b.end_access(dst).unwrap();
    }

    #[test]
    fn test_transfer_hands_a_page_over_once() {
        let g = GrantTables::new();
        domain(&g, 1, 0x5a);
        let b = domain(&g, 2, 0);
        let slot = b.grant_transfer_slot(1, 0x14000).unwrap();
        assert!(matches!(g.transfer(3, 0x11000, 2, slot), Err(GrantError::NoSuchDomain(3))));
        g.transfer(1, 0x11000, 2, slot).unwrap();
        assert!(b.transfer_done(slot));
        assert!(matches!(g.transfer(1, 0x11000, 2, slot), Err(GrantError::NotTransferSlot { .. })));
        // The receiver has the bytes; the sender's page is cleared.
        let a = g.domain(1).unwrap();
        let ra = a.grant_access(2, 0x11000, 4096, true).unwrap();
        let mut x = [1u8; 4096];
        assert!(g.map(2, 1, ra, Access::Read).unwrap().read(0, &mut x));
        assert!(x.iter().all(|&v| v == 0));
        let rb = b.grant_access(1, 0x14000, 4096, true).unwrap();
        assert!(g.map(1, 2, rb, Access::Read).unwrap().read(0, &mut x));
        assert!(x.iter().all(|&v| v == 0x5a));
    }

    #[test]
    fn test_event_channel_signals_the_other_end() {
        let ch = EventChannel::new().unwrap();
        assert_eq!(ch.take(1), 0);
        ch.notify(0).unwrap();
        ch.notify(0).unwrap();
        assert_eq!(ch.take(1), 2);
        assert_eq!(ch.take(1), 0);
        assert_eq!(ch.take(0), 0, "the sender's own end stays quiet");
    }
}
