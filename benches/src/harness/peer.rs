//! Starts, pins, measures and stops the switch under test.
//!
//! Three peers, each serving every port as a vhost-user **server** (the generator connects to
//! [`Peer::sockets`] as a client), each pinned to one CPU (`backend_cpu`):
//!
//! * **ours**: `vswitch run --port pI=SOCK[,vlan=N] ... --pmd-cores CPU --busy-poll`, the
//!   whole process pinned to the CPU. Self-reported cost: the PMD threads' busy TSC ticks per
//!   packet taken from guests, read with `vswitch ctl --json stats`.
//! * **dpdk**: `dpdk-testpmd` with one `net_vhost` port per socket in `io` forwarding mode
//!   (port 0 ⇄ port 1; no MAC learning, no VLANs), main and forwarding lcore on the CPU.
//!   Self-reported cost: `--record-core-cycles`, printed when testpmd exits.
//! * **ovs**: Open vSwitch (DPDK build) from a private database and run directory under the
//!   work directory: a netdev bridge with one `dpdkvhostuser` port per socket, flows
//!   `actions=NORMAL` (MAC learning, like ours), access VLANs as port tags, one PMD thread on
//!   the CPU. Self-reported cost: `pmd-stats-show` "avg processing cycles per packet".
//!
//! Every process started here is pinned to `backend_cpu` as a whole, so the generator's CPU
//! sees none of the peer's helper threads; their CPU time is counted through [`Peer::pids`].
//! Each runs in its own process group (a Ctrl-C at the terminal reaches only the harness,
//! which then stops the peer) and receives SIGTERM should the thread that started it die.
//! Every wait is bounded; everything left running is killed by PID on drop.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::spec::{PeerKind, Topology};
use super::sys;

/// OVS-DPDK's `dpdk-socket-mem` in MiB, and the 2 MiB huge pages it needs free.
const OVS_SOCKET_MEM_MB: u64 = 1024;
/// Free 2 MiB pages OVS needs at start (`OVS_SOCKET_MEM_MB` / 2).
const OVS_HUGEPAGES: u64 = OVS_SOCKET_MEM_MB / 2;
/// Longest path a `sockaddr_un` holds (108 bytes including the terminating NUL).
const SUN_PATH_MAX: usize = 107;
/// Where Debian's OVS keeps the database schema.
const OVS_SCHEMAS: [&str; 2] =
    ["/usr/share/openvswitch/vswitch.ovsschema", "/usr/local/share/openvswitch/vswitch.ovsschema"];
/// The OVS programs the peer runs.
const OVS_PROGRAMS: [&str; 6] =
    ["ovs-vswitchd", "ovsdb-server", "ovsdb-tool", "ovs-vsctl", "ovs-appctl", "ovs-ofctl"];
/// How to get the DPDK build of ovs-vswitchd.
const OVS_DPDK_ALTERNATIVE: &str =
    "update-alternatives --set ovs-vswitchd /usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk";

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
    pub backend_cpu: usize,
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
    /// The peer cannot run this topology / port count, or lacks a resource it needs.
    #[error("{0}")]
    Unsupported(String),
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
        PeerKind::Ours | PeerKind::OursPolicy | PeerKind::OursViommu => probe_vswitch(None),
        PeerKind::Dpdk => {
            let bin = which("dpdk-testpmd").ok_or_else(|| PeerError::NotInstalled {
                peer: kind,
                hint: "dpdk-testpmd is not on PATH; run scripts/install-test-deps.sh \
                       (apt-get install dpdk-dev)"
                    .into(),
            })?;
            // EAL prints its version while parsing `-v`, and `--help` exits right after
            // parsing: nothing is initialised, no huge page or runtime file is touched.
            let out = run_bounded(Command::new(bin).args(["-v", "--help"]), Duration::from_secs(10))
                .map_err(|msg| PeerError::NotInstalled { peer: kind, hint: msg })?;
            let text =
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            Ok(text
                .lines()
                .find_map(|l| l.split("RTE Version: '").nth(1))
                .map(|v| v.trim_end_matches('\'').trim_start_matches("DPDK ").to_string())
                .unwrap_or_else(|| "unknown".into()))
        }
        PeerKind::Ovs => {
            let hint = "run scripts/install-bench-peers.sh (apt-get install openvswitch-switch-dpdk)";
            for p in OVS_PROGRAMS {
                if which(p).is_none() {
                    return Err(PeerError::NotInstalled {
                        peer: kind,
                        hint: format!("{p} is not on PATH; {hint}"),
                    });
                }
            }
            if ovs_schema().is_none() {
                return Err(PeerError::NotInstalled {
                    peer: kind,
                    hint: format!("the OVS database schema ({}) is missing; {hint}", OVS_SCHEMAS[0]),
                });
            }
            let out = run_bounded(Command::new("ovs-vswitchd").arg("--version"), Duration::from_secs(10))
                .map_err(|msg| PeerError::NotInstalled { peer: kind, hint: msg })?;
            let text = String::from_utf8_lossy(&out.stdout);
            let dpdk = text.lines().find(|l| l.starts_with("DPDK")).map(str::trim);
            let Some(dpdk) = dpdk else {
                return Err(PeerError::NotInstalled {
                    peer: kind,
                    hint: format!(
                        "ovs-vswitchd on PATH is not the DPDK build; run {OVS_DPDK_ALTERNATIVE} \
                         (scripts/install-bench-peers.sh does it)"
                    ),
                });
            };
            let ovs = text.lines().next().and_then(|l| l.split_whitespace().last()).unwrap_or("unknown");
            Ok(format!("{ovs} ({dpdk})"))
        }
    }
}

/// [`probe`] for ours with the binary [`PeerOptions::vswitch_bin`] names (`None`: the default
/// search of [`vswitch_binary`]); returns its version.
pub fn probe_vswitch(bin: Option<&Path>) -> Result<String, PeerError> {
    let bin = vswitch_binary(bin)?;
    let out = run_bounded(Command::new(&bin).arg("--version"), Duration::from_secs(10))
        .map_err(|msg| PeerError::NotInstalled { peer: PeerKind::Ours, hint: msg })?;
    if !out.status.success() {
        return Err(PeerError::NotInstalled {
            peer: PeerKind::Ours,
            hint: format!("`{} --version` failed ({}): {}", bin.display(), out.status, tail(&out)),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split_whitespace().nth(1).unwrap_or("unknown").to_string())
}

/// Whether `kind` can run `topology` with `ports` ports; the error says why not.
pub fn supports(kind: PeerKind, topology: Topology, ports: usize) -> Result<(), String> {
    topology.check_ports(ports)?;
    match kind {
        PeerKind::Ours | PeerKind::OursPolicy | PeerKind::OursViommu | PeerKind::Ovs => Ok(()),
        PeerKind::Dpdk => match topology {
            Topology::P2p | Topology::P2pUni if ports == 2 => Ok(()),
            _ => Err(format!(
                "peer dpdk (testpmd io forwarding) only pairs port 0 with port 1: it runs p2p and \
                 p2p-uni with 2 ports, not {topology} with {ports} (no MAC learning, no VLANs)"
            )),
        },
    }
}

/// The `vswitch` configuration of the ours+policy peer: each port polices what it receives from
/// the generator and shapes what it sends back at 100 Gbit/s (never reached here, so nothing is
/// dropped or held but every packet is metered), and allows exactly the generator's source
/// MACs and IPs of that port.
fn policy_config(opts: &PeerOptions, sockets: &[PathBuf]) -> String {
    use std::fmt::Write as _;
    let mut t = String::from("fdb_aging_secs = 300\n");
    for (i, s) in sockets.iter().enumerate() {
        let _ = writeln!(t, "[[port]]\nname = \"p{i}\"\nsocket = {:?}", s.display().to_string());
        if let Some(v) = opts.topology.access_vlan(i) {
            let _ = writeln!(t, "vlan = {v}");
        }
        let macs: Vec<String> = (0..opts.flows.max(1))
            .map(|f| {
                let m = crate::harness::gen::port_mac(i, f);
                format!("\"{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}\"", m[0], m[1], m[2], m[3], m[4], m[5])
            })
            .collect();
        let _ = writeln!(t, "ingress = {{ rate = \"100G\" }}\negress = {{ rate = \"100G\" }}");
        let _ = writeln!(t, "anti_spoof = {{ macs = [{}], ips = [\"10.{i}.0.0/16\"] }}", macs.join(", "));
    }
    t
}

/// Finds the `vswitch` binary: `explicit` if given (it must exist), else next to the current
/// executable, in `target/release` of this workspace or of the current directory, on `PATH`.
pub fn vswitch_binary(explicit: Option<&Path>) -> Result<PathBuf, PeerError> {
    if let Some(p) = explicit {
        return if is_executable(p) {
            Ok(p.to_path_buf())
        } else {
            Err(PeerError::NotInstalled {
                peer: PeerKind::Ours,
                hint: format!(
                    "{} is not an executable file; give the path of a built vswitch \
                     (cargo build --release -p vswitch)",
                    p.display()
                ),
            })
        };
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().as_deref().and_then(Path::parent) {
        candidates.push(dir.join("vswitch"));
        // Test executables live in target/<profile>/deps; binaries one level up.
        if dir.file_name().is_some_and(|n| n == "deps") {
            if let Some(profile_dir) = dir.parent() {
                candidates.push(profile_dir.join("vswitch"));
            }
        }
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(Path::new(&t).join("release/vswitch"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/vswitch"));
    candidates.push(PathBuf::from("target/release/vswitch"));
    candidates.into_iter().find(|p| is_executable(p)).or_else(|| which("vswitch")).ok_or_else(|| {
        PeerError::NotInstalled {
            peer: PeerKind::Ours,
            hint: "no vswitch binary next to this program, in target/release (or $CARGO_TARGET_DIR/release) or on PATH; \
                   build it with `cargo build --release -p vswitch`"
                .into(),
        }
    })
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// `program` on PATH.
fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| is_executable(p))
}

fn ovs_schema() -> Option<PathBuf> {
    OVS_SCHEMAS.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// Waits for `child` until `timeout`; `Ok(None)` if it is still running then.
fn wait_deadline(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_millis(2);
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep(nap.min(deadline - now));
        nap = (nap * 2).min(Duration::from_millis(50));
    }
}

/// The program name of a command, for messages.
fn program(cmd: &Command) -> String {
    cmd.get_program().to_string_lossy().into_owned()
}

/// Runs a short command to completion with its output captured, killing it after `timeout`.
/// `Err` says what failed (could not start, timed out); a non-zero exit is *not* an error
/// here: check `status`.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let name = program(cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("cannot run {name}: {e}"))?;
    // Drain both pipes in threads so a chatty command cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        pipe.and_then(|mut p| {
            thread::Builder::new()
                .name("peer-cmd-output".into())
                .spawn(move || {
                    let mut v = Vec::new();
                    let _ = p.read_to_end(&mut v);
                    v
                })
                .ok()
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let status = match wait_deadline(&mut child, timeout) {
        Ok(Some(st)) => Ok(st),
        Ok(None) => Err(format!("{name} did not finish within {} s and was killed", timeout.as_secs())),
        Err(e) => Err(format!("waiting for {name}: {e}")),
    };
    if status.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    // The pipes close when the command exits, unless it left a background process holding
    // them: give up on the output after a grace period rather than block.
    let grace = Instant::now() + Duration::from_secs(2);
    let join = |h: Option<thread::JoinHandle<Vec<u8>>>| {
        let h = h?;
        while !h.is_finished() && Instant::now() < grace {
            thread::sleep(Duration::from_millis(2));
        }
        if h.is_finished() {
            h.join().ok()
        } else {
            None
        }
    };
    let (stdout, stderr) = (join(out).unwrap_or_default(), join(err).unwrap_or_default());
    Ok(Output { status: status?, stdout, stderr })
}

/// Last lines of a command's stderr (or stdout), for error messages.
fn tail(out: &Output) -> String {
    let text = if out.stderr.is_empty() { &out.stdout } else { &out.stderr };
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// Makes `cmd`'s child receive SIGTERM when the thread that spawned it dies, so a crashed
/// harness leaves no busy-polling switch behind.
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: runs in the forked child before exec; prctl and getppid are plain system calls
    // (async-signal-safe), nothing allocates or locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// A long-running child of the peer.
struct Proc {
    name: &'static str,
    child: Child,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` pinned to `cpu`, in its own process group, stdout and stderr to `log`.
    fn spawn(name: &'static str, cmd: &mut Command, cpu: usize, log: &Path) -> Result<Proc, PeerError> {
        let out = File::create(log).map_err(PeerError::io(format!("cannot create {}", log.display())))?;
        let err = out.try_clone().map_err(PeerError::io(format!("cannot duplicate {}", log.display())))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
        sys::pin_command(cmd, cpu);
        die_with_parent(cmd);
        let child = cmd.spawn().map_err(PeerError::io(format!("cannot start {name} pinned to CPU {cpu}")))?;
        Ok(Proc { name, child, status: None })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it still runs (reaps it if not).
    fn running(&mut self) -> bool {
        if self.status.is_none() {
            match self.child.try_wait() {
                Ok(Some(st)) => self.status = Some(st),
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
        false
    }

    /// Sends `sig` if it still runs (never to a reaped PID).
    fn signal(&mut self, sig: libc::c_int) {
        if self.running() {
            // SAFETY: kill(2) on the PID of our own child, which has not been reaped, so the
            // PID cannot have been reused.
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        }
    }

    /// Waits up to `patience` for it to exit; true if it did.
    fn wait(&mut self, patience: Duration) -> bool {
        if self.status.is_some() {
            return true;
        }
        match wait_deadline(&mut self.child, patience) {
            Ok(Some(st)) => {
                self.status = Some(st);
                true
            }
            Ok(None) => false,
            Err(_) => !self.running(),
        }
    }

    /// Sends `sig` (0: none) and waits up to `patience`; then SIGKILLs and reaps it.
    /// Returns a warning if it had to be killed or could not be reaped.
    fn terminate(&mut self, sig: libc::c_int, patience: Duration) -> Option<String> {
        if sig != 0 {
            self.signal(sig);
        }
        if self.wait(patience) {
            return None;
        }
        self.signal(libc::SIGKILL);
        if self.wait(Duration::from_secs(5)) {
            Some(format!(
                "{} (pid {}) did not exit within {:?} and was killed",
                self.name,
                self.pid(),
                patience
            ))
        } else {
            Some(format!(
                "{} (pid {}) survived SIGKILL for 5 s (stuck in the kernel?)",
                self.name,
                self.pid()
            ))
        }
    }
}

/// Totals of our switch's PMD counters, keyed by PMD index.
#[derive(Clone, Debug, Default, Deserialize)]
struct CtlStats {
    pmds: Vec<CtlPmd>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct CtlPmd {
    pmd: usize,
    packets: u64,
    busy_ticks: u64,
}

/// Busy ticks per packet between two `vswitch ctl stats` snapshots (PMDs matched by index).
fn ours_cycles(before: &CtlStats, after: &CtlStats) -> Option<f64> {
    let (mut packets, mut ticks) = (0u64, 0u64);
    for b in &after.pmds {
        let a = before.pmds.iter().find(|a| a.pmd == b.pmd).cloned().unwrap_or_default();
        packets += b.packets.saturating_sub(a.packets);
        ticks += b.busy_ticks.saturating_sub(a.busy_ticks);
    }
    (packets > 0).then(|| ticks as f64 / packets as f64)
}

/// The `CPU cycles/packet=X` testpmd prints at exit with `--record-core-cycles` (only when
/// it forwarded packets).
fn testpmd_cycles(log: &str) -> Option<f64> {
    log.lines()
        .filter_map(|l| l.split("CPU cycles/packet=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .next_back()
}

/// Processing cycles per packet summed over the PMD threads of `ovs-appctl
/// dpif-netdev/pmd-stats-show` (the `avg processing cycles per packet: X (CYCLES/PACKETS)`
/// lines; the main thread's section is skipped). `None` without packets.
fn ovs_cycles(show: &str) -> Option<f64> {
    let (mut cycles, mut packets, mut in_pmd) = (0u64, 0u64, false);
    for line in show.lines() {
        if !line.starts_with(' ') {
            in_pmd = line.starts_with("pmd thread");
            continue;
        }
        let Some(v) = line.trim().strip_prefix("avg processing cycles per packet:") else { continue };
        if !in_pmd {
            continue;
        }
        let frac = v.split('(').nth(1).and_then(|s| s.split(')').next());
        if let Some((c, p)) = frac.and_then(|f| f.split_once('/')) {
            if let (Ok(c), Ok(p)) = (c.trim().parse::<u64>(), p.trim().parse::<u64>()) {
                cycles += c;
                packets += p;
            }
        }
    }
    (packets > 0).then(|| cycles as f64 / packets as f64)
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
    Ours { bin: PathBuf, control: PathBuf, window: Option<CtlStats> },
    Dpdk,
    Ovs(Ovs),
}

/// A private Open vSwitch instance.
#[derive(Clone)]
struct Ovs {
    rundir: PathBuf,
    bridge: String,
    db: PathBuf,
    ctl: PathBuf,
    cmdlog: PathBuf,
}

impl Ovs {
    /// An OVS tool with the private run directory in its environment.
    fn command(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        for var in ["OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR"] {
            c.env(var, &self.rundir);
        }
        c
    }

    /// Runs an OVS tool (bounded), logging it to `commands.log`; its stdout on success.
    fn run(&self, prog: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
        let mut cmd = self.command(prog);
        cmd.args(args);
        let res = run_bounded(&mut cmd, timeout);
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&self.cmdlog) {
            let mut entry = format!("$ {prog} {}\n", args.join(" "));
            match &res {
                Ok(o) => {
                    let _ = writeln!(
                        entry,
                        "{}{}[{}]",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr),
                        o.status
                    );
                }
                Err(e) => {
                    let _ = writeln!(entry, "[{e}]");
                }
            }
            let _ = f.write_all(entry.as_bytes());
        }
        let out = res?;
        if !out.status.success() {
            return Err(format!("`{prog} {}` failed ({}): {}", args.join(" "), out.status, tail(&out)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn vsctl(&self, args: &[&str]) -> Result<String, String> {
        let db = format!("--db=unix:{}", self.db.display());
        let mut all = vec![db.as_str(), "--timeout=30"];
        all.extend_from_slice(args);
        self.run("ovs-vsctl", &all, Duration::from_secs(35))
    }

    fn appctl(&self, args: &[&str], timeout_s: u64) -> Result<String, String> {
        let ctl = self.ctl.display().to_string();
        let t = format!("--timeout={timeout_s}");
        let mut all = vec![t.as_str(), "-t", ctl.as_str()];
        all.extend_from_slice(args);
        self.run("ovs-appctl", &all, Duration::from_secs(timeout_s + 3))
    }

    fn ofctl(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["--timeout=10"];
        all.extend_from_slice(args);
        self.run("ovs-ofctl", &all, Duration::from_secs(13))
    }
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
        supports(opts.kind, opts.topology, opts.ports).map_err(PeerError::Unsupported)?;
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
            PeerKind::Ours | PeerKind::OursPolicy | PeerKind::OursViommu => Self::start_ours(opts, &workdir),
            PeerKind::Dpdk => Self::start_dpdk(opts, &workdir, n),
            PeerKind::Ovs => Self::start_ovs(opts, &workdir, n),
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
            Extra::Ours { bin, control, window } => match ctl_stats(bin, control) {
                Ok(s) => *window = Some(s),
                Err(e) => tracing::warn!("cannot snapshot vswitch counters at window start: {e}"),
            },
            Extra::Dpdk => {}
            Extra::Ovs(ovs) => {
                if let Err(e) = ovs.appctl(&["dpif-netdev/pmd-stats-clear"], 5) {
                    tracing::warn!("cannot clear OVS PMD counters at window start: {e}");
                }
            }
        }
    }

    /// Stops the peer cleanly (SIGINT, `ovs-appctl exit --cleanup`), killing it if it does
    /// not exit in time (ours 5 s, DPDK and OVS 10 s), reaps it, removes its sockets and
    /// DPDK's leftover files, and reports what the peer measured itself.
    pub fn stop(mut self) -> Result<PeerReport, PeerError> {
        let mut warnings = Vec::new();
        // Read the peer's own counters while it still runs.
        let mut cycles = match &self.extra {
            Extra::Ours { bin, control, window } => match ctl_stats(bin, control) {
                Ok(after) => ours_cycles(window.as_ref().unwrap_or(&CtlStats::default()), &after),
                Err(e) => {
                    warnings.push(format!("cannot read vswitch counters at window end: {e}"));
                    None
                }
            },
            Extra::Dpdk => None,
            Extra::Ovs(ovs) => match ovs.appctl(&["dpif-netdev/pmd-stats-show"], 5) {
                Ok(show) => {
                    let _ = fs::write(ovs.rundir.join("pmd-stats.txt"), &show);
                    ovs_cycles(&show)
                }
                Err(e) => {
                    warnings.push(format!("cannot read OVS PMD counters: {e}"));
                    None
                }
            },
        };
        let forced = self.teardown(true, &mut warnings);
        if self.kind == PeerKind::Dpdk && !forced {
            cycles = fs::read_to_string(&self.log).ok().and_then(|l| testpmd_cycles(&l));
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
                (Extra::Ovs(ovs), "ovs-vswitchd") => {
                    // `exit --cleanup` deletes the datapath and the bridge's tap device, which
                    // would otherwise persist.
                    let secs = if patient { 10 } else { 2 };
                    let mut asked = false;
                    if p.running() {
                        match ovs.appctl(&["exit", "--cleanup"], secs) {
                            Ok(_) => asked = true,
                            Err(e) => warnings.push(format!("ovs-appctl exit failed: {e}")),
                        }
                    }
                    let killed = if asked && p.wait(Duration::from_secs(secs)) {
                        None
                    } else {
                        p.terminate(libc::SIGTERM, Duration::from_secs(2))
                    };
                    if killed.is_some() && Path::new("/sys/class/net").join(&ovs.bridge).exists() {
                        let _ = run_bounded(
                            Command::new("ip").args(["link", "delete", &ovs.bridge]),
                            Duration::from_secs(5),
                        );
                    }
                    killed
                }
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
        if let Extra::Ours { control, .. } = &self.extra {
            let _ = fs::remove_file(control);
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

    fn start_error(&self, msg: String) -> PeerError {
        PeerError::Start { peer: self.kind, msg, log: self.log.clone() }
    }

    fn start_ours(opts: &PeerOptions, workdir: &Path) -> Result<Peer, PeerError> {
        let bin = vswitch_binary(opts.vswitch_bin.as_deref())?;
        let sockets: Vec<PathBuf> = (0..opts.ports).map(|i| workdir.join(format!("p{i}.sock"))).collect();
        let control = workdir.join("vswitch.ctl");
        Self::prepare_sockets(&sockets)?;
        Self::prepare_sockets(std::slice::from_ref(&control))?;
        let log = workdir.join("vswitch.log");
        let mut cmd = Command::new(&bin);
        cmd.arg("run");
        if opts.kind == PeerKind::OursPolicy {
            let cfg = workdir.join("policy.toml");
            fs::write(&cfg, policy_config(opts, &sockets))
                .map_err(PeerError::io(format!("cannot write {}", cfg.display())))?;
            cmd.arg("--config").arg(cfg);
        } else {
            for (i, s) in sockets.iter().enumerate() {
                let mut spec = format!("p{i}={}", s.display());
                if let Some(v) = opts.topology.access_vlan(i) {
                    let _ = write!(spec, ",vlan={v}");
                }
                cmd.arg("--port").arg(spec);
            }
        }
        cmd.args(["--pmd-cores", &opts.backend_cpu.to_string()]);
        if opts.busy_poll {
            cmd.arg("--busy-poll");
        }
        // The generators are testpmd virtio-user (unsealed memfds, or hugetlbfs) and the
        // in-process frontend on huge pages: memory that can lose pages, mapped under the guard.
        cmd.args(["--unsealed-memory", "guard"]);
        cmd.arg("--control").arg(&control);
        cmd.env_remove("VSWITCH_CONTROL");
        let proc = Proc::spawn("vswitch", &mut cmd, opts.backend_cpu, &log)?;
        let mut peer = Peer {
            kind: opts.kind,
            sockets: sockets.clone(),
            log,
            procs: vec![proc],
            file_prefix: None,
            extra: Extra::Ours { bin, control: control.clone(), window: None },
            torn_down: false,
        };
        let mut all = sockets;
        all.push(control);
        peer.wait_listening(&all, Duration::from_secs(10))?;
        Ok(peer)
    }

    fn start_dpdk(opts: &PeerOptions, workdir: &Path, n: u32) -> Result<Peer, PeerError> {
        let bin = which("dpdk-testpmd").ok_or_else(|| PeerError::NotInstalled {
            peer: PeerKind::Dpdk,
            hint: "dpdk-testpmd is not on PATH; run scripts/install-test-deps.sh (apt-get install dpdk-dev)"
                .into(),
        })?;
        let sockets: Vec<PathBuf> = (0..opts.ports).map(|i| workdir.join(format!("vh{i}.sock"))).collect();
        Self::prepare_sockets(&sockets)?;
        let prefix = format!("vsb-back-{}-{n}", std::process::id());
        sys::cleanup_hugefiles(&prefix);
        let log = workdir.join("testpmd.log");
        let cpu = opts.backend_cpu;
        let mut cmd = Command::new(bin);
        // lcore 0 (main) sleeps in the stats loop, lcore 1 forwards; both on the one CPU.
        cmd.args(["--lcores", &format!("0@{cpu},1@{cpu}"), "--main-lcore", "0", "--no-pci"])
            .arg(format!("--file-prefix={prefix}"));
        if opts.hugepages {
            cmd.arg("--huge-unlink");
        } else {
            cmd.args(["--no-huge", "-m", "1024"]);
        }
        for (i, s) in sockets.iter().enumerate() {
            cmd.arg("--vdev").arg(format!("net_vhost{i},iface={},queues=1", s.display()));
        }
        // Without a stats period, non-interactive testpmd waits for Enter and exits on EOF.
        cmd.args([
            "--",
            "--forward-mode=io",
            "--nb-cores=1",
            "--auto-start",
            "--stats-period",
            "1",
            "--record-core-cycles",
        ]);
        let proc = Proc::spawn("dpdk-testpmd", &mut cmd, cpu, &log)?;
        let mut peer = Peer {
            kind: PeerKind::Dpdk,
            sockets: sockets.clone(),
            log,
            procs: vec![proc],
            file_prefix: Some(prefix),
            extra: Extra::Dpdk,
            torn_down: false,
        };
        peer.wait_listening(&sockets, Duration::from_secs(30))?;
        Ok(peer)
    }

    fn start_ovs(opts: &PeerOptions, workdir: &Path, n: u32) -> Result<Peer, PeerError> {
        probe(PeerKind::Ovs)?;
        let schema = ovs_schema().ok_or_else(|| PeerError::NotInstalled {
            peer: PeerKind::Ovs,
            hint: "the OVS database schema is missing; run scripts/install-bench-peers.sh".into(),
        })?;
        match sys::hugepages(OVS_HUGEPAGES) {
            Ok(true) => {}
            Ok(false) => {
                return Err(PeerError::Unsupported(format!(
                "peer ovs needs {OVS_HUGEPAGES} free 2 MiB huge pages (dpdk-socket-mem={OVS_SOCKET_MEM_MB}) \
                     and hugetlbfs on {}; run as root, or reserve them yourself \
                     (echo 1024 > /proc/sys/vm/nr_hugepages) and mount hugetlbfs there",
                sys::HUGEPAGES_MOUNT
            )))
            }
            Err(e) => return Err(PeerError::Unsupported(format!("peer ovs needs huge pages: {e}"))),
        }
        let rundir = workdir.join("ovs");
        match fs::remove_dir_all(&rundir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(PeerError::io(format!("cannot clear {}", rundir.display()))(e)),
        }
        fs::create_dir_all(&rundir).map_err(PeerError::io(format!("cannot create {}", rundir.display())))?;
        let pid = std::process::id();
        // A tap device of this name appears; at most 15 characters.
        let bridge = format!("vsb{pid}b{}", n % 10_000);
        let prefix = format!("vsb-ovs-{pid}-{n}");
        let names: Vec<String> = (0..opts.ports).map(|i| format!("vhu{i}")).collect();
        let sockets: Vec<PathBuf> = names.iter().map(|nm| rundir.join(nm)).collect();
        let ovs = Ovs {
            db: rundir.join("db.sock"),
            ctl: rundir.join("ovs-vswitchd.ctl"),
            cmdlog: rundir.join("commands.log"),
            bridge,
            rundir,
        };
        Self::prepare_sockets(&sockets)?;
        Self::prepare_sockets(&[ovs.db.clone(), ovs.ctl.clone()])?;
        let r = &ovs.rundir;
        let db_log = r.join("ovsdb-server.log");
        let log = r.join("ovs-vswitchd.log");

        let conf = r.join("conf.db");
        let conf_s = conf.display().to_string();
        let schema_s = schema.display().to_string();
        ovs.run("ovsdb-tool", &["create", &conf_s, &schema_s], Duration::from_secs(10))
            .map_err(|msg| PeerError::Start { peer: PeerKind::Ovs, msg, log: ovs.cmdlog.clone() })?;
        let mut db_cmd = ovs.command("ovsdb-server");
        db_cmd
            .arg(&conf)
            .arg(format!("--remote=punix:{}", ovs.db.display()))
            .arg(format!("--pidfile={}", r.join("ovsdb-server.pid").display()))
            .arg(format!("--unixctl={}", r.join("ovsdb-server.ctl").display()))
            .arg(format!("--log-file={}", db_log.display()));
        let db_proc =
            Proc::spawn("ovsdb-server", &mut db_cmd, opts.backend_cpu, &r.join("ovsdb-server.stdout"))?;
        let mut peer = Peer {
            kind: PeerKind::Ovs,
            sockets: sockets.clone(),
            log: db_log,
            procs: vec![db_proc],
            file_prefix: Some(prefix.clone()),
            extra: Extra::Ovs(ovs.clone()),
            torn_down: false,
        };
        peer.wait_listening(std::slice::from_ref(&ovs.db), Duration::from_secs(10))?;

        let mask = format!("other_config:pmd-cpu-mask={}", cpu_mask_hex(opts.backend_cpu));
        let mem = format!("other_config:dpdk-socket-mem={OVS_SOCKET_MEM_MB}");
        let extra = format!("other_config:dpdk-extra=\"--file-prefix={prefix} --no-pci\"");
        ovs.vsctl(&["--no-wait", "init"]).map_err(|e| peer.start_error(e))?;
        ovs.vsctl(&[
            "--no-wait",
            "set",
            "Open_vSwitch",
            ".",
            "other_config:dpdk-init=true",
            &mem,
            &mask,
            &extra,
        ])
        .map_err(|e| peer.start_error(e))?;

        let mut vs_cmd = ovs.command("ovs-vswitchd");
        vs_cmd
            .arg(format!("unix:{}", ovs.db.display()))
            .arg(format!("--pidfile={}", r.join("ovs-vswitchd.pid").display()))
            .arg(format!("--unixctl={}", ovs.ctl.display()))
            .arg(format!("--log-file={}", log.display()));
        let started = Instant::now();
        let vs_proc =
            Proc::spawn("ovs-vswitchd", &mut vs_cmd, opts.backend_cpu, &r.join("ovs-vswitchd.stdout"))?;
        // ovs-vswitchd stops first, then the database.
        peer.procs.insert(0, vs_proc);
        peer.log = log;
        // One transaction: the bridge and every port (type, fixed OpenFlow number, VLAN tag).
        let br = ovs.bridge.as_str();
        let mut args: Vec<String> = ["add-br", br, "--", "set", "bridge", br, "datapath_type=netdev"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (i, nm) in names.iter().enumerate() {
            args.extend(["--", "add-port", br, nm].map(String::from));
            if let Some(v) = opts.topology.access_vlan(i) {
                args.push(format!("tag={v}"));
            }
            args.extend(["--", "set", "Interface", nm, "type=dpdkvhostuser"].map(String::from));
            args.push(format!("ofport_request={}", i + 1));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ovs.vsctl(&args).map_err(|e| peer.start_error(e))?;
        ovs.ofctl(&["del-flows", br]).map_err(|e| peer.start_error(e))?;
        ovs.ofctl(&["add-flow", br, "actions=NORMAL"]).map_err(|e| peer.start_error(e))?;
        let left = Duration::from_secs(30).saturating_sub(started.elapsed()).max(Duration::from_secs(1));
        peer.wait_listening(&sockets, left)?;
        Ok(peer)
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

/// `0x...` mask with only bit `cpu` set (any CPU number).
fn cpu_mask_hex(cpu: usize) -> String {
    format!("0x{:x}{}", 1u8 << (cpu % 4), "0".repeat(cpu / 4))
}

/// `vswitch ctl --json --control CONTROL stats`, bounded.
fn ctl_stats(bin: &Path, control: &Path) -> Result<CtlStats, String> {
    let mut cmd = Command::new(bin);
    cmd.args(["ctl", "--json", "--control"]).arg(control).arg("stats");
    let out = run_bounded(&mut cmd, Duration::from_secs(5))?;
    if !out.status.success() {
        return Err(format!("`vswitch ctl stats` failed ({}): {}", out.status, tail(&out)));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("unexpected `vswitch ctl --json stats` output: {e}"))
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
        assert!(e.contains("port 0 with port 1"), "{e}");
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
    fn cpu_masks() {
        assert_eq!(cpu_mask_hex(0), "0x1");
        assert_eq!(cpu_mask_hex(1), "0x2");
        assert_eq!(cpu_mask_hex(5), "0x20");
        assert_eq!(cpu_mask_hex(64), format!("0x1{}", "0".repeat(16)));
    }

    #[test]
    fn parses_testpmd_cycles() {
        let log =
            "  RX-packets: 10\n\n  CPU cycles/packet=160.47 (busy cycles=1604700 / total io packets=10000) \
                   at 2000 MHz Clock\nBye...\n";
        assert_eq!(testpmd_cycles(log), Some(160.47));
        assert_eq!(testpmd_cycles("Bye...\n"), None);
    }

    #[test]
    fn parses_ovs_pmd_stats() {
        let show = "pmd thread numa_id 0 core_id 0:\n  packets received: 1000\n  \
                    processing cycles: 210000 (5.00%)\n  avg cycles per packet: 4200.00 (4200000/1000)\n  \
                    avg processing cycles per packet: 210.00 (210000/1000)\n\
                    pmd thread numa_id 0 core_id 1:\n  \
                    avg processing cycles per packet: 310.00 (310000/1000)\n\
                    main thread:\n  avg processing cycles per packet: 9.00 (9000/1000)\n";
        assert_eq!(ovs_cycles(show), Some(260.0));
        let idle = "pmd thread numa_id 0 core_id 0:\n  packets received: 0\n  processing cycles: 0 (0.00%)\n";
        assert_eq!(ovs_cycles(idle), None);
    }

    #[test]
    fn ours_cycles_between_snapshots() {
        let pmd = |pmd, packets, busy_ticks| CtlPmd { pmd, packets, busy_ticks };
        let a = CtlStats { pmds: vec![pmd(0, 100, 10_000), pmd(1, 0, 0)] };
        let b = CtlStats { pmds: vec![pmd(0, 300, 40_000), pmd(1, 100, 10_000)] };
        assert_eq!(ours_cycles(&a, &b), Some(40_000.0 / 300.0));
        assert_eq!(ours_cycles(&b, &b), None, "no packets in the window");
        assert_eq!(ours_cycles(&CtlStats::default(), &b), Some(50_000.0 / 400.0));
        let json = r#"{"pmds":[{"busy_ticks":5,"core":0,"idle_ticks":9,"mean_burst":0.0,"packets":1,
            "pmd":0,"sleeps":0,"ticks_per_packet":5.0}],"ports":[]}"#;
        let s: CtlStats = serde_json::from_str(json).unwrap_or_default();
        assert_eq!(s.pmds.len(), 1);
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
    fn bounded_commands() {
        let out = run_bounded(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(5),
        );
        let out = out.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(tail(&out), "err");
        let t = Instant::now();
        let slow = run_bounded(Command::new("sleep").arg("10"), Duration::from_millis(200));
        assert!(slow.is_err_and(|e| e.contains("did not finish")));
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(run_bounded(&mut Command::new("/nonexistent/program"), Duration::from_secs(1)).is_err());
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
