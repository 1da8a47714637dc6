//! Starts, pins, measures and stops the switch under test.
//!
//! Three peers, each serving every port as a vhost-user **server** (the generator connects to
//! [`Peer::sockets`] as a client), each pinned to one CPU (`backend_cpu`):
//!
//! * **ours**: our `vswitch` (also with per-port policies, or behind a vIOMMU), see `ours.rs`.
//! * **dpdk**: `dpdk-testpmd` forwarding between `net_vhost` ports, see `dpdk.rs`.
//! * **ovs**: Open vSwitch (DPDK build) with a private database, see `ovs.rs`.
//!
//! Every process started here is pinned to `backend_cpu` as a whole, so the generator's CPU
//! sees none of the peer's helper threads; their CPU time is counted through [`Peer::pids`].
//! Each runs in its own process group (a Ctrl-C at the terminal reaches only the harness,
//! which then stops the peer) and receives SIGTERM should the thread that started it die.
//! Every wait is bounded; everything left running is killed by PID on drop.
//!
//! Each peer's submodule says how to find, start and read that peer; `supervise.rs` runs and
//! stops the processes. This module holds what they share: the options, the errors, the
//! running [`Peer`] and its teardown.

pub(crate) mod dpdk;
mod ours;
mod ovs;
mod supervise;

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

pub use ours::{probe_vswitch, vswitch_binary};
use supervise::{run_bounded, Proc};

use super::spec::{PeerKind, SpecError, Topology};
use super::sys;

/// Longest path a `sockaddr_un` holds (108 bytes including the terminating NUL).
const SUN_PATH_MAX: usize = 107;

/// Distinguishes peers started by one process (DPDK file prefixes, OVS bridge names).
static INSTANCE: AtomicU32 = AtomicU32::new(0);

/// What to start.
#[derive(Clone, Debug)]
pub struct PeerOptions {
    /// Which switch.
    pub kind: PeerKind,
    /// Topology: decides the port configuration (access VLANs for [`Topology::Vlan`]).
    pub topology: Topology,
    /// Number of ports (vhost-user sockets).
    pub ports: usize,
    /// The one CPU the switch's processes are pinned to (PMD / forwarding lcore included).
    pub backend_cpus: Vec<usize>,
    /// Back the peer's memory with 2 MiB huge pages (DPDK: `--huge-unlink`, else `--no-huge`;
    /// ours allocates nothing large; OVS always needs them and reserves them if it can).
    pub hugepages: bool,
    /// Sockets, logs and OVS's private database go here; created by [`Peer::start`]. Socket
    /// paths must fit a `sockaddr_un` (107 bytes), so keep it short.
    pub workdir: PathBuf,
    /// The `vswitch` binary; `None` looks next to the current executable, then in
    /// `target/release` (of this workspace and of the current directory), then on `PATH`.
    pub vswitch_bin: Option<PathBuf>,
    /// Ours only: poll without ever sleeping (benchmarks). `false` uses the switch's adaptive
    /// mode, which sleeps on the kick eventfds when idle, so tests do not burn a core.
    pub busy_poll: bool,
    /// Flows per port the generator will use (ours+policy allows exactly their addresses).
    pub flows: usize,
}

/// Why a peer cannot be used, started or stopped.
#[derive(thiserror::Error, Debug)]
pub enum PeerError {
    /// The peer's programs are missing or unsuitable.
    #[error("peer {peer} is not available: {hint}")]
    NotInstalled {
        /// Which peer.
        peer: PeerKind,
        /// What is missing and how to install it.
        hint: String,
    },
    /// The peer lacks a resource it needs (huge pages).
    #[error("{0}")]
    Unsupported(String),
    /// The peer cannot run this topology with this many ports (its message as is).
    #[error(transparent)]
    Topology(#[from] SupportError),
    /// The options are unusable (e.g. socket paths too long).
    #[error("{0}")]
    Invalid(String),
    /// The peer failed to come up.
    #[error("peer {peer} did not start: {msg} (log: {})", .log.display())]
    Start {
        /// Which peer.
        peer: PeerKind,
        /// What went wrong.
        msg: String,
        /// The log to read.
        log: PathBuf,
    },
    /// The peer could not be stopped or its processes reaped.
    #[error("stopping peer {peer}: {msg} (log: {})", .log.display())]
    Stop {
        /// Which peer.
        peer: PeerKind,
        /// What went wrong.
        msg: String,
        /// The log to read.
        log: PathBuf,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl PeerError {
    fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> PeerError {
        let what = what.into();
        move |source| PeerError::Io { what, source }
    }
}

/// What a stopped peer reports.
#[derive(Clone, Debug)]
pub struct PeerReport {
    /// Busy CPU cycles per packet the switch itself measured (TSC cycles per packet received
    /// from guests), over [`Peer::begin_window`]..[`Peer::stop`] for ours and OVS (from the
    /// start if `begin_window` was not called) and over the whole run for DPDK (testpmd
    /// cannot reset its counter, so its warm-up is included). `None` when the peer
    /// received no packet in that span or could not tell (e.g. it had to be killed).
    pub self_cycles_per_frame: Option<f64>,
    /// The peer's main log.
    pub log: PathBuf,
    /// Things that went wrong without invalidating the run (e.g. a forced kill), for the user.
    pub warnings: Vec<String>,
}

/// Checks that `kind` is installed and usable; returns its version (e.g. `22.11.11` for
/// DPDK, `3.1.0 (DPDK 22.11.11)` for OVS). The error says how to install what is missing.
pub fn probe(kind: PeerKind) -> Result<String, PeerError> {
    match kind {
        PeerKind::Ours | PeerKind::OursPolicy | PeerKind::OursViommu | PeerKind::OursLog => {
            probe_vswitch(None)
        }
        PeerKind::Dpdk => dpdk::probe(),
        PeerKind::Ovs => ovs::probe(),
    }
}

/// Why a peer cannot run a topology with a given number of ports.
#[derive(thiserror::Error, Debug)]
pub enum SupportError {
    /// The topology does not take that many ports, whatever the peer (its message as is).
    #[error(transparent)]
    Ports(#[from] SpecError),
    /// peer dpdk (testpmd io forwarding) only pairs port 0 with port 1: it runs p2p and p2p-uni
    /// with 2 ports, not {topology} with {ports} (no MAC learning, no VLANs)
    #[error(
        "peer dpdk (testpmd io forwarding) only pairs port 0 with port 1: it runs p2p and \
         p2p-uni with 2 ports, not {topology} with {ports} (no MAC learning, no VLANs)"
    )]
    DpdkPairsOnly {
        /// The topology asked for.
        topology: Topology,
        /// The port count asked for.
        ports: usize,
    },
}

/// Whether `kind` can run `topology` with `ports` ports; the error says why not.
pub fn supports(kind: PeerKind, topology: Topology, ports: usize) -> Result<(), SupportError> {
    topology.check_ports(ports)?;
    match kind {
        PeerKind::Ours | PeerKind::OursPolicy | PeerKind::OursViommu | PeerKind::OursLog | PeerKind::Ovs => {
            Ok(())
        }
        PeerKind::Dpdk => match topology {
            Topology::P2p | Topology::P2pUni if ports == 2 => Ok(()),
            _ => Err(SupportError::DpdkPairsOnly { topology, ports }),
        },
    }
}

/// Paths of Unix sockets in listening state, from /proc/net/unix (`None` if unreadable).
fn listening_unix_sockets() -> Option<Vec<String>> {
    let text = fs::read_to_string("/proc/net/unix").ok()?;
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        // Num: RefCount Protocol Flags Type St Inode [Path]; the path may contain spaces.
        let mut rest = line;
        let mut fields = Vec::with_capacity(7);
        for _ in 0..7 {
            rest = rest.trim_start();
            let end = rest.find(' ').unwrap_or(rest.len());
            fields.push(&rest[..end]);
            rest = &rest[end..];
        }
        let path = rest.trim_start();
        let listening = u32::from_str_radix(fields[3], 16).map(|f| f & 0x10000 != 0).unwrap_or(false);
        if listening && !path.is_empty() {
            out.push(path.to_string());
        }
    }
    Some(out)
}

fn is_socket(p: &Path) -> bool {
    fs::metadata(p).map(|m| m.file_type().is_socket()).unwrap_or(false)
}

/// Kind-specific state.
enum Extra {
    Ours(ours::Control),
    Dpdk,
    Ovs(ovs::Ovs),
}

/// A running switch under test. Stop it with [`stop`](Peer::stop); dropping it kills
/// whatever still runs.
pub struct Peer {
    kind: PeerKind,
    sockets: Vec<PathBuf>,
    log: PathBuf,
    /// In shutdown order (OVS: ovs-vswitchd, then ovsdb-server).
    procs: Vec<Proc>,
    file_prefix: Option<String>,
    extra: Extra,
    torn_down: bool,
}

impl Peer {
    /// Starts the peer and returns once every port's vhost-user socket is listening (at most
    /// 30 s; the error names the log to read).
    ///
    /// The peer's processes get SIGTERM if the *thread* calling this exits, so call it from
    /// a thread that outlives the peer (e.g. the main thread).
    pub fn start(opts: &PeerOptions) -> Result<Peer, PeerError> {
        supports(opts.kind, opts.topology, opts.ports)?;
        fs::create_dir_all(&opts.workdir)
            .map_err(PeerError::io(format!("cannot create work directory {}", opts.workdir.display())))?;
        let workdir = opts
            .workdir
            .canonicalize()
            .map_err(PeerError::io(format!("cannot resolve work directory {}", opts.workdir.display())))?;
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        if !opts.kind.is_ours() {
            clean_stale_leftovers();
        }
        match opts.kind {
            PeerKind::Ours | PeerKind::OursPolicy | PeerKind::OursViommu | PeerKind::OursLog => {
                ours::start(opts, &workdir)
            }
            PeerKind::Dpdk => dpdk::start(opts, &workdir, n),
            PeerKind::Ovs => ovs::start(opts, &workdir, n),
        }
    }

    /// Port `i`'s vhost-user socket (the peer listens; the generator connects).
    pub fn sockets(&self) -> &[PathBuf] {
        &self.sockets
    }

    /// The processes whose CPU time is the switch's cost (OVS: ovs-vswitchd and ovsdb-server).
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }

    /// The peer's main log.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Marks the start of the measurement window: snapshots (ours) or clears (OVS) the
    /// peer's own counters. No-op for DPDK, whose figure covers the whole run. A failure
    /// is logged and leaves the self-reported figure covering the whole run (ours) or
    /// unchanged.
    pub fn begin_window(&mut self) {
        match &mut self.extra {
            Extra::Ours(control) => control.begin_window(),
            Extra::Dpdk => {}
            Extra::Ovs(ovs) => ovs.begin_window(),
        }
    }

    /// Stops the peer cleanly (SIGINT, `ovs-appctl exit --cleanup`), killing it if it does
    /// not exit in time (ours 5 s, DPDK and OVS 10 s), reaps it, removes its sockets and
    /// DPDK's leftover files, and reports what the peer measured itself.
    pub fn stop(mut self) -> Result<PeerReport, PeerError> {
        let mut warnings = Vec::new();
        // Read the peer's own counters while it still runs.
        let mut cycles = match &self.extra {
            Extra::Ours(control) => control.cycles().unwrap_or_else(|e| {
                warnings.push(format!("cannot read vswitch counters at window end: {e}"));
                None
            }),
            Extra::Dpdk => None,
            Extra::Ovs(ovs) => ovs.pmd_cycles().unwrap_or_else(|e| {
                warnings.push(format!("cannot read OVS PMD counters: {e}"));
                None
            }),
        };
        let forced = self.teardown(true, &mut warnings);
        if self.kind == PeerKind::Dpdk && !forced {
            cycles = fs::read_to_string(&self.log).ok().and_then(|l| dpdk::testpmd_cycles(&l));
        }
        let unreaped: Vec<String> = self
            .procs
            .iter_mut()
            .filter_map(|p| p.running().then(|| format!("{} (pid {})", p.name, p.pid())))
            .collect();
        if !unreaped.is_empty() {
            return Err(PeerError::Stop {
                peer: self.kind,
                msg: format!("still running after SIGKILL: {}", unreaped.join(", ")),
                log: self.log.clone(),
            });
        }
        for w in &warnings {
            tracing::warn!("peer {}: {w}", self.kind);
        }
        Ok(PeerReport { self_cycles_per_frame: cycles, log: self.log.clone(), warnings })
    }

    /// Stops every process (gracefully with `patient`, else quickly), then removes sockets
    /// and DPDK files. Returns whether any process had to be killed. Idempotent.
    fn teardown(&mut self, patient: bool, warnings: &mut Vec<String>) -> bool {
        if self.torn_down {
            return false;
        }
        self.torn_down = true;
        let mut forced = false;
        let kind = self.kind;
        for p in &mut self.procs {
            let killed = match (&self.extra, p.name) {
                (Extra::Ovs(ovs), "ovs-vswitchd") => ovs.stop_vswitchd(p, patient, warnings),
                (Extra::Ovs(_), _) => {
                    p.terminate(libc::SIGTERM, Duration::from_secs(if patient { 5 } else { 1 }))
                }
                _ => {
                    let patience = match (patient, kind) {
                        (false, _) => Duration::from_secs(1),
                        (true, k) if k.is_ours() => Duration::from_secs(5),
                        (true, _) => Duration::from_secs(10),
                    };
                    p.terminate(if patient { libc::SIGINT } else { libc::SIGTERM }, patience)
                }
            };
            if let Some(w) = killed {
                forced = true;
                warnings.push(w);
            }
        }
        if let Some(prefix) = &self.file_prefix {
            sys::cleanup_hugefiles(prefix);
        }
        for s in &self.sockets {
            let _ = fs::remove_file(s);
        }
        if let Extra::Ours(control) = &self.extra {
            let _ = fs::remove_file(&control.path);
        }
        forced
    }

    /// Checks socket path lengths and removes stale sockets.
    fn prepare_sockets(sockets: &[PathBuf]) -> Result<(), PeerError> {
        for s in sockets {
            let len = s.as_os_str().len();
            if len > SUN_PATH_MAX {
                return Err(PeerError::Invalid(format!(
                    "socket path {} is {len} bytes long, more than the {SUN_PATH_MAX} a Unix socket \
                     address holds; use a shorter work directory",
                    s.display()
                )));
            }
            match fs::remove_file(s) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(PeerError::io(format!("cannot remove stale socket {}", s.display()))(e))
                }
            }
        }
        Ok(())
    }

    /// Waits until every path in `paths` is a listening Unix socket, failing early if one of
    /// our processes exits.
    fn wait_listening(&mut self, paths: &[PathBuf], timeout: Duration) -> Result<(), PeerError> {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = self.procs.iter_mut().find_map(|p| {
                (!p.running()).then(|| {
                    let st = p.status.map_or_else(|| "unknown status".to_string(), |s| s.to_string());
                    format!("{} exited ({st}) before its sockets appeared", p.name)
                })
            });
            if let Some(msg) = exited {
                return Err(self.start_error(msg));
            }
            let missing: Vec<&PathBuf> = match listening_unix_sockets() {
                Some(l) => paths.iter().filter(|p| !l.iter().any(|s| Path::new(s) == p.as_path())).collect(),
                None => paths.iter().filter(|p| !is_socket(p)).collect(),
            };
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let names: Vec<String> = missing.iter().map(|p| p.display().to_string()).collect();
                return Err(self.start_error(format!(
                    "after {} s these sockets are not listening: {}",
                    timeout.as_secs(),
                    names.join(", ")
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`PeerError::Start`] for this peer, pointing at its current main log.
    fn start_error(&self, msg: impl std::fmt::Display) -> PeerError {
        PeerError::Start { peer: self.kind, msg: msg.to_string(), log: self.log.clone() }
    }
}

/// If `name` is `{stem}{pid}{sep}{n}` (this module's naming of DPDK file prefixes and OVS
/// bridges), the pid.
fn leftover_pid(name: &str, stem: &str, sep: char) -> Option<u32> {
    let (pid, n) = name.strip_prefix(stem)?.split_once(sep)?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(pid) && digits(n)).then(|| pid.parse().ok()).flatten()
}

/// Removes what peers of processes that died without cleaning up (killed harness) left
/// behind: DPDK runtime directories and huge page files of our file prefixes, and OVS bridge
/// tap devices, whose creating process no longer exists. Only names of our own scheme.
fn clean_stale_leftovers() {
    let gone = |pid: u32| !Path::new(&format!("/proc/{pid}")).exists();
    if let Ok(entries) = fs::read_dir("/var/run/dpdk") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = leftover_pid(&name, "vsb-back-", '-').or_else(|| leftover_pid(&name, "vsb-ovs-", '-'));
            if pid.is_some_and(gone) {
                sys::cleanup_hugefiles(&name);
            }
        }
    }
    if let Ok(entries) = fs::read_dir("/sys/class/net") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if leftover_pid(&name, "vsb", 'b').is_some_and(gone) {
                let _ =
                    run_bounded(Command::new("ip").args(["link", "delete", &name]), Duration::from_secs(5));
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let mut warnings = Vec::new();
        self.teardown(false, &mut warnings);
        for w in warnings {
            tracing::warn!("peer {}: {w}", self.kind);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn support_matrix() {
        assert!(supports(PeerKind::Dpdk, Topology::P2p, 2).is_ok());
        assert!(supports(PeerKind::Dpdk, Topology::P2pUni, 2).is_ok());
        let e = supports(PeerKind::Dpdk, Topology::Mesh, 4).unwrap_err();
        assert!(e.to_string().contains("port 0 with port 1"), "{e}");
        assert!(supports(PeerKind::Dpdk, Topology::Vlan, 4).is_err());
        assert!(supports(PeerKind::Dpdk, Topology::Mesh, 2).is_err());
        for k in [PeerKind::Ours, PeerKind::Ovs] {
            for t in Topology::ALL {
                assert!(supports(k, t, t.default_ports()).is_ok(), "{k} {t}");
            }
            assert!(supports(k, Topology::P2p, 3).is_err(), "port count checked");
        }
    }

    #[test]
    fn reads_listening_sockets() {
        let dir = std::env::temp_dir().join(format!("vsb-peer-unit-{}", std::process::id()));
        let _ = fs::create_dir_all(&dir);
        let path = dir.join("l isten.sock");
        let _ = fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path);
        assert!(listener.is_ok());
        let l = listening_unix_sockets().unwrap_or_default();
        assert!(l.iter().any(|s| Path::new(s) == path), "{path:?} not in {l:?}");
        drop(listener);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn leftover_names() {
        assert_eq!(leftover_pid("vsb-back-123-0", "vsb-back-", '-'), Some(123));
        assert_eq!(leftover_pid("vsb-ovs-99-12", "vsb-ovs-", '-'), Some(99));
        assert_eq!(leftover_pid("vsb123b4", "vsb", 'b'), Some(123));
        for other in ["vsb2", "vsb-back-x-1", "vsb-back-12", "vsb-back-12-", "vsbb1", "smokegen"] {
            assert_eq!(leftover_pid(other, "vsb-back-", '-'), None, "{other}");
            assert_eq!(leftover_pid(other, "vsb", 'b'), None, "{other}");
        }
    }

    #[test]
    fn rejects_long_socket_paths() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        assert!(matches!(Peer::prepare_sockets(&[long]), Err(PeerError::Invalid(_))));
    }
}
