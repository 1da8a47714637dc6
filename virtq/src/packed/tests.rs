//! The packed ring against a mock driver: layouts, laps, out-of-order and held entries,
//! indirect tables, hostile drivers, event suppression, resuming from a token.

use super::*;
use crate::chain::{walk_chain, ChainError, MAX_SEGS};
use crate::mock::{MockGuest, MockPackedDevice, MockPackedRing};
use iommu::grant::Direction;
use iommu::Grant;

fn setup(size: u16, event_idx: bool) -> (MockGuest, MockPackedRing, MockPackedDevice) {
    let mut g = MockGuest::new(1 << 20);
    let r = g.packed_ring(size);
    let q = r.device(&g, event_idx);
    (g, r, q)
}

/// A xorshift64 generator from `seed` (not 0).
fn xorshift(mut rng: u64) -> impl FnMut() -> u64 {
    move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    }
}

/// Walks `head` as the datapath does: (guest-physical address, length) of each segment.
fn walk<D: Direction>(
    q: &mut MockPackedDevice,
    head: u16,
    indirect: bool,
) -> Result<Vec<(u64, u32)>, ChainError> {
    let mut segs = [Grant::<D>::default(); MAX_SEGS];
    let base = q.dma.mem().regions()[0].host() as u64;
    let c = walk_chain(&q.ring, &mut q.dma, head, indirect, 1 << 20, &mut segs)?;
    Ok(segs[..c.nseg as usize].iter().map(|s| (s.as_ptr() as u64 - base, s.len())).collect())
}

/// Descriptors written in rust-vmm's layout (`virtio_queue::desc::packed::Descriptor`, the
/// only part of the packed ring virtio-queue has) read back as written: a chain of two and a
/// single, their ids echoed in the used descriptors.
#[test]
fn test_descriptors_in_virtio_queues_layout() {
    use virtio_queue::desc::packed::Descriptor;
    use vm_memory::ByteValued;
    let (g, r, mut q) = setup(4, false);
    let on = DESC_F_AVAIL;
    for (slot, d) in [
        Descriptor::new(0x8000, 12, 7, on | DESC_F_NEXT),
        Descriptor::new(0x9000, 60, 7, on),
        Descriptor::new(0xa000, 100, 3, on),
    ]
    .iter()
    .enumerate()
    {
        g.write(r.desc + 16 * slot as u64, d.as_slice());
    }
    assert_eq!(q.ring.avail_pending().unwrap(), 2);
    let (h0, h1) = (q.ring.pop_head(), q.ring.pop_head());
    assert_eq!(walk::<iommu::Ro>(&mut q, h0, false).unwrap(), vec![(0x8000, 12), (0x9000, 60)]);
    assert_eq!(walk::<iommu::Ro>(&mut q, h1, false).unwrap(), vec![(0xa000, 100)]);
    q.ring.push_used(h0, 1);
    q.ring.push_used(h1, 2);
    q.ring.publish_used();
    let read = |slot: u64| {
        let mut d = Descriptor::default();
        d.as_mut_slice().copy_from_slice(&g.read(r.desc + 16 * slot, 16));
        (d.id(), d.len(), d.flags())
    };
    // The second used descriptor where the first chain's length puts it: slot 2.
    assert_eq!(read(0), (7, 1, DESC_F_AVAIL | DESC_F_USED));
    assert_eq!(read(2), (3, 2, DESC_F_AVAIL | DESC_F_USED));
}

/// The prefetch hint after a chain of two and a single were taken and used, a third
/// waiting: its descriptor (slot 3), and the next used one (slot 3 too: two used entries
/// moved the used position by the chains' lengths).
#[test]
fn test_next_lines_name_the_next_chain_and_used_descriptors() {
    let (g, mut r, mut q) = setup(8, false);
    r.add_chain(&g, &[(0x8000, 64, 0), (0x9000, 64, 0)]);
    r.add_chain(&g, &[(0xa000, 64, 0)]);
    r.add_chain(&g, &[(0xb000, 64, 0)]);
    let base = q.dma.mem().regions()[0].host() as usize;
    assert_eq!(q.ring.avail_pending().unwrap(), 3);
    for _ in 0..2 {
        let h = q.ring.pop_head();
        q.ring.push_used(h, 10);
    }
    q.ring.publish_used();
    let at = base + r.desc as usize + 16 * 3;
    assert_eq!(q.ring.next_lines(), [at, at]);
}

#[test]
fn test_flags_are_the_spec_numbers() {
    assert_eq!((DESC_F_AVAIL, DESC_F_USED, WRAP_BIT), (0x80, 0x8000, 0x8000));
    assert_eq!((EVENT_ENABLE, EVENT_DISABLE, EVENT_DESC), (0, 1, 2));
    assert_eq!(std::mem::size_of::<PackedDesc>(), 16);
}

/// Chains of one to three descriptors over many laps of a small ring: the device walks
/// exactly what the driver posted and the driver gets each id back once with its length,
/// the wrap counters flipping on both sides.
#[test]
fn test_chains_over_many_laps_come_back_used_in_order() {
    let (g, mut r, mut q) = setup(8, false);
    let mut next = xorshift(0x2545_f491_4f6c_dd1du64);
    for round in 0..200u64 {
        let mut posted = Vec::new();
        while r.free() >= 3 {
            let n = 1 + (next() % 3) as usize;
            let bufs: Vec<(u64, u32, u16)> = (0..n)
                .map(|k| (0x10000 + 0x1000 * (round % 16) + 0x100 * k as u64, 60 + k as u32, 0))
                .collect();
            let id = r.add_chain(&g, &bufs);
            posted.push((id, bufs));
        }
        let n = q.ring.avail_pending().unwrap();
        assert_eq!(n as usize, posted.len(), "round {round}");
        for (id, bufs) in &posted {
            let h = q.ring.pop_head();
            let got = walk::<iommu::Ro>(&mut q, h, false).unwrap();
            assert_eq!(got, bufs.iter().map(|b| (b.0, b.1)).collect::<Vec<_>>(), "round {round}");
            q.ring.push_used(h, 1000 + *id as u32);
        }
        assert_eq!(q.ring.avail_pending().unwrap(), 0);
        assert!(r.take_used(&g).is_empty(), "nothing shows before publishing");
        q.ring.publish_used();
        let used = r.take_used(&g);
        assert_eq!(used, posted.iter().map(|(id, _)| (*id, 1000 + *id as u32)).collect::<Vec<_>>());
    }
    // The state is the next slot and wrap counter on both sides.
    let s = q.ring.state();
    assert_eq!(s.last_avail, r.next | if r.wrap { WRAP_BIT } else { 0 });
    assert_eq!(s.used_idx, s.last_avail);
}

/// Used entries after the first waiting one get their flags as they are pushed; the driver,
/// reading in ring order, still sees exactly the published ones. A ring that holds entries
/// back (the shaper's suffix) is not eager: no held entry ever shows a used flag, so a
/// driver reading several flags at once cannot take one early. Over many laps of a small
/// ring, chains of one to three descriptors (single ones taken four at a time), rounds
/// eager or holding a random number back, and a ring turned eager with entries waiting.
#[test]
fn test_only_published_entries_show_and_held_ones_carry_no_used_flag() {
    let (g, mut r, mut q) = setup(8, false);
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64);
    let mut waiting = std::collections::VecDeque::new();
    let (mut eager_seen, mut held_rounds, mut batches) = (false, 0, 0);
    // The used position of pushed entry number k (the first waiting one's is published_at).
    let pos_of = |q: &MockPackedDevice, k: u16| {
        if k == q.ring.published {
            q.ring.published_at
        } else {
            q.ring.after[(k.wrapping_sub(1) & q.ring.cap_mask) as usize]
        }
    };
    let shows_used = |q: &MockPackedDevice, pos: u16| {
        let f = q.ring.flags_atomic(q.ring.slot(pos)).load(Ordering::Relaxed);
        f & (DESC_F_AVAIL | DESC_F_USED) == used_flags(pos)
    };
    for round in 0..600u64 {
        while r.free() >= 3 && (waiting.len() < 6 || next().is_multiple_of(2)) {
            let n = if next().is_multiple_of(4) { 1 + (next() % 3) as usize } else { 1 };
            let bufs: Vec<(u64, u32, u16)> =
                (0..n).map(|k| (0x10000 + 0x100 * k as u64, 60 + k as u32, 0)).collect();
            let id = r.add_chain(&g, &bufs);
            waiting.push_back(id);
        }
        let hold = next().is_multiple_of(3);
        // As the datapath does: not eager while a queue may hold entries back.
        q.ring.set_eager(!hold);
        let scanned = q.ring.avail_pending_fresh().unwrap();
        batches += usize::from(scanned >= 4);
        let start = q.ring.pushed;
        let mut pushed = Vec::new();
        let switch_at = if hold { u16::MAX } else { (next() % (scanned as u64 + 1)) as u16 };
        for k in 0..scanned {
            if !hold && k == switch_at {
                // The rest pushed while not eager; turned eager again after, those get
                // their flags then.
                q.ring.set_eager(false);
            }
            let h = q.ring.pop_head();
            let id = waiting.pop_front().unwrap();
            q.ring.push_used(h, 7000 + u32::from(id));
            pushed.push(id);
        }
        if !hold {
            q.ring.set_eager(true);
        }
        // Pushed, not published: the first's flags are unwritten, so none shows.
        assert!(r.take_used(&g).is_empty(), "round {round}: shown before publishing");
        if pushed.len() >= 2 && !hold {
            eager_seen |= shows_used(&q, pos_of(&q, start.wrapping_add(1)));
        }
        let held = if hold { (next() % (pushed.len() as u64 + 1)) as u16 } else { 0 };
        held_rounds += usize::from(held > 0 && (held as usize) < pushed.len());
        q.ring.publish_used_but(held);
        let shown = pushed.len() - held as usize;
        let want: Vec<(u16, u32)> = pushed[..shown].iter().map(|id| (*id, 7000 + u32::from(*id))).collect();
        assert_eq!(r.take_used(&g), want, "round {round}: held {held} of {}", pushed.len());
        for k in shown..pushed.len() {
            let pos = pos_of(&q, start.wrapping_add(k as u16));
            assert!(!shows_used(&q, pos), "round {round}: held entry {k} shows a used flag");
        }
        q.ring.publish_used();
        let rest: Vec<(u16, u32)> = pushed[shown..].iter().map(|id| (*id, 7000 + u32::from(*id))).collect();
        assert_eq!(r.take_used(&g), rest, "round {round}: the held ones released");
    }
    assert!(eager_seen, "no entry after the first carried its flags before publishing");
    assert!(held_rounds > 50, "only {held_rounds} rounds held some entries back");
    assert!(batches > 50, "only {batches} scans of four or more");
}

/// Used entries may be written in any order; the driver finds each where it looks next.
#[test]
fn test_out_of_order_completion() {
    let (g, mut r, mut q) = setup(8, false);
    let a = r.add_chain(&g, &[(0x8000, 10, 0), (0x9000, 20, 0)]);
    let b = r.add_chain(&g, &[(0xa000, 30, 0)]);
    let c = r.add_chain(&g, &[(0xb000, 40, 0)]);
    assert_eq!(q.ring.avail_pending().unwrap(), 3);
    let (ha, hb, hc) = (q.ring.pop_head(), q.ring.pop_head(), q.ring.pop_head());
    q.ring.push_used(hc, 3);
    q.ring.push_used(ha, 1);
    q.ring.publish_used();
    assert_eq!(r.take_used(&g), vec![(c, 3), (a, 1)]);
    q.ring.push_used(hb, 2);
    q.ring.publish_used();
    assert_eq!(r.take_used(&g), vec![(b, 2)]);
    // The ring goes on from there.
    let d = r.add_chain(&g, &[(0xc000, 50, 0)]);
    assert_eq!(q.ring.avail_pending().unwrap(), 1);
    let h = q.ring.pop_head();
    assert_eq!(walk::<iommu::Ro>(&mut q, h, false).unwrap(), vec![(0xc000, 50)]);
    q.ring.push_used(h, 5);
    q.ring.publish_used();
    assert_eq!(r.take_used(&g), vec![(d, 5)]);
}

/// A head given back is taken again with the same chain; held entries stay hidden.
#[test]
fn test_unpop_and_held_entries() {
    let (g, mut r, mut q) = setup(4, false);
    let a = r.add_chain(&g, &[(0x8000, 10, DESC_F_WRITE)]);
    let b = r.add_chain(&g, &[(0x9000, 20, DESC_F_WRITE)]);
    assert_eq!(q.ring.avail_pending().unwrap(), 2);
    let h0 = q.ring.pop_head();
    let _ = q.ring.pop_head();
    q.ring.unpop(1);
    assert_eq!(q.ring.avail_pending().unwrap(), 1);
    let h1 = q.ring.pop_head();
    assert_eq!(walk::<iommu::Rw>(&mut q, h1, false).unwrap(), vec![(0x9000, 20)]);
    q.ring.push_used(h0, 7);
    q.ring.push_used(h1, 8);
    q.ring.publish_used_but(1);
    assert_eq!(r.take_used(&g), vec![(a, 7)]);
    q.ring.publish_used();
    assert_eq!(r.take_used(&g), vec![(b, 8)]);
}

#[test]
fn test_packed_indirect_tables_are_read_in_order_with_only_write_counting() {
    let (g, mut r, mut q) = setup(4, false);
    // Three packed entries; their NEXT flags and ids are noise the device ignores.
    let table = 0x4000u64;
    for (k, (addr, len)) in [(0x8000u64, 10u32), (0x9000, 20), (0xa000, 30)].iter().enumerate() {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&0x1234u16.to_le_bytes());
        b[14..16].copy_from_slice(&(DESC_F_NEXT * (k as u16 % 2)).to_le_bytes());
        g.write(table + 16 * k as u64, &b);
    }
    r.add_chain(&g, &[(table, 48, DESC_F_INDIRECT)]);
    q.ring.avail_pending().unwrap();
    let h = q.ring.pop_head();
    assert_eq!(walk::<iommu::Ro>(&mut q, h, true).unwrap(), vec![(0x8000, 10), (0x9000, 20), (0xa000, 30)]);
    // Not negotiated: refused.
    r.add_chain(&g, &[(table, 48, DESC_F_INDIRECT)]);
    q.ring.avail_pending().unwrap();
    let h = q.ring.pop_head();
    assert_eq!(walk::<iommu::Ro>(&mut q, h, false), Err(ChainError::BadIndirect));
    // A device-writable entry in a chain the device reads.
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&0x8000u64.to_le_bytes());
    b[8..12].copy_from_slice(&10u32.to_le_bytes());
    b[14..16].copy_from_slice(&DESC_F_WRITE.to_le_bytes());
    g.write(table, &b);
    r.add_chain(&g, &[(table, 16, DESC_F_INDIRECT)]);
    q.ring.avail_pending().unwrap();
    let h = q.ring.pop_head();
    assert_eq!(walk::<iommu::Ro>(&mut q, h, true), Err(ChainError::WrongDirection));
}

/// A hostile driver: a chain that never ends, descriptors forged available in slots the
/// device holds, and a resume position outside the ring.
#[test]
fn test_a_hostile_driver_cannot_make_the_device_take_more_than_the_ring() {
    let (g, r, mut q) = setup(8, false);
    // Every slot available, every one saying NEXT: a chain longer than the ring.
    for s in 0..8 {
        r.write_desc(&g, s, 0x8000, 10, 0, DESC_F_NEXT | DESC_F_AVAIL);
    }
    assert_eq!(q.ring.avail_pending(), Err(RingError::AvailOverrun(8)));
    // Eight single descriptors: all taken, and no more however the flags are forged while
    // the device holds them.
    let (g, r, mut q) = setup(8, false);
    for s in 0..8 {
        r.write_desc(&g, s, 0x8000, 10, s, DESC_F_AVAIL);
    }
    assert_eq!(q.ring.avail_pending().unwrap(), 8);
    for s in 0..8 {
        // Forged "available" under the next lap's wrap counter.
        r.write_desc(&g, s, 0x8000, 10, s, DESC_F_USED);
    }
    assert_eq!(q.ring.avail_pending_fresh().unwrap(), 8, "nothing beyond the ring's worth");
    for _ in 0..8 {
        let h = q.ring.pop_head();
        walk::<iommu::Ro>(&mut q, h, false).unwrap();
        q.ring.push_used(h, 0);
    }
    q.ring.publish_used();
    // The used descriptors overwrote the forgeries; made available again, the slots are
    // the next lap's, and fine.
    assert_eq!(q.ring.avail_pending_fresh().unwrap(), 0);
    for s in 0..8 {
        r.write_desc(&g, s, 0x8000, 10, s, DESC_F_USED);
    }
    assert_eq!(q.ring.avail_pending().unwrap(), 8);
    let mut dma = g.dma();
    let bad = PackedRing::new(&mut dma, r.addrs(), 8, 8 | WRAP_BIT, false);
    assert_eq!(bad.err(), Some(RingError::BadBase(8 | WRAP_BIT)));
    let mut addrs = r.addrs();
    addrs.avail += 2;
    assert_eq!(
        PackedRing::new(&mut dma, addrs, 8, 0, false).err(),
        Some(RingError::Misaligned("driver event"))
    );
}

/// Interrupts as the driver's event area asks, kicks as the device's says.
#[test]
fn test_event_suppression_both_ways() {
    let (g, mut r, mut q) = setup(8, true);
    let one = |r: &mut MockPackedRing, q: &mut MockPackedDevice| {
        r.add_chain(&g, &[(0x8000, 10, 0)]);
        q.ring.avail_pending().unwrap();
        let h = q.ring.pop_head();
        q.ring.push_used(h, 0);
        q.ring.publish_used();
        r.take_used(&g);
    };
    r.set_driver_event(&g, EVENT_ENABLE, 0);
    one(&mut r, &mut q);
    assert!(q.ring.needs_interrupt());
    assert!(!q.ring.needs_interrupt(), "nothing new");
    r.set_driver_event(&g, EVENT_DISABLE, 0);
    one(&mut r, &mut q);
    assert!(!q.ring.needs_interrupt());
    // EVENT_IDX: interrupt when the used descriptor at slot 4 (wrap 1) is written.
    r.set_driver_event(&g, EVENT_DESC, 4 | WRAP_BIT);
    one(&mut r, &mut q); // slot 2
    assert!(!q.ring.needs_interrupt());
    one(&mut r, &mut q); // slot 3
    assert!(!q.ring.needs_interrupt());
    one(&mut r, &mut q); // slot 4
    assert!(q.ring.needs_interrupt());
    // Past the wrap: slot 1 of the second lap (wrap 0).
    r.set_driver_event(&g, EVENT_DESC, 1);
    for _ in 0..4 {
        one(&mut r, &mut q); // slots 5, 6, 7, 0'
        assert!(!q.ring.needs_interrupt());
    }
    one(&mut r, &mut q); // slot 1'
    assert!(q.ring.needs_interrupt());
    // Kicks.
    assert!(!q.ring.set_kicks(false));
    assert_eq!(r.device_event_flags(&g), EVENT_DISABLE);
    assert!(!q.ring.set_kicks(true), "nothing arrived");
    assert_eq!(r.device_event_flags(&g), EVENT_ENABLE);
    q.ring.set_kicks(false);
    r.add_chain(&g, &[(0x8000, 10, 0)]);
    assert!(q.ring.set_kicks(true), "a chain arrived while kicks were off");
}

/// A ring handed over mid-lap resumes where the old owner stopped.
#[test]
fn test_resume_from_a_token() {
    let (g, mut r, mut q) = setup(4, false);
    for i in 0..6u16 {
        let id = r.add_chain(&g, &[(0x8000 + i as u64, 10, 0)]);
        q.ring.avail_pending().unwrap();
        let h = q.ring.pop_head();
        q.ring.push_used(h, 1);
        q.ring.publish_used();
        assert_eq!(r.take_used(&g), vec![(id, 1)]);
    }
    let s = q.ring.state();
    assert_eq!(s.last_avail, 2, "slot 2 of the second lap: wrap counter 0");
    let id = r.add_chain(&g, &[(0x9000, 10, 0)]);
    let mut dma = g.dma();
    let mut q2 =
        MockPackedDevice { ring: PackedRing::new(&mut dma, r.addrs(), 4, s.last_avail, false).unwrap(), dma };
    assert_eq!(q2.ring.avail_pending().unwrap(), 1);
    let h = q2.ring.pop_head();
    assert_eq!(walk::<iommu::Ro>(&mut q2, h, false).unwrap(), vec![(0x9000, 10)]);
    q2.ring.push_used(h, 9);
    q2.ring.publish_used();
    assert_eq!(r.take_used(&g), vec![(id, 9)]);
}
