//! Process supervision for the peers: children pinned to one CPU in their own process group
//! with their output in a log, bounded waits, killing by PID, and short commands run to
//! completion under a timeout. Nothing here waits without a bound, so a wedged peer can
//! stall a benchmark for seconds, never forever.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::PeerError;
use crate::harness::sys;

/// Why a short command did not give its output (or failed, for callers that require success).
#[derive(thiserror::Error, Debug)]
pub enum CmdError {
    /// cannot run {program}: {source}
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why it could not be started.
        source: io::Error,
    },
    /// {program} did not finish within {secs} s and was killed
    #[error("{program} did not finish within {secs} s and was killed")]
    Timeout {
        /// The program.
        program: String,
        /// The time it was given.
        secs: u64,
    },
    /// waiting for {program}: {source}
    #[error("waiting for {program}: {source}")]
    Wait {
        /// The program.
        program: String,
        /// Why waiting failed.
        source: io::Error,
    },
    /// `{command}` failed ({status}): {tail}
    #[error("`{command}` failed ({status}): {tail}")]
    Failed {
        /// The command line, as the user would type it.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// The last lines of its output.
        tail: String,
    },
}

impl CmdError {
    /// The error for `out`, a run of `command` that exited unsuccessfully.
    pub(super) fn failed(command: impl Into<String>, out: &Output) -> CmdError {
        CmdError::Failed { command: command.into(), status: out.status, tail: tail(out) }
    }
}

pub(super) fn is_executable(p: &Path) -> bool {
    fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// `program` on PATH.
pub(super) fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| is_executable(p))
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
/// `Err` says what failed (could not start, timed out; never [`CmdError::Failed`]); a non-zero exit is *not* an error
/// here: check `status`.
pub(super) fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output, CmdError> {
    let name = program(cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| CmdError::Spawn { program: name.clone(), source })?;
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
        Ok(None) => Err(CmdError::Timeout { program: name, secs: timeout.as_secs() }),
        Err(source) => Err(CmdError::Wait { program: name, source }),
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
pub(super) fn tail(out: &Output) -> String {
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
pub(super) struct Proc {
    pub(super) name: &'static str,
    child: Child,
    pub(super) status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` pinned to `cpus`, in its own process group, stdout and stderr to `log`.
    pub(super) fn spawn(
        name: &'static str,
        cmd: &mut Command,
        cpus: &[usize],
        log: &Path,
    ) -> Result<Proc, PeerError> {
        let out = File::create(log).map_err(PeerError::io(format!("cannot create {}", log.display())))?;
        let err = out.try_clone().map_err(PeerError::io(format!("cannot duplicate {}", log.display())))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
        sys::pin_command(cmd, cpus);
        die_with_parent(cmd);
        let child =
            cmd.spawn().map_err(PeerError::io(format!("cannot start {name} pinned to CPUs {cpus:?}")))?;
        Ok(Proc { name, child, status: None })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it still runs (reaps it if not).
    pub(super) fn running(&mut self) -> bool {
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
    pub(super) fn signal(&mut self, sig: libc::c_int) {
        if self.running() {
            // SAFETY: kill(2) on the PID of our own child, which has not been reaped, so the
            // PID cannot have been reused.
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        }
    }

    /// Waits up to `patience` for it to exit; true if it did.
    pub(super) fn wait(&mut self, patience: Duration) -> bool {
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
    pub(super) fn terminate(&mut self, sig: libc::c_int, patience: Duration) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(slow.is_err_and(|e| e.to_string().contains("did not finish")));
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(run_bounded(&mut Command::new("/nonexistent/program"), Duration::from_secs(1)).is_err());
    }
}
