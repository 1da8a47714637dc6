//! Control-plane tests of the frontend against a scripted in-process backend
//! (the vhost crate's backend request handler around a recording mock), plus
//! the timeout and error paths. No DPDK needed.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, BackendReqHandler, Error as VuError, GpuBackend, Result as VuResult,
    VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vswitch_bench::frontend::{
    Error, Frontend, FrontendConfig, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

/// Records every request; answers from its configuration.
struct Mock {
    features: u64,
    protocol: VhostUserProtocolFeatures,
    queue_num: u64,
    log: Vec<String>,
    acked_features: u64,
    acked_protocol: u64,
    /// (gpa, size, user_addr, mmap_offset) and the memfd.
    region: Option<(u64, u64, u64, u64, File)>,
    /// Per vring: (desc, used, avail) addresses.
    addrs: Vec<(u32, u64, u64, u64)>,
    enabled: Vec<u32>,
    kick_fds: usize,
    call_fds: usize,
}

impl Mock {
    fn new(features: u64, protocol: VhostUserProtocolFeatures) -> Mock {
        Mock {
            features,
            protocol,
            queue_num: 4,
            log: Vec::new(),
            acked_features: 0,
            acked_protocol: 0,
            region: None,
            addrs: Vec::new(),
            enabled: Vec::new(),
            kick_fds: 0,
            call_fds: 0,
        }
    }

    fn full() -> Mock {
        Mock::new(
            VIRTIO_F_VERSION_1
                | VIRTIO_NET_F_MRG_RXBUF
                | VIRTIO_RING_F_EVENT_IDX
                | VIRTIO_RING_F_INDIRECT_DESC
                | VIRTIO_NET_F_MAC
                | VIRTIO_NET_F_MQ
                | VHOST_USER_F_PROTOCOL_FEATURES,
            VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::STATUS,
        )
    }

    fn rec(&mut self, s: impl Into<String>) {
        self.log.push(s.into());
    }
}

fn unsupported<T>() -> VuResult<T> {
    Err(VuError::InvalidOperation("not supported by the mock"))
}

impl VhostUserBackendReqHandlerMut for Mock {
    fn set_owner(&mut self) -> VuResult<()> {
        self.rec("SET_OWNER");
        Ok(())
    }
    fn reset_owner(&mut self) -> VuResult<()> {
        unsupported()
    }
    fn reset_device(&mut self) -> VuResult<()> {
        unsupported()
    }
    fn get_features(&mut self) -> VuResult<u64> {
        self.rec("GET_FEATURES");
        Ok(self.features)
    }
    fn set_features(&mut self, features: u64) -> VuResult<()> {
        self.rec("SET_FEATURES");
        self.acked_features = features;
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        mut files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        self.rec("SET_MEM_TABLE");
        assert_eq!(ctx.len(), 1);
        let r = ctx[0];
        self.region = Some((r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset, files.remove(0)));
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        self.rec(format!("SET_VRING_NUM {index} {num}"));
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        self.rec(format!("SET_VRING_ADDR {index}"));
        self.addrs.push((index, descriptor, used, available));
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.rec(format!("SET_VRING_BASE {index} {base}"));
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.rec(format!("GET_VRING_BASE {index}"));
        Ok(VhostUserVringState::new(index, 100 + index))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.rec(format!("SET_VRING_KICK {index}"));
        self.kick_fds += usize::from(fd.is_some());
        Ok(())
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.rec(format!("SET_VRING_CALL {index}"));
        self.call_fds += usize::from(fd.is_some());
        Ok(())
    }
    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> VuResult<()> {
        unsupported()
    }
    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        self.rec("GET_PROTOCOL_FEATURES");
        Ok(self.protocol)
    }
    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.rec("SET_PROTOCOL_FEATURES");
        self.acked_protocol = features;
        Ok(())
    }
    fn get_queue_num(&mut self) -> VuResult<u64> {
        self.rec("GET_QUEUE_NUM");
        Ok(self.queue_num)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.rec(format!("SET_VRING_ENABLE {index} {}", u8::from(enable)));
        if enable {
            self.enabled.push(index);
        }
        Ok(())
    }
    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        self.rec(format!("GET_CONFIG {offset} {size}"));
        let mut space = MAC.to_vec();
        space.resize(64, 0);
        Ok(space[offset as usize..(offset + size) as usize].to_vec())
    }
    fn set_config(&mut self, _o: u32, _b: &[u8], _f: VhostUserConfigFlags) -> VuResult<()> {
        unsupported()
    }
    fn set_backend_req_fd(&mut self, _backend: Backend) {}
    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        unsupported()
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        unsupported()
    }
    fn get_inflight_fd(&mut self, _inflight: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        unsupported()
    }
    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        unsupported()
    }
    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        self.rec("GET_MAX_MEM_SLOTS");
        Ok(8)
    }
    fn add_mem_region(
        &mut self,
        r: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        self.rec("ADD_MEM_REG");
        self.region = Some((r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset, fd));
        Ok(None)
    }
    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        unsupported()
    }
    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        unsupported()
    }
    fn check_device_state(&mut self) -> VuResult<()> {
        unsupported()
    }
    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        unsupported()
    }
    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        unsupported()
    }
}

/// Serves `stream` with `mock` until the frontend hangs up.
fn serve(stream: UnixStream, mock: Arc<Mutex<Mock>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut h = BackendReqHandler::from_stream(stream, mock);
        while h.handle_request().is_ok() {}
    })
}

fn start(mock: Mock, cfg: FrontendConfig) -> (Arc<Mutex<Mock>>, JoinHandle<()>, Result<Frontend, Error>) {
    let (fe_sock, be_sock) = UnixStream::pair().expect("socketpair");
    let mock = Arc::new(Mutex::new(mock));
    let h = serve(be_sock, mock.clone());
    let fe = Frontend::from_stream(fe_sock, cfg);
    (mock, h, fe)
}

/// Reads a u16 at `uva` of the frontend's region through the backend's own
/// mapping of the memfd, as a real backend would.
fn backend_read_u16(region: &(u64, u64, u64, u64, File), uva: u64) -> u16 {
    let (_, size, user_addr, off, ref file) = *region;
    assert!(uva >= user_addr && uva + 2 <= user_addr + size, "{uva:#x} outside region");
    // SAFETY: fresh read-only shared mapping of the memfd; unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            off as libc::off_t,
        );
        assert_ne!(p, libc::MAP_FAILED);
        let v = std::ptr::read_volatile(p.cast::<u8>().add((uva - user_addr) as usize).cast::<u16>());
        libc::munmap(p, size as usize);
        v
    }
}

#[test]
fn full_negotiation_with_mem_slots_and_config() {
    let cfg = FrontendConfig {
        queue_pairs: 2,
        ring_size: 64,
        event_idx: true,
        gpa_base: 0x8000_0000,
        ..FrontendConfig::default()
    };
    let (mock, server, fe) = start(Mock::full(), cfg);
    let mut fe = fe.expect("setup");
    assert_eq!(fe.mac(), Some(MAC));
    assert_eq!(fe.hdr_len(), 12);
    let f = fe.negotiated_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_NET_F_MQ,
        VHOST_USER_F_PROTOCOL_FEATURES,
    ] {
        assert_ne!(f & bit, 0, "feature {bit:#x} not negotiated");
    }
    assert_eq!(f & VIRTIO_RING_F_INDIRECT_DESC, 0, "indirect not requested");
    let expect_proto = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    assert_eq!(fe.protocol_features(), expect_proto.bits(), "STATUS must not be acked");

    assert_eq!(fe.stop().expect("stop"), vec![100, 101, 102, 103]);
    let (gpa, len) = fe.guest_region();
    {
        let m = mock.lock().unwrap();
        assert_eq!(m.acked_features, f);
        assert_eq!(m.acked_protocol, expect_proto.bits());
        let mut expect: Vec<String> = [
            "SET_OWNER",
            "GET_FEATURES",
            "GET_PROTOCOL_FEATURES",
            "SET_PROTOCOL_FEATURES",
            "GET_QUEUE_NUM",
            "SET_FEATURES",
            "GET_CONFIG 0 6",
            "GET_MAX_MEM_SLOTS",
            "ADD_MEM_REG",
        ]
        .map(String::from)
        .to_vec();
        for i in 0..4 {
            expect.extend([
                format!("SET_VRING_NUM {i} 64"),
                format!("SET_VRING_BASE {i} 0"),
                format!("SET_VRING_ADDR {i}"),
                format!("SET_VRING_KICK {i}"),
                format!("SET_VRING_CALL {i}"),
            ]);
        }
        expect.extend((0..4).map(|i| format!("SET_VRING_ENABLE {i} 1")));
        expect.extend((0..4).map(|i| format!("GET_VRING_BASE {i}")));
        assert_eq!(m.log, expect);
        assert_eq!((m.kick_fds, m.call_fds), (4, 4));

        // One region: our gpa base, the whole memfd, userspace address = our VA.
        let region = m.region.as_ref().expect("memory registered");
        assert_eq!((region.0, region.1, region.3), (gpa, len, 0));
        // Vring addresses are our VAs inside the region; the RX rings were
        // published full (avail.idx = ring size), the TX rings empty.
        for &(i, desc, used, avail) in &m.addrs {
            for a in [desc, used, avail] {
                assert!(a >= region.2 && a < region.2 + region.1);
            }
            assert_eq!(desc % 16, 0);
            assert_eq!(used % 4, 0);
            let idx = backend_read_u16(region, avail + 2);
            assert_eq!(idx, if i % 2 == 0 { 64 } else { 0 }, "avail.idx of vring {i}");
        }
    }
    drop(fe);
    server.join().expect("server thread");
}

#[test]
fn set_mem_table_when_mem_slots_disabled() {
    let cfg = FrontendConfig { mem_slots: false, ..FrontendConfig::default() };
    let (mock, server, fe) = start(Mock::full(), cfg);
    let fe = fe.expect("setup");
    {
        let m = mock.lock().unwrap();
        assert!(m.log.iter().any(|s| s == "SET_MEM_TABLE"));
        assert!(!m.log.iter().any(|s| s == "ADD_MEM_REG" || s == "GET_MAX_MEM_SLOTS"));
        assert_eq!(fe.protocol_features() & VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS.bits(), 0);
    }
    drop(fe);
    server.join().unwrap();
}

#[test]
fn legacy_backend_without_protocol_features() {
    let mock = Mock::new(VIRTIO_NET_F_MAC, VhostUserProtocolFeatures::empty());
    let (mock, server, fe) = start(mock, FrontendConfig::default());
    let fe = fe.expect("setup");
    assert_eq!(fe.negotiated_features(), VIRTIO_NET_F_MAC);
    assert_eq!(fe.hdr_len(), 10, "no VERSION_1, no MRG_RXBUF");
    assert_eq!(fe.mac(), None, "no CONFIG protocol feature");
    // Without REPLY_ACK, set-type requests are not acknowledged: wait for the
    // backend to drain the socket before looking at what it saw.
    drop(fe);
    server.join().unwrap();
    {
        let m = mock.lock().unwrap();
        assert!(!m.log.iter().any(|s| s.starts_with("SET_VRING_ENABLE")));
        assert!(!m.log.iter().any(|s| s.contains("PROTOCOL")));
        assert!(m.log.iter().any(|s| s == "SET_MEM_TABLE"));
        assert_eq!(m.log.last().map(String::as_str), Some("SET_VRING_CALL 1"));
    }

    // More than one queue pair needs MQ.
    let mock = Mock::new(VIRTIO_F_VERSION_1, VhostUserProtocolFeatures::empty());
    let cfg = FrontendConfig { queue_pairs: 2, ..FrontendConfig::default() };
    let (_mock, server, fe) = start(mock, cfg);
    assert!(matches!(fe, Err(Error::Unsupported(_))), "{:?}", fe.err());
    server.join().unwrap();
}

#[test]
fn too_many_queue_pairs_rejected() {
    let mut mock = Mock::full();
    mock.queue_num = 2;
    let cfg = FrontendConfig { queue_pairs: 3, ..FrontendConfig::default() };
    let (_mock, server, fe) = start(mock, cfg);
    let e = fe.err().expect("must fail");
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    server.join().unwrap();
}

#[test]
fn invalid_configurations() {
    let bad = [
        FrontendConfig { ring_size: 100, ..FrontendConfig::default() },
        FrontendConfig { queue_pairs: 0, ..FrontendConfig::default() },
        FrontendConfig { rx_buf_size: 8, ..FrontendConfig::default() },
    ];
    for cfg in bad {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(matches!(Frontend::from_stream(a, cfg), Err(Error::Config(_))));
    }
    let (a, _b) = UnixStream::pair().unwrap();
    let small = FrontendConfig { mem_size: 1 << 20, ..FrontendConfig::default() };
    assert!(matches!(Frontend::from_stream(a, small), Err(Error::MemoryTooSmall { .. })));
}

fn temp_sock(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fe-mock-{}-{name}.sock", std::process::id()))
}

#[test]
fn connect_gives_up_after_timeout() {
    let path = temp_sock("absent");
    let t = Instant::now();
    let e = Frontend::connect(&path, FrontendConfig::default(), Duration::from_millis(200))
        .err()
        .expect("nobody listens");
    assert!(matches!(e, Error::ConnectTimeout { .. }), "{e}");
    let el = t.elapsed();
    assert!(el >= Duration::from_millis(200) && el < Duration::from_secs(2), "{el:?}");
}

#[test]
fn silent_backend_hits_control_timeout() {
    let path = temp_sock("silent");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let cfg = FrontendConfig { control_timeout: Duration::from_millis(200), ..FrontendConfig::default() };
    let t = Instant::now();
    let e = Frontend::connect(&path, cfg, Duration::from_secs(1)).err().expect("no replies");
    assert!(matches!(e, Error::ControlTimeout { request: "GET_FEATURES", .. }), "{e}");
    let el = t.elapsed();
    assert!(el >= Duration::from_millis(200) && el < Duration::from_secs(2), "{el:?}");
    drop(listener);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn server_mode_accepts_backend() {
    let path = temp_sock("server");
    let p2 = path.clone();
    let fe = thread::spawn(move || {
        Frontend::listen_accept(&p2, FrontendConfig::default(), Duration::from_secs(5))
    });
    // The backend connects once the socket exists (bounded retry).
    let mock = Arc::new(Mutex::new(Mock::full()));
    let deadline = Instant::now() + Duration::from_secs(5);
    let stream = loop {
        match UnixStream::connect(&path) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("backend connect: {e}"),
        }
    };
    let server = serve(stream, mock.clone());
    let fe = fe.join().unwrap().expect("setup");
    assert_eq!(fe.mac(), Some(MAC));
    assert!(!path.exists(), "socket file removed once accepted");
    drop(fe);
    server.join().unwrap();

    // Nobody connects: bounded failure, socket file cleaned up.
    let t = Instant::now();
    let e = Frontend::listen_accept(&path, FrontendConfig::default(), Duration::from_millis(100))
        .err()
        .expect("no backend");
    assert!(matches!(e, Error::ConnectTimeout { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(!path.exists());
}
