//! Policies: WebAssembly components that compute weights, run in a sandbox.
//!
//! [`PolicyEngine`] compiles a component once ([`PolicyEngine::load`]) and
//! evaluates it many times ([`LoadedPolicy::evaluate`]), each time in a fresh
//! instance with a deadline and a memory limit, and checks the decision.
//! [`Catalog`] finds policies by name: the built-in ones, compiled into the
//! binary, and those of a policy directory.
//!
//! A module is untrusted code (it comes from a ConfigMap and runs on every
//! node): everything it can make the host spend is bounded — its size, the
//! time and memory of its compile, the instances, memory and tables of an
//! evaluation, its wall-clock time, and the size of what it returns. Whose
//! fault a failure is decides what happens next: the module's own failures
//! are recorded against its bytes; the host's (see
//! [`PolicyError::is_host_trouble`]) are retried.

mod catalog;
mod engine;
mod interface;

use std::time::Duration;

pub use catalog::{BUILTIN_POLICIES, Catalog, CatalogCounters, CatalogEvent, embedded_module, module_key, split_key};
pub use engine::{
    COMPILE_OUT_OF_MEMORY, CompileLimits, Compiler, EngineConfig, Evaluation, LoadedPolicy, MAX_TEXT,
    PolicyEngine, bounded, check_decision, precompile_in_child,
};

pub use interface::{
    ConfigIssue, Description, InterfaceVersion, evaluator_export, expected_exports, served as served_interfaces,
};

/// Why a policy could not be loaded or evaluated. Every variant names the
/// policy; every text in it is at most [`MAX_TEXT`] bytes.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// Not compiled yet: a compile is under way (or queued) off the caller's thread.
    #[error("policy {policy:?} is being compiled")]
    Loading {
        /// The policy.
        policy: String,
    },
    /// The module is larger than `--policy-max-module-bytes`: refused unread.
    #[error(
        "policy {policy:?} is {bytes} bytes, over the limit of {limit} bytes (--policy-max-module-bytes)"
    )]
    TooLarge {
        /// The policy.
        policy: String,
        /// Its size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// Compiling took longer than `--policy-compile-timeout`.
    #[error(
        "policy {policy:?} took longer than {limit:?} to compile and was stopped (--policy-compile-timeout)"
    )]
    CompileTimeout {
        /// The policy.
        policy: String,
        /// The limit.
        limit: Duration,
    },
    /// Compiling needed more memory than the compiler's address-space limit.
    #[error(
        "policy {policy:?} needed more than {limit_mib} MiB to compile and was stopped (--policy-compile-memory-mib)"
    )]
    CompileMemory {
        /// The policy.
        policy: String,
        /// The limit.
        limit_mib: usize,
    },
    /// The component needs more than the sandbox gives one evaluation (core
    /// instances, memories, tables, a memory's minimum size).
    #[error("policy {policy:?} exceeds the sandbox's limits: {reason}")]
    Limits {
        /// The policy.
        policy: String,
        /// Which limit.
        reason: String,
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
    /// A module deployed as `NAME.VERSION.wasm` describes itself with another version.
    #[error("policy {policy:?} says it is version {described:?}, not the version of its file name")]
    VersionMismatch {
        /// The policy (`NAME.VERSION`).
        policy: String,
        /// The version its `describe` gives.
        described: String,
    },
    /// The module's `validate-config` refused the config: it is not evaluated with it.
    #[error("policy {policy:?} refuses its config: {}", issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    ConfigInvalid {
        /// The policy.
        policy: String,
        /// What is wrong, each with its JSON path.
        issues: Vec<ConfigIssue>,
    },
    /// The decision broke a rule (length, range, all-zero).
    #[error("policy {policy:?} returned an invalid decision: {reason}")]
    InvalidDecision {
        /// The policy.
        policy: String,
        /// Which rule, and for which endpoint.
        reason: String,
    },
    /// The module was refused when it was loaded (for `cause`), and no
    /// working module of that name is in use.
    #[error("{cause}; the module was refused when it was loaded")]
    Refused {
        /// The policy.
        policy: String,
        /// Why.
        cause: Box<PolicyError>,
    },
    /// The host itself could not compile or run wasm (the compiler child did
    /// not start or was killed, the instance pool was full): not the module's
    /// fault, and tried again.
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
            PolicyError::Loading { .. } => "loading",
            PolicyError::TooLarge { .. } => "too_large",
            PolicyError::CompileTimeout { .. } => "compile_timeout",
            PolicyError::CompileMemory { .. } => "compile_memory",
            PolicyError::Limits { .. } => "limits",
            PolicyError::PinMismatch { .. } => "pin_mismatch",
            PolicyError::Compile { .. } => "compile",
            PolicyError::Imports { .. } => "imports",
            PolicyError::Interface { .. } => "interface",
            PolicyError::Trap { .. } => "trap",
            PolicyError::Timeout { .. } => "timeout",
            PolicyError::OutOfMemory { .. } => "out_of_memory",
            PolicyError::Failed { .. } => "failed",
            PolicyError::InvalidDecision { .. } => "invalid_decision",
            PolicyError::ConfigInvalid { .. } => "config_invalid",
            PolicyError::VersionMismatch { .. } => "version_mismatch",
            PolicyError::Refused { .. } => "refused",
            PolicyError::Host { .. } => "host",
        }
    }

    /// The policy's name.
    pub fn policy(&self) -> &str {
        match self {
            PolicyError::NotFound { name, .. } => name,
            PolicyError::Loading { policy }
            | PolicyError::TooLarge { policy, .. }
            | PolicyError::CompileTimeout { policy, .. }
            | PolicyError::CompileMemory { policy, .. }
            | PolicyError::Limits { policy, .. }
            | PolicyError::PinMismatch { policy, .. }
            | PolicyError::Compile { policy, .. }
            | PolicyError::Imports { policy, .. }
            | PolicyError::Interface { policy, .. }
            | PolicyError::Trap { policy, .. }
            | PolicyError::Timeout { policy, .. }
            | PolicyError::OutOfMemory { policy, .. }
            | PolicyError::Failed { policy, .. }
            | PolicyError::InvalidDecision { policy, .. }
            | PolicyError::ConfigInvalid { policy, .. }
            | PolicyError::VersionMismatch { policy, .. }
            | PolicyError::Refused { policy, .. }
            | PolicyError::Host { policy, .. } => policy,
        }
    }

    /// Whether the trouble is the host's, not the module's: never recorded
    /// against the module's bytes, and tried again.
    pub fn is_host_trouble(&self) -> bool {
        matches!(self, PolicyError::Host { .. } | PolicyError::Loading { .. })
    }

    /// This error, as the refusal of a module at load.
    pub fn refusal(&self) -> PolicyError {
        match self {
            PolicyError::Refused { .. } => self.clone(),
            cause => PolicyError::Refused {
                policy: cause.policy().into(),
                cause: Box::new(cause.clone()),
            },
        }
    }
}
