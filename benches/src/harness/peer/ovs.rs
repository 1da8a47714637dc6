//! Peer **ovs**: Open vSwitch (DPDK build) from a private database and run directory under
//! the work directory: a netdev bridge with one `dpdkvhostuser` port per socket, flows
//! `actions=NORMAL` (MAC learning, like ours), access VLANs as port tags, one PMD thread on
//! the CPU. Self-reported cost: `pmd-stats-show` "avg processing cycles per packet".

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::supervise::{run_bounded, which, CmdError, Proc};
use super::{Extra, Peer, PeerError, PeerOptions};
use crate::harness::spec::PeerKind;
use crate::harness::sys;

/// OVS-DPDK's `dpdk-socket-mem` in MiB, and the 2 MiB huge pages it needs free.
const OVS_SOCKET_MEM_MB: u64 = 1024;
/// Free 2 MiB pages OVS needs at start (`OVS_SOCKET_MEM_MB` / 2).
const OVS_HUGEPAGES: u64 = OVS_SOCKET_MEM_MB / 2;
/// Where Debian's OVS keeps the database schema.
const OVS_SCHEMAS: [&str; 2] =
    ["/usr/share/openvswitch/vswitch.ovsschema", "/usr/local/share/openvswitch/vswitch.ovsschema"];
/// The OVS programs the peer runs.
const OVS_PROGRAMS: [&str; 6] =
    ["ovs-vswitchd", "ovsdb-server", "ovsdb-tool", "ovs-vsctl", "ovs-appctl", "ovs-ofctl"];
/// How to get the DPDK build of ovs-vswitchd.
const OVS_DPDK_ALTERNATIVE: &str =
    "update-alternatives --set ovs-vswitchd /usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk";

fn ovs_schema() -> Option<PathBuf> {
    OVS_SCHEMAS.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// Checks that the DPDK build of OVS is installed; returns its version, e.g.
/// `3.1.0 (DPDK 22.11.11)`.
pub(super) fn probe() -> Result<String, PeerError> {
    let kind = PeerKind::Ovs;
    let hint = "run scripts/install-bench-peers.sh (apt-get install openvswitch-switch-dpdk)";
    for p in OVS_PROGRAMS {
        if which(p).is_none() {
            return Err(PeerError::NotInstalled { peer: kind, hint: format!("{p} is not on PATH; {hint}") });
        }
    }
    if ovs_schema().is_none() {
        return Err(PeerError::NotInstalled {
            peer: kind,
            hint: format!("the OVS database schema ({}) is missing; {hint}", OVS_SCHEMAS[0]),
        });
    }
    let out = run_bounded(Command::new("ovs-vswitchd").arg("--version"), Duration::from_secs(10))
        .map_err(|e| PeerError::NotInstalled { peer: kind, hint: e.to_string() })?;
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

/// A private Open vSwitch instance.
#[derive(Clone)]
pub(super) struct Ovs {
    rundir: PathBuf,
    bridge: String,
    db: PathBuf,
    ctl: PathBuf,
    cmdlog: PathBuf,
}

impl Ovs {
    /// An OVS tool with the private run directory in its environment.
    pub(super) fn command(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        for var in ["OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR"] {
            c.env(var, &self.rundir);
        }
        c
    }

    /// Runs an OVS tool (bounded), logging it to `commands.log`; its stdout on success.
    pub(super) fn run(&self, prog: &str, args: &[&str], timeout: Duration) -> Result<String, CmdError> {
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
            return Err(CmdError::failed(format!("{prog} {}", args.join(" ")), &out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub(super) fn vsctl(&self, args: &[&str]) -> Result<String, CmdError> {
        let db = format!("--db=unix:{}", self.db.display());
        let mut all = vec![db.as_str(), "--timeout=30"];
        all.extend_from_slice(args);
        self.run("ovs-vsctl", &all, Duration::from_secs(35))
    }

    pub(super) fn appctl(&self, args: &[&str], timeout_s: u64) -> Result<String, CmdError> {
        let ctl = self.ctl.display().to_string();
        let t = format!("--timeout={timeout_s}");
        let mut all = vec![t.as_str(), "-t", ctl.as_str()];
        all.extend_from_slice(args);
        self.run("ovs-appctl", &all, Duration::from_secs(timeout_s + 3))
    }

    pub(super) fn ofctl(&self, args: &[&str]) -> Result<String, CmdError> {
        let mut all = vec!["--timeout=10"];
        all.extend_from_slice(args);
        self.run("ovs-ofctl", &all, Duration::from_secs(13))
    }
}

impl Ovs {
    /// Clears the PMD counters at the start of the measurement window; a failure is logged
    /// and leaves them counting from the start.
    pub(super) fn begin_window(&self) {
        if let Err(e) = self.appctl(&["dpif-netdev/pmd-stats-clear"], 5) {
            tracing::warn!("cannot clear OVS PMD counters at window start: {e}");
        }
    }

    /// Processing cycles per packet of the PMD threads since the window began; the raw
    /// `pmd-stats-show` is kept in `pmd-stats.txt` for the user.
    pub(super) fn pmd_cycles(&self) -> Result<Option<f64>, CmdError> {
        let show = self.appctl(&["dpif-netdev/pmd-stats-show"], 5)?;
        let _ = fs::write(self.rundir.join("pmd-stats.txt"), &show);
        Ok(ovs_cycles(&show))
    }

    /// Stops ovs-vswitchd (`p`) with `exit --cleanup`, which deletes the datapath and the
    /// bridge's tap device that would otherwise persist; falls back to SIGTERM and SIGKILL,
    /// and then deletes the tap device itself. Returns a warning if it had to be killed.
    pub(super) fn stop_vswitchd(
        &self,
        p: &mut Proc,
        patient: bool,
        warnings: &mut Vec<String>,
    ) -> Option<String> {
        let secs = if patient { 10 } else { 2 };
        let mut asked = false;
        if p.running() {
            match self.appctl(&["exit", "--cleanup"], secs) {
                Ok(_) => asked = true,
                Err(e) => warnings.push(format!("ovs-appctl exit failed: {e}")),
            }
        }
        let killed = if asked && p.wait(Duration::from_secs(secs)) {
            None
        } else {
            p.terminate(libc::SIGTERM, Duration::from_secs(2))
        };
        if killed.is_some() && Path::new("/sys/class/net").join(&self.bridge).exists() {
            let _ = run_bounded(
                Command::new("ip").args(["link", "delete", &self.bridge]),
                Duration::from_secs(5),
            );
        }
        killed
    }
}

/// `0x...` mask with only bit `cpu` set (any CPU number).
fn cpu_mask_hex(cpus: &[usize]) -> String {
    let mut nibbles = vec![0u8; cpus.iter().max().map_or(1, |m| m / 4 + 1)];
    for &c in cpus {
        nibbles[c / 4] |= 1 << (c % 4);
    }
    let hex: String = nibbles.iter().rev().map(|n| format!("{n:x}")).collect();
    format!("0x{}", hex.trim_start_matches('0'))
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

/// Starts ovsdb-server and ovs-vswitchd, then the bridge with every port; returns once every
/// port's socket is listening (30 s from ovs-vswitchd's start).
pub(super) fn start(opts: &PeerOptions, workdir: &Path, n: u32) -> Result<Peer, PeerError> {
    probe()?;
    let schema = ovs_schema().ok_or_else(|| PeerError::NotInstalled {
        peer: PeerKind::Ovs,
        hint: "the OVS database schema is missing; run scripts/install-bench-peers.sh".into(),
    })?;
    reserve_hugepages()?;
    let rundir = fresh_dir(&workdir.join("ovs"))?;
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
    Peer::prepare_sockets(&sockets)?;
    Peer::prepare_sockets(&[ovs.db.clone(), ovs.ctl.clone()])?;
    let mut peer = start_db(&ovs, opts, &schema, &sockets, &prefix)?;
    let started = Instant::now();
    start_vswitchd(&mut peer, &ovs, opts)?;
    add_bridge(&ovs, opts, &names).map_err(|e| peer.start_error(e))?;
    let left = Duration::from_secs(30).saturating_sub(started.elapsed()).max(Duration::from_secs(1));
    peer.wait_listening(&sockets, left)?;
    Ok(peer)
}

/// Makes sure the huge pages OVS's DPDK needs are reserved and mounted (OVS cannot run
/// without them, unlike testpmd's `--no-huge`).
fn reserve_hugepages() -> Result<(), PeerError> {
    match sys::hugepages(OVS_HUGEPAGES) {
        Ok(true) => Ok(()),
        Ok(false) => Err(PeerError::Unsupported(format!(
            "peer ovs needs {OVS_HUGEPAGES} free 2 MiB huge pages (dpdk-socket-mem={OVS_SOCKET_MEM_MB}) \
             and hugetlbfs on {}; run as root, or reserve them yourself \
             (echo 1024 > /proc/sys/vm/nr_hugepages) and mount hugetlbfs there",
            sys::HUGEPAGES_MOUNT
        ))),
        Err(e) => Err(PeerError::Unsupported(format!("peer ovs needs huge pages: {e}"))),
    }
}

/// An empty directory at `dir`: a previous run's database and sockets would confuse OVS.
fn fresh_dir(dir: &Path) -> Result<PathBuf, PeerError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(PeerError::io(format!("cannot clear {}", dir.display()))(e)),
    }
    fs::create_dir_all(dir).map_err(PeerError::io(format!("cannot create {}", dir.display())))?;
    Ok(dir.to_path_buf())
}

/// Creates the private database, starts ovsdb-server on it and configures DPDK (memory, PMD
/// CPU, file prefix); returns the peer with only the database running.
fn start_db(
    ovs: &Ovs,
    opts: &PeerOptions,
    schema: &Path,
    sockets: &[PathBuf],
    prefix: &str,
) -> Result<Peer, PeerError> {
    let r = &ovs.rundir;
    let db_log = r.join("ovsdb-server.log");
    let conf = r.join("conf.db");
    let conf_s = conf.display().to_string();
    let schema_s = schema.display().to_string();
    ovs.run("ovsdb-tool", &["create", &conf_s, &schema_s], Duration::from_secs(10))
        .map_err(|e| PeerError::Start { peer: PeerKind::Ovs, msg: e.to_string(), log: ovs.cmdlog.clone() })?;
    let mut db_cmd = ovs.command("ovsdb-server");
    db_cmd
        .arg(&conf)
        .arg(format!("--remote=punix:{}", ovs.db.display()))
        .arg(format!("--pidfile={}", r.join("ovsdb-server.pid").display()))
        .arg(format!("--unixctl={}", r.join("ovsdb-server.ctl").display()))
        .arg(format!("--log-file={}", db_log.display()));
    let db_proc =
        Proc::spawn("ovsdb-server", &mut db_cmd, &opts.backend_cpus, &r.join("ovsdb-server.stdout"))?;
    let mut peer = Peer {
        kind: PeerKind::Ovs,
        sockets: sockets.to_vec(),
        log: db_log,
        procs: vec![db_proc],
        file_prefix: Some(prefix.to_string()),
        extra: Extra::Ovs(ovs.clone()),
        torn_down: false,
    };
    peer.wait_listening(std::slice::from_ref(&ovs.db), Duration::from_secs(10))?;

    let mask = format!("other_config:pmd-cpu-mask={}", cpu_mask_hex(&opts.backend_cpus));
    let mem = format!("other_config:dpdk-socket-mem={OVS_SOCKET_MEM_MB}");
    let extra = format!("other_config:dpdk-extra=\"--file-prefix={prefix} --no-pci\"");
    ovs.vsctl(&["--no-wait", "init"]).map_err(|e| peer.start_error(e))?;
    ovs.vsctl(&["--no-wait", "set", "Open_vSwitch", ".", "other_config:dpdk-init=true", &mem, &mask, &extra])
        .map_err(|e| peer.start_error(e))?;
    Ok(peer)
}

/// Starts ovs-vswitchd against the running database; its log becomes the peer's main log.
fn start_vswitchd(peer: &mut Peer, ovs: &Ovs, opts: &PeerOptions) -> Result<(), PeerError> {
    let r = &ovs.rundir;
    let log = r.join("ovs-vswitchd.log");
    let mut vs_cmd = ovs.command("ovs-vswitchd");
    vs_cmd
        .arg(format!("unix:{}", ovs.db.display()))
        .arg(format!("--pidfile={}", r.join("ovs-vswitchd.pid").display()))
        .arg(format!("--unixctl={}", ovs.ctl.display()))
        .arg(format!("--log-file={}", log.display()));
    let vs_proc =
        Proc::spawn("ovs-vswitchd", &mut vs_cmd, &opts.backend_cpus, &r.join("ovs-vswitchd.stdout"))?;
    // ovs-vswitchd stops first, then the database.
    peer.procs.insert(0, vs_proc);
    peer.log = log;
    Ok(())
}

/// Adds the bridge and its ports in one transaction (type, fixed OpenFlow number, VLAN tag),
/// then replaces the flows with a single `actions=NORMAL` (MAC learning).
fn add_bridge(ovs: &Ovs, opts: &PeerOptions, names: &[String]) -> Result<(), CmdError> {
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
    ovs.vsctl(&args)?;
    ovs.ofctl(&["del-flows", br])?;
    ovs.ofctl(&["add-flow", br, "actions=NORMAL"])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_masks() {
        assert_eq!(cpu_mask_hex(&[0]), "0x1");
        assert_eq!(cpu_mask_hex(&[1]), "0x2");
        assert_eq!(cpu_mask_hex(&[5]), "0x20");
        assert_eq!(cpu_mask_hex(&[64]), format!("0x1{}", "0".repeat(16)));
        assert_eq!(cpu_mask_hex(&[0, 2, 5]), "0x25");
        assert_eq!(cpu_mask_hex(&[3, 4]), "0x18");
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
}
