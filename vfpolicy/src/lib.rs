//! SR-IOV VF policy in iproute2's vocabulary.
//!
//! A PF (physical function) hands out VFs (virtual functions); the host sets
//! each VF's policy through the PF with
//!
//! ```text
//! ip link set DEV vf N [mac MAC] [vlan VID [qos Q] [proto 802.1Q|802.1ad]]
//!                      [spoofchk on|off] [trust on|off] [state auto|enable|disable]
//!                      [max_tx_rate MBPS] [min_tx_rate MBPS] [query_rss on|off]
//! ```
//!
//! This crate speaks exactly that vocabulary, for `vswitch vf DEV N ...` and
//! `vswitch vf DEV show`, both on the modelled NIC and on a real Linux PF:
//!
//! | word | meaning | netlink attribute (inside `IFLA_VFINFO_LIST { IFLA_VF_INFO }`) |
//! |---|---|---|
//! | `mac` | the VF's MAC, which the PF's switch steers to it | `IFLA_VF_MAC {u32 vf; u8 mac[32]}` |
//! | `vlan VID qos Q` | port VLAN: tag inserted on tx, required/stripped on rx; 0 = none | `IFLA_VF_VLAN {vf, vlan, qos}` |
//! | `... proto 802.1ad` | the port VLAN as an S-tag | `IFLA_VF_VLAN_LIST { IFLA_VF_VLAN_INFO {vf, vlan, qos, __be16 proto} }` |
//! | `spoofchk` | drop VF frames whose source MAC/VLAN is not its own | `IFLA_VF_SPOOFCHK {vf, setting}` |
//! | `trust` | let the VF change its MAC, go promiscuous, ... | `IFLA_VF_TRUST {vf, setting}` |
//! | `state` | VF link: follow the PF (`auto`), always up, always down | `IFLA_VF_LINK_STATE {vf, 0\|1\|2}` |
//! | `max_tx_rate`/`min_tx_rate` | tx limit / guarantee, Mbit/s, 0 = none | `IFLA_VF_RATE {vf, min, max}` |
//! | `query_rss` | let the VF read the PF's RSS key and table | `IFLA_VF_RSS_QUERY_EN {vf, setting}` |
//!
//! [`parse_vf_args`] reads the words into a [`VfSet`]; [`format_vf_lines`]
//! prints [`VfInfo`]s as `ip link show` prints its `vf N` lines, and
//! [`vf_json`] as `ip -j link show` does; [`vf_link_answer`] builds the
//! kernel's RTM_NEWLINK for a PF with given VFs (for a modelled NIC, and as
//! test input to iproute2 itself).
//!
//! # The messages, as iproute2 6.1 sends them
//!
//! `ip link set DEV vf N ...` sends, on NETLINK_ROUTE:
//!
//! 1. [`name_request`]: RTM_GETLINK by name (`ll_link_get`) to learn DEV's
//!    ifindex.
//! 2. With `mac` only: [`addr_len_request`], an RTM_GETLINK by index whose
//!    answer's `IFLA_ADDRESS` length the MAC must match (`nl_get_ll_addr_len`).
//! 3. With exactly one of `max_tx_rate`/`min_tx_rate`: [`rate_dump_request`],
//!    a dump of all links with `IFLA_EXT_MASK = RTEXT_FILTER_VF`, from which
//!    the VF's current other rate is read (`ipaddr_get_vf_rate`); then
//!    min > max (max non-zero) is refused.
//! 4. [`set_request`]: RTM_NEWLINK, `NLM_F_REQUEST|NLM_F_ACK`, ifinfomsg with
//!    DEV's ifindex, `IFLA_VFINFO_LIST { IFLA_VF_INFO { ... } }`; the answer
//!    is the ACK or an errno (with an extended-ack text on newer kernels).
//!
//! [`Rtnl::set_vf`] sends 1–4 with the same bytes (only `nlmsg_seq`
//! differs; the byte test in `tests/` checks every message against
//! `strace ip`). `ip link show DEV` sends 1 and then [`show_request`]
//! (RTM_GETLINK by name, `AF_PACKET`, `RTEXT_FILTER_VF`); [`Rtnl::vfs`] does
//! the same and reads the answer with [`parse_vf_list`].
//!
//! Not reproduced: before step 1 `ip link set` sends an empty RTM_NEWLINK
//! probe (`iplink_have_newlink`, a check for pre-2.6.19 kernels, answered
//! ENODEV); `ip link show` also looks up the name of the veth/macvlan peer it
//! prints as `DEV@PEER`. Neither bears on VF policy.
//!
//! # What the kernel checks
//!
//! `rtnl_newlink` finds DEV by ifindex (ENODEV) and needs CAP_NET_ADMIN in
//! DEV's network namespace (EPERM). `do_setlink` requires every entry of
//! `IFLA_VFINFO_LIST` to be an `IFLA_VF_INFO` of valid attribute lengths
//! (EINVAL), then `do_setvfinfo` applies the attributes in a fixed order —
//! MAC, VLAN, VLAN_LIST, TX_RATE, RATE, SPOOFCHK, LINK_STATE, RSS_QUERY_EN,
//! TRUST — whatever their order in the message, each through the driver's
//! `ndo_set_vf_*` (EOPNOTSUPP when the driver has none: veth has none at all,
//! igb has no link-state or RSS-query op), and **stops at the first error:
//! the attributes applied before it stay applied**. A VF index of INT_MAX or
//! more, and more than one VLAN_LIST entry, are refused by the core; the VF
//! index against `sriov_numvfs`, VLAN > 4095, qos > 7 and rate limits are
//! checked by the driver (usually EINVAL).
//!
//! Readback: with `RTEXT_FILTER_VF` the kernel adds `IFLA_NUM_VF` for a
//! device on a bus and, if its driver has `ndo_get_vf_config`,
//! `IFLA_VFINFO_LIST` with one `IFLA_VF_INFO` per VF (MAC, broadcast, VLAN,
//! rate, tx rate, spoofchk, link state, RSS query, trust, VLAN list, stats);
//! spoofchk, trust and RSS query are -1 when the driver does not report them
//! (`None` in [`VfInfo`]).

#![deny(missing_docs)]

mod answer;
mod args;
mod error;
mod msg;
mod reply;
mod rtnl;
mod show;
mod types;

pub use answer::vf_link_answer;
pub use args::parse_vf_args;
pub use error::{kernel_line, strerror, DecodeError, ParseError, RtnlError};
pub use msg::{
    addr_len_request, get_vf_request, name_request, rate_dump_request, resolve_rates, set_request,
    show_request, RTM_GETLINK, RTM_NEWLINK,
};
pub use reply::parse_vf_list;
pub use rtnl::{Rtnl, RECV_TIMEOUT};
pub use show::{format_vf_lines, mac_text, vf_json};
pub use types::{LinkState, VfInfo, VfSet, VfStats, VlanProto, VlanSet};
