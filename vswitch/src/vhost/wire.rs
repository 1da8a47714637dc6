//! Below the vhost crate's request handler: what the control loop checks on the socket before
//! handing it a message, and the one message the switch handles itself.

use std::os::fd::RawFd;
use std::sync::Mutex;

use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag, MAX_MSG_SIZE};
use vhost::vhost_user::{Error as VuError, VhostUserBackendReqHandlerMut};

use super::VhostDevice;

const VERSION: VhostUserHeaderFlag = VhostUserHeaderFlag::VERSION;
const REPLY: VhostUserHeaderFlag = VhostUserHeaderFlag::REPLY;
const NEED_REPLY: VhostUserHeaderFlag = VhostUserHeaderFlag::NEED_REPLY;

/// What waits on a vhost-user socket.
pub(crate) enum Waiting {
    /// No bytes.
    Nothing,
    /// Part of a message; the rest has not arrived.
    Partial,
    /// A whole SET_VRING_ENABLE, which the switch handles itself (see `vring_enable`).
    VringEnable,
    /// A whole message, end of stream, an error, or a header the handler refuses by itself.
    Whole,
}

/// What waits on a vhost-user socket, without reading it.
pub(crate) fn waiting_message(fd: RawFd) -> Waiting {
    const HDR: usize = 12;
    let mut hdr = [0u8; HDR];
    // SAFETY: peek into a local buffer; MSG_DONTWAIT never blocks. Attached fds stay queued.
    let n = unsafe { libc::recv(fd, hdr.as_mut_ptr().cast(), HDR, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
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
    if u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) == u32::from(FrontendReq::SET_VRING_ENABLE) {
        Waiting::VringEnable
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
pub(crate) fn vring_enable(fd: RawFd, device: &Mutex<VhostDevice>) -> Result<(), String> {
    let mut msg = [0u8; 20];
    // SAFETY: reads into a local buffer; the whole message is known to be queued.
    let n = unsafe { libc::recv(fd, msg.as_mut_ptr().cast(), msg.len(), libc::MSG_DONTWAIT) };
    let word = |i: usize| u32::from_le_bytes([msg[i], msg[i + 1], msg[i + 2], msg[i + 3]]);
    let flags = word(4);
    if n != 20 || word(8) != 8 || flags & VERSION.bits() != VERSION_1 || flags & REPLY.bits() != 0 {
        return Err(format!("malformed SET_VRING_ENABLE ({n} bytes, flags {:#x}, size {})", flags, word(8)));
    }
    let (index, num) = (word(12), word(16));
    let mut d = device.lock().map_err(|_| "device state poisoned".to_string())?;
    let res = match num {
        0 | 1 => d.set_vring_enable(index, num == 1),
        _ => Err(VuError::InvalidParam),
    };
    if res.is_err() {
        d.protocol_errors += 1;
    }
    if flags & NEED_REPLY.bits() != 0 && d.reply_ack() {
        let mut reply = [0u8; 20];
        reply[0..4].copy_from_slice(&u32::from(FrontendReq::SET_VRING_ENABLE).to_le_bytes());
        reply[4..8].copy_from_slice(&(VERSION_1 | REPLY.bits()).to_le_bytes());
        reply[8..12].copy_from_slice(&8u32.to_le_bytes());
        reply[12..20].copy_from_slice(&(res.is_err() as u64).to_le_bytes());
        // SAFETY: sends from a local buffer.
        let sent = unsafe { libc::send(fd, reply.as_ptr().cast(), reply.len(), libc::MSG_NOSIGNAL) };
        if sent != reply.len() as isize {
            return Err("cannot send the SET_VRING_ENABLE reply".into());
        }
    }
    Ok(())
}
