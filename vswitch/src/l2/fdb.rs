//! The forwarding table: (VLAN, MAC) → port, learned from traffic, aged out.
//!
//! Shared by every polling thread without a lock. Each slot is two atomic words: a key
//! (valid bit, VLAN, MAC) and a value (port, a 16-bit tag of the key, last-seen second).
//! Writers store the value before the key; a reader that races a rewrite sees a key whose tag
//! does not match the value and treats it as a miss (the packet floods). At worst a racing
//! reader forwards one frame to a port the MAC just left; VLAN membership is checked again at
//! egress, so isolation never depends on this table. Entries are refreshed at most once a
//! second, so a busy MAC does not dirty the line on every packet.
//!
//! Guests choose their source MACs, so the table defends itself: the bucket hash is keyed
//! with a secret chosen at start (a guest cannot compute MACs that land in a victim's bucket
//! and evict its entry, which would flood the victim's unicast to every port of the VLAN,
//! the attacker's included), and each port may own at most its limit of entries (more new
//! MACs are forwarded but not learned, and counted).

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use super::Mac;

const WAYS: usize = 4;
const VALID: u64 = 1 << 63;

/// One learned address.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FdbEntry {
    /// VLAN.
    pub vlan: u16,
    /// MAC, `aa:bb:..`.
    pub mac: String,
    /// Port id.
    pub port: u16,
    /// Seconds since the address was last seen.
    pub age_secs: u32,
}

/// A bucket: four ways, one cache line.
#[repr(C, align(64))]
#[derive(Default)]
struct Bucket {
    slots: [[AtomicU64; 2]; WAYS],
}

/// Entries a port may own unless configured otherwise.
pub const DEFAULT_MAC_LIMIT: u32 = 1024;

/// Per-port learning accounting, indexed by port id.
struct Owners {
    /// Entries owned: recounted from the table every second, raised by each new entry.
    owned: Box<[AtomicU32]>,
    limit: Box<[AtomicU32]>,
    /// New MACs not learned because the port was at its limit.
    refused: Box<[AtomicU64]>,
}

/// The table.
pub struct Fdb {
    buckets: Box<[Bucket]>,
    shift: u32,
    aging_secs: u32,
    /// The hash's secret: an odd multiplier and a mask, chosen at start.
    mul: u64,
    xor: u64,
    owners: Owners,
    /// Time zero of the table's clock ([`Fdb::now`]). One for every thread that learns or
    /// looks up: with a clock per thread, an entry one thread stamped a second "later" than
    /// another thread's clock read was expired to that thread (a flood every second, for
    /// as long as the threads' starts were apart).
    epoch: std::time::Instant,
}

/// Seconds since the entry's stamp (0 for a stamp ahead of `now`, see [`Fdb::live`]).
#[inline(always)]
fn age(now: u32, val: u64) -> u32 {
    (now.wrapping_sub(val as u32) as i32).max(0) as u32
}

#[inline(always)]
fn key_of(vlan: u16, mac: Mac) -> u64 {
    VALID | ((vlan as u64 & 0xfff) << 48) | (mac & 0xffff_ffff_ffff)
}

/// Random bits from the standard library's per-process hash keys (getrandom underneath).
fn secret() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x5eed);
    h.finish()
}

impl Fdb {
    /// A table of at least `entries` slots whose entries expire after `aging_secs`.
    pub fn new(entries: usize, aging_secs: u32) -> Self {
        let nb = (entries / WAYS).max(1).next_power_of_two();
        let buckets = (0..nb).map(|_| Bucket::default()).collect();
        let ports = crate::port::MAX_PORTS;
        let owners = Owners {
            owned: (0..ports).map(|_| AtomicU32::new(0)).collect(),
            limit: (0..ports).map(|_| AtomicU32::new(DEFAULT_MAC_LIMIT)).collect(),
            refused: (0..ports).map(|_| AtomicU64::new(0)).collect(),
        };
        Fdb {
            buckets,
            shift: 64 - nb.trailing_zeros(),
            aging_secs: aging_secs.max(1),
            mul: secret() | 1,
            xor: secret(),
            owners,
            epoch: std::time::Instant::now(),
        }
    }

    /// The table's clock: whole seconds since it was made. Every `now` passed to the table
    /// must come from here.
    pub fn now(&self) -> u32 {
        self.epoch.elapsed().as_secs() as u32
    }

    /// Multiply-shift over the secret: one multiply, as cheap as the unkeyed hash was.
    #[inline(always)]
    fn hash(&self, key: u64) -> u64 {
        (key ^ self.xor).wrapping_mul(self.mul)
    }

    #[inline(always)]
    fn tag_of(&self, key: u64) -> u64 {
        (self.hash(key) >> 16) & 0xffff
    }

    #[inline(always)]
    fn val_of(&self, port: u16, key: u64, now: u32) -> u64 {
        ((port as u64) << 48) | (self.tag_of(key) << 32) | now as u64
    }

    #[inline(always)]
    fn bucket(&self, key: u64) -> &Bucket {
        let i = if self.shift == 64 { 0 } else { (self.hash(key) >> self.shift) as usize };
        &self.buckets[i]
    }

    /// Whether the entry (`key`, `val`) is this key's and not expired. An entry stamped
    /// "after" `now` is live: each polling thread reads the table's clock every few hundred
    /// loop turns, so one thread's `now` may still be a second behind another's stamp.
    #[inline(always)]
    fn live(&self, key: u64, val: u64, now: u32) -> bool {
        (val >> 32) & 0xffff == self.tag_of(key) && age(now, val) <= self.aging_secs
    }

    /// Sets how many entries `port` may own.
    pub fn set_limit(&self, port: u16, limit: u32) {
        if let Some(l) = self.owners.limit.get(port as usize) {
            l.store(limit, Relaxed);
        }
    }

    /// Entries `port` owns (as of the last recount, plus new ones), its limit, and the new
    /// MACs it could not have learned.
    pub fn port_usage(&self, port: u16) -> (u32, u32, u64) {
        let i = port as usize;
        let o = &self.owners;
        match (o.owned.get(i), o.limit.get(i), o.refused.get(i)) {
            (Some(a), Some(b), Some(c)) => (a.load(Relaxed), b.load(Relaxed), c.load(Relaxed)),
            _ => (0, 0, 0),
        }
    }

    /// Whether `port` may own one more entry (and counts it if so).
    #[cold]
    fn admit(&self, port: u16) -> bool {
        let i = port as usize;
        let (Some(owned), Some(limit)) = (self.owners.owned.get(i), self.owners.limit.get(i)) else {
            return false;
        };
        if owned.fetch_add(1, Relaxed) < limit.load(Relaxed) {
            return true;
        }
        owned.fetch_sub(1, Relaxed);
        self.owners.refused[i].fetch_add(1, Relaxed);
        false
    }

    /// Counts each port's live entries afresh (expired and evicted ones stop counting).
    pub fn recount(&self, now: u32) {
        let mut n = vec![0u32; self.owners.owned.len()];
        for b in self.buckets.iter() {
            for s in &b.slots {
                let (k, v) = (s[0].load(Relaxed), s[1].load(Relaxed));
                if k & VALID != 0 && self.live(k, v, now) {
                    if let Some(c) = n.get_mut((v >> 48) as usize) {
                        *c += 1;
                    }
                }
            }
        }
        for (o, c) in self.owners.owned.iter().zip(n) {
            o.store(c, Relaxed);
        }
    }

    /// Slots in the table.
    pub fn capacity(&self) -> usize {
        self.buckets.len() * WAYS
    }

    /// Starts loading the bucket of (`vlan`, `mac`) into the cache, for a lookup or learn a
    /// little later: a burst prefetches all its packets' buckets first, so a table larger than
    /// the cache costs one memory latency per burst, not one per packet.
    #[inline(always)]
    pub fn prefetch(&self, vlan: u16, mac: Mac) {
        let b = self.bucket(key_of(vlan, mac)) as *const Bucket;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is a hint; the address is a live bucket of ours anyway.
        unsafe {
            core::arch::x86_64::_mm_prefetch(b.cast::<i8>(), core::arch::x86_64::_MM_HINT_T0)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = b;
    }

    /// Port that `mac` was last seen on in `vlan`, if recent enough.
    #[inline]
    pub fn lookup(&self, vlan: u16, mac: Mac, now: u32) -> Option<u16> {
        let key = key_of(vlan, mac);
        for s in &self.bucket(key).slots {
            if s[0].load(Relaxed) == key {
                let val = s[1].load(Relaxed);
                return self.live(key, val, now).then_some((val >> 48) as u16);
            }
        }
        None
    }

    /// Records that `mac` was seen on `port` in `vlan`. Writes only when something changed.
    #[inline]
    pub fn learn(&self, vlan: u16, mac: Mac, port: u16, now: u32) {
        let key = key_of(vlan, mac);
        let b = self.bucket(key);
        for s in &b.slots {
            if s[0].load(Relaxed) == key {
                let val = s[1].load(Relaxed);
                let moved = (val >> 48) as u16 != port;
                if moved || val as u32 != now || !self.live(key, val, now) {
                    if moved && !self.admit(port) {
                        return;
                    }
                    s[1].store(self.val_of(port, key, now), Relaxed);
                }
                return;
            }
        }
        self.learn_new(b, key, port, now);
    }

    #[cold]
    fn learn_new(&self, b: &Bucket, key: u64, port: u16, now: u32) {
        if !self.admit(port) {
            return;
        }
        // Take a free or expired way, else evict the least recently seen.
        let mut victim = 0;
        let mut oldest = 0u32;
        for (i, s) in b.slots.iter().enumerate() {
            let k = s[0].load(Relaxed);
            let v = s[1].load(Relaxed);
            if k & VALID == 0 || !self.live(k, v, now) {
                victim = i;
                break;
            }
            let age = age(now, v);
            if age >= oldest {
                oldest = age;
                victim = i;
            }
        }
        let s = &b.slots[victim];
        s[1].store(self.val_of(port, key, now), Relaxed);
        s[0].store(key, Relaxed);
    }

    /// Forgets every entry.
    pub fn flush(&self) {
        self.retain(|_| false);
    }

    /// Forgets the entries of one port (it was removed or reconnected).
    pub fn flush_port(&self, port: u16) {
        self.retain(|p| p != port);
        if let Some(o) = self.owners.owned.get(port as usize) {
            o.store(0, Relaxed);
        }
    }

    fn retain(&self, keep: impl Fn(u16) -> bool) {
        for b in self.buckets.iter() {
            for s in &b.slots {
                let v = s[1].load(Relaxed);
                if s[0].load(Relaxed) & VALID != 0 && !keep((v >> 48) as u16) {
                    s[0].store(0, Relaxed);
                }
            }
        }
    }

    /// Live entries learned on `ports` (a port-indexed mask), as (port, VLAN, MAC): what a NIC
    /// model's filters are programmed from. No strings, no sort.
    pub fn learned_on(&self, ports: &[bool], now: u32) -> Vec<(u16, u16, Mac)> {
        let mut out = Vec::new();
        for b in self.buckets.iter() {
            for s in &b.slots {
                let (k, v) = (s[0].load(Relaxed), s[1].load(Relaxed));
                let port = (v >> 48) as u16;
                if k & VALID != 0 && ports.get(port as usize) == Some(&true) && self.live(k, v, now) {
                    out.push((port, ((k >> 48) & 0xfff) as u16, k & 0xffff_ffff_ffff));
                }
            }
        }
        out
    }

    /// Live entries, sorted by VLAN then MAC.
    pub fn dump(&self, now: u32) -> Vec<FdbEntry> {
        let mut out = Vec::new();
        for b in self.buckets.iter() {
            for s in &b.slots {
                let (k, v) = (s[0].load(Relaxed), s[1].load(Relaxed));
                if k & VALID != 0 && self.live(k, v, now) {
                    out.push(FdbEntry {
                        vlan: ((k >> 48) & 0xfff) as u16,
                        mac: super::format_mac(k & 0xffff_ffff_ffff),
                        port: (v >> 48) as u16,
                        age_secs: age(now, v),
                    });
                }
            }
        }
        out.sort_by(|a, b| (a.vlan, &a.mac).cmp(&(b.vlan, &b.mac)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_an_entry_stamped_by_a_thread_whose_clock_is_a_second_ahead_is_live() {
        // Polling threads read the table's clock every few hundred loop turns: right after a
        // second boundary one has k + 1 while another still has k. The other must still find
        // what the first learned (it flooded for that window every second before).
        let f = Fdb::new(1024, 300);
        f.learn(0, 0x5254_0000_0001, 2, 41);
        assert_eq!(f.lookup(0, 0x5254_0000_0001, 40), Some(2));
        assert_eq!(f.dump(40)[0].age_secs, 0);
        // Expiry still works both ways round.
        assert_eq!(f.lookup(0, 0x5254_0000_0001, 41 + 300), Some(2));
        assert_eq!(f.lookup(0, 0x5254_0000_0001, 41 + 301), None);
    }

    #[test]
    fn test_every_thread_reads_the_one_clock_of_the_table() {
        let f = Fdb::new(64, 300);
        let a = f.now();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let b = std::thread::scope(|s| s.spawn(|| f.now()).join().unwrap());
        assert!(b > a && b <= a + 2, "{a} then {b}");
    }

    #[test]
    fn test_learn_then_lookup() {
        let f = Fdb::new(1024, 300);
        f.learn(10, 0x5254_0000_0001, 3, 100);
        assert_eq!(f.lookup(10, 0x5254_0000_0001, 100), Some(3));
        assert_eq!(f.lookup(11, 0x5254_0000_0001, 100), None, "VLANs are separate tables");
        assert_eq!(f.lookup(10, 0x5254_0000_0002, 100), None);
    }

    #[test]
    fn test_station_move_updates_port() {
        let f = Fdb::new(1024, 300);
        f.learn(1, 7, 3, 5);
        f.learn(1, 7, 4, 5);
        assert_eq!(f.lookup(1, 7, 5), Some(4));
        assert_eq!(f.dump(5).len(), 1);
    }

    #[test]
    fn test_aging_expires_and_refresh_keeps() {
        let f = Fdb::new(64, 10);
        f.learn(0, 1, 1, 0);
        f.learn(0, 2, 2, 0);
        f.learn(0, 2, 2, 8); // refreshed
        assert_eq!(f.lookup(0, 1, 10), Some(1));
        assert_eq!(f.lookup(0, 1, 11), None, "expired after the aging time");
        assert_eq!(f.lookup(0, 2, 11), Some(2));
        assert_eq!(f.dump(11).len(), 1);
    }

    #[test]
    fn test_a_port_learns_at_most_its_limit_and_the_rest_is_counted() {
        let f = Fdb::new(4096, 300);
        f.set_limit(1, 10);
        for m in 0..50u64 {
            f.learn(0, 0x0200_0000_0000 + m, 1, 0);
        }
        f.learn(0, 0x5254_0000_0001, 2, 0);
        assert_eq!(f.dump(0).iter().filter(|e| e.port == 1).count(), 10);
        assert_eq!(f.port_usage(1), (10, 10, 40));
        assert_eq!(f.lookup(0, 0x5254_0000_0001, 0), Some(2), "other ports learn as before");
        // Taking over another port's MAC is learning a new one too.
        f.learn(0, 0x5254_0000_0001, 1, 0);
        assert_eq!(f.lookup(0, 0x5254_0000_0001, 0), Some(2));
        // Expired entries stop counting at the next recount.
        f.recount(400);
        assert_eq!(f.port_usage(1).0, 0);
        f.learn(0, 0x0300_0000_0000, 1, 400);
        assert_eq!(f.lookup(0, 0x0300_0000_0000, 400), Some(1));
    }

    #[test]
    fn test_the_bucket_hash_is_keyed_per_table() {
        // Two tables place the same MACs differently: a guest cannot precompute collisions.
        let (a, b) = (Fdb::new(65536, 300), Fdb::new(65536, 300));
        let same = (0..64u64)
            .filter(|m| a.hash(key_of(0, *m)) >> a.shift == b.hash(key_of(0, *m)) >> b.shift)
            .count();
        assert!(same < 8, "{same} of 64 MACs in the same bucket in both tables");
    }

    #[test]
    fn test_full_bucket_evicts_oldest() {
        let f = Fdb::new(4, 300); // one bucket of four ways
        for m in 0..4u64 {
            f.learn(0, m, m as u16, m as u32);
        }
        f.learn(0, 99, 9, 10);
        assert_eq!(f.lookup(0, 0, 10), None, "oldest evicted");
        assert_eq!(f.lookup(0, 99, 10), Some(9));
        assert_eq!(f.lookup(0, 3, 10), Some(3));
    }

    #[test]
    fn test_flush_port_and_flush() {
        let f = Fdb::new(1024, 300);
        f.learn(0, 1, 1, 0);
        f.learn(0, 2, 2, 0);
        f.flush_port(1);
        assert_eq!(f.lookup(0, 1, 0), None);
        assert_eq!(f.lookup(0, 2, 0), Some(2));
        f.flush();
        assert!(f.dump(0).is_empty());
    }

    #[test]
    fn test_torn_entry_reads_as_miss() {
        let f = Fdb::new(4, 300);
        f.learn(0, 1, 1, 0);
        // Simulate a reader seeing a new key before its value: the old value's tag is wrong.
        let b = f.bucket(key_of(0, 1));
        let s = b.slots.iter().find(|s| s[0].load(Relaxed) == key_of(0, 1)).unwrap();
        s[0].store(key_of(0, 2), Relaxed);
        assert_eq!(f.lookup(0, 2, 0), None);
    }
}
