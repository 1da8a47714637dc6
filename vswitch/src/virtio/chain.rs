//! Walking a descriptor chain into translated, bounds-checked segments.
//!
//! What a bad chain gets: the walk stops at the first problem and says which; the caller
//! returns the head to the used ring with length 0 and counts a malformed drop. Nothing is read
//! from or written to a buffer before its whole chain has passed every check.

use iommu::{AddressSpace, RegionHint};

use super::ring::{Desc, SplitRing, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, MAX_RING_SIZE};

/// Most buffers one packet may span. Linux and DPDK use one or two for frames without
/// offloads; a chain that needs more is refused rather than walked without bound.
pub const MAX_SEGS: usize = 16;

/// One translated buffer: a host pointer into the guest's memory and its length.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    /// Host address of the first byte.
    pub ptr: *mut u8,
    /// Length in bytes (≥ 1).
    pub len: u32,
}

impl Default for Seg {
    fn default() -> Self {
        Seg { ptr: std::ptr::null_mut(), len: 0 }
    }
}

/// Why a chain was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// head index outside the descriptor table
    #[error("head index outside the descriptor table")]
    BadHead,
    /// `next` outside the descriptor table
    #[error("next index outside the descriptor table")]
    BadNext,
    /// more descriptors than the table holds: a loop
    #[error("chain longer than its table (a loop)")]
    Loop,
    /// a buffer outside the guest's memory
    #[error("buffer outside the guest's memory")]
    BadAddress,
    /// a device-writable buffer in a chain the device should read, or the reverse
    #[error("buffer with the wrong direction")]
    WrongDirection,
    /// a zero-length buffer
    #[error("zero-length buffer")]
    ZeroLength,
    /// more buffers than a packet may span
    #[error("more than {MAX_SEGS} buffers")]
    TooManySegments,
    /// an indirect table that is not allowed, misshapen, or nested
    #[error("bad indirect descriptor table")]
    BadIndirect,
    /// more bytes than the largest packet
    #[error("chain larger than the largest packet")]
    TooBig,
}

/// Translated segments of one chain.
#[derive(Clone, Copy, Debug)]
pub struct Chain {
    /// Number of valid entries in the caller's segment array.
    pub nseg: u8,
    /// Total bytes.
    pub len: u32,
}

/// Walks the chain at `head`. `write` is the direction every buffer must have (true for
/// buffers the device fills). `max_len` bounds the total; `segs` bounds the buffer count
/// (never more than [`MAX_SEGS`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn walk_chain(
    ring: &SplitRing,
    mem: &AddressSpace,
    hint: &mut RegionHint,
    head: u16,
    write: bool,
    indirect_ok: bool,
    max_len: u32,
    segs: &mut [Seg],
) -> Result<Chain, ChainError> {
    if head >= ring.size() {
        return Err(ChainError::BadHead);
    }
    let d = ring.desc(head);
    let plain = if write { DESC_F_WRITE } else { 0 };
    if d.flags == plain {
        // The common case: one buffer holding header and frame.
        if d.len == 0 {
            return Err(ChainError::ZeroLength);
        }
        if d.len > max_len {
            return Err(ChainError::TooBig);
        }
        let p = mem.translate(d.addr, d.len, hint).ok_or(ChainError::BadAddress)?;
        let Some(s0) = segs.first_mut() else { return Err(ChainError::TooManySegments) };
        *s0 = Seg { ptr: p.as_ptr(), len: d.len };
        return Ok(Chain { nseg: 1, len: d.len });
    }
    walk_slow(ring, mem, hint, d, write, indirect_ok, max_len, segs)
}

struct Acc<'a> {
    segs: &'a mut [Seg],
    n: usize,
    total: u32,
    write: bool,
    max_len: u32,
}

impl Acc<'_> {
    fn add(&mut self, mem: &AddressSpace, hint: &mut RegionHint, d: &Desc) -> Result<(), ChainError> {
        if (d.flags & DESC_F_WRITE != 0) != self.write {
            return Err(ChainError::WrongDirection);
        }
        if d.len == 0 {
            return Err(ChainError::ZeroLength);
        }
        let total = self.total.checked_add(d.len).filter(|t| *t <= self.max_len);
        self.total = total.ok_or(ChainError::TooBig)?;
        if self.n == self.segs.len().min(MAX_SEGS) {
            return Err(ChainError::TooManySegments);
        }
        let p = mem.translate(d.addr, d.len, hint).ok_or(ChainError::BadAddress)?;
        self.segs[self.n] = Seg { ptr: p.as_ptr(), len: d.len };
        self.n += 1;
        Ok(())
    }

    fn done(self) -> Chain {
        Chain { nseg: self.n as u8, len: self.total }
    }
}

#[cold]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn walk_slow(
    ring: &SplitRing,
    mem: &AddressSpace,
    hint: &mut RegionHint,
    first: Desc,
    write: bool,
    indirect_ok: bool,
    max_len: u32,
    segs: &mut [Seg],
) -> Result<Chain, ChainError> {
    let mut acc = Acc { segs, n: 0, total: 0, write, max_len };
    let mut d = first;
    let mut ttl = ring.size();
    loop {
        if d.flags & DESC_F_INDIRECT != 0 {
            // An indirect descriptor must end the chain (virtio 2.7.5.3.1).
            if !indirect_ok || d.flags & DESC_F_NEXT != 0 {
                return Err(ChainError::BadIndirect);
            }
            walk_indirect(mem, hint, &d, &mut acc)?;
            return Ok(acc.done());
        }
        acc.add(mem, hint, &d)?;
        if d.flags & DESC_F_NEXT == 0 {
            return Ok(acc.done());
        }
        ttl -= 1;
        if ttl == 0 {
            return Err(ChainError::Loop);
        }
        if d.next >= ring.size() {
            return Err(ChainError::BadNext);
        }
        d = ring.desc(d.next);
    }
}

fn walk_indirect(
    mem: &AddressSpace,
    hint: &mut RegionHint,
    ind: &Desc,
    acc: &mut Acc<'_>,
) -> Result<(), ChainError> {
    let count = ind.len / 16;
    if ind.len % 16 != 0 || count == 0 || count > MAX_RING_SIZE as u32 {
        return Err(ChainError::BadIndirect);
    }
    let table = mem.translate(ind.addr, ind.len, hint).ok_or(ChainError::BadIndirect)?;
    let read = |i: u32| -> Desc {
        // SAFETY: i < count and the table's count*16 bytes were translated as one range.
        // Unaligned volatile read: nothing obliges the guest to align an indirect table.
        let raw: [u8; 16] = unsafe { (table.as_ptr().add(i as usize * 16) as *const [u8; 16]).read_volatile() };
        Desc {
            addr: u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default()),
            len: u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()),
            flags: u16::from_le_bytes([raw[12], raw[13]]),
            next: u16::from_le_bytes([raw[14], raw[15]]),
        }
    };
    let mut i = 0u32;
    let mut ttl = count;
    loop {
        let d = read(i);
        if d.flags & DESC_F_INDIRECT != 0 {
            return Err(ChainError::BadIndirect);
        }
        acc.add(mem, hint, &d)?;
        if d.flags & DESC_F_NEXT == 0 {
            return Ok(());
        }
        ttl -= 1;
        if ttl == 0 {
            return Err(ChainError::Loop);
        }
        if d.next as u32 >= count {
            return Err(ChainError::BadNext);
        }
        i = d.next as u32;
    }
}
