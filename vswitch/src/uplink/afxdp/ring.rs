//! One AF_XDP socket's two halves as the polling threads use them: the receive half (RX and
//! fill rings) is a queue's source, the transmit half (TX and completion rings) its sink.
//! Each half owns its own chunks of the socket's UMEM, so the two never share a ring.

use std::ptr::NonNull;
use std::sync::Arc;

use iommu::Grant;
use xdpilone::xdp::XdpDesc;
use xdpilone::{CompletionQueue, FillQueue, RingRx, RingTx, Umem};

use crate::limits::BURST;
use crate::uplink::soft::Soft;
use crate::uplink::tap::{Recv, Sent, VNET_HDR};

/// `XDP_PKT_CONTD`: more of this frame follows in the next descriptor (multi-buffer).
pub const XDP_PKT_CONTD: u32 = 1;
/// Chunk size: a page, the largest the kernel takes for a UMEM of ordinary pages.
pub const CHUNK: u32 = 4096;
/// Where the kernel puts a received frame in its chunk (`XDP_PACKET_HEADROOM`): the switch
/// writes its virtio-net header into the bytes before it.
pub const RX_HEADROOM: u32 = 256;
/// Most chunks one frame may take (the kernel's `MAX_SKB_FRAGS` + 1).
pub const MAX_FRAGS: usize = 18;

/// A socket's UMEM: an anonymous mapping the kernel pinned, and its registration.
pub struct Area {
    base: NonNull<u8>,
    len: usize,
    /// The registration (its socket is the queue's socket); kept as long as the area.
    pub umem: Umem,
}

// SAFETY: the area is plain memory; which half touches which chunk is decided by the rings
// (a chunk is the kernel's, the receive half's or the transmit half's at any time).
unsafe impl Send for Area {}
// SAFETY: as above.
unsafe impl Sync for Area {}

impl Area {
    /// Maps `chunks` chunks and registers them with the kernel (`config` says how).
    pub fn new(chunks: u32, config: xdpilone::UmemConfig) -> std::io::Result<Arc<Area>> {
        let len = chunks as usize * CHUNK as usize;
        // SAFETY: a fresh anonymous private mapping; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>()).expect("mmap gave a mapping");
        let area = NonNull::slice_from_raw_parts(base, len);
        // SAFETY: the mapping is page-aligned, `len` long, and outlives the registration (both
        // live in this Area, which unmaps on drop after the Umem's socket reference is gone;
        // the kernel keeps its own pin while any socket holds the UMEM).
        let umem =
            unsafe { Umem::new(config, area) }.map_err(|e| std::io::Error::from_raw_os_error(e.get_raw()));
        let umem = match umem {
            Ok(u) => u,
            Err(e) => {
                // SAFETY: our mapping, not registered.
                unsafe { libc::munmap(p, len) };
                return Err(e);
            }
        };
        Ok(Arc::new(Area { base, len, umem }))
    }

    /// The bytes at UMEM address `addr`, `len` long, if inside the area.
    #[inline(always)]
    fn at(&self, addr: u64, len: usize) -> Option<*mut u8> {
        let a = usize::try_from(addr).ok()?;
        (a.checked_add(len)? <= self.len).then(|| {
            // SAFETY: inside the mapping (checked).
            unsafe { self.base.as_ptr().add(a) }
        })
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: our mapping; nothing of ours points into it any more (both halves hold this
        // Area and are gone), and the kernel's pin keeps the pages it may still use.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The receive half: the RX ring, and the fill ring that hands the kernel free chunks.
pub struct XskRx {
    area: Arc<Area>,
    rx: RingRx,
    fill: FillQueue,
    /// Chunks of frames handed out, given back to the fill ring when the next burst starts.
    used: Vec<u64>,
    /// This burst's frames: where (UMEM address of the 12-byte header, or a staging buffer
    /// index as `u64::MAX - k`) and length with the header; `None`: dropped (cut, malformed).
    got: [Option<(u64, u32)>; BURST],
    count: usize,
    next: usize,
    /// Staging buffers for multi-buffer frames (jumbo frames), a burst of `stage_len`.
    stage: Vec<u8>,
    stage_len: usize,
}

/// The transmit half: the TX ring, and the completion ring that gives sent chunks back.
pub struct XskTx {
    area: Arc<Area>,
    tx: RingTx,
    comp: CompletionQueue,
    /// Chunks free to fill.
    free: Vec<u64>,
    /// Descriptors committed since the last kick.
    queued: u32,
    /// Whether a frame may take several chunks (the socket is bound with `XDP_USE_SG`).
    sg: bool,
    soft: Soft,
    broken: bool,
}

impl XskRx {
    /// The receive half over `rx` and `fill`, with `chunks` (UMEM addresses) to post;
    /// `max_frame`: the largest frame the device may hand over (the stage for multi-buffer
    /// frames is only made when one chunk cannot hold it).
    pub fn new(area: Arc<Area>, rx: RingRx, mut fill: FillQueue, chunks: Vec<u64>, max_frame: usize) -> Self {
        let mut w = fill.fill(chunks.len() as u32);
        let n = w.insert(chunks.iter().copied()) as usize;
        w.commit();
        drop(w);
        let stage_len = VNET_HDR as usize + max_frame;
        let jumbo = max_frame > (CHUNK - RX_HEADROOM) as usize;
        XskRx {
            area,
            rx,
            fill,
            used: chunks[n..].to_vec(),
            got: [None; BURST],
            count: 0,
            next: 0,
            stage: if jumbo { vec![0u8; stage_len * BURST] } else { Vec::new() },
            stage_len,
        }
    }

    /// Gives the chunks of the last burst back to the kernel.
    fn refill(&mut self) {
        if self.used.is_empty() {
            return;
        }
        let mut w = self.fill.fill(self.used.len() as u32);
        let n = w.insert(self.used.iter().copied()) as usize;
        w.commit();
        drop(w);
        self.used.drain(..n);
        if self.fill.needs_wakeup() {
            self.fill.wake();
        }
    }

    /// Frame `i` of the burst (`i == 0` starts one: the previous burst's chunks go back to the
    /// fill ring and up to a burst of frames is taken from the RX ring).
    #[inline]
    pub fn recv(&mut self, i: usize) -> Recv {
        if self.next == self.count {
            if i != 0 {
                return Recv::Empty;
            }
            self.refill();
            self.take();
            if self.count == 0 {
                return Recv::Empty;
            }
        }
        let k = self.next;
        self.next += 1;
        let Some((at, len)) = self.got[k] else { return Recv::Truncated };
        let p = if at > u64::MAX - BURST as u64 {
            let s = (u64::MAX - at) as usize;
            self.stage[s * self.stage_len..].as_mut_ptr()
        } else {
            match self.area.at(at, len as usize) {
                Some(p) => p,
                None => return Recv::Truncated,
            }
        };
        // SAFETY: the frame's bytes (header first) are the chunk's, which the kernel gave us
        // and gets back only when the next burst starts, or a staging buffer of ours; the burst
        // holds this queue's slot lock while it uses the grant.
        Recv::Frame(unsafe { Grant::from_raw(p, len) })
    }

    /// Takes up to a burst of frames from the RX ring.
    fn take(&mut self) {
        let hdr = VNET_HDR as usize;
        let (mut n, mut frags) = (0usize, 0usize);
        let mut frag: [XdpDesc; MAX_FRAGS] = [XdpDesc { addr: 0, len: 0, options: 0 }; MAX_FRAGS];
        let XskRx { area, rx, used, got, stage, stage_len, .. } = self;
        let mut r = rx.receive(rx.available().max(BURST as u32));
        while n < BURST {
            let Some(d) = r.read() else { break };
            used.push(d.addr - d.addr % u64::from(CHUNK));
            if frags < MAX_FRAGS {
                frag[frags] = d;
            }
            frags += 1;
            if d.options & XDP_PKT_CONTD != 0 {
                continue;
            }
            got[n] = if frags == 1 {
                // The header goes in the chunk's headroom, just before the frame.
                let off = d.addr % u64::from(CHUNK);
                area.at(d.addr.wrapping_sub(hdr as u64), hdr + d.len as usize)
                    .filter(|_| off >= hdr as u64)
                    .map(|p| {
                        // SAFETY: 12 bytes of the chunk's headroom, ours with the chunk.
                        unsafe { std::ptr::write_bytes(p, 0, hdr) };
                        (d.addr - hdr as u64, hdr as u32 + d.len)
                    })
            } else {
                gather(stage, *stage_len, area, n, &frag[..frags.min(MAX_FRAGS)], frags <= MAX_FRAGS)
            };
            frags = 0;
            n += 1;
        }
        // The burst ends at a frame's end; a frame the ring holds only part of (the kernel
        // publishes whole frames, so only a cut-off one) is dropped.
        if frags > 0 {
            got[n] = None;
            n += 1;
        }
        r.release();
        (self.count, self.next) = (n, 0);
    }
}

/// Copies the pieces of a multi-buffer frame into staging buffer `k` of `stage`.
fn gather(
    stage: &mut [u8],
    stage_len: usize,
    area: &Area,
    k: usize,
    frag: &[XdpDesc],
    whole: bool,
) -> Option<(u64, u32)> {
    let hdr = VNET_HDR as usize;
    let buf = stage.get_mut(k * stage_len..(k + 1) * stage_len)?;
    let total: usize = frag.iter().map(|d| d.len as usize).sum();
    if !whole || hdr + total > buf.len() {
        return None;
    }
    buf[..hdr].fill(0);
    let mut at = hdr;
    for d in frag {
        let p = area.at(d.addr, d.len as usize)?;
        // SAFETY: the piece's bytes, inside the area, in a chunk the kernel gave us.
        let src = unsafe { std::slice::from_raw_parts(p, d.len as usize) };
        buf[at..at + src.len()].copy_from_slice(src);
        at += src.len();
    }
    Some((u64::MAX - k as u64, at as u32))
}

impl XskTx {
    /// The transmit half over `tx` and `comp`, with `chunks` (UMEM addresses) to send from.
    pub fn new(area: Arc<Area>, tx: RingTx, comp: CompletionQueue, chunks: Vec<u64>, sg: bool) -> Self {
        XskTx { area, tx, comp, free: chunks, queued: 0, sg, soft: Soft::default(), broken: false }
    }

    /// Offloads finished in software since the last call: (TSO frames segmented, checksums
    /// completed).
    pub fn soft_counts(&mut self) -> (u64, u64) {
        self.soft.take_counts()
    }

    /// Whether the device has gone away.
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// Takes back the chunks the kernel has sent.
    fn reclaim(&mut self) {
        let mut r = self.comp.complete(self.comp.available().max(1));
        while let Some(a) = r.read() {
            self.free.push(a - a % u64::from(CHUNK));
        }
        r.release();
    }

    /// Queues one frame (virtio-net header first): offload requests are finished here, then
    /// each frame is copied into free chunks (the one copy) and put on the TX ring.
    #[inline]
    pub fn send(&mut self, iov: &[libc::iovec]) -> Sent {
        let mut soft = std::mem::take(&mut self.soft);
        let r = soft.send(iov, |f| self.put(f));
        self.soft = soft;
        r
    }

    fn put(&mut self, pieces: &[libc::iovec]) -> Sent {
        let len: usize = pieces.iter().map(|v| v.iov_len).sum();
        let need = len.div_ceil(CHUNK as usize).max(1);
        if need > 1 && (!self.sg || need > MAX_FRAGS) {
            return Sent::Refused;
        }
        if self.free.len() < need {
            self.reclaim();
            if self.free.len() < need {
                self.kick();
                self.reclaim();
                if self.free.len() < need {
                    return Sent::Full;
                }
            }
        }
        let mut descs = [XdpDesc { addr: 0, len: 0, options: 0 }; MAX_FRAGS];
        let (mut d, mut room, mut at) = (0usize, 0usize, 0u64);
        for v in pieces {
            // SAFETY: each piece is the switch's header or head, a finished frame of ours, or a
            // grant of guest memory the burst holds mapped, `iov_len` bytes.
            let mut src = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
            while !src.is_empty() {
                if room == 0 {
                    at = self.free[self.free.len() - 1 - d];
                    descs[d] = XdpDesc { addr: at, len: 0, options: XDP_PKT_CONTD };
                    d += 1;
                    room = CHUNK as usize;
                }
                let k = src.len().min(room);
                let dst = self.area.at(at + u64::from(descs[d - 1].len), k).expect("a chunk of the area");
                // SAFETY: `k` bytes inside a free chunk (ours until the kernel completes it);
                // the source does not overlap the UMEM.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, k) };
                descs[d - 1].len += k as u32;
                room -= k;
                src = &src[k..];
            }
        }
        if d == 0 {
            return Sent::Refused;
        }
        descs[d - 1].options = 0;
        let mut w = self.tx.transmit(d as u32);
        if w.capacity() < d as u32 {
            // Dropping the writer takes back what it reserved.
            return Sent::Full;
        }
        w.insert(descs[..d].iter().copied());
        w.commit();
        drop(w);
        self.free.truncate(self.free.len() - d);
        self.queued += d as u32;
        // The kernel's copy-mode transmit takes 32 descriptors per call.
        if self.queued >= 32 {
            self.kick();
        }
        Sent::Ok
    }

    /// Tells the kernel to transmit what the ring holds, if it waits to be told.
    fn kick(&mut self) {
        self.queued = 0;
        if !self.tx.needs_wakeup() {
            return;
        }
        // SAFETY: a zero-length send on our socket, which only wakes its transmit.
        let r = unsafe {
            libc::sendto(self.tx.as_raw_fd(), std::ptr::null(), 0, libc::MSG_DONTWAIT, std::ptr::null(), 0)
        };
        if r < 0 {
            let e = std::io::Error::last_os_error().raw_os_error();
            // ENXIO: the socket was unbound (its device is gone).
            if matches!(e, Some(libc::ENXIO) | Some(libc::ENODEV)) && !self.broken {
                tracing::warn!("AF_XDP device is gone (deleted?): its port is down until it is re-added");
                self.broken = true;
            }
        }
    }

    /// Ends a burst of sends: the kernel is told until the ring is empty (copy mode sends
    /// 32 per call) or it makes no progress (the device is busy: the rest goes on the next
    /// burst's kick), and sent chunks come back.
    pub fn flush(&mut self) {
        let mut left = self.tx.pending();
        for _ in 0..16 {
            if left == 0 || self.broken {
                break;
            }
            self.kick();
            self.reclaim();
            let now = self.tx.pending();
            if now >= left {
                break;
            }
            left = now;
        }
        self.reclaim();
    }
}
