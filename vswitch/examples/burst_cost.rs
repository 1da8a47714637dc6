//! Cost of the burst, deterministically: two mock guests, port A sends 64-byte frames to port
//! B in bursts of 32, driven directly through `Datapath::poll_queue` on one thread.
//!
//! ```sh
//! cargo build --release -p vswitch --features test-utils --example burst_cost
//! valgrind --tool=callgrind --callgrind-out-file=cg.out target/release/examples/burst_cost 20000
//! callgrind_annotate --inclusive=yes cg.out | grep poll_queue   # Ir / packets = instructions per packet
//! ```
//! Without valgrind it prints TSC ticks per packet (warm caches, no cross-core traffic:
//! a lower bound for the real thing). A third argument `log` runs it with dirty logging on
//! (both guests migrating; the log cleared every 100 bursts, as a frontend's pre-copy pass
//! would): `burst_cost 1000000 1514 log`.

use std::sync::Arc;

use virtq::mock::{MockGuest, MockRing};
use virtq::ring::DESC_F_WRITE;
use vswitch::l2::{Fdb, VlanMode};
use vswitch::pmd::burst::Datapath;
use vswitch::pmd::ticks;
use vswitch::port::Port;
use vswitch::virtio::mock::MockQueue;

const RING: u16 = 256;
const BURST: usize = 32;

struct Side {
    g: MockGuest,
    tx: MockRing,
    rx: MockRing,
    tx_bufs: Vec<u64>,
    rx_bufs: Vec<u64>,
}

fn side(size: usize) -> Side {
    let mut g = MockGuest::new(8 << 20);
    let tx = g.ring(RING);
    let rx = g.ring(RING);
    let tx_bufs = (0..RING).map(|_| g.alloc(2048, 64)).collect();
    let rx_bufs = (0..RING).map(|_| g.alloc(2048, 64)).collect();
    let _ = size;
    Side { g, tx, rx, tx_bufs, rx_bufs }
}

fn main() {
    let packets: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let size: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(60);
    let mut a = side(size);
    let mut b = side(size);
    let fdb = Arc::new(Fdb::new(4096, 300));
    let mut dp = Datapath::new(0, fdb);
    let pa = Arc::new(Port::new(0, "a".into(), VlanMode::default(), [0x52, 0, 0, 0, 0, 1], 1));
    let pb = Arc::new(Port::new(1, "b".into(), VlanMode::default(), [0x52, 0, 0, 0, 0, 2], 1));
    *pa.txq[0].lock() = Some(a.tx.queue(&a.g, true).into());
    *pb.rxq[0].lock() = Some(b.rx.queue(&b.g, true).into());
    dp.add_port(pa.clone());
    dp.add_port(pb.clone());
    let log_file = (std::env::args().nth(3).as_deref() == Some("log")).then(|| {
        let f = sealed_memfd(4096);
        let log = Arc::new(vswitch::vhost::dirty_log::DirtyLog::map(&f, 4096, 0).expect("log"));
        for q in [pa.txq[0].lock().virtio_mut(), pb.rxq[0].lock().virtio_mut()].into_iter().flatten() {
            q.log = Some(log.clone());
        }
        (f, log)
    });
    // Frames A→B (B's MAC learned once by a frame from B is not needed: unknown unicast to
    // the only other port costs the same path).
    let mut frame = vec![0u8; 12 + size];
    frame[12..18].copy_from_slice(&[0x52, 0, 0, 0, 0, 2]);
    frame[18..24].copy_from_slice(&[0x52, 0, 0, 0, 0, 1]);
    frame[24..26].copy_from_slice(&[0x08, 0x00]);
    for &buf in &a.tx_bufs {
        a.g.write(buf, &frame);
    }
    let mut done = 0usize;
    let mut slot = 0usize;
    let mut busy = 0u64;
    while done < packets {
        for _ in 0..BURST {
            let i = slot % RING as usize;
            a.tx.add_chain(&a.g, &[(a.tx_bufs[i], frame.len() as u32, 0)]);
            b.rx.add_chain(&b.g, &[(b.rx_bufs[i], 2048, DESC_F_WRITE)]);
            slot += 1;
        }
        let t = ticks();
        let n = dp.poll_queue(&pa, 0, 1);
        busy += ticks() - t;
        assert_eq!(n, BURST);
        done += n;
        if let Some((f, _)) = &log_file {
            if (done / BURST) % 100 == 0 {
                std::os::unix::fs::FileExt::write_all_at(f, &[0u8; 4096], 0).expect("clear the log");
            }
        }
        a.tx.take_used(&a.g);
        let got = b.rx.take_used(&b.g).len();
        assert_eq!(got, BURST, "every packet delivered");
    }
    let s = pb.rxq[0].stats.snapshot();
    if let Some((_, log)) = &log_file {
        assert_eq!(log.beyond(), 0, "every mark inside the log");
        print!("dirty logging on: ");
    }
    println!(
        "{done} packets of {size} B: {:.1} ticks/packet in poll_queue; delivered {} copies {}",
        busy as f64 / done as f64,
        s.packets,
        s.copies
    );
}

/// A memfd of `len` bytes sealed against shrinking (what a dirty log must be).
fn sealed_memfd(len: u64) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"log".as_ptr(), libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a new fd we own.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(len).expect("size the log");
    // SAFETY: fcntl on our own fd.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) }, 0, "seal the log");
    f
}
