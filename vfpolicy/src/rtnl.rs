//! A blocking NETLINK_ROUTE socket that applies and reads VF policy on a real
//! PF with the message sequence of iproute2 6.1 (see the crate docs).

use std::cell::Cell;
use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::error::RtnlError;
use crate::msg::{
    addr_len_request, name_request, rate_dump_request, resolve_rates, set_request, show_request, RTM_NEWLINK,
};
use crate::reply::{link_index, parse_link, parse_vf_list, split, Status};
use crate::types::{VfInfo, VfSet};

/// How long the socket waits for each answer before giving up.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// A NETLINK_ROUTE socket bound to the calling thread's network namespace.
pub struct Rtnl {
    sock: Socket,
    seq: Cell<u32>,
}

impl Rtnl {
    /// Opens the socket as iproute2's `rtnl_open` does (extended acks on),
    /// with a [`RECV_TIMEOUT`] receive timeout so that no call hangs.
    pub fn open() -> Result<Self, RtnlError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(RtnlError::Socket)?;
        // Older kernels lack extended acks; iproute2 ignores this error too.
        let _ = sock.set_ext_ack(true);
        sock.bind_auto().map_err(RtnlError::Socket)?;
        set_recv_timeout(&sock, RECV_TIMEOUT).map_err(RtnlError::Socket)?;
        // iproute2 starts its sequence numbers at time(NULL).
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Ok(Rtnl { sock, seq: Cell::new(now.as_secs() as u32) })
    }

    /// The ifindex of `name`, looked up like iproute2's `ll_name_to_index`:
    /// an RTM_GETLINK by name ([`crate::name_request`]), then
    /// `if_nametoindex`, then the `ifN` form.
    pub fn ifindex(&self, name: &str) -> Result<i32, RtnlError> {
        let seq = self.next_seq();
        self.send(&name_request(name, seq))?;
        match self.answer(seq, name) {
            Ok(msg) => {
                let index = parse_link(&msg)?.ifindex;
                if index > 0 {
                    return Ok(index);
                }
            }
            // iproute2 stays silent here and tries the next way.
            Err(RtnlError::Kernel { .. }) => {}
            Err(e) => return Err(e),
        }
        if let Some(index) = if_nametoindex(name) {
            return Ok(index);
        }
        name.strip_prefix("if")
            .and_then(|n| n.parse::<i32>().ok())
            .filter(|&i| i > 0)
            .ok_or_else(|| RtnlError::NoDevice(name.to_string()))
    }

    /// Applies one `vf N ...` clause to the PF `dev`, sending what
    /// `ip link set DEV vf N ...` sends: the name lookup, the address-length
    /// GETLINK if a MAC is set, the rate dump if only one rate is set, and the
    /// RTM_NEWLINK, whose ACK it waits for.
    pub fn set_vf(&mut self, dev: &str, set: &VfSet) -> Result<(), RtnlError> {
        let index = self.ifindex(dev)?;
        if set.mac.is_some() {
            if let Some(len) = self.addr_len(index, dev)? {
                if len > 0 && len != 6 {
                    return Err(RtnlError::AddressLength(len));
                }
            }
        }
        let cur = if set.needs_current_rates() { self.current_rates(index, set.vf, dev)? } else { None };
        resolve_rates(set, cur)?;
        let seq = self.next_seq();
        self.send(&set_request(index, set, cur, seq))?;
        self.ack(seq, dev)
    }

    /// The VFs of `dev` as `ip link show DEV` reads them: `IFLA_NUM_VF` and
    /// the VF list with counters. `(None, [])` for a device without SR-IOV.
    pub fn vfs(&mut self, dev: &str) -> Result<(Option<u32>, Vec<VfInfo>), RtnlError> {
        self.ifindex(dev)?;
        let seq = self.next_seq();
        self.send(&show_request(dev, seq))?;
        let msg = self.answer(seq, dev)?;
        Ok(parse_vf_list(&msg)?)
    }

    /// The XDP program attached to `dev`, as `ip link show` reads it: its id and the mode
    /// (`driver`, `generic`, `offload` or `several`); `None` when there is none.
    pub fn xdp_prog(&self, dev: &str) -> Result<Option<(u32, &'static str)>, RtnlError> {
        let seq = self.next_seq();
        self.send(&name_request(dev, seq))?;
        let msg = self.answer(seq, dev)?;
        Ok(parse_link(&msg)?.xdp.map(|(mode, id)| {
            let mode = match mode {
                1 => "driver",
                2 => "generic",
                3 => "offload",
                _ => "several",
            };
            (id, mode)
        }))
    }

    /// `nl_get_ll_addr_len`: the length of the device's hardware address;
    /// `None` when the kernel does not say (iproute2 then skips the check).
    fn addr_len(&self, index: i32, dev: &str) -> Result<Option<usize>, RtnlError> {
        let seq = self.next_seq();
        self.send(&addr_len_request(index, seq))?;
        match self.answer(seq, dev) {
            Ok(msg) => Ok(parse_link(&msg)?.addr_len),
            Err(RtnlError::Kernel { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `ipaddr_get_vf_rate`: dumps all links and reads VF `vf`'s
    /// `(min, max)` from `index`'s VF list. `None` when the device reports no
    /// VF list (iproute2 then sends whatever its stack held; this sends 0).
    fn current_rates(&self, index: i32, vf: u32, dev: &str) -> Result<Option<(u32, u32)>, RtnlError> {
        let seq = self.next_seq();
        self.send(&rate_dump_request(seq))?;
        let msgs = self.dump(seq, dev)?;
        rates_in_dump(&msgs, index, vf, dev)
    }

    fn next_seq(&self) -> u32 {
        let seq = self.seq.get().wrapping_add(1);
        self.seq.set(seq);
        seq
    }

    fn send(&self, bytes: &[u8]) -> Result<(), RtnlError> {
        let kernel = SocketAddr::new(0, 0);
        self.sock.send_to(bytes, &kernel, 0).map_err(RtnlError::Io)?;
        Ok(())
    }

    /// The answer to a request sent without NLM_F_ACK.
    fn answer(&self, seq: u32, dev: &str) -> Result<Vec<u8>, RtnlError> {
        let mut found = None;
        self.receive(seq, dev, |m| {
            found = Some(m.to_vec());
            true
        })?;
        found.ok_or_else(|| RtnlError::Decode(crate::DecodeError("ACK instead of an answer".into())))
    }

    /// Waits for the ACK of a request sent with NLM_F_ACK.
    fn ack(&self, seq: u32, dev: &str) -> Result<(), RtnlError> {
        self.receive(seq, dev, |_| false)
    }

    /// All messages of a dump.
    fn dump(&self, seq: u32, dev: &str) -> Result<Vec<Vec<u8>>, RtnlError> {
        let mut msgs = Vec::new();
        self.receive(seq, dev, |m| {
            if u16::from_ne_bytes([m[4], m[5]]) == RTM_NEWLINK {
                msgs.push(m.to_vec());
            }
            false
        })?;
        Ok(msgs)
    }

    /// Reads messages of `seq` until a status message, or until `on_data`
    /// returns true. Other sequence numbers are skipped, as iproute2 does.
    fn receive(&self, seq: u32, dev: &str, mut on_data: impl FnMut(&[u8]) -> bool) -> Result<(), RtnlError> {
        let deadline = Instant::now() + RECV_TIMEOUT;
        while Instant::now() < deadline {
            let datagram = self.recv()?;
            for m in split(&datagram)?.into_iter().filter(|m| m.seq == seq) {
                match crate::reply::status(&m)? {
                    Status::Data if on_data(m.bytes) => return Ok(()),
                    Status::Data => {}
                    Status::Ok => return Ok(()),
                    Status::Err(errno, extack) => {
                        return Err(RtnlError::Kernel { errno, extack, dev: dev.to_string() })
                    }
                }
            }
        }
        Err(RtnlError::Timeout(RECV_TIMEOUT.as_secs()))
    }

    fn recv(&self) -> Result<Vec<u8>, RtnlError> {
        match self.sock.recv_from_full() {
            Ok((buf, _)) => Ok(buf),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Err(RtnlError::Timeout(RECV_TIMEOUT.as_secs()))
            }
            Err(e) => Err(RtnlError::Io(e)),
        }
    }
}

/// VF `vf`'s `(min, max)` in `index`'s entry of a link dump, read as
/// `ipaddr_loop_each_vf` does: every VF must carry IFLA_VF_RATE.
fn rates_in_dump(msgs: &[Vec<u8>], index: i32, vf: u32, dev: &str) -> Result<Option<(u32, u32)>, RtnlError> {
    // Only DEV's entry is read; the other links are not parsed at all.
    let Some(msg) = msgs.iter().find(|m| link_index(m) == Some(index)) else {
        return Ok(None);
    };
    let link = parse_link(msg)?;
    let (Some(_), Some(vfs)) = (link.num_vf, link.vfs) else {
        return Ok(None);
    };
    for (info, has_rate) in vfs {
        if !has_rate {
            return Err(RtnlError::RateApi);
        }
        if info.vf == vf {
            return Ok(Some((info.min_tx_rate, info.max_tx_rate)));
        }
    }
    Err(RtnlError::NoSuchVf { vf, dev: dev.to_string() })
}

fn set_recv_timeout(sock: &Socket, t: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the descriptor is the open socket `sock` owns; `tv` is a live
    // timeval and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn if_nametoindex(name: &str) -> Option<i32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    i32::try_from(index).ok().filter(|&i| i > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vf_link_answer;

    fn dump() -> Vec<Vec<u8>> {
        let vf = |vf, min, max| VfInfo { vf, min_tx_rate: min, max_tx_rate: max, ..VfInfo::default() };
        vec![
            vf_link_answer(2, "eth0", [2, 0, 0, 0, 0, 2], &[vf(0, 1, 2)], 9),
            vf_link_answer(3, "eth1", [2, 0, 0, 0, 0, 3], &[vf(0, 0, 0), vf(1, 40, 500)], 9),
        ]
    }

    #[test]
    fn test_rates_come_from_the_devices_own_entry() {
        assert_eq!(rates_in_dump(&dump(), 3, 1, "eth1").unwrap(), Some((40, 500)));
        assert_eq!(rates_in_dump(&dump(), 2, 0, "eth0").unwrap(), Some((1, 2)));
    }

    #[test]
    fn test_missing_vf_is_refused_and_missing_list_is_none() {
        let e = rates_in_dump(&dump(), 3, 2, "eth1").unwrap_err();
        assert!(e.to_string().starts_with("Cannot find VF 2"), "{e}");
        assert_eq!(rates_in_dump(&dump(), 9, 0, "x").unwrap(), None);
        let veth = vec![vf_link_answer(4, "veth0", [2; 6], &[], 9)[..].to_vec()];
        assert!(matches!(rates_in_dump(&veth, 4, 0, "veth0"), Err(RtnlError::NoSuchVf { .. })));
    }
}
