//! Errors. The first part of every message is iproute2 6.1's own text where
//! iproute2 has one, so a user sees what `ip link set DEV vf ...` would have
//! printed; the rest says what to do.

use std::io;

/// A `vf N ...` clause that iproute2 would refuse (or that this crate refuses
/// on purpose, see each variant).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A word is missing: `vf` without N, N without any option, or an option
    /// without its value.
    #[error("Command line is not complete. Try option \"help\" ({0})")]
    Incomplete(&'static str),
    /// N is not a number in 0..=2147483647.
    #[error(
        "Error: argument \"{0}\" is wrong: Invalid \"vf\" value (N is the VF index, \
         0 to sriov_numvfs-1)"
    )]
    InvalidVf(String),
    /// The MAC is not colon-separated hex bytes.
    #[error("\"{0}\" is invalid lladdr. (write the MAC as 6 hex bytes, e.g. 02:00:00:00:00:01)")]
    InvalidMac(String),
    /// The MAC has a length other than an Ethernet address's.
    #[error("Invalid address length {0} - must be 6 bytes (a VF MAC is 6 hex bytes)")]
    MacLength(usize),
    /// VLAN id not a number or above 4095.
    #[error(
        "Error: argument \"{0}\" is wrong: Invalid \"vlan\" value (a VLAN id is 0-4095; \
         0 removes the port VLAN)"
    )]
    InvalidVlan(String),
    /// qos not a number, or above 7. iproute2 checks only that it is a
    /// number and leaves 0-7 to the driver (which answers EINVAL); this crate
    /// checks the range itself.
    #[error(
        "Error: argument \"{0}\" is wrong: Invalid \"qos\" value (qos is the 802.1p \
         priority, 0-7)"
    )]
    InvalidQos(String),
    /// `proto` is neither a protocol name nor a number.
    #[error("Error: argument \"{0}\" is wrong: protocol is invalid (use 802.1Q or 802.1ad)")]
    InvalidProto(String),
    /// `proto` names a protocol other than 802.1Q and 802.1ad.
    #[error(
        "Error: argument \"{0}\" is wrong: Invalid \"vlan protocol\" value - supported \
         802.1Q, 802.1ad"
    )]
    UnsupportedProto(String),
    /// An on/off option got another word.
    #[error("Error: argument of \"{option}\" must be one of \"off\", \"on\", not \"{value}\"")]
    OnOff {
        /// The option.
        option: &'static str,
        /// What was given.
        value: String,
    },
    /// `state` got another word.
    #[error(
        "Error: argument \"{0}\" is wrong: Invalid \"state\" value (use auto, enable or \
         disable)"
    )]
    InvalidState(String),
    /// A rate is not a number in 0..=4294967295.
    #[error("Error: argument \"{value}\" is wrong: Invalid \"{what}\" value (Mbit/s, 0 = no limit)")]
    InvalidRate {
        /// `max tx rate` or `min tx rate`, as iproute2 names them.
        what: &'static str,
        /// What was given.
        value: String,
    },
    /// min_tx_rate above a non-zero max_tx_rate.
    #[error(
        "Invalid min_tx_rate {min} - must be <= max_tx_rate {max} (lower min_tx_rate, \
         or raise max_tx_rate; 0 means unlimited)"
    )]
    MinAboveMax {
        /// The guaranteed rate asked for.
        min: u32,
        /// The limit it exceeds.
        max: u32,
    },
    /// A word that is not a VF option. iproute2 hands it back to `ip link set`,
    /// which takes it for a second device name.
    #[error(
        "Error: either \"dev\" is duplicate, or \"{0}\" is a garbage. (VF options are mac, \
         vlan [qos] [proto], spoofchk, trust, state, max_tx_rate, min_tx_rate, query_rss)"
    )]
    Garbage(String),
    /// An option given twice. iproute2 sends both attributes and the kernel
    /// keeps the last; this crate refuses instead, so that one clause has one
    /// meaning.
    #[error("\"{0}\" is given twice in one vf clause (give each option once)")]
    Duplicate(&'static str),
    /// `m`/`ma`: iproute2 reads them as `mac` but also counts them as
    /// `max_tx_rate` and then sends an extra IFLA_VF_RATE; refused here.
    #[error("\"{0}\" is ambiguous (write mac, max_tx_rate or min_tx_rate in full)")]
    Ambiguous(String),
    /// An iproute2 VF option this crate does not implement.
    #[error("\"{0}\" is not supported here ({1})")]
    Unsupported(&'static str, &'static str),
}

/// A netlink answer that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed netlink message: {0}")]
pub struct DecodeError(pub String);

impl From<netlink_packet_core::DecodeError> for DecodeError {
    fn from(e: netlink_packet_core::DecodeError) -> Self {
        DecodeError(e.to_string())
    }
}

/// Failure to apply or read VF policy on a real PF.
#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    /// The NETLINK_ROUTE socket could not be opened or set up.
    #[error("Cannot open netlink socket: {0}")]
    Socket(io::Error),
    /// send/recv on the socket failed.
    #[error("Cannot talk to rtnetlink: {0}")]
    Io(io::Error),
    /// The kernel did not answer in time.
    #[error("no answer from the kernel within {0} s (is the netns or device going away?)")]
    Timeout(u64),
    /// The device name resolves to no ifindex in this network namespace.
    #[error(
        "Cannot find device \"{0}\" (check `ip link show`; is it in another network \
         namespace?)"
    )]
    NoDevice(String),
    /// The kernel refused the request.
    #[error("{}\n{}", kernel_line(*errno, extack.as_deref()), errno_hint(*errno, dev))]
    Kernel {
        /// Positive errno.
        errno: i32,
        /// The extended-ack message, if the kernel sent one.
        extack: Option<String>,
        /// The device asked about.
        dev: String,
    },
    /// The device's hardware address is not 6 bytes long.
    #[error("Invalid address length 6 - must be {0} bytes (the PF is not Ethernet)")]
    AddressLength(usize),
    /// The device reports VFs without `IFLA_VF_RATE` (a pre-3.16 kernel).
    #[error("VF min/max rate API not supported (give both max_tx_rate and min_tx_rate)")]
    RateApi,
    /// The device reports VFs, but not this one.
    #[error(
        "Cannot find VF {vf} (see `cat /sys/class/net/{dev}/device/sriov_numvfs`; VFs \
         are 0 to sriov_numvfs-1)"
    )]
    NoSuchVf {
        /// The VF asked for.
        vf: u32,
        /// The PF.
        dev: String,
    },
    /// The arguments are refused once the current rates are known.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The kernel's answer does not parse.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl RtnlError {
    /// The errno, for errors the kernel reported.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RtnlError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// The line iproute2 prints for a refused request: the extended ack as
/// `Error: MSG.` when the kernel sent one, `RTNETLINK answers: STRERROR`
/// otherwise (lib/libnetlink.c `rtnl_talk_error`).
pub fn kernel_line(errno: i32, extack: Option<&str>) -> String {
    match extack {
        Some(m) if !m.is_empty() => {
            let dot = if m.ends_with('.') { "" } else { "." };
            format!("Error: {m}{dot}")
        }
        _ => format!("RTNETLINK answers: {}", strerror(errno)),
    }
}

/// The C library's text for `errno` (what iproute2's `strerror` prints).
pub fn strerror(errno: i32) -> String {
    // std formats an OS error as "TEXT (os error N)", TEXT from strerror_r.
    let full = io::Error::from_raw_os_error(errno).to_string();
    let suffix = format!(" (os error {errno})");
    full.strip_suffix(&suffix).unwrap_or(&full).to_string()
}

fn errno_hint(errno: i32, dev: &str) -> String {
    match errno {
        libc::EOPNOTSUPP => format!(
            "{dev}'s driver has no such VF operation (a veth or other non-SR-IOV device has \
             none; igb has no `state` or `query_rss`)"
        ),
        libc::EINVAL => format!(
            "the VF index must be below `cat /sys/class/net/{dev}/device/sriov_numvfs`, or \
             the driver refused a value (igb: min_tx_rate must be 0, max_tx_rate needs the \
             link up and at most its speed)"
        ),
        libc::EPERM => "changing VF policy needs CAP_NET_ADMIN in the device's network \
                        namespace (run as root)"
            .to_string(),
        libc::ENODEV => format!("no device {dev} in this network namespace"),
        libc::EBUSY => format!("{dev}'s driver is busy (VFs being created or reset?); retry"),
        _ => format!("the kernel refused the request for {dev}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_kernel_line_is_iproute2s() {
        assert_eq!(kernel_line(libc::EOPNOTSUPP, None), "RTNETLINK answers: Operation not supported");
        assert_eq!(kernel_line(libc::EINVAL, Some("")), "RTNETLINK answers: Invalid argument");
        assert_eq!(kernel_line(libc::EINVAL, Some("bad VF")), "Error: bad VF.");
        assert_eq!(kernel_line(libc::EINVAL, Some("bad VF.")), "Error: bad VF.");
    }

    #[test]
    fn test_kernel_error_says_what_to_check() {
        let e = |errno| RtnlError::Kernel { errno, extack: None, dev: "eth1".into() };
        let text = e(libc::EINVAL).to_string();
        assert!(text.starts_with("RTNETLINK answers: Invalid argument\n"), "{text}");
        assert!(text.contains("/sys/class/net/eth1/device/sriov_numvfs"), "{text}");
        assert!(e(libc::EPERM).to_string().contains("CAP_NET_ADMIN"));
        assert!(e(libc::EOPNOTSUPP).to_string().contains("no such VF operation"));
        assert!(e(libc::ENODEV).to_string().starts_with("RTNETLINK answers: No such device\n"));
        assert_eq!(e(libc::EPERM).errno(), Some(libc::EPERM));
    }
}
