//! A packet socket's transmit ring (`PACKET_TX_RING`, TPACKET_V2): frames are copied into
//! slots of a ring shared with the kernel, marked for sending, and one `send` per burst has the
//! kernel send every marked slot. The kernel builds each socket buffer over the slot's pages
//! (no copy of its own) and hands the slot back when the device is done with it.
//!
//! ```text
//!  slot: [tpacket2_hdr (32 B): status, len ...][virtio-net header][frame]   (FRAME bytes each)
//! ```
//!
//! A frame longer than a slot takes (jumbo, TSO) is not for the ring: the caller sends it
//! another way after [`TxRing::kick`], so it cannot pass frames still in the ring.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use super::tap::Sent;

/// Slot size: a 1518-byte frame, its virtio-net header and the slot header fit.
const FRAME: usize = 2048;
/// Slots per ring (a burst is 32; the kernel hands slots back as the device sends them).
const FRAMES: usize = 512;
/// Where a slot's data starts (`TPACKET2_HDRLEN - sizeof(struct sockaddr_ll)`).
const DATA: usize = 32;
/// `tpacket2_hdr.tp_status` values.
const TP_STATUS_AVAILABLE: u32 = 0;
const TP_STATUS_SEND_REQUEST: u32 = 1;
const TP_STATUS_WRONG_FORMAT: u32 = 4;
const PACKET_TX_RING: libc::c_int = 13;
const PACKET_VERSION: libc::c_int = 10;
const PACKET_LOSS: libc::c_int = 14;
const TPACKET_V2: libc::c_int = 1;

/// The ring, mapped.
pub struct TxRing {
    fd: RawFd,
    map: *mut u8,
    /// The next slot to fill.
    next: usize,
    /// Slots marked since the last kick.
    queued: u32,
    /// Frames the kernel refused (`TP_STATUS_WRONG_FORMAT` found on a slot's reuse).
    refused: u64,
}

// SAFETY: the mapping is this ring's alone (one sink per socket, used under its queue's lock).
unsafe impl Send for TxRing {}

fn setsockopt<T>(fd: RawFd, opt: libc::c_int, val: &T) -> io::Result<()> {
    // SAFETY: `val` points at a live T of the given size, which the kernel only reads.
    let r = unsafe {
        libc::setsockopt(fd, libc::SOL_PACKET, opt, (val as *const T).cast(), std::mem::size_of::<T>() as u32)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl TxRing {
    /// Sets up and maps the ring of packet socket `fd` (before it is bound: the kernel takes a
    /// ring only then, or on a socket with no ring yet). The ring lives as long as the socket;
    /// `fd` must outlive it.
    pub fn new(fd: RawFd) -> io::Result<TxRing> {
        setsockopt(fd, PACKET_VERSION, &TPACKET_V2)?;
        // A frame the kernel cannot send is marked and passed over, not an error that stops
        // the ring.
        setsockopt(fd, PACKET_LOSS, &1i32)?;
        // struct tpacket_req: block size, blocks, frame size, frames.
        let req: [u32; 4] = [(FRAME * 16) as u32, (FRAMES / 16) as u32, FRAME as u32, FRAMES as u32];
        setsockopt(fd, PACKET_TX_RING, &req)?;
        // SAFETY: mapping the ring the kernel just made for this socket, shared, its size.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                FRAME * FRAMES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(TxRing { fd, map: map.cast(), next: 0, queued: 0, refused: 0 })
    }

    /// The largest frame (virtio-net header included) a slot takes.
    pub const fn max_len() -> usize {
        FRAME - DATA
    }

    fn status(&self, slot: usize) -> &AtomicU32 {
        // SAFETY: the slot header's first word, aligned, inside the mapping; the kernel writes
        // it too, so it is only touched atomically.
        unsafe { &*(self.map.add(slot * FRAME) as *const AtomicU32) }
    }

    /// Copies the frame `iov` (virtio-net header first, `len` bytes in all, at most
    /// [`TxRing::max_len`]) into the next slot and marks it; `Full` when the kernel still holds
    /// that slot (kicked once first, in case it only waits for that).
    pub fn send(&mut self, iov: &[libc::iovec], len: usize) -> Sent {
        let slot = self.next;
        let mut st = self.status(slot).load(Ordering::Acquire);
        if st != TP_STATUS_AVAILABLE && st != TP_STATUS_WRONG_FORMAT && self.queued > 0 {
            self.kick();
            st = self.status(slot).load(Ordering::Acquire);
        }
        match st {
            TP_STATUS_AVAILABLE => {}
            TP_STATUS_WRONG_FORMAT => self.refused += 1,
            _ => return Sent::Full,
        }
        // SAFETY: the slot is ours (available), `len` fits its data area, and each piece is
        // the switch's header or head or a grant of guest memory the burst holds mapped.
        unsafe {
            let base = self.map.add(slot * FRAME);
            let mut at = base.add(DATA);
            for v in iov {
                std::ptr::copy_nonoverlapping(v.iov_base as *const u8, at, v.iov_len);
                at = at.add(v.iov_len);
            }
            // tp_len
            (base.add(4) as *mut u32).write(len as u32);
        }
        self.status(slot).store(TP_STATUS_SEND_REQUEST, Ordering::Release);
        self.next = (slot + 1) % FRAMES;
        self.queued += 1;
        Sent::Ok
    }

    /// Has the kernel send every marked slot (one system call), if any.
    pub fn kick(&mut self) {
        if self.queued == 0 {
            return;
        }
        self.queued = 0;
        // SAFETY: a send of nothing: the kernel takes the frames from the ring.
        unsafe { libc::send(self.fd, std::ptr::null(), 0, libc::MSG_DONTWAIT) };
    }

    /// Frames the kernel refused since the last call.
    pub fn take_refused(&mut self) -> u64 {
        std::mem::take(&mut self.refused)
    }
}

impl Drop for TxRing {
    fn drop(&mut self) {
        // SAFETY: our own mapping, not used after this.
        unsafe { libc::munmap(self.map.cast(), FRAME * FRAMES) };
    }
}
