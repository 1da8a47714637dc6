//! Live migration of a payload VM between two hostvm processes: the smallest complete VMM
//! side of vhost-user migration.
//!
//! The destination (`hostvm run ... --incoming PATH`) is started with the same memory size
//! and NIC MACs, its NICs on their own switch ports, and listens on `PATH`. The source
//! (`--migrate-to PATH`, started on SIGUSR1) then runs a pre-copy:
//!
//! 1. KVM logs the pages the vCPU writes (`KVM_MEM_LOG_DIRTY_PAGES`); the switch logs the pages
//!    it writes (receive buffers, used rings) into a shared memfd (`SET_LOG_BASE`, `LOG_ALL`
//!    acked, each ring's used-ring log address): see [`Link::start_log`].
//! 2. All of RAM is sent (zero pages as a count), then, round after round, the pages either
//!    log marked since the last round, until a round is small (or no longer shrinks).
//! 3. Stop and copy: the vCPU is parked (its pending I/O completed first), the switch stops
//!    the rings (`GET_VRING_BASE`: it writes nothing more), the last dirty pages, the vCPU's
//!    registers and the NICs' register state are sent, with a digest of all of RAM if asked.
//! 4. The destination loads everything, checks the digest, hands its switch the rings where
//!    the guest left them and sends `SEND_RARP` (the switch moves the guest's MAC to the new
//!    port at once), answers, and runs the guest; the source then exits.
//!
//! If anything fails before the destination answers, the source turns logging off, gives the
//! rings back to the switch and runs the guest on.
//!
//! The stream is this build's own format (a header with the version is checked), not a
//! stable one: both ends must be the same hostvm. Linux guests are not migrated: their
//! interrupt controllers' state is not carried.
//!
//! [`Link::start_log`]: crate::net::Link::start_log

use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};

use crate::memory::GuestRam;
use crate::mmio::NicState;
use crate::{Error, Result};

/// The page size the logs count in.
pub const PAGE: u64 = 4096;

/// This build's stream format: the format's name and hostvm's version.
pub(crate) fn version() -> String {
    format!("hostvm-migration-1/{}", env!("CARGO_PKG_VERSION"))
}

/// Pages per data record.
const RUN: usize = 64;
/// A dirty round this small (pages) ends the pre-copy.
pub(crate) const SMALL_ROUND: usize = 256;
/// Pre-copy rounds at most before stopping the guest anyway.
pub(crate) const MAX_ROUNDS: usize = 30;
/// How long either side waits for the other's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

mod tag {
    pub const HELLO: u8 = 1;
    pub const PAGES: u8 = 2;
    pub const ZEROS: u8 = 3;
    pub const FINAL: u8 = 4;
    pub const ANSWER: u8 = 5;
}

/// What both ends must agree on before any page moves.
#[derive(Serialize, Deserialize, PartialEq, Eq, Debug)]
pub(crate) struct Hello {
    pub version: String,
    pub mem: u64,
    pub macs: Vec<[u8; 6]>,
    /// The source will send a digest of RAM (the destination then writes zero pages rather
    /// than punching them out, so its digest pass does not fault all of RAM in the downtime).
    #[serde(default)]
    pub verify: bool,
}

/// A vCPU's architectural state (the payload's one vCPU).
#[derive(Serialize, Deserialize)]
pub(crate) struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: Option<kvm_xcrs>,
    events: kvm_vcpu_events,
    msrs: Vec<(u32, u64)>,
}

/// MSRs carried: the TSC first (the payload times itself with it), then what a 64-bit guest
/// may have set. Each is read only if this host's KVM has it.
const MSRS: [u32; 9] = [
    0x10,        // IA32_TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
];

impl VcpuState {
    /// Reads the state of a vCPU that is out of KVM_RUN with no I/O pending.
    pub(crate) fn save(fd: &VcpuFd) -> Result<VcpuState> {
        let kvm = |op| Error::kvm(op, "check dmesg for KVM messages");
        let mut msrs = Vec::new();
        for &index in &MSRS {
            let mut one = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }])
                .map_err(|_| Error::Config("building an MSR list".into()))?;
            if fd.get_msrs(&mut one).map_err(kvm("KVM_GET_MSRS"))? == 1 {
                msrs.push((index, one.as_slice()[0].data));
            }
        }
        Ok(VcpuState {
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().ok(),
            events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            msrs,
        })
    }

    /// Loads it into a fresh vCPU of the destination.
    pub(crate) fn load(&self, fd: &VcpuFd) -> Result<()> {
        let kvm = |op| Error::kvm(op, "the destination's KVM refused the source's vCPU state");
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        if let Some(x) = &self.xcrs {
            fd.set_xcrs(x).map_err(kvm("KVM_SET_XCRS"))?;
        }
        // SAFETY: a kvm_xsave read by KVM_GET_XSAVE on the same host build (the hello checked
        // the version), so its size matches what KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| Error::Config("building an MSR list".into()))?;
        let set = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(Error::Config(format!(
                "the destination's KVM took {set} of the source's {} MSRs (the first refused: {:#x})",
                entries.len(),
                entries[set].index
            )));
        }
        fd.set_vcpu_events(&self.events).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// The stop-and-copy record: what is not guest memory.
#[derive(Serialize, Deserialize)]
pub(crate) struct Final {
    pub vcpu: VcpuState,
    pub nics: Vec<NicState>,
    /// [`digest`] of all of RAM with the guest stopped (asked for with `--migrate-verify`).
    pub digest: Option<Vec<u64>>,
}

/// The destination's answer.
#[derive(Serialize, Deserialize)]
struct Answer {
    error: Option<String>,
}

/// What a migration did, as the source saw it.
#[derive(Clone, Debug, Default)]
pub struct MigrationStats {
    /// Pre-copy rounds after the full copy.
    pub rounds: usize,
    /// Dirty pages in each round (the last is the stop-and-copy).
    pub dirty: Vec<usize>,
    /// Pages sent with their bytes.
    pub pages_sent: u64,
    /// Pages sent as zero.
    pub zero_pages: u64,
    /// Of the dirty pages, those only the switch's log had (vCPU writes are KVM's).
    pub switch_only: u64,
    /// From the start to the destination's answer.
    pub total: Duration,
    /// From parking the vCPU to the destination's answer (the guest ran nowhere).
    pub downtime: Duration,
}

/// A chunk digest of all of RAM: one 64-bit FNV-1a-style hash per MiB, by guest-physical
/// address, so a mismatch says where.
pub(crate) fn digest(ram: &GuestRam) -> Vec<u64> {
    const CHUNK: usize = 1 << 20;
    let mut out = Vec::new();
    for r in ram.mem().iter() {
        let len = r.len() as usize;
        let Ok(host) = r.get_host_address(vm_memory::MemoryRegionAddress(0)) else { continue };
        for off in (0..len).step_by(CHUNK) {
            let n = CHUNK.min(len - off) / 8;
            // SAFETY: `off + n * 8 <= len` inside the region's mapping, which `ram` keeps; u64
            // reads of guest memory nothing writes while the guest is stopped.
            let words = unsafe { std::slice::from_raw_parts(host.add(off).cast::<u64>(), n) };
            let mut h = 0xcbf2_9ce4_8422_2325u64;
            for &w in words {
                h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
            }
            out.push(h);
        }
    }
    out
}

fn write_record(w: &mut impl Write, t: u8, body: &[&[u8]]) -> io::Result<()> {
    let len: usize = body.iter().map(|b| b.len()).sum();
    w.write_all(&[t])?;
    w.write_all(&(len as u32).to_le_bytes())?;
    for b in body {
        w.write_all(b)?;
    }
    Ok(())
}

/// Reads one record; bodies larger than `max` are refused (the peer is another hostvm, but a
/// confused one must not make us allocate without bound).
fn read_record(r: &mut impl Read, max: usize) -> io::Result<(u8, Vec<u8>)> {
    let mut hdr = [0u8; 5];
    r.read_exact(&mut hdr)?;
    let len = u32::from_le_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
    if len > max {
        return Err(io::Error::other(format!("a {len}-byte record (at most {max} expected)")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok((hdr[0], body))
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// The source's side of the stream.
pub(crate) struct Sender<'a> {
    ram: &'a GuestRam,
    out: BufWriter<UnixStream>,
    input: UnixStream,
    pub stats: MigrationStats,
}

impl<'a> Sender<'a> {
    /// Connects to the destination and agrees on `hello`.
    pub(crate) fn connect(path: &Path, ram: &'a GuestRam, hello: &Hello) -> Result<Sender<'a>> {
        let what = format!("connecting to the migration destination {}", path.display());
        let s = UnixStream::connect(path).map_err(|source| Error::Io {
            what: format!("{what} (is `hostvm run --incoming {}` waiting there?)", path.display()),
            source,
        })?;
        s.set_read_timeout(Some(ANSWER_WAIT)).map_err(Error::io(&what))?;
        s.set_write_timeout(Some(ANSWER_WAIT)).map_err(Error::io(&what))?;
        let input = s.try_clone().map_err(Error::io(&what))?;
        let mut me = Sender {
            ram,
            out: BufWriter::with_capacity(1 << 18, s),
            input,
            stats: MigrationStats::default(),
        };
        write_record(&mut me.out, tag::HELLO, &[&json(hello)])
            .map_err(Error::io("sending the migration header"))?;
        me.answer()?;
        Ok(me)
    }

    /// Sends `pages` (guest-physical page numbers, ascending): runs of data, zero pages as
    /// counts.
    pub(crate) fn send_pages(&mut self, pages: &[u64]) -> Result<()> {
        let mut i = 0;
        while i < pages.len() {
            let first = pages[i];
            let zero = self.is_zero(first);
            let mut n = 1;
            while i + n < pages.len()
                && n < RUN
                && pages[i + n] == first + n as u64
                && self.is_zero(first + n as u64) == zero
            {
                n += 1;
            }
            let gpa = (first * PAGE).to_le_bytes();
            let res = if zero {
                self.stats.zero_pages += n as u64;
                write_record(&mut self.out, tag::ZEROS, &[&gpa, &(n as u32).to_le_bytes()])
            } else {
                self.stats.pages_sent += n as u64;
                let host = self
                    .ram
                    .host_addr(first * PAGE, n * PAGE as usize)
                    .ok_or_else(|| Error::Config(format!("dirty page {first:#x} is outside guest RAM")))?;
                // SAFETY: `host_addr` checked `n` pages readable inside the mapping; the guest
                // or the switch may be writing them (that page is then dirty again and sent in
                // a later round).
                let data = unsafe { std::slice::from_raw_parts(host as *const u8, n * PAGE as usize) };
                write_record(&mut self.out, tag::PAGES, &[&gpa, data])
            };
            res.map_err(Error::io("sending guest memory to the destination"))?;
            i += n;
        }
        Ok(())
    }

    fn is_zero(&self, page: u64) -> bool {
        match self.ram.host_addr(page * PAGE, PAGE as usize) {
            // SAFETY: one page inside the mapping (checked by host_addr).
            Some(h) => unsafe { std::slice::from_raw_parts(h as *const u64, PAGE as usize / 8) }
                .iter()
                .all(|&w| w == 0),
            None => false,
        }
    }

    /// Sends the stop-and-copy record and waits for the destination to take the guest.
    pub(crate) fn finish(&mut self, fin: &Final) -> Result<()> {
        write_record(&mut self.out, tag::FINAL, &[&json(fin)])
            .map_err(Error::io("sending the vCPU and NIC state"))?;
        self.answer()
    }

    fn answer(&mut self) -> Result<()> {
        self.out.flush().map_err(Error::io("sending to the migration destination"))?;
        let (t, body) = read_record(&mut self.input, 1 << 16)
            .map_err(Error::io("waiting for the migration destination's answer"))?;
        let a: Answer = (t == tag::ANSWER)
            .then(|| serde_json::from_slice(&body).ok())
            .flatten()
            .ok_or_else(|| Error::Config("the migration destination answered nonsense".into()))?;
        match a.error {
            None => Ok(()),
            Some(e) => Err(Error::Config(format!("the migration destination refused: {e}"))),
        }
    }
}

/// The destination's side: waits for a source on `path`, loads its memory and returns its
/// final record; `answer` then tells the source the outcome.
pub(crate) struct Receiver {
    stream: UnixStream,
    path: std::path::PathBuf,
    /// The source asked for a memory check ([`Hello::verify`]).
    verify: bool,
}

impl Receiver {
    /// Listens on `path` (created owner-only; an existing file there is refused, never
    /// removed) and waits up to `wait` for the source.
    pub(crate) fn accept(path: &Path, wait: Duration) -> Result<Receiver> {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            let what = if m.file_type().is_socket() { "a socket" } else { "a file" };
            return Err(Error::Config(format!(
                "--incoming {}: {what} is already there; remove it if no other hostvm uses it",
                path.display()
            )));
        }
        let what = format!("listening for the migration source on {}", path.display());
        // SAFETY: umask only affects this process's file creation mode.
        let old = unsafe { libc::umask(0o077) };
        let l = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let l = l.map_err(Error::io(&what))?;
        let me_path = path.to_path_buf();
        l.set_nonblocking(true).map_err(Error::io(&what))?;
        let deadline = Instant::now() + wait;
        let stream = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let _ = std::fs::remove_file(path);
                    return Err(Error::Config(format!(
                        "no migration source connected to {} within {} s",
                        path.display(),
                        wait.as_secs()
                    )));
                }
                Err(e) => {
                    let _ = std::fs::remove_file(path);
                    return Err(Error::io(&what)(e));
                }
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(ANSWER_WAIT));
        let _ = stream.set_write_timeout(Some(ANSWER_WAIT));
        Ok(Receiver { stream, path: me_path, verify: false })
    }

    /// Checks the source's header against `mine`; says why not to the source too.
    pub(crate) fn hello(&mut self, mine: &Hello) -> Result<()> {
        let (t, body) =
            read_record(&mut self.stream, 1 << 16).map_err(Error::io("reading the migration header"))?;
        let theirs: Option<Hello> = (t == tag::HELLO).then(|| serde_json::from_slice(&body).ok()).flatten();
        let why = match theirs {
            None => Some("the source sent no hostvm migration header".to_string()),
            Some(h) if h.version != mine.version => Some(format!(
                "the source is {}, this is {}: use the same hostvm on both ends",
                h.version, mine.version
            )),
            Some(h) if h.mem != mine.mem => Some(format!(
                "the source has {} MiB of guest memory, this VM {} MiB: start it with the same --mem",
                h.mem >> 20,
                mine.mem >> 20
            )),
            Some(h) if h.macs != mine.macs => Some(format!(
                "the source's NICs have MACs {:?}, this VM's {:?}: give it the same --net macs, in order",
                h.macs.iter().map(|m| crate::net::Mac(*m).to_string()).collect::<Vec<_>>(),
                mine.macs.iter().map(|m| crate::net::Mac(*m).to_string()).collect::<Vec<_>>()
            )),
            Some(h) => {
                self.verify = h.verify;
                None
            }
        };
        self.answer(why.clone())?;
        match why {
            None => Ok(()),
            Some(w) => Err(Error::Config(format!("migration refused: {w}"))),
        }
    }

    /// Loads pages into `ram` until the final record, which it returns.
    pub(crate) fn receive(&mut self, ram: &GuestRam) -> Result<Final> {
        let max = 8 + RUN * PAGE as usize;
        loop {
            let (t, body) = read_record(&mut self.stream, max.max(1 << 22))
                .map_err(Error::io("receiving the migration stream (did the source give up?)"))?;
            let gpa = |b: &[u8]| b.get(..8).map(|g| u64::from_le_bytes(g.try_into().unwrap_or_default()));
            match t {
                tag::PAGES => {
                    let at = gpa(&body).ok_or_else(|| Error::Config("a short page record".into()))?;
                    ram.mem().write_slice(&body[8..], GuestAddress(at)).map_err(|e| {
                        Error::Config(format!(
                            "the source sent pages at {at:#x} outside this VM's memory: {e}"
                        ))
                    })?;
                }
                tag::ZEROS => {
                    let at = gpa(&body).ok_or_else(|| Error::Config("a short zero record".into()))?;
                    let n =
                        body.get(8..12).map_or(0, |c| u32::from_le_bytes(c.try_into().unwrap_or_default()));
                    if n as usize > RUN {
                        return Err(Error::Config(format!(
                            "a run of {n} zero pages (at most {RUN} expected)"
                        )));
                    }
                    // A hole punched, not zeros written: the full copy is mostly zero pages,
                    // and writing them faulted in all of RAM (~85 ms for 64 MiB, in the
                    // downtime: the final record waited behind them). Written when the source
                    // will ask for a digest, which reads every page anyway.
                    let len = n as usize * PAGE as usize;
                    let res = if self.verify {
                        ram.mem()
                            .write_slice(&vec![0u8; len], GuestAddress(at))
                            .map_err(|e| Error::Config(e.to_string()))
                    } else {
                        ram.zero(at, len)
                    };
                    res.map_err(|e| Error::Config(format!("the source sent zero pages at {at:#x}: {e}")))?;
                }
                tag::FINAL => {
                    return serde_json::from_slice(&body).map_err(|e| {
                        Error::Config(format!("the source's final record does not parse: {e}"))
                    });
                }
                other => return Err(Error::Config(format!("unexpected migration record type {other}"))),
            }
        }
    }

    /// Tells the source the outcome (`None`: the guest runs here now).
    pub(crate) fn answer(&mut self, error: Option<String>) -> Result<()> {
        write_record(&mut self.stream, tag::ANSWER, &[&json(&Answer { error })])
            .map_err(Error::io("answering the migration source"))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Compares the source's digest with this side's memory: the MiB chunks that differ.
pub(crate) fn digest_mismatch(ram: &GuestRam, theirs: &[u64]) -> Vec<usize> {
    let mine = digest(ram);
    let mut bad: Vec<usize> =
        mine.iter().zip(theirs).enumerate().filter(|(_, (a, b))| a != b).map(|(i, _)| i).collect();
    if mine.len() != theirs.len() {
        bad.push(mine.len().min(theirs.len()));
    }
    bad
}

/// The union of two lists of page numbers, sorted; also how many only `b` had.
pub(crate) fn union(mut a: Vec<u64>, b: &[u64]) -> (Vec<u64>, u64) {
    a.sort_unstable();
    let only_b = b.iter().filter(|p| a.binary_search(p).is_err()).count() as u64;
    a.extend_from_slice(b);
    a.sort_unstable();
    a.dedup();
    (a, only_b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_counts_what_only_the_switch_saw() {
        let (u, only) = union(vec![5, 1, 3], &[3, 4, 9]);
        assert_eq!(u, vec![1, 3, 4, 5, 9]);
        assert_eq!(only, 2);
    }

    #[test]
    fn records_round_trip_and_oversized_ones_are_refused() {
        let mut buf = Vec::new();
        write_record(&mut buf, tag::ZEROS, &[&7u64.to_le_bytes(), &3u32.to_le_bytes()]).unwrap();
        let (t, body) = read_record(&mut buf.as_slice(), 64).unwrap();
        assert_eq!((t, body.len()), (tag::ZEROS, 12));
        let err = read_record(&mut buf.as_slice(), 4).unwrap_err().to_string();
        assert!(err.contains("12-byte record"), "{err}");
    }
}
