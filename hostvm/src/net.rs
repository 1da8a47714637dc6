//! A NIC's datapath connection: a vhost-user frontend speaking to the switch.
//!
//! hostvm never touches packets. When the guest's driver sets DRIVER_OK, the [`Link`] sends
//! the switch the memory table, each vring's size, base and addresses, the kick eventfd (a
//! KVM ioeventfd on the queue-notify register) and the call eventfd (a KVM irqfd, or for the
//! payload an fd the idle vCPU waits on). From then on the switch and the guest talk through
//! shared memory and those two eventfds.
//!
//! Every vhost-user message goes through `netfront`'s [`Session`] (the sequence exists once,
//! shared with the in-process frontend): this file only decides what to send, and when. Each
//! request is bounded by [`CONTROL_TIMEOUT`]; a switch that does not answer in time is treated
//! as gone.
//!
//! The link survives the switch: a supervisor thread watches the socket ([`PeerWatch`]), and
//! when the switch goes away it reconnects (client mode: retries the socket; server mode:
//! accepts again on the listener the [`Endpoint`] keeps), negotiates again, and if the device
//! is live re-sends the memory table and ring state, resuming each ring at the guest's used
//! index (QEMU's rule: what the old switch took but never returned is offered again).

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use netfront::migration::DirtyLog;
use netfront::{Endpoint, PeerWatch, Session, VringSetup, VHOST_F_LOG_ALL};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::GuestRam;
use crate::{Error, Result};

/// Queues per NIC: receive (0) and transmit (1).
pub const QUEUES: usize = 2;
/// Largest queue a guest may configure.
pub const QUEUE_MAX: u16 = 1024;

/// `VIRTIO_NET_F_MAC`: hostvm serves the MAC from its own config space.
pub const F_MAC: u64 = netfront::VIRTIO_NET_F_MAC;
/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = netfront::VIRTIO_F_VERSION_1;

/// Device features a guest may negotiate with the switch through hostvm: checksum and TSO
/// offloads, mergeable buffers, event index, indirect descriptors, VERSION_1. Not MQ (one
/// queue pair per NIC), not ACCESS_PLATFORM (no vIOMMU), not packed rings.
pub const PASS_FEATURES: u64 = netfront::VIRTIO_NET_F_CSUM
    | netfront::VIRTIO_NET_F_GUEST_CSUM
    | netfront::VIRTIO_NET_F_GUEST_TSO4
    | netfront::VIRTIO_NET_F_GUEST_TSO6
    | netfront::VIRTIO_NET_F_GUEST_ECN
    | netfront::VIRTIO_NET_F_HOST_TSO4
    | netfront::VIRTIO_NET_F_HOST_TSO6
    | netfront::VIRTIO_NET_F_HOST_ECN
    | netfront::VIRTIO_NET_F_MRG_RXBUF
    | netfront::VIRTIO_RING_F_INDIRECT_DESC
    | netfront::VIRTIO_RING_F_EVENT_IDX
    | F_VERSION_1;

/// Protocol features hostvm acks: REPLY_ACK, and for live migration LOG_SHMFD (the dirty log
/// as a shared memfd) and RARP (the destination announces the guest). One memory table, no
/// config space, no MQ.
const PROTOCOL: VhostUserProtocolFeatures = VhostUserProtocolFeatures::REPLY_ACK
    .union(VhostUserProtocolFeatures::LOG_SHMFD)
    .union(VhostUserProtocolFeatures::RARP);

/// How long one vhost-user request may take before the switch counts as gone.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a reconnection attempt waits before the supervisor looks around again.
const CONNECT_RETRY: Duration = Duration::from_millis(100);
/// How long the supervisor waits for a hang-up before checking for a stop.
const WATCH_TICK: Duration = Duration::from_millis(100);

/// Why a NIC's link to the switch failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The vhost-user session failed (socket, request, timeout).
    #[error(transparent)]
    Session(#[from] netfront::Error),
    /// no switch listening after {secs} s: start the switch with this port first, or use
    /// `server` and a client-mode switch port
    #[error(
        "no switch listening after {secs} s: start the switch with this port first, or use \
         `server` and a client-mode switch port"
    )]
    NoSwitch {
        /// The wait.
        secs: u64,
    },
    /// no switch connected within {secs} s (is the port in client mode?)
    #[error("no switch connected within {secs} s (is the port in client mode?)")]
    NoClient {
        /// The wait.
        secs: u64,
    },
    /// the switch does not offer VIRTIO_F_VERSION_1, which hostvm needs
    #[error("the switch does not offer VIRTIO_F_VERSION_1, which hostvm needs")]
    NoVersion1,
    /// the switch no longer offers features {0:#x} the guest uses; the NIC stays down
    #[error("the switch no longer offers features {0:#x} the guest uses; the NIC stays down")]
    FeaturesGone(u64),
    /// queue {queue} {ring} at {gpa:#x} is outside guest RAM
    #[error("queue {queue} {ring} at {gpa:#x} is outside guest RAM")]
    RingOutsideRam {
        /// The queue.
        queue: usize,
        /// Which of its rings.
        ring: &'static str,
        /// Where the driver put it.
        gpa: u64,
    },
    /// queue {queue} used index: {source}
    #[error("queue {queue} used index: {source}")]
    UsedIndex {
        /// The queue.
        queue: usize,
        /// Why it could not be read.
        source: vm_memory::GuestMemoryError,
    },
    /// the switch does not offer VHOST_F_LOG_ALL: it cannot log its writes, so the guest
    /// cannot migrate (update the switch)
    #[error(
        "the switch does not offer VHOST_F_LOG_ALL: it cannot log its writes, so the guest cannot \
         migrate (update the switch)"
    )]
    NoDirtyLog,
    /// the switch connection is down (it is being re-established); try again
    #[error("the switch connection is down (it is being re-established); try again")]
    Down,
    /// eventfd: {0}
    #[error("eventfd: {0}")]
    EventFd(io::Error),
}

/// A bad `--net` value.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// bad --net item `{0}`: expected socket=PATH, mac=XX:XX:XX:XX:XX:XX, server or client
    #[error("bad --net item `{0}`: expected socket=PATH, mac=XX:XX:XX:XX:XX:XX, server or client")]
    Item(String),
    /// --net needs socket=PATH (the switch port's vhost-user socket)
    #[error("--net needs socket=PATH (the switch port's vhost-user socket)")]
    NoSocket,
    /// --net needs mac=XX:XX:XX:XX:XX:XX
    #[error("--net needs mac=XX:XX:XX:XX:XX:XX")]
    NoMac,
    /// bad MAC `{0}`: expected six hex bytes like 52:54:00:00:00:01
    #[error("bad MAC `{0}`: expected six hex bytes like 52:54:00:00:00:01")]
    MacLength(String),
    /// bad MAC `{mac}`: `{byte}` is not a hex byte
    #[error("bad MAC `{mac}`: `{byte}` is not a hex byte")]
    MacByte {
        /// The MAC given.
        mac: String,
        /// The offending part.
        byte: String,
    },
    /// bad MAC `{0}`: a NIC's address cannot be multicast
    #[error("bad MAC `{0}`: a NIC's address cannot be multicast")]
    MacMulticast(String),
}

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
    type Err = SpecError;

    fn from_str(s: &str) -> std::result::Result<NetSpec, SpecError> {
        let (mut socket, mut mac, mut server) = (None, None, false);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("socket", p)) if !p.is_empty() => socket = Some(PathBuf::from(p)),
                Some(("mac", m)) => mac = Some(parse_mac(m)?),
                None if part == "server" => server = true,
                None if part == "client" => server = false,
                _ => return Err(SpecError::Item(part.to_owned())),
            }
        }
        let socket = socket.ok_or(SpecError::NoSocket)?;
        let mac = mac.ok_or(SpecError::NoMac)?;
        Ok(NetSpec { socket, mac, server })
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> std::result::Result<[u8; 6], SpecError> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(SpecError::MacLength(s.to_owned()));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16)
            .map_err(|_| SpecError::MacByte { mac: s.to_owned(), byte: p.to_owned() })?;
    }
    if mac[0] & 1 != 0 {
        return Err(SpecError::MacMulticast(s.to_owned()));
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    session: Session,
    /// Polled for hang-up by the supervisor without the state lock.
    watch: Arc<PeerWatch>,
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
    /// Where connections come from; in server mode it owns the socket file.
    endpoint: Endpoint,
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
        let net_err = |source: NetError| Error::Net { nic, path: spec.socket.clone(), source };
        let efd = || EventFd::new(EFD_NONBLOCK).map_err(|e| net_err(NetError::EventFd(e)));
        let endpoint = if spec.server {
            Endpoint::listen(&spec.socket).map_err(|e| net_err(e.into()))?
        } else {
            Endpoint::client(&spec.socket)
        };
        let conn = open(&endpoint, wait, &AtomicBool::new(false)).map_err(net_err)?;
        let offered = conn.session.offered_features();
        let device_features = (offered & PASS_FEATURES) | F_MAC;
        if device_features & F_VERSION_1 == 0 {
            return Err(net_err(NetError::NoVersion1));
        }
        tracing::info!(nic, "connected to {} (offers {offered:#x})", spec.socket.display());
        let shared = Arc::new(Shared {
            nic,
            kick: [efd()?, efd()?],
            call: [efd()?, efd()?],
            spec,
            ram,
            endpoint,
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
        self.hand_rings(Some(act), false, false)
    }

    /// A migrated-in device: hand the rings to the switch resuming at the guest's used index,
    /// then ask it to announce the guest's MAC from this port (SEND_RARP).
    pub fn resume(&self, act: Activation) -> Result<()> {
        self.hand_rings(Some(act), true, true)
    }

    /// Hands the rings of `act` (None: the active ones) to the switch, now or when it is back;
    /// from the guest's used index if `resume`, then SEND_RARP if `announce`.
    fn hand_rings(&self, act: Option<Activation>, resume: bool, announce: bool) -> Result<()> {
        let mut st = self.shared.lock();
        if act.is_some() {
            st.active = act;
        }
        let Some(act) = st.active else { return Ok(()) };
        let res = match st.conn.as_mut() {
            Some(conn) => start_rings(&self.shared, conn, &act, resume).and_then(|()| match announce {
                true => conn.session.send_rarp(self.shared.spec.mac).map_err(NetError::from),
                false => Ok(()),
            }),
            None => Ok(()),
        };
        drop(st);
        res.map_err(|source| self.err(source))
    }

    /// Migration source: the switch logs every page it writes into the guest into `log`
    /// (SET_LOG_BASE, LOG_ALL acked, each ring's address again with its used ring's log
    /// address). Nothing to do while the driver has not started the device.
    pub fn start_log(&self, log: &DirtyLog) -> Result<()> {
        self.log_mode(Some(log)).map_err(|source| self.err(source))
    }

    /// Migration source: logging off again (a failed migration; the VM runs on here).
    pub fn stop_log(&self) -> Result<()> {
        self.log_mode(None).map_err(|source| self.err(source))
    }

    fn log_mode(&self, log: Option<&DirtyLog>) -> std::result::Result<(), NetError> {
        let mut st = self.shared.lock();
        let Some(act) = st.active else { return Ok(()) };
        let conn = st.conn.as_mut().ok_or(NetError::Down)?;
        let offered = conn.session.offered_features();
        if let Some(log) = log {
            if offered & VHOST_F_LOG_ALL == 0 {
                return Err(NetError::NoDirtyLog);
            }
            conn.session.set_log_base(log.fd(), log.bytes())?;
        }
        let logging = if log.is_some() { VHOST_F_LOG_ALL } else { 0 };
        conn.session.set_features((act.features & offered & !F_MAC) | logging)?;
        for (q, qa) in act.queues.iter().enumerate() {
            let v = vring(&self.shared, q, qa, false)?;
            conn.session.set_vring_addr(q, &v, log.map(|_| qa.used))?;
        }
        Ok(())
    }

    /// Migration source, vCPUs paused: the switch stops both rings (GET_VRING_BASE) and
    /// writes nothing more into the guest. [`Link::restart`] undoes it.
    pub fn stop_rings(&self) -> Result<()> {
        let mut st = self.shared.lock();
        if st.active.is_none() {
            return Ok(());
        }
        let Some(conn) = st.conn.as_mut() else { return Ok(()) };
        let res = conn.session.stop_vrings(QUEUES).map(|_| ());
        drop(st);
        res.map_err(|source| self.err(source.into()))
    }

    /// A failed migration: the rings back to the switch where the guest left them.
    pub fn restart(&self) -> Result<()> {
        self.hand_rings(None, true, false)
    }

    /// The driver reset the device: stop the switch's rings (GET_VRING_BASE).
    pub fn reset(&self) {
        let mut st = self.shared.lock();
        if st.active.take().is_some() {
            if let Some(conn) = st.conn.as_mut() {
                for q in 0..QUEUES {
                    if let Err(e) = conn.session.stop_vring(q) {
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

    fn err(&self, source: NetError) -> Error {
        Error::Net { nic: self.shared.nic, path: self.shared.spec.socket.clone(), source }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // In server mode the socket file goes with the endpoint, once the supervisor let go.
        self.shutdown();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Connects (client) or accepts (server) within `wait`, giving up early on `stop`, and runs
/// the session's handshake (SET_OWNER, features, protocol features), as QEMU does on
/// connection.
fn open(endpoint: &Endpoint, wait: Duration, stop: &AtomicBool) -> std::result::Result<Conn, NetError> {
    let stream = endpoint.open(wait, stop).map_err(|e| match e {
        netfront::Error::ConnectTimeout { .. } if endpoint.is_server() => {
            NetError::NoClient { secs: wait.as_secs() }
        }
        netfront::Error::ConnectTimeout { .. } => NetError::NoSwitch { secs: wait.as_secs() },
        e => e.into(),
    })?;
    let session = Session::new(stream, QUEUES as u64, CONTROL_TIMEOUT, PROTOCOL)?;
    let watch = Arc::new(session.watch()?);
    Ok(Conn { session, watch })
}

/// Sends features, memory table and both rings; `resume` starts each ring at the guest's
/// used index instead of 0.
fn start_rings(
    sh: &Shared,
    conn: &mut Conn,
    act: &Activation,
    resume: bool,
) -> std::result::Result<(), NetError> {
    let offered = conn.session.offered_features();
    let missing = act.features & !F_MAC & !offered;
    if missing != 0 {
        return Err(NetError::FeaturesGone(missing));
    }
    conn.session.set_features(act.features & offered & !F_MAC)?;
    conn.session.set_memory(&sh.ram.vhost_regions())?;
    for (q, qa) in act.queues.iter().enumerate() {
        conn.session.setup_vring(q, &vring(sh, q, qa, resume)?)?;
    }
    conn.session.enable_vrings(QUEUES)?;
    if resume {
        // Wake both sides: the switch looks at the rings, the guest at its used rings.
        for q in 0..QUEUES {
            let _ = sh.kick[q].write(1);
            let _ = sh.call[q].write(1);
        }
    }
    Ok(())
}

/// Queue `q` as the session sends it: the driver's guest-physical ring addresses made host
/// addresses (each ring checked to lie wholly in guest RAM), our eventfds, and the base.
fn vring<'a>(
    sh: &'a Shared,
    q: usize,
    qa: &QueueAddrs,
    resume: bool,
) -> std::result::Result<VringSetup<'a>, NetError> {
    let hva = |gpa: u64, len: usize, ring: &'static str| {
        sh.ram.host_addr(gpa, len).ok_or(NetError::RingOutsideRam { queue: q, ring, gpa })
    };
    let n = usize::from(qa.size);
    let base = if resume {
        let used_idx = GuestAddress(qa.used + 2);
        sh.ram.mem().read_obj::<u16>(used_idx).map_err(|source| NetError::UsedIndex { queue: q, source })?
    } else {
        0
    };
    Ok(VringSetup {
        size: qa.size,
        base,
        desc: hva(qa.desc, 16 * n, "descriptor table")?,
        avail: hva(qa.avail, 6 + 2 * n, "available ring")?,
        used: hva(qa.used, 6 + 8 * n, "used ring")?,
        kick: &sh.kick[q],
        call: &sh.call[q],
    })
}

/// Watches the connection; reconnects and restores the device when the switch comes back.
fn supervise(sh: &Shared) {
    while !sh.stop.load(Ordering::Relaxed) {
        let watch = sh.lock().conn.as_ref().map(|c| c.watch.clone());
        match watch {
            Some(w) => {
                if !w.hung_up(WATCH_TICK) {
                    continue;
                }
                tracing::warn!(nic = sh.nic, "the switch closed {}; reconnecting", sh.spec.socket.display());
                sh.lock().conn = None;
            }
            None => reconnect(sh),
        }
    }
}

/// One reconnection attempt: a new session, and if the device is live its rings restored.
fn reconnect(sh: &Shared) {
    let mut conn = match open(&sh.endpoint, CONNECT_RETRY * 5, &sh.stop) {
        Ok(c) => c,
        Err(NetError::NoSwitch { .. } | NetError::NoClient { .. })
        | Err(NetError::Session(netfront::Error::Stopped { .. })) => return,
        Err(e) => {
            tracing::warn!(nic = sh.nic, "reconnect: {e}");
            thread::sleep(CONNECT_RETRY);
            return;
        }
    };
    let mut st = sh.lock();
    if let Some(act) = st.active {
        if let Err(e) = start_rings(sh, &mut conn, &act, true) {
            tracing::error!(nic = sh.nic, "restoring the NIC after reconnect: {e}");
            drop(st);
            thread::sleep(CONNECT_RETRY);
            return;
        }
    }
    st.conn = Some(conn);
    sh.connections.fetch_add(1, Ordering::Relaxed);
    tracing::info!(nic = sh.nic, "reconnected to the switch; rings restored");
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
        let err = |s: &str| s.parse::<NetSpec>().unwrap_err().to_string();
        assert!(err("socket=x").contains("mac="));
        assert!(err("mac=02:00:00:00:00:01").contains("socket="));
        assert!(err("socket=x,mac=01:00:00:00:00:01").contains("multicast"));
        assert!(err("socket=x,mac=02:00:00:00:00").contains("six hex"));
        assert!(err("socket=x,mac=02:00:00:00:00:zz").contains("zz"));
        assert!(err("socket=x,mac=02:00:00:00:00:01,vlan=3").contains("vlan=3"));
        assert_eq!(Mac([0x52, 0x54, 0, 0xab, 0, 1]).to_string(), "52:54:00:ab:00:01");
    }
}
