//! Hostile guest memory (audit F2, F7, F8; recipes T6, T7, T8, T13): memory files that can
//! shrink are refused unless the SIGBUS guard is on, a truncated file costs only its own port,
//! the memory table cannot exhaust the switch's fds or address space, and edge values are
//! refused with the connection kept.
//!
//! Where the switch could die (or its fds and address space are measured) it runs as a child
//! process.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use e2e_tests::{
    connect, connect_default, drain, exchange, frame_of_size, mac, send, send_raw, sock, wait_until, Proc,
    Scratch,
};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend as VuFrontend, VhostUserFrontend};
use vhost::VhostBackend;
use vswitch::control::{request, PortInfo, Request};
use vswitch::virtio::features::{F_ACCESS_PLATFORM, VHOST_F_LOG_ALL};
use vswitch_bench::frontend::FrontendConfig;
use vswitch_bench::harness::peer::vswitch_binary;

const T: Duration = Duration::from_secs(5);
const ADD_MEM_REG: u32 = 37;

/// `vswitch run` as a child process, with its control socket.
struct Child {
    proc: Proc,
    ctl: PathBuf,
}

fn spawn_switch(dir: &Scratch, names: &[&str], extra: &[&str]) -> Child {
    let bin = vswitch_binary(None).expect("vswitch is built (cargo build -p vswitch)");
    let ctl = dir.path("vswitch.ctl");
    let mut cmd = Command::new(bin);
    cmd.arg("run").arg("--control").arg(&ctl).args(extra);
    for n in names {
        cmd.arg("--port").arg(format!("{n}={}", sock(dir, n).display()));
    }
    cmd.env("VSWITCH_LOG", "warn").env_remove("VSWITCH_CONTROL");
    let proc = Proc::spawn(cmd, &dir.path("vswitch.log"));
    assert!(
        wait_until(T, || ctl.exists() && names.iter().all(|n| sock(dir, n).exists())),
        "the switch did not start:\n{}",
        proc.log_text()
    );
    Child { proc, ctl }
}

impl Child {
    fn port(&self, name: &str) -> PortInfo {
        self.try_port(name).expect("the switch answers")
    }

    fn try_port(&self, name: &str) -> Option<PortInfo> {
        let v = request(&self.ctl, &Request::Ports).ok()?;
        let ports: Vec<PortInfo> = serde_json::from_value(v).expect("a port list");
        Some(ports.into_iter().find(|p| p.name == name).expect("the port exists"))
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.proc.pid())).expect("its fds").count()
    }

    /// VmSize of the switch, in KiB.
    fn vm_size_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid())).expect("status");
        let line = status.lines().find(|l| l.starts_with("VmSize:")).expect("VmSize");
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number")
    }
}

/// A memfd of `size` bytes with `seals` added (0: none).
fn memfd(size: u64, seals: libc::c_int) -> File {
    // SAFETY: a valid C string; the new fd is owned by the File.
    let f =
        unsafe { File::from_raw_fd(libc::memfd_create(c"hostile-mem".as_ptr(), libc::MFD_ALLOW_SEALING)) };
    f.set_len(size).unwrap();
    if seals != 0 {
        // SAFETY: F_ADD_SEALS on a memfd we own.
        assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) }, 0);
    }
    f
}

fn sealed(size: u64) -> File {
    memfd(size, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)
}

/// A raw connection to `name` that negotiated everything offered (REPLY_ACK, mem slots), and
/// the vhost crate's frontend over it for well-formed requests.
fn negotiated(dir: &Scratch, name: &str) -> (UnixStream, VuFrontend) {
    let raw = UnixStream::connect(sock(dir, name)).unwrap();
    raw.set_read_timeout(Some(T)).unwrap();
    let mut f = VuFrontend::from_stream(raw.try_clone().unwrap(), 1);
    f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    f.set_owner().unwrap();
    // Everything but a vIOMMU (ACCESS_PLATFORM needs the backend channel set up first) and
    // dirty logging (acked only while migrating, after SET_LOG_BASE, as QEMU does).
    let feats = f.get_features().unwrap() & !F_ACCESS_PLATFORM & !VHOST_F_LOG_ALL;
    f.set_features(feats).unwrap();
    let pf = f.get_protocol_features().unwrap();
    f.set_protocol_features(pf).unwrap();
    (raw, f)
}

/// ADD_MEM_REG sent raw (so that values the vhost crate would not send get through), asking for
/// a reply: whether the switch accepted the region.
fn add_region(s: &UnixStream, gpa: u64, size: u64, uva: u64, offset: u64, fd: RawFd) -> bool {
    let mut body = Vec::new();
    for v in [0u64, gpa, size, uva, offset] {
        body.extend(v.to_le_bytes());
    }
    send_raw(s, ADD_MEM_REG, 1 | 0x8, body.len() as u32, &body, &[fd]);
    let mut reply = [0u8; 20];
    (&*s).read_exact(&mut reply).expect("a reply to ADD_MEM_REG");
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), ADD_MEM_REG);
    u64::from_le_bytes(reply[12..20].try_into().unwrap()) == 0
}

#[test]
fn test_unsealed_memfd_is_refused_by_default_and_a_sealed_one_carries_traffic() {
    let dir = Scratch::new("mem-seal");
    let sw = spawn_switch(&dir, &["a", "b"], &[]);
    let (raw, _f) = negotiated(&dir, "a");
    let unsealed = memfd(1 << 20, 0);
    assert!(
        !add_region(&raw, 0, 1 << 20, 0x7000_0000, 0, unsealed.as_raw_fd()),
        "an unsealed memfd is refused"
    );
    let grow_only = memfd(1 << 20, libc::F_SEAL_GROW);
    assert!(
        !add_region(&raw, 0, 1 << 20, 0x7000_0000, 0, grow_only.as_raw_fd()),
        "F_SEAL_GROW is not enough"
    );
    let a = sw.port("a");
    assert_eq!((a.connected, a.device.mem_regions, a.device.protocol_errors), (true, 0, 2), "{a:?}");
    let log = sw.proc.log_text();
    assert!(log.contains("(memfd, 1048576 bytes) can lose pages: it has no F_SEAL_SHRINK seal"), "{log}");
    assert!(log.contains("memory-backend-memfd seals by default"), "{log}");
    assert!(log.contains("start the switch with --unsealed-memory guard"), "{log}");
    let sealed_fd = memfd(1 << 20, libc::F_SEAL_SHRINK);
    assert!(add_region(&raw, 0, 1 << 20, 0x7000_0000, 0, sealed_fd.as_raw_fd()), "F_SEAL_SHRINK is accepted");
    drop((raw, _f));
    // The in-repo frontend seals its memfd, as QEMU does: traffic flows under the default.
    let mut fa = connect_default(&dir, "a");
    let mut fb = connect_default(&dir, "b");
    exchange(&mut fa, &mut fb, mac(1), mac(2), 50, 0);
    exchange(&mut fb, &mut fa, mac(2), mac(1), 50, 100);
}

/// T6: a frontend truncates its (unsealed) memory under a running port. With the guard the
/// switch survives, drops that port and reports it; the other ports do not notice.
#[test]
fn test_truncated_memory_drops_only_its_port_under_the_guard() {
    let dir = Scratch::new("mem-truncate");
    let mut sw = spawn_switch(&dir, &["a", "b", "c"], &["--unsealed-memory", "guard"]);
    let mut fa = connect(&dir, "a", FrontendConfig { seal_memory: false, ..Default::default() });
    let mut fb = connect_default(&dir, "b");
    let mut fc = connect_default(&dir, "c");
    assert!(wait_until(T, || sw.port("a").device.running_queues == vec![0, 1]), "port a runs");
    exchange(&mut fb, &mut fc, mac(2), mac(3), 100, 0);
    exchange(&mut fc, &mut fb, mac(3), mac(2), 100, 100);
    drain(&mut fa, Duration::from_millis(50));
    // From here on `fa` must not touch its own memory: it would take the SIGBUS itself.
    // SAFETY: ftruncate on the memfd `fa` owns and keeps open.
    assert_eq!(unsafe { libc::ftruncate(fa.memory_fd(), 0) }, 0);
    // Broadcasts make the switch write into a's receive ring and buffers: pages it lost.
    for seq in 0..10 {
        send(&mut fb, 0, &frame_of_size([0xff; 6], mac(2), None, 60, 1000 + seq));
    }
    let dropped = wait_until(T, || match sw.try_port("a") {
        Some(a) => !a.connected && a.device.memory_faults == 1,
        None => !sw.proc.running(),
    });
    if let Some(status) = sw.proc.wait_exit(Duration::ZERO) {
        panic!("the switch died ({status}):\n{}", sw.proc.log_text());
    }
    assert!(dropped, "port a was not dropped: {:?}\n{}", sw.port("a"), sw.proc.log_text());
    assert_eq!(drain(&mut fc, Duration::from_millis(100)).len(), 10, "c got every broadcast");
    exchange(&mut fb, &mut fc, mac(2), mac(3), 100, 2000);
    exchange(&mut fc, &mut fb, mac(3), mac(2), 100, 3000);
    let log = sw.proc.log_text();
    assert!(log.contains("guest memory file lost pages"), "{log}");
    assert!(sw.port("b").connected && sw.port("c").connected);
    // `fa` is dropped without touching its memory (its rings are not walked on drop).
    drop(fa);
}

/// T7 (F7): 509 regions from one memfd (each ADD_MEM_REG carries a new fd) leave the switch
/// holding none of them.
#[test]
fn test_509_regions_hold_no_fds_in_the_switch() {
    let dir = Scratch::new("mem-fds");
    let sw = spawn_switch(&dir, &["a"], &[]);
    let (raw, _f) = negotiated(&dir, "a");
    let before = sw.fds();
    let file = sealed(4096);
    for i in 0..iommu_max_regions() {
        let at = (i as u64) << 20;
        assert!(add_region(&raw, at, 4096, 0x7000_0000_0000 + at, 0, file.as_raw_fd()), "region {i}");
    }
    let after = sw.fds();
    assert!(after <= before + 2, "the switch holds {} more fds after 509 regions", after - before);
    assert!(
        !add_region(&raw, 1 << 40, 4096, 0x7100_0000_0000, 0, file.as_raw_fd()),
        "a 510th region is refused"
    );
    assert_eq!(sw.port("a").device.mem_regions, 509);
}

fn iommu_max_regions() -> usize {
    vswitch::vhost::MAX_MEM_SLOTS as usize
}

/// T8 (F8): a region in the last page of a sparse 64 TiB memfd maps one page, not 64 TiB; a
/// region above the per-port budget is refused.
#[test]
fn test_sparse_file_maps_only_the_regions_pages_and_the_budget_holds() {
    let dir = Scratch::new("mem-sparse");
    let sw = spawn_switch(&dir, &["a"], &[]);
    let (raw, _f) = negotiated(&dir, "a");
    let big = sealed(1 << 46);
    let before = sw.vm_size_kib();
    assert!(add_region(&raw, 0, 4096, 0x7000_0000, (1 << 46) - 4096, big.as_raw_fd()));
    let grown = sw.vm_size_kib().saturating_sub(before);
    assert!(grown < 4096, "VmSize grew by {grown} KiB for a 4 KiB region");
    // 2 TiB of guest memory: above the default budget of 1 TiB.
    assert!(!add_region(&raw, 1 << 32, 2 << 40, 0x1000_0000_0000, 0, big.as_raw_fd()));
    // The switch logs a refusal after it has answered it.
    let logged = wait_until(Duration::from_secs(2), || {
        sw.proc.log_text().contains("more than the switch's max_guest_mem")
    });
    assert!(logged, "{}", sw.proc.log_text());
    assert_eq!(sw.port("a").device.mem_regions, 1);
}

/// T13: edge values and file kinds that cannot back guest memory: each refused, the
/// connection kept, the table unchanged.
#[test]
fn test_edge_value_regions_are_refused_and_the_connection_kept() {
    let dir = Scratch::new("mem-edges");
    let sw = spawn_switch(&dir, &["a"], &[]);
    let (raw, f) = negotiated(&dir, "a");
    let good = sealed(8192);
    assert!(add_region(&raw, 0x10_0000, 8192, 0x7000_0000, 0, good.as_raw_fd()));
    let (pipe_r, _pipe_w) = {
        let mut p = [0; 2];
        // SAFETY: pipe into a local array; both ends are owned by Files below.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        // SAFETY: fresh fds nothing else owns.
        unsafe { (File::from_raw_fd(p[0]), File::from_raw_fd(p[1])) }
    };
    let (sock_a, _sock_b) = UnixStream::pair().unwrap();
    let null = File::options().read(true).write(true).open("/dev/null").unwrap();
    let read_only = File::open(format!("/proc/self/fd/{}", good.as_raw_fd())).unwrap();
    let write_sealed = memfd(8192, libc::F_SEAL_SHRINK | libc::F_SEAL_WRITE);
    let unsealed = memfd(8192, 0);
    let g = good.as_raw_fd();
    let cases: [(&str, u64, u64, u64, u64, RawFd); 12] = [
        ("size 0", 0, 0, 0x8000_0000, 0, g),
        ("gpa wraps", u64::MAX - 4095, 8192, 0x8000_0000, 0, g),
        ("gpa at the top", u64::MAX - 4095, 4096, 0x8000_0000, 0, g),
        ("uva wraps", 0, 8192, u64::MAX - 4095, 0, g),
        ("offset + size wraps", 0, 4096, 0x8000_0000, u64::MAX - 4095, g),
        ("offset past the end of the file", 0, 4096, 0x8000_0000, 8192, g),
        ("a pipe", 0, 4096, 0x8000_0000, 0, pipe_r.as_raw_fd()),
        ("a socket", 0, 4096, 0x8000_0000, 0, sock_a.as_raw_fd()),
        ("/dev/null", 0, 4096, 0x8000_0000, 0, null.as_raw_fd()),
        ("an O_RDONLY memfd", 0, 4096, 0x8000_0000, 0, read_only.as_raw_fd()),
        ("a memfd sealed against writes", 0, 4096, 0x8000_0000, 0, write_sealed.as_raw_fd()),
        ("an unsealed memfd", 0, 4096, 0x8000_0000, 0, unsealed.as_raw_fd()),
    ];
    for (what, gpa, size, uva, offset, fd) in cases {
        assert!(!add_region(&raw, gpa, size, uva, offset, fd), "{what} was accepted");
    }
    let a = sw.port("a");
    assert!(a.connected, "{a:?}");
    assert_eq!(a.device.mem_regions, 1, "{a:?}");
    assert_eq!(a.device.protocol_errors, cases.len() as u64, "{a:?}");
    assert!(f.get_features().is_ok(), "the connection still serves requests");
}
