//! The frontend's vIOMMU, as QEMU plays it for a guest behind `intel-iommu`: descriptors and
//! rings carry IOVAs; the backend asks for translations over the backend channel
//! (`VHOST_USER_BACKEND_IOTLB_MSG` misses) and a thread here answers each with an
//! `IOTLB_MSG` update on the control socket, one page at a time. Unmapping a range sends an
//! invalidation, as QEMU's IOMMU notifier does.
//!
//! By default IOVA `iova_base + off` maps byte `off` of guest memory, read-write; tests remap
//! or unmap pages, or send raw IOTLB messages of their own.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// `VHOST_USER_IOTLB_MSG` (frontend → backend).
const REQ_IOTLB_MSG: u32 = 22;
/// `VHOST_USER_BACKEND_IOTLB_MSG` (backend → frontend).
const BACKEND_IOTLB_MSG: u32 = 1;
const HDR_VERSION: u32 = 0x1;
const HDR_REPLY: u32 = 0x4;
const HDR_NEED_REPLY: u32 = 0x8;
pub use iommu::iotlb_msg::{
    IotlbMsg, ACCESS_RO, ACCESS_RW, ACCESS_WO, IOTLB_INVALIDATE, IOTLB_MISS, IOTLB_UPDATE,
};

/// How the frontend plays a vIOMMU.
#[derive(Clone, Debug)]
pub struct IommuConfig {
    /// IOVA of the first byte of guest memory.
    pub iova_base: u64,
    /// Size of the mapping sent for each miss (4 KiB like intel-iommu's pages).
    pub page: u64,
    /// Answer misses (false: a vIOMMU that never translates, for fault tests).
    pub serve_misses: bool,
    /// Send updates for all of guest memory before the rings are set up, so the datapath
    /// never misses (benchmarks).
    pub prefill: bool,
}

impl Default for IommuConfig {
    fn default() -> Self {
        IommuConfig { iova_base: 0x1_0000_0000, page: 4096, serve_misses: true, prefill: false }
    }
}

/// The vIOMMU's page table: the default identity-offset rule, with per-page overrides.
struct Table {
    iova_base: u64,
    /// Frontend address of guest memory's first byte, and its length.
    uva_base: u64,
    len: u64,
    page: u64,
    /// page IOVA → Some((uaddr, perm)) remapped, None unmapped.
    overrides: BTreeMap<u64, Option<(u64, u8)>>,
}

impl Table {
    fn lookup(&self, page_iova: u64) -> Option<(u64, u8)> {
        if let Some(o) = self.overrides.get(&page_iova) {
            return *o;
        }
        let off = page_iova.checked_sub(self.iova_base)?;
        (off < self.len).then(|| (self.uva_base + off, ACCESS_RW))
    }
}

/// Counters of the vIOMMU.
#[derive(Debug, Default)]
pub struct ViommuStats {
    /// Misses received from the backend.
    pub misses: AtomicU64,
    /// Misses answered with an update.
    pub served: AtomicU64,
    /// Misses left unanswered (nothing mapped there, or answering is off).
    pub unserved: AtomicU64,
    /// Updates the backend refused (failure status).
    pub refused: AtomicU64,
}

/// The control socket, shared by the setup code and the miss server: one request and its
/// reply at a time.
pub(crate) type SharedCtl = Arc<Mutex<UnixStream>>;

/// Sends one IOTLB message on the control socket and waits for its status (0 = accepted).
pub(crate) fn send_iotlb(ctl: &SharedCtl, m: &IotlbMsg) -> io::Result<u64> {
    let mut s = ctl.lock().map_err(|_| io::Error::other("control socket lock poisoned"))?;
    let mut msg = [0u8; 44];
    msg[0..4].copy_from_slice(&REQ_IOTLB_MSG.to_le_bytes());
    msg[4..8].copy_from_slice(&(HDR_VERSION | HDR_NEED_REPLY).to_le_bytes());
    msg[8..12].copy_from_slice(&32u32.to_le_bytes());
    msg[12..].copy_from_slice(&m.encode());
    s.write_all(&msg)?;
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply)?;
    let word = |i: usize| u32::from_le_bytes(reply[i..i + 4].try_into().unwrap_or_default());
    if word(0) != REQ_IOTLB_MSG || word(4) & HDR_REPLY == 0 || word(8) != 8 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected reply to IOTLB_MSG"));
    }
    Ok(u64::from_le_bytes(reply[12..20].try_into().unwrap_or_default()))
}

/// The running vIOMMU: its table and the thread answering misses.
pub(crate) struct Viommu {
    table: Arc<Mutex<Table>>,
    ctl: SharedCtl,
    pub(crate) stats: Arc<ViommuStats>,
    stop: Arc<AtomicBool>,
    serve: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    iova_base: u64,
}

impl Viommu {
    /// Starts answering misses arriving on `backend` (our end of the backend channel).
    pub(crate) fn start(
        cfg: IommuConfig,
        uva_base: u64,
        len: u64,
        ctl: SharedCtl,
        backend: UnixStream,
    ) -> io::Result<Viommu> {
        let page = cfg.page.max(4096).next_power_of_two();
        let table = Arc::new(Mutex::new(Table {
            iova_base: cfg.iova_base,
            uva_base,
            len,
            page,
            overrides: BTreeMap::new(),
        }));
        let stats = Arc::new(ViommuStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        backend.set_read_timeout(Some(Duration::from_millis(50)))?;
        let serve = Arc::new(AtomicBool::new(cfg.serve_misses));
        let thread = {
            let (table, ctl, stats, stop) = (table.clone(), ctl.clone(), stats.clone(), stop.clone());
            let serve = serve.clone();
            std::thread::Builder::new()
                .name("viommu".into())
                .spawn(move || serve_misses(backend, table, ctl, stats, stop, serve))?
        };
        Ok(Viommu { table, ctl, stats, stop, serve, thread: Some(thread), iova_base: cfg.iova_base })
    }

    /// Sends updates covering all of guest memory, one per page of the configured size.
    pub(crate) fn prefill(&self) -> io::Result<()> {
        let (base, uva, len, chunk) = {
            let t = self.table.lock().map_err(|_| io::Error::other("poisoned"))?;
            (t.iova_base, t.uva_base, t.len, t.page)
        };
        let mut off = 0;
        while off < len {
            let size = chunk.min(len - off);
            let m =
                IotlbMsg { iova: base + off, size, uaddr: uva + off, perm: ACCESS_RW, kind: IOTLB_UPDATE };
            if send_iotlb(&self.ctl, &m)? != 0 {
                return Err(io::Error::other(format!("backend refused the IOTLB update at {:#x}", m.iova)));
            }
            off += size;
        }
        Ok(())
    }

    /// Maps `[iova, iova + size)` (whole pages) to guest-memory offset `off`, with `perm`.
    /// Nothing is sent: the backend learns it on its next miss (or after an invalidation).
    pub(crate) fn map(&self, iova: u64, size: u64, uaddr: u64, perm: u8) {
        self.set_pages(iova, size, |k| Some((uaddr + k, perm)));
    }

    /// Overrides the table for each page of `[iova, iova + size)` with `what(offset)`.
    fn set_pages(&self, iova: u64, size: u64, what: impl Fn(u64) -> Option<(u64, u8)>) {
        if let Ok(mut t) = self.table.lock() {
            let page = t.page;
            for k in (0..size).step_by(page as usize) {
                t.overrides.insert(iova + k, what(k));
            }
        }
    }

    /// Unmaps `[iova, iova + size)` and tells the backend (an invalidation, as QEMU does when
    /// the guest unmaps). Returns the backend's status.
    pub(crate) fn unmap(&self, iova: u64, size: u64) -> io::Result<u64> {
        self.set_pages(iova, size, |_| None);
        send_iotlb(&self.ctl, &IotlbMsg { iova, size, uaddr: 0, perm: 0, kind: IOTLB_INVALIDATE })
    }

    /// Starts or stops answering misses (a vIOMMU that goes quiet, then comes back).
    pub(crate) fn serve_misses(&self, on: bool) {
        self.serve.store(on, Ordering::Relaxed);
    }

    /// The shared control socket (raw IOTLB messages).
    pub(crate) fn ctl(&self) -> &SharedCtl {
        &self.ctl
    }

    /// IOVA of guest-memory offset `off` under the default mapping.
    pub(crate) fn iova_base(&self) -> u64 {
        self.iova_base
    }
}

impl Drop for Viommu {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_misses(
    mut backend: UnixStream,
    table: Arc<Mutex<Table>>,
    ctl: SharedCtl,
    stats: Arc<ViommuStats>,
    stop: Arc<AtomicBool>,
    serve: Arc<AtomicBool>,
) {
    let mut buf = [0u8; 44];
    while !stop.load(Ordering::Relaxed) {
        match backend.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(_) => return, // the backend closed the channel
        }
        let word = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().unwrap_or_default());
        if word(0) != BACKEND_IOTLB_MSG || word(8) != 32 {
            tracing::warn!("unexpected backend request {} of {} bytes", word(0), word(8));
            return;
        }
        let m = IotlbMsg::decode(&buf[12..44]).unwrap_or(IotlbMsg {
            iova: 0,
            size: 0,
            uaddr: 0,
            perm: 0,
            kind: 0,
        });
        if m.kind != IOTLB_MISS {
            continue;
        }
        stats.misses.fetch_add(1, Ordering::Relaxed);
        let found = table.lock().ok().and_then(|t| {
            let page_iova = m.iova & !(t.page - 1);
            t.lookup(page_iova).map(|(uaddr, perm)| (page_iova, t.page, uaddr, perm))
        });
        match found {
            Some((iova, size, uaddr, perm)) if serve.load(Ordering::Relaxed) => {
                let u = IotlbMsg { iova, size, uaddr, perm, kind: IOTLB_UPDATE };
                match send_iotlb(&ctl, &u) {
                    Ok(0) => stats.served.fetch_add(1, Ordering::Relaxed),
                    Ok(_) => stats.refused.fetch_add(1, Ordering::Relaxed),
                    Err(_) => return,
                };
            }
            _ => {
                stats.unserved.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
