//! Builds the built-in policies to wasm32-wasip2 components so that the binary
//! can embed them: `OUT_DIR/policies.rs` holds `BUILTIN_POLICIES`. (The test
//! fixture policies are built by the `policy-fixtures` crate, for tests only.)
//!
//! The building is `policy-build`'s: a nested `cargo build` with its own target
//! directory, since sharing the outer one would deadlock on cargo's
//! build-directory lock.

use std::env;
use std::path::PathBuf;

/// Built-in policies: (name users write in `spec.policy.name`, crate directory).
const BUILTIN: &[(&str, &str)] = &[
    ("label-selector", "policies/label-selector"),
    ("gradual-rollout", "policies/gradual-rollout"),
    ("slow-start", "policies/slow-start"),
    ("prefer-local", "policies/prefer-local"),
];

fn main() {
    let root =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
            .parent()
            .expect("host/ is inside the workspace")
            .to_path_buf();
    policy_build::embed(&root, BUILTIN, "BUILTIN_POLICIES", "policies.rs");
}
