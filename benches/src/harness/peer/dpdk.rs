//! Peer **dpdk**: `dpdk-testpmd` with one `net_vhost` port per socket in `io` forwarding mode
//! (port 0 ⇄ port 1; no MAC learning, no VLANs), main and forwarding lcore on the CPU.
//! Self-reported cost: `--record-core-cycles`, printed when testpmd exits.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::supervise::{run_bounded, which, Proc};
use super::{Extra, Peer, PeerError, PeerOptions};
use crate::harness::spec::PeerKind;
use crate::harness::sys;

/// Checks that testpmd is installed; returns the DPDK version it reports (e.g. `22.11.11`).
pub(super) fn probe() -> Result<String, PeerError> {
    let kind = PeerKind::Dpdk;
    let bin = which("dpdk-testpmd").ok_or_else(|| PeerError::NotInstalled {
        peer: kind,
        hint: "dpdk-testpmd is not on PATH; run scripts/install-test-deps.sh \
                   (apt-get install dpdk-dev)"
            .into(),
    })?;
    // EAL prints its version while parsing `-v`, and `--help` exits right after
    // parsing: nothing is initialised, no huge page or runtime file is touched.
    let out = run_bounded(Command::new(bin).args(["-v", "--help"]), Duration::from_secs(10))
        .map_err(|e| PeerError::NotInstalled { peer: kind, hint: e.to_string() })?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok(text
        .lines()
        .find_map(|l| l.split("RTE Version: '").nth(1))
        .map(|v| v.trim_end_matches('\'').trim_start_matches("DPDK ").to_string())
        .unwrap_or_else(|| "unknown".into()))
}

/// The `CPU cycles/packet=X` testpmd prints at exit with `--record-core-cycles` (only when
/// it forwarded packets).
pub(crate) fn testpmd_cycles(log: &str) -> Option<f64> {
    log.lines()
        .filter_map(|l| l.split("CPU cycles/packet=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .next_back()
}

pub(super) fn start(opts: &PeerOptions, workdir: &Path, n: u32) -> Result<Peer, PeerError> {
    let bin = which("dpdk-testpmd").ok_or_else(|| PeerError::NotInstalled {
        peer: PeerKind::Dpdk,
        hint: "dpdk-testpmd is not on PATH; run scripts/install-test-deps.sh (apt-get install dpdk-dev)"
            .into(),
    })?;
    let sockets: Vec<PathBuf> = (0..opts.ports).map(|i| workdir.join(format!("vh{i}.sock"))).collect();
    Peer::prepare_sockets(&sockets)?;
    let prefix = format!("vsb-back-{}-{n}", std::process::id());
    sys::cleanup_hugefiles(&prefix);
    let log = workdir.join("testpmd.log");
    let cpus = &opts.backend_cpus;
    let mut cmd = Command::new(bin);
    // lcore 0 (main) sleeps in the stats loop on the first CPU, lcores 1.. forward, one per CPU.
    let mut lcores = vec![format!("0@{}", cpus[0])];
    lcores.extend(cpus.iter().enumerate().map(|(i, c)| format!("{}@{c}", i + 1)));
    cmd.args(["--lcores", &lcores.join(","), "--main-lcore", "0", "--no-pci"])
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
        &format!("--nb-cores={}", cpus.len()),
        "--auto-start",
        "--stats-period",
        "1",
        "--record-core-cycles",
    ]);
    let proc = Proc::spawn("dpdk-testpmd", &mut cmd, cpus, &log)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_testpmd_cycles() {
        let log =
            "  RX-packets: 10\n\n  CPU cycles/packet=160.47 (busy cycles=1604700 / total io packets=10000) \
                   at 2000 MHz Clock\nBye...\n";
        assert_eq!(testpmd_cycles(log), Some(160.47));
        assert_eq!(testpmd_cycles("Bye...\n"), None);
    }
}
