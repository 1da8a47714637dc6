//! Which flow a frame belongs to, for spreading a multi-queue port's traffic over its receive
//! queues: a flow always lands on the same queue (so it stays in order), different flows
//! spread. The hash covers what RSS covers: IP addresses and, for TCP and UDP outside
//! fragments, the ports; frames that are not IP hash on their MACs.

/// Bytes of a frame the hash may look at (a tagged IPv6 header and the ports behind it).
pub const FLOW_LOOK: usize = 18 + 40 + 4;

#[inline(always)]
fn mix(h: u64, x: u64) -> u64 {
    (h ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29)
}

/// The flow hash of a frame from its first bytes (up to [`FLOW_LOOK`]; fewer for a short
/// frame). Never fails: whatever cannot be parsed hashes on what is there.
pub fn flow_hash(b: &[u8]) -> u32 {
    let be16 = |i: usize| b.get(i..i + 2).map_or(0, |x| u16::from_be_bytes([x[0], x[1]]));
    let word =
        |i: usize, n: usize| b.get(i..i + n).map_or(0, |x| x.iter().fold(0u64, |a, &y| a << 8 | y as u64));
    let (mut l3, mut et) = (14, be16(12));
    if et == super::vlan::TPID_8021Q {
        (l3, et) = (18, be16(16));
    }
    let mut h = 0x5bd1_e995u64;
    let (proto, l4) = match et {
        0x0800 if b.len() >= l3 + 20 => {
            h = mix(h, word(l3 + 12, 8));
            let fragment = be16(l3 + 6) & 0x3fff != 0;
            let proto = if fragment { 0 } else { b[l3 + 9] };
            (proto, l3 + (b[l3] & 0xf) as usize * 4)
        }
        0x86dd if b.len() >= l3 + 40 => {
            for k in 0..4 {
                h = mix(h, word(l3 + 8 + 8 * k, 8));
            }
            (b[l3 + 6], l3 + 40)
        }
        _ => {
            // Not IP (or too short to tell): the MAC pair.
            return (mix(mix(h, word(0, 6)), word(6, 6)) >> 32) as u32;
        }
    };
    if matches!(proto, 6 | 17) {
        h = mix(h, word(l4, 4) | (proto as u64) << 32);
    }
    (mix(h, proto as u64) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp4(sport: u16, dport: u16, tag: bool) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        if tag {
            f.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
        }
        let n = f.len();
        f[n - 2..].copy_from_slice(&[0x08, 0x00]);
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        f.extend(ip);
        f.extend(sport.to_be_bytes());
        f.extend(dport.to_be_bytes());
        f.extend([0u8; 30]);
        f
    }

    #[test]
    fn test_a_flow_hashes_the_same_and_flows_spread() {
        let a = flow_hash(&udp4(1000, 5201, false));
        assert_eq!(a, flow_hash(&udp4(1000, 5201, false)));
        // Payload bytes past the ports do not matter.
        let mut f = udp4(1000, 5201, false);
        let n = f.len();
        f[n - 1] = 9;
        assert_eq!(a, flow_hash(&f));
        // 64 flows over 2 and 4 queues: every queue gets some.
        for q in [2u32, 4] {
            let mut per = vec![0; q as usize];
            for p in 0..64 {
                per[(flow_hash(&udp4(40000 + p, 5201, false)) % q) as usize] += 1;
            }
            assert!(per.iter().all(|&k| k >= 64 / q as usize / 3), "{q} queues: {per:?}");
        }
        assert_ne!(flow_hash(&udp4(1, 2, true)), 0);
    }

    #[test]
    fn test_fragments_and_non_ip_hash_on_what_they_have() {
        let mut frag = udp4(1000, 5201, false);
        frag[14 + 6] = 0x20; // MF: later fragments carry no ports
        let mut frag2 = udp4(2000, 80, false);
        frag2[14 + 6] = 0x20;
        assert_eq!(flow_hash(&frag), flow_hash(&frag2), "fragments of one datagram stay together");
        let mut arp = udp4(1, 2, false);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let _ = flow_hash(&arp);
        for n in 0..40 {
            let _ = flow_hash(&udp4(1, 2, true)[..n]); // short frames never panic
        }
    }
}
