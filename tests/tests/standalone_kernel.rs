//! Standalone mode (`spec.proxy: ipvs-operator`) against the real kernel, in
//! the test VM (`make test-kernel`): the dummy interface that holds
//! standalone Services' addresses, made, adopted, corrected and removed over
//! rtnetlink, as `ip` (a tool nobody here wrote) sees it.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;

use ipvs_operator::agent::interface::{AddressChanges, INTERFACE, Interface, connect};

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
