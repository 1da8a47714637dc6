//! The Level 1 DMA engine against a mock guest: frames land in the guest's own posted buffers
//! with no CPU copy, and hostile buffers give DMA faults, never a write outside the guest.

use nic_models::rxq::{RxDrop, RxQueue};
use virtq::chain::ChainError;
use virtq::mock::{MockGuest, MockRing};
use virtq::ring::DESC_F_WRITE;
use virtq::RingState;

const HDR: u32 = 12;

fn queue(g: &MockGuest, r: &MockRing, mergeable: bool) -> RxQueue {
    RxQueue::new(g.dma(), r.addrs(), r.size as u32, RingState::default(), false, HDR, mergeable).unwrap()
}

fn frame(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 3) as u8).collect()
}

#[test]
fn a_frame_lands_in_the_guests_posted_buffer_with_no_cpu_copy() {
    let mut g = MockGuest::new(1 << 20);
    let mut r = g.ring(16);
    let buf = g.alloc(2048, 64);
    let head = r.add_chain(&g, &[(buf, 2048, DESC_F_WRITE)]);
    let mut q = queue(&g, &r, true);
    let f = frame(1000);
    let hdr = [1u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    q.receive(&hdr, &f).unwrap();
    assert!(r.take_used(&g).is_empty(), "nothing visible before publish");
    q.publish();
    assert_eq!(r.take_used(&g), vec![(head as u32, HDR + 1000)]);
    let got = g.read(buf, (HDR + 1000) as usize);
    assert_eq!(got[0], 1);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[12..], &f[..]);
    let c = q.counters;
    assert_eq!((c.packets, c.cpu_copies, c.dma_faults), (1, 0, 0));
    assert_eq!(c.bytes, 1012);
    // The frame and header (1012 bytes, 4 TLPs of 256), the used entry (1 TLP).
    assert_eq!(c.dma_write_bytes, 1012 + 8);
    assert_eq!(c.desc_fetches, 2);
    assert_eq!(c.desc_writebacks, 1);
    assert_eq!(q.state(), RingState { last_avail: 1, used_idx: 1 });
}

#[test]
fn a_large_frame_spans_mergeable_buffers_and_says_how_many() {
    let mut g = MockGuest::new(1 << 20);
    let mut r = g.ring(16);
    let bufs: Vec<u64> = (0..4).map(|_| g.alloc(2048, 64)).collect();
    let heads: Vec<u16> = bufs.iter().map(|&b| r.add_chain(&g, &[(b, 2048, DESC_F_WRITE)])).collect();
    let mut q = queue(&g, &r, true);
    let f = frame(5000);
    q.receive(&[0; 12], &f).unwrap();
    q.publish();
    let used = r.take_used(&g);
    assert_eq!(used, vec![(heads[0] as u32, 2048), (heads[1] as u32, 2048), (heads[2] as u32, 5012 - 4096)]);
    let first = g.read(bufs[0], 12);
    assert_eq!(u16::from_le_bytes([first[10], first[11]]), 3);
    let mut got = g.read(bufs[0], 2048)[12..].to_vec();
    got.extend(g.read(bufs[1], 2048));
    got.extend(g.read(bufs[2], 5012 - 4096));
    assert_eq!(got, f);
    // Without mergeable buffers the guest must post a buffer that fits; this one stays posted.
    let mut g = MockGuest::new(1 << 20);
    let mut r = g.ring(16);
    let b = g.alloc(2048, 64);
    r.add_chain(&g, &[(b, 2048, DESC_F_WRITE)]);
    let mut q = queue(&g, &r, false);
    assert_eq!(q.receive(&[0; 12], &f), Err(RxDrop::TooSmall));
    assert_eq!(q.state().last_avail, 0);
    q.receive(&[0; 12], &frame(100)).unwrap();
}

#[test]
fn a_64k_tso_frame_fills_43_of_linuxs_smallest_mergeable_buffers() {
    let mut g = MockGuest::new(4 << 20);
    let mut r = g.ring(256);
    let bufs: Vec<u64> = (0..64).map(|_| g.alloc(1536, 64)).collect();
    for &b in &bufs {
        r.add_chain(&g, &[(b, 1536, DESC_F_WRITE)]);
    }
    let mut q = queue(&g, &r, true);
    // A 12-byte header, an Ethernet header with a tag, a 65,535-byte IP datagram.
    let f = frame(18 + 65_535);
    q.receive(&[0; 12], &f).unwrap();
    q.publish();
    let used = r.take_used(&g);
    assert_eq!(used.len(), (12 + f.len()).div_ceil(1536));
    assert_eq!(used.len(), 43);
    let mut got = Vec::new();
    for (k, &(_, len)) in used.iter().enumerate() {
        got.extend(g.read(bufs[k], len as usize));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 43);
    assert_eq!(&got[12..], &f[..]);
}

#[test]
fn no_posted_buffer_is_a_counted_drop() {
    let mut g = MockGuest::new(1 << 20);
    let r = g.ring(16);
    let mut q = queue(&g, &r, true);
    assert_eq!(q.receive(&[0; 12], &frame(60)), Err(RxDrop::NoBuffer));
    assert_eq!(q.counters.no_buffer, 1);
    // Half a frame's worth of mergeable buffers: none taken.
    let mut g = MockGuest::new(1 << 20);
    let mut r = g.ring(16);
    let b = g.alloc(1024, 64);
    r.add_chain(&g, &[(b, 1024, DESC_F_WRITE)]);
    let mut q = queue(&g, &r, true);
    assert_eq!(q.receive(&[0; 12], &frame(1500)), Err(RxDrop::NoBuffer));
    assert_eq!(q.state().last_avail, 0);
}

#[test]
fn hostile_buffers_are_dma_faults_and_nothing_is_written_outside_the_guest() {
    // Guard pages right before and after guest memory: a stray write would crash the test.
    let (mut g, _guarded) = MockGuest::guarded(1 << 20);
    let mut r = g.ring(16);
    let size = 1u64 << 20;
    let good = g.alloc(2048, 64);
    let cases: [(u64, u32, u16, ChainError); 4] = [
        // Past the end of the guest (where another guest's memory would be on a real host).
        (size + 4096, 2048, DESC_F_WRITE, ChainError::BadAddress),
        // Straddling the end.
        (size - 1024, 2048, DESC_F_WRITE, ChainError::BadAddress),
        // A buffer the guest did not make writable.
        (good, 2048, 0, ChainError::WrongDirection),
        // Wrapping the address space.
        (u64::MAX - 100, 2048, DESC_F_WRITE, ChainError::BadAddress),
    ];
    let mut q = queue(&g, &r, true);
    for (i, &(addr, len, flags, want)) in cases.iter().enumerate() {
        let head = r.add_chain(&g, &[(addr, len, flags)]);
        assert_eq!(q.receive(&[0; 12], &frame(100)), Err(RxDrop::Fault(want)), "case {i}");
        q.publish();
        assert_eq!(r.take_used(&g), vec![(head as u32, 0)], "case {i}: returned empty");
    }
    assert_eq!(q.counters.dma_faults, 4);
    assert_eq!(q.counters.packets, 0);
    assert_eq!(g.read(good, 16), vec![0; 16], "the read-only buffer was not written");
    // The queue goes on with good buffers.
    r.add_chain(&g, &[(good, 2048, DESC_F_WRITE)]);
    q.receive(&[0; 12], &frame(100)).unwrap();
}

#[test]
fn a_guest_rewriting_its_descriptors_meanwhile_gets_faults_or_frames_never_a_stray_write() {
    let (mut g, _guarded) = MockGuest::guarded(1 << 20);
    let mut r = g.ring(256);
    let buf = g.alloc(4096, 64);
    let mut heads = Vec::new();
    for _ in 0..256 {
        heads.push(r.add_chain(&g, &[(buf, 2048, DESC_F_WRITE)]));
    }
    let mut q = queue(&g, &r, true);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let desc = r.desc;
    // The guest's memory file: a second view the other thread writes through.
    let file = g.file.try_clone().unwrap();
    std::thread::scope(|s| {
        let stop = &stop;
        s.spawn(move || {
            use std::os::unix::fs::FileExt;
            // The hostile guest flips every descriptor between a good buffer, one past its
            // memory, and a huge length.
            let mut k = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let i = k % 256;
                let (addr, len): (u64, u32) = match k % 3 {
                    0 => (buf, 2048),
                    1 => ((1 << 20) - 100, 2048),
                    _ => (buf, u32::MAX),
                };
                file.write_all_at(&addr.to_le_bytes(), desc + 16 * i).unwrap();
                file.write_all_at(&len.to_le_bytes(), desc + 16 * i + 8).unwrap();
                k += 1;
            }
        });
        let mut outcomes = [0u32; 2];
        for _ in 0..256 {
            match q.receive(&[0; 12], &frame(1500)) {
                Ok(()) => outcomes[0] += 1,
                Err(RxDrop::Fault(_)) => outcomes[1] += 1,
                Err(e) => panic!("unexpected {e}"),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(outcomes[0] + outcomes[1], 256);
        assert_eq!(u64::from(outcomes[1]), q.counters.dma_faults);
    });
}

#[test]
fn a_buffer_the_viommu_has_not_translated_yet_is_a_counted_miss_and_stays_posted() {
    use iommu::{Dma, Iotlb};
    use nic_models::{dma_rx, DeviceCounters, PcieCost, RxFormat, RxScratch};
    let mut g = MockGuest::new(1 << 20);
    let mut r = g.ring(16);
    let buf = g.alloc(2048, 64);
    let head = r.add_chain(&g, &[(buf, 2048, DESC_F_WRITE)]);
    // The ring was translated when it was plugged; the buffer's IOVA is not in the IOTLB yet.
    let mut ring = virtq::SplitRing::new(&mut g.dma(), r.addrs(), 16, 0, false).unwrap();
    let mut iova = Dma::iova(g.mem.clone(), Iotlb::new(64), 0, Default::default());
    let fmt = RxFormat { hdr_len: HDR, mergeable: true, indirect: true, cost: PcieCost::default() };
    let (mut s, mut c) = (RxScratch::default(), DeviceCounters::default());
    let f = frame(100);
    let got = dma_rx(&mut ring, &mut iova, &fmt, &mut s, &mut c, &[0; 12], &[&f]);
    assert_eq!(got, Err(RxDrop::Miss { iova: buf }));
    assert_eq!((c.iotlb_misses, c.iotlb_lookups, c.dma_faults, c.packets), (1, 1, 0, 0));
    // Nothing was taken: once translated (here: the guest-physical view), the same buffer
    // takes the frame.
    dma_rx(&mut ring, &mut g.dma(), &fmt, &mut s, &mut c, &[0; 12], &[&f]).unwrap();
    ring.publish_used();
    assert_eq!(r.take_used(&g), vec![(head as u32, HDR + 100)]);
}
