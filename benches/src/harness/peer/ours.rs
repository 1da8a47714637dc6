//! Peer **ours**: `vswitch run --port pI=SOCK[,vlan=N] ... --pmd-cores CPU --busy-poll` (or
//! `--config` for ours+policy), the whole process pinned to the CPU. Self-reported cost: the
//! PMD threads' busy TSC ticks per packet taken from guests, read with
//! `vswitch ctl --json stats`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;

use super::supervise::{is_executable, run_bounded, tail, which, CmdError, Proc};
use super::{Extra, Peer, PeerError, PeerOptions};
use crate::harness::spec::PeerKind;

/// [`probe`] for ours with the binary [`PeerOptions::vswitch_bin`] names (`None`: the default
/// search of [`vswitch_binary`]); returns its version.
pub fn probe_vswitch(bin: Option<&Path>) -> Result<String, PeerError> {
    let bin = vswitch_binary(bin)?;
    let out = run_bounded(Command::new(&bin).arg("--version"), Duration::from_secs(10))
        .map_err(|e| PeerError::NotInstalled { peer: PeerKind::Ours, hint: e.to_string() })?;
    if !out.status.success() {
        return Err(PeerError::NotInstalled {
            peer: PeerKind::Ours,
            hint: format!("`{} --version` failed ({}): {}", bin.display(), out.status, tail(&out)),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split_whitespace().nth(1).unwrap_or("unknown").to_string())
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
        if opts.flows > MAC_LIMIT {
            let _ = writeln!(t, "max_macs = {}", opts.flows);
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

/// MACs a port learns by default (`max-macs`): more flows than this raise it.
const MAC_LIMIT: usize = vswitch::l2::fdb::DEFAULT_MAC_LIMIT as usize;

/// Why our switch's counters could not be read.
#[derive(thiserror::Error, Debug)]
pub(super) enum CtlError {
    /// `vswitch ctl stats` could not be run or failed (its message as is).
    #[error(transparent)]
    Cmd(#[from] CmdError),
    /// unexpected `vswitch ctl --json stats` output: {0}
    #[error("unexpected `vswitch ctl --json stats` output: {0}")]
    Output(#[from] serde_json::Error),
}

/// Our switch's control socket, through which it reports its own counters.
pub(super) struct Control {
    /// The `vswitch` binary, for `vswitch ctl`.
    bin: PathBuf,
    /// The control socket (removed on teardown).
    pub(super) path: PathBuf,
    /// Counters at the start of the measurement window; `None` counts from the start.
    window: Option<CtlStats>,
}

impl Control {
    /// Snapshots the PMD counters; a failure is logged and leaves the window at the start.
    pub(super) fn begin_window(&mut self) {
        match ctl_stats(&self.bin, &self.path) {
            Ok(s) => self.window = Some(s),
            Err(e) => tracing::warn!("cannot snapshot vswitch counters at window start: {e}"),
        }
    }

    /// Busy ticks per packet since [`begin_window`](Control::begin_window) (or the start).
    pub(super) fn cycles(&self) -> Result<Option<f64>, CtlError> {
        let after = ctl_stats(&self.bin, &self.path)?;
        Ok(ours_cycles(self.window.as_ref().unwrap_or(&CtlStats::default()), &after))
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

/// `vswitch ctl --json --control CONTROL stats`, bounded.
fn ctl_stats(bin: &Path, control: &Path) -> Result<CtlStats, CtlError> {
    let mut cmd = Command::new(bin);
    cmd.args(["ctl", "--json", "--control"]).arg(control).arg("stats");
    let out = run_bounded(&mut cmd, Duration::from_secs(5))?;
    if !out.status.success() {
        return Err(CmdError::failed("vswitch ctl stats", &out).into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub(super) fn start(opts: &PeerOptions, workdir: &Path) -> Result<Peer, PeerError> {
    let bin = vswitch_binary(opts.vswitch_bin.as_deref())?;
    let sockets: Vec<PathBuf> = (0..opts.ports).map(|i| workdir.join(format!("p{i}.sock"))).collect();
    let control = workdir.join("vswitch.ctl");
    Peer::prepare_sockets(&sockets)?;
    Peer::prepare_sockets(std::slice::from_ref(&control))?;
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
            if opts.flows > MAC_LIMIT {
                let _ = write!(spec, ",max-macs={}", opts.flows);
            }
            cmd.arg("--port").arg(spec);
        }
    }
    // Every flow's MAC learned (a port's default limit is 1024), in a table with room: at most
    // a quarter full, as at the default size.
    if opts.flows > MAC_LIMIT {
        let want = (opts.flows as u64 * sockets.len() as u64 * 4).next_power_of_two().max(65536);
        cmd.args(["--fdb-entries", &want.min(1 << 24).to_string()]);
    }
    let cores: Vec<String> = opts.backend_cpus.iter().map(|c| c.to_string()).collect();
    cmd.args(["--pmd-cores", &cores.join(",")]);
    if opts.busy_poll {
        cmd.arg("--busy-poll");
    }
    // The generators are testpmd virtio-user (unsealed memfds, or hugetlbfs) and the
    // in-process frontend on huge pages: memory that can lose pages, mapped under the guard.
    cmd.args(["--unsealed-memory", "guard"]);
    cmd.arg("--control").arg(&control);
    cmd.env_remove("VSWITCH_CONTROL");
    let proc = Proc::spawn("vswitch", &mut cmd, &opts.backend_cpus, &log)?;
    let mut peer = Peer {
        kind: opts.kind,
        sockets: sockets.clone(),
        log,
        procs: vec![proc],
        file_prefix: None,
        extra: Extra::Ours(Control { bin, path: control.clone(), window: None }),
        torn_down: false,
    };
    let mut all = sockets;
    all.push(control);
    peer.wait_listening(&all, Duration::from_secs(10))?;
    Ok(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
