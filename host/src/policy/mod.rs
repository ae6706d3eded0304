//! Policies: WebAssembly components that compute weights, run in a sandbox.
//!
//! [`PolicyEngine`] compiles a component once ([`PolicyEngine::load`]) and
//! evaluates it many times ([`LoadedPolicy::evaluate`]), each time in a fresh
//! instance with a deadline and a memory limit, and checks the decision.
//! [`Catalog`] finds policies by name: the built-in ones, compiled into the binary.

mod catalog;
mod engine;

use std::time::Duration;

pub use catalog::{embedded_module, Catalog, CatalogEvent, BUILTIN_POLICIES, FIXTURE_POLICIES};
pub use engine::{check_decision, Compiler, EngineConfig, Evaluation, LoadedPolicy, PolicyEngine, INTERFACE_EXPORT};

/// Why a policy could not be loaded or evaluated. Every variant names the policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// No built-in policy and no module by that name.
    #[error("unknown policy {name:?}: the known policies are {known}")]
    NotFound {
        /// The name asked for.
        name: String,
        /// The names that exist, comma-separated.
        known: String,
    },
    /// The module's bytes do not hash to the WeightedService's `policy.sha256`.
    #[error("policy {policy:?} has sha256 {actual}, but the WeightedService pins {expected}")]
    PinMismatch {
        /// The policy.
        policy: String,
        /// The pin.
        expected: String,
        /// What the module hashes to.
        actual: String,
    },
    /// The bytes are not a valid component for this host.
    #[error("policy {policy:?} does not compile: {reason}")]
    Compile {
        /// The policy.
        policy: String,
        /// The compiler's reason.
        reason: String,
    },
    /// The component imports something: policies run with no imports at all.
    #[error(
        "policy {policy:?} imports {imports}; policies run with no imports (no WASI: no clock, files, \
         network or environment) — build it no_std with ipvs-policy-sdk"
    )]
    Imports {
        /// The policy.
        policy: String,
        /// What it imports, comma-separated.
        imports: String,
    },
    /// The component does not export the evaluator interface this host speaks.
    #[error("policy {policy:?} does not export {expected} (it exports {found})")]
    Interface {
        /// The policy.
        policy: String,
        /// The export this host needs.
        expected: String,
        /// What it exports instead, comma-separated.
        found: String,
    },
    /// The guest trapped (a panic, an out-of-bounds access, a stack overflow…).
    #[error("policy {policy:?} trapped: {reason}")]
    Trap {
        /// The policy.
        policy: String,
        /// The trap.
        reason: String,
    },
    /// The guest ran past its deadline.
    #[error("policy {policy:?} ran longer than its limit of {limit:?} and was stopped")]
    Timeout {
        /// The policy.
        policy: String,
        /// The deadline.
        limit: Duration,
    },
    /// The guest tried to grow its memory past the limit.
    #[error("policy {policy:?} needed more than its memory limit of {limit_mib} MiB and was stopped")]
    OutOfMemory {
        /// The policy.
        policy: String,
        /// The limit.
        limit_mib: usize,
    },
    /// The policy returned an error of its own.
    #[error("policy {policy:?} failed: {reason}")]
    Failed {
        /// The policy.
        policy: String,
        /// Its reason.
        reason: String,
    },
    /// The decision broke a rule (length, range, all-zero).
    #[error("policy {policy:?} returned an invalid decision: {reason}")]
    InvalidDecision {
        /// The policy.
        policy: String,
        /// Which rule, and for which endpoint.
        reason: String,
    },
    /// The host itself could not run wasm (engine setup, instantiation).
    #[error("policy {policy:?} could not be run: {reason}")]
    Host {
        /// The policy.
        policy: String,
        /// What failed.
        reason: String,
    },
}

impl PolicyError {
    /// A short stable label for metrics and event reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            PolicyError::NotFound { .. } => "not_found",
            PolicyError::PinMismatch { .. } => "pin_mismatch",
            PolicyError::Compile { .. } => "compile",
            PolicyError::Imports { .. } => "imports",
            PolicyError::Interface { .. } => "interface",
            PolicyError::Trap { .. } => "trap",
            PolicyError::Timeout { .. } => "timeout",
            PolicyError::OutOfMemory { .. } => "out_of_memory",
            PolicyError::Failed { .. } => "failed",
            PolicyError::InvalidDecision { .. } => "invalid_decision",
            PolicyError::Host { .. } => "host",
        }
    }
}
