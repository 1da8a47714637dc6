//! AF_XDP uplink: the switch on an existing Linux network device through XDP sockets, one per
//! queue, without libbpf or clang (the program is the switch's own: [`bpf`]).
//!
//! ```text
//!  device ──XDP redirect──▶ UMEM chunk ──(late copy)──▶ guest buffer
//!  device ◀──TX ring────── UMEM chunk ◀──(one copy)─── guest buffer
//! ```
//!
//! - **Modes** (`mode=`): `zerocopy` (native XDP, the driver writes into the UMEM), `copy`
//!   (native XDP, the kernel copies into the UMEM), `skb` (generic XDP, any device, after the
//!   kernel built its socket buffer), and `auto` (the default), which takes the first of those
//!   three the driver accepts. A veth takes native XDP but not zero copy: `auto` gives `copy`.
//! - **Rings**: per socket a UMEM of 2048 page-sized chunks, half posted to the fill ring and
//!   given back a burst at a time, half for transmit, taken back from the completion ring;
//!   `XDP_USE_NEED_WAKEUP`, so the switch makes a system call only when the kernel waits for
//!   one (copy-mode transmit always does: one `sendto` per 32 frames).
//! - **Frames**: the kernel leaves 256 bytes before a received frame in its chunk; the switch
//!   writes its virtio-net header there, so the frame is handed on where it landed (the one
//!   late copy is into the guest). A jumbo frame (MTU over 3822, the program and sockets are
//!   multi-buffer, Linux 6.6) arrives in several chunks and is gathered first. Sending is one
//!   copy from the guest's buffers into chunks. AF_XDP carries no offload metadata: TSO frames
//!   are segmented and partial checksums completed by the switch.
//! - **Sharing the host**: the program is attached with a BPF link that the kernel drops with
//!   the switch's descriptor (port removal, exit, a crash): nothing stale is left behind. A
//!   device another XDP program holds is refused, naming the program.
//! - **VLANs**: a NIC that strips VLAN tags (`rxvlan`) takes them off before XDP sees the
//!   frame, and AF_XDP has no place for them: the switch warns; turn it off with
//!   `ethtool -K DEV rxvlan off`.

pub mod ring;

use std::fs::File;
use std::io;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use xdpilone::{IfInfo, Socket, SocketConfig, UmemConfig};

use self::ring::{Area, XskRx, XskTx, CHUNK, RX_HEADROOM};
use super::bpf;
use super::tap::{if_ioctl, set_up, TapQueue};

/// Chunks of a socket's UMEM posted for receive, and kept for transmit (ring sizes too).
/// Receive takes 4096 (16 MiB a queue): the ring has to ride out the polling thread's time off
/// the CPU. With 1024 on this 2-vCPU machine, a quarter to a half of a 0.3 Mpps stream was
/// dropped with the ring full while the thread was preempted (benches/results/2026-12-06-afxdp.txt);
/// with 4096, none. (A packet socket's megabytes of buffer hide the same gaps.)
const RX_CHUNKS: u32 = 4096;
const TX_CHUNKS: u32 = 1024;
/// `XDP_USE_SG`: a frame may take several chunks (Linux 6.6).
const XDP_USE_SG: u16 = 1 << 4;

/// How the sockets reach the device (`mode=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// The best the driver offers: zero copy, else native copy, else generic.
    #[default]
    Auto,
    /// Native XDP, the driver writes into the UMEM.
    Zerocopy,
    /// Native XDP, the kernel copies into the UMEM.
    Copy,
    /// Generic XDP (any device).
    Skb,
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            XdpMode::Auto => "auto",
            XdpMode::Zerocopy => "zerocopy",
            XdpMode::Copy => "copy",
            XdpMode::Skb => "skb",
        })
    }
}

impl std::str::FromStr for XdpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => XdpMode::Auto,
            "zerocopy" => XdpMode::Zerocopy,
            "copy" => XdpMode::Copy,
            "skb" => XdpMode::Skb,
            _ => return Err(format!("mode={s}: expected auto, zerocopy, copy or skb")),
        })
    }
}

/// One way of attaching: the program's mode, the sockets' bind flag, and its name.
#[derive(Clone, Copy)]
struct Way {
    attach: u32,
    bind: u16,
    name: &'static str,
}

const ZEROCOPY: Way =
    Way { attach: bpf::XDP_FLAGS_DRV_MODE, bind: SocketConfig::XDP_BIND_ZEROCOPY, name: "zerocopy" };
const COPY: Way = Way { attach: bpf::XDP_FLAGS_DRV_MODE, bind: SocketConfig::XDP_BIND_COPY, name: "copy" };
const SKB: Way = Way { attach: bpf::XDP_FLAGS_SKB_MODE, bind: SocketConfig::XDP_BIND_COPY, name: "skb" };

impl XdpMode {
    fn ways(self) -> &'static [Way] {
        match self {
            XdpMode::Auto => &[ZEROCOPY, COPY, SKB],
            XdpMode::Zerocopy => &[ZEROCOPY],
            XdpMode::Copy => &[COPY],
            XdpMode::Skb => &[SKB],
        }
    }
}

/// Why an AF_XDP port could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    /// No such device.
    #[error("no network device '{0}' in the switch's network namespace (see `ip link`)")]
    NoDevice(String),
    /// Another program holds the device.
    #[error("AF_XDP on '{dev}': another XDP program is attached ({holder}); the switch attaches only its own: remove that one (`ip link set dev {dev} xdp off`, or stop the program that holds it) or use another device")]
    Busy {
        /// The device.
        dev: String,
        /// What holds it.
        holder: String,
    },
    /// A step failed.
    #[error("AF_XDP on '{dev}': {what} failed: {source}{hint}")]
    Step {
        /// The device.
        dev: String,
        /// The step.
        what: String,
        /// Cause.
        source: io::Error,
        /// What to check.
        hint: String,
    },
    /// No mode the driver accepts.
    #[error("AF_XDP on '{dev}': the driver accepts none of mode={mode}'s ways ({tried}); try mode=skb (generic XDP works on any device)")]
    NoMode {
        /// The device.
        dev: String,
        /// Asked for.
        mode: XdpMode,
        /// What each try answered.
        tried: String,
    },
    /// The MTU is beyond a single chunk and the kernel lacks multi-buffer AF_XDP.
    #[error("AF_XDP on '{dev}': MTU {mtu} needs multi-buffer AF_XDP (Linux 6.6), which this kernel refused; set an MTU of at most {max} or use afpacket:")]
    Mtu {
        /// The device.
        dev: String,
        /// Its MTU.
        mtu: u32,
        /// The most one chunk carries.
        max: u32,
    },
}

/// What an errno from `bpf(2)` or an XDP socket call means for the user.
fn hint(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (AF_XDP needs CAP_NET_ADMIN and CAP_NET_RAW, and loading the program CAP_BPF or CAP_SYS_ADMIN; \
             a kernel with kernel.unprivileged_bpf_disabled refuses it to others)"
                .into()
        }
        Some(libc::ENOMEM) => {
            " (the UMEM is pinned memory: raise the locked-memory limit, `ulimit -l`)".into()
        }
        Some(libc::EAFNOSUPPORT) => " (this kernel has no XDP sockets: CONFIG_XDP_SOCKETS)".into(),
        Some(libc::ENOSYS) => " (this kernel has no bpf(2): CONFIG_BPF_SYSCALL)".into(),
        Some(libc::EBUSY) => " (another XDP socket is bound to this queue)".into(),
        Some(libc::ENOSPC) => " (the driver has too few queues for native XDP: a veth wants as many \
                               receive queues as its peer has transmit queues; a NIC may need fewer \
                               channels, `ethtool -L DEV combined N`)"
            .into(),
        _ => String::new(),
    }
}

/// One queue's halves before the port takes them.
type Halves = (XskRx, XskTx, Arc<File>);

/// A device the switch reaches through XDP sockets, one per queue.
pub struct XdpDevice {
    /// Interface name.
    pub name: String,
    /// The way it was attached (`zerocopy`, `copy` or `skb`).
    pub way: &'static str,
    /// Whether frames may take several chunks (jumbo frames).
    pub multi_buffer: bool,
    halves: Mutex<Vec<Option<Halves>>>,
    queues: usize,
    map: OwnedFd,
    // Dropped last (fields drop in order): the program stays until its sockets are gone.
    _link: OwnedFd,
    _prog: OwnedFd,
}

/// Receive queues the device has (`/sys/class/net/DEV/queues/rx-N`).
fn rx_queues(name: &str) -> Option<usize> {
    let dir = std::fs::read_dir(format!("/sys/class/net/{name}/queues")).ok()?;
    Some(dir.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("rx-")).count())
}

/// Whether the device strips VLAN tags on receive (the legacy `ETHTOOL_GFLAGS` word).
fn strips_vlan(name: &str) -> bool {
    const ETHTOOL_GFLAGS: u32 = 0x25;
    const ETH_FLAG_RXVLAN: u32 = 1 << 8;
    let mut cmd = [ETHTOOL_GFLAGS, 0u32];
    let r = if_ioctl(name, libc::SIOCETHTOOL, |r| r.ifr_ifru.ifru_data = cmd.as_mut_ptr().cast());
    r.is_ok() && cmd[1] & ETH_FLAG_RXVLAN != 0
}

impl XdpDevice {
    /// Attaches the switch's program to the existing device `name` and binds `queues` sockets
    /// (queue ids 0..queues) in `mode`; sets the MTU if given and brings the link up.
    pub fn open(name: &str, queues: u16, mode: XdpMode, mtu: Option<u32>) -> Result<Self, XdpError> {
        let cname = std::ffi::CString::new(name).map_err(|_| XdpError::NoDevice(name.into()))?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(XdpError::NoDevice(name.into()));
        }
        let step = |what: &str, source: io::Error| {
            let hint = hint(&source);
            XdpError::Step { dev: name.into(), what: what.into(), source, hint }
        };
        if let Some(m) = mtu {
            if_ioctl(name, libc::SIOCSIFMTU, |r| r.ifr_ifru.ifru_mtu = m as libc::c_int)
                .map_err(|e| step("setting the MTU", e))?;
        }
        set_up(name).map_err(|e| step("bringing the link up", e))?;
        let queues = queues.max(1) as usize;
        let have = rx_queues(name);
        if let Some(have) = have.filter(|&h| h > queues) {
            tracing::warn!(
                device = name,
                "the device has {have} receive queues and the port binds {queues}: frames it puts on \
                 queues {queues}..{} go to the kernel's stack, not the switch; give queues={have} or \
                 make it use fewer (ethtool -L {name} combined {queues})",
                have - 1
            );
        }
        if let Some(have) = have.filter(|&h| h < queues) {
            return Err(step(
                &format!("queues={queues}"),
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the device has {have} receive queue(s)"),
                ),
            ));
        }
        // SAFETY: SIOCGIFMTU fills the MTU member.
        let dev_mtu = if_ioctl(name, libc::SIOCGIFMTU, |_| {})
            .map(|r| unsafe { r.ifr_ifru.ifru_mtu } as u32)
            .map_err(|e| step("reading the MTU", e))?;
        // The frame with its Ethernet header and one VLAN tag.
        let max_frame = dev_mtu as usize + 18;
        if strips_vlan(name) {
            tracing::warn!(device = name, "the device strips VLAN tags before XDP sees frames (AF_XDP has no place for them): tagged frames reach the switch untagged; turn it off: ethtool -K {name} rxvlan off");
        }
        let map = bpf::socket_map(queues as u32).map_err(|e| step("creating the socket map (bpf)", e))?;
        let (prog, frags) = match bpf::load(&map, true) {
            Ok(p) => (p, true),
            Err(_) => match bpf::load(&map, false) {
                Ok(p) => (p, false),
                Err((e, log)) => return Err(step(&format!("loading the XDP program (verifier: {log})"), e)),
            },
        };
        let one_chunk = CHUNK - RX_HEADROOM;
        if !frags && max_frame > one_chunk as usize {
            return Err(XdpError::Mtu { dev: name.into(), mtu: dev_mtu, max: one_chunk - 18 });
        }
        let mut tried = Vec::new();
        for way in mode.ways() {
            let link = match bpf::attach(&prog, ifindex, way.attach) {
                Ok(l) => l,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return Err(XdpError::Busy { dev: name.into(), holder: holder(name) })
                }
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    return Err(step("attaching the program", e))
                }
                Err(e) => {
                    tried.push(format!("{}: attach: {e}{}", way.name, hint(&e)));
                    continue;
                }
            };
            match bind_all(ifindex, queues, way.bind, frags, max_frame, &map) {
                Ok((halves, sg)) => {
                    if !sg && max_frame > one_chunk as usize {
                        return Err(XdpError::Mtu { dev: name.into(), mtu: dev_mtu, max: one_chunk - 18 });
                    }
                    tracing::info!(
                        device = name,
                        way = way.name,
                        queues,
                        multi_buffer = sg,
                        not_taken = tried.join("; "),
                        "AF_XDP attached"
                    );
                    return Ok(XdpDevice {
                        name: name.into(),
                        way: way.name,
                        multi_buffer: sg,
                        halves: Mutex::new(halves.into_iter().map(Some).collect()),
                        queues,
                        map,
                        _link: link,
                        _prog: prog,
                    });
                }
                Err((what, e))
                    if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOMEM | libc::EBUSY)) =>
                {
                    return Err(step(&what, e))
                }
                Err((what, e)) => tried.push(format!("{}: {what}: {e}{}", way.name, hint(&e))),
            }
        }
        Err(XdpError::NoMode { dev: name.into(), mode, tried: tried.join("; ") })
    }

    /// Number of queues.
    pub fn queues(&self) -> usize {
        self.queues
    }

    /// Queue `i`'s source and sink (each once: the rings move into the port's slots).
    pub fn take(&self, i: usize) -> Option<(TapQueue, TapQueue)> {
        let (rx, tx, file) = self.halves.lock().ok()?.get_mut(i)?.take()?;
        Some((
            TapQueue::xsk(file.clone(), &self.name, Box::new(rx)),
            TapQueue::xsk_sink(file, &self.name, Box::new(tx)),
        ))
    }
}

impl Drop for XdpDevice {
    fn drop(&mut self) {
        for q in 0..self.queues as u32 {
            let _ = bpf::map_clear(&self.map, q);
        }
    }
}

/// What holds the device's XDP hook, in words (for the refusal).
fn holder(name: &str) -> String {
    let Ok(rt) = vfpolicy::Rtnl::open() else { return "unknown".into() };
    match rt.xdp_prog(name) {
        Ok(Some((id, mode))) => {
            let pname = bpf::prog_name(id).unwrap_or_default();
            let whose = if pname == bpf::PROG_NAME { ", another switch's" } else { "" };
            format!("program id {id} '{pname}' in {mode} mode{whose}")
        }
        Ok(None) => "a program the kernel does not name".into(),
        Err(e) => format!("unknown: {e}"),
    }
}

/// Binds one socket per queue in `bind` mode (with multi-buffer if the program takes it,
/// falling back without), and puts each in the map. On failure: the step and its error.
fn bind_all(
    ifindex: u32,
    queues: usize,
    bind: u16,
    frags: bool,
    max_frame: usize,
    map: &OwnedFd,
) -> Result<(Vec<Halves>, bool), (String, io::Error)> {
    let mut sg = frags;
    let mut out = Vec::new();
    for q in 0..queues as u32 {
        let h = match bind_one(ifindex, q, bind, sg, max_frame) {
            Err((_, e)) if sg && q == 0 && e.raw_os_error() == Some(libc::EINVAL) => {
                sg = false;
                bind_one(ifindex, q, bind, false, max_frame)
            }
            r => r,
        }?;
        bpf::map_set(map, q, h.2.as_raw_fd()).map_err(|e| (format!("registering queue {q}'s socket"), e))?;
        out.push(h);
    }
    Ok((out, sg))
}

fn bind_one(
    ifindex: u32,
    q: u32,
    bind: u16,
    sg: bool,
    max_frame: usize,
) -> Result<Halves, (String, io::Error)> {
    let x = |what: &str| {
        let what = what.to_string();
        move |e: xdpilone::Errno| (what, io::Error::from_raw_os_error(e.get_raw()))
    };
    let cfg = UmemConfig {
        fill_size: RX_CHUNKS,
        complete_size: TX_CHUNKS,
        frame_size: CHUNK,
        headroom: 0,
        flags: 0,
    };
    let area = Area::new(RX_CHUNKS + TX_CHUNKS, cfg).map_err(|e| ("registering the UMEM".to_string(), e))?;
    let mut info = IfInfo::invalid();
    info.from_ifindex(ifindex).map_err(x("finding the device"))?;
    info.set_queue(q);
    let sock = Socket::with_shared(&info, &area.umem).map_err(x("making the socket"))?;
    let dq = area.umem.fq_cq(&sock).map_err(x("making the fill and completion rings"))?;
    let fd = dq.as_raw_fd();
    // SAFETY: setting close-on-exec on our own socket (xdpilone opens it without).
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    let flags = SocketConfig::XDP_BIND_NEED_WAKEUP | bind | if sg { XDP_USE_SG } else { 0 };
    let rings = SocketConfig {
        rx_size: NonZeroU32::new(RX_CHUNKS),
        tx_size: NonZeroU32::new(TX_CHUNKS),
        bind_flags: flags,
    };
    let user = area.umem.rx_tx(&sock, &rings).map_err(x("making the RX and TX rings"))?;
    let rx = user.map_rx().map_err(x("mapping the RX ring"))?;
    let tx = user.map_tx().map_err(x("mapping the TX ring"))?;
    let chunk = u64::from(CHUNK);
    let rx_chunks: Vec<u64> = (0..u64::from(RX_CHUNKS)).map(|i| i * chunk).collect();
    let tx_chunks: Vec<u64> =
        (u64::from(RX_CHUNKS)..u64::from(RX_CHUNKS + TX_CHUNKS)).map(|i| i * chunk).collect();
    let (fill, comp) = dq.into_parts();
    let rx = XskRx::new(area.clone(), rx, fill, rx_chunks, max_frame);
    area.umem.bind(&user).map_err(x(&format!("binding queue {q}")))?;
    // A descriptor of the socket for the polling thread's epoll.
    // SAFETY: duplicating our socket; the copy is owned by the File.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(("duplicating the socket".into(), io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor we own.
    let file = Arc::new(File::from(unsafe { OwnedFd::from_raw_fd(dup) }));
    let tx = XskTx::new(area, tx, comp, tx_chunks, sg);
    Ok((rx, tx, file))
}
