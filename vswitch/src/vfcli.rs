//! `vswitch vf DEV ...`: SR-IOV VF policy in iproute2's words, for a Level 3 NIC model of a
//! running switch or a real Linux PF (over rtnetlink, the messages `ip link set DEV vf N ...`
//! sends).
//!
//! DEV is looked up among the running switch's ports first; a name the switch does not have
//! (or no switch running) is a Linux network device.

use std::path::Path;

use vswitch::control::{request, ClientError, Request, VfReport};

/// What the words after DEV ask for.
#[derive(Debug, PartialEq, Eq)]
enum Verb {
    Show,
    Attach(u32, String),
    Detach(u32),
    Set(Vec<String>),
}

fn vf_index(w: Option<&String>) -> Result<u32, String> {
    let w = w.ok_or("a VF number is missing (0 .. sriov_numvfs - 1)")?;
    w.parse().map_err(|_| format!("Invalid \"vf\" value: '{w}' is not a VF number"))
}

fn verb(words: &[String]) -> Result<Verb, String> {
    match words.first().map(String::as_str) {
        None => Err("say what to do: show, attach N PORT, detach N, or N [mac ..] [vlan ..] ...".into()),
        Some("show") if words.len() == 1 => Ok(Verb::Show),
        Some("show") => Err(format!("'show' takes nothing after it, not '{}'", words[1..].join(" "))),
        Some("attach") => {
            let n = vf_index(words.get(1))?;
            match words.get(2..) {
                Some([port]) => Ok(Verb::Attach(n, port.clone())),
                _ => Err("usage: vswitch vf DEV attach N PORT".into()),
            }
        }
        Some("detach") if words.len() == 2 => Ok(Verb::Detach(vf_index(words.get(1))?)),
        Some("detach") => Err("usage: vswitch vf DEV detach N".into()),
        Some(_) => Ok(Verb::Set(words.to_vec())),
    }
}

/// Where DEV lives.
enum Target {
    Model,
    Kernel,
}

fn target(control: &Path, dev: &str) -> Result<Target, String> {
    match request(control, &Request::VfShow { dev: dev.into() }) {
        Ok(_) => Ok(Target::Model),
        Err(ClientError::Connect { .. }) => Ok(Target::Kernel),
        Err(ClientError::Refused(e)) if e.starts_with("no port named") => Ok(Target::Kernel),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs `vswitch vf`.
pub fn run(control: &Path, json: bool, dev: &str, words: Vec<String>) -> Result<(), String> {
    let json = json || words.iter().any(|w| w == "--json" || w == "-j");
    let words: Vec<String> = words.into_iter().filter(|w| w != "--json" && w != "-j").collect();
    let verb = verb(&words)?;
    match target(control, dev)? {
        Target::Model => model(control, json, dev, verb),
        Target::Kernel => kernel(json, dev, verb),
    }
}

fn model(control: &Path, json: bool, dev: &str, verb: Verb) -> Result<(), String> {
    let req = match verb {
        Verb::Show => Request::VfShow { dev: dev.into() },
        Verb::Attach(vf, port) => Request::VfAttach { dev: dev.into(), vf, port },
        Verb::Detach(vf) => Request::VfDetach { dev: dev.into(), vf },
        Verb::Set(args) => Request::Vf { dev: dev.into(), args },
    };
    let show = matches!(req, Request::VfShow { .. });
    let v = request(control, &req).map_err(|e| e.to_string())?;
    let r: VfReport = serde_json::from_value(v).map_err(|e| format!("unexpected reply: {e}"))?;
    for n in &r.notes {
        eprintln!("vswitch: note: {n}");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    } else if show {
        print!("{}", model_text(&r));
    }
    Ok(())
}

/// The model's VFs as `ip link show` prints a PF's, each followed by the port it is given to
/// and its counters.
fn model_text(r: &VfReport) -> String {
    let mut out = format!("{}: Level 3 NIC model, {} VFs, link {} Mbit/s\n", r.dev, r.num_vfs, r.link_mbps);
    for (i, info) in r.vfs.iter().enumerate() {
        out.push_str(&vfpolicy::format_vf_lines(std::slice::from_ref(info), false));
        let port = match (&r.ports[i], r.plugged[i]) {
            (Some(p), true) => format!("port {p} (plugged)"),
            (Some(p), false) => format!("port {p} (not running)"),
            (None, _) => "no port".into(),
        };
        let s = info.stats.unwrap_or_default();
        out.push_str(&format!(
            "        {port}; RX: {} packets {} bytes {} bcast {} mcast {} dropped; TX: {} packets {} bytes {} dropped\n",
            s.rx_packets, s.rx_bytes, s.broadcast, s.multicast, s.rx_dropped, s.tx_packets, s.tx_bytes, s.tx_dropped
        ));
    }
    out.push_str(&format!("    embedded switch: {} unicast frames VF to VF\n", r.veb_frames));
    out
}

fn kernel(json: bool, dev: &str, verb: Verb) -> Result<(), String> {
    let mut nl = vfpolicy::Rtnl::open().map_err(|e| e.to_string())?;
    match verb {
        Verb::Show => {
            let (num, vfs) = nl.vfs(dev).map_err(|e| e.to_string())?;
            if json {
                let v = serde_json::json!({ "dev": dev, "num_vfs": num, "vfs": vfs });
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                match num {
                    Some(n) => println!("{dev}: {n} VFs"),
                    None => println!("{dev}: no SR-IOV (the device reports no VFs)"),
                }
                print!("{}", vfpolicy::format_vf_lines(&vfs, false));
            }
            Ok(())
        }
        Verb::Set(args) => {
            let set = vfpolicy::parse_vf_args(&args).map_err(|e| e.to_string())?;
            nl.set_vf(dev, &set).map_err(|e| e.to_string())
        }
        Verb::Attach(..) | Verb::Detach(_) => Err(format!(
            "{dev} is not a port of the running switch: a real VF is given to a guest by its driver \
             (vfio-pci) or to the switch as an uplink; attach/detach are for Level 3 NIC models"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn verbs() {
        assert_eq!(verb(&w("show")), Ok(Verb::Show));
        assert_eq!(verb(&w("attach 2 g1")), Ok(Verb::Attach(2, "g1".into())));
        assert_eq!(verb(&w("detach 0")), Ok(Verb::Detach(0)));
        assert_eq!(verb(&w("0 mac 02:00:00:00:00:01")), Ok(Verb::Set(w("0 mac 02:00:00:00:00:01"))));
        assert!(verb(&w("attach x g1")).unwrap_err().contains("Invalid \"vf\" value"));
        assert!(verb(&w("attach 1")).unwrap_err().contains("usage"));
        assert!(verb(&[]).unwrap_err().contains("show, attach"));
    }
}
