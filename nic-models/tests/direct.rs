//! Level 2 direct queue pairs against a mock guest: the device takes a guest's rings over at a
//! ring state, moves frames both ways, enforces its source policy and rate, and hands the
//! rings back after quiesce and drain with every descriptor completed exactly once.

use std::cell::RefCell;

use nic_models::direct::{AnySource, DirectPair, PairSetup, Phase, Wire};
use nic_models::rxq::RxDrop;
use shaping::RateLimiter;
use virtq::mock::{MockGuest, MockRing};
use virtq::ring::DESC_F_WRITE;
use virtq::{RingHandoff, RingState, SplitRing};

const HDR: usize = 12;
const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xa];

/// A frame from `src` whose payload says `n`.
fn frame(src: [u8; 6], n: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 0xb]);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14..18].copy_from_slice(&n.to_be_bytes());
    f
}

fn seq(f: &[u8]) -> u32 {
    u32::from_be_bytes(f[14..18].try_into().unwrap())
}

/// A guest with a TX and an RX ring of 64 entries.
struct Guest {
    g: MockGuest,
    tx: MockRing,
    rx: MockRing,
}

impl Guest {
    fn new() -> Guest {
        let mut g = MockGuest::new(4 << 20);
        let (tx, rx) = (g.ring(64), g.ring(64));
        Guest { g, tx, rx }
    }

    /// Posts `f` (behind a zero header) for transmit; the head.
    fn send(&mut self, f: &[u8]) -> u16 {
        let b = self.g.alloc((HDR + f.len()) as u64, 16);
        let mut buf = vec![0u8; HDR];
        buf.extend_from_slice(f);
        self.g.write(b, &buf);
        self.tx.add_chain(&self.g, &[(b, buf.len() as u32, 0)])
    }

    /// Posts a 2 KiB receive buffer; (head, address).
    fn post(&mut self) -> (u16, u64) {
        let b = self.g.alloc(2048, 64);
        (self.rx.add_chain(&self.g, &[(b, 2048, DESC_F_WRITE)]), b)
    }

    fn setup(&self, rx: RingState, tx: RingState) -> PairSetup {
        PairSetup {
            rx: RingHandoff { addrs: self.rx.addrs(), size: 64, state: rx, event_idx: false },
            tx: RingHandoff { addrs: self.tx.addrs(), size: 64, state: tx, event_idx: false },
            hdr_len: HDR as u32,
            mergeable: true,
            indirect: true,
        }
    }

    fn plug(&self, rx: RingState, tx: RingState) -> DirectPair {
        DirectPair::plug(self.g.dma(), self.g.dma(), &self.setup(rx, tx)).expect("plug")
    }
}

/// The software path's side of a ring: resume at a handed-back state, take and complete.
fn software_tx(g: &Guest, h: &RingHandoff, out: &mut Vec<u32>) -> RingState {
    let mut dma = g.g.dma();
    let mut ring = SplitRing::new(&mut dma, h.addrs, u32::from(h.size), h.state.last_avail, false).unwrap();
    assert_eq!(ring.state(), h.state, "the used index agrees with the hand-back");
    while ring.avail_pending().unwrap() > 0 {
        let head = ring.pop_head();
        let d = ring.desc(head);
        let f = g.g.read(d.addr, d.len as usize);
        out.push(seq(&f[HDR..]));
        ring.push_used(head, 0);
    }
    ring.publish_used();
    ring.state()
}

#[test]
fn plugged_mid_stream_the_device_moves_frames_both_ways_and_hands_back_exactly_where_it_stopped() {
    let mut gu = Guest::new();
    // The software path has already handled 5 transmits and 3 receive buffers.
    for n in 0..5 {
        gu.send(&frame(A, n, 60));
    }
    let mut before = Vec::new();
    let tx0 =
        software_tx(&gu, &RingHandoff { addrs: gu.tx.addrs(), size: 64, ..Default::default() }, &mut before);
    assert_eq!(before, vec![0, 1, 2, 3, 4]);
    assert_eq!(gu.tx.take_used(&gu.g).len(), 5);
    let mut bufs = Vec::new();
    for _ in 0..6 {
        bufs.push(gu.post());
    }
    let mut dev = gu.g.dma();
    let mut sw = SplitRing::new(&mut dev, gu.rx.addrs(), 64, 0, false).unwrap();
    for _ in 0..3 {
        let h = sw.pop_head();
        sw.push_used(h, 0);
    }
    sw.publish_used();
    let rx0 = sw.state();
    assert_eq!(rx0, RingState { last_avail: 3, used_idx: 3 });
    gu.rx.take_used(&gu.g);

    // Plug at those states: the device owns both rings from here.
    let mut pair = gu.plug(rx0, tx0);
    for n in 5..15 {
        gu.send(&frame(A, n, 100));
    }
    let wire = RefCell::new(Vec::new());
    let mut put = |f: Vec<u8>| {
        wire.borrow_mut().push(seq(&f[HDR..]));
        Ok(())
    };
    let (fetched, done, _, miss) = pair.poll_tx(32, &AnySource, None, 0, &mut put).unwrap();
    assert_eq!((fetched, done, miss), (10, 10, None));
    assert_eq!(*wire.borrow(), (5..15).collect::<Vec<_>>());
    let used: Vec<u32> = gu.tx.take_used(&gu.g).iter().map(|u| u.0).collect();
    assert_eq!(used, (5..15).collect::<Vec<u32>>(), "the device completed the guest's chains in order");
    // Two frames arrive for the guest: into its 4th and 5th posted buffers, no CPU copy.
    for n in [100u32, 101] {
        pair.receive(&[0; 12], &[&frame([2; 6], n, 80)]).unwrap();
    }
    pair.publish_rx();
    let got = gu.rx.take_used(&gu.g);
    assert_eq!(got, vec![(bufs[3].0 as u32, 92), (bufs[4].0 as u32, 92)]);
    assert_eq!(seq(&gu.g.read(bufs[3].1 + HDR as u64, 80)), 100);
    assert_eq!(pair.rx.counters.cpu_copies + pair.tx.counters.cpu_copies, 0);

    // More transmits posted; the guest's frames keep coming while the port is unplugged.
    for n in 15..20 {
        gu.send(&frame(A, n, 100));
    }
    pair.quiesce();
    assert_eq!(pair.phase(), Phase::Quiesced);
    assert_eq!(pair.receive(&[0; 12], &[&frame([2; 6], 102, 80)]), Err(RxDrop::Quiesced));
    assert_eq!(pair.poll_tx(32, &AnySource, None, 0, &mut put).unwrap(), (0, 0, false, None));
    let d = pair.drain(&mut put);
    assert_eq!(d.tx_completed, 0);
    let (rxh, txh, ledger) = pair.hand_back().ok().expect("drained");
    assert!(ledger.balanced(), "{ledger:?}");
    assert_eq!((ledger.tx_taken, ledger.rx_taken), (10, 2));
    assert_eq!(rxh.state, RingState { last_avail: 5, used_idx: 5 });
    assert_eq!(txh.state, RingState { last_avail: 15, used_idx: 15 });
    // The software path resumes exactly there: 15..20, none lost, none twice.
    let mut after = Vec::new();
    software_tx(&gu, &txh, &mut after);
    assert_eq!(after, (15..20).collect::<Vec<_>>());
    let mut all: Vec<u32> = before.into_iter().chain(wire.into_inner()).chain(after).collect();
    all.dedup();
    assert_eq!(all, (0..20).collect::<Vec<_>>());
}

#[test]
fn frames_in_flight_are_drained_before_the_rings_go_back() {
    let mut gu = Guest::new();
    let mut pair = gu.plug(RingState::default(), RingState::default());
    for n in 0..6 {
        gu.send(&frame(A, n, 64));
    }
    // The wire takes two, then is full: four frames stay in the device's FIFO, in flight.
    let taken = RefCell::new(Vec::new());
    let mut busy = |f: Vec<u8>| {
        if taken.borrow().len() < 2 {
            taken.borrow_mut().push(seq(&f[HDR..]));
            Ok(())
        } else {
            Err(Wire::Full(f))
        }
    };
    let (fetched, done, ..) = pair.poll_tx(32, &AnySource, None, 0, &mut busy).unwrap();
    assert_eq!((fetched, done, pair.tx.in_flight()), (6, 2, 4));
    assert_eq!(gu.tx.take_used(&gu.g).len(), 2, "only what left is completed");
    pair.quiesce();
    // Not drained: hand back refuses (the four would be lost).
    let mut pair = *pair.hand_back().expect_err("in flight: refused");
    let mut open = |f: Vec<u8>| {
        taken.borrow_mut().push(seq(&f[HDR..]));
        Ok(())
    };
    let d = pair.drain(&mut open);
    assert_eq!(d.tx_completed, 4);
    assert!(d.tx_irq, "the guest (which does not suppress interrupts) is owed one for the four");
    assert_eq!(*taken.borrow(), vec![0, 1, 2, 3, 4, 5], "all sent, in order");
    let (_, txh, ledger) = pair.hand_back().ok().expect("drained");
    assert!(ledger.balanced() && ledger.tx_taken == 6, "{ledger:?}");
    assert_eq!(txh.state, RingState { last_avail: 6, used_idx: 6 });
    assert_eq!(gu.tx.take_used(&gu.g).len(), 4);
}

#[test]
fn the_device_enforces_the_source_policy_and_completes_what_it_refuses() {
    let mut gu = Guest::new();
    let mut pair = gu.plug(RingState::default(), RingState::default());
    let only_a = |f: &[u8]| if f[6..12] == A { Ok(()) } else { Err("mac") };
    gu.send(&frame(A, 1, 64));
    gu.send(&frame([0x52, 0x54, 0, 0, 0, 0xee], 2, 64));
    gu.send(&frame(A, 3, 64));
    let wire = RefCell::new(Vec::new());
    let mut put = |f: Vec<u8>| {
        wire.borrow_mut().push(seq(&f[HDR..]));
        Ok(())
    };
    let (fetched, done, ..) = pair.poll_tx(32, &only_a, None, 0, &mut put).unwrap();
    assert_eq!((fetched, done), (3, 3));
    assert_eq!(*wire.borrow(), vec![1, 3], "the spoofed frame never reached the wire");
    assert_eq!(pair.counters.spoofed, 1);
    assert_eq!(gu.tx.take_used(&gu.g).len(), 3, "its buffer went back to the guest");
}

#[test]
fn over_rate_frames_wait_in_the_guests_ring_until_the_rate_has_room() {
    let mut gu = Guest::new();
    let mut pair = gu.plug(RingState::default(), RingState::default());
    // 8 Mbit/s (1 MB/s), a 1,000-byte bucket: one 1,000-byte frame now, the next 1 ms later.
    let mut rate = RateLimiter::bits(8_000_000, 1000).unwrap().starting_at(0);
    for n in 0..3 {
        gu.send(&frame(A, n, 1000));
    }
    let wire = RefCell::new(Vec::new());
    let mut put = |f: Vec<u8>| {
        wire.borrow_mut().push(seq(&f[HDR..]));
        Ok(())
    };
    let (fetched, ..) = pair.poll_tx(32, &AnySource, Some(&mut rate), 0, &mut put).unwrap();
    assert_eq!(fetched, 1);
    assert_eq!(pair.counters.shaped, 1);
    assert_eq!(gu.tx.take_used(&gu.g).len(), 1, "the others are still the guest's, posted");
    let (fetched, ..) = pair.poll_tx(32, &AnySource, Some(&mut rate), 1_000_000, &mut put).unwrap();
    assert_eq!(fetched, 1);
    let (fetched, ..) = pair.poll_tx(32, &AnySource, Some(&mut rate), 2_000_000, &mut put).unwrap();
    assert_eq!(fetched, 1);
    assert_eq!(*wire.borrow(), vec![0, 1, 2], "nothing dropped, only delayed");
}

#[test]
fn a_hostile_transmit_chain_is_a_dma_fault_and_nothing_outside_the_guest_is_read() {
    let mut gu = Guest::new();
    let mut pair = gu.plug(RingState::default(), RingState::default());
    // Outside the guest's memory, a device-writable buffer, and one too short for a frame.
    gu.tx.add_chain(&gu.g, &[(8 << 20, 100, 0)]);
    let b = gu.g.alloc(128, 16);
    gu.tx.add_chain(&gu.g, &[(b, 100, DESC_F_WRITE)]);
    gu.tx.add_chain(&gu.g, &[(b, 8, 0)]);
    gu.send(&frame(A, 7, 64));
    let wire = RefCell::new(Vec::new());
    let mut put = |f: Vec<u8>| {
        wire.borrow_mut().push(seq(&f[HDR..]));
        Ok(())
    };
    let (fetched, done, ..) = pair.poll_tx(32, &AnySource, None, 0, &mut put).unwrap();
    assert_eq!((fetched, done), (4, 4));
    assert_eq!(*wire.borrow(), vec![7], "only the good frame left");
    assert_eq!(pair.counters.tx_faults, 3);
    assert_eq!(pair.tx.counters.dma_faults, 2);
    let used = gu.tx.take_used(&gu.g);
    assert_eq!(used.len(), 4, "every chain went back: {used:?}");
    pair.quiesce();
    pair.drain(&mut put);
    assert!(pair.hand_back().ok().expect("drained").2.balanced());
}
