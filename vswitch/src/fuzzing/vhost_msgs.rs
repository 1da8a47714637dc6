//! vhost-user message sequences against one port's device, driven the way the control thread
//! drives a connection (`Switch::service_conn`): peek with `waiting_message`, hand the three
//! messages the switch handles itself to `wire`, everything else to the vhost crate's
//! `handle_request`, and only when the whole message is queued and the reply has room.
//!
//! The frontend end of the socket pair is nonblocking and never waits: a message the socket has
//! no room for is dropped, replies are read only when the input says so. A hang is therefore
//! the switch's, and libFuzzer's `-timeout` reports it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use arbitrary::{Arbitrary, Unstructured};
use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::BackendReqHandler;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::l2::VlanMode;
use crate::port::Port;
use crate::vhost::iotlb::IotlbMsg;
use crate::vhost::wire::{
    backend_req_fd, iotlb_msg, log_fd, send_rarp, vring_enable, waiting_message, Waiting,
};
use crate::vhost::{VhostDevice, MAX_MEM_SLOTS};

/// Messages the control thread handles per wakeup (`switch.rs` MSG_BUDGET).
const MSG_BUDGET: usize = 32;
/// Bytes in each pool memfd: small, so most fuzzer-chosen region sizes are refused and the
/// accepted ones are cheap to map.
const MEMFD_LEN: u64 = 16 * PAGE;
const PAGE: u64 = 4096;

/// Message codes the input picks from by index; anything else comes as `Code::Other`.
const CODES: [FrontendReq; 24] = [
    FrontendReq::GET_FEATURES,
    FrontendReq::SET_FEATURES,
    FrontendReq::SET_OWNER,
    FrontendReq::RESET_OWNER,
    FrontendReq::SET_MEM_TABLE,
    FrontendReq::SET_LOG_BASE,
    FrontendReq::SET_LOG_FD,
    FrontendReq::SET_VRING_NUM,
    FrontendReq::SET_VRING_ADDR,
    FrontendReq::SET_VRING_BASE,
    FrontendReq::GET_VRING_BASE,
    FrontendReq::SET_VRING_KICK,
    FrontendReq::SET_VRING_CALL,
    FrontendReq::SET_VRING_ERR,
    FrontendReq::GET_PROTOCOL_FEATURES,
    FrontendReq::SET_PROTOCOL_FEATURES,
    FrontendReq::GET_QUEUE_NUM,
    FrontendReq::SET_VRING_ENABLE,
    FrontendReq::SET_BACKEND_REQ_FD,
    FrontendReq::IOTLB_MSG,
    FrontendReq::GET_CONFIG,
    FrontendReq::RESET_DEVICE,
    FrontendReq::ADD_MEM_REG,
    FrontendReq::REM_MEM_REG,
];

/// A whole fuzz input: the port's queue pairs and what the frontend does.
#[derive(Arbitrary, Debug)]
pub struct Input {
    pairs: u8,
    ops: Vec<Op>,
}

/// One step of the frontend (or of the control loop).
#[derive(Arbitrary, Debug)]
enum Op {
    /// A message: code, extra header flag bits, payload, and fds (`None`: the ones the message
    /// usually carries, from the pool).
    Msg { code: Code, flags: u8, payload: Payload, fds: Option<Vec<Fd>> },
    /// The same, sent in two writes with the control loop running between them.
    Split { code: Code, payload: Payload, cut: u8 },
    /// Arbitrary bytes (a header lying about its size, garbage, half a message).
    Raw { bytes: Vec<u8>, fds: Vec<Fd> },
    /// The control loop services the connection.
    Service,
    /// The frontend reads what the switch sent it.
    Drain,
    /// The frontend hangs up; the switch resets the device and a new frontend connects.
    Reconnect,
}

#[derive(Arbitrary, Debug)]
enum Code {
    Known(u8),
    Other(u32),
}

impl Code {
    fn value(&self) -> u32 {
        match self {
            Code::Known(i) => u32::from(CODES[*i as usize % CODES.len()]),
            Code::Other(v) => *v,
        }
    }
}

/// A memory region in pages, so the fuzzer meets the memfds' sizes often.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct RegionSpec {
    gpa_page: u16,
    pages: u8,
    uva_page: u16,
    off_page: u8,
}

impl RegionSpec {
    fn bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&(self.gpa_page as u64 * PAGE).to_le_bytes());
        b[8..16].copy_from_slice(&(self.pages as u64 * PAGE).to_le_bytes());
        b[16..24].copy_from_slice(&(0x7f00_0000_0000 + self.uva_page as u64 * PAGE).to_le_bytes());
        b[24..32].copy_from_slice(&(self.off_page as u64 * PAGE).to_le_bytes());
        b
    }
}

/// Payload shapes of the protocol, plus raw bytes.
#[derive(Arbitrary, Debug)]
enum Payload {
    Bytes(Vec<u8>),
    U64(u64),
    State { index: u32, num: u32 },
    Addr { index: u32, flags: u32, desc_page: u16, used_page: u16, avail_page: u16, log: u64 },
    MemTable(Vec<RegionSpec>),
    MemReg(RegionSpec),
    Iotlb { iova_page: u16, pages: u8, uva_page: u16, perm: u8, kind: u8 },
}

impl Payload {
    fn bytes(&self) -> Vec<u8> {
        let uva = |p: u16| 0x7f00_0000_0000 + p as u64 * PAGE;
        match self {
            Payload::Bytes(b) => b.clone(),
            Payload::U64(v) => v.to_le_bytes().to_vec(),
            Payload::State { index, num } => [index.to_le_bytes(), num.to_le_bytes()].concat(),
            Payload::Addr { index, flags, desc_page, used_page, avail_page, log } => {
                let mut b = [index.to_le_bytes(), flags.to_le_bytes()].concat();
                for v in [uva(*desc_page), uva(*used_page), uva(*avail_page), *log] {
                    b.extend(v.to_le_bytes());
                }
                b
            }
            Payload::MemTable(rs) => {
                let mut b = (rs.len() as u32).to_le_bytes().to_vec();
                b.extend([0u8; 4]);
                rs.iter().for_each(|r| b.extend(r.bytes()));
                b
            }
            Payload::MemReg(r) => [&[0u8; 8][..], &r.bytes()].concat(),
            Payload::Iotlb { iova_page, pages, uva_page, perm, kind } => IotlbMsg {
                iova: *iova_page as u64 * PAGE,
                size: *pages as u64 * PAGE,
                uaddr: uva(*uva_page),
                perm: *perm,
                kind: *kind,
            }
            .encode()
            .to_vec(),
        }
    }

    /// The fds a frontend would attach to this payload under `code`.
    fn usual_fds(&self, code: u32) -> Vec<Fd> {
        let is = |r: FrontendReq| code == u32::from(r);
        match self {
            Payload::MemTable(rs) => (0..rs.len()).map(|i| Fd::Memfd(i as u8)).collect(),
            Payload::MemReg(_) if is(FrontendReq::ADD_MEM_REG) => vec![Fd::Memfd(0)],
            _ if is(FrontendReq::SET_VRING_KICK) || is(FrontendReq::SET_VRING_CALL) => vec![Fd::Eventfd],
            _ if is(FrontendReq::SET_VRING_ERR) => vec![Fd::Eventfd],
            _ if is(FrontendReq::SET_BACKEND_REQ_FD) => vec![Fd::Socket],
            _ if is(FrontendReq::SET_LOG_BASE) => vec![Fd::Log],
            _ if is(FrontendReq::SET_LOG_FD) => vec![Fd::Eventfd],
            _ => vec![],
        }
    }
}

/// Kinds of fd a message may carry.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Fd {
    /// One of three unsealed memfds of `MEMFD_LEN` bytes.
    Memfd(u8),
    /// A memfd sealed against writes and resizing (a shared writable mapping is refused).
    Sealed,
    /// A memfd of one page.
    Tiny,
    /// A memfd of one page sealed against shrinking and growing, writable: a dirty log the
    /// switch takes.
    Log,
    Eventfd,
    PipeRead,
    PipeWrite,
    /// A regular file.
    File,
    /// One end of a socket pair (the backend channel).
    Socket,
}

/// The fds of one run, made when first used.
#[derive(Default)]
struct Pool {
    memfds: [Option<OwnedFd>; 3],
    sealed: Option<OwnedFd>,
    tiny: Option<OwnedFd>,
    log: Option<OwnedFd>,
    eventfd: Option<OwnedFd>,
    pipe: Option<(OwnedFd, OwnedFd)>,
    file: Option<File>,
    /// The end given away, and the end kept (drained so the switch's sends never fill it).
    socket: Option<(UnixStream, UnixStream)>,
}

fn memfd(len: u64, seal: bool) -> OwnedFd {
    let flags = if seal { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: a constant C string; memfd_create returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"fuzz-guest".as_ptr(), flags) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a new fd that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("memfd size");
    if seal {
        let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on our own fd.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) }, 0, "seal memfd");
    }
    f.into()
}

impl Pool {
    fn raw(&mut self, k: Fd) -> RawFd {
        match k {
            Fd::Memfd(i) => {
                self.memfds[i as usize % 3].get_or_insert_with(|| memfd(MEMFD_LEN, false)).as_raw_fd()
            }
            Fd::Sealed => self.sealed.get_or_insert_with(|| memfd(MEMFD_LEN, true)).as_raw_fd(),
            Fd::Tiny => self.tiny.get_or_insert_with(|| memfd(PAGE, false)).as_raw_fd(),
            Fd::Log => self
                .log
                .get_or_insert_with(|| {
                    // Not `memfd`: its seals include F_SEAL_WRITE, which a log cannot have.
                    // SAFETY: a constant C string; memfd_create returns a new fd or -1.
                    let fd = unsafe { libc::memfd_create(c"fuzz-log".as_ptr(), libc::MFD_ALLOW_SEALING) };
                    assert!(fd >= 0, "memfd_create");
                    // SAFETY: a new fd that nothing else owns.
                    let f = unsafe { File::from_raw_fd(fd) };
                    f.set_len(PAGE).expect("log size");
                    // SAFETY: fcntl on our own fd.
                    let r = unsafe {
                        libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)
                    };
                    assert_eq!(r, 0, "seal log");
                    f.into()
                })
                .as_raw_fd(),
            Fd::Eventfd => self
                .eventfd
                .get_or_insert_with(|| {
                    // SAFETY: eventfd returns a new fd or -1.
                    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
                    assert!(fd >= 0, "eventfd");
                    // SAFETY: a new fd that nothing else owns.
                    unsafe { OwnedFd::from_raw_fd(fd) }
                })
                .as_raw_fd(),
            Fd::PipeRead | Fd::PipeWrite => {
                let (r, w) = self.pipe.get_or_insert_with(|| {
                    let mut p = [0; 2];
                    // SAFETY: pipe2 writes two fds into the array.
                    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_NONBLOCK) }, 0, "pipe");
                    // SAFETY: two new fds that nothing else owns.
                    unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
                });
                if matches!(k, Fd::PipeRead) {
                    r.as_raw_fd()
                } else {
                    w.as_raw_fd()
                }
            }
            Fd::File => self.file.get_or_insert_with(tempfile).as_raw_fd(),
            Fd::Socket => self.socket.get_or_insert_with(pair).0.as_raw_fd(),
        }
    }

    /// Empties the kept end of the backend channel: IOTLB misses the switch asked for.
    fn drain(&mut self) {
        if let Some((_, keep)) = &mut self.socket {
            let mut buf = [0u8; 4096];
            while matches!(keep.read(&mut buf), Ok(n) if n > 0) {}
        }
    }
}

/// An unlinked regular file of a few pages.
fn tempfile() -> File {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(std::env::temp_dir())
        .expect("O_TMPFILE in the temp dir");
    f.set_len(4 * PAGE).expect("file size");
    f
}

fn pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    a.set_nonblocking(true).expect("nonblocking");
    b.set_nonblocking(true).expect("nonblocking");
    (a, b)
}

/// The connection as the control thread holds it.
struct Conn {
    handler: BackendReqHandler<Mutex<VhostDevice>>,
    backend_fd: RawFd,
    frontend: UnixStream,
}

fn connect(device: &Arc<Mutex<VhostDevice>>) -> Conn {
    let (frontend, backend) = UnixStream::pair().expect("socketpair");
    frontend.set_nonblocking(true).expect("nonblocking");
    let backend_fd = backend.as_raw_fd();
    Conn { handler: BackendReqHandler::from_stream(backend, device.clone()), backend_fd, frontend }
}

/// `Switch::service_conn`, minus the poll registration. Returns false when the connection was
/// closed (and the device reset).
fn service(conn: &mut Conn, device: &Mutex<VhostDevice>) -> bool {
    for _ in 0..MSG_BUDGET {
        let fd = conn.backend_fd;
        let waiting = waiting_message(fd);
        if matches!(waiting, Waiting::Nothing | Waiting::Partial) || !crate::switch::sockets::writable(fd) {
            return true;
        }
        let res = match waiting {
            Waiting::TooManyFds(n) => Err(format!("{n} fds with one message")),
            Waiting::VringEnable => vring_enable(fd, device).map_err(|e| e.to_string()),
            Waiting::IotlbMsg => iotlb_msg(fd, device).map_err(|e| e.to_string()),
            Waiting::BackendReqFd => backend_req_fd(fd, device).map_err(|e| e.to_string()),
            Waiting::LogFd => log_fd(fd, device).map_err(|e| e.to_string()),
            Waiting::SendRarp => send_rarp(fd, device).map(drop).map_err(|e| e.to_string()),
            _ => match conn.handler.handle_request() {
                Ok(()) => Ok(()),
                Err(e) if crate::switch::keeps_connection(&e) => {
                    device.lock().expect("device lock").protocol_errors += 1;
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            },
        };
        if res.is_err() {
            device.lock().expect("device lock").reset();
            return false;
        }
    }
    true
}

/// What must hold between any two messages.
fn check(device: &Mutex<VhostDevice>) {
    let info = device.lock().expect("device lock").info();
    assert!(info.mem_regions as u64 <= MAX_MEM_SLOTS, "{} regions mapped", info.mem_regions);
    assert!(
        info.running_queues.is_empty() || info.mem_regions > 0,
        "queues {:?} run without a memory table",
        info.running_queues
    );
}

fn send(conn: &Conn, bytes: &[u8], fds: &[RawFd]) {
    // A full socket (the switch not reading) drops the message: the frontend never waits.
    if fds.is_empty() {
        let _ = (&conn.frontend).write(bytes);
    } else {
        let _ = conn.frontend.send_with_fds(&[bytes], fds);
    }
}

fn message(code: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(12 + payload.len());
    m.extend(code.to_le_bytes());
    m.extend(flags.to_le_bytes());
    m.extend((payload.len() as u32).to_le_bytes());
    m.extend(payload);
    m
}

fn drain_frontend(conn: &Conn) {
    let mut buf = [0u8; 4096];
    let mut s = &conn.frontend;
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

/// Number of open fds of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// The libFuzzer entry point: bytes to an [`Input`], then [`run`].
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(input);
    }
}

/// Runs one sequence; panics on a broken invariant.
pub fn run(input: Input) {
    // Other tests open fds in parallel threads under `cargo test`: count only when alone.
    let fds_before = (!cfg!(test)).then(open_fds);
    {
        let pairs = 1 + (input.pairs % 2) as u16;
        let mut port = Port::new(0, "fuzz".into(), VlanMode::Access(1), [0x52, 0, 0, 0, 0, 1], pairs);
        // Packed rings offered too (a port's `packed=on`), so sequences can set them up.
        port.packed = true;
        let port = Arc::new(port);
        let device = Arc::new(Mutex::new(VhostDevice::new(port, Arc::new(|| {}))));
        let mut pool = Pool::default();
        let mut conn = Some(connect(&device));
        for op in input.ops.iter().take(256) {
            let Some(c) = conn.as_mut() else {
                if matches!(op, Op::Reconnect) {
                    conn = Some(connect(&device));
                }
                continue;
            };
            let version = 1u32;
            match op {
                Op::Msg { code, flags, payload, fds } => {
                    let code = code.value();
                    let fds = fds.clone().unwrap_or_else(|| payload.usual_fds(code));
                    let raw: Vec<RawFd> = fds.iter().take(8).map(|&k| pool.raw(k)).collect();
                    let flags = version | u32::from(*flags) << 2; // REPLY, NEED_REPLY, unknown bits
                    send(c, &message(code, flags, &payload.bytes()), &raw);
                }
                Op::Split { code, payload, cut } => {
                    let code = code.value();
                    let raw: Vec<RawFd> = payload.usual_fds(code).iter().map(|&k| pool.raw(k)).collect();
                    let m = message(code, version, &payload.bytes());
                    let at = (*cut as usize).min(m.len());
                    send(c, &m[..at], &raw);
                    if !service(c, &device) {
                        conn = None;
                        continue;
                    }
                    send(c, &m[at..], &[]);
                }
                Op::Raw { bytes, fds } => {
                    let raw: Vec<RawFd> = fds.iter().take(8).map(|&k| pool.raw(k)).collect();
                    send(c, bytes, &raw);
                }
                Op::Service => {
                    if !service(c, &device) {
                        conn = None;
                    }
                }
                Op::Drain => {
                    drain_frontend(c);
                    pool.drain();
                }
                Op::Reconnect => {
                    drop(conn.take());
                    device.lock().expect("device lock").reset();
                    conn = Some(connect(&device));
                }
            }
            check(&device);
        }
        if let Some(c) = conn.as_mut() {
            service(c, &device);
            check(&device);
        }
        drop(conn);
        device.lock().expect("device lock").reset();
        check(&device);
    }
    if let Some(before) = fds_before {
        let after = open_fds();
        assert!(after <= before, "fds leaked: {before} open before the run, {after} after");
    }
}
