//! hostvm's guest payload: a polling virtio-net driver and a few network roles, running in
//! 64-bit ring 3 on page tables hostvm built (identity map of the low 4 GiB).
//!
//! Built by hostvm's build script with `rustc` for the host target, `no_std`, statically
//! linked at 1 MiB (see `link.ld`), and embedded in the hostvm binary. It has no interrupt
//! handling at all (interrupts stay masked): it polls its rings, and when there is nothing
//! to do it re-enables notifications and parks itself on [`abi::PORT_IDLE`] until hostvm sees
//! one of its NICs notified. Its orders and counters live in [`abi::Params`].
#![no_std]
#![no_main]

#[allow(dead_code)]
mod abi;

use abi::{error, event, flags, role, state, NicStats, Params, MAX_NICS};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

/// Bytes of buffer per descriptor (virtio-net header + a 1514-byte frame fit).
const BUF: u64 = 2048;
/// virtio-net header length with VERSION_1.
const HDR: usize = 12;
/// Frames handled per ring visit.
const BURST: usize = 32;
/// Empty polls before going idle.
const IDLE_AFTER: u32 = 2000;
/// Longest idle wait asked for, in microseconds (the stop flag is re-read after it).
const IDLE_US: u32 = 20_000;

const MMIO_MAGIC: usize = 0x000;
const MMIO_VERSION: usize = 0x004;
const MMIO_DEVICE_ID: usize = 0x008;
const MMIO_DEVICE_FEATURES: usize = 0x010;
const MMIO_DEVICE_FEATURES_SEL: usize = 0x014;
const MMIO_DRIVER_FEATURES: usize = 0x020;
const MMIO_DRIVER_FEATURES_SEL: usize = 0x024;
const MMIO_QUEUE_SEL: usize = 0x030;
const MMIO_QUEUE_NUM_MAX: usize = 0x034;
const MMIO_QUEUE_NUM: usize = 0x038;
const MMIO_QUEUE_READY: usize = 0x044;
const MMIO_QUEUE_NOTIFY: usize = 0x050;
const MMIO_STATUS: usize = 0x070;
const MMIO_QUEUE_DESC: usize = 0x080;
const MMIO_QUEUE_DRIVER: usize = 0x090;
const MMIO_QUEUE_DEVICE: usize = 0x0a0;

const STATUS_ACK: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
/// `VIRTIO_F_VERSION_1` is bit 32: bit 0 of the high feature word.
const F_VERSION_1_HI: u32 = 1;

const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    puts(b"payload: panic\n");
    exit(0xff)
}

/// The precompiled `core` references this unwinding hook; with `panic=abort` nothing calls it.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

// The compiler lowers copies and fills to these; there is no libc. `rep movsb`/`rep stosb`
// keep them from being compiled back into calls to themselves.

/// # Safety
/// As C's `memcpy`.
#[no_mangle]
pub unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller passes valid, non-overlapping ranges of `n` bytes.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") d => _, inout("rsi") s => _,
            options(nostack, preserves_flags));
    }
    d
}

/// # Safety
/// As C's `memmove`.
#[no_mangle]
pub unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) <= (s as usize) || (d as usize) >= (s as usize) + n {
        // SAFETY: forward copy is safe when the destination starts before the source or
        // after its end.
        return unsafe { memcpy(d, s, n) };
    }
    // SAFETY: backward copy with the direction flag set, then cleared again.
    unsafe {
        core::arch::asm!("std", "rep movsb", "cld", inout("rcx") n => _,
            inout("rdi") d.add(n - 1) => _, inout("rsi") s.add(n - 1) => _, options(nostack));
    }
    d
}

/// # Safety
/// As C's `memset`.
#[no_mangle]
pub unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller passes a valid range of `n` bytes.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") d => _, in("al") c as u8,
            options(nostack, preserves_flags));
    }
    d
}

/// # Safety
/// As C's `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller passes valid ranges of `n` bytes.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// As C's `bcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

fn outl(port: u16, v: u32) {
    // SAFETY: port I/O to hostvm's ports; the payload runs with IOPL 3, so it exits to hostvm.
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack)) }
}

fn outb(port: u16, v: u8) {
    // SAFETY: as `outl`.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) }
}

fn puts(s: &[u8]) {
    for &b in s {
        outb(abi::COM1, b);
    }
}

fn exit(code: u32) -> ! {
    loop {
        outl(abi::PORT_EXIT, code);
    }
}

fn mmio_read(base: u64, off: usize) -> u32 {
    // SAFETY: `base` is a NIC's register window from hostvm's parameters (identity-mapped).
    unsafe { read_volatile((base as usize + off) as *const u32) }
}

fn mmio_write(base: u64, off: usize, v: u32) {
    // SAFETY: as `mmio_read`.
    unsafe { write_volatile((base as usize + off) as *mut u32, v) }
}

fn mmio_write64(base: u64, off: usize, v: u64) {
    mmio_write(base, off, v as u32);
    mmio_write(base, off + 4, (v >> 32) as u32);
}

/// A split virtqueue in payload memory, with one buffer of [`BUF`] bytes per descriptor.
struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    bufs: u64,
    /// Next used entry to look at.
    last_used: u16,
    /// Next avail slot to fill (published in `avail.idx` by [`Ring::publish`]).
    next_avail: u16,
    /// Descriptor ids not owned by the device (transmit rings only).
    free: [u16; 256],
    nfree: usize,
}

impl Ring {
    fn new(alloc: &mut Alloc, size: u16) -> Option<Ring> {
        let n = u64::from(size);
        let desc = alloc.take(16 * n, 4096)?;
        let avail = alloc.take(6 + 2 * n, 4096)?;
        let used = alloc.take(6 + 8 * n, 4096)?;
        let bufs = alloc.take(BUF * n, 4096)?;
        Some(Ring { size, desc, avail, used, bufs, last_used: 0, next_avail: 0, free: [0; 256], nfree: 0 })
    }

    fn buf(&self, id: u16) -> *mut u8 {
        (self.bufs + u64::from(id) * BUF) as *mut u8
    }

    fn set_desc(&self, id: u16, addr: u64, len: u32, flags: u16) {
        let d = self.desc + 16 * u64::from(id);
        // SAFETY: `id` < size: the descriptor lies in this ring's table.
        unsafe {
            write_volatile(d as *mut u64, addr);
            write_volatile((d + 8) as *mut u32, len);
            write_volatile((d + 12) as *mut u16, flags);
            write_volatile((d + 14) as *mut u16, 0);
        }
    }

    /// Puts descriptor `id` in the next avail slot (not yet visible to the device).
    fn push(&mut self, id: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.next_avail & (self.size - 1));
        // SAFETY: the slot lies in this ring's avail array.
        unsafe { write_volatile(slot as *mut u16, id) };
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Makes pushed slots visible; returns whether they should be notified.
    fn publish(&mut self) -> bool {
        fence(Ordering::Release);
        // SAFETY: avail.idx lies in this ring.
        let old = unsafe { read_volatile((self.avail + 2) as *const u16) };
        if old == self.next_avail {
            return false;
        }
        // SAFETY: as above.
        unsafe { write_volatile((self.avail + 2) as *mut u16, self.next_avail) };
        fence(Ordering::SeqCst);
        // SAFETY: used.flags lies in this ring.
        unsafe { read_volatile(self.used as *const u16) & USED_F_NO_NOTIFY == 0 }
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: used.idx lies in this ring.
        let v = unsafe { read_volatile((self.used + 2) as *const u16) };
        fence(Ordering::Acquire);
        v
    }

    fn pending(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// Takes the next used entry `(id, len)`, if any; `bad` counts refused entries.
    fn pop_used(&mut self, until: u16, bad: &mut u64) -> Option<(u16, u32)> {
        while self.last_used != until {
            let e = self.used + 4 + 8 * u64::from(self.last_used & (self.size - 1));
            // SAFETY: the entry lies in this ring's used array.
            let (id, len) = unsafe { (read_volatile(e as *const u32), read_volatile((e + 4) as *const u32)) };
            self.last_used = self.last_used.wrapping_add(1);
            if id < u32::from(self.size) && u64::from(len) <= BUF {
                return Some((id as u16, len));
            }
            *bad += 1;
        }
        None
    }

    fn set_interrupts(&self, on: bool) {
        let f = if on { 0 } else { AVAIL_F_NO_INTERRUPT };
        // SAFETY: avail.flags lies in this ring.
        unsafe { write_volatile(self.avail as *mut u16, f) };
    }
}

/// Bump allocator over the free memory hostvm gave us.
struct Alloc {
    next: u64,
    end: u64,
}

impl Alloc {
    fn take(&mut self, len: u64, align: u64) -> Option<u64> {
        let at = self.next.checked_add(align - 1)? & !(align - 1);
        let end = at.checked_add(len)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(at)
    }
}

struct Nic {
    mmio: u64,
    mac: [u8; 6],
    rx: Ring,
    tx: Ring,
}

impl Nic {
    fn init(mmio: u64, mac: [u8; 6], qsize: u16, alloc: &mut Alloc) -> Result<Nic, u32> {
        if mmio_read(mmio, MMIO_MAGIC) != 0x7472_6976
            || mmio_read(mmio, MMIO_VERSION) != 2
            || mmio_read(mmio, MMIO_DEVICE_ID) != 1
        {
            return Err(error::NOT_VIRTIO_NET);
        }
        mmio_write(mmio, MMIO_STATUS, 0);
        mmio_write(mmio, MMIO_STATUS, STATUS_ACK | STATUS_DRIVER);
        mmio_write(mmio, MMIO_DEVICE_FEATURES_SEL, 1);
        if mmio_read(mmio, MMIO_DEVICE_FEATURES) & F_VERSION_1_HI == 0 {
            return Err(error::FEATURES);
        }
        mmio_write(mmio, MMIO_DRIVER_FEATURES_SEL, 0);
        mmio_write(mmio, MMIO_DRIVER_FEATURES, 0);
        mmio_write(mmio, MMIO_DRIVER_FEATURES_SEL, 1);
        mmio_write(mmio, MMIO_DRIVER_FEATURES, F_VERSION_1_HI);
        mmio_write(mmio, MMIO_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        if mmio_read(mmio, MMIO_STATUS) & STATUS_FEATURES_OK == 0 {
            return Err(error::FEATURES);
        }
        let rx = Ring::new(alloc, qsize).ok_or(error::NO_MEMORY)?;
        let mut tx = Ring::new(alloc, qsize).ok_or(error::NO_MEMORY)?;
        for (q, ring) in [(0u32, &rx), (1, &tx)] {
            mmio_write(mmio, MMIO_QUEUE_SEL, q);
            if mmio_read(mmio, MMIO_QUEUE_NUM_MAX) < u32::from(qsize) {
                return Err(error::QUEUE);
            }
            mmio_write(mmio, MMIO_QUEUE_NUM, u32::from(qsize));
            mmio_write64(mmio, MMIO_QUEUE_DESC, ring.desc);
            mmio_write64(mmio, MMIO_QUEUE_DRIVER, ring.avail);
            mmio_write64(mmio, MMIO_QUEUE_DEVICE, ring.used);
            mmio_write(mmio, MMIO_QUEUE_READY, 1);
        }
        let mut rx = rx;
        for id in 0..qsize {
            rx.set_desc(id, rx.buf(id) as u64, BUF as u32, DESC_F_WRITE);
            rx.push(id);
        }
        rx.set_interrupts(false);
        tx.set_interrupts(false);
        for id in 0..qsize {
            tx.free[usize::from(id)] = qsize - 1 - id;
        }
        tx.nfree = usize::from(qsize);
        mmio_write(mmio, MMIO_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        let nic = Nic { mmio, mac, rx, tx };
        Ok(nic)
    }

    fn kick(&self, q: u32) {
        mmio_write(self.mmio, MMIO_QUEUE_NOTIFY, q);
    }

    /// Returns completed transmit descriptors to the free list.
    fn reclaim(&mut self, st: &mut NicStats) {
        let until = self.tx.used_idx();
        let mut bad = 0;
        while let Some((id, _)) = self.tx.pop_used(until, &mut bad) {
            if self.tx.nfree < usize::from(self.tx.size) {
                self.tx.free[self.tx.nfree] = id;
                self.tx.nfree += 1;
            }
        }
        st.bad_used += bad;
    }

    /// Queues one frame written by `fill` into a transmit buffer (`fill` returns its length).
    fn send(&mut self, st: &mut NicStats, fill: impl FnOnce(&mut [u8]) -> usize) -> bool {
        if self.tx.nfree == 0 {
            self.reclaim(st);
            if self.tx.nfree == 0 {
                st.tx_full += 1;
                return false;
            }
        }
        self.tx.nfree -= 1;
        let id = self.tx.free[self.tx.nfree];
        // SAFETY: the buffer is BUF bytes of payload memory owned by us (the device
        // returned this descriptor or never had it).
        let buf = unsafe { core::slice::from_raw_parts_mut(self.tx.buf(id), BUF as usize) };
        buf[..HDR].fill(0);
        let len = fill(&mut buf[HDR..]).min(BUF as usize - HDR);
        self.tx.set_desc(id, buf.as_ptr() as u64, (HDR + len) as u32, 0);
        self.tx.push(id);
        st.tx_frames += 1;
        st.tx_bytes += len as u64;
        true
    }

    fn flush_tx(&mut self) {
        if self.tx.publish() {
            self.kick(1);
        }
    }

    fn flush_rx(&mut self) {
        if self.rx.publish() {
            self.kick(0);
        }
    }
}

fn params() -> *mut Params {
    abi::PARAMS_GPA as *mut Params
}

fn write_stats(i: usize, st: &NicStats) {
    // SAFETY: the parameter block is ours; hostvm only reads the counters.
    unsafe { write_volatile(addr_of_mut!((*params()).stats[i]), *st) }
}

fn stop_requested() -> bool {
    // SAFETY: hostvm writes `stop`; a volatile read sees it.
    unsafe { read_volatile(addr_of!((*params()).stop)) != 0 }
}

fn set_state(s: u32, err: u32) {
    // SAFETY: as `write_stats`.
    unsafe {
        write_volatile(addr_of_mut!((*params()).error), err);
        write_volatile(addr_of_mut!((*params()).state), s);
    }
}

fn fail(err: u32) -> ! {
    set_state(state::FAILED, err);
    puts(b"payload: failed\n");
    exit(err)
}

/// Entry point: hostvm starts here in ring 3 with `rdi` = [`abi::PARAMS_GPA`] and a stack.
#[no_mangle]
#[link_section = ".text.start"]
pub extern "C" fn _start() -> ! {
    outl(abi::PORT_EVENT, event::STARTED);
    // SAFETY: hostvm wrote the parameter block before starting us; we copy it once.
    let p: Params = unsafe { read_volatile(params()) };
    let nics = p.nics as usize;
    let qsize = p.queue_size;
    if p.magic != abi::MAGIC
        || p.version != abi::VERSION
        || nics == 0
        || nics > MAX_NICS
        || !(2..=256).contains(&qsize)
        || !qsize.is_power_of_two()
        || (p.role == role::FORWARD && nics < 2)
        || (p.role == role::SEND && !(60..=1514).contains(&p.frame_len))
    {
        fail(error::BAD_PARAMS);
    }
    let mut alloc = Alloc { next: p.mem_start, end: p.mem_end };
    let mut dev: [Option<Nic>; MAX_NICS] = [None, None, None, None];
    for (i, slot) in dev.iter_mut().enumerate().take(nics) {
        match Nic::init(p.nic[i].mmio, p.nic[i].mac, qsize as u16, &mut alloc) {
            Ok(mut n) => {
                n.flush_rx();
                *slot = Some(n);
            }
            Err(e) => fail(e),
        }
    }
    set_state(state::RUNNING, 0);
    outl(abi::PORT_EVENT, event::NICS_READY);
    puts(b"payload: running\n");
    let mut st = [NicStats::default(); MAX_NICS];
    let gap = if p.rate_pps > 0 && p.tsc_khz > 0 { p.tsc_khz * 1000 / p.rate_pps } else { 0 };
    let mut run = Run {
        p,
        dev,
        st: &mut st,
        nics,
        first_rx: true,
        first_tx: true,
        seq: 0,
        idle_polls: 0,
        gap,
        next_send: rdtsc(),
    };
    run.main_loop();
    for i in 0..nics {
        write_stats(i, &run.st[i]);
    }
    set_state(state::DONE, 0);
    puts(b"payload: done\n");
    exit(0)
}

struct Run<'a> {
    p: Params,
    dev: [Option<Nic>; MAX_NICS],
    st: &'a mut [NicStats; MAX_NICS],
    nics: usize,
    first_rx: bool,
    first_tx: bool,
    seq: u64,
    idle_polls: u32,
    /// TSC ticks between frames when pacing ([`role::SEND`] with a rate), else 0.
    gap: u64,
    /// TSC time of the next paced frame.
    next_send: u64,
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc is allowed at CPL 3 (CR4.TSD is clear) and touches only edx:eax.
    unsafe { core::arch::x86_64::_rdtsc() }
}

impl Run<'_> {
    fn nic(&mut self, i: usize) -> &mut Nic {
        match self.dev[i].as_mut() {
            Some(n) => n,
            None => fail(error::BAD_PARAMS),
        }
    }

    fn main_loop(&mut self) {
        loop {
            if stop_requested() {
                return;
            }
            let mut work = false;
            for i in 0..self.nics {
                work |= self.poll_rx(i);
            }
            if self.p.role == role::SEND {
                work |= self.send_some();
                if self.seq >= self.p.count {
                    let mut st = self.st[0];
                    let n = self.nic(0);
                    n.reclaim(&mut st);
                    let done = n.tx.nfree == usize::from(n.tx.size);
                    self.st[0] = st;
                    if done {
                        return;
                    }
                }
            }
            if self.p.role == role::SINK && self.p.count > 0 && self.st[0].rx_frames >= self.p.count {
                return;
            }
            for i in 0..self.nics {
                write_stats(i, &self.st[i]);
            }
            if work {
                self.idle_polls = 0;
            } else {
                self.idle_polls += 1;
                let owes = self.p.role == role::SEND && self.seq < self.p.count;
                let busy = self.p.flags & flags::BUSY_POLL != 0;
                if owes && self.gap > 0 && !busy {
                    // Paced and early: sleep until the next frame is due if that is long
                    // enough to be worth an exit (~50 µs), instead of spinning a core.
                    let wait_us = self.next_send.saturating_sub(rdtsc()) * 1000 / self.p.tsc_khz.max(1);
                    if wait_us > 200 {
                        self.idle(wait_us.min(u64::from(IDLE_US)) as u32);
                    }
                } else if self.idle_polls >= IDLE_AFTER && !busy && !owes {
                    self.idle(IDLE_US);
                    self.idle_polls = 0;
                }
            }
        }
    }

    /// Re-enables receive notifications, re-checks, and parks on [`abi::PORT_IDLE`].
    fn idle(&mut self, max_us: u32) {
        for i in 0..self.nics {
            self.nic(i).rx.set_interrupts(true);
        }
        fence(Ordering::SeqCst);
        let mut pending = false;
        for i in 0..self.nics {
            pending |= self.nic(i).rx.pending();
        }
        // A sender waiting for ring space wants to hear about completions too.
        if self.p.role == role::SEND {
            let n = self.nic(0);
            n.tx.set_interrupts(true);
            fence(Ordering::SeqCst);
            pending |= n.tx.pending();
        }
        if !pending {
            self.st[0].idles += 1;
            outl(abi::PORT_IDLE, max_us);
        }
        for i in 0..self.nics {
            let n = self.nic(i);
            n.rx.set_interrupts(false);
            n.tx.set_interrupts(false);
        }
    }

    /// Handles up to a burst of received frames on NIC `i`; returns whether there were any.
    fn poll_rx(&mut self, i: usize) -> bool {
        let until = self.nic(i).rx.used_idx();
        if until == self.nic(i).rx.last_used {
            return false;
        }
        if self.first_rx {
            self.first_rx = false;
            outl(abi::PORT_EVENT, event::FIRST_RX);
        }
        let out = match self.p.role {
            role::FORWARD => i ^ 1,
            _ => i,
        };
        let mut handled = 0;
        let mut sent = false;
        while handled < BURST {
            let mut bad = 0;
            let Some((id, len)) = self.nic(i).rx.pop_used(until, &mut bad) else {
                self.st[i].bad_used += bad;
                break;
            };
            self.st[i].bad_used += bad;
            handled += 1;
            let len = len as usize;
            if len < HDR + 14 {
                self.st[i].bad_used += 1;
            } else {
                let flen = len - HDR;
                self.st[i].rx_frames += 1;
                self.st[i].rx_bytes += flen as u64;
                // SAFETY: the device wrote `len` <= BUF bytes into our buffer `id`.
                let frame = unsafe { core::slice::from_raw_parts(self.nic(i).rx.buf(id).add(HDR), flen) };
                match self.p.role {
                    role::ECHO => {
                        let mac = self.nic(i).mac;
                        let mut st = self.st[i];
                        sent |= self.nic(i).send(&mut st, |b| {
                            b[..flen].copy_from_slice(frame);
                            b[0..6].copy_from_slice(&frame[6..12]);
                            b[6..12].copy_from_slice(&mac);
                            flen
                        });
                        self.st[i] = st;
                    }
                    role::FORWARD => {
                        let mut st = self.st[out];
                        sent |= self.nic(out).send(&mut st, |b| {
                            b[..flen].copy_from_slice(frame);
                            flen
                        });
                        self.st[out] = st;
                    }
                    _ => {}
                }
            }
            let n = self.nic(i);
            n.rx.push(id);
        }
        self.nic(i).flush_rx();
        if sent {
            if self.first_tx {
                self.first_tx = false;
                outl(abi::PORT_EVENT, event::FIRST_TX);
            }
            self.nic(out).flush_tx();
        }
        true
    }

    /// Sends up to a burst of the frames still owed ([`role::SEND`]).
    fn send_some(&mut self) -> bool {
        let mut sent = 0;
        let (dst, src, len) = (self.p.dst_mac, self.nic(0).mac, self.p.frame_len as usize);
        let paced = self.gap > 0;
        while sent < BURST && self.seq < self.p.count {
            if paced {
                if rdtsc() < self.next_send {
                    break;
                }
                self.next_send += self.gap;
            }
            let seq = self.seq;
            let mut st = self.st[0];
            let ok = self.nic(0).send(&mut st, |b| write_test_frame(b, &dst, &src, len, seq));
            self.st[0] = st;
            if !ok {
                // Full ring: not a loss, try again later. tx_full counts the attempt.
                self.st[0].tx_full -= 1;
                break;
            }
            self.seq += 1;
            sent += 1;
        }
        if sent > 0 {
            if self.first_tx {
                self.first_tx = false;
                outl(abi::PORT_EVENT, event::FIRST_TX);
            }
            self.nic(0).flush_tx();
        }
        sent > 0
    }
}

/// Writes the harness's test frame (Ethernet/IPv4/UDP, big-endian sequence number at byte
/// 42, magic `VSWB`, pattern `(seq + i) as u8`) of `len` bytes; returns `len`.
fn write_test_frame(f: &mut [u8], dst: &[u8; 8], src: &[u8; 6], len: usize, seq: u64) -> usize {
    let f = &mut f[..len];
    f.fill(0);
    f[0..6].copy_from_slice(&dst[..6]);
    f[6..12].copy_from_slice(src);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let payload_len = len - 42;
    let ip = 14;
    f[ip] = 0x45;
    f[ip + 2..ip + 4].copy_from_slice(&((20 + 8 + payload_len) as u16).to_be_bytes());
    f[ip + 4..ip + 6].copy_from_slice(&(seq as u16).to_be_bytes());
    f[ip + 6..ip + 8].copy_from_slice(&0x4000u16.to_be_bytes());
    f[ip + 8] = 64;
    f[ip + 9] = 17;
    f[ip + 12..ip + 16].copy_from_slice(&[198, 18, 0, 1]);
    f[ip + 16..ip + 20].copy_from_slice(&[198, 18, 0, 2]);
    let mut sum = 0u32;
    for k in 0..10 {
        sum += u32::from(u16::from_be_bytes([f[ip + 2 * k], f[ip + 2 * k + 1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[ip + 10..ip + 12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let udp = 34;
    f[udp..udp + 2].copy_from_slice(&5000u16.to_be_bytes());
    f[udp + 2..udp + 4].copy_from_slice(&5001u16.to_be_bytes());
    f[udp + 4..udp + 6].copy_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    let pl = 42;
    f[pl..pl + 8].copy_from_slice(&seq.to_be_bytes());
    f[pl + 8..pl + 12].copy_from_slice(b"VSWB");
    for (i, b) in f[pl + 12..].iter_mut().enumerate() {
        *b = seq.wrapping_add(i as u64) as u8;
    }
    len
}
