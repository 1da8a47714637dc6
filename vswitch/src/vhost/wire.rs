//! Below the vhost crate's request handler: what the control loop checks on the socket before
//! handing it a message, and the messages the switch handles itself: SET_VRING_ENABLE (the
//! crate's rule is stricter than QEMU's order), IOTLB_MSG and SET_BACKEND_REQ_FD (the crate has
//! no IOTLB support, rust-vmm/vhost#312).

use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag, MAX_MSG_SIZE};
use vhost::vhost_user::{Error as VuError, VhostUserBackendReqHandlerMut};

use super::iotlb::{IotlbMsg, IOTLB_MSG_LEN};
use super::VhostDevice;

const VERSION: VhostUserHeaderFlag = VhostUserHeaderFlag::VERSION;
const REPLY: VhostUserHeaderFlag = VhostUserHeaderFlag::REPLY;
const NEED_REPLY: VhostUserHeaderFlag = VhostUserHeaderFlag::NEED_REPLY;

/// Why a connection's message stream is unusable: the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// malformed message
    #[error("malformed {req} ({bytes} bytes, flags {flags:#x}, size {size})")]
    Malformed {
        /// The request.
        req: &'static str,
        /// Bytes read.
        bytes: isize,
        /// Header flags.
        flags: u32,
        /// Header size field.
        size: u32,
    },
    /// short read
    #[error("short vhost-user {0}")]
    Short(&'static str),
    /// payload too large
    #[error("payload of {0} bytes is larger than this message allows")]
    TooLarge(usize),
    /// bad flags
    #[error("bad header flags {0:#x}")]
    Flags(u32),
    /// reply not sent
    #[error("cannot send the reply to {0:?}")]
    Reply(FrontendReq),
    /// receive failed
    #[error("cannot read SET_BACKEND_REQ_FD: {0}")]
    Recv(vmm_sys_util::errno::Error),
    /// more than one fd
    #[error("SET_BACKEND_REQ_FD came with {0} file descriptors, not one")]
    Fds(usize),
    /// poisoned lock
    #[error("device state poisoned")]
    Poisoned,
}

/// What waits on a vhost-user socket.
pub(crate) enum Waiting {
    /// No bytes.
    Nothing,
    /// Part of a message; the rest has not arrived.
    Partial,
    /// A whole SET_VRING_ENABLE, which the switch handles itself (see `vring_enable`).
    VringEnable,
    /// A whole IOTLB_MSG (see `iotlb_msg`).
    IotlbMsg,
    /// A whole SET_BACKEND_REQ_FD (see `backend_req_fd`).
    BackendReqFd,
    /// A whole SET_LOG_FD (see `log_fd`).
    LogFd,
    /// A whole SEND_RARP (see `send_rarp`).
    SendRarp,
    /// A whole SET_FEATURES acking these bits, left queued for the handler: the control loop
    /// acts on a change of dirty logging before the frontend gets its reply.
    Features(u64),
    /// A whole message, end of stream, an error, or a header the handler refuses by itself.
    Whole,
    /// A header that comes with more file descriptors than a message may carry: the vhost
    /// crate would lose the header's bytes and wait for ever for new ones, so the connection
    /// must be closed instead.
    TooManyFds(usize),
}

/// Most fds the vhost crate takes with one message (its `MAX_ATTACHED_FD_ENTRIES`).
const MAX_FDS: usize = 32;

/// Peeks a message header and counts the fds that come with it, closing the copies a peek
/// installs. Returns the bytes peeked (or -1) and the fd count (`usize::MAX` if there were
/// more than the control buffer holds).
fn peek_header(fd: RawFd, hdr: &mut [u8; 12]) -> (isize, usize) {
    const PEEK_FDS: usize = MAX_FDS + 8;
    // 8-byte aligned room for one cmsghdr (16 bytes) and PEEK_FDS descriptors.
    let mut cbuf = [0u64; 2 + PEEK_FDS.div_ceil(2)];
    let mut iov = libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: hdr.len() };
    // SAFETY: msghdr is plain data; zero is a valid value for every field.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    // SAFETY: the iovec and control buffer are local and as long as msghdr says; MSG_DONTWAIT
    // never blocks; MSG_PEEK leaves the bytes (and the fds) queued.
    let n =
        unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    let mut count = 0usize;
    if n >= 0 {
        // SAFETY: walking the control messages the kernel wrote into `cbuf`, with libc's
        // macros, each bounded by msg_controllen; the fds in them were just installed for us.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let k =
                        ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                    let p = libc::CMSG_DATA(c) as *const RawFd;
                    for i in 0..k {
                        libc::close(p.add(i).read_unaligned());
                    }
                    count += k;
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            count = usize::MAX;
        }
    }
    (n, count)
}

/// What waits on a vhost-user socket, without reading it.
pub(crate) fn waiting_message(fd: RawFd) -> Waiting {
    const HDR: usize = 12;
    let mut hdr = [0u8; HDR];
    let (n, fds) = peek_header(fd, &mut hdr);
    if n > 0 && fds > MAX_FDS {
        return Waiting::TooManyFds(fds);
    }
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::WouldBlock { Waiting::Nothing } else { Waiting::Whole };
    }
    if n == 0 {
        return Waiting::Whole; // EOF: let the handler see the disconnect
    }
    if (n as usize) < HDR {
        return Waiting::Partial;
    }
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if size > MAX_MSG_SIZE {
        return Waiting::Whole; // the handler refuses an oversized header without reading on
    }
    let mut avail: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut avail) } < 0 {
        return Waiting::Whole;
    }
    if (avail as usize) < HDR + size {
        return Waiting::Partial;
    }
    let req = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    if req == u32::from(FrontendReq::SET_VRING_ENABLE) {
        Waiting::VringEnable
    } else if req == u32::from(FrontendReq::IOTLB_MSG) {
        Waiting::IotlbMsg
    } else if req == u32::from(FrontendReq::SET_BACKEND_REQ_FD) {
        Waiting::BackendReqFd
    } else if req == u32::from(FrontendReq::SET_LOG_FD) {
        Waiting::LogFd
    } else if req == u32::from(FrontendReq::SEND_RARP) {
        Waiting::SendRarp
    } else if req == u32::from(FrontendReq::SET_FEATURES) && size == 8 {
        let mut m = [0u8; HDR + 8];
        // SAFETY: peeks into a local buffer; the whole message is queued (checked above).
        let n =
            unsafe { libc::recv(fd, m.as_mut_ptr().cast(), m.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        match n {
            20 => Waiting::Features(u64::from_le_bytes(m[12..20].try_into().unwrap_or_default())),
            _ => Waiting::Whole,
        }
    } else {
        Waiting::Whole
    }
}

/// Protocol version 1 in the header's version bits.
const VERSION_1: u32 = 0x1;

/// SET_VRING_ENABLE, handled here rather than by the vhost crate: QEMU (7.2 at least) sends it
/// before SET_FEATURES, when the guest driver attaches its queues, and the crate refuses it
/// until PROTOCOL_FEATURES has been acked, leaving the rings disabled for good. DPDK accepts it
/// at any time; so does this. Errors mean the stream is unusable.
pub(crate) fn vring_enable(fd: RawFd, device: &Mutex<VhostDevice>) -> Result<(), WireError> {
    let mut msg = [0u8; 20];
    // SAFETY: reads into a local buffer; the whole message is known to be queued.
    let n = unsafe { libc::recv(fd, msg.as_mut_ptr().cast(), msg.len(), libc::MSG_DONTWAIT) };
    let word = |i: usize| u32::from_le_bytes([msg[i], msg[i + 1], msg[i + 2], msg[i + 3]]);
    let flags = word(4);
    if n != 20 || word(8) != 8 || flags & VERSION.bits() != VERSION_1 || flags & REPLY.bits() != 0 {
        return Err(WireError::Malformed { req: "SET_VRING_ENABLE", bytes: n, flags, size: word(8) });
    }
    let (index, num) = (word(12), word(16));
    let mut d = device.lock().map_err(|_| WireError::Poisoned)?;
    let res = match num {
        0 | 1 => d.set_vring_enable(index, num == 1),
        _ => Err(VuError::InvalidParam),
    };
    if res.is_err() {
        d.protocol_errors += 1;
    }
    if flags & NEED_REPLY.bits() != 0 && d.reply_ack() {
        send_status(fd, FrontendReq::SET_VRING_ENABLE, res.is_err())?;
    }
    Ok(())
}

/// Sends a REPLY_ACK status (0 = success).
fn send_status(fd: RawFd, req: FrontendReq, failed: bool) -> Result<(), WireError> {
    let mut reply = [0u8; 20];
    reply[0..4].copy_from_slice(&u32::from(req).to_le_bytes());
    reply[4..8].copy_from_slice(&(VERSION_1 | REPLY.bits()).to_le_bytes());
    reply[8..12].copy_from_slice(&8u32.to_le_bytes());
    reply[12..20].copy_from_slice(&(failed as u64).to_le_bytes());
    // SAFETY: sends from a local buffer. Never waits: the control loop checked for room, and a
    // frontend that took it since is disconnected.
    let sent = unsafe {
        libc::send(fd, reply.as_ptr().cast(), reply.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
    };
    if sent != reply.len() as isize {
        return Err(WireError::Reply(req));
    }
    Ok(())
}

/// `SO_TYPE` of a socket.
fn socket_type(s: &UnixStream) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let mut t: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int.
    let r = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_TYPE, (&raw mut t).cast(), &mut len)
    };
    (r == 0).then_some(t)
}

/// Reads a whole message known to be queued: header words and payload.
fn read_whole(fd: RawFd, buf: &mut [u8]) -> Result<(u32, usize), WireError> {
    // SAFETY: reads into the caller's buffer; the whole message is known to be queued.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), 12, libc::MSG_DONTWAIT) };
    if n != 12 {
        return Err(WireError::Short("header"));
    }
    let word = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let (flags, size) = (word(buf, 4), word(buf, 8) as usize);
    if size > buf.len() - 12 {
        return Err(WireError::TooLarge(size));
    }
    // SAFETY: as above, `size` bytes fit after the header.
    let n = unsafe { libc::recv(fd, buf[12..].as_mut_ptr().cast(), size, libc::MSG_DONTWAIT) };
    if n != size as isize {
        return Err(WireError::Short("payload"));
    }
    if flags & VERSION.bits() != VERSION_1 || flags & REPLY.bits() != 0 {
        return Err(WireError::Flags(flags));
    }
    Ok((flags, size))
}

/// IOTLB_MSG: an update or invalidation from the frontend's vIOMMU. A refused one (outside
/// the guest's memory, a type a frontend does not send) is counted and answered with a failure
/// status; the stream stays usable. QEMU always asks for the status and waits for it.
pub(crate) fn iotlb_msg(fd: RawFd, device: &Mutex<VhostDevice>) -> Result<(), WireError> {
    let mut buf = [0u8; 12 + MAX_MSG_SIZE];
    let (flags, size) = read_whole(fd, &mut buf)?;
    let mut d = device.lock().map_err(|_| WireError::Poisoned)?;
    let res = match IotlbMsg::decode(&buf[12..12 + size]) {
        Some(m) => d.iotlb_msg(m),
        None => Err(format!("IOTLB_MSG payload of {size} bytes (a vhost_iotlb_msg has {IOTLB_MSG_LEN})")),
    };
    if let Err(e) = &res {
        d.protocol_errors += 1;
        tracing::debug!("IOTLB_MSG refused: {e}");
    }
    if flags & NEED_REPLY.bits() != 0 {
        send_status(fd, FrontendReq::IOTLB_MSG, res.is_err())?;
    }
    Ok(())
}

/// Receives a header and the one fd that should come with it. Room is made for 8 fds, an even
/// count: `recv_with_fd` asks for one, but the control buffer the kernel is given has room for
/// two (alignment), and vmm-sys-util 0.15 keeps the first and leaves a second installed and
/// open: a frontend sending two fds would leak one per message (found by fuzzing). Every fd
/// received is owned here, and more than one is refused.
fn recv_one_fd(conn: &UnixStream, hdr: &mut [u8; 12]) -> Result<(usize, Option<std::fs::File>), WireError> {
    use std::os::fd::FromRawFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut fds: [RawFd; 8] = [-1; 8];
    let mut iov = [libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: hdr.len() }];
    // SAFETY: the iovec points into `hdr`, which outlives the call.
    let (n, nfds) = unsafe { conn.recv_with_fds(&mut iov, &mut fds) }.map_err(WireError::Recv)?;
    // SAFETY: each received descriptor is this process's alone (closed when dropped).
    let mut files: Vec<std::fs::File> =
        fds[..nfds.min(fds.len())].iter().map(|&f| unsafe { std::fs::File::from_raw_fd(f) }).collect();
    if files.len() > 1 {
        return Err(WireError::Fds(files.len()));
    }
    Ok((n, files.pop()))
}

/// SET_BACKEND_REQ_FD: the socket for requests to the frontend (IOTLB misses). The fd comes
/// with the message (SCM_RIGHTS) and must be a stream socket.
pub(crate) fn backend_req_fd(fd: RawFd, device: &Mutex<VhostDevice>) -> Result<(), WireError> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: borrows the connection's fd for one receive; ManuallyDrop never closes it.
    let conn = std::mem::ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(fd) });
    let mut hdr = [0u8; 12];
    let (n, file) = recv_one_fd(&conn, &mut hdr)?;
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    if n != 12 || word(8) != 0 || word(4) & VERSION.bits() != VERSION_1 {
        return Err(WireError::Malformed {
            req: "SET_BACKEND_REQ_FD",
            bytes: n as isize,
            flags: word(4),
            size: word(8),
        });
    }
    let flags = word(4);
    let mut d = device.lock().map_err(|_| WireError::Poisoned)?;
    let res = match file {
        Some(f) => {
            // SAFETY: the received descriptor is ours alone.
            let sock = unsafe { UnixStream::from_raw_fd(f.into_raw_fd()) };
            match (sock.local_addr(), socket_type(&sock)) {
                (Ok(_), Some(libc::SOCK_STREAM)) => d.set_backend_channel(sock),
                (Err(e), _) => Err(format!("the backend channel is not a unix socket: {e}")),
                (Ok(_), t) => {
                    Err(format!("the backend channel is a unix socket of type {t:?}, not a stream"))
                }
            }
        }
        None => Err("SET_BACKEND_REQ_FD came without a file descriptor".into()),
    };
    if let Err(e) = &res {
        d.protocol_errors += 1;
        tracing::debug!("SET_BACKEND_REQ_FD refused: {e}");
    }
    if flags & NEED_REPLY.bits() != 0 && d.reply_ack() {
        send_status(fd, FrontendReq::SET_BACKEND_REQ_FD, res.is_err())?;
    }
    Ok(())
}

/// SET_LOG_FD: an eventfd the backend could signal after logging (vhost-kernel's
/// VHOST_SET_LOG_FD). QEMU's vhost-user frontend never sends it and reads the log without being
/// told; the fd is taken and closed, as DPDK does, and the frontend gets its status.
pub(crate) fn log_fd(fd: RawFd, device: &Mutex<VhostDevice>) -> Result<(), WireError> {
    use std::os::fd::FromRawFd;
    // SAFETY: borrows the connection's fd for one receive; ManuallyDrop never closes it.
    let conn = std::mem::ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(fd) });
    let mut hdr = [0u8; 12];
    let (n, file) = recv_one_fd(&conn, &mut hdr)?;
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let flags = word(4);
    if n != 12 || word(8) != 0 || flags & VERSION.bits() != VERSION_1 {
        return Err(WireError::Malformed { req: "SET_LOG_FD", bytes: n as isize, flags, size: word(8) });
    }
    drop(file);
    let d = device.lock().map_err(|_| WireError::Poisoned)?;
    if flags & NEED_REPLY.bits() != 0 && d.reply_ack() {
        send_status(fd, FrontendReq::SET_LOG_FD, false)?;
    }
    Ok(())
}

/// SEND_RARP (after a live migration, on the destination): the guest's MAC, in the first 6
/// bytes of a u64, which the control loop moves to this port at once. Returns it, or `None`
/// (counted, status sent) when the RARP protocol feature was not acked.
pub(crate) fn send_rarp(fd: RawFd, device: &Mutex<VhostDevice>) -> Result<Option<[u8; 6]>, WireError> {
    let mut buf = [0u8; 12 + 8];
    let (flags, size) = read_whole(fd, &mut buf)?;
    if size != 8 {
        return Err(WireError::Malformed {
            req: "SEND_RARP",
            bytes: 12 + size as isize,
            flags,
            size: size as u32,
        });
    }
    let mut d = device.lock().map_err(|_| WireError::Poisoned)?;
    let ok = d.rarp_acked();
    if !ok {
        d.protocol_errors += 1;
    }
    if flags & NEED_REPLY.bits() != 0 && d.reply_ack() {
        send_status(fd, FrontendReq::SEND_RARP, !ok)?;
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&buf[12..18]);
    Ok(ok.then_some(mac))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    fn pipe() -> (std::fs::File, OwnedFd) {
        let mut p = [0; 2];
        // SAFETY: pipe2 fills two fds on success.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) }, 0);
        // SAFETY: both are new fds owned by nobody else.
        unsafe { (std::fs::File::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
    }

    #[test]
    fn test_backend_req_fd_with_two_fds_is_refused_and_closes_both() {
        let (frontend, backend) = UnixStream::pair().expect("socketpair");
        let device = Mutex::new(crate::vhost::VhostDevice::new(
            std::sync::Arc::new(crate::port::Port::new(
                0,
                "t".into(),
                crate::l2::VlanMode::Access(1),
                [2, 0, 0, 0, 0, 1],
                1,
            )),
            std::sync::Arc::new(|| {}),
        ));
        // Two pipe write ends go with the message; the test keeps only the read ends, so each
        // reads end-of-file once every copy of its write end is closed.
        let (mut r1, w1) = pipe();
        let (mut r2, w2) = pipe();
        let mut m = u32::from(FrontendReq::SET_BACKEND_REQ_FD).to_le_bytes().to_vec();
        m.extend(VERSION_1.to_le_bytes());
        m.extend(0u32.to_le_bytes());
        frontend.send_with_fds(&[&m[..]], &[w1.as_raw_fd(), w2.as_raw_fd()]).expect("send");
        drop((w1, w2));
        assert!(backend_req_fd(backend.as_raw_fd(), &device).is_err(), "two fds are one too many");
        let mut b = [0u8; 1];
        assert_eq!(r1.read(&mut b).expect("first fd closed"), 0);
        assert_eq!(r2.read(&mut b).expect("second fd closed"), 0, "the second fd was left open");
    }
}
