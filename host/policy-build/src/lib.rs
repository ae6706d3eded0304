//! Build-script helper shared by `host/build.rs` (the built-in policies, which
//! the binary embeds) and `host/fixtures/build.rs` (the test fixture policies,
//! which only tests use).
//!
//! [`embed`] builds policy crates of this workspace to wasm32-wasip2 components
//! with a nested `cargo build` and writes a Rust file of
//! `(name, include_bytes!(…))` pairs into `OUT_DIR` for the caller to
//! `include!`.
//!
//! The nested build has its own target directory, `target/wasm`: sharing the
//! outer one would deadlock on cargo's build-directory lock. Two build scripts
//! may run a nested build at the same time (the host's and the fixtures'); they
//! share `target/wasm`, and cargo's lock on it makes the second wait for the
//! first. Neither holds anything the other's outer build waits for, so that
//! cannot deadlock.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The target policies are built for.
pub const TARGET: &str = "wasm32-wasip2";
/// The Cargo profile they are built with (the workspace's `[profile.policy]`).
pub const PROFILE: &str = "policy";

/// Builds the policy crates `policies` — (name, crate directory relative to the
/// workspace `root`) — to [`TARGET`] components in `root/target/wasm`, copies
/// them into `OUT_DIR`, and writes `OUT_DIR/{file}` holding
///
/// ```text
/// pub const {konst}: &[(&str, &[u8])] = &[
///     ("name", include_bytes!("…/crate_name.wasm")),
/// ];
/// ```
///
/// in the order given. Prints the `cargo::rerun-if-changed` lines (the SDK, the
/// workspace manifest and lock file, and each crate's `src` and `Cargo.toml`).
/// Failures are reported with `cargo::error` (a missing wasm target with how
/// to install it; a failed build with cargo's output as warnings), and then
/// nothing is written.
pub fn embed(root: &Path, policies: &[(&str, &str)], konst: &str, file: &str) {
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    for path in [
        "sdk/src",
        "sdk/wit",
        "sdk/Cargo.toml",
        "Cargo.lock",
        "Cargo.toml",
    ] {
        println!("cargo::rerun-if-changed={}", root.join(path).display());
    }
    for (_, dir) in policies {
        println!(
            "cargo::rerun-if-changed={}",
            root.join(dir).join("src").display()
        );
        println!(
            "cargo::rerun-if-changed={}",
            root.join(dir).join("Cargo.toml").display()
        );
    }

    if let Err(message) = check_target_installed(policies) {
        println!("cargo::error={message}");
        return;
    }

    let target_dir = root.join("target").join("wasm");
    let mut cargo = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo
        .current_dir(root)
        .args(["build", "--quiet", "--target", TARGET, "--profile", PROFILE])
        .arg("--target-dir")
        .arg(&target_dir);
    for (_, dir) in policies {
        cargo.args(["-p", &package_name(&root.join(dir))]);
    }
    // The outer build's flags and target are for the host, not for wasm.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cargo.env_remove(var);
    }
    let output = match cargo.output() {
        Ok(output) => output,
        Err(e) => {
            println!("cargo::error=could not run cargo to build the policies: {e}");
            return;
        }
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        for line in stderr.lines() {
            println!("cargo::warning={line}");
        }
        println!("cargo::error=building the policies for {TARGET} failed (see the warnings above)");
        return;
    }

    let mut generated = String::new();
    writeln!(generated, "pub const {konst}: &[(&str, &[u8])] = &[").unwrap();
    for (name, dir) in policies {
        let wasm = package_name(&root.join(dir)).replace('-', "_") + ".wasm";
        let built = target_dir.join(TARGET).join(PROFILE).join(&wasm);
        let copy = out_dir.join(&wasm);
        std::fs::copy(&built, &copy).unwrap_or_else(|e| panic!("copy {}: {e}", built.display()));
        writeln!(
            generated,
            "    ({name:?}, include_bytes!({:?})),",
            copy.display()
        )
        .unwrap();
    }
    writeln!(generated, "];").unwrap();
    let path = out_dir.join(file);
    std::fs::write(&path, generated).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// The `name` in a crate's Cargo.toml.
fn package_name(dir: &Path) -> String {
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).expect("policy Cargo.toml");
    manifest
        .lines()
        .find_map(|l| {
            l.strip_prefix("name = \"")
                .and_then(|r| r.strip_suffix('"'))
        })
        .unwrap_or_else(|| panic!("no name in {}", dir.join("Cargo.toml").display()))
        .to_string()
}

/// The wasm target's standard library must be installed; say how if it is not.
fn check_target_installed(policies: &[(&str, &str)]) -> Result<(), String> {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", TARGET])
        .output()
        .map_err(|e| format!("could not run {rustc}: {e}"))?;
    let libdir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let installed = std::fs::read_dir(&libdir)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
        })
        .unwrap_or(false);
    if installed {
        Ok(())
    } else {
        let names: Vec<&str> = policies.iter().map(|(name, _)| *name).collect();
        Err(format!(
            "the {TARGET} target is not installed, and the policies ({}) are built for it: \
             run `rustup target add {TARGET}` (or `make setup`) and build again",
            names.join(", ")
        ))
    }
}
