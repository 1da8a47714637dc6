//! Port VLAN rules (802.1Q), with Open vSwitch's meaning.
//!
//! - **Access** port `vlan=N`: frames from the guest are untagged (or priority-tagged, VID 0)
//!   and belong to VLAN N; frames with any other tag are dropped. Frames to the guest leave
//!   untagged.
//! - **Trunk** port `trunk=A:B:..`: frames carry their VLAN in a tag; untagged frames are
//!   VLAN 0. Only listed VLANs pass, both ways. Frames leave tagged, VLAN 0 untagged.
//! - No VLAN setting: a trunk of every VLAN (OVS's default), so untagged traffic between
//!   unconfigured ports just works.

/// TPID of an 802.1Q tag.
pub const TPID_8021Q: u16 = 0x8100;

/// How a port treats VLANs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VlanMode {
    /// Untagged member of one VLAN (1..=4094).
    Access(u16),
    /// Tagged member of the listed VLANs; `None` = all.
    Trunk(Option<Box<VlanSet>>),
}

impl Default for VlanMode {
    fn default() -> Self {
        VlanMode::Trunk(None)
    }
}

/// A set of VLAN ids, one bit each.
#[derive(Clone, PartialEq, Eq)]
pub struct VlanSet([u64; 64]);

impl std::fmt::Debug for VlanSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl VlanSet {
    /// A set of the given ids.
    pub fn new(ids: impl IntoIterator<Item = u16>) -> Self {
        let mut s = VlanSet([0; 64]);
        for id in ids {
            let id = id & 0xfff;
            s.0[id as usize / 64] |= 1 << (id % 64);
        }
        s
    }

    /// Membership.
    #[inline(always)]
    pub fn contains(&self, id: u16) -> bool {
        let id = id & 0xfff;
        self.0[id as usize / 64] & (1 << (id % 64)) != 0
    }

    /// The ids, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        (0..4096u16).filter(|i| self.contains(*i))
    }
}

/// What to do to a frame's tag on its way from one port to another.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TagEdit {
    /// Copy as is.
    #[default]
    Keep,
    /// Remove the 4-byte tag after the MAC addresses.
    Pop,
    /// Insert a tag with this TCI after the MAC addresses.
    Push(u16),
    /// Replace the existing tag's TCI (a priority-tagged frame, VID 0, joining its VLAN).
    Retag(u16),
}

impl VlanMode {
    /// The VLAN of a frame arriving from the guest, `None` if the port does not accept it.
    /// `tci` is the tag's TCI if the frame is tagged.
    #[inline(always)]
    pub fn ingress(&self, tci: Option<u16>) -> Option<u16> {
        let vid = tci.map_or(0, |t| t & 0xfff);
        match self {
            VlanMode::Access(n) => (vid == 0).then_some(*n),
            VlanMode::Trunk(None) => Some(vid),
            VlanMode::Trunk(Some(set)) => set.contains(vid).then_some(vid),
        }
    }

    /// Whether this port carries `vlan`, and if so whether frames leave tagged.
    #[inline(always)]
    pub fn egress(&self, vlan: u16) -> Option<bool> {
        match self {
            VlanMode::Access(n) => (*n == vlan).then_some(false),
            VlanMode::Trunk(None) => Some(vlan != 0),
            VlanMode::Trunk(Some(set)) => set.contains(vlan).then_some(vlan != 0),
        }
    }

    /// The edit for a frame of `vlan` that arrived with `tci` (if tagged) and leaves on a
    /// port that wants it tagged (`out_tagged`). A kept tag keeps its priority bits.
    #[inline(always)]
    pub fn edit(tci: Option<u16>, vlan: u16, out_tagged: bool) -> TagEdit {
        match (tci, out_tagged) {
            (Some(t), true) if t & 0xfff == vlan => TagEdit::Keep,
            (Some(t), true) => TagEdit::Retag((t & 0xf000) | vlan), // priority-tagged in
            (Some(_), false) => TagEdit::Pop,
            (None, true) => TagEdit::Push(vlan),
            (None, false) => TagEdit::Keep,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_access_port_rules() {
        let p = VlanMode::Access(10);
        assert_eq!(p.ingress(None), Some(10));
        assert_eq!(p.ingress(Some(0x2000)), Some(10), "priority tag belongs to the access VLAN");
        assert_eq!(p.ingress(Some(10)), None, "tagged frames are refused, even with the same VID");
        assert_eq!(p.egress(10), Some(false));
        assert_eq!(p.egress(20), None);
    }

    #[test]
    fn test_trunk_with_list() {
        let p = VlanMode::Trunk(Some(Box::new(VlanSet::new([10, 20]))));
        assert_eq!(p.ingress(Some(20)), Some(20));
        assert_eq!(p.ingress(Some(30)), None);
        assert_eq!(p.ingress(None), None, "untagged is VLAN 0, not listed");
        assert_eq!(p.egress(10), Some(true));
        assert_eq!(p.egress(30), None);
    }

    #[test]
    fn test_default_trunk_all() {
        let p = VlanMode::default();
        assert_eq!(p.ingress(None), Some(0));
        assert_eq!(p.ingress(Some(0x0fff & 4000)), Some(4000));
        assert_eq!(p.egress(0), Some(false), "VLAN 0 leaves untagged");
        assert_eq!(p.egress(5), Some(true));
    }

    #[test]
    fn test_tag_edits() {
        assert_eq!(VlanMode::edit(None, 10, true), TagEdit::Push(10));
        assert_eq!(VlanMode::edit(Some(0xa00a), 10, true), TagEdit::Keep);
        assert_eq!(VlanMode::edit(Some(0xa00a), 10, false), TagEdit::Pop);
        assert_eq!(VlanMode::edit(None, 0, false), TagEdit::Keep);
        assert_eq!(VlanMode::edit(Some(0x6000), 10, true), TagEdit::Retag(0x600a));
    }
}
