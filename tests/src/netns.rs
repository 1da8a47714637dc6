//! Network namespaces as test hosts: each test makes its own (named after the test process, so
//! parallel runs do not collide) and deletes it by name when dropped, with every process it
//! started in it killed by PID first (a [`Proc`](crate::Proc) the test holds).

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::Proc;

/// Said by [`Netns::iperf3_json`] when iperf3 failed before its test started: the server was
/// busy or not listening yet (a TCG guest's server re-arms slowly and closes a connection it
/// is too busy for with a reset), so a caller may retry.
pub const NOT_STARTED: &str = "before the test started";

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

    /// Sends `frames` as they are out of interface `ifname` here: an `AF_PACKET` socket opened
    /// by a thread that joined this namespace, so what arrives at the other end of a TAP is
    /// exactly these bytes (tagged frames included, which this kernel's missing 8021q module
    /// would not let the stack send).
    pub fn inject(&self, ifname: &str, frames: &[Vec<u8>]) {
        use std::os::fd::AsRawFd;
        let path = format!("/var/run/netns/{}", self.name);
        let ifname = std::ffi::CString::new(ifname).expect("interface name");
        let frames = frames.to_vec();
        std::thread::spawn(move || {
            let (fd, index) = packet_socket_in(&path, &ifname, 0);
            // SAFETY: plain data; zeroes are valid.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = index as i32;
            sll.sll_halen = 6;
            // All at once (sendmmsg), so they reach the device close together, as a burst would.
            let mut iov: Vec<libc::iovec> = frames
                .iter()
                .map(|f| libc::iovec { iov_base: f.as_ptr() as *mut _, iov_len: f.len() })
                .collect();
            // SAFETY: plain data; zeroes are valid.
            let mut msgs: Vec<libc::mmsghdr> =
                (0..frames.len()).map(|_| unsafe { std::mem::zeroed() }).collect();
            for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
                m.msg_hdr.msg_iov = v;
                m.msg_hdr.msg_iovlen = 1;
                m.msg_hdr.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
                m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            }
            let mut sent = 0;
            while sent < msgs.len() {
                // SAFETY: every message points at a live frame and at `sll`.
                let n = unsafe {
                    libc::sendmmsg(fd.as_raw_fd(), msgs[sent..].as_mut_ptr(), (msgs.len() - sent) as u32, 0)
                };
                assert!(n > 0, "sendmmsg: {}", std::io::Error::last_os_error());
                sent += n as usize;
            }
        })
        .join()
        .expect("inject thread");
    }

    /// Starts taking every frame that arrives at interface `ifname` here (an `AF_PACKET`
    /// socket bound to it, opened by a thread that joined this namespace); the frames so far
    /// when the returned [`Capture`] is finished. Ready when this returns.
    pub fn capture(&self, ifname: &str) -> Capture {
        use std::os::fd::AsRawFd;
        let path = format!("/var/run/netns/{}", self.name);
        let ifname = std::ffi::CString::new(ifname).expect("interface name");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let halt = stop.clone();
        let thread = std::thread::spawn(move || {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            let (fd, index) = packet_socket_in(&path, &ifname, proto);
            // SAFETY: plain data; zeroes are valid.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = index as i32;
            // SAFETY: binding to a sockaddr_ll of the right size.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            let (tv, buf) = (libc::timeval { tv_sec: 0, tv_usec: 20_000 }, 8i32 << 20);
            // SAFETY: options of the right sizes, only read by the kernel.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    16,
                );
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    // Past net.core.rmem_max (root): the capture must not be what drops.
                    libc::SO_RCVBUFFORCE,
                    (&buf as *const i32).cast(),
                    4,
                );
            }
            let _ = ready_tx.send(());
            let (mut frames, mut b) = (Vec::new(), vec![0u8; 65536]);
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: reading into our own buffer, within its length.
                let n = unsafe { libc::recv(fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len(), 0) };
                if n > 0 {
                    frames.push(b[..n as usize].to_vec());
                }
            }
            frames
        });
        ready.recv_timeout(Duration::from_secs(5)).expect("capture socket ready");
        Capture { stop, thread: Some(thread) }
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
        let mut args = vec!["-t", t.as_str()];
        if reverse {
            args.push("-R");
        }
        let v = self.iperf3_json(server, &args)?;
        let bps = v["end"]["sum_received"]["bits_per_second"].as_f64();
        bps.map(|b| b / 1e9).ok_or_else(|| format!("failed: {}", v["error"]))
    }

    /// One iperf3 client run against `server` with `args` (`-t`, `-u`, `-p`, `-b` ...); its
    /// JSON report, or what went wrong: [`NOT_STARTED`] in the error when it failed before
    /// measuring anything.
    pub fn iperf3_json(&self, server: &str, args: &[&str]) -> Result<serde_json::Value, String> {
        let mut cmd = vec!["timeout", "90", "iperf3", "-c", server, "-J", "--connect-timeout", "5000"];
        cmd.extend_from_slice(args);
        let out = self.run(&cmd);
        let text = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("no JSON ({e}): {text} {}", String::from_utf8_lossy(&out.stderr)))?;
        let started = v["intervals"].as_array().is_some_and(|i| !i.is_empty());
        match v["error"].as_str() {
            Some(e) if !started => Err(format!("iperf3 {}: {e} ({NOT_STARTED})", args.join(" "))),
            Some(e) => Err(format!("iperf3 {}: {e}", args.join(" "))),
            None => Ok(v),
        }
    }

    /// Datagrams this namespace's UDP sockets had no room for (`RcvbufErrors` in its
    /// `/proc/net/snmp`): a receiver that fell behind, not a loss on the way.
    pub fn udp_rcvbuf_errors(&self) -> u64 {
        let out = self.run(&["cat", "/proc/net/snmp"]);
        udp_rcvbuf_errors(&String::from_utf8_lossy(&out.stdout))
    }

    /// A UDP stream at a fixed rate (`reverse`: the server sends), counted by the receiver
    /// from the datagrams' sequence numbers.
    pub fn iperf3_udp(
        &self,
        server: &str,
        port: u16,
        secs: u32,
        rate: &str,
        reverse: bool,
    ) -> Result<UdpCount, String> {
        let (p, t) = (port.to_string(), secs.to_string());
        let mut args = vec!["-u", "-p", &p, "-t", &t, "-b", rate, "-l", "1200"];
        if reverse {
            args.push("-R");
        }
        let v = self.iperf3_json(server, &args)?;
        let (r, st) = (&v["end"]["sum_received"], &v["end"]["streams"][0]["udp"]);
        let n = |x: &serde_json::Value| x.as_u64().ok_or_else(|| format!("no count in {v}"));
        Ok(UdpCount {
            packets: n(&r["packets"])?,
            lost: n(&r["lost_packets"])?,
            out_of_order: n(&st["out_of_order"])?,
        })
    }
}

/// Joins the namespace at `path` (this thread only) and opens an `AF_PACKET` socket there for
/// `proto` (network order; 0: send only); the socket and `ifname`'s index there.
fn packet_socket_in(path: &str, ifname: &std::ffi::CStr, proto: u16) -> (std::os::fd::OwnedFd, u32) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let ns = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: setns on this thread only, with a namespace file we hold open.
    assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto.into()) };
    assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
    assert!(index > 0, "no interface {ifname:?} in the namespace");
    (fd, index)
}

/// Frames arriving at an interface, taken until [`Capture::finish`] (or the capture is dropped).
pub struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Vec<u8>>>>,
}

impl Capture {
    /// Stops taking frames (within 20 ms); those taken, in arrival order.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().map(|t| t.join().expect("capture thread")).unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the receiving end of an iperf3 UDP stream counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpCount {
    /// Datagrams it saw, by sequence (lost ones included).
    pub packets: u64,
    /// Missing from the sequence.
    pub lost: u64,
    /// Arrived after a later one.
    pub out_of_order: u64,
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        // The kernel frees a namespace's devices asynchronously; give it a moment so a TAP
        // name can be reused by the next test.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `RcvbufErrors` of the `Udp:` lines of a `/proc/net/snmp` (0 if absent).
pub fn udp_rcvbuf_errors(snmp: &str) -> u64 {
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(head), Some(vals)) = (lines.next(), lines.next()) else { return 0 };
    let col = head.split_whitespace().position(|w| w == "RcvbufErrors");
    col.and_then(|c| vals.split_whitespace().nth(c)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rcvbuf_errors_are_read_by_their_column() {
        let snmp = "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors\n\
                    Udp: 100 2 7 50 5 0 2\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors\n\
                    UdpLite: 0 0 0 0 9 0 0\n";
        assert_eq!(super::udp_rcvbuf_errors(snmp), 5);
        assert_eq!(super::udp_rcvbuf_errors("Ip: 1\n"), 0);
    }
}
