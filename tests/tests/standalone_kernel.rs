//! Standalone mode (`spec.proxy: ipvs-operator`) against the real kernel, in
//! the test VM (`make test-kernel`): the dummy interface that holds
//! standalone Services' addresses, made, adopted, corrected and removed over
//! rtnetlink, as `ip` (a tool nobody here wrote) sees it, and real
//! connections through an owned virtual service at an address on it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Command;

use ipvs::{IpvsClient, OwnedService, Service as VirtualService, ServiceKey, plan_owned};
use ipvs_operator::agent::interface::{AddressChanges, INTERFACE, Interface, connect};
use traffic::netns::{NetNs, link, project_binary};

/// `ip ARGS…`'s output; panics when it fails.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The addresses `ip` lists on the interface, with their prefix lengths.
fn listed() -> BTreeSet<String> {
    ip(&["-o", "addr", "show", "dev", INTERFACE])
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet" || *w == "inet6")?;
            words.next().map(str::to_string)
        })
        .collect()
}

fn set(addresses: &[&str]) -> BTreeSet<IpAddr> {
    addresses.iter().map(|a| a.parse().expect("an address")).collect()
}

#[tokio::test]
async fn the_dummy_interface_holds_exactly_the_wanted_addresses_and_is_adopted_after_a_restart() {
    let _ = Command::new("ip").args(["link", "del", INTERFACE]).status();
    let interface = Interface::ensure(connect().expect("rtnetlink"), INTERFACE).await.expect("made");
    let link = ip(&["-d", "link", "show", INTERFACE]);
    assert!(link.contains("dummy"), "{link}");

    let wanted = set(&["10.96.0.10", "192.0.2.7", "fd00::10"]);
    let changes = interface.sync(&wanted).await.expect("addresses added");
    assert_eq!(changes.added.len(), 3, "{changes:?}");
    let expected: BTreeSet<String> = ["10.96.0.10/32", "192.0.2.7/32", "fd00::10/128"].map(String::from).into();
    assert_eq!(listed(), expected, "host addresses only, no range");
    assert_eq!(interface.sync(&wanted).await.expect("again"), AddressChanges::default(), "nothing to do: nothing done");

    // A restarted agent adopts the interface and what it holds.
    let index = interface.index();
    drop(interface);
    let adopted = Interface::ensure(connect().expect("rtnetlink"), INTERFACE).await.expect("adopted");
    assert_eq!(adopted.index(), index, "the same interface");
    // Someone adds an address by hand: it goes, as does one no longer wanted.
    ip(&["addr", "add", "10.96.0.99/32", "dev", INTERFACE]);
    let changes = adopted.sync(&set(&["10.96.0.10", "fd00::10"])).await.expect("corrected");
    let removed: BTreeSet<IpAddr> = changes.removed.iter().copied().collect();
    assert_eq!((changes.added, removed), (vec![], set(&["10.96.0.99", "192.0.2.7"])));
    assert_eq!(listed(), ["10.96.0.10/32", "fd00::10/128"].map(String::from).into());

    adopted.delete().await.expect("deleted");
    let gone = Command::new("ip").args(["link", "show", INTERFACE]).output().expect("running ip");
    assert!(!gone.status.success(), "the interface is gone");
    assert!(Interface::existing(connect().expect("rtnetlink"), INTERFACE).await.expect("looked up").is_none());
}

/// `traffic-client` in `ns`: `connections` TCP connections to `target`; the share each backend answered.
fn shares(ns: &NetNs, target: &str, connections: usize) -> BTreeMap<String, f64> {
    let client = project_binary("traffic-client");
    let n = connections.to_string();
    let json = ns.exec(&[client.to_str().expect("a UTF-8 path"), "--connect", target, "--connections", &n, "--concurrency", "4"]);
    let report: serde_json::Value = serde_json::from_str(&json).expect("the client's JSON");
    assert_eq!(report["errors"], 0, "{report}");
    let counts = report["counts"].as_object().expect("counts");
    counts.iter().map(|(name, c)| (name.clone(), c.as_f64().unwrap_or(0.0) / connections as f64)).collect()
}

#[tokio::test]
async fn connections_to_an_address_on_the_down_dummy_interface_follow_the_owned_weights() {
    // A client "pod" and two backend "pods" routed through a node that holds
    // the VIP on ipvs-op0 (made by us, left down, as kube-ipvs0 is).
    let node = NetNs::new("sk-node");
    let client = NetNs::new("sk-client");
    node.no_dad();
    client.no_dad();
    link(&client, "eth0", "10.40.0.2/24", &node, "to-client", "10.40.0.1/24");
    client.exec(&["ip", "route", "add", "default", "via", "10.40.0.1"]);
    client.exec(&["ip", "addr", "add", "fd00:40::2/64", "dev", "eth0", "nodad"]);
    node.exec(&["ip", "addr", "add", "fd00:40::1/64", "dev", "to-client", "nodad"]);
    client.exec(&["ip", "-6", "route", "add", "default", "via", "fd00:40::1"]);
    node.sysctls(&[("net.ipv4.ip_forward", "1"), ("net.ipv6.conf.all.forwarding", "1")]);
    let server = project_binary("traffic-server");
    let mut backends = Vec::new();
    for i in 1..=2 {
        let mut be = NetNs::new(&format!("sk-b{i}"));
        link(&be, "eth0", &format!("10.41.{i}.2/24"), &node, &format!("to-b{i}"), &format!("10.41.{i}.1/24"));
        be.exec(&["ip", "route", "add", "default", "via", &format!("10.41.{i}.1")]);
        be.exec(&["ip", "addr", "add", &format!("fd00:41:{i}::2/64"), "dev", "eth0", "nodad"]);
        node.exec(&["ip", "addr", "add", &format!("fd00:41:{i}::1/64"), "dev", &format!("to-b{i}"), "nodad"]);
        be.exec(&["ip", "-6", "route", "add", "default", "via", &format!("fd00:41:{i}::1")]);
        let name = format!("backend-{i}");
        let line = be.spawn_until_line(&[server.to_str().expect("a UTF-8 path"), "--listen", "[::]:8080", "--name", &name]);
        assert!(line.starts_with("listening"), "{line}");
        backends.push(be);
    }
    let handle = node.enter(connect).expect("rtnetlink in the node");
    let interface = Interface::ensure(handle, INTERFACE).await.expect("made");
    interface.sync(&set(&["10.96.0.10", "fd00:96::10"])).await.expect("the VIPs");
    let link = node.exec(&["ip", "link", "show", INTERFACE]);
    assert!(link.contains("state DOWN"), "left down: {link}");

    let vip = ServiceKey::tcp("10.96.0.10:80".parse().expect("an address"));
    let vip6 = ServiceKey::tcp("[fd00:96::10]:80".parse().expect("an address"));
    let owned = |key: ServiceKey, weights: &[(&str, u16)]| OwnedService {
        service: VirtualService::new(key, "wrr"),
        destinations: weights.iter().map(|(a, w)| (a.parse().expect("an address"), *w)).collect(),
    };
    let want = |weights: &[(&str, u16)]| owned(vip, weights);
    let v6 = owned(vip6, &[("[fd00:41:1::2]:8080", 3), ("[fd00:41:2::2]:8080", 1)]);
    let mut ipvs = node.enter(IpvsClient::new).expect("IPVS in the node");
    let mut converge = |desired: &[OwnedService]| {
        let plan = plan_owned(desired, &ipvs.dump().expect("dump"), |k| *k == vip || *k == vip6, |_, _| false);
        assert!(ipvs.apply(&plan.writes).iter().all(Result::is_ok), "{plan:?}");
    };
    converge(&[want(&[("10.41.1.2:8080", 3), ("10.41.2.2:8080", 1)]), v6.clone()]);

    // From a pod on another path (forwarded) and from the node itself (host network), both families.
    for (who, ns) in [("a pod", &client), ("the node", &node)] {
        for target in ["10.96.0.10:80", "[fd00:96::10]:80"] {
            let split = shares(ns, target, 400);
            let one = split.get("backend-1").copied().unwrap_or(0.0);
            assert!((one - 0.75).abs() <= 0.06, "from {who} to {target}: backend-1 has {one:.2} of {split:?}, weights 3:1");
        }
    }

    // Backend 2 removed (idle: deleted at once); every connection goes to backend 1.
    converge(&[want(&[("10.41.1.2:8080", 3)])]);
    assert_eq!(shares(&client, "10.96.0.10:80", 50).get("backend-1").copied(), Some(1.0));
    converge(&[]);
    interface.delete().await.expect("deleted");
    drop(backends);
}
