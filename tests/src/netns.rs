//! Network namespaces as test hosts: each test makes its own (named after the test process, so
//! parallel runs do not collide) and deletes it by name when dropped, with every process it
//! started in it killed by PID first (a [`Proc`](crate::Proc) the test holds).

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::Proc;

/// A network namespace, deleted on drop.
pub struct Netns {
    /// Its name (`ip netns` name).
    pub name: String,
}

/// Runs `ip ARGS`, panicking with its output if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs (iproute2 installed)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Netns {
    /// Creates `vsw-TAG-PID` with its loopback up.
    pub fn new(tag: &str) -> Netns {
        let name = format!("vsw-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS`, panicking on failure.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Moves interface `ifname` here, gives it `addr` (CIDR) and brings it up.
    pub fn adopt(&self, ifname: &str, addr: &str) {
        ip(&["link", "set", ifname, "netns", &self.name]);
        self.ip(&["addr", "add", addr, "dev", ifname]);
        self.ip(&["link", "set", ifname, "up"]);
    }

    /// Runs a command here to completion.
    pub fn run(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", cmd.join(" ")))
    }

    /// Starts a command here in the background, its output in `log`.
    pub fn spawn(&self, cmd: &[&str], log: &Path) -> Proc {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(cmd);
        Proc::spawn(c, log)
    }

    /// Pings `addr` from here (`count` echoes, extra `ping` options); whether all came back.
    pub fn ping(&self, addr: &str, count: u32, extra: &[&str]) -> Result<(), String> {
        let n = count.to_string();
        let mut cmd = vec!["ping", "-c", &n, "-i", "0.2", "-W", "2"];
        cmd.extend_from_slice(extra);
        cmd.push(addr);
        let out = self.run(&cmd);
        match out.status.success() {
            true => Ok(()),
            false => Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }

    /// Runs an iperf3 client here against `server` for `secs` (`reverse`: the server sends);
    /// the received rate in Gbit/s. A refused or failed connection is retried for up to
    /// `patience`: a server in a TCG guest starts late and re-arms its listener slowly after
    /// each test.
    pub fn iperf3_patient(&self, server: &str, secs: u32, reverse: bool, patience: Duration) -> f64 {
        let start = std::time::Instant::now();
        loop {
            match self.try_iperf3(server, secs, reverse) {
                Ok(gbps) => return gbps,
                Err(e) if start.elapsed() >= patience => panic!("iperf3 to {server}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    /// Runs an iperf3 client here against `server` for `secs` (`reverse`: the server sends);
    /// the received rate in Gbit/s.
    pub fn iperf3(&self, server: &str, secs: u32, reverse: bool) -> f64 {
        self.try_iperf3(server, secs, reverse).unwrap_or_else(|e| panic!("iperf3 to {server}: {e}"))
    }

    /// One iperf3 run; what iperf3 said when it measured nothing.
    pub fn try_iperf3(&self, server: &str, secs: u32, reverse: bool) -> Result<f64, String> {
        let t = secs.to_string();
        let mut cmd =
            vec!["timeout", "60", "iperf3", "-c", server, "-t", &t, "-J", "--connect-timeout", "5000"];
        if reverse {
            cmd.push("-R");
        }
        let out = self.run(&cmd);
        let text = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("no JSON ({e}): {text} {}", String::from_utf8_lossy(&out.stderr)))?;
        let bps = v["end"]["sum_received"]["bits_per_second"].as_f64();
        bps.map(|b| b / 1e9).ok_or_else(|| format!("failed: {}", v["error"]))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        // The kernel frees a namespace's devices asynchronously; give it a moment so a TAP
        // name can be reused by the next test.
        std::thread::sleep(Duration::from_millis(50));
    }
}
