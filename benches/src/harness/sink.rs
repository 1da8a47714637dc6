//! The generator's receive side: what arrived where, in order or not, and how late.

use hdrhistogram::Histogram;

use super::clock::Clock;
use super::gen::{GenError, Plan, Tag, HELLO_STREAM, MASK48};
use super::results::Latency;

/// Receive-side bookkeeping.
pub(super) struct Sink {
    pub(super) must: Vec<u64>,
    pub(super) may: Vec<u64>,
    pub(super) ports: usize,
    /// Last sequence number + 1 per (stream, port); 0 = none yet.
    pub(super) last: Vec<u64>,
    pub(super) received_must: u64,
    pub(super) rx: u64,
    pub(super) window_rx: u64,
    pub(super) window_bytes: u64,
    pub(super) reordered: u64,
    pub(super) misdelivered: u64,
    pub(super) foreign: u64,
    pub(super) in_window: bool,
    pub(super) hist: Histogram<u64>,
}

impl Sink {
    /// Bookkeeping for `plan`, timing latencies of up to `max_ticks`.
    pub(super) fn new(plan: &Plan, max_ticks: u64) -> Result<Sink, GenError> {
        Ok(Sink {
            must: plan.streams.iter().map(|s| s.must).collect(),
            may: plan.streams.iter().map(|s| s.may).collect(),
            ports: plan.ports,
            last: vec![0; plan.streams.len() * plan.ports],
            received_must: 0,
            rx: 0,
            window_rx: 0,
            window_bytes: 0,
            reordered: 0,
            misdelivered: 0,
            foreign: 0,
            in_window: false,
            hist: Histogram::new_with_bounds(1, max_ticks.max(2), 3)?,
        })
    }

    /// Adds what another thread's sink saw (its ports' entries of `last`, its counts and
    /// latencies).
    pub(super) fn merge(&mut self, o: Sink) {
        for (a, b) in self.last.iter_mut().zip(o.last) {
            *a = (*a).max(b);
        }
        self.received_must += o.received_must;
        self.rx += o.rx;
        self.window_rx += o.window_rx;
        self.window_bytes += o.window_bytes;
        self.reordered += o.reordered;
        self.misdelivered += o.misdelivered;
        self.foreign += o.foreign;
        let _ = self.hist.add(&o.hist);
    }

    #[inline(always)]
    pub(super) fn on_frame(&mut self, port: usize, frame: &[u8], now: u64) {
        let Some(tag) = Tag::read(frame) else {
            self.foreign += 1;
            return;
        };
        let s = tag.stream as usize;
        if tag.stream == HELLO_STREAM {
            return;
        }
        if s >= self.must.len() {
            self.foreign += 1;
            return;
        }
        self.rx += 1;
        let bit = 1u64 << port;
        if self.may[s] & bit == 0 {
            self.misdelivered += 1;
        } else if self.must[s] & bit != 0 {
            self.received_must += 1;
        }
        let last = &mut self.last[s * self.ports + port];
        if tag.seq < *last {
            self.reordered += 1;
        } else {
            *last = tag.seq + 1;
        }
        if self.in_window {
            self.window_rx += 1;
            self.window_bytes += (frame.len() + super::spec::FCS_LEN) as u64;
            let lat = now.wrapping_sub(tag.stamp) & MASK48;
            // Another generator thread may stamp and send a frame after this thread read the
            // clock and before it polled: a "negative" latency, recorded as the least.
            let lat = if lat > MASK48 / 2 { 1 } else { lat.max(1) };
            self.hist.saturating_record(lat);
        }
    }
}

/// Summarises a histogram of latencies in clock ticks.
pub fn latency_of(h: &Histogram<u64>, clock: &Clock) -> Latency {
    let ns = |t: u64| clock.to_ns(t);
    let mut cdf = Vec::new();
    // Dense in the tail: 0..0.9 in tenths, then 1 - 10^(-k/4) up to 99.999 %.
    let mut qs: Vec<f64> = (0..9).map(|i| f64::from(i) / 10.0).collect();
    qs.extend((4..=20).map(|k| 1.0 - 10f64.powf(-f64::from(k) / 4.0)));
    qs.push(1.0);
    for q in qs {
        let v = ns(h.value_at_quantile(q));
        if cdf.last().is_none_or(|&(_, last)| v >= last) {
            cdf.push((q, v));
        }
    }
    Latency {
        samples: h.len(),
        min_ns: ns(h.min()),
        mean_ns: h.mean() * 1e9 / clock.hz(),
        p50_ns: ns(h.value_at_quantile(0.5)),
        p90_ns: ns(h.value_at_quantile(0.9)),
        p99_ns: ns(h.value_at_quantile(0.99)),
        p999_ns: ns(h.value_at_quantile(0.999)),
        max_ns: ns(h.max()),
        cdf,
    }
}
