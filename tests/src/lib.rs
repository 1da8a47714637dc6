//! Helpers for end-to-end tests: external processes started by PID and always stopped,
//! bounded waits, scratch directories.
#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh directory under /tmp named after the test.
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vswitch-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create scratch dir");
        Scratch(p)
    }

    /// A path inside it.
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process stopped (SIGINT, then SIGKILL after a grace period) when dropped.
pub struct Proc {
    child: Option<Child>,
    /// Where its stdout+stderr go.
    pub log: PathBuf,
    cleanup: Vec<PathBuf>,
}

impl Proc {
    /// Starts `cmd` with output to `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> Self {
        let out = std::fs::File::create(log).expect("create log");
        let err = out.try_clone().expect("dup log");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
        Proc { child: Some(child), log: log.into(), cleanup: Vec::new() }
    }

    /// Also removes `p` (a directory) when stopped.
    pub fn cleanup_dir(mut self, p: PathBuf) -> Self {
        self.cleanup.push(p);
        self
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Stops it (SIGINT, up to `grace`, then SIGKILL) and returns its log.
    pub fn stop(&mut self, grace: Duration) -> String {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling a child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let t = Instant::now();
            while t.elapsed() < grace {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in &self.cleanup {
            let _ = std::fs::remove_dir_all(p);
        }
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// Polls `f` every 20 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// Path to `dpdk-testpmd`, or a panic that says how to install it.
pub fn testpmd() -> PathBuf {
    for d in ["/usr/bin", "/usr/local/bin"] {
        let p = Path::new(d).join("dpdk-testpmd");
        if p.exists() {
            return p;
        }
    }
    panic!("dpdk-testpmd not found: run scripts/install-test-deps.sh (apt-get install dpdk-dev)");
}

/// Per-port "RX-packets" from testpmd's final forward statistics.
pub fn testpmd_rx_packets(log: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let mut in_port = false;
    for line in log.lines() {
        if line.contains("Forward statistics for port") {
            in_port = true;
        } else if in_port && line.contains("RX-packets:") {
            let n = line.split_whitespace().skip_while(|w| *w != "RX-packets:").nth(1);
            out.push(n.and_then(|n| n.parse().ok()).unwrap_or(0));
            in_port = false;
        }
    }
    out
}
