//! The accelerator-module contract: how a NIC tier takes a live guest's virtio queue pair from
//! the switch's software path and gives it back, the guest noticing nothing.
//!
//! 1. **Admit** ([`admit`]): a tier may refuse (no free queue pair, a port it cannot serve, a
//!    vIOMMU it cannot follow), with a reason the user reads; the port stays on the software
//!    path.
//! 2. **Plug**: the switch stops serving the pair (under the queues' own locks, between two
//!    bursts), publishes every used entry, and hands each ring over as a
//!    [`virtq::RingHandoff`]: addresses, size, where it stopped, EVENT_IDX. The tier owns the
//!    rings from that state on (for Level 2 a [`nic_models::DirectPair`]'s halves).
//! 3. **Quiesce → drain → hand back** ([`hand_back`]): the tier stops taking anything new,
//!    completes its in-flight transmits and publishes every used entry, and hands each ring's
//!    state back; the software path resumes exactly there. The [`Ledger`] proves it: every
//!    descriptor taken from an available ring appears once in a used ring.
//!
//! Nothing here knows about ports, threads or sockets: the switch drives the contract from its
//! control thread and never blocks a polling thread for longer than one burst.
#![deny(missing_docs)]

use std::time::{Duration, Instant};

pub use nic_models::direct::Ledger;
use nic_models::direct::{DirectCounters, DirectTx, Wire};
use nic_models::rxq::RxQueue;
use virtq::{RingHandoff, RingState};

/// A tier that can be plugged under a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Level 1: the device demultiplexes the wire by the port's MACs (and VLAN) and writes
    /// its frames straight into the guest's posted receive buffers; its transmits leave from
    /// the port's own pool. The rings stay the software path's: nothing is handed over.
    L1,
    /// Level 2: direct queue pairs, the device driving the guest's own rings.
    L2,
    /// Level 3: an SR-IOV virtual function, a direct queue pair with its own policy (MAC,
    /// port VLAN, spoof checking, trust, link state, rates) and the NIC's embedded switch
    /// carrying unicast between VFs.
    L3,
}

impl Tier {
    /// The NIC level (`nic:...,level=N`) a tier needs.
    pub fn level(self) -> u8 {
        match self {
            Tier::L1 => 1,
            Tier::L2 => 2,
            Tier::L3 => 3,
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tier::L1 => "l1",
            Tier::L2 => "l2",
            Tier::L3 => "l3",
        })
    }
}

impl std::str::FromStr for Tier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "l1" | "1" => Ok(Tier::L1),
            "l2" | "2" => Ok(Tier::L2),
            "l3" | "3" => Ok(Tier::L3),
            _ => Err(format!("tier '{s}' is none of l1, l2, l3")),
        }
    }
}

/// Why a tier would not take a port (the port stays on the software path).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No NIC of the tier is on the switch.
    #[error("no Level {n} NIC on this switch: add a port nic:IFNAME,level={n} (or nic:wire:NAME,level={n})", n = .0.level())]
    NoDevice(Tier),
    /// Every queue pair the device has is in use.
    #[error("the {tier} NIC '{nic}' has no free queue pair ({pairs} in use): unplug another port or give it more pools (pools=N)")]
    NoFreePair {
        /// The tier.
        tier: Tier,
        /// The NIC port.
        nic: String,
        /// Pairs it has.
        pairs: u16,
    },
    /// Already plugged.
    #[error("port '{0}' is already plugged")]
    AlreadyPlugged(String),
    /// Not plugged (for unplug).
    #[error("port '{0}' is not plugged")]
    NotPlugged(String),
    /// Not a guest port, or one whose guest has not started its rings.
    #[error("port '{port}' cannot be plugged: {why}")]
    Port {
        /// The port.
        port: String,
        /// What is wrong with it and what to do.
        why: String,
    },
    /// The guest negotiated something the tier cannot serve.
    #[error("port '{port}': the {tier} device cannot serve {what}; the port stays on the software path")]
    Features {
        /// The port.
        port: String,
        /// The tier.
        tier: Tier,
        /// What.
        what: String,
    },
}

/// What a tier needs to know about a port before it takes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortFacts {
    /// The guest's rings are running (connected, DRIVER_OK, rings enabled).
    pub running: bool,
    /// Queue pairs the guest uses.
    pub pairs: u16,
    /// The guest's addresses are IOVAs behind a vIOMMU.
    pub viommu: bool,
    /// An egress shaper holds the port's receive ring (used entries held back).
    pub egress_shaped: bool,
    /// Already plugged.
    pub plugged: bool,
    /// The guest's rings are packed (virtio 1.1): the device models walk split rings only.
    pub packed: bool,
}

/// What a tier's device offers now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceFacts {
    /// The tier.
    pub tier: Tier,
    /// Queue pairs it has for guests.
    pub pairs: u16,
    /// Of which in use.
    pub in_use: u16,
    /// Whether its DMA engine follows a vIOMMU (asks the frontend on a miss).
    pub follows_viommu: bool,
}

/// Whether `dev` takes `port` (named `name`, on the NIC port `nic`); the reason if not.
pub fn admit(name: &str, nic: &str, port: &PortFacts, dev: &DeviceFacts) -> Result<(), Refusal> {
    let bad = |why: &str| Err(Refusal::Port { port: name.into(), why: why.into() });
    if port.plugged {
        return Err(Refusal::AlreadyPlugged(name.into()));
    }
    if !port.running {
        return bad("its guest has not started its rings (not connected, or the driver is not up yet)");
    }
    if port.pairs != 1 {
        return Err(Refusal::Features {
            port: name.into(),
            tier: dev.tier,
            what: format!("{} queue pairs (it plugs single-pair ports)", port.pairs),
        });
    }
    if port.packed {
        return Err(Refusal::Features {
            port: name.into(),
            tier: dev.tier,
            what: "packed rings (its queue engines walk split rings only)".into(),
        });
    }
    if port.viommu && !dev.follows_viommu {
        return Err(Refusal::Features {
            port: name.into(),
            tier: dev.tier,
            what: "a guest behind a vIOMMU (its DMA engine does not ask the frontend for translations)"
                .into(),
        });
    }
    if port.egress_shaped {
        return bad("an egress shaper holds its receive ring (remove the shaper: ctl policy PORT)");
    }
    if dev.in_use >= dev.pairs {
        return Err(Refusal::NoFreePair { tier: dev.tier, nic: nic.into(), pairs: dev.pairs });
    }
    Ok(())
}

/// What a hand-back gives the software path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handover {
    /// The receive ring, at the state to resume from.
    pub rx: RingHandoff,
    /// The transmit ring.
    pub tx: RingHandoff,
    /// What the tier took and completed while it owned them.
    pub ledger: Ledger,
    /// In-flight transmits the drain completed.
    pub drained: u64,
    /// The guest is owed an interrupt on its receive ring (the giver signals before the
    /// hand-over: the next owner counts what was published as signalled).
    pub rx_irq: bool,
    /// The same for its transmit ring.
    pub tx_irq: bool,
    /// How long quiesce, drain and hand-back took.
    pub took: Duration,
}

/// Quiesces, drains and hands back a pair whose halves the caller holds exclusively (so
/// nothing new reaches them: that is the quiesce). `start` is the (rx, tx) state at plug;
/// `wire` takes in-flight transmits. The ledger is balanced unless the tier broke the
/// contract.
pub fn hand_back(
    rx: &mut RxQueue,
    tx: &mut DirectTx,
    start: (RingState, RingState),
    wire: &mut dyn FnMut(Vec<u8>) -> Result<(), Wire>,
    k: &mut DirectCounters,
) -> Handover {
    let t0 = Instant::now();
    let (drained, tx_irq) = tx.drain(wire, k);
    let rx_irq = rx.publish();
    let (rxh, txh) = (rx.handoff(), tx.handoff());
    Handover {
        rx: rxh,
        tx: txh,
        ledger: Ledger::between(start, (rxh.state, txh.state)),
        drained,
        rx_irq,
        tx_irq,
        took: t0.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(in_use: u16) -> DeviceFacts {
        DeviceFacts { tier: Tier::L2, pairs: 2, in_use, follows_viommu: false }
    }

    fn port() -> PortFacts {
        PortFacts { running: true, pairs: 1, ..PortFacts::default() }
    }

    #[test]
    fn a_tier_refuses_what_it_cannot_serve_and_says_what_to_do() {
        assert_eq!(admit("a", "up", &port(), &dev(1)), Ok(()));
        let why = |p: PortFacts, d: DeviceFacts| admit("a", "up", &p, &d).unwrap_err().to_string();
        assert!(why(PortFacts { running: false, ..port() }, dev(0)).contains("not started its rings"));
        assert!(why(PortFacts { pairs: 4, ..port() }, dev(0)).contains("4 queue pairs"));
        assert!(why(PortFacts { viommu: true, ..port() }, dev(0)).contains("vIOMMU"));
        assert!(why(PortFacts { packed: true, ..port() }, dev(0)).contains("packed rings"));
        assert_eq!(
            admit(
                "a",
                "up",
                &PortFacts { viommu: true, ..port() },
                &DeviceFacts { follows_viommu: true, ..dev(0) }
            ),
            Ok(())
        );
        assert!(why(PortFacts { egress_shaped: true, ..port() }, dev(0)).contains("egress shaper"));
        assert!(why(PortFacts { plugged: true, ..port() }, dev(0)).contains("already plugged"));
        let full = why(port(), dev(2));
        assert!(full.contains("no free queue pair") && full.contains("pools=N"), "{full}");
        assert_eq!("L2".parse::<Tier>(), Ok(Tier::L2));
        assert_eq!("l1".parse::<Tier>(), Ok(Tier::L1));
        assert_eq!("l3".parse::<Tier>(), Ok(Tier::L3));
        assert!("l4".parse::<Tier>().unwrap_err().contains("none of l1, l2, l3"));
        assert!(Refusal::NoDevice(Tier::L1).to_string().contains("level=1"));
    }
}
