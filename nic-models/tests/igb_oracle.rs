//! The classifier against a transcription of QEMU's igb receive filter.
//!
//! `assign` below follows `igb_receive_assign()` in QEMU's `hw/net/igb_core.c` (read at commit
//! 00f76608a68dcd832c4a1b66694ef3e9cb52912f) and `e1000x_rx_vlan_filter()` in
//! `hw/net/e1000x_common.c`, statement by statement, on a register file, for the path a frame
//! from the wire takes with VMDq on (MRQC bit 0): no EtherType filters or PTP timestamps
//! (ETQF off), no RSS inside pools (VMOLR.RSSE off), no extended (double) VLAN, `external_tx`
//! NULL. Random register configurations and frames go to both; the pool bitmaps must agree.

use nic_models::classify::{Classifier, PoolOptions, RarEntry, Registers, TableSizes, Verdict, VlvfEntry};
use nic_models::regs::*;
use proptest::prelude::*;

/// The register file igb_receive_assign reads.
struct Mac {
    rctl: u32,
    rlpml: u32,
    ra: [u32; 32],
    ra2: [u32; 16],
    mta: [u32; 128],
    uta: [u32; 128],
    vfta: [u32; 128],
    vlvf: [u32; VLVF_ARRAY_SIZE],
    vmolr: [u32; 8],
    vt_ctl: u32,
    vfre: u32,
}

fn registers(r: &Registers) -> Mac {
    let mut m = Mac {
        rctl: r.rctl(),
        rlpml: u32::from(r.max_len),
        ra: [0; 32],
        ra2: [0; 16],
        mta: r.mta,
        uta: r.uta,
        vfta: r.vfta,
        vlvf: [0; VLVF_ARRAY_SIZE],
        vmolr: [0; 8],
        vt_ctl: r.vt_ctl(),
        vfre: r.vfre(),
    };
    for i in 0..RAR_ENTRIES_82576 {
        let (l, h) = r.ral_rah(i);
        let (t, k) = if i < 16 { (&mut m.ra[..], i) } else { (&mut m.ra2[..], i - 16) };
        t[2 * k] = l;
        t[2 * k + 1] = h;
    }
    for (i, v) in m.vlvf.iter_mut().enumerate() {
        *v = r.vlvf_reg(i);
    }
    for (i, v) in m.vmolr.iter_mut().enumerate() {
        *v = r.vmolr(i);
    }
    m
}

// static bool igb_rx_is_oversized(...)
fn igb_rx_is_oversized(size: usize, vlan_num: usize, lpe: bool, rlpml: u16) -> bool {
    let header_size = 14 + 4 * vlan_num;
    if lpe {
        size + 4 > rlpml as usize
    } else {
        size > header_size + 1500
    }
}

// bool e1000x_rx_vlan_filter(uint32_t *mac, const struct vlan_header *vhdr)
fn e1000x_rx_vlan_filter(mac: &Mac, tci: u16) -> bool {
    if mac.rctl & RCTL_VFE != 0 {
        let vfta = mac.vfta[((tci >> 5) & 0x7f) as usize];
        if vfta & (1 << (tci & 0x1f)) == 0 {
            return false;
        }
    }
    true
}

/// igb_receive_assign for a frame from the wire, VMDq on. `size` is the frame without FCS.
fn assign(mac: &Mac, f: &[u8]) -> u16 {
    const TA_SHIFT: [u32; 4] = [4, 3, 2, 0];
    let size = f.len();
    let mut queues: u16 = 0;
    let mut oversized: u16 = 0;
    let mut vlan_num = 0;
    let h_dest = &f[0..6];
    // VET = 0x8100 (its reset value); CTRL_EXT bit 26 (extended VLAN) off.
    if u16::from_be_bytes([f[12], f[13]]) == 0x8100 {
        vlan_num = 1;
    }
    let lpe = mac.rctl & RCTL_LPE != 0;
    let rlpml = mac.rlpml as u16;
    if mac.rctl & RCTL_SBP == 0 && igb_rx_is_oversized(size, vlan_num, lpe, rlpml) {
        return queues;
    }
    // (ETQF filters: none enabled.)
    let tci = u16::from_be_bytes([f[14], f[15]]);
    if vlan_num != 0 && !e1000x_rx_vlan_filter(mac, tci) {
        return queues;
    }
    let is_broadcast = h_dest.iter().all(|b| *b == 0xff);
    let is_multicast = h_dest[0] & 1 != 0;
    if is_broadcast {
        for i in 0..8 {
            if mac.vmolr[i] & VMOLR_BAM != 0 {
                queues |= 1 << i;
            }
        }
    } else {
        for k in (0..32).step_by(2) {
            let macp = &mac.ra[k..k + 2];
            if macp[1] & RAH_AV == 0 {
                continue;
            }
            let ra = [macp[0].to_le_bytes(), macp[1].to_le_bytes()].concat();
            if h_dest == &ra[0..6] {
                queues |= ((macp[1] & RAH_POOL_MASK) / RAH_POOL_1) as u16;
            }
        }
        for k in (0..16).step_by(2) {
            let macp = &mac.ra2[k..k + 2];
            if macp[1] & RAH_AV == 0 {
                continue;
            }
            let ra = [macp[0].to_le_bytes(), macp[1].to_le_bytes()].concat();
            if h_dest == &ra[0..6] {
                queues |= ((macp[1] & RAH_POOL_MASK) / RAH_POOL_1) as u16;
            }
        }
        if queues == 0 {
            let macp = if is_multicast { &mac.mta } else { &mac.uta };
            let mut f = TA_SHIFT[((mac.rctl >> RCTL_MO_SHIFT) & 3) as usize];
            f = ((u32::from(h_dest[5]) << 8 | u32::from(h_dest[4])) >> f) & 0xfff;
            if macp[(f >> 5) as usize] & (1 << (f & 0x1f)) != 0 {
                for i in 0..8 {
                    if mac.vmolr[i] & VMOLR_ROMPE != 0 {
                        queues |= 1 << i;
                    }
                }
            }
        }
        // (else if unicast && external_tx: *external_tx = false; external_tx is NULL here.)
    }
    if mac.rctl & RCTL_VFE != 0 {
        let mut mask: u16 = 0;
        if vlan_num != 0 {
            let vid = tci & 0xfff;
            for i in 0..VLVF_ARRAY_SIZE {
                if (mac.vlvf[i] & VLVF_VLANID_MASK) as u16 == vid && mac.vlvf[i] & VLVF_VLANID_ENABLE != 0 {
                    let poolsel = mac.vlvf[i] & VLVF_POOLSEL_MASK;
                    mask |= (poolsel >> VLVF_POOLSEL_SHIFT) as u16;
                }
            }
        } else {
            for i in 0..8 {
                if mac.vmolr[i] & VMOLR_AUPE != 0 {
                    mask |= 1 << i;
                }
            }
        }
        queues &= mask;
    }
    // is_unicast_ether_addr && !queues && !external_tx (NULL) && !DISABLE_DEF_POOL
    if !is_multicast && queues == 0 && mac.vt_ctl & VT_CTL_DISABLE_DEF_POOL == 0 {
        let def_pl = mac.vt_ctl & VT_CTL_DEFAULT_POOL_MASK;
        queues = 1 << (def_pl >> VT_CTL_DEFAULT_POOL_SHIFT);
    }
    queues &= mac.vfre as u16;
    if queues != 0 {
        for i in 0..8 {
            let lpe = mac.vmolr[i] & VMOLR_LPE != 0;
            let rlpml = (mac.vmolr[i] & VMOLR_RLPML_MASK) as u16;
            if queues & (1 << i) != 0 && igb_rx_is_oversized(size, vlan_num, lpe, rlpml) {
                oversized |= 1 << i;
            }
        }
        queues &= !oversized;
    }
    // (RSS inside the pool: VMOLR.RSSE off, so PQn = VFn.)
    queues
}

/// A handful of MACs, so that frames hit table entries often.
fn mac_from(pick: u8, unicast: bool) -> [u8; 6] {
    let b = pick % 6;
    let first = if unicast { 0x52 } else { 0x01 };
    match pick {
        255 => [0xff; 6],
        _ => [first, 0x54, 0x00, 0x00, b >> 1, b * 37],
    }
}

#[derive(Debug, Clone)]
struct Case {
    rar: Vec<(usize, u8, bool, u8)>,
    vlvf: Vec<(usize, u16, u8)>,
    pools: Vec<(bool, bool, bool, bool, bool, u16)>,
    default_pool: Option<u8>,
    vfe: bool,
    vfta: Vec<u16>,
    hash: Vec<(bool, u16)>,
    mo: u8,
    port_len: (bool, u16, bool),
    frame: (u8, bool, Option<u16>, usize),
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec((0usize..24, any::<u8>(), any::<bool>(), 0u8..=255), 0..8),
        prop::collection::vec((0usize..32, 0u16..6, any::<u8>()), 0..6),
        prop::collection::vec(
            (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), 1400u16..1600),
            8,
        ),
        prop::option::of(0u8..8),
        any::<bool>(),
        prop::collection::vec(0u16..6, 0..4),
        prop::collection::vec((any::<bool>(), 0u16..4096), 0..64),
        0u8..4,
        (any::<bool>(), 1400u16..1600, any::<bool>()),
        (any::<u8>(), any::<bool>(), prop::option::of(0u16..6), 46usize..1540),
    )
        .prop_map(|(rar, vlvf, pools, default_pool, vfe, vfta, hash, mo, port_len, frame)| Case {
            rar,
            vlvf,
            pools,
            default_pool,
            vfe,
            vfta,
            hash,
            mo,
            port_len,
            frame,
        })
}

fn build(c: &Case) -> (Classifier, Vec<u8>) {
    let mut cl = Classifier::new(TableSizes::I82576).unwrap();
    for &(i, pick, uni, pools) in &c.rar {
        cl.set_rar(i, Some(RarEntry { mac: mac_from(pick % 8, uni), pools: u64::from(pools) })).unwrap();
    }
    for &(i, vid, pools) in &c.vlvf {
        cl.set_vlvf(i, Some(VlvfEntry { vid, pools: u64::from(pools) })).unwrap();
    }
    for (i, &(enabled, aupe, bam, rompe, lpe, max_len)) in c.pools.iter().enumerate() {
        let o = PoolOptions {
            enabled,
            accept_untagged: aupe,
            accept_broadcast: bam,
            accept_hashed: rompe,
            long_packets: lpe,
            max_len,
            strip_vlan: false,
        };
        cl.set_pool(i as u8, o).unwrap();
    }
    cl.set_default_pool(c.default_pool).unwrap();
    cl.set_vlan_filter(c.vfe);
    for &v in &c.vfta {
        cl.set_vfta(v, true);
    }
    cl.set_hash_offset(c.mo);
    for &(mc, bit) in &c.hash {
        cl.set_hash(mc, bit, true);
    }
    let (lpe, max_len, sbp) = c.port_len;
    cl.set_port_lengths(lpe, max_len, sbp);
    let (pick, uni, vlan, len) = c.frame;
    let dst = if pick > 250 { [0xff; 6] } else { mac_from(pick % 8, uni) };
    let mut f = dst.to_vec();
    f.extend_from_slice(&[0x52, 0x54, 0, 0, 9, 9]);
    if let Some(vid) = vlan {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&(vid | 0x2000).to_be_bytes());
    }
    f.extend_from_slice(&[0x08, 0x00]);
    f.resize(f.len() + len, 0xab);
    (cl, f)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn classifier_agrees_with_qemus_igb_receive_assign(c in case()) {
        let (cl, frame) = build(&c);
        let want = assign(&registers(&cl.registers()), &frame);
        let got = match cl.classify(&frame) {
            Verdict::Pools(p) => p as u16,
            _ => 0,
        };
        prop_assert_eq!(got, want, "frame {:02x?} len {}", &frame[..18], frame.len());
    }
}

/// Also with hash hits: a frame whose destination's hash bit is set, so the ROMPE path runs.
#[test]
fn hashed_destinations_reach_rompe_pools_in_both() {
    let mut cl = Classifier::new(TableSizes::I82576).unwrap();
    let all = PoolOptions { enabled: true, accept_hashed: true, ..Default::default() };
    cl.set_pool(3, all).unwrap();
    cl.set_pool(5, PoolOptions { accept_hashed: false, ..all }).unwrap();
    cl.set_default_pool(None).unwrap();
    for mo in 0..4 {
        cl.set_hash_offset(mo);
        let dst = [0x01, 0x00, 0x5e, 0x01, 0x02, 0x03];
        let bit = cl.hash_bit(&dst);
        cl.set_hash(true, bit, true);
        let mut f = dst.to_vec();
        f.extend_from_slice(&[0x52, 0x54, 0, 0, 9, 9, 0x08, 0x00]);
        f.resize(60, 0);
        assert_eq!(cl.classify(&f), Verdict::Pools(1 << 3));
        assert_eq!(assign(&registers(&cl.registers()), &f), 1 << 3);
        cl.set_hash(true, bit, false);
        assert_eq!(cl.classify(&f), Verdict::NoPool);
        assert_eq!(assign(&registers(&cl.registers()), &f), 0);
    }
}
