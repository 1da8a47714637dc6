//! Interrupt moderation: an ITR-style minimum interval between interrupts that moves with load.
//!
//! The 82576 holds each vector's interrupts for at least EITR's interval; the igb driver
//! re-chooses the interval after every interrupt from the packets and bytes it saw
//! (`igb_update_itr` and `igb_set_itr` in Linux's `drivers/net/ethernet/intel/igb/igb_main.c`):
//! three classes, lowest latency (70,000 interrupts/s), low latency (20,000/s) and bulk
//! (4,000/s), moved between by packet count and average size. [`Profile::Adaptive`] is that rule; [`Profile::Fixed`] is a set EITR.
//!
//! The moderator only says when; the queue's owner signals the guest (its call eventfd).

/// How the interval is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Every completion interrupts at once (EITR 0).
    Off,
    /// A fixed minimum interval, nanoseconds.
    Fixed(u64),
    /// igb's adaptive classes.
    Adaptive,
}

/// igb's load classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Lowest,
    Low,
    Bulk,
}

impl Class {
    /// The class's interval (IGB_70K_ITR, IGB_20K_ITR, IGB_4K_ITR), nanoseconds.
    fn interval_ns(self) -> u64 {
        match self {
            Class::Lowest => 14_000,
            Class::Low => 50_000,
            Class::Bulk => 250_000,
        }
    }

    /// `igb_update_itr`: the next class from the packets and bytes since the last interrupt.
    fn next(self, packets: u64, bytes: u64) -> Class {
        if packets == 0 {
            return self;
        }
        let avg = bytes / packets;
        match self {
            Class::Lowest if avg > 8000 => Class::Bulk,
            Class::Lowest if packets < 5 && bytes > 512 => Class::Low,
            Class::Lowest => Class::Lowest,
            Class::Low if bytes > 10_000 => {
                if avg > 8000 || packets < 10 || avg > 1200 {
                    Class::Bulk
                } else if packets > 35 {
                    Class::Lowest
                } else {
                    Class::Low
                }
            }
            Class::Low if avg > 2000 => Class::Bulk,
            Class::Low if packets <= 2 && bytes < 512 => Class::Lowest,
            Class::Low => Class::Low,
            Class::Bulk if bytes > 25_000 => match packets > 35 {
                true => Class::Low,
                false => Class::Bulk,
            },
            Class::Bulk if bytes < 1500 => Class::Low,
            Class::Bulk => Class::Bulk,
        }
    }
}

/// What to do after a completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Interrupt now.
    Now,
    /// Hold it; interrupt at this time (ns) unless another completion comes first.
    At(u64),
}

/// One interrupt vector's moderation.
#[derive(Clone, Debug)]
pub struct Moderator {
    profile: Profile,
    class: Class,
    /// The current interval, ns.
    interval: u64,
    last_irq: u64,
    /// Whether completions wait for an interrupt.
    pending: bool,
    packets: u64,
    bytes: u64,
    /// Interrupts raised.
    pub raised: u64,
    /// Completions folded into a later interrupt.
    pub suppressed: u64,
}

impl Moderator {
    /// A vector with `profile`, its last interrupt long ago.
    pub fn new(profile: Profile) -> Self {
        let interval = match profile {
            Profile::Off => 0,
            Profile::Fixed(ns) => ns,
            // igb starts a vector at 20,000/s (low latency).
            Profile::Adaptive => Class::Low.interval_ns(),
        };
        Moderator {
            profile,
            class: Class::Low,
            interval,
            last_irq: 0,
            pending: false,
            packets: 0,
            bytes: 0,
            raised: 0,
            suppressed: 0,
        }
    }

    /// The current minimum interval, ns.
    pub fn interval_ns(&self) -> u64 {
        self.interval
    }

    /// `packets` frames of `bytes` completed at `now`: interrupt now, or when.
    pub fn complete(&mut self, now: u64, packets: u64, bytes: u64) -> Signal {
        self.packets += packets;
        self.bytes += bytes;
        if self.pending {
            self.suppressed += 1;
        }
        self.pending = true;
        self.due(now)
    }

    /// Whether a held interrupt is due at `now` (call from the timer or the next poll).
    pub fn poll(&mut self, now: u64) -> Option<Signal> {
        self.pending.then(|| self.due(now))
    }

    /// Raises a held interrupt now, interval or not (the queue went idle: holding it gains
    /// nothing); whether one was held.
    pub fn flush(&mut self, now: u64) -> bool {
        let held = self.pending;
        if held {
            self.fire(now);
        }
        held
    }

    fn due(&mut self, now: u64) -> Signal {
        let at = self.last_irq.saturating_add(self.interval);
        if now < at && self.raised > 0 {
            return Signal::At(at);
        }
        self.fire(now);
        Signal::Now
    }

    fn fire(&mut self, now: u64) {
        self.raised += 1;
        self.last_irq = now;
        self.pending = false;
        if self.profile == Profile::Adaptive {
            self.class = self.class.next(self.packets, self.bytes);
            // igb_set_itr "smooths" a rise with max(new * old / (new + old / 4), new), which is
            // always `new`: the interval jumps to the class's either way.
            self.interval = self.class.interval_ns();
        }
        self.packets = 0;
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_interrupts_every_completion() {
        let mut m = Moderator::new(Profile::Off);
        for t in 0..10 {
            assert_eq!(m.complete(t, 1, 64), Signal::Now);
        }
        assert_eq!((m.raised, m.suppressed), (10, 0));
    }

    #[test]
    fn a_fixed_interval_holds_and_folds_completions() {
        let mut m = Moderator::new(Profile::Fixed(100_000));
        assert_eq!(m.complete(1_000_000, 1, 64), Signal::Now);
        assert_eq!(m.complete(1_010_000, 1, 64), Signal::At(1_100_000));
        assert_eq!(m.complete(1_020_000, 1, 64), Signal::At(1_100_000));
        assert_eq!(m.poll(1_050_000), Some(Signal::At(1_100_000)));
        assert_eq!(m.poll(1_100_000), Some(Signal::Now));
        assert_eq!(m.poll(1_200_000), None);
        assert_eq!((m.raised, m.suppressed), (2, 1));
        // Going idle raises a held interrupt at once.
        assert_eq!(m.complete(1_150_000, 1, 64), Signal::At(1_200_000));
        assert!(m.flush(1_160_000));
        assert!(!m.flush(1_170_000), "nothing held any more");
        assert_eq!(m.raised, 3);
    }

    #[test]
    fn adaptive_moves_to_bulk_under_large_frames_and_back_for_sparse_small_ones() {
        let mut m = Moderator::new(Profile::Adaptive);
        let mut now = 1_000_000;
        // Streams of 64 KiB (LRO/TSO-sized) frames: bulk, 250 us.
        for _ in 0..20 {
            now += 1_000_000;
            m.complete(now, 4, 4 * 65_000);
        }
        assert_eq!(m.class, Class::Bulk);
        assert!(m.interval_ns() > 150_000 && m.interval_ns() <= 250_000, "{}", m.interval_ns());
        // A ping now and then: back to low, then lowest latency, at once.
        for _ in 0..3 {
            now += 1_000_000;
            m.complete(now, 1, 98);
        }
        assert_eq!(m.class, Class::Lowest);
        assert_eq!(m.interval_ns(), 14_000);
    }

    #[test]
    fn under_a_packet_storm_interrupts_are_bounded_by_the_interval() {
        let mut m = Moderator::new(Profile::Adaptive);
        // 1 Mpps of 1500-byte frames for 10 ms, one completion per packet.
        let mut due = None;
        for i in 0..10_000u64 {
            let now = 1_000_000 + i * 1000;
            if let Some(at) = due {
                if now >= at {
                    m.poll(now);
                }
            }
            due = match m.complete(now, 1, 1500) {
                Signal::Now => None,
                Signal::At(at) => Some(at),
            };
        }
        // At most one interrupt per 50 us (low) once it settles: well under 10,000.
        assert!(m.raised < 400, "{} interrupts", m.raised);
        assert!(m.suppressed > 9_000);
    }
}
