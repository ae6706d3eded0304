//! Builds the built-in policies (and the test fixture policy) to wasm32-wasip2
//! components so that the binary can embed them.
//!
//! A nested `cargo build` with its own target directory: sharing the outer one
//! would deadlock on cargo's build-directory lock.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Built-in policies: (name users write in `spec.policy.name`, crate directory).
const BUILTIN: &[(&str, &str)] = &[
    ("label-selector", "policies/label-selector"),
    ("gradual-rollout", "policies/gradual-rollout"),
    ("slow-start", "policies/slow-start"),
    ("prefer-local", "policies/prefer-local"),
];

/// Policies used only by tests: (name, crate directory).
const FIXTURES: &[(&str, &str)] = &[
    ("misbehaving", "host/fixtures/misbehaving-policy"),
    ("nosy", "host/fixtures/nosy-policy"),
];

const TARGET: &str = "wasm32-wasip2";
const PROFILE: &str = "policy";

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ is inside the workspace")
        .to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    for path in ["sdk/src", "sdk/wit", "sdk/Cargo.toml", "Cargo.lock", "Cargo.toml"] {
        println!("cargo::rerun-if-changed={}", root.join(path).display());
    }
    for (_, dir) in BUILTIN.iter().chain(FIXTURES) {
        println!("cargo::rerun-if-changed={}", root.join(dir).join("src").display());
        println!("cargo::rerun-if-changed={}", root.join(dir).join("Cargo.toml").display());
    }

    if let Err(message) = check_target_installed() {
        println!("cargo::error={message}");
        return;
    }

    let target_dir = root.join("target").join("wasm");
    let mut cargo = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo
        .current_dir(&root)
        .args(["build", "--quiet", "--target", TARGET, "--profile", PROFILE])
        .arg("--target-dir")
        .arg(&target_dir);
    for (_, dir) in BUILTIN.iter().chain(FIXTURES) {
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
    let mut emit = |list: &[(&str, &str)], konst: &str| {
        writeln!(generated, "pub const {konst}: &[(&str, &[u8])] = &[").unwrap();
        for (name, dir) in list {
            let file = package_name(&root.join(dir)).replace('-', "_") + ".wasm";
            let built = target_dir.join(TARGET).join(PROFILE).join(&file);
            let copy = out_dir.join(&file);
            std::fs::copy(&built, &copy).unwrap_or_else(|e| panic!("copy {}: {e}", built.display()));
            writeln!(generated, "    ({name:?}, include_bytes!({:?})),", copy.display()).unwrap();
        }
        writeln!(generated, "];").unwrap();
    };
    emit(BUILTIN, "BUILTIN_POLICIES");
    emit(FIXTURES, "FIXTURE_POLICIES");
    std::fs::write(out_dir.join("policies.rs"), generated).expect("write policies.rs");
}

/// The `name` in a crate's Cargo.toml.
fn package_name(dir: &Path) -> String {
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).expect("policy Cargo.toml");
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("name = \"").and_then(|r| r.strip_suffix('"')))
        .unwrap_or_else(|| panic!("no name in {}", dir.join("Cargo.toml").display()))
        .to_string()
}

/// The wasm target's standard library must be installed; say how if it is not.
fn check_target_installed() -> Result<(), String> {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", TARGET])
        .output()
        .map_err(|e| format!("could not run {rustc}: {e}"))?;
    let libdir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let installed = std::fs::read_dir(&libdir)
        .map(|entries| entries.flatten().any(|e| e.file_name().to_string_lossy().starts_with("libcore-")))
        .unwrap_or(false);
    if installed {
        Ok(())
    } else {
        Err(format!(
            "the {TARGET} target is not installed, and the built-in policies are built for it: \
             run `rustup target add {TARGET}` (or `make setup`) and build again"
        ))
    }
}
