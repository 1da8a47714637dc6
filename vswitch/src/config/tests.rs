//! The configuration's parsing and checks.
use super::*;

#[test]
fn test_port_spec_forms() {
    let p = PortConfig::parse("vm1=/tmp/vm1.sock,client,vlan=10").unwrap();
    assert!(p.client);
    assert_eq!(p.vlan_mode(), VlanMode::Access(10));
    let t = PortConfig::parse("up=/tmp/u.sock,trunk=10:20:30,queues=2").unwrap();
    assert_eq!(t.trunk, vec![10, 20, 30]);
    assert_eq!(t.queues, 2);
    assert!(t.offloads, "offloads are on unless turned off");
    assert!(!PortConfig::parse("a=/tmp/a.sock,offloads=off").unwrap().offloads);
    assert!(PortConfig::parse("a=/tmp/a.sock,offloads=maybe").is_err());
    assert_eq!(PortConfig::parse("a=/s").unwrap().vlan_mode(), VlanMode::Trunk(None));
}

#[test]
fn test_packed_rings_are_a_guest_ports_opt_in() {
    assert!(!PortConfig::parse("a=/tmp/a.sock").unwrap().packed, "off unless asked for");
    let p = PortConfig::parse("a=/tmp/a.sock,packed=on").unwrap();
    assert!(p.packed);
    // It round-trips through the TOML form, and is left out of it while off.
    let cfg =
        SwitchConfig { ports: vec![p, PortConfig::parse("b=/tmp/b.sock").unwrap()], ..Default::default() };
    let text = toml::to_string(&cfg).unwrap();
    assert_eq!(text.matches("packed").count(), 1, "{text}");
    let back: SwitchConfig = toml::from_str(&text).unwrap();
    assert_eq!(back.ports.iter().map(|p| p.packed).collect::<Vec<_>>(), [true, false]);
    let e = PortConfig::parse("a=/tmp/a.sock,packed=yes").unwrap_err().to_string();
    assert!(e.contains("packed must be 'on' or 'off'"), "{e}");
    let e = PortConfig::parse("up=tap:vsw0,packed=on").unwrap_err().to_string();
    assert!(e.contains("packed=on is for a guest's port"), "{e}");
}

#[test]
fn test_port_spec_errors_say_what() {
    let e = PortConfig::parse("vm1").unwrap_err().to_string();
    assert!(e.contains("missing '='"), "{e}");
    let e = PortConfig::parse("vm1=/s,vlan=5000").unwrap_err().to_string();
    assert!(e.contains("outside 1..4094"), "{e}");
    let e = PortConfig::parse("vm1=/s,vlan=5,trunk=6").unwrap_err().to_string();
    assert!(e.contains("not both"), "{e}");
    let e = PortConfig::parse("vm1=/s,bogus").unwrap_err().to_string();
    assert!(e.contains("unknown option 'bogus'"), "{e}");
    let e = PortConfig::parse("vm1=/s,police=10 furlongs").unwrap_err().to_string();
    assert!(e.contains("unknown rate unit"), "{e}");
    let e = PortConfig::parse("vm1=/s,shape=0").unwrap_err().to_string();
    assert!(e.contains("above 0"), "{e}");
}

#[test]
fn test_port_spec_policy_options() {
    let p = PortConfig::parse("vm1=/s,police=100M,shape=50Mbit,anti-spoof").unwrap();
    assert_eq!(p.ingress.unwrap().rate, BitRate(100_000_000));
    assert_eq!(p.egress.unwrap().rate, BitRate(50_000_000));
    assert_eq!(p.anti_spoof, Some(SpoofConfig::default()));
}

#[test]
fn test_toml_port_policy() {
    let cfg: SwitchConfig = toml::from_str(
        r#"
        [[port]]
        name = "a"
        socket = "/tmp/a.sock"
        ingress = { rate = "100Mbit", excess_burst = "32KiB" }
        egress = { rate = "1G", burst = "1MiB", queue = 512 }
        anti_spoof = { macs = ["52:54:00:00:00:0a"], ips = ["10.0.0.10", "fd00::a"] }
        "#,
    )
    .unwrap();
    cfg.validate().unwrap();
    let p = cfg.ports[0].policy();
    assert_eq!(p.egress.unwrap().queue, Some(512));
    let bad: SwitchConfig =
        toml::from_str("[[port]]\nname = \"a\"\nsocket = \"/s\"\nanti_spoof = { ips = [\"10.0.0.999\"] }\n")
            .unwrap();
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("port 'a'") && e.contains("10.0.0.999"), "{e}");
}

#[test]
fn test_toml_config() {
    let cfg: SwitchConfig = toml::from_str(
        r#"
        pmd_cores = [0]
        [[port]]
        name = "a"
        socket = "/tmp/a.sock"
        vlan = 10
        [[port]]
        name = "b"
        socket = "/tmp/b.sock"
        client = true
        "#,
    )
    .unwrap();
    assert_eq!(cfg.ports.len(), 2);
    assert_eq!(cfg.fdb_aging_secs, 300);
    assert_eq!(cfg.batch_wait_us, 0, "batching is off unless asked for");
    cfg.validate().unwrap();
    let batched: SwitchConfig = toml::from_str("batch_wait_us = 10").unwrap();
    assert_eq!(batched.batch_wait_us, 10);
    assert_eq!(batched.unsealed_memory, UnsealedMemory::Refuse, "unsealed memory is refused by default");
    assert_eq!(batched.max_guest_mem(), DEFAULT_MAX_GUEST_MEM);
    let guarded: SwitchConfig =
        toml::from_str("unsealed_memory = \"guard\"\nmax_guest_mem = \"64GiB\"").unwrap();
    assert_eq!(guarded.unsealed_memory, UnsealedMemory::Guard);
    assert_eq!(guarded.max_guest_mem(), 64 << 30);
    assert!(toml::from_str::<SwitchConfig>("unsealed_memory = \"maybe\"").is_err());
    batched.validate().unwrap();
    let e = SwitchConfig { batch_wait_us: 5000, ..batched }.validate().unwrap_err().to_string();
    assert!(e.contains("batch_wait_us 5000 is above 1000"), "{e}");
}

#[test]
fn test_derived_mac_is_local_unicast_and_stable() {
    let p = PortConfig::parse("vm1=/s").unwrap();
    assert_eq!(p.mac_bytes(), p.mac_bytes());
    assert_eq!(p.mac_bytes()[0] & 1, 0);
}

#[test]
fn test_nic_port_spec_and_its_errors() {
    let p = PortConfig::parse("up=nic:tap0,level=1,pools=4,filters=128,trunk=10:20").unwrap();
    assert_eq!(p.tap.as_deref(), Some("tap0"));
    assert_eq!(p.nic, Some(NicConfig { level: 1, pools: 4, filters: 128, ..NicConfig::default() }));
    assert_eq!(
        PortConfig::parse("up=nic:t0,itr=50").unwrap().nic.unwrap().itr_profile(),
        Ok(nic_models::Profile::Fixed(50_000))
    );
    assert!(!PortConfig::parse("up=nic:tap0,lro=off").unwrap().nic.unwrap().lro);
    assert_eq!(PortConfig::parse("up=nic:tap0").unwrap().nic, Some(NicConfig::default()));
    let err = |s: &str| PortConfig::parse(s).unwrap_err().to_string();
    assert!(err("up=nic:tap0,itr=fast").contains("not adaptive, off or microseconds"));
    assert!(err("up=tap:tap0,level=1").contains("level= is for nic: ports"));
    assert!(err("up=nic:tap0,level=4").contains("not a tier"));
    assert_eq!(PortConfig::parse("up=nic:tap0,level=3,vfs=4").unwrap().nic.unwrap().pools, 5);
    assert!(err("up=nic:tap0,level=3,vlan=5").contains("leave vlan= off"));
    assert_eq!(PortConfig::parse("up=nic:tap0,level=2").unwrap().nic.unwrap().level, 2);
    assert!(err("up=nic:tap0,pools=1").contains("outside 2..64"));
    assert!(err("up=nic:tap0,filters=0").contains("outside 1..4096"));
    let g = PortConfig::parse("vm=/s,nic-rate=10M,nic-weight=3").unwrap();
    assert_eq!((g.nic_rate.map(|r| r.0), g.nic_weight), (Some(10_000_000), Some(3)));
    assert_eq!(PortConfig::parse("g=/tmp/g.sock,accel=l2").unwrap().accel.as_deref(), Some("l2"));
    assert!(err("g=/tmp/g.sock,accel=l9").contains("none of l1, l2, l3"));
    assert_eq!(PortConfig::parse("g=/tmp/g.sock,accel=l1").unwrap().accel.as_deref(), Some("l1"));
    assert!(err("up=nic:wire:w,accel=l2").contains("for guest ports"));
    assert!(err("vm=/s,nic-weight=0").contains("outside 1..100"));
    assert!(err("up=nic:tap0,nic-rate=1M").contains("a guest port's"));
    let w = PortConfig::parse("up=nic:wire:w-1,level=0").unwrap();
    assert!(w.tap.is_none() && w.is_uplink() && w.socket.as_os_str().is_empty());
    assert_eq!(w.nic, Some(NicConfig { level: 0, wire: Some("w-1".into()), ..NicConfig::default() }));
    assert!(err("up=nic:wire:a b").contains("wire name 'a b'"));
    assert!(err("up=nic:wire:w,queues=2").contains("one queue pair"));
    assert!(err("up=nic:wire:w,mtu=9000").contains("mtu= is for tap, afpacket and afxdp devices"));
    let t: SwitchConfig =
        toml::from_str("[[port]]\nname = \"up\"\nnic = { wire = \"w\", level = 1 }\n").unwrap();
    assert!(t.ports[0].is_uplink());
    t.ports[0].validate().unwrap();
    let t: SwitchConfig =
        toml::from_str("[[port]]\nname = \"up\"\ntap = \"t\"\nnic = { wire = \"w\" }\n").unwrap();
    assert!(t.ports[0].validate().unwrap_err().to_string().contains("not both"));
    let t: SwitchConfig =
        toml::from_str("[[port]]\nname = \"up\"\ntap = \"t1\"\nnic = { level = 0 }\n").unwrap();
    assert_eq!(t.ports[0].nic, Some(NicConfig { level: 0, ..NicConfig::default() }));
    let t: SwitchConfig = toml::from_str("[[port]]\nname = \"up\"\nsocket = \"/x\"\nnic = {}\n").unwrap();
    assert!(t.ports[0].validate().unwrap_err().to_string().contains("needs a wire"));
}

#[test]
fn test_tap_port_spec_and_its_errors() {
    let p = PortConfig::parse("up=tap:tap0,queues=2,mtu=9000,vlan=5").unwrap();
    assert_eq!((p.tap.as_deref(), p.queues, p.mtu, p.vlan), (Some("tap0"), 2, Some(9000), Some(5)));
    assert!(p.socket.as_os_str().is_empty());
    // An uplink has a network segment behind it: it may learn more MACs than a guest.
    assert_eq!(p.mac_limit(), UPLINK_MAC_LIMIT);
    assert_eq!(PortConfig::parse("up=tap:tap0,max-macs=50").unwrap().mac_limit(), 50);
    assert_eq!(PortConfig::parse("g=/run/g.sock").unwrap().mac_limit(), crate::l2::fdb::DEFAULT_MAC_LIMIT);
    let err = |s: &str| PortConfig::parse(s).unwrap_err().to_string();
    assert!(err("up=tap:tap0,client").contains("client mode is for sockets"));
    assert!(err("up=tap:waytoolongname0123").contains("1-15 bytes"));
    assert!(err("up=tap:tap0,mtu=20000").contains("outside 68.."));
    assert!(err("g=/run/x.sock,mtu=9000").contains("mtu= is for tap, afpacket and afxdp devices"));
    let a = PortConfig::parse("up=afpacket:eth1,queues=4,mtu=9000,trunk=10:20").unwrap();
    assert_eq!(
        (a.afpacket.as_deref(), a.queues, a.mtu, a.tap.as_deref()),
        (Some("eth1"), 4, Some(9000), None)
    );
    assert!(a.is_uplink() && a.socket.as_os_str().is_empty());
    assert!(err("up=afpacket:eth1,client").contains("client mode is for sockets"));
    assert!(err("up=afpacket:waytoolongname0123").contains("1-15 bytes"));
    assert!(err("up=afpacket:eth1,level=1").contains("level= is for nic: ports"));
    let x = PortConfig::parse("up=afxdp:eth2,queues=2,mode=skb,mtu=3000,vlan=4").unwrap();
    assert_eq!(
        (x.afxdp.as_deref(), x.xdp_mode, x.queues, x.mtu, x.vlan),
        (Some("eth2"), Some(crate::uplink::afxdp::XdpMode::Skb), 2, Some(3000), Some(4))
    );
    assert!(x.is_uplink() && x.socket.as_os_str().is_empty() && x.afpacket.is_none());
    assert_eq!(PortConfig::parse("up=afxdp:eth2").unwrap().xdp_mode, None, "auto unless given");
    let file: SwitchConfig =
        toml::from_str("[[port]]\nname = \"up\"\nafxdp = \"eth2\"\nxdp_mode = \"zerocopy\"\nqueues = 4\n")
            .unwrap();
    let f = &file.ports[0];
    assert_eq!(
        (f.afxdp.as_deref(), f.xdp_mode, f.queues),
        (Some("eth2"), Some(crate::uplink::afxdp::XdpMode::Zerocopy), 4)
    );
    assert!(f.validate().is_ok() && f.is_uplink(), "{:?}", f.validate());
    assert!(err("up=afxdp:eth2,mode=fast").contains("auto, zerocopy, copy or skb"));
    assert!(err("up=afpacket:eth1,mode=copy").contains("mode= is for afxdp: ports"));
    assert!(err("up=afxdp:eth2,client").contains("client mode is for sockets"));
    assert!(err("up=afxdp:waytoolongname0123").contains("1-15 bytes"));
    let t =
        PortConfig::parse("t=vxlan:10.0.0.2,vni=42,local=10.0.0.1,remote=10.0.0.3,csum=off,vlan=7").unwrap();
    let tc = t.tunnel.clone().unwrap();
    assert_eq!(
        (tc.vni, tc.remotes.len(), tc.local, tc.csum, tc.port(), t.vlan),
        (42, 2, Some("10.0.0.1".parse().unwrap()), false, 4789, Some(7))
    );
    assert!(t.is_uplink() && t.socket.as_os_str().is_empty());
    assert_eq!(PortConfig::parse("t=geneve:fd00::2").unwrap().tunnel.unwrap().port(), 6081);
    assert!(err("t=vxlan:nowhere").contains("not an IP address"));
    assert!(err("t=vxlan:10.0.0.2,vni=16777216").contains("outside 0..16777215"));
    assert!(err("t=vxlan:10.0.0.2,local=fd00::1").contains("all IPv4 or all IPv6"));
    assert!(err("t=vxlan:10.0.0.2,queues=2").contains("one queue"));
    assert!(err("g=/s.sock,vni=3").contains("vni= is for vxlan: and geneve: ports"));
    let t: SwitchConfig = toml::from_str("[[port]]\nname = \"up\"\ntap = \"tap1\"\n").unwrap();
    t.validate().unwrap();
    assert_eq!(t.ports[0].tap.as_deref(), Some("tap1"));
    let t: SwitchConfig = toml::from_str("[[port]]\nname = \"up\"\n").unwrap();
    assert!(t.validate().unwrap_err().to_string().contains("needs a socket path"));
}

#[test]
fn test_fdb_entries_sizes_the_table_and_is_bounded() {
    let cfg: SwitchConfig = toml::from_str("fdb_entries = 300000").unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.fdb_entries(), 300000);
    // Four slots a bucket, a power of two of buckets.
    assert_eq!(crate::l2::fdb::Fdb::new(cfg.fdb_entries(), 300).capacity(), 1 << 19);
    assert_eq!(SwitchConfig::default().fdb_entries(), DEFAULT_FDB_ENTRIES as usize);
    for bad in ["fdb_entries = 2", "fdb_entries = 4294967295"] {
        let e = toml::from_str::<SwitchConfig>(bad).unwrap().validate().unwrap_err().to_string();
        assert!(e.contains("the forwarding table's slots"), "{e}");
    }
}
