//! The forwarding table: (VLAN, MAC) → port, learned from traffic, aged out.
//!
//! Shared by every polling thread without a lock. Each slot is two atomic words: a key
//! (valid bit, VLAN, MAC) and a value (port, a 16-bit tag of the key, last-seen second).
//! Writers store the value before the key; a reader that races a rewrite sees a key whose tag
//! does not match the value and treats it as a miss (the packet floods). At worst a racing
//! reader forwards one frame to a port the MAC just left; VLAN membership is checked again at
//! egress, so isolation never depends on this table. Entries are refreshed at most once a
//! second, so a busy MAC does not dirty the line on every packet.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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

/// The table.
pub struct Fdb {
    buckets: Box<[Bucket]>,
    shift: u32,
    aging_secs: u32,
}

#[inline(always)]
fn key_of(vlan: u16, mac: Mac) -> u64 {
    VALID | ((vlan as u64 & 0xfff) << 48) | (mac & 0xffff_ffff_ffff)
}

#[inline(always)]
fn hash(key: u64) -> u64 {
    key.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[inline(always)]
fn tag_of(key: u64) -> u64 {
    (hash(key) >> 16) & 0xffff
}

#[inline(always)]
fn val_of(port: u16, key: u64, now: u32) -> u64 {
    ((port as u64) << 48) | (tag_of(key) << 32) | now as u64
}

impl Fdb {
    /// A table of at least `entries` slots whose entries expire after `aging_secs`.
    pub fn new(entries: usize, aging_secs: u32) -> Self {
        let nb = (entries / WAYS).max(1).next_power_of_two();
        let buckets = (0..nb).map(|_| Bucket::default()).collect();
        Fdb { buckets, shift: 64 - nb.trailing_zeros(), aging_secs: aging_secs.max(1) }
    }

    #[inline(always)]
    fn bucket(&self, key: u64) -> &Bucket {
        let i = if self.shift == 64 { 0 } else { (hash(key) >> self.shift) as usize };
        &self.buckets[i]
    }

    #[inline(always)]
    fn live(&self, key: u64, val: u64, now: u32) -> bool {
        (val >> 32) & 0xffff == tag_of(key) && now.wrapping_sub(val as u32) <= self.aging_secs
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
                if (val >> 48) as u16 != port || val as u32 != now || !self.live(key, val, now) {
                    s[1].store(val_of(port, key, now), Relaxed);
                }
                return;
            }
        }
        self.learn_new(b, key, port, now);
    }

    #[cold]
    fn learn_new(&self, b: &Bucket, key: u64, port: u16, now: u32) {
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
            let age = now.wrapping_sub(v as u32);
            if age >= oldest {
                oldest = age;
                victim = i;
            }
        }
        let s = &b.slots[victim];
        s[1].store(val_of(port, key, now), Relaxed);
        s[0].store(key, Relaxed);
    }

    /// Forgets every entry.
    pub fn flush(&self) {
        self.retain(|_| false);
    }

    /// Forgets the entries of one port (it was removed or reconnected).
    pub fn flush_port(&self, port: u16) {
        self.retain(|p| p != port);
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
                        age_secs: now.wrapping_sub(v as u32),
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
