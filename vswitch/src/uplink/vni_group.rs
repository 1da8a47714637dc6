//! Several tunnel ports on one UDP port (VXLAN's 4789 carrying VNIs 42 and 43, each its own
//! port): their receive sockets form one `SO_REUSEPORT` group, and a small BPF program of the
//! switch's (`bpf::VniSelect`) hands each datagram to the socket of the port whose VNI it
//! carries, before the kernel queues it. Without the program the kernel would spread
//! datagrams over the group by hash, and each port would drop the other VNIs' share.
//!
//! The groups this process holds are kept here by bound address: a VNI has one port per
//! address; a port leaving frees its slot at once (its socket may close a little later, when
//! the polling threads let go of it). A datagram for a VNI no port serves goes to one of the
//! group's sockets by hash, whose port drops and counts it, as with one port.
//!
//! A host whose kernel refuses the program (no `CAP_BPF`, no `CONFIG_BPF_SYSCALL`) still has
//! one port per UDP port; a second is refused, saying why.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use super::bpf::{VniSelect, VNI_SLOTS};

/// A bound address's group: its program (if the kernel took it) and the VNI in each slot.
struct Group {
    select: Option<Arc<VniSelect>>,
    why_not: String,
    slots: Vec<Option<u32>>,
}

static GROUPS: Mutex<BTreeMap<SocketAddr, Group>> = Mutex::new(BTreeMap::new());

/// A port's place in its group; leaving it frees the slot.
pub struct Member {
    addr: SocketAddr,
    slot: u32,
    vni: u32,
}

/// Why a port cannot join: in words, for the port's error.
#[derive(Debug)]
pub struct JoinError(pub String);

/// Puts the receive socket `sock` (bound to `addr`, with `SO_REUSEPORT`) of a port for `vni`
/// in `addr`'s group.
pub fn join(addr: SocketAddr, vni: u32, sock: RawFd) -> Result<Member, JoinError> {
    let mut groups = GROUPS.lock().unwrap_or_else(|e| e.into_inner());
    let g = groups.entry(addr).or_insert_with(|| match VniSelect::new() {
        Ok(s) => Group { select: Some(Arc::new(s)), why_not: String::new(), slots: Vec::new() },
        Err((e, log)) => Group {
            select: None,
            why_not: format!("{e}{}{log}", if log.is_empty() { "" } else { ": " }),
            slots: Vec::new(),
        },
    });
    if g.slots.iter().flatten().any(|&v| v == vni) {
        return Err(JoinError(format!("VNI {vni} already has a port on UDP {addr}")));
    }
    let members = g.slots.iter().flatten().count();
    let slot = g.slots.iter().position(Option::is_none).unwrap_or(g.slots.len());
    if slot as u32 >= VNI_SLOTS {
        return Err(JoinError(format!("UDP {addr} already serves {VNI_SLOTS} VNIs")));
    }
    match &g.select {
        Some(s) => {
            // (Attaching again with every member is harmless: the group's program is replaced
            // by itself.)
            let set = s.set(slot as u32, vni, sock).and_then(|_| s.attach(sock));
            if let Err(e) = set {
                s.clear(slot as u32, vni);
                if members > 0 {
                    return Err(JoinError(format!("steering VNI {vni} to its socket: {e}")));
                }
                // The first port works without steering.
                tracing::debug!(%addr, "no VNI steering: {e}");
            }
        }
        None if members > 0 => {
            return Err(JoinError(format!(
                "UDP {addr} has a port already, and sharing it between VNIs needs a BPF program the kernel refused ({}); \
                 give this port another dstport= or local=",
                g.why_not
            )))
        }
        None => {}
    }
    if slot == g.slots.len() {
        g.slots.push(Some(vni));
    } else {
        g.slots[slot] = Some(vni);
    }
    Ok(Member { addr, slot: slot as u32, vni })
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut groups = GROUPS.lock().unwrap_or_else(|e| e.into_inner());
        let Some(g) = groups.get_mut(&self.addr) else { return };
        if let Some(s) = &g.select {
            s.clear(self.slot, self.vni);
        }
        if let Some(x) = g.slots.get_mut(self.slot as usize) {
            *x = None;
        }
        if g.slots.iter().all(Option::is_none) {
            groups.remove(&self.addr);
        }
    }
}

/// Whether UDP `addr` is free to make a new group on: a group of this process's is joined
/// as it is; otherwise a plain bind (no `SO_REUSEPORT`) must succeed, so that a group is never
/// shared with another program or switch, which would replace the program. A port removed a
/// moment ago may still hold its socket: tried for up to a second.
pub fn probe(addr: SocketAddr) -> io::Result<()> {
    if GROUPS.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&addr) {
        return Ok(());
    }
    let family = if addr.is_ipv6() { libc::AF_INET6 } else { libc::AF_INET };
    let t = std::time::Instant::now();
    loop {
        // SAFETY: plain socket(2); closed below.
        let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor we own.
        let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let (ss, len) = super::tunnel::sockaddr(addr);
        // SAFETY: binding to a sockaddr of the given length.
        let r = unsafe { libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) };
        let e = io::Error::last_os_error();
        drop(owned);
        if r == 0 {
            return Ok(());
        }
        if e.raw_os_error() != Some(libc::EADDRINUSE) || t.elapsed() > std::time::Duration::from_secs(1) {
            return Err(e);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Sets `SO_REUSEPORT` on `sock` (before its bind).
pub fn share(sock: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with an int.
    let r = unsafe {
        libc::setsockopt(sock, libc::SOL_SOCKET, libc::SO_REUSEPORT, (&on as *const libc::c_int).cast(), 4)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
