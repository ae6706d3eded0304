//! The wasmtime sandbox.
//!
//! Compile once, then per evaluation: a fresh `Store` (so nothing leaks from one
//! evaluation to the next), instantiated from a prepared `InstancePre` (the
//! import check and type check are done at load), with an epoch deadline and a
//! memory limit. The bench `policy-eval` measures what instantiation costs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ipvs_policy_sdk::validate;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Config, Engine, EngineWeak, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, Trap};

use super::PolicyError;
use super::interface::{self, ConfigIssue, Description, Exports, ExportsMismatch, InterfaceVersion};
use crate::snapshot::Snapshot;

/// How many times a call that only prepares an evaluation (`describe`,
/// `validate-config`) may run out of time before that is its answer: the first
/// calls of a module pay one-time costs (its code paged in, its memory set
/// up) that can exceed the deadline on a busy or emulated CPU.
const FIRST_CALL_ATTEMPTS: u32 = 3;

/// Configs whose verdict a loaded policy remembers (a module has a few, one
/// per WeightedService that uses it); past this many, it forgets them all.
const VALIDATED_CONFIGS: usize = 256;

/// How often the deadline clock ticks while an evaluation runs.
const TICK: Duration = Duration::from_millis(5);

/// Instances that can exist at once (evaluations running concurrently).
const POOL_SLOTS: u32 = 64;

/// Linear memory kept mapped (and zeroed with memset) between instances.
const KEEP_RESIDENT: usize = 4 << 20;

/// Free instance slots that stay "warm" (affine to the module last run in
/// them, its memory image still mapped). Each one keeps that module's machine
/// code resident, about 1 MiB, even after the module is dropped: with
/// wasmtime's default (100, so all 64 slots) every policy reload added 1 MiB
/// until 64 were held (the churn soak saw 0.9 MiB per reload). The four
/// built-ins, or a few policies a node evaluates repeatedly, stay warm.
const WARM_SLOTS: u32 = 4;

/// What one component may hold: one core instance, with one linear memory and
/// one table. A component built from one module with no imports (what the SDK
/// builds) has exactly that; more instances would each take a pool slot and
/// their own memory.
const PER_COMPONENT: u32 = 1;

/// Table elements one evaluation may hold, summed over its tables (a Rust
/// policy's function table has a few hundred).
const TABLE_ELEMENTS: usize = 10_000;

/// Limits for every evaluation, for compiling, and where compiled modules are kept.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Wall-clock budget of one evaluation (default 50 ms).
    pub timeout: Duration,
    /// Linear memory one evaluation may use, summed over its memories (default 64 MiB).
    pub memory_limit: usize,
    /// A directory for compiled modules, so that a restart does not compile
    /// again. It must be private to this process: its files are loaded as code.
    pub cache_dir: Option<PathBuf>,
    /// Where modules are compiled to machine code.
    pub compiler: Compiler,
    /// Bounds of one compile in a child (see [`Compiler::Subprocess`]).
    pub compile: CompileLimits,
    /// Largest module accepted; a larger one is refused before it is compiled
    /// (default 8 MiB; a ConfigMap holds at most 1 MiB).
    pub max_module_bytes: usize,
    /// The shortest `requeue-after` a policy gets (default 1 s): a policy
    /// asking for 0 ms would otherwise be evaluated in a busy loop.
    pub min_requeue: Duration,
}

/// Bounds of one compile in a child process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompileLimits {
    /// Wall-clock limit; the child is killed after it (default 30 s).
    pub timeout: Duration,
    /// The child's address space (RLIMIT_AS), in bytes (default 128 MiB).
    pub address_space: usize,
}

impl Default for CompileLimits {
    fn default() -> Self {
        CompileLimits {
            timeout: Duration::from_secs(30),
            address_space: 128 << 20,
        }
    }
}

impl Default for EngineConfig {
    /// 50 ms and 64 MiB per evaluation, 8 MiB modules, no cache, compiled in this process.
    fn default() -> Self {
        EngineConfig {
            timeout: Duration::from_millis(50),
            memory_limit: 64 << 20,
            cache_dir: None,
            compiler: Compiler::InProcess,
            compile: CompileLimits::default(),
            max_module_bytes: 8 << 20,
            min_requeue: Duration::from_secs(1),
        }
    }
}

/// Where a module is compiled. Compiling runs Cranelift, whose code and heap
/// stay resident in the process afterwards (about 20 MiB): a long-running
/// agent compiles in a short-lived child and keeps only the machine code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compiler {
    /// Here (what `eval` and tests do), with no time or memory bound.
    InProcess,
    /// In a child: `PROGRAM ARGS… --name NAME` reads the module on stdin
    /// and writes [`precompile_in_child`]'s output to stdout, or the reason it
    /// failed to stderr with exit status 1 ([`COMPILE_OUT_OF_MEMORY`] when it
    /// ran out of address space). The child must use the same
    /// [`EngineConfig`] (wasmtime refuses code from an engine configured
    /// differently). It is killed after [`CompileLimits::timeout`].
    Subprocess {
        /// The executable (normally this one).
        program: PathBuf,
        /// Its arguments before the module arrives on stdin.
        args: Vec<String>,
    },
}

/// The exit status of a compiler child that ran out of memory.
pub const COMPILE_OUT_OF_MEMORY: u8 = 3;

/// A wasmtime engine configured for policies. Cheap to clone.
#[derive(Clone)]
pub struct PolicyEngine {
    engine: Engine,
    linker: Arc<Linker<StoreState>>,
    config: EngineConfig,
    ticker: Arc<EpochTicker>,
}

/// A compiled, checked policy, ready to evaluate. Cheap to clone.
#[derive(Clone)]
pub struct LoadedPolicy {
    name: String,
    sha256: String,
    pre: InstancePre<StoreState>,
    exports: Exports,
    interface: InterfaceVersion,
    /// What `describe` said, once asked ([`LoadedPolicy::describe`]).
    description: Arc<std::sync::OnceLock<Option<Description>>>,
    /// `validate-config`'s verdict on each config seen, shared by the clones.
    validated: Arc<Mutex<HashMap<String, Result<(), PolicyError>>>>,
    engine: PolicyEngine,
}

impl std::fmt::Debug for LoadedPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPolicy")
            .field("name", &self.name)
            .field("sha256", &self.sha256)
            .field("interface", &self.interface)
            .finish()
    }
}

/// A checked decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// One weight per endpoint of the snapshot, in its order.
    pub weights: Vec<u16>,
    /// When the policy asks to be evaluated again.
    pub requeue_after: Option<Duration>,
    /// The policy's message.
    pub message: Option<String>,
}

struct StoreState {
    limits: StoreLimits,
}

/// Enforces the memory and table limits over everything one evaluation
/// holds — every memory and every table of every instance in its store, summed
/// — and remembers that it refused, so that the trap that follows a refused
/// `memory.grow` is reported as out-of-memory.
struct StoreLimits {
    /// Bytes of linear memory.
    memory: Budget,
    /// Table elements.
    tables: Budget,
    refused: bool,
}

/// One total that growths draw on.
struct Budget {
    max: usize,
    used: usize,
    /// The last growth allowed, undone if the grow then fails.
    pending: usize,
}

impl Budget {
    fn new(max: usize) -> Self {
        Budget { max, used: 0, pending: 0 }
    }

    /// Whether growing one item from `current` to `desired` fits; if so it is counted.
    fn grow(&mut self, current: usize, desired: usize) -> bool {
        let growth = desired.saturating_sub(current);
        if self.used.saturating_add(growth) > self.max {
            return false;
        }
        self.used += growth;
        self.pending = growth;
        true
    }

    /// The growth last allowed did not happen.
    fn failed(&mut self) {
        self.used -= std::mem::take(&mut self.pending);
    }
}

impl StoreLimits {
    fn new(memory_max: usize) -> Self {
        StoreLimits { memory: Budget::new(memory_max), tables: Budget::new(TABLE_ELEMENTS), refused: false }
    }
}

impl ResourceLimiter for StoreLimits {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let fits = self.memory.grow(current, desired);
        self.refused |= !fits;
        Ok(fits)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.memory.failed();
        Ok(())
    }

    fn table_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let fits = self.tables.grow(current, desired);
        self.refused |= !fits;
        Ok(fits)
    }

    fn table_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.tables.failed();
        Ok(())
    }
}

/// The settings that decide what machine code looks like, shared by the
/// engine that runs policies and the compiler child (wasmtime refuses code
/// compiled under other settings).
fn code_config() -> Config {
    let mut wasm = Config::new();
    wasm.wasm_component_model(true)
        .epoch_interruption(true)
        // Every node computes the same floats, whatever its architecture.
        .cranelift_nan_canonicalization(true)
        // Unbounded recursion ends in a stack-overflow trap well before the host's stack.
        .max_wasm_stack(1 << 20);
    wasm
}

/// What a compiler child does: compile `bytes` for an engine with `config`,
/// on one thread and without the instance pool (whose virtual reservations
/// would not fit the child's address-space limit). The code is what
/// [`PolicyEngine`] with the same config loads.
pub fn precompile_in_child(
    config: &EngineConfig,
    name: &str,
    bytes: &[u8],
) -> Result<Vec<u8>, PolicyError> {
    let _ = config; // the code depends on no limit today; the parameter keeps callers honest
    let mut wasm = code_config();
    wasm.parallel_compilation(false);
    let engine = Engine::new(&wasm).map_err(|e| PolicyError::Host {
        policy: name.into(),
        reason: bounded(format!("cannot create the wasm engine: {e:#}")),
    })?;
    engine
        .precompile_component(bytes)
        .map_err(|e| PolicyError::Compile {
            policy: name.into(),
            reason: bounded(format!("{e:#}")),
        })
}

/// The longest text a policy (or a failure of one) puts into a status, an
/// Event, a log line or a metric label.
pub const MAX_TEXT: usize = 1024;

/// `text`, cut to [`MAX_TEXT`] bytes (at a character boundary, ending in `…`).
pub fn bounded(mut text: String) -> String {
    if text.len() > MAX_TEXT {
        let mut end = MAX_TEXT - '…'.len_utf8();
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

impl PolicyEngine {
    /// An engine with these limits.
    pub fn new(config: EngineConfig) -> Result<Self, PolicyError> {
        let mut wasm = code_config();
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(POOL_SLOTS)
            .total_core_instances(POOL_SLOTS)
            .total_memories(POOL_SLOTS)
            .total_tables(POOL_SLOTS)
            .max_core_instances_per_component(PER_COMPONENT)
            .max_memories_per_component(PER_COMPONENT)
            .max_tables_per_component(PER_COMPONENT)
            .max_memory_size(config.memory_limit)
            .table_elements(TABLE_ELEMENTS)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .max_unused_warm_slots(WARM_SLOTS);
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm).map_err(|e| PolicyError::Host {
            policy: String::new(),
            reason: bounded(format!("cannot create the wasm engine: {e:#}")),
        })?;
        let ticker = EpochTicker::start(engine.weak());
        Ok(PolicyEngine {
            engine: engine.clone(),
            linker: Arc::new(Linker::new(&engine)),
            config,
            ticker,
        })
    }

    /// The limits in force.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Compile `bytes`, or load what an earlier run compiled from the cache.
    fn compile(&self, name: &str, sha256: &str, bytes: &[u8]) -> Result<Component, PolicyError> {
        let started = std::time::Instant::now();
        let cached = self.config.cache_dir.as_deref().map(|dir| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.engine.precompile_compatibility_hash().hash(&mut h);
            dir.join(format!("{sha256}-{:016x}.cwasm", h.finish()))
        });
        if let Some(path) = &cached
            && path.is_file()
        {
            // SAFETY: the cache directory is private to this process (documented on
            // `cache_dir`); wasmtime checks the artifact's engine compatibility.
            match unsafe { Component::deserialize_file(&self.engine, path) } {
                Ok(component) => {
                    tracing::info!(policy = name, sha256, took_ms = started.elapsed().as_millis() as u64, "policy loaded from the compile cache");
                    return Ok(component);
                }
                Err(error) => {
                    tracing::warn!(policy = name, %error, path = %path.display(), "ignoring an unusable compiled module");
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        let component = match &self.config.compiler {
            Compiler::InProcess => {
                Component::new(&self.engine, bytes).map_err(|e| self.refusal(name, e, false))?
            }
            Compiler::Subprocess { program, args } => {
                let code = compile_in_child(name, program, args, bytes, &self.config.compile)?;
                // SAFETY: the bytes are what our own executable's `compile-policy`
                // wrote for this engine's configuration; wasmtime checks that the
                // configuration matches before using them.
                unsafe { Component::deserialize(&self.engine, &code) }
                    .map_err(|e| self.refusal(name, e, true))?
            }
        };
        tracing::info!(policy = name, sha256, took_ms = started.elapsed().as_millis() as u64, compiler = ?self.config.compiler_kind(), "policy compiled");
        if let Some(path) = &cached
            && let Err(error) = store_compiled(&component, path)
        {
            tracing::warn!(policy = name, %error, path = %path.display(), "could not cache the compiled module");
        }
        Ok(component)
    }

    /// Why wasmtime would not make a component of a module: the pool's
    /// per-component limits (the module's fault), or, for machine code from
    /// the child, anything else (the host's: the child and this engine disagree).
    fn refusal(&self, name: &str, error: wasmtime::Error, precompiled: bool) -> PolicyError {
        let reason = format!("{error:#}");
        if reason.contains("pooling allocator") {
            PolicyError::Limits {
                policy: name.into(),
                reason: bounded(format!(
                    "{reason} (a policy may have {PER_COMPONENT} core instance, {PER_COMPONENT} memory and {PER_COMPONENT} table, \
                     and memories of at most {} MiB)",
                    self.config.memory_limit >> 20
                )),
            }
        } else if precompiled {
            PolicyError::Host {
                policy: name.into(),
                reason: bounded(format!("the compiled module is unusable: {reason}")),
            }
        } else {
            PolicyError::Compile {
                policy: name.into(),
                reason: bounded(reason),
            }
        }
    }

    /// Compile `bytes` to what [`Compiler::Subprocess`] children return: the
    /// machine code for an engine with this configuration.
    pub fn precompile(&self, name: &str, bytes: &[u8]) -> Result<Vec<u8>, PolicyError> {
        self.engine
            .precompile_component(bytes)
            .map_err(|e| PolicyError::Compile {
                policy: name.into(),
                reason: bounded(format!("{e:#}")),
            })
    }

    /// A fresh store with this engine's memory limit and deadline.
    fn store(&self) -> Store<StoreState> {
        let mut store = Store::new(
            &self.engine,
            StoreState {
                limits: StoreLimits::new(self.config.memory_limit),
            },
        );
        store.limiter(|s| &mut s.limits);
        // The clock ticks every TICK, not when the evaluation starts: the
        // first tick can come at once. One more tick, so that a policy always
        // gets its whole timeout (and at most one tick more).
        let ticks = self.config.timeout.as_nanos().div_ceil(TICK.as_nanos()) as u64;
        store.set_epoch_deadline(ticks + 1);
        store.epoch_deadline_trap();
        store
    }

    /// Compile and check a component: no larger than the module size limit,
    /// within the sandbox's limits, importing nothing, exporting the evaluator
    /// of a version this host serves ([`interface::served`]) with its types,
    /// and instantiable; a module with `describe` is described.
    pub fn load(&self, name: &str, bytes: &[u8]) -> Result<LoadedPolicy, PolicyError> {
        if bytes.len() > self.config.max_module_bytes {
            return Err(PolicyError::TooLarge {
                policy: name.into(),
                bytes: bytes.len() as u64,
                limit: self.config.max_module_bytes as u64,
            });
        }
        // Imports first (read from the binary): a component built with std
        // imports WASI and has several core instances; the imports say what to fix.
        let imports = top_level_imports(bytes);
        if !imports.is_empty() {
            return Err(PolicyError::Imports {
                policy: name.into(),
                imports: bounded(imports.join(", ")),
            });
        }
        let sha256 = hex_sha256(bytes);
        let component = self.compile(name, &sha256, bytes)?;
        let ty = component.component_type();
        let imports: Vec<String> = ty.imports(&self.engine).map(|(n, _)| n.to_string()).collect();
        if !imports.is_empty() {
            return Err(PolicyError::Imports {
                policy: name.into(),
                imports: bounded(imports.join(", ")),
            });
        }
        let exports: Vec<String> = ty.exports(&self.engine).map(|(n, _)| n.to_string()).collect();
        let interface_error = |detail: Option<String>| PolicyError::Interface {
            policy: name.into(),
            expected: interface::expected_exports(),
            found: bounded(match detail {
                None if exports.is_empty() => "nothing".into(),
                None => exports.join(", "),
                Some(d) => format!("{} — {d}", exports.join(", ")),
            }),
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| interface_error(Some(format!("{e:#}"))))?;
        let (exports_found, version) = Exports::find(&pre, &exports).map_err(|e| match e {
            ExportsMismatch::NoEvaluator => interface_error(None),
            ExportsMismatch::Types(detail) => interface_error(Some(detail)),
        })?;
        let policy = LoadedPolicy {
            name: name.into(),
            sha256,
            pre,
            exports: exports_found,
            interface: version,
            description: Arc::default(),
            validated: Arc::default(),
            engine: self.clone(),
        };
        // The functions' types are checked when an instance is made: do it now,
        // so a module with the right export names but the wrong signatures fails
        // at load. So does one that traps or runs out of memory while it is set
        // up. (Not `describe`: no evaluation needs it, and a first call can
        // run past the deadline on an emulated CPU; it is asked when needed.)
        let mut store = self.store();
        let _running = self.ticker.running();
        let checked = policy
            .pre
            .instantiate(&mut store)
            .and_then(|instance| policy.exports.check_types(&mut store, &instance));
        if let Err(error) = checked {
            let refused = store.data().limits.refused;
            return Err(match policy.classify(error, refused) {
                PolicyError::Host { reason, .. } if !reason.starts_with(POOL_EXHAUSTED) => interface_error(Some(reason)),
                other => other,
            });
        }
        Ok(policy)
    }
}

/// A description with every text bounded; the schema may be longer (it is
/// shown by `policy describe`, never put into a status), up to 64 KiB.
fn bounded_description(d: Description) -> Description {
    const MAX_SCHEMA: usize = 64 << 10;
    Description {
        name: bounded(d.name),
        version: bounded(d.version),
        description: bounded(d.description),
        config_schema: d.config_schema.filter(|s| s.len() <= MAX_SCHEMA),
    }
}

/// How [`LoadedPolicy::classify`] starts the reason of a full instance pool.
const POOL_EXHAUSTED: &str = "no free instance slot";

impl LoadedPolicy {
    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The SHA-256 of the module's bytes, hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The version of the interface the module was built against.
    pub fn interface(&self) -> InterfaceVersion {
        self.interface
    }

    /// What the module says about itself (`describe`); `None` for a module
    /// without it (interface 0.1, or no `metadata`). Asked once and
    /// remembered; a timeout is tried again (a first call pays one-time
    /// costs), a trap or running out of memory is the module's failure.
    pub fn describe(&self) -> Result<Option<&Description>, PolicyError> {
        if let Some(described) = self.description.get() {
            return Ok(described.as_ref());
        }
        let described = self.retrying_timeouts(|| {
            let mut store = self.engine.store();
            let _running = self.engine.ticker.running();
            self.pre
                .instantiate(&mut store)
                .and_then(|instance| self.exports.describe(&mut store, &instance))
                .map_err(|e| self.classify(e, store.data().limits.refused))
        })?;
        Ok(self.description.get_or_init(|| described.map(bounded_description)).as_ref())
    }

    /// `call`, called again (up to [`FIRST_CALL_ATTEMPTS`] times in all) while
    /// it runs out of time.
    fn retrying_timeouts<T>(&self, call: impl Fn() -> Result<T, PolicyError>) -> Result<T, PolicyError> {
        let mut attempts = 1;
        loop {
            match call() {
                Err(PolicyError::Timeout { .. }) if attempts < FIRST_CALL_ATTEMPTS => attempts += 1,
                other => return other,
            }
        }
    }

    /// The module's verdict on `config` (`validate-config`), asked once per
    /// config and remembered. A module without `validate-config` accepts
    /// every config. A refusal is [`PolicyError::ConfigInvalid`]; a trap, a
    /// timeout or running out of memory while validating are the module's
    /// failures as in an evaluation.
    pub fn validate_config(&self, config: &str) -> Result<(), PolicyError> {
        if !self.exports.has_metadata() {
            return Ok(());
        }
        let remembered = self.validated.lock().unwrap_or_else(|p| p.into_inner()).get(config).cloned();
        if let Some(verdict) = remembered {
            return verdict;
        }
        let verdict = self.retrying_timeouts(|| self.call_validate_config(config));
        // A verdict is a pure function of the module and the config, except
        // running out of time (a busy CPU) and the host's trouble: asked again.
        if !matches!(&verdict, Err(e) if e.is_host_trouble() || matches!(e, PolicyError::Timeout { .. })) {
            let mut validated = self.validated.lock().unwrap_or_else(|p| p.into_inner());
            if validated.len() >= VALIDATED_CONFIGS {
                validated.clear();
            }
            validated.insert(config.to_string(), verdict.clone());
        }
        verdict
    }

    fn call_validate_config(&self, config: &str) -> Result<(), PolicyError> {
        let config = if config.trim().is_empty() { "{}" } else { config };
        let mut store = self.engine.store();
        let _running = self.engine.ticker.running();
        let result = self
            .pre
            .instantiate(&mut store)
            .and_then(|instance| self.exports.validate_config(&mut store, &instance, config));
        match result {
            Ok(None | Some(Ok(()))) => Ok(()),
            Ok(Some(Err(issues))) => Err(PolicyError::ConfigInvalid {
                policy: self.name.clone(),
                issues: bounded_issues(issues),
            }),
            Err(e) => Err(self.classify(e, store.data().limits.refused)),
        }
    }

    /// Evaluate for `snapshot` and check the decision. The config is validated
    /// first ([`LoadedPolicy::validate_config`]): a module is never evaluated
    /// with a config it refuses.
    /// A `requeue-after` shorter than the engine's minimum is raised to it.
    pub fn evaluate(&self, snapshot: &Snapshot) -> Result<Evaluation, PolicyError> {
        self.validate_config(&snapshot.config)?;
        let decision = self.call(snapshot)?;
        let mut evaluation = check_decision(
            &self.name,
            snapshot,
            &decision.weights,
            decision.requeue_after_ms,
            decision.message,
        )?;
        evaluation.requeue_after = evaluation
            .requeue_after
            .map(|after| after.max(self.engine.config.min_requeue));
        Ok(evaluation)
    }

    /// Instantiate afresh and call `evaluate`, mapping every failure to its kind.
    fn call(&self, snapshot: &Snapshot) -> Result<interface::RawDecision, PolicyError> {
        let mut store = self.engine.store();
        let _running = self.engine.ticker.running();
        let result = self
            .pre
            .instantiate(&mut store)
            .and_then(|instance| self.exports.evaluate(&mut store, &instance, snapshot));
        match result {
            Ok(Ok(decision)) => Ok(decision),
            Ok(Err(reason)) => Err(PolicyError::Failed {
                policy: self.name.clone(),
                reason: bounded(reason),
            }),
            Err(e) => Err(self.classify(e, store.data().limits.refused)),
        }
    }

    /// For the benchmark: the time of `times` instantiations alone.
    #[doc(hidden)]
    pub fn measure_instantiation(&self, times: u32) -> Result<Duration, PolicyError> {
        let started = std::time::Instant::now();
        for _ in 0..times {
            let mut store = self.engine.store();
            self.pre
                .instantiate(&mut store)
                .map_err(|e| self.classify(e, false))?;
        }
        Ok(started.elapsed() / times.max(1))
    }

    /// For the benchmark: the alternative to a fresh instance per evaluation —
    /// one instance called `times` times (input conversion included, checks not).
    #[doc(hidden)]
    pub fn measure_reused_instance(&self, snapshot: &Snapshot, times: u32) -> Result<Duration, PolicyError> {
        let mut store = self.engine.store();
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = self.pre.instantiate(&mut store).map_err(|e| self.classify(e, false))?;
        let started = std::time::Instant::now();
        for _ in 0..times {
            self.exports
                .evaluate(&mut store, &instance, snapshot)
                .map_err(|e| self.classify(e, false))?
            .map_err(|reason| PolicyError::Failed {
                policy: self.name.clone(),
                reason: bounded(reason),
            })?;
        }
        Ok(started.elapsed() / times.max(1))
    }

    /// What went wrong in an instantiation or a call: the limits (memory,
    /// tables), the deadline or a trap are the module's doing; a full instance
    /// pool (too many evaluations at once) or anything else is the host's.
    fn classify(&self, error: wasmtime::Error, limit_refused: bool) -> PolicyError {
        let policy = self.name.clone();
        if limit_refused {
            return PolicyError::OutOfMemory {
                policy,
                limit_mib: self.engine.config.memory_limit >> 20,
            };
        }
        if error
            .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
            .is_some()
        {
            return PolicyError::Host {
                policy,
                reason: bounded(format!("{POOL_EXHAUSTED}: {error:#}")),
            };
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => PolicyError::Timeout {
                policy,
                limit: self.engine.config.timeout,
            },
            Some(trap) => PolicyError::Trap {
                policy,
                reason: bounded(trap.to_string()),
            },
            None => PolicyError::Host {
                policy,
                reason: bounded(format!("{error:#}")),
            },
        }
    }
}

/// The host's check of `policy`'s decision for `snapshot`: one weight per
/// endpoint, each 0..=65535, and not 0 for every ready endpoint unless the
/// config says `"allowAllZero": true`. [`LoadedPolicy::evaluate`] applies it
/// to every decision; a refusal keeps the last good weights.
pub fn check_decision(
    policy: &str,
    snapshot: &Snapshot,
    weights: &[u32],
    requeue_after_ms: Option<u64>,
    message: Option<String>,
) -> Result<Evaluation, PolicyError> {
    let ready: Vec<bool> = snapshot.endpoints.iter().map(|e| e.ready).collect();
    validate::check(weights, &ready, ipvs_policy_sdk::config::allow_all_zero(&snapshot.config)).map_err(|e| {
        PolicyError::InvalidDecision {
            policy: policy.into(),
            reason: describe_invalid(&e, snapshot),
        }
    })?;
    Ok(Evaluation {
        weights: weights.iter().map(|w| *w as u16).collect(),
        requeue_after: requeue_after_ms.map(Duration::from_millis),
        message: message.map(bounded),
    })
}

fn describe_invalid(e: &validate::InvalidDecision, snapshot: &Snapshot) -> String {
    match e {
        validate::InvalidDecision::OutOfRange { index, weight } => {
            let who = snapshot
                .endpoints
                .get(*index)
                .map(|ep| ep.pod_name.clone().unwrap_or_else(|| ep.address.to_string()))
                .unwrap_or_default();
            format!("weight {weight} for endpoint {who} is out of range 0..=65535")
        }
        other => other.to_string(),
    }
}

impl EngineConfig {
    fn compiler_kind(&self) -> &'static str {
        match self.compiler {
            Compiler::InProcess => "in-process",
            Compiler::Subprocess { .. } => "subprocess",
        }
    }
}

/// The most of a compiler child's stderr that is read (its reason).
const CHILD_STDERR: u64 = 16 << 10;

/// Runs the compiler child: the module on its stdin, the machine code from
/// its stdout; killed when it runs past `limits.timeout`. What ends it decides
/// whose fault a failure is: its verdict (status 1), running out of address
/// space (status [`COMPILE_OUT_OF_MEMORY`], or an abort on a failed
/// allocation) and the timeout are the module's; not starting, another status
/// or signal (e.g. an OOM kill of the whole container) are the host's.
fn compile_in_child(
    name: &str,
    program: &Path,
    args: &[String],
    bytes: &[u8],
    limits: &CompileLimits,
) -> Result<Vec<u8>, PolicyError> {
    use std::io::{Read, Write};
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let host_error = |reason: String| PolicyError::Host {
        policy: name.into(),
        reason: bounded(reason),
    };
    let mut child = Command::new(program)
        .args(args)
        .arg("--name")
        .arg(name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            host_error(format!(
                "cannot start the policy compiler {}: {e}",
                program.display()
            ))
        })?;
    let (Some(mut stdin), Some(mut stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(host_error(
            "the policy compiler's pipes were not set up".into(),
        ));
    };
    // The pipes are served by threads, so that a child that stops reading or
    // writing cannot hold this one past the deadline.
    let output = std::thread::scope(|scope| {
        let writer = scope.spawn(move || stdin.write_all(bytes));
        let out = scope.spawn(move || {
            let mut code = Vec::new();
            stdout.read_to_end(&mut code).map(|_| code)
        });
        let err = scope.spawn(move || {
            let mut text = Vec::new();
            let _ = stderr.take(CHILD_STDERR).read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        });
        let deadline = std::time::Instant::now() + limits.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Ok(Some(status)),
                Ok(None) if std::time::Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Ok(None);
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Err(e);
                }
            }
        };
        // The child is gone: its pipes are closed and the threads end.
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("writer panicked")));
        let code = out
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("reader panicked")));
        let stderr = err.join().unwrap_or_default();
        (status, written, code, stderr)
    });
    let (status, written, code, stderr) = output;
    let status = match status {
        Ok(Some(status)) => status,
        Ok(None) => {
            return Err(PolicyError::CompileTimeout {
                policy: name.into(),
                limit: limits.timeout,
            });
        }
        Err(e) => return Err(host_error(format!("waiting for the policy compiler: {e}"))),
    };
    let reason = stderr.trim();
    let reason = reason.strip_prefix("error: ").unwrap_or(reason).to_string();
    let out_of_memory = || PolicyError::CompileMemory {
        policy: name.into(),
        limit_mib: limits.address_space >> 20,
    };
    if status.success() {
        if let Err(e) = written {
            return Err(host_error(format!(
                "sending the module to the policy compiler: {e}"
            )));
        }
        return code.map_err(|e| host_error(format!("reading the policy compiler's output: {e}")));
    }
    match (status.code(), status.signal()) {
        (Some(1), _) => Err(PolicyError::Compile {
            policy: name.into(),
            reason: bounded(reason),
        }),
        (Some(c), _) if c == i32::from(COMPILE_OUT_OF_MEMORY) => Err(out_of_memory()),
        // Rust aborts when an allocation fails: the address-space limit.
        (_, Some(6)) if reason.contains("memory allocation of") => Err(out_of_memory()),
        // Cranelift's recursion on deeply nested code.
        (_, Some(6)) if reason.contains("overflowed its stack") => Err(PolicyError::Compile {
            policy: name.into(),
            reason: bounded(reason),
        }),
        _ => Err(host_error(format!(
            "the policy compiler {} {status}: {reason}",
            program.display()
        ))),
    }
}

/// Write a compiled module atomically (a temporary file, then a rename), so a
/// concurrent reader never sees half of one.
fn store_compiled(component: &Component, path: &Path) -> std::io::Result<()> {
    let bytes = component.serialize().map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let temporary = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}

/// The names a component imports, read from its binary without compiling it
/// (nothing when it is not a component binary: compiling then says why).
fn top_level_imports(bytes: &[u8]) -> Vec<String> {
    use wasmparser::{Parser, Payload};
    let mut depth = 0usize;
    let mut imports = Vec::new();
    for payload in Parser::new(0).parse_all(bytes) {
        let Ok(payload) = payload else {
            return Vec::new();
        };
        match payload {
            // Nested modules and components start and end like the outer one.
            Payload::Version { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(reader) if depth == 1 => {
                for import in reader {
                    match import {
                        Ok(import) => imports.push(import.name.name.to_string()),
                        Err(_) => return Vec::new(),
                    }
                }
            }
            _ => {}
        }
    }
    imports
}

/// At most 10 issues, each text bounded: a module's refusal goes into a status.
fn bounded_issues(mut issues: Vec<ConfigIssue>) -> Vec<ConfigIssue> {
    const MAX_ISSUES: usize = 10;
    issues.truncate(MAX_ISSUES);
    for issue in &mut issues {
        issue.path = bounded(std::mem::take(&mut issue.path));
        issue.message = bounded(std::mem::take(&mut issue.message));
    }
    issues
}

/// The hex SHA-256 of `bytes`: how modules are identified and pinned.
pub fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Advances the engine's epoch every [`TICK`] while at least one evaluation is
/// running, and sleeps otherwise: an idle agent should not wake up 200 times a second.
struct EpochTicker {
    running: Mutex<usize>,
    wake: Condvar,
}

struct Running<'a>(&'a EpochTicker);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut n = self.0.running.lock().unwrap_or_else(|p| p.into_inner());
        *n -= 1;
    }
}

impl EpochTicker {
    fn start(engine: EngineWeak) -> Arc<Self> {
        let ticker = Arc::new(EpochTicker {
            running: Mutex::new(0),
            wake: Condvar::new(),
        });
        let weak = Arc::downgrade(&ticker);
        std::thread::Builder::new()
            .name("policy-epoch".into())
            .spawn(move || {
                loop {
                    let Some(ticker) = weak.upgrade() else { return };
                    {
                        let guard = ticker.running.lock().unwrap_or_else(|p| p.into_inner());
                        // The timeout lets the thread notice that its engine is gone.
                        let (guard, _) = ticker
                            .wake
                            .wait_timeout_while(guard, Duration::from_secs(1), |n| *n == 0)
                            .unwrap_or_else(|p| p.into_inner());
                        if *guard == 0 {
                            continue;
                        }
                    }
                    drop(ticker);
                    std::thread::sleep(TICK);
                    match engine.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => return,
                    }
                }
            })
            .expect("spawn the policy epoch thread");
        ticker
    }

    fn running(&self) -> Running<'_> {
        let mut n = self.running.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        self.wake.notify_one();
        Running(self)
    }
}
