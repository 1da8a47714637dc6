//! A NIC's datapath connection: a vhost-user frontend speaking to the switch.
//!
//! hostvm never touches packets. When the guest's driver sets DRIVER_OK, the [`Link`] sends
//! the switch the memory table, each vring's size, base and addresses, the kick eventfd (a
//! KVM ioeventfd on the queue-notify register) and the call eventfd (a KVM irqfd, or for the
//! payload an fd the idle vCPU waits on). From then on the switch and the guest talk through
//! shared memory and those two eventfds.
//!
//! The link survives the switch: a supervisor thread watches the socket, and when the switch
//! goes away it reconnects (client mode: retries the socket; server mode: accepts again on
//! the listener it keeps), negotiates again, and if the device is live re-sends the memory
//! table and ring state, resuming each ring at the guest's used index (QEMU's rule: what the
//! old switch took but never returned is offered again).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use virtq::features::{
    NET_F_CSUM, NET_F_GUEST_CSUM, NET_F_GUEST_ECN, NET_F_GUEST_TSO4, NET_F_GUEST_TSO6, NET_F_HOST_ECN,
    NET_F_HOST_TSO4, NET_F_HOST_TSO6, NET_F_MRG_RXBUF, RING_F_EVENT_IDX, RING_F_INDIRECT_DESC,
    VHOST_USER_F_PROTOCOL_FEATURES as F_PROTOCOL_FEATURES,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::GuestRam;
use crate::{Error, Result};

/// Queues per NIC: receive (0) and transmit (1).
pub const QUEUES: usize = 2;
/// Largest queue a guest may configure.
pub const QUEUE_MAX: u16 = 1024;

/// `VIRTIO_F_VERSION_1`.
pub use virtq::features::F_VERSION_1;
/// `VIRTIO_NET_F_MAC`: hostvm serves the MAC from its own config space.
pub use virtq::features::NET_F_MAC as F_MAC;

/// Device features a guest may negotiate with the switch through hostvm: checksum and TSO
/// offloads, mergeable buffers, event index, indirect descriptors, VERSION_1. Not MQ (one
/// queue pair per NIC), not ACCESS_PLATFORM (no vIOMMU), not packed rings.
pub const PASS_FEATURES: u64 = NET_F_CSUM
    | NET_F_GUEST_CSUM
    | NET_F_GUEST_TSO4
    | NET_F_GUEST_TSO6
    | NET_F_GUEST_ECN
    | NET_F_HOST_TSO4
    | NET_F_HOST_TSO6
    | NET_F_HOST_ECN
    | NET_F_MRG_RXBUF
    | RING_F_INDIRECT_DESC
    | RING_F_EVENT_IDX
    | F_VERSION_1;

/// How long a (re)connection may take before the link reports the switch unreachable.
const CONNECT_RETRY: Duration = Duration::from_millis(100);

/// `--net socket=PATH,mac=MAC[,server]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    /// The switch port's vhost-user socket.
    pub socket: PathBuf,
    /// The NIC's MAC.
    pub mac: [u8; 6],
    /// hostvm listens and the switch connects (the switch port is in client mode).
    pub server: bool,
}

impl FromStr for NetSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<NetSpec, String> {
        let (mut socket, mut mac, mut server) = (None, None, false);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("socket", p)) if !p.is_empty() => socket = Some(PathBuf::from(p)),
                Some(("mac", m)) => mac = Some(parse_mac(m)?),
                None if part == "server" => server = true,
                None if part == "client" => server = false,
                _ => {
                    return Err(format!(
                    "bad --net item `{part}`: expected socket=PATH, mac=XX:XX:XX:XX:XX:XX, server or client"
                ))
                }
            }
        }
        let socket = socket.ok_or("--net needs socket=PATH (the switch port's vhost-user socket)")?;
        let mac = mac.ok_or("--net needs mac=XX:XX:XX:XX:XX:XX")?;
        Ok(NetSpec { socket, mac, server })
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> std::result::Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("bad MAC `{s}`: expected six hex bytes like 52:54:00:00:00:01"));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC `{s}`: `{p}` is not a hex byte"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("bad MAC `{s}`: a NIC's address cannot be multicast"));
    }
    Ok(mac)
}

/// Formats a MAC.
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

/// One virtqueue as the driver configured it (guest-physical addresses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueAddrs {
    /// Number of descriptors.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

/// What the driver set up before DRIVER_OK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activation {
    /// Features the driver acked.
    pub features: u64,
    /// Its queues.
    pub queues: [QueueAddrs; QUEUES],
}

struct Conn {
    fe: Frontend,
    /// Another handle on the socket, watched for hang-up.
    sock: UnixStream,
    /// What the switch offers (virtio features).
    offered: u64,
}

struct State {
    conn: Option<Conn>,
    /// Features shown to the guest (fixed at the first connection).
    device_features: u64,
    active: Option<Activation>,
}

struct Shared {
    nic: usize,
    spec: NetSpec,
    ram: Arc<GuestRam>,
    kick: [EventFd; QUEUES],
    call: [EventFd; QUEUES],
    listener: Option<UnixListener>,
    state: Mutex<State>,
    stop: AtomicBool,
    /// Connections made so far (1 after start; more after reconnects).
    connections: AtomicU64,
}

/// A NIC's link to the switch. Cheap to share; the supervisor thread stops on [`Link::shutdown`].
pub struct Link {
    shared: Arc<Shared>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl Link {
    /// Connects to the switch (or waits for it, in server mode) for up to `wait`, negotiates,
    /// and starts watching the connection.
    pub fn connect(nic: usize, spec: NetSpec, ram: Arc<GuestRam>, wait: Duration) -> Result<Link> {
        let net_err = |what: String| Error::Net { nic, path: spec.socket.clone(), what };
        let efd = || EventFd::new(EFD_NONBLOCK).map_err(|e| net_err(format!("eventfd: {e}")));
        let listener = if spec.server { Some(listen(&spec.socket).map_err(net_err)?) } else { None };
        let stream = open(&spec.socket, listener.as_ref(), wait, &AtomicBool::new(false)).map_err(net_err)?;
        let conn = negotiate(stream).map_err(net_err)?;
        let device_features = (conn.offered & PASS_FEATURES) | F_MAC;
        if device_features & F_VERSION_1 == 0 {
            return Err(net_err("the switch does not offer VIRTIO_F_VERSION_1, which hostvm needs".into()));
        }
        tracing::info!(nic, "connected to {} (offers {:#x})", spec.socket.display(), conn.offered);
        let shared = Arc::new(Shared {
            nic,
            kick: [efd()?, efd()?],
            call: [efd()?, efd()?],
            spec,
            ram,
            listener,
            state: Mutex::new(State { conn: Some(conn), device_features, active: None }),
            stop: AtomicBool::new(false),
            connections: AtomicU64::new(1),
        });
        let s = shared.clone();
        let handle = thread::Builder::new()
            .name(format!("hostvm-net{nic}"))
            .spawn(move || supervise(&s))
            .map_err(|e| Error::io("starting the NIC supervisor thread")(e))?;
        Ok(Link { shared, supervisor: Mutex::new(Some(handle)) })
    }

    /// Features the guest may negotiate.
    pub fn device_features(&self) -> u64 {
        self.shared.lock().device_features
    }

    /// The kick eventfd of queue `q` (register it as an ioeventfd).
    pub fn kick_fd(&self, q: usize) -> &EventFd {
        &self.shared.kick[q]
    }

    /// The call eventfd of queue `q` (register it as an irqfd, or wait on it).
    pub fn call_fd(&self, q: usize) -> &EventFd {
        &self.shared.call[q]
    }

    /// Connections made so far (1 + reconnects).
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// The driver set DRIVER_OK: hand the rings to the switch (now, or when it is back).
    pub fn activate(&self, act: Activation) -> Result<()> {
        let mut st = self.shared.lock();
        st.active = Some(act);
        let res = match st.conn.as_mut() {
            Some(conn) => start_rings(&self.shared, conn, &act, false),
            None => Ok(()),
        };
        drop(st);
        res.map_err(|what| self.err(what))
    }

    /// The driver reset the device: stop the switch's rings (GET_VRING_BASE).
    pub fn reset(&self) {
        let mut st = self.shared.lock();
        if st.active.take().is_some() {
            if let Some(conn) = st.conn.as_mut() {
                for q in 0..QUEUES {
                    if let Err(e) = conn.fe.get_vring_base(q) {
                        tracing::warn!(nic = self.shared.nic, "stopping ring {q}: {e}");
                    }
                }
            }
        }
    }

    /// Stops the supervisor (the connection closes when the link is dropped).
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.supervisor.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }

    fn err(&self, what: String) -> Error {
        Error::Net { nic: self.shared.nic, path: self.shared.spec.socket.clone(), what }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shutdown();
        if self.shared.spec.server {
            let _ = std::fs::remove_file(&self.shared.spec.socket);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn listen(path: &Path) -> std::result::Result<UnixListener, String> {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if md.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    let l = UnixListener::bind(path).map_err(|e| format!("cannot listen: {e}"))?;
    l.set_nonblocking(true).map_err(|e| format!("listener: {e}"))?;
    Ok(l)
}

/// Connects (client) or accepts (server) within `wait`, giving up early on `stop`.
fn open(
    path: &Path,
    listener: Option<&UnixListener>,
    wait: Duration,
    stop: &AtomicBool,
) -> std::result::Result<UnixStream, String> {
    let deadline = Instant::now() + wait;
    loop {
        let attempt = match listener {
            Some(l) => match l.accept() {
                Ok((s, _)) => Ok(Some(s)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(format!("accept: {e}")),
            },
            None => match UnixStream::connect(path) {
                Ok(s) => Ok(Some(s)),
                Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
                    Ok(None)
                }
                Err(e) => Err(format!("connect: {e}")),
            },
        };
        if let Some(s) = attempt? {
            s.set_nonblocking(false).map_err(|e| format!("socket: {e}"))?;
            return Ok(s);
        }
        if stop.load(Ordering::Relaxed) {
            return Err("stopped".into());
        }
        if Instant::now() >= deadline {
            return Err(if listener.is_some() {
                format!("no switch connected within {} s (is the port in client mode?)", wait.as_secs())
            } else {
                format!(
                    "no switch listening after {} s: start the switch with this port first, or use \
                     `server` and a client-mode switch port",
                    wait.as_secs()
                )
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// SET_OWNER, features and protocol features, as QEMU does on connection.
fn negotiate(stream: UnixStream) -> std::result::Result<Conn, String> {
    let sock = stream.try_clone().map_err(|e| format!("socket: {e}"))?;
    let mut fe = Frontend::from_stream(stream, QUEUES as u64);
    let e = |req: &'static str| move |err: vhost::Error| format!("{req} failed: {err}");
    fe.set_owner().map_err(e("SET_OWNER"))?;
    let offered = fe.get_features().map_err(e("GET_FEATURES"))?;
    if offered & F_PROTOCOL_FEATURES != 0 {
        let pf = fe.get_protocol_features().map_err(e("GET_PROTOCOL_FEATURES"))?;
        let protocol = pf & VhostUserProtocolFeatures::REPLY_ACK;
        fe.set_protocol_features(protocol).map_err(e("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
    }
    Ok(Conn { fe, sock, offered })
}

/// Sends features, memory table and both rings; `resume` starts each ring at the guest's
/// used index instead of 0.
fn start_rings(
    sh: &Shared,
    conn: &mut Conn,
    act: &Activation,
    resume: bool,
) -> std::result::Result<(), String> {
    let e = |req: &'static str| move |err: vhost::Error| format!("{req} failed: {err}");
    let missing = act.features & !F_MAC & !conn.offered;
    if missing != 0 {
        return Err(format!(
            "the switch no longer offers features {missing:#x} the guest uses; the NIC stays down"
        ));
    }
    let features = (act.features & conn.offered & !F_MAC) | (conn.offered & F_PROTOCOL_FEATURES);
    conn.fe.set_features(features).map_err(e("SET_FEATURES"))?;
    conn.fe.set_mem_table(&sh.ram.vhost_regions()).map_err(e("SET_MEM_TABLE"))?;
    for (q, qa) in act.queues.iter().enumerate() {
        let hva = |gpa: u64, len: usize, what: &str| {
            sh.ram
                .host_addr(gpa, len)
                .ok_or_else(|| format!("queue {q} {what} at {gpa:#x} is outside guest RAM"))
        };
        let n = usize::from(qa.size);
        let cfg = VringConfigData {
            queue_max_size: QUEUE_MAX,
            queue_size: qa.size,
            flags: 0,
            desc_table_addr: hva(qa.desc, 16 * n, "descriptor table")?,
            used_ring_addr: hva(qa.used, 6 + 8 * n, "used ring")?,
            avail_ring_addr: hva(qa.avail, 6 + 2 * n, "available ring")?,
            log_addr: None,
        };
        let base = if resume {
            sh.ram.mem().read_obj::<u16>(GuestAddress(qa.used + 2)).map_err(|e| format!("used index: {e}"))?
        } else {
            0
        };
        conn.fe.set_vring_num(q, qa.size).map_err(e("SET_VRING_NUM"))?;
        conn.fe.set_vring_base(q, base).map_err(e("SET_VRING_BASE"))?;
        conn.fe.set_vring_addr(q, &cfg).map_err(e("SET_VRING_ADDR"))?;
        conn.fe.set_vring_kick(q, &sh.kick[q]).map_err(e("SET_VRING_KICK"))?;
        conn.fe.set_vring_call(q, &sh.call[q]).map_err(e("SET_VRING_CALL"))?;
    }
    if features & F_PROTOCOL_FEATURES != 0 {
        for q in 0..QUEUES {
            conn.fe.set_vring_enable(q, true).map_err(e("SET_VRING_ENABLE"))?;
        }
    }
    if resume {
        // Wake both sides: the switch looks at the rings, the guest at its used rings.
        for q in 0..QUEUES {
            let _ = sh.kick[q].write(1);
            let _ = sh.call[q].write(1);
        }
    }
    Ok(())
}

/// Whether the peer of socket `fd` hung up (checked without reading: replies belong to
/// requests).
fn hung_up(fd: RawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Watches the connection; reconnects and restores the device when the switch comes back.
fn supervise(sh: &Shared) {
    while !sh.stop.load(Ordering::Relaxed) {
        // Only this thread replaces or drops the connection, so its fd stays open while
        // polled without the lock.
        let fd = sh.lock().conn.as_ref().map(|c| c.sock.as_raw_fd());
        match fd {
            Some(fd) => {
                if !hung_up(fd, 100) {
                    continue;
                }
                tracing::warn!(nic = sh.nic, "the switch closed {}; reconnecting", sh.spec.socket.display());
                sh.lock().conn = None;
            }
            None => {
                let stream = match open(&sh.spec.socket, sh.listener.as_ref(), CONNECT_RETRY * 5, &sh.stop) {
                    Ok(s) => s,
                    Err(_) => continue,
                };
                let mut conn = match negotiate(stream) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(nic = sh.nic, "reconnect: {e}");
                        thread::sleep(CONNECT_RETRY);
                        continue;
                    }
                };
                let mut st = sh.lock();
                if let Some(act) = st.active {
                    if let Err(e) = start_rings(sh, &mut conn, &act, true) {
                        tracing::error!(nic = sh.nic, "restoring the NIC after reconnect: {e}");
                        drop(st);
                        thread::sleep(CONNECT_RETRY);
                        continue;
                    }
                }
                st.conn = Some(conn);
                sh.connections.fetch_add(1, Ordering::Relaxed);
                tracing::info!(nic = sh.nic, "reconnected to the switch; rings restored");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_spec_parses_and_explains_mistakes() {
        let s: NetSpec = "socket=/run/vm1.sock,mac=52:54:00:00:00:01".parse().unwrap();
        assert_eq!(
            s,
            NetSpec { socket: "/run/vm1.sock".into(), mac: [0x52, 0x54, 0, 0, 0, 1], server: false }
        );
        let s: NetSpec = "mac=02:00:00:00:00:0a,socket=x.sock,server".parse().unwrap();
        assert!(s.server);
        assert!("socket=x".parse::<NetSpec>().unwrap_err().contains("mac="));
        assert!("mac=02:00:00:00:00:01".parse::<NetSpec>().unwrap_err().contains("socket="));
        assert!("socket=x,mac=01:00:00:00:00:01".parse::<NetSpec>().unwrap_err().contains("multicast"));
        assert!("socket=x,mac=02:00:00:00:00".parse::<NetSpec>().unwrap_err().contains("six hex"));
        assert!("socket=x,mac=02:00:00:00:00:zz".parse::<NetSpec>().unwrap_err().contains("zz"));
        assert!("socket=x,mac=02:00:00:00:00:01,vlan=3".parse::<NetSpec>().unwrap_err().contains("vlan=3"));
        assert_eq!(Mac([0x52, 0x54, 0, 0xab, 0, 1]).to_string(), "52:54:00:ab:00:01");
    }
}
