//! `wit_bindgen::generate!` reads `wit/` at compile time; tell cargo so that a
//! change to the interface rebuilds the SDK (and every policy with it).
fn main() {
    println!("cargo::rerun-if-changed=wit");
}
