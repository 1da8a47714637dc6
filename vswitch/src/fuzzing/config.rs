//! Operator input: `PortConfig::parse`, the TOML switch config, control-socket JSON requests,
//! and the unit and address parsers. The first byte picks the parser, the rest is the text.
//!
//! Invariants: no panic (validation included); what parses serialises and parses back to the
//! same value.

use std::str::FromStr;

use crate::control::Request;
use crate::policy::spoof::{SpoofConfig, SpoofFilter};
use crate::policy::{BitRate, ByteSize};
use crate::{PortConfig, SwitchConfig};

/// The libFuzzer entry point.
pub fn fuzz(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    match which % 6 {
        0 => port_spec(&text),
        1 => switch_toml(&text),
        2 => request_json(&text),
        3 => {
            if let Ok(r) = BitRate::from_str(&text) {
                assert_eq!(BitRate::from_str(&r.to_string()).ok(), Some(r), "{text:?} → {r}");
            }
        }
        4 => {
            if let Ok(b) = ByteSize::from_str(&text) {
                assert_eq!(ByteSize::from_str(&b.to_string()).ok(), Some(b), "{text:?} → {b}");
            }
        }
        _ => {
            let cfg = SpoofConfig { macs: vec![], ips: Some(vec![text.to_string()]) };
            let _ = SpoofFilter::new(&cfg, [0x52, 0, 0, 0, 0, 1]);
            if let Some(m) = crate::l2::parse_mac(&text) {
                let s = crate::l2::format_mac(crate::l2::mac_from_bytes(m));
                assert_eq!(crate::l2::parse_mac(&s), Some(m), "{text:?} → {s}");
            }
        }
    }
}

fn port_spec(text: &str) {
    let Ok(p) = PortConfig::parse(text) else { return };
    let _ = p.validate();
    let _ = p.policy().validate(p.mac_bytes());
    let json = serde_json::to_string(&p).expect("a parsed port serialises");
    let back: PortConfig = serde_json::from_str(&json).expect("a serialised port parses");
    assert_eq!(back, p, "port spec {text:?} → {json}");
}

fn switch_toml(text: &str) {
    let Ok(c) = toml::from_str::<SwitchConfig>(text) else { return };
    let _ = c.validate();
    let Ok(out) = toml::to_string(&c) else { return }; // some values have no TOML form
    let back: SwitchConfig = toml::from_str(&out).expect("serialised config parses");
    assert_eq!(back, c, "config → {out}");
}

fn request_json(text: &str) {
    let Ok(r) = serde_json::from_str::<Request>(text) else { return };
    match &r {
        Request::PortAdd { port } => {
            let _ = port.validate();
        }
        Request::PolicySet { policy, .. } => {
            let _ = policy.validate([0x52, 0, 0, 0, 0, 1]);
        }
        _ => {}
    }
    let json = serde_json::to_value(&r).expect("a request serialises");
    let back: Request = serde_json::from_value(json.clone()).expect("a serialised request parses");
    assert_eq!(serde_json::to_value(&back).expect("serialises"), json, "request {text:?}");
}
