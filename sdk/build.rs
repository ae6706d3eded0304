//! `wit_bindgen::generate!` reads `wit/policy/` at compile time; tell cargo so
//! that a change to the interface rebuilds the SDK (and every policy with it).
//! The WIT file is the one source of the interface's version: it is passed on
//! as `IPVS_POLICY_INTERFACE_VERSION` ([`INTERFACE_VERSION`](crate)).
use std::path::Path;

fn main() {
    println!("cargo::rerun-if-changed=wit");
    let wit = Path::new("wit/policy/policy.wit");
    let text = std::fs::read_to_string(wit).unwrap_or_else(|e| panic!("{}: {e}", wit.display()));
    let version = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("package ipvs-operator:policy@"))
        .and_then(|rest| rest.strip_suffix(';'))
        .unwrap_or_else(|| panic!("{}: no `package ipvs-operator:policy@VERSION;` line", wit.display()));
    println!("cargo::rustc-env=IPVS_POLICY_INTERFACE_VERSION={version}");
}
