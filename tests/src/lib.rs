//! Helpers for end-to-end tests: external processes started by PID and always stopped,
//! bounded waits, scratch directories, and switches with in-process frontends
//! ([`vswitch_bench::frontend`]) on their ports.
#![deny(missing_docs)]

pub mod linux;
pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vswitch::control::{PortInfo, PortStats, Stats};
use vswitch::{PortConfig, Switch, SwitchConfig};
use vswitch_bench::frame::{build_frame, frame_len};
use vswitch_bench::frontend::{Frontend, FrontendConfig};

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
        if let Some(id) = self.child.as_ref().map(|c| c.id()) {
            // SAFETY: signalling a child we spawned and have not reaped.
            unsafe { libc::kill(id as i32, libc::SIGINT) };
            self.wait_exit(grace);
            self.kill();
        }
        for p in &self.cleanup {
            let _ = std::fs::remove_dir_all(p);
        }
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `timeout` for it to exit by itself; its exit status, if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let c = self.child.as_mut()?;
        let t = Instant::now();
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if t.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs it at once (no grace period) and reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let c = self.child.as_mut()?;
        let _ = c.kill(); // SIGKILL on Unix
        let status = c.wait().ok();
        self.child = None;
        status
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

/// Installs the test log subscriber once (filter from `VSWITCH_LOG`, default off).
pub fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("VSWITCH_LOG").unwrap_or_else(|_| "off".into()))
        .with_test_writer()
        .try_init();
}

/// The broadcast address.
pub const BCAST: [u8; 6] = [0xff; 6];

/// Locally administered unicast MAC `02:00:00:00:00:n`.
pub fn mac(n: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, n]
}

/// `aa:bb:cc:dd:ee:ff`, as the switch prints MACs.
pub fn mac_str(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Socket path of port `name` in `dir`.
pub fn sock(dir: &Scratch, name: &str) -> PathBuf {
    dir.path(&format!("{name}.sock"))
}

/// A port from `"name[,options]"` (the options of `PortConfig::parse`), socket in `dir`.
pub fn port_config(dir: &Scratch, spec: &str) -> PortConfig {
    let (name, opts) = spec.split_once(',').map_or((spec, None), |(n, o)| (n, Some(o)));
    let mut full = format!("{name}={}", sock(dir, name).display());
    if let Some(o) = opts {
        full.push(',');
        full.push_str(o);
    }
    PortConfig::parse(&full).unwrap_or_else(|e| panic!("port spec {spec:?}: {e}"))
}

/// A configuration with the given ports (see [`port_config`]), adaptive polling.
pub fn switch_config(dir: &Scratch, specs: &[&str]) -> SwitchConfig {
    SwitchConfig {
        fdb_aging_secs: 300,
        ports: specs.iter().map(|s| port_config(dir, s)).collect(),
        ..Default::default()
    }
}

/// Ports from full `--port` specs (`NAME=SOCK:x.sock`: a socket in `dir`; `NAME=nic:...`,
/// `NAME=tap:...` as they are).
pub fn parse_ports(dir: &Scratch, specs: &[impl AsRef<str>]) -> Vec<PortConfig> {
    specs
        .iter()
        .map(|s| {
            let s = s.as_ref().replace("SOCK:", &format!("{}/", dir.0.display()));
            PortConfig::parse(&s).unwrap_or_else(|e| panic!("{s}: {e}"))
        })
        .collect()
}

/// Starts a switch with ports from full `--port` specs (see [`parse_ports`]).
pub fn start_specs(dir: &Scratch, specs: &[impl AsRef<str>]) -> Switch {
    init_log();
    let ports = parse_ports(dir, specs);
    Switch::start(SwitchConfig { fdb_aging_secs: 300, ports, ..Default::default() }).expect("switch starts")
}

/// Starts a switch with the given ports (see [`port_config`]).
pub fn start_switch(dir: &Scratch, specs: &[&str]) -> Switch {
    init_log();
    Switch::start(switch_config(dir, specs)).expect("switch starts")
}

/// Connects a frontend to port `name` (5 s to connect and negotiate).
pub fn connect(dir: &Scratch, name: &str, cfg: FrontendConfig) -> Frontend {
    Frontend::connect(&sock(dir, name), cfg, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("frontend on port {name}: {e}"))
}

/// [`connect`] with the default frontend configuration.
pub fn connect_default(dir: &Scratch, name: &str) -> Frontend {
    connect(dir, name, FrontendConfig::default())
}

/// A test frame of exactly `size` bytes (at least 60): `build_frame` with the payload that
/// gives that size.
pub fn frame_of_size(dst: [u8; 6], src: [u8; 6], vlan: Option<u16>, size: usize, seq: u64) -> Vec<u8> {
    let tag = if vlan.is_some() { 4 } else { 0 };
    let payload = size.checked_sub(42 + tag).expect("size covers the headers");
    let f = build_frame(dst, src, vlan, payload, seq);
    assert_eq!(f.len(), size.max(frame_len(vlan.is_some(), payload)));
    f
}

/// Queues `frame` on TX queue `q` and publishes it, waiting (up to 2 s) for ring space.
pub fn send(fe: &mut Frontend, q: u16, frame: &[u8]) {
    let t = Instant::now();
    while !fe.send(q, frame) {
        assert!(t.elapsed() < Duration::from_secs(2), "TX ring of queue {q} stayed full for 2 s");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Receives frames on every queue pair until `n` arrived or `timeout` passed.
pub fn recv_n(fe: &mut Frontend, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
    if fe.queue_pairs() == 1 {
        return fe.recv_frames(0, n, timeout);
    }
    let t = Instant::now();
    let mut out = Vec::new();
    loop {
        for q in 0..fe.queue_pairs() {
            fe.poll_rx(q, |f| out.push(f.to_vec()));
        }
        if out.len() >= n || t.elapsed() >= timeout {
            return out;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Collects whatever arrives on any queue until nothing has come for `quiet` (at most 5 s).
pub fn drain(fe: &mut Frontend, quiet: Duration) -> Vec<Vec<u8>> {
    let t = Instant::now();
    let mut last = Instant::now();
    let mut out = Vec::new();
    while last.elapsed() < quiet && t.elapsed() < Duration::from_secs(5) {
        let before = out.len();
        for q in 0..fe.queue_pairs() {
            fe.poll_rx(q, |f| out.push(f.to_vec()));
        }
        if out.len() > before {
            last = Instant::now();
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    out
}

/// Sends `n` frames (sequence numbers `seq0..seq0 + n`, sizes cycling from 60 to 1514) from
/// `from` to `to` and checks that exactly those arrive, byte for byte and in order.
pub fn exchange(from: &mut Frontend, to: &mut Frontend, src: [u8; 6], dst: [u8; 6], n: usize, seq0: u64) {
    let frames: Vec<Vec<u8>> = (0..n as u64)
        .map(|i| frame_of_size(dst, src, None, 60 + (i as usize * 97) % 1455, seq0 + i))
        .collect();
    for f in &frames {
        send(from, 0, f);
    }
    let got = recv_n(to, n, Duration::from_secs(5));
    assert_eq!(got.len(), n, "{} of {n} frames {} -> {} arrived", got.len(), mac_str(src), mac_str(dst));
    for (i, (g, f)) in got.iter().zip(&frames).enumerate() {
        assert!(g == f, "frame {i} ({} bytes) arrived altered ({} bytes)", f.len(), g.len());
    }
    let extra = drain(to, Duration::from_millis(30));
    assert!(extra.is_empty(), "{} unexpected frames after the exchange", extra.len());
}

/// Counters of port `name`.
pub fn port_stats(sw: &Switch, name: &str) -> PortStats {
    let s = sw.stats().expect("stats");
    s.ports.into_iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no port {name} in stats"))
}

/// Listing of port `name`.
pub fn port_info(sw: &Switch, name: &str) -> PortInfo {
    let v = sw.ports().expect("ports");
    v.into_iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no port {name} in ports()"))
}

/// Polls the switch's counters until `pred` holds or `timeout` passes; returns the last ones.
/// (Counters are bumped right after a burst's frames are published, so they may trail the
/// frames a frontend sees by a moment.)
pub fn wait_stats(sw: &Switch, timeout: Duration, mut pred: impl FnMut(&Stats) -> bool) -> Stats {
    let t = Instant::now();
    loop {
        let s = sw.stats().expect("stats");
        if pred(&s) || t.elapsed() >= timeout {
            return s;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Looks up port `name` in a stats snapshot.
pub fn find<'a>(s: &'a Stats, name: &str) -> &'a PortStats {
    s.ports.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no port {name} in stats"))
}

/// Checks the one-copy rule on every port: each delivered packet was copied exactly once.
pub fn assert_one_copy_each(s: &Stats) {
    for p in &s.ports {
        assert_eq!(p.tx.copies, p.tx.packets, "{}: one copy per delivered packet: {:?}", p.name, p.tx);
        assert_eq!(p.rx.copies, 0, "{}: nothing is copied into a guest's transmit queue", p.name);
    }
}

/// Sends one raw vhost-user message (header claiming `size` payload bytes, then `body`) with
/// `fds` attached (hostile-protocol tests).
pub fn send_raw(
    s: &std::os::unix::net::UnixStream,
    code: u32,
    flags: u32,
    size: u32,
    body: &[u8],
    fds: &[std::os::fd::RawFd],
) {
    let mut msg = Vec::new();
    msg.extend(code.to_le_bytes());
    msg.extend(flags.to_le_bytes());
    msg.extend(size.to_le_bytes());
    msg.extend(body);
    let mut iov = libc::iovec { iov_base: msg.as_mut_ptr().cast(), iov_len: msg.len() };
    // Room for up to 120 fds (a hostile frontend's share).
    let mut cbuf = [0u64; 64];
    assert!(fds.len() <= 120, "send_raw sends at most 120 fds");
    // SAFETY: a well-formed msghdr over local buffers; CMSG macros stay inside cbuf.
    unsafe {
        let mut mh: libc::msghdr = std::mem::zeroed();
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        if !fds.is_empty() {
            let len = std::mem::size_of_val(fds) as u32;
            mh.msg_control = cbuf.as_mut_ptr().cast();
            mh.msg_controllen = libc::CMSG_SPACE(len) as usize;
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(len) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c) as *mut std::os::fd::RawFd,
                fds.len(),
            );
        }
        assert!(libc::sendmsg(std::os::fd::AsRawFd::as_raw_fd(s), &mh, 0) >= 0);
    }
}

/// What the far end of an in-process wire receives for `wait`: each frame without the wire's
/// 12-byte header.
pub fn from_wire_end(end: &vswitch::uplink::link::LinkEnd, wait: Duration) -> Vec<Vec<u8>> {
    let (mut out, mut back) = (Vec::new(), Vec::new());
    let t = Instant::now();
    while t.elapsed() < wait {
        if end.recv(&mut back, 64) > 0 {
            out.extend(back.drain(..).map(|f| f[12..].to_vec()));
        } else {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    out
}
