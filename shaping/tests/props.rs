//! Property tests: invariants of the bucket, policers and shaper under arbitrary sequences.

use proptest::prelude::*;
use shaping::{Colour, Offer, Policer, RateLimiter, Shaper, SrTcm, TokenBucket, TrTcm, NANOS_PER_SEC};

/// (nanoseconds to advance, tokens to ask for)
fn ops() -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec((0u64..50_000_000, 0u64..20_000), 1..400)
}

proptest! {
    #[test]
    fn bucket_never_gives_more_than_rate_times_time_plus_burst(
        rate in 1u64..10_000_000_000,
        burst in 1u64..1_000_000,
        one_time in 0u64..100_000,
        ops in ops(),
    ) {
        let mut b = TokenBucket::new(rate, burst).unwrap().with_one_time_burst(one_time);
        let (mut t, mut taken) = (0u64, 0u128);
        for (dt, n) in ops {
            t += dt;
            b.advance(t);
            let before = b;
            if b.try_take(n) {
                taken += n as u128;
            } else {
                prop_assert_eq!(b, before, "a refused take must change nothing");
            }
            prop_assert!(b.tokens() <= burst + one_time);
            // Exact: taken ≤ burst + one_time + rate × t / 1e9.
            prop_assert!(
                taken * NANOS_PER_SEC as u128
                    <= (burst + one_time) as u128 * NANOS_PER_SEC as u128 + rate as u128 * t as u128
            );
        }
    }

    #[test]
    fn bucket_refill_does_not_depend_on_how_time_is_sliced(
        rate in 1u64..1_000_000_000,
        burst in 1u64..10_000_000,
        steps in prop::collection::vec(0u64..10_000_000, 1..200),
    ) {
        let mut sliced = TokenBucket::new(rate, burst).unwrap();
        let mut whole = sliced;
        prop_assume!(sliced.try_take(burst) && whole.try_take(burst));
        let mut t = 0;
        for s in steps {
            t += s;
            sliced.advance(t);
        }
        whole.advance(t);
        prop_assert_eq!(sliced, whole);
    }

    #[test]
    fn srtcm_green_within_committed_and_yellow_within_excess(
        cir in 8u64..1_000_000_000,
        cbs in 1u64..100_000,
        ebs in 0u64..100_000,
        ops in prop::collection::vec((0u64..10_000_000, 1u32..9000), 1..300),
    ) {
        let mut p = Policer::SrTcm(SrTcm::new(cir, cbs, ebs).unwrap());
        let (mut t, mut green, mut passed) = (0u64, 0u128, 0u128);
        for (dt, len) in ops {
            t += dt;
            p.advance(t);
            match p.colour(len) {
                Colour::Green => { green += len as u128; passed += len as u128; }
                Colour::Yellow => passed += len as u128,
                Colour::Red => {}
            }
            let earned = cir as u128 * t as u128; // bits × 1e9
            let s = NANOS_PER_SEC as u128;
            prop_assert!(green * 8 * s <= cbs as u128 * 8 * s + earned);
            prop_assert!(passed * 8 * s <= (cbs + ebs) as u128 * 8 * s + earned);
        }
    }

    #[test]
    fn trtcm_yellow_never_exceeds_the_excess_rate(
        cir in 8u64..1_000_000_000,
        eir in 0u64..1_000_000_000,
        cbs in 1u64..100_000,
        ebs in 0u64..100_000,
        ops in prop::collection::vec((0u64..10_000_000, 1u32..9000), 1..300),
    ) {
        let mut p = Policer::TrTcm(TrTcm::new(cir, cbs, eir, ebs).unwrap());
        let (mut t, mut green, mut yellow) = (0u64, 0u128, 0u128);
        let s = NANOS_PER_SEC as u128;
        for (dt, len) in ops {
            t += dt;
            p.advance(t);
            match p.colour(len) {
                Colour::Green => green += len as u128,
                Colour::Yellow => yellow += len as u128,
                Colour::Red => {}
            }
            prop_assert!(green * 8 * s <= cbs as u128 * 8 * s + cir as u128 * t as u128);
            prop_assert!(yellow * 8 * s <= ebs as u128 * 8 * s + eir as u128 * t as u128);
        }
    }

    #[test]
    fn shaper_keeps_order_bounds_and_rate(
        limit in 1usize..64,
        ops in prop::collection::vec((0u64..2_000_000, 1u32..3000, any::<bool>()), 1..400),
    ) {
        // 10 Mbit/s, 4000 B burst.
        let mut s: Shaper<u64> = Shaper::new(RateLimiter::bits(10_000_000, 4000).unwrap(), limit, 50_000);
        let (mut t, mut seq, mut next_out, mut sent) = (0u64, 0u64, 0u64, 0u128);
        let mut dropped = std::collections::BTreeSet::new();
        for (dt, len, offer) in ops {
            t += dt;
            s.advance(t);
            let mut out = Vec::new();
            while let Some(x) = s.release() { out.push(x); }
            if offer {
                match s.offer(len, seq) {
                    Offer::Send(x) => out.push(x),
                    Offer::Queued => {}
                    Offer::Dropped(x) => { dropped.insert(x); }
                }
                seq += 1;
            }
            for x in out {
                while dropped.contains(&next_out) { next_out += 1; }
                prop_assert_eq!(x, next_out, "released out of order");
                next_out += 1;
            }
            prop_assert!(s.len() <= limit);
            prop_assert!(s.queued_bytes() <= 50_000);
            sent = s.counters.sent_bytes as u128;
            prop_assert!(sent * 8 * NANOS_PER_SEC as u128 <= 4000 * 8 * NANOS_PER_SEC as u128 + 10_000_000u128 * t as u128);
        }
        let _ = sent;
    }
}
