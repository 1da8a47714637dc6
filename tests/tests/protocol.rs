//! Hostile and unusual vhost-user conversations: the switch answers with a protocol error or
//! closes that one connection, never crashes, and other ports do not notice.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use e2e_tests::{send_raw, wait_until, Scratch};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vswitch::virtio::features::{
    F_VERSION_1, NET_F_MRG_RXBUF, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES,
};
use vswitch::{PortConfig, Switch, SwitchConfig};

fn switch(dir: &Scratch, names: &[&str]) -> Switch {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("VSWITCH_LOG").unwrap_or_else(|_| "off".into()))
        .with_test_writer()
        .try_init();
    let ports = names
        .iter()
        .map(|n| PortConfig::parse(&format!("{n}={}", dir.path(&format!("{n}.sock")).display())).unwrap())
        .collect();
    Switch::start(SwitchConfig { fdb_aging_secs: 300, ports, ..Default::default() }).unwrap()
}

/// A memfd sealed against shrinking (the switch refuses memory that could shrink).
fn memfd(size: u64) -> File {
    let name = std::ffi::CString::new("t").unwrap();
    // SAFETY: valid C string; the new fd is owned by the File.
    let f = unsafe { File::from_raw_fd(libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING)) };
    f.set_len(size).unwrap();
    // SAFETY: F_ADD_SEALS on a memfd we own.
    assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) }, 0);
    f
}

/// True if the switch closed the connection within 5 s.
fn closed_by_switch(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue, // a reply; keep reading
            // Closed with our bytes still unread on its side.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// A well-behaved frontend can still negotiate on port `name`.
fn port_still_works(dir: &Scratch, name: &str) {
    let f = Frontend::connect(dir.path(&format!("{name}.sock")), 1).expect("connect");
    f.set_owner().unwrap();
    let feats = f.get_features().unwrap();
    assert!(feats & F_VERSION_1 != 0, "VERSION_1 offered");
}

#[test]
fn test_malformed_messages_close_only_that_connection() {
    let dir = Scratch::new("proto-bad");
    let sw = switch(&dir, &["a", "b"]);
    let a = dir.path("a.sock");
    // 1. SET_MEM_TABLE (5) claiming two regions with one fd attached.
    let mut s = UnixStream::connect(&a).unwrap();
    let mut body = Vec::new();
    body.extend(2u32.to_le_bytes());
    body.extend(0u32.to_le_bytes());
    for i in 0..2u64 {
        for v in [i << 20, 1 << 20, 0x7000_0000 + (i << 20), 0] {
            body.extend(v.to_le_bytes());
        }
    }
    let m = memfd(1 << 20);
    send_raw(&s, 5, 1, body.len() as u32, &body, &[m.as_raw_fd()]);
    assert!(closed_by_switch(&mut s), "wrong fd count must end the connection");
    // 2. An oversized message header.
    let mut s = UnixStream::connect(&a).unwrap();
    send_raw(&s, 1, 1, 0x10_0000, &[], &[]);
    assert!(closed_by_switch(&mut s));
    // 3. An unknown request code.
    let mut s = UnixStream::connect(&a).unwrap();
    send_raw(&s, 200, 1 | 0x8, 0, &[], &[]);
    assert!(closed_by_switch(&mut s));
    // 4. Garbage.
    let mut s = UnixStream::connect(&a).unwrap();
    s.write_all(&[0xff; 64]).unwrap();
    assert!(closed_by_switch(&mut s));
    // 5. Half a header, then silence: the switch gives up on it.
    let mut s = UnixStream::connect(&a).unwrap();
    s.write_all(&[1, 0, 0]).unwrap();
    assert!(closed_by_switch(&mut s));
    // Both ports still serve well-behaved frontends.
    port_still_works(&dir, "a");
    port_still_works(&dir, "b");
    let info = sw.ports().unwrap();
    assert_eq!(info.len(), 2);
}

#[test]
fn test_refused_requests_get_an_error_reply_and_the_connection_survives() {
    let dir = Scratch::new("proto-refuse");
    let _sw = switch(&dir, &["a"]);
    let raw = UnixStream::connect(dir.path("a.sock")).unwrap();
    let mut f = Frontend::from_stream(raw.try_clone().unwrap(), 1);
    f.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    f.set_owner().unwrap();
    // All offered but dirty logging (acked only while migrating, after SET_LOG_BASE).
    let feats = f.get_features().unwrap() & !VHOST_F_LOG_ALL;
    f.set_features(feats).unwrap();
    let pf = f.get_protocol_features().unwrap();
    assert!(
        pf.contains(VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    );
    f.set_protocol_features(pf).unwrap();
    assert!(f.set_vring_num(0, 100).is_err(), "ring size must be a power of two");
    assert!(f.set_vring_num(0, 256).is_ok());
    assert!(f.set_vring_num(7, 256).is_err(), "queue index beyond the port's queues");
    // Features not offered are refused.
    assert!(f.set_features(feats | (1 << 10)).is_err(), "GUEST_UFO is never offered");
    let (_, cfg) = f
        .get_config(0, 6, vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE, &[0u8; 6])
        .expect("config read");
    assert_eq!(cfg.len(), 6);
    assert_eq!(cfg[0] & 1, 0, "unicast MAC");
    // A config read past the end gets a reply with an empty payload. (Sent raw: rust-vmm's
    // frontend waits for a full-size reply and would hang on the error, where QEMU does not.)
    let mut body = Vec::new();
    for v in [8u32, 64, 0] {
        body.extend(v.to_le_bytes());
    }
    body.extend([0u8; 64]);
    send_raw(&raw, 24, 1, body.len() as u32, &body, &[]);
    let mut reply = [0u8; 24];
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&raw).read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_le_bytes(reply[8..12].try_into().unwrap()), 12, "header-only reply");
    assert_eq!(u32::from_le_bytes(reply[16..20].try_into().unwrap()), 0, "config size 0 = refused");
    assert_eq!(f.get_queue_num().unwrap(), 1);
}

#[test]
fn test_many_memory_slots_added_and_removed() {
    let dir = Scratch::new("proto-slots");
    let sw = switch(&dir, &["a"]);
    let mut f = Frontend::connect(dir.path("a.sock"), 1).unwrap();
    f.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    f.set_owner().unwrap();
    // All offered but dirty logging (acked only while migrating, after SET_LOG_BASE).
    let feats = f.get_features().unwrap() & !VHOST_F_LOG_ALL;
    f.set_features(feats).unwrap();
    let pf = f.get_protocol_features().unwrap();
    f.set_protocol_features(pf).unwrap();
    let slots = f.get_max_mem_slots().unwrap();
    assert!(slots > 8, "CONFIGURE_MEM_SLOTS beyond the 8 of SET_MEM_TABLE: {slots}");
    let files: Vec<File> = (0..32).map(|_| memfd(1 << 16)).collect();
    let region = |i: usize| VhostUserMemoryRegionInfo {
        guest_phys_addr: (i as u64) << 20,
        memory_size: 1 << 16,
        userspace_addr: 0x7000_0000 + ((i as u64) << 20),
        mmap_offset: 0,
        mmap_handle: files[i].as_raw_fd(),
    };
    for i in 0..32 {
        f.add_mem_region(&region(i)).unwrap();
    }
    let regions = || sw.ports().unwrap()[0].device.mem_regions;
    assert_eq!(regions(), 32);
    for i in 0..8 {
        f.remove_mem_region(&region(i)).unwrap();
    }
    assert_eq!(regions(), 24);
    // Removing a region that is not there is refused, and the table is unchanged.
    assert!(f.remove_mem_region(&region(3)).is_err());
    // Overlapping regions are refused.
    let overlap = VhostUserMemoryRegionInfo { guest_phys_addr: (10 << 20) + 4096, ..region(10) };
    assert!(f.add_mem_region(&overlap).is_err());
    // A region larger than its file is refused (it would SIGBUS the switch on access).
    let big = VhostUserMemoryRegionInfo {
        guest_phys_addr: 100 << 20,
        memory_size: 1 << 20,
        userspace_addr: 0x9000_0000,
        ..region(0)
    };
    assert!(f.add_mem_region(&big).is_err());
    assert_eq!(regions(), 24);
    drop(f);
    assert!(wait_until(Duration::from_secs(5), || regions() == 0), "disconnect unmaps guest memory");
}

/// QEMU 7.2 enables rings (when the guest driver attaches its queues) before it sends
/// SET_FEATURES; the rings must still start once the frontend has set them up.
#[test]
fn test_ring_enabled_before_set_features_starts_running() {
    use vhost::vhost_user::message::VhostUserHeaderFlag;
    use vhost::VringConfigData;
    use vmm_sys_util::eventfd::EventFd;

    let dir = Scratch::new("proto-enable-early");
    let sw = switch(&dir, &["a"]);
    let raw = UnixStream::connect(dir.path("a.sock")).unwrap();
    let mut f = Frontend::from_stream(raw.try_clone().unwrap(), 2);
    f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    f.set_owner().unwrap();
    let feats = f.get_features().unwrap();
    let pf = f.get_protocol_features().unwrap();
    f.set_protocol_features(pf).unwrap();
    // SET_VRING_ENABLE (18) for both rings, before SET_FEATURES, asking for a reply.
    for q in 0..2u32 {
        let mut body = q.to_le_bytes().to_vec();
        body.extend(1u32.to_le_bytes());
        send_raw(&raw, 18, 1 | 0x8, 8, &body, &[]);
        let mut reply = [0u8; 20];
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (&raw).read_exact(&mut reply).unwrap();
        assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 18);
        assert_eq!(u64::from_le_bytes(reply[12..20].try_into().unwrap()), 0, "enable acked as success");
    }
    f.set_features(feats & (F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | NET_F_MRG_RXBUF)).unwrap();
    let mem = memfd(1 << 20);
    // SAFETY: mapping our own memfd for the frontend's view of guest memory.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            1 << 20,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mem.as_raw_fd(),
            0,
        )
    } as u64;
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 1 << 20,
        userspace_addr: base,
        mmap_offset: 0,
        mmap_handle: mem.as_raw_fd(),
    };
    f.set_mem_table(&[region]).unwrap();
    let kicks: Vec<EventFd> = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
    for (q, kick) in kicks.iter().enumerate() {
        let off = base + (q as u64) * 0x10000;
        f.set_vring_num(q, 256).unwrap();
        f.set_vring_base(q, 0).unwrap();
        let cfg = VringConfigData {
            queue_max_size: 256,
            queue_size: 256,
            flags: 0,
            desc_table_addr: off,
            used_ring_addr: off + 0x2000,
            avail_ring_addr: off + 0x1000,
            log_addr: None,
        };
        f.set_vring_addr(q, &cfg).unwrap();
        f.set_vring_kick(q, kick).unwrap();
    }
    let running = sw.ports().unwrap()[0].device.running_queues.clone();
    assert_eq!(running, vec![0, 1], "rings enabled before SET_FEATURES run once set up");
}

/// Reads one reply (header + `body` bytes) within 1 s.
fn reply_within_1s(s: &UnixStream, body: usize) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut r = vec![0u8; 12 + body];
    (&*s).read_exact(&mut r).ok().map(|_| r)
}

/// Requests the vhost crate and the switch each answer must agree on when a reply is owed:
/// a refused SET_PROTOCOL_FEATURES still turns REPLY_ACK on for both, and a GET_VRING_BASE of
/// a queue that does not exist is answered (the frontend would wait for ever otherwise).
#[test]
fn test_every_request_that_owes_a_reply_gets_one() {
    let dir = Scratch::new("proto-replies");
    let sw = switch(&dir, &["a"]);
    let raw = UnixStream::connect(dir.path("a.sock")).unwrap();
    send_raw(&raw, 3, 1, 0, &[], &[]); // SET_OWNER
    send_raw(&raw, 1, 1, 0, &[], &[]); // GET_FEATURES
    reply_within_1s(&raw, 8).expect("features");
    // SET_PROTOCOL_FEATURES: REPLY_ACK plus a bit never offered, asking for a reply.
    let bits = VhostUserProtocolFeatures::REPLY_ACK.bits() | (1 << 40);
    send_raw(&raw, 16, 1 | 0x8, 8, &bits.to_le_bytes(), &[]);
    let r = reply_within_1s(&raw, 8).expect("SET_PROTOCOL_FEATURES answered");
    assert_eq!(u64::from_le_bytes(r[12..20].try_into().unwrap()), 1, "refused");
    // SET_VRING_ENABLE with NEED_REPLY: the switch answers it itself, by the same rule.
    let mut body = 0u32.to_le_bytes().to_vec();
    body.extend(1u32.to_le_bytes());
    send_raw(&raw, 18, 1 | 0x8, 8, &body, &[]);
    let r = reply_within_1s(&raw, 8).expect("SET_VRING_ENABLE answered");
    assert_eq!(u32::from_le_bytes(r[0..4].try_into().unwrap()), 18);
    // GET_VRING_BASE (11) of queue 99.
    let mut body = 99u32.to_le_bytes().to_vec();
    body.extend(0u32.to_le_bytes());
    send_raw(&raw, 11, 1, 8, &body, &[]);
    let r = reply_within_1s(&raw, 8).expect("GET_VRING_BASE of a missing queue answered");
    assert_eq!(u32::from_le_bytes(r[0..4].try_into().unwrap()), 11);
    assert!(sw.ports().unwrap()[0].device.protocol_errors >= 2);
    let bits = (VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::BACKEND_REQ).bits();
    send_raw(&raw, 16, 1 | 0x8, 8, &bits.to_le_bytes(), &[]);
    let r = reply_within_1s(&raw, 8).expect("SET_PROTOCOL_FEATURES answered");
    assert_eq!(u64::from_le_bytes(r[12..20].try_into().unwrap()), 0);
    // SET_BACKEND_REQ_FD (21) with a datagram socket: refused, the connection kept.
    let (d1, _d2) = std::os::unix::net::UnixDatagram::pair().unwrap();
    send_raw(&raw, 21, 1 | 0x8, 0, &[], &[d1.as_raw_fd()]);
    let r = reply_within_1s(&raw, 8).expect("SET_BACKEND_REQ_FD answered");
    assert_eq!(u64::from_le_bytes(r[12..20].try_into().unwrap()), 1, "a datagram socket is refused");
    send_raw(&raw, 1, 1, 0, &[], &[]);
    reply_within_1s(&raw, 8).expect("still served");
}
