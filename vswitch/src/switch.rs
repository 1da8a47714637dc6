//! The switch: ports, polling threads and the control thread that serves vhost-user
//! connections, the control socket and API calls.
//!
//! ```text
//!   guests ──vhost-user sockets──▶ control thread (mio) ──queue slots──▶ PMD threads
//!   vswitch ctl ──control socket──▶ control thread           (bursts, late copy)
//! ```

mod accel;
mod balance;
mod conn;
mod ctlsock;
mod nics;
mod report;
pub mod sockets;
mod sriov;

pub use balance::AutoRebalance;

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::net::UnixListener;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use crate::config::{ConfigError, PortConfig, SwitchConfig};
use crate::control::{PolicyReport, PortInfo, Reply, Request, Stats};
use crate::l2::{Fdb, FdbEntry};
use crate::pmd::{PmdCmd, PmdHandle};
use crate::policy::PolicyConfig;
use crate::port::{Port, Queue, MAX_PORTS};
use crate::uplink::link::LinkEnd;
use crate::uplink::nic::{NicQueue, NicTxQueue, Wire};
use crate::uplink::tap::TapDevice;
use crate::vhost::wire::{
    backend_req_fd, iotlb_msg, log_fd, send_rarp, vring_enable, waiting_message, Waiting,
};
use crate::vhost::{MemPolicy, VhostDevice};

const WAKER: Token = Token(usize::MAX - 1);
const CTL_LISTENER: Token = Token(usize::MAX - 2);
/// How long a frontend may take to send the rest of a message it started, or to make room
/// for a reply (read the ones before).
const MSG_TIMEOUT: Duration = Duration::from_secs(2);
/// Messages handled from one connection before the others get their turn.
const MSG_BUDGET: usize = 32;
/// Client-mode ports retry this often.
const RETRY: Duration = Duration::from_secs(1);
/// How often rings waiting for an IOTLB translation ask again.
const IOTLB_RETRY: Duration = Duration::from_nanos(crate::vhost::iotlb::RESEND_NS);

/// Why the switch refused something.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// name taken
    #[error("a port named '{0}' already exists")]
    PortExists(String),
    /// socket taken
    #[error("socket {0} is already used by port '{1}'")]
    SocketInUse(String, String),
    /// unknown port
    #[error("no port named '{0}' (see `vswitch ctl ports`)")]
    NoSuchPort(String),
    /// too many ports
    #[error("the switch already has {MAX_PORTS} ports")]
    TooManyPorts,
    /// socket file problems
    #[error(transparent)]
    Socket(#[from] sockets::SocketError),
    /// bad config
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// startup failure
    #[error("cannot start the switch: {0}")]
    Start(std::io::Error),
    /// the control thread is gone
    #[error("the switch's control thread has stopped")]
    Stopped,
    /// a request was refused
    #[error("{0}")]
    Refused(String),
    /// TAP device problems
    #[error(transparent)]
    Tap(#[from] crate::uplink::tap::TapError),
    /// device taken
    #[error("network device {0} is already used by port '{1}'")]
    TapInUse(String, String),
}

type Handler = BackendReqHandler<Mutex<VhostDevice>>;

/// What an uplink port's queues are attached to.
enum Uplink {
    Tap(TapDevice),
    /// Packet sockets on an existing device.
    Packet(crate::uplink::afpacket::PacketDevice),
    /// XDP sockets on an existing device, and the switch's program on it.
    Xdp(crate::uplink::afxdp::XdpDevice),
    /// A VXLAN or Geneve tunnel's sockets.
    Tunnel(crate::uplink::tunnel::TunnelDevice),
    /// An in-process wire's end (freed when the port goes).
    Wire(LinkEnd),
}

impl Uplink {
    /// How `ctl ports` names it.
    pub(crate) fn label(&self) -> String {
        match self {
            Uplink::Tap(d) => format!("tap:{}", d.name),
            Uplink::Packet(d) => format!("afpacket:{}", d.name),
            Uplink::Xdp(d) => format!("afxdp:{} ({})", d.name, d.way),
            Uplink::Tunnel(d) => d.label.clone(),
            Uplink::Wire(l) => format!("wire:{}", l.name()),
        }
    }
}

struct PortState {
    cfg: PortConfig,
    port: Arc<Port>,
    device: Arc<Mutex<VhostDevice>>,
    listener: Option<(UnixListener, sockets::SocketFile)>,
    /// An uplink port's device (its queues sit in the port's slots; closing it removes a
    /// device the switch created).
    uplink: Option<Uplink>,
    conn: Option<(Handler, RawFd)>,
    /// When an incomplete message started waiting on the connection.
    partial_since: Option<Instant>,
    /// When a message started waiting for room for its reply (the frontend does not read).
    blocked_since: Option<Instant>,
    next_retry: Instant,
    connects: u64,
    /// Refused requests logged on this connection (more are counted, not logged).
    logged: u32,
}

/// Refused requests logged per connection; a frontend sending nothing else cannot flood the log.
const LOG_BUDGET: u32 = 16;

enum Call {
    Req(Box<Request>, Sender<Reply>),
    Shutdown,
}

/// A running switch. Dropping it stops every thread and closes every socket.
pub struct Switch {
    calls: Sender<Call>,
    waker: Arc<Waker>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Switch {
    /// Starts polling threads, the control thread and every configured port.
    pub fn start(cfg: SwitchConfig) -> Result<Switch, SwitchError> {
        // Calibrate the policy clock here, not in a polling thread's first burst.
        crate::clock::now_ns();
        cfg.validate()?;
        let poll = Poll::new().map_err(SwitchError::Start)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(SwitchError::Start)?);
        let fdb = Arc::new(Fdb::new(cfg.fdb_entries(), cfg.fdb_aging_secs));
        let cores: Vec<Option<usize>> = if cfg.pmd_cores.is_empty() {
            vec![None]
        } else {
            cfg.pmd_cores.iter().map(|c| Some(*c)).collect()
        };
        let mut pmds = Vec::new();
        for (i, core) in cores.into_iter().enumerate() {
            pmds.push(
                PmdHandle::spawn(i, core, cfg.busy_poll, cfg.batch_wait_us, fdb.clone())
                    .map_err(SwitchError::Start)?,
            );
        }
        let ctl_heartbeat = Arc::new(crate::watchdog::Heartbeat::new("vswitch-ctl".into(), false));
        let mut watched: Vec<_> = pmds.iter().map(|p| Arc::downgrade(&p.heartbeat)).collect();
        watched.push(Arc::downgrade(&ctl_heartbeat));
        crate::watchdog::spawn(watched).map_err(SwitchError::Start)?;
        let wakers: Vec<_> = pmds.iter().map(PmdHandle::waker).collect();
        let wake_pmds: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            for w in &wakers {
                let _ = w.write(1);
            }
        });
        let ctl = match &cfg.control {
            // The control socket reconfigures the switch: owner only, set before it listens.
            Some(path) => {
                let (l, file) = sockets::listen(path, sockets::Access { mode: 0o600, gid: None })?;
                Some(ctlsock::CtlServer::new(l, file))
            }
            None => None,
        };
        let access = cfg.socket_access()?;
        let (calls, rx) = crossbeam_channel::unbounded();
        let mut ctl = Control {
            poll,
            pmds,
            fdb,
            ports: HashMap::new(),
            ctl,
            access,
            calls: rx,
            wake_pmds,
            iotlb_waiting: false,
            ready: VecDeque::new(),
            mem_policy: MemPolicy::from(&cfg),
            memory_faults_seen: iommu::guard::faults(),
            next_nic_sync: Instant::now(),
            accel: Default::default(),
            pfs: Default::default(),
            vf_sinks: Default::default(),
            balance: balance::Balance::new(cfg.auto_rebalance()),
        };
        if let Some(c) = &mut ctl.ctl {
            c.register(ctl.poll.registry(), CTL_LISTENER).map_err(SwitchError::Start)?;
        }
        for p in &cfg.ports {
            ctl.add_port(p.clone())?;
        }
        let thread = std::thread::Builder::new()
            .name("vswitch-ctl".into())
            .spawn(move || {
                ctl_heartbeat.attach();
                ctl.run()
            })
            .map_err(SwitchError::Start)?;
        Ok(Switch { calls, waker, thread: Some(thread) })
    }

    /// Sends a control request (the same ones the control socket takes).
    pub fn request(&self, req: Request) -> Result<serde_json::Value, SwitchError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.calls.send(Call::Req(Box::new(req), tx)).map_err(|_| SwitchError::Stopped)?;
        let _ = self.waker.wake();
        let reply = rx.recv_timeout(Duration::from_secs(30)).map_err(|_| SwitchError::Stopped)?;
        match reply {
            Reply { ok: true, result, .. } => Ok(result.unwrap_or_default()),
            Reply { error, .. } => Err(SwitchError::Refused(error.unwrap_or_default())),
        }
    }

    /// Adds a port.
    pub fn add_port(&self, cfg: PortConfig) -> Result<(), SwitchError> {
        self.request(Request::PortAdd { port: Box::new(cfg) }).map(|_| ())
    }

    /// Removes a port.
    pub fn del_port(&self, name: &str) -> Result<(), SwitchError> {
        self.request(Request::PortDel { name: name.into() }).map(|_| ())
    }

    /// Counters.
    pub fn stats(&self) -> Result<Stats, SwitchError> {
        self.typed(Request::Stats)
    }

    /// Ports.
    pub fn ports(&self) -> Result<Vec<PortInfo>, SwitchError> {
        self.typed(Request::Ports)
    }

    /// Forwarding table.
    pub fn fdb(&self) -> Result<Vec<FdbEntry>, SwitchError> {
        self.typed(Request::Fdb)
    }

    /// A port's policy and its counters.
    pub fn policy(&self, name: &str) -> Result<PolicyReport, SwitchError> {
        self.typed(Request::Policy { name: name.into() })
    }

    /// Replaces a port's policy (parts left out are turned off) while its guest stays connected.
    pub fn set_policy(&self, name: &str, policy: PolicyConfig) -> Result<PolicyReport, SwitchError> {
        self.typed(Request::PolicySet { name: name.into(), policy })
    }

    /// A NIC model's filters, pools and device counters (`ctl nic`).
    pub fn nic(&self, name: &str) -> Result<crate::control::NicReport, SwitchError> {
        self.typed(Request::Nic { name: name.into() })
    }

    /// Gives a guest port's queue pair to a NIC tier (`ctl accel plug`); the reason if the
    /// tier refuses (the port stays on the software path).
    pub fn accel_plug(&self, name: &str, tier: &str) -> Result<crate::control::AccelReport, SwitchError> {
        self.typed(Request::AccelPlug { name: name.into(), tier: tier.into() })
    }

    /// Takes it back: quiesce, drain, hand back (`ctl accel unplug`).
    pub fn accel_unplug(&self, name: &str) -> Result<crate::control::AccelReport, SwitchError> {
        self.typed(Request::AccelUnplug { name: name.into() })
    }

    /// Plug state and device counters of one guest port, or all (`ctl accel status`).
    pub fn accel_status(&self, name: Option<&str>) -> Result<Vec<crate::control::AccelReport>, SwitchError> {
        self.typed(Request::AccelStatus { name: name.map(Into::into) })
    }

    /// `vswitch vf DEV N ...` on a Level 3 NIC port: VF N's policy in iproute2's words.
    pub fn vf_set(&self, dev: &str, args: &[String]) -> Result<crate::control::VfReport, SwitchError> {
        self.typed(Request::Vf { dev: dev.into(), args: args.to_vec() })
    }

    /// `vswitch vf DEV show`.
    pub fn vf_show(&self, dev: &str) -> Result<crate::control::VfReport, SwitchError> {
        self.typed(Request::VfShow { dev: dev.into() })
    }

    /// `vswitch vf DEV attach N PORT`.
    pub fn vf_attach(&self, dev: &str, vf: u32, port: &str) -> Result<crate::control::VfReport, SwitchError> {
        self.typed(Request::VfAttach { dev: dev.into(), vf, port: port.into() })
    }

    /// `vswitch vf DEV detach N`.
    pub fn vf_detach(&self, dev: &str, vf: u32) -> Result<crate::control::VfReport, SwitchError> {
        self.typed(Request::VfDetach { dev: dev.into(), vf })
    }

    fn typed<T: serde::de::DeserializeOwned>(&self, req: Request) -> Result<T, SwitchError> {
        let v = self.request(req)?;
        serde_json::from_value(v).map_err(|e| SwitchError::Refused(e.to_string()))
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        let _ = self.calls.send(Call::Shutdown);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn token_of(id: u16, conn: bool) -> Token {
    Token(id as usize * 2 + conn as usize)
}

struct Control {
    poll: Poll,
    pmds: Vec<PmdHandle>,
    fdb: Arc<Fdb>,
    ports: HashMap<u16, PortState>,
    /// The control socket's server.
    ctl: Option<ctlsock::CtlServer>,
    /// Mode and group of port sockets.
    access: sockets::Access,
    calls: Receiver<Call>,
    wake_pmds: Arc<dyn Fn() + Send + Sync>,
    /// A ring waits for the translation of its addresses: come back within `IOTLB_RETRY`.
    iotlb_waiting: bool,
    /// Connections that used their message budget with messages left (served next turn).
    ready: VecDeque<u16>,
    mem_policy: MemPolicy,
    /// `iommu::guard::faults()` when last looked at.
    memory_faults_seen: u64,
    /// When NIC models' filters next follow the forwarding table.
    next_nic_sync: Instant,
    /// Plugs into NIC tiers, per guest port.
    accel: accel::AccelBooks,
    /// Level 3 NICs' PFs and their VFs.
    pfs: sriov::Pfs,
    /// Their VFs' counts of ended plugs.
    vf_sinks: sriov::VfSinks,
    /// Which polling thread polls which source queue, and their loads.
    balance: balance::Balance,
}

impl Control {
    fn run(mut self) {
        let mut events = Events::with_capacity(64);
        let mut last_recount = 0;
        loop {
            let timeout = self.next_timeout();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!("control loop poll failed: {e}");
                    return;
                }
            }
            for ev in events.iter() {
                match ev.token() {
                    WAKER => {}
                    CTL_LISTENER => {
                        if let Some(c) = &mut self.ctl {
                            c.accept(self.poll.registry());
                        }
                    }
                    t if ctlsock::CtlServer::slot_of(t).is_some() => self.control_client(t),
                    Token(t) if t % 2 == 0 => self.accept((t / 2) as u16),
                    Token(t) => self.service_conn((t / 2) as u16),
                }
            }
            // Connections with messages left over from their budget, one turn each.
            for _ in 0..self.ready.len() {
                if let Some(id) = self.ready.pop_front() {
                    self.service_conn(id);
                }
            }
            while let Ok(call) = self.calls.try_recv() {
                match call {
                    Call::Req(req, tx) => {
                        let _ = tx.send(self.handle(*req));
                    }
                    Call::Shutdown => {
                        self.shutdown();
                        return;
                    }
                }
            }
            self.retry_clients();
            self.drop_stalled();
            let faulted: Vec<u16> =
                self.ports.values().filter(|p| p.port.needs_disconnect()).map(|p| p.port.id).collect();
            faulted.into_iter().for_each(|id| self.disconnect(id));
            self.drop_faulted_memory();
            self.retry_iotlb();
            if self.nics_due() {
                self.sync_nics();
                self.auto_plug();
            }
            self.balance_tick();
            if self.now() != last_recount {
                last_recount = self.now();
                self.fdb.recount(last_recount);
            }
        }
    }

    /// An event on a control client: answers its request once it is in.
    fn control_client(&mut self, t: Token) {
        let Some(slot) = ctlsock::CtlServer::slot_of(t) else { return };
        let Some(c) = &mut self.ctl else { return };
        let Some((slot, req)) = c.event(self.poll.registry(), slot) else { return };
        let reply = match req {
            Ok(req) => self.handle(req),
            Err(e) => Reply { ok: false, result: None, error: Some(e) },
        };
        if let Some(c) = &mut self.ctl {
            c.reply(self.poll.registry(), slot, &reply);
        }
    }

    /// Disconnects ports whose guest memory lost pages under the SIGBUS guard (the frontend
    /// truncated its memory file): the switch saw zeros, the port's guest is broken.
    fn drop_faulted_memory(&mut self) {
        let now = iommu::guard::faults();
        if now == self.memory_faults_seen {
            return;
        }
        self.memory_faults_seen = now;
        let mut faulted = Vec::new();
        for st in self.ports.values() {
            if let Ok(mut d) = st.device.lock() {
                if d.mem_faulted() {
                    d.memory_faults += 1;
                    faulted.push(st.port.id);
                }
            }
        }
        for id in faulted {
            if let Some(st) = self.ports.get(&id) {
                tracing::warn!(port = %st.cfg.name, "closing vhost-user connection: its guest memory file lost pages (truncated or hole-punched); the switch read zeros instead");
            }
            self.disconnect(id);
        }
    }

    /// Rings waiting for an IOTLB translation ask again (see `VhostDevice::retry_waiting`).
    fn retry_iotlb(&mut self) {
        let now = crate::clock::now_ns();
        let mut waiting = false;
        for st in self.ports.values() {
            if st.conn.is_some() {
                if let Ok(mut d) = st.device.lock() {
                    waiting |= d.retry_waiting(now);
                }
            }
        }
        self.iotlb_waiting = waiting;
    }

    /// Closes connections whose frontend started a message and never finished it, or does
    /// not read the replies it asked for; and control clients that took too long.
    fn drop_stalled(&mut self) {
        let late = |t: Option<Instant>| t.is_some_and(|t| t.elapsed() > MSG_TIMEOUT);
        let stalled: Vec<(u16, &str)> = self
            .ports
            .values()
            .filter_map(|p| {
                if late(p.partial_since) {
                    Some((p.port.id, "incomplete message"))
                } else if late(p.blocked_since) {
                    Some((p.port.id, "its replies not read"))
                } else {
                    None
                }
            })
            .collect();
        for (id, why) in stalled {
            if let Some(st) = self.ports.get(&id) {
                tracing::warn!(port = %st.cfg.name, "closing vhost-user connection: {why} for {MSG_TIMEOUT:?}");
            }
            self.disconnect(id);
        }
        if let Some(c) = &mut self.ctl {
            c.expire(self.poll.registry(), Instant::now());
        }
    }

    fn next_timeout(&self) -> Duration {
        if !self.ready.is_empty() {
            return Duration::ZERO;
        }
        let now = Instant::now();
        // Stalled connections and control clients are checked at least this often.
        let watch = if self.ports.values().any(|p| p.partial_since.is_some() || p.blocked_since.is_some())
            || self.ctl.as_ref().is_some_and(|c| c.clients() > 0)
        {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(1)
        };
        self.ports
            .values()
            .filter(|p| p.cfg.client && p.conn.is_none())
            .map(|p| p.next_retry.saturating_duration_since(now))
            .min()
            .unwrap_or(watch)
            .min(watch)
            .min(if self.iotlb_waiting { IOTLB_RETRY } else { watch })
            .min(if self.ports.values().any(|p| p.cfg.nic.is_some()) { nics::SYNC } else { watch })
            .min(self.balance.next_due())
    }

    fn handle(&mut self, req: Request) -> Reply {
        let res: Result<serde_json::Value, String> = match req {
            Request::Ports => Ok(serde_json::to_value(self.port_infos()).unwrap_or_default()),
            Request::Stats => Ok(serde_json::to_value(self.stats()).unwrap_or_default()),
            Request::Fdb => Ok(serde_json::to_value(self.fdb.dump(self.now())).unwrap_or_default()),
            Request::FdbFlush => {
                self.fdb.flush();
                Ok(serde_json::Value::Null)
            }
            Request::Rebalance => Ok(serde_json::to_value(self.rebalance(0.0)).unwrap_or_default()),
            Request::QueuePin { name, queue_pair, pmd } => {
                self.pin_queue(&name, queue_pair, pmd).map(|t| serde_json::json!({ "pmd": t }))
            }
            Request::PortAdd { port } => {
                self.add_port(*port).map(|_| serde_json::Value::Null).map_err(|e| e.to_string())
            }
            Request::PortDel { name } => {
                self.del_port(&name).map(|_| serde_json::Value::Null).map_err(|e| e.to_string())
            }
            Request::Policy { name } => self
                .policy_report(&name)
                .map(|r| serde_json::to_value(r).unwrap_or_default())
                .map_err(|e| e.to_string()),
            Request::Nic { name } => self
                .nic_report(&name)
                .map(|r| serde_json::to_value(r).unwrap_or_default())
                .map_err(|e| e.to_string()),
            Request::AccelPlug { name, tier } => self
                .accel_plug(&name, &tier)
                .map(|r| serde_json::to_value(r).unwrap_or_default())
                .map_err(|e| e.to_string()),
            Request::AccelUnplug { name } => self
                .accel_unplug(&name)
                .map(|r| serde_json::to_value(r).unwrap_or_default())
                .map_err(|e| e.to_string()),
            Request::Vf { dev, args } => self
                .vf_set(&dev, &args)
                .map(|r| serde_json::to_value(r).unwrap_or_default())
                .map_err(|e| e.to_string()),
            Request::VfShow { dev } => self
                .vf_show(&dev)
                .map(|r| serde_json::to_value(r).unwrap_or_default())
                .map_err(|e| e.to_string()),
            Request::VfAttach { dev, vf, port } => self
                .vf_attach(&dev, vf, &port)
                .map(|r| serde_json::to_value(r).unwrap_or_default())
                .map_err(|e| e.to_string()),
            Request::VfDetach { dev, vf } => self
                .vf_detach(&dev, vf)
                .map(|r| serde_json::to_value(r).unwrap_or_default())
                .map_err(|e| e.to_string()),
            Request::AccelStatus { name } => self
                .accel_status(name.as_deref())
                .map(|r| serde_json::to_value(r).unwrap_or_default())
                .map_err(|e| e.to_string()),
            Request::PolicySet { name, policy } => self
                .set_policy(&name, policy)
                .map(|r| serde_json::to_value(r).unwrap_or_default())
                .map_err(|e| e.to_string()),
        };
        match res {
            Ok(v) => Reply { ok: true, result: Some(v), error: None },
            Err(e) => Reply { ok: false, result: None, error: Some(e) },
        }
    }

    fn now(&self) -> u32 {
        self.fdb.now()
    }

    fn add_port(&mut self, cfg: PortConfig) -> Result<(), SwitchError> {
        cfg.validate()?;
        cfg.check_pmds(self.pmds.len())?;
        for p in self.ports.values() {
            if p.cfg.name == cfg.name {
                return Err(SwitchError::PortExists(cfg.name));
            }
            if !cfg.is_uplink() && !p.cfg.is_uplink() && p.cfg.socket == cfg.socket {
                return Err(SwitchError::SocketInUse(cfg.socket.display().to_string(), p.cfg.name.clone()));
            }
            if let (Some(a), Some(b)) = (&cfg.tap, &p.cfg.tap) {
                if a == b {
                    return Err(SwitchError::TapInUse(a.clone(), p.cfg.name.clone()));
                }
            }
            let dev = |c: &PortConfig| c.afpacket.clone().or_else(|| c.afxdp.clone());
            if let (Some(a), Some(b)) = (dev(&cfg), dev(&p.cfg)) {
                if a == b {
                    return Err(SwitchError::TapInUse(a.clone(), p.cfg.name.clone()));
                }
            }
        }
        let id =
            (0..MAX_PORTS as u16).find(|i| !self.ports.contains_key(i)).ok_or(SwitchError::TooManyPorts)?;
        let mut port = Port::new(id, cfg.name.clone(), cfg.vlan_mode(), cfg.mac_bytes(), cfg.queues);
        port.offloads = cfg.offloads;
        port.packed = cfg.packed;
        if cfg.packed && cfg.client {
            tracing::warn!(port = %cfg.name, "packed rings on a client-mode port: QEMU cannot resume a packed ring after a switch restart (no used index in guest memory), so a restart stops the guest's NIC until it is reset; split rings resume");
        }
        let port = Arc::new(port);
        port.set_policy(&cfg.policy())
            .map_err(|source| ConfigError::Policy { port: cfg.name.clone(), source })?;
        let device = VhostDevice::new(port.clone(), self.wake_pmds.clone()).with_mem_policy(self.mem_policy);
        let device = Arc::new(Mutex::new(device));
        let mut listener = None;
        let bad = |why: String| ConfigError::Port { port: cfg.name.clone(), why };
        let params = cfg.nic.as_ref().map(|n| n.params().map_err(bad)).transpose()?;
        let uplink = match (&cfg.tap, cfg.nic.as_ref().and_then(|n| n.wire.as_deref())) {
            _ if cfg.tunnel.is_some() => {
                let t = cfg.tunnel.as_ref().expect("checked");
                let dev = crate::uplink::tunnel::TunnelDevice::open(
                    t.kind,
                    &t.remotes,
                    t.vni,
                    t.local,
                    t.port(),
                    t.csum,
                )
                .map_err(|e| bad(e.to_string()))?;
                Some(Uplink::Tunnel(dev))
            }
            _ if cfg.afxdp.is_some() => {
                let name = cfg.afxdp.as_deref().unwrap_or_default();
                let dev = crate::uplink::afxdp::XdpDevice::open(
                    name,
                    cfg.queues,
                    cfg.xdp_mode.unwrap_or_default(),
                    cfg.mtu,
                )
                .map_err(|e| bad(e.to_string()))?;
                Some(Uplink::Xdp(dev))
            }
            _ if cfg.afpacket.is_some() => {
                let name = cfg.afpacket.as_deref().unwrap_or_default();
                let dev =
                    crate::uplink::afpacket::PacketDevice::open(name, cfg.queues, cfg.offloads, cfg.mtu)
                        .map_err(|e| bad(e.to_string()))?;
                Some(Uplink::Packet(dev))
            }
            (Some(name), _) => Some(Uplink::Tap(TapDevice::open(name, cfg.queues, cfg.offloads, cfg.mtu)?)),
            (None, Some(w)) => Some(Uplink::Wire(LinkEnd::attach(w).map_err(|e| bad(e.to_string()))?)),
            (None, None) => None,
        };
        let queues = match &uplink {
            Some(Uplink::Tap(dev)) => {
                (0..dev.queues()).map(|k| (Wire::Tap(dev.source(k)), Wire::Tap(dev.sink(k)))).collect()
            }
            Some(Uplink::Packet(dev)) => {
                (0..dev.queues()).map(|k| (Wire::Tap(dev.source(k)), Wire::Tap(dev.sink(k)))).collect()
            }
            Some(Uplink::Tunnel(dev)) => vec![(Wire::Tap(dev.source()), Wire::Tap(dev.sink()))],
            Some(Uplink::Xdp(dev)) => (0..dev.queues())
                .filter_map(|k| dev.take(k))
                .map(|(a, b)| (Wire::Tap(a), Wire::Tap(b)))
                .collect(),
            Some(Uplink::Wire(end)) => vec![(Wire::Link(end.source()), Wire::Link(end.sink()))],
            None => Vec::new(),
        };
        for (k, (source, sink)) in queues.into_iter().enumerate() {
            let (source, sink) = match (params, source, sink) {
                (Some(p), source, sink) => {
                    let rx = NicQueue::new(source, p).map_err(|e| bad(e.to_string()))?;
                    let tx =
                        NicTxQueue::new(sink, p, crate::clock::now_ns()).map_err(|e| bad(e.to_string()))?;
                    (Queue::Nic(Box::new(rx)), Queue::NicTx(Box::new(tx)))
                }
                (None, Wire::Tap(source), Wire::Tap(sink)) => (Queue::Tap(source), Queue::Tap(sink)),
                (None, _, _) => unreachable!("an in-process wire is only a NIC model's (validated)"),
            };
            *port.txq[k].lock() = Some(source);
            *port.rxq[k].lock() = Some(sink);
        }
        if uplink.is_none() && !cfg.client {
            let (l, file) = sockets::listen(&cfg.socket, self.access)?;
            let mut l = UnixListener::from_std(l);
            if let Err(e) = self.poll.registry().register(&mut l, token_of(id, false), Interest::READABLE) {
                file.remove();
                return Err(SwitchError::Start(e));
            }
            listener = Some((l, file));
        }
        let lists = self.balance.place(&port, cfg.queues, self.pmds.len(), |pair| cfg.pmd_of(pair));
        for (pmd, poll_pairs) in self.pmds.iter().zip(lists) {
            let port = port.clone();
            pmd.call(|done| PmdCmd::AddPort { port, poll_pairs, done });
        }
        self.fdb.set_limit(id, cfg.mac_limit());
        match &uplink {
            Some(u) => {
                tracing::info!(port = %cfg.name, id, uplink = %u.label(), queues = cfg.queues, "port added")
            }
            None => {
                tracing::info!(port = %cfg.name, id, socket = %cfg.socket.display(), client = cfg.client, "port added")
            }
        }
        self.ports.insert(
            id,
            PortState {
                cfg,
                port,
                device,
                listener,
                uplink,
                conn: None,
                partial_since: None,
                blocked_since: None,
                next_retry: Instant::now(),
                connects: 0,
                logged: 0,
            },
        );
        self.retry_clients();
        Ok(())
    }

    fn port_named(&mut self, name: &str) -> Result<&mut PortState, SwitchError> {
        self.ports
            .values_mut()
            .find(|p| p.cfg.name == name)
            .ok_or_else(|| SwitchError::NoSuchPort(name.into()))
    }

    fn policy_report(&mut self, name: &str) -> Result<PolicyReport, SwitchError> {
        let st = self.port_named(name)?;
        let pol = &st.port.policy;
        let (queued, queued_bytes) =
            pol.egress.lock().as_ref().map_or((0, 0), |s| (s.len() as u64, s.queued_bytes()));
        Ok(PolicyReport {
            name: st.cfg.name.clone(),
            policy: pol.config(),
            counters: pol.stats.snapshot(),
            shaper_queued: queued,
            shaper_queued_bytes: queued_bytes,
        })
    }

    /// Replaces a port's policy while its guest stays connected.
    fn set_policy(&mut self, name: &str, policy: PolicyConfig) -> Result<PolicyReport, SwitchError> {
        let st = self.port_named(name)?;
        st.port.set_policy(&policy).map_err(|source| ConfigError::Policy { port: name.into(), source })?;
        st.cfg.set_policy(policy);
        tracing::info!(port = %name, "policy changed");
        self.policy_report(name)
    }

    fn del_port(&mut self, name: &str) -> Result<(), SwitchError> {
        let id = self.ports.values().find(|p| p.cfg.name == name).map(|p| p.port.id);
        let id = id.ok_or_else(|| SwitchError::NoSuchPort(name.into()))?;
        self.vf_port_gone(id);
        self.disconnect(id);
        let mut removed = self.ports.remove(&id);
        if let Some(st) = &mut removed {
            if let Some((l, file)) = &mut st.listener {
                let _ = self.poll.registry().deregister(l);
                file.remove();
            }
        }
        for pmd in &self.pmds {
            pmd.call(|done| PmdCmd::DelPort { id, done });
        }
        self.balance.forget(id);
        if let Some(st) = &removed {
            // No burst touches the port now: its device files close here (a TAP the switch
            // created goes away with them).
            for slot in st.port.txq.iter().chain(st.port.rxq.iter()) {
                *slot.lock() = None;
            }
        }
        drop(removed);
        self.fdb.flush_port(id);
        // A NIC model must not steer the gone port's MACs to whatever port gets its id next.
        self.sync_nics();
        tracing::info!(port = name, "port removed");
        Ok(())
    }

    fn shutdown(&mut self) {
        let ids: Vec<u16> = self.ports.keys().copied().collect();
        for id in ids {
            if let Some(name) = self.ports.get(&id).map(|p| p.cfg.name.clone()) {
                let _ = self.del_port(&name);
            }
        }
        if let Some(c) = &mut self.ctl {
            c.shutdown(self.poll.registry());
        }
        self.pmds.clear();
    }
}

/// Errors after which the byte stream is still in step with the frontend.
pub(crate) fn keeps_connection(e: &VuError) -> bool {
    matches!(
        e,
        VuError::ReqHandlerError(_)
            | VuError::InvalidParam
            | VuError::InactiveFeature(_)
            | VuError::InactiveOperation(_)
            | VuError::InvalidOperation(_)
            | VuError::FeatureMismatch
    )
}
