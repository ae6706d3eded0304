//! The wasmtime sandbox.
//!
//! Compile once, then per evaluation: a fresh `Store` (so nothing leaks from one
//! evaluation to the next), instantiated from a prepared `InstancePre` (the
//! import check and type check are done at load), with an epoch deadline and a
//! memory limit. The bench `policy-eval` measures what instantiation costs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::fmt::Write as _;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ipvs_policy_sdk::validate;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, EngineWeak, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, Trap};

use super::PolicyError;
use crate::snapshot::{Labels, Snapshot};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../sdk/wit",
        world: "policy",
        // The input is lowered straight from borrowed strings: no copies on the host.
        ownership: Borrowing { duplicate_if_necessary: false },
    });
}

use bindings::exports::ipvs_operator::policy::evaluator as wit;

/// The export every policy must have: the evaluator interface, at the version this host speaks.
pub const INTERFACE_EXPORT: &str = "ipvs-operator:policy/evaluator@0.1.0";

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

/// Limits for every evaluation, and where compiled modules are kept.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Wall-clock budget of one evaluation (default 50 ms).
    pub timeout: Duration,
    /// Largest linear memory a policy may grow to (default 64 MiB).
    pub memory_limit: usize,
    /// A directory for compiled modules, so that a restart does not compile
    /// again. It must be private to this process: its files are loaded as code.
    pub cache_dir: Option<PathBuf>,
    /// Where modules are compiled to machine code.
    pub compiler: Compiler,
}

impl Default for EngineConfig {
    /// 50 ms and 64 MiB, no cache, compiled in this process.
    fn default() -> Self {
        EngineConfig {
            timeout: Duration::from_millis(50),
            memory_limit: 64 << 20,
            cache_dir: None,
            compiler: Compiler::InProcess,
        }
    }
}

/// Where a module is compiled. Compiling runs Cranelift, whose code and heap
/// stay resident in the process afterwards (about 20 MiB): a long-running
/// agent compiles in a short-lived child and keeps only the machine code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compiler {
    /// Here (what `eval` and tests do).
    InProcess,
    /// In a child: `PROGRAM ARGS… --name NAME` reads the module on stdin
    /// and writes [`PolicyEngine::precompile`]'s output to stdout, or the
    /// reason it failed to stderr with exit status 1. The child must build its
    /// engine from the same [`EngineConfig`] limits (wasmtime refuses code
    /// from an engine configured differently).
    Subprocess {
        /// The executable (normally this one).
        program: PathBuf,
        /// Its arguments before the module arrives on stdin.
        args: Vec<String>,
    },
}

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
    pre: bindings::PolicyPre<StoreState>,
    engine: PolicyEngine,
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
    limits: MemoryLimit,
}

/// Enforces the memory limit and remembers that it did, so that the trap that
/// follows a refused `memory.grow` is reported as out-of-memory.
struct MemoryLimit {
    max: usize,
    refused: bool,
}

impl ResourceLimiter for MemoryLimit {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max {
            self.refused = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl PolicyEngine {
    /// An engine with these limits.
    pub fn new(config: EngineConfig) -> Result<Self, PolicyError> {
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            // Unbounded recursion ends in a stack-overflow trap well before the host's stack.
            .max_wasm_stack(1 << 20);
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(POOL_SLOTS)
            .total_core_instances(POOL_SLOTS)
            .total_memories(POOL_SLOTS)
            .total_tables(POOL_SLOTS)
            .max_memory_size(config.memory_limit)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .max_unused_warm_slots(WARM_SLOTS);
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm).map_err(|e| PolicyError::Host {
            policy: String::new(),
            reason: format!("cannot create the wasm engine: {e:#}"),
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
            Compiler::InProcess => Component::new(&self.engine, bytes).map_err(|e| PolicyError::Compile {
                policy: name.into(),
                reason: format!("{e:#}"),
            })?,
            Compiler::Subprocess { program, args } => {
                let code = compile_in_child(name, program, args, bytes)?;
                // SAFETY: the bytes are what our own executable's `compile-policy`
                // wrote for this engine's configuration; wasmtime checks that the
                // configuration matches before using them.
                unsafe { Component::deserialize(&self.engine, &code) }.map_err(|e| PolicyError::Host {
                    policy: name.into(),
                    reason: format!("the compiled module from {} is unusable: {e:#}", program.display()),
                })?
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

    /// Compile `bytes` to what [`Compiler::Subprocess`] children return: the
    /// machine code for an engine with this configuration.
    pub fn precompile(&self, name: &str, bytes: &[u8]) -> Result<Vec<u8>, PolicyError> {
        self.engine.precompile_component(bytes).map_err(|e| PolicyError::Compile {
            policy: name.into(),
            reason: format!("{e:#}"),
        })
    }

    /// A fresh store with this engine's memory limit and deadline.
    fn store(&self) -> Store<StoreState> {
        let mut store = Store::new(
            &self.engine,
            StoreState {
                limits: MemoryLimit {
                    max: self.config.memory_limit,
                    refused: false,
                },
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

    /// Compile and check a component: it must import nothing and export
    /// [`INTERFACE_EXPORT`] with the expected types.
    pub fn load(&self, name: &str, bytes: &[u8]) -> Result<LoadedPolicy, PolicyError> {
        let sha256 = hex_sha256(bytes);
        let component = self.compile(name, &sha256, bytes)?;
        let ty = component.component_type();
        let imports: Vec<String> = ty.imports(&self.engine).map(|(n, _)| n.to_string()).collect();
        if !imports.is_empty() {
            return Err(PolicyError::Imports {
                policy: name.into(),
                imports: imports.join(", "),
            });
        }
        let exports: Vec<String> = ty.exports(&self.engine).map(|(n, _)| n.to_string()).collect();
        let interface_error = |detail: Option<String>| PolicyError::Interface {
            policy: name.into(),
            expected: INTERFACE_EXPORT.into(),
            found: match detail {
                None if exports.is_empty() => "nothing".into(),
                None => exports.join(", "),
                Some(d) => format!("{} — {d}", exports.join(", ")),
            },
        };
        if !exports.iter().any(|e| e == INTERFACE_EXPORT) {
            return Err(interface_error(None));
        }
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(bindings::PolicyPre::new)
            .map_err(|e| interface_error(Some(format!("{e:#}"))))?;
        // The function's type is checked when an instance is made: do it now, so a
        // module with the right export name but the wrong signature fails at load.
        let _running = self.ticker.running();
        pre.instantiate(&mut self.store())
            .map_err(|e| interface_error(Some(format!("{e:#}"))))?;
        Ok(LoadedPolicy {
            name: name.into(),
            sha256,
            pre,
            engine: self.clone(),
        })
    }
}

impl LoadedPolicy {
    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The SHA-256 of the module's bytes, hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Evaluate for `snapshot` and check the decision.
    pub fn evaluate(&self, snapshot: &Snapshot) -> Result<Evaluation, PolicyError> {
        let decision = with_input(snapshot, |input| self.call(input))?;
        check_decision(&self.name, snapshot, &decision.weights, decision.requeue_after_ms, decision.message)
    }

    /// Instantiate afresh and call `evaluate`, mapping every failure to its kind.
    fn call(&self, input: wit::Input<'_>) -> Result<wit::Decision, PolicyError> {
        let mut store = self.engine.store();
        let _running = self.engine.ticker.running();
        let result = self
            .pre
            .instantiate(&mut store)
            .and_then(|policy| policy.ipvs_operator_policy_evaluator().call_evaluate(&mut store, input));
        match result {
            Ok(Ok(decision)) => Ok(decision),
            Ok(Err(reason)) => Err(PolicyError::Failed {
                policy: self.name.clone(),
                reason,
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
        let policy = self.pre.instantiate(&mut store).map_err(|e| self.classify(e, false))?;
        let started = std::time::Instant::now();
        for _ in 0..times {
            with_input(snapshot, |input| policy.ipvs_operator_policy_evaluator().call_evaluate(&mut store, input))
                .map_err(|e| self.classify(e, false))?
                .map_err(|reason| PolicyError::Failed { policy: self.name.clone(), reason })?;
        }
        Ok(started.elapsed() / times.max(1))
    }

    fn classify(&self, error: wasmtime::Error, memory_refused: bool) -> PolicyError {
        let policy = self.name.clone();
        if memory_refused {
            return PolicyError::OutOfMemory {
                policy,
                limit_mib: self.engine.config.memory_limit >> 20,
            };
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => PolicyError::Timeout {
                policy,
                limit: self.engine.config.timeout,
            },
            Some(trap) => PolicyError::Trap {
                policy,
                reason: trap.to_string(),
            },
            None => PolicyError::Host {
                policy,
                reason: format!("{error:#}"),
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
        message,
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

/// Runs the compiler child: the module on its stdin, the machine code from its stdout.
fn compile_in_child(name: &str, program: &Path, args: &[String], bytes: &[u8]) -> Result<Vec<u8>, PolicyError> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let host_error = |reason: String| PolicyError::Host { policy: name.into(), reason };
    let mut child = Command::new(program)
        .args(args)
        .arg("--name")
        .arg(name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| host_error(format!("cannot start the policy compiler {}: {e}", program.display())))?;
    // The child reads all of stdin before it writes anything, so writing
    // first and then reading cannot deadlock.
    let written = child.stdin.take().map(|mut stdin| stdin.write_all(bytes));
    let output = child
        .wait_with_output()
        .map_err(|e| host_error(format!("waiting for the policy compiler: {e}")))?;
    if output.status.success() {
        if let Some(Err(e)) = written {
            return Err(host_error(format!("sending the module to the policy compiler: {e}")));
        }
        return Ok(output.stdout);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reason = stderr.trim().strip_prefix("error: ").unwrap_or(stderr.trim()).to_string();
    match output.status.code() {
        // Exit status 1 is the compiler's verdict on the module; anything
        // else (a signal, an OOM kill) is the host's trouble.
        Some(1) => Err(PolicyError::Compile { policy: name.into(), reason }),
        _ => Err(host_error(format!("the policy compiler {} {}: {reason}", program.display(), output.status))),
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

/// The hex SHA-256 of `bytes`: how modules are identified and pinned.
pub fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn labels(map: &Labels) -> Vec<wit::Label<'_>> {
    map.iter().map(|(key, value)| wit::Label { key, value }).collect()
}

fn conditions(e: &crate::snapshot::Endpoint) -> wit::Conditions {
    let mut c = wit::Conditions::empty();
    for (on, flag) in [
        (e.ready, wit::Conditions::READY),
        (e.serving, wit::Conditions::SERVING),
        (e.terminating, wit::Conditions::TERMINATING),
    ] {
        if on {
            c |= flag;
        }
    }
    c
}

fn timestamp(t: k8s_openapi::jiff::Timestamp) -> wit::Timestamp {
    wit::Timestamp {
        seconds: t.as_second(),
        nanos: t.subsec_nanosecond().max(0) as u32,
    }
}

/// Build the policy input for `s`, borrowing its strings, and hand it to `f`.
fn with_input<R>(s: &Snapshot, f: impl FnOnce(wit::Input<'_>) -> R) -> R {
    // Endpoints share label maps (see `LabelSets`): pass each map once.
    let mut index: HashMap<*const Labels, u32> = HashMap::new();
    let mut label_sets: Vec<Vec<wit::Label<'_>>> = Vec::new();
    let label_set_of: Vec<u32> = s
        .endpoints
        .iter()
        .map(|e| {
            *index.entry(Arc::as_ptr(&e.labels)).or_insert_with(|| {
                label_sets.push(labels(&e.labels));
                (label_sets.len() - 1) as u32
            })
        })
        .collect();
    let label_set_slices: Vec<&[wit::Label<'_>]> = label_sets.iter().map(Vec::as_slice).collect();
    let mut location_index: HashMap<(&str, Option<&str>), u32> = HashMap::new();
    let mut locations: Vec<wit::Location<'_>> = Vec::new();
    let location_of: Vec<Option<u32>> = s
        .endpoints
        .iter()
        .map(|e| {
            let node_name = e.node_name.as_deref()?;
            let zone = e.zone.as_deref();
            Some(*location_index.entry((node_name, zone)).or_insert_with(|| {
                locations.push(wit::Location { node_name, zone });
                (locations.len() - 1) as u32
            }))
        })
        .collect();
    // All addresses in one buffer: one allocation instead of one per endpoint.
    let mut address_text = String::with_capacity(s.endpoints.len() * 16);
    let address_ends: Vec<usize> = s
        .endpoints
        .iter()
        .map(|e| {
            let _ = write!(address_text, "{}", e.address);
            address_text.len()
        })
        .collect();
    let service_labels = [labels(&s.service.selector), labels(&s.service.labels), labels(&s.service.annotations)];
    let group_selectors: Vec<Vec<wit::Label<'_>>> = s.groups.iter().map(|g| labels(&g.selector)).collect();
    let groups: Vec<wit::WeightGroup<'_>> = s
        .groups
        .iter()
        .zip(&group_selectors)
        .map(|(g, selector)| wit::WeightGroup { weight: g.weight, selector })
        .collect();
    let endpoints: Vec<wit::Endpoint<'_>> = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| wit::Endpoint {
            pod_name: e.pod_name.as_deref(),
            address: &address_text[if i == 0 { 0 } else { address_ends[i - 1] }..address_ends[i]],
            location: location_of[i],
            label_set: label_set_of[i],
            conditions: conditions(e),
            created: e.created.map(timestamp),
            ready_since: e.ready_since.map(timestamp),
        })
        .collect();
    let node_labels = s.node.as_ref().map(|n| labels(&n.labels)).unwrap_or_default();
    f(wit::Input {
        service: wit::Service {
            namespace: &s.service.namespace,
            name: &s.service.name,
            selector: &service_labels[0],
            labels: &service_labels[1],
            annotations: &service_labels[2],
        },
        groups: &groups,
        config: &s.config,
        label_sets: &label_set_slices,
        locations: &locations,
        endpoints: &endpoints,
        node: s.node.as_ref().map(|n| wit::Node {
            name: &n.name,
            zone: n.zone.as_deref(),
            labels: &node_labels,
        }),
        now: timestamp(s.now),
    })
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
