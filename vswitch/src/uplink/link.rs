//! An in-process wire (`nic:wire:NAME`): a named link with two ends, each a NIC model's wire
//! side or a harness's traffic generator. Two switches in one process whose `nic:` ports name
//! the same link are two hosts cabled back to back; `vswitch-bench tiers` holds the other end
//! itself, so the table measures the switch and the device without a kernel's read per frame.
//!
//! ```text
//!   end 0 ──frames to end 1──▶ end 1        each direction: a bounded FIFO of frames (virtio-net
//!         ◀──frames to end 0──              header first, no offload requests: a wire carries
//!                                           plain frames), its spent buffers handed back
//! ```
//!
//! A frame is moved, not copied, from one end to the other (the sender's copy into the buffer
//! is the wire). A receiver about to sleep arms its direction's bell (an eventfd its polling
//! thread watches); a sender rings it only then, so a busy link costs no system call.
//! A frame sent while the other end is not attached, or into a full direction, is refused
//! (`Sent::Gone`, `Sent::Full`), as a cable with nothing at the far end or a full transmit ring drops it.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use iommu::Grant;

use super::tap::{Recv, Sent, VNET_HDR};
use crate::limits::BURST;

/// Frames one direction holds (a NIC's transmit ring and the far end's receive ring).
pub const LINK_FRAMES: usize = 1024;
/// The longest frame a link carries (a wire frame of 64 KiB, header first).
pub const MAX_LINK_FRAME: usize = VNET_HDR as usize + 65_535;
/// Spent buffers kept for reuse per direction.
const SPARE: usize = 2 * LINK_FRAMES;

/// Why an end could not be attached.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    /// Both ends are in use.
    #[error("wire '{0}' already has both ends attached (a wire joins exactly two NIC models, or one and a generator)")]
    Full(String),
    /// The name is not usable.
    #[error("wire name '{0}' must be 1-64 bytes of letters, digits, '-', '_' or '.'")]
    BadName(String),
    /// No eventfd.
    #[error("wire '{0}': no eventfd for its bell: {1}")]
    Bell(String, String),
}

/// Checks a wire name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[derive(Default)]
struct Frames {
    queued: VecDeque<Vec<u8>>,
    spare: Vec<Vec<u8>>,
}

/// One direction: the frames on their way to one end.
struct Dir {
    frames: Mutex<Frames>,
    /// The receiving end is about to sleep: ring the bell after sending.
    armed: AtomicBool,
    bell: Arc<File>,
}

impl Dir {
    fn new() -> std::io::Result<Dir> {
        // SAFETY: plain eventfd(2); the fd is owned by the File below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let bell = Arc::new(unsafe { File::from_raw_fd(fd) });
        Ok(Dir { frames: Mutex::new(Frames::default()), armed: AtomicBool::new(false), bell })
    }

    fn lock(&self) -> MutexGuard<'_, Frames> {
        // A panic while holding it left plain data behind: still usable.
        self.frames.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rings the bell if the receiver armed it (after frames were queued).
    fn ring(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.armed.load(Ordering::Relaxed) && self.armed.swap(false, Ordering::SeqCst) {
            let one = 1u64;
            // SAFETY: an 8-byte write to our eventfd; a full counter (never, in practice) only
            // means the bell is already ringing.
            unsafe { libc::write(self.bell.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

struct Link {
    name: String,
    /// `dirs[s]`: frames to end `s`.
    dirs: [Dir; 2],
    attached: [AtomicBool; 2],
}

static LINKS: Mutex<BTreeMap<String, Weak<Link>>> = Mutex::new(BTreeMap::new());

/// One end of a wire, held by whoever attached it (a `nic:` port, a generator); the end is free
/// again when this is dropped.
pub struct LinkEnd {
    link: Arc<Link>,
    side: usize,
}

impl LinkEnd {
    /// Attaches to a free end of wire `name` (made on first use).
    pub fn attach(name: &str) -> Result<LinkEnd, LinkError> {
        if !valid_name(name) {
            return Err(LinkError::BadName(name.into()));
        }
        let mut links = LINKS.lock().unwrap_or_else(|e| e.into_inner());
        links.retain(|_, w| w.strong_count() > 0);
        let link = match links.get(name).and_then(Weak::upgrade) {
            Some(l) => l,
            None => {
                let bell = |e: std::io::Error| LinkError::Bell(name.into(), e.to_string());
                let l = Arc::new(Link {
                    name: name.into(),
                    dirs: [Dir::new().map_err(bell)?, Dir::new().map_err(bell)?],
                    attached: [AtomicBool::new(false), AtomicBool::new(false)],
                });
                links.insert(name.into(), Arc::downgrade(&l));
                l
            }
        };
        let side = (0..2)
            .find(|&s| !link.attached[s].load(Ordering::Acquire))
            .ok_or(LinkError::Full(name.into()))?;
        link.attached[side].store(true, Ordering::Release);
        Ok(LinkEnd { link, side })
    }

    /// The wire's name.
    pub fn name(&self) -> &str {
        &self.link.name
    }

    /// Whether something is attached at the other end.
    pub fn peer_attached(&self) -> bool {
        self.link.attached[1 - self.side].load(Ordering::Acquire)
    }

    /// The receiving side of this end, for a polling thread.
    pub fn source(&self) -> LinkQueue {
        LinkQueue::new(self.link.clone(), self.side)
    }

    /// The sending side of this end, for a polling thread.
    pub fn sink(&self) -> LinkQueue {
        LinkQueue::new(self.link.clone(), 1 - self.side)
    }

    /// Sends plain frames (no virtio-net header; one of zeros goes before each) to the other
    /// end, all under one lock: how many the wire took (fewer when it is full or unplugged).
    pub fn send<'a>(&self, frames: impl IntoIterator<Item = &'a [u8]>) -> usize {
        let to = 1 - self.side;
        if !self.link.attached[to].load(Ordering::Acquire) {
            return 0;
        }
        let dir = &self.link.dirs[to];
        let mut n = 0;
        {
            let mut q = dir.lock();
            for f in frames {
                if q.queued.len() >= LINK_FRAMES || VNET_HDR as usize + f.len() > MAX_LINK_FRAME {
                    break;
                }
                let mut b = q.spare.pop().unwrap_or_default();
                b.clear();
                b.resize(VNET_HDR as usize, 0);
                b.extend_from_slice(f);
                q.queued.push_back(b);
                n += 1;
            }
        }
        if n > 0 {
            dir.ring();
        }
        n
    }

    /// Takes up to `max` frames sent to this end into `out` (virtio-net header first); how
    /// many. Pass spent frames back with [`LinkEnd::recycle`] to keep the wire from allocating.
    pub fn recv(&self, out: &mut Vec<Vec<u8>>, max: usize) -> usize {
        let mut q = self.link.dirs[self.side].lock();
        let n = max.min(q.queued.len());
        out.extend(q.queued.drain(..n));
        n
    }

    /// Hands spent frames back to the direction they came from.
    pub fn recycle(&self, spent: impl IntoIterator<Item = Vec<u8>>) {
        let mut q = self.link.dirs[self.side].lock();
        for b in spent {
            if q.spare.len() < SPARE {
                q.spare.push(b);
            }
        }
    }

    /// Waits up to `timeout` for a frame sent to this end; whether one is there.
    pub fn wait(&self, timeout: Duration) -> bool {
        let dir = &self.link.dirs[self.side];
        dir.armed.store(true, Ordering::SeqCst);
        if !dir.lock().queued.is_empty() {
            dir.armed.store(false, Ordering::Relaxed);
            return true;
        }
        let mut pfd = libc::pollfd { fd: dir.bell.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd of ours.
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        let mut v = 0u64;
        // SAFETY: draining our non-blocking eventfd into a u64.
        unsafe { libc::read(dir.bell.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        dir.armed.store(false, Ordering::Relaxed);
        !dir.lock().queued.is_empty()
    }
}

impl Drop for LinkEnd {
    fn drop(&mut self) {
        self.link.attached[self.side].store(false, Ordering::Release);
        // Frames on their way to a detached end would reach whoever attaches next.
        let mut q = self.link.dirs[self.side].lock();
        let Frames { queued, spare } = &mut *q;
        spare.extend(queued.drain(..));
        spare.truncate(SPARE);
    }
}

/// One direction of a wire as a polling thread uses it (under its slot's lock): the source
/// side takes frames sent to its end, the sink side sends to the other end.
pub struct LinkQueue {
    link: Arc<Link>,
    /// The direction this queue takes from (a source) or sends into (a sink).
    dir: usize,
    /// Frames taken off the direction, not yet handed to the burst.
    inbox: VecDeque<Vec<u8>>,
    /// The burst's frames, by staging index (their grants point into them).
    held: Vec<Vec<u8>>,
    /// Buffers the burst is done with, handed back at the next refill.
    spent: Vec<Vec<u8>>,
}

impl LinkQueue {
    fn new(link: Arc<Link>, dir: usize) -> Self {
        LinkQueue { link, dir, inbox: VecDeque::new(), held: vec![Vec::new(); BURST], spent: Vec::new() }
    }

    fn d(&self) -> &Dir {
        &self.link.dirs[self.dir]
    }

    /// The wire's name.
    pub fn name(&self) -> &str {
        &self.link.name
    }

    /// The bell a polling thread watches (source side).
    pub fn file(&self) -> &Arc<File> {
        &self.d().bell
    }

    /// Arms the bell before the polling thread sleeps: true if frames are already waiting (do
    /// not sleep).
    pub fn arm(&self) -> bool {
        if !self.inbox.is_empty() {
            return true;
        }
        let d = self.d();
        d.armed.store(true, Ordering::SeqCst);
        if d.lock().queued.is_empty() {
            return false;
        }
        d.armed.store(false, Ordering::Relaxed);
        true
    }

    /// Takes the next frame into staging index `i` (`i < BURST`).
    #[inline]
    pub fn recv(&mut self, i: usize) -> Recv {
        if i >= self.held.len() {
            return Recv::Empty;
        }
        if self.inbox.is_empty() {
            let d = &self.link.dirs[self.dir];
            let mut q = d.lock();
            let Frames { queued, spare } = &mut *q;
            for b in self.spent.drain(..) {
                if spare.len() < SPARE {
                    spare.push(b);
                }
            }
            let n = queued.len().min(BURST);
            self.inbox.extend(queued.drain(..n));
        }
        let Some(f) = self.inbox.pop_front() else { return Recv::Empty };
        let old = std::mem::replace(&mut self.held[i], f);
        if old.capacity() > 0 {
            self.spent.push(old);
        }
        let b = &mut self.held[i];
        // SAFETY: the buffer is this queue's until the next burst's `recv(i)`, and the burst
        // holding the grant holds this queue's slot lock; its length fits a u32 (capped at send).
        Recv::Frame(unsafe { Grant::from_raw(b.as_mut_ptr(), b.len() as u32) })
    }

    /// Frames the direction can take now.
    pub fn room(&self) -> usize {
        LINK_FRAMES.saturating_sub(self.d().lock().queued.len())
    }

    /// Whether the far end of this sink is attached.
    fn peer_attached(&self) -> bool {
        self.link.attached[self.dir].load(Ordering::Acquire)
    }

    /// A buffer to build a frame in (from the direction's spares).
    pub fn buffer(&mut self) -> Vec<u8> {
        let mut b = self.d().lock().spare.pop().unwrap_or_default();
        b.clear();
        b
    }

    /// Sends a frame built in `f` (header first), moving it onto the wire.
    pub fn send_owned(&mut self, f: Vec<u8>) -> Result<(), (Sent, Vec<u8>)> {
        if f.len() < VNET_HDR as usize || f.len() > MAX_LINK_FRAME {
            return Err((Sent::Refused, f));
        }
        if !self.peer_attached() {
            return Err((Sent::Gone, f));
        }
        let d = &self.link.dirs[self.dir];
        {
            let mut q = d.lock();
            if q.queued.len() >= LINK_FRAMES {
                return Err((Sent::Full, f));
            }
            q.queued.push_back(f);
        }
        d.ring();
        Ok(())
    }

    /// Sends a frame given as pieces (header first), copied into a wire buffer.
    pub fn send(&mut self, iov: &[libc::iovec]) -> Sent {
        let mut b = self.buffer();
        for v in iov {
            // SAFETY: the caller's pieces are readable for their lengths (see `TapQueue::send`).
            b.extend_from_slice(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) });
        }
        match self.send_owned(b) {
            Ok(()) => Sent::Ok,
            Err((s, b)) => {
                let mut q = self.d().lock();
                if q.spare.len() < SPARE {
                    q.spare.push(b);
                }
                s
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iommu::Ro;

    fn bytes(g: Grant<Ro>) -> Vec<u8> {
        // SAFETY: a grant into the queue's held buffer, read before the next recv.
        unsafe { std::slice::from_raw_parts(g.as_ptr(), g.len() as usize) }.to_vec()
    }

    #[test]
    fn frames_cross_in_order_and_a_third_end_is_refused() {
        let a = LinkEnd::attach("t-order").unwrap();
        let b = LinkEnd::attach("t-order").unwrap();
        assert_eq!(LinkEnd::attach("t-order").err(), Some(LinkError::Full("t-order".into())));
        let frames: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 60]).collect();
        assert_eq!(a.send(frames.iter().map(|f| f.as_slice())), 40);
        let mut src = b.source();
        let mut got = Vec::new();
        for _ in 0..2 {
            for i in 0..BURST {
                match src.recv(i) {
                    Recv::Frame(g) => got.push(bytes(g)),
                    _ => break,
                }
            }
        }
        assert_eq!(got.len(), 40);
        for (i, f) in got.iter().enumerate() {
            assert_eq!(&f[..VNET_HDR as usize], &[0u8; 12]);
            assert_eq!(&f[VNET_HDR as usize..], &frames[i][..]);
        }
        // b's sink reaches a.
        let mut sink = b.sink();
        let hdr = [0u8; 12];
        let body = [7u8; 64];
        let iov = [
            libc::iovec { iov_base: hdr.as_ptr() as *mut _, iov_len: 12 },
            libc::iovec { iov_base: body.as_ptr() as *mut _, iov_len: 64 },
        ];
        assert_eq!(sink.send(&iov), Sent::Ok);
        let mut out = Vec::new();
        assert_eq!(a.recv(&mut out, 8), 1);
        assert_eq!(&out[0][12..], &body[..]);
        // A freed end can be taken again; frames to an unplugged end are refused.
        drop(a);
        assert_eq!(sink.send(&iov), Sent::Gone);
        let _a2 = LinkEnd::attach("t-order").unwrap();
        assert_eq!(sink.send(&iov), Sent::Ok);
    }

    #[test]
    fn a_full_direction_refuses_and_an_armed_bell_rings() {
        let a = LinkEnd::attach("t-full").unwrap();
        let b = LinkEnd::attach("t-full").unwrap();
        let src = b.source();
        assert!(!src.arm());
        let f = [1u8; 60];
        assert_eq!(a.send(std::iter::repeat_n(&f[..], LINK_FRAMES + 5)), LINK_FRAMES);
        let mut v = 0u64;
        // SAFETY: reading our eventfd.
        let n = unsafe { libc::read(src.file().as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        assert_eq!((n, v), (8, 1), "the armed bell rang once");
        assert!(src.arm(), "frames waiting: no sleep");
        assert!(b.wait(Duration::from_millis(1)));
        assert_eq!(LinkEnd::attach("bad name").err(), Some(LinkError::BadName("bad name".into())));
    }
}
