//! The wasmtime sandbox.
//!
//! Compile once, then per evaluation: a fresh `Store` (so nothing leaks from one
//! evaluation to the next), instantiated from a prepared `InstancePre` (the
//! import check and type check are done at load), with an epoch deadline and a
//! memory limit. The bench `policy-eval` measures what instantiation costs.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ipvs_policy_sdk::validate;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, EngineWeak, ResourceLimiter, Store, Trap};

use super::PolicyError;
use crate::snapshot::{Labels, Snapshot};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../sdk/wit",
        world: "policy",
    });
}

use bindings::exports::ipvs_operator::policy::evaluator as wit;

/// The export every policy must have: the evaluator interface, at the version this host speaks.
pub const INTERFACE_EXPORT: &str = "ipvs-operator:policy/evaluator@0.1.0";

/// How often the deadline clock ticks while an evaluation runs.
const TICK: Duration = Duration::from_millis(5);

/// Limits for every evaluation.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Wall-clock budget of one evaluation (default 50 ms).
    pub timeout: Duration,
    /// Largest linear memory a policy may grow to (default 64 MiB).
    pub memory_limit: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            timeout: Duration::from_millis(50),
            memory_limit: 64 << 20,
        }
    }
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
    pub fn config(&self) -> EngineConfig {
        self.config
    }

    /// Compile and check a component: it must import nothing and export
    /// [`INTERFACE_EXPORT`] with the expected types.
    pub fn load(&self, name: &str, bytes: &[u8]) -> Result<LoadedPolicy, PolicyError> {
        let sha256 = hex_sha256(bytes);
        let component = Component::new(&self.engine, bytes).map_err(|e| PolicyError::Compile {
            policy: name.into(),
            reason: format!("{e:#}"),
        })?;
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
        let input = to_wit(snapshot);
        let decision = self.call(&input)?;
        let ready: Vec<bool> = snapshot.endpoints.iter().map(|e| e.ready).collect();
        validate::check(
            &decision.weights,
            &ready,
            ipvs_policy_sdk::config::allow_all_zero(&snapshot.config),
        )
        .map_err(|e| PolicyError::InvalidDecision {
            policy: self.name.clone(),
            reason: describe_invalid(&e, snapshot),
        })?;
        Ok(Evaluation {
            weights: decision.weights.iter().map(|w| *w as u16).collect(),
            requeue_after: decision.requeue_after_ms.map(Duration::from_millis),
            message: decision.message,
        })
    }

    /// Instantiate afresh and call `evaluate`, mapping every failure to its kind.
    fn call(&self, input: &wit::Input) -> Result<wit::Decision, PolicyError> {
        let engine = &self.engine;
        let mut store = Store::new(
            &engine.engine,
            StoreState {
                limits: MemoryLimit {
                    max: engine.config.memory_limit,
                    refused: false,
                },
            },
        );
        store.limiter(|s| &mut s.limits);
        let ticks = engine.config.timeout.as_nanos().div_ceil(TICK.as_nanos()) as u64;
        store.set_epoch_deadline(ticks.max(1));
        store.epoch_deadline_trap();

        let _running = engine.ticker.running();
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

/// The hex SHA-256 of `bytes`: how modules are identified and pinned.
pub fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn labels(map: &Labels) -> Vec<wit::Label> {
    map.iter()
        .map(|(k, v)| wit::Label {
            key: k.clone(),
            value: v.clone(),
        })
        .collect()
}

fn timestamp(t: k8s_openapi::jiff::Timestamp) -> wit::Timestamp {
    wit::Timestamp {
        seconds: t.as_second(),
        nanos: t.subsec_nanosecond().max(0) as u32,
    }
}

fn to_wit(s: &Snapshot) -> wit::Input {
    wit::Input {
        service: wit::Service {
            namespace: s.service.namespace.clone(),
            name: s.service.name.clone(),
            selector: labels(&s.service.selector),
            labels: labels(&s.service.labels),
            annotations: labels(&s.service.annotations),
        },
        groups: s
            .groups
            .iter()
            .map(|g| wit::WeightGroup {
                weight: g.weight,
                selector: labels(&g.selector),
            })
            .collect(),
        config: s.config.clone(),
        endpoints: s
            .endpoints
            .iter()
            .map(|e| wit::Endpoint {
                pod_name: e.pod_name.clone(),
                address: e.address.to_string(),
                node_name: e.node_name.clone(),
                zone: e.zone.clone(),
                labels: labels(&e.labels),
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
                created: e.created.map(timestamp),
                ready_since: e.ready_since.map(timestamp),
            })
            .collect(),
        node: s.node.as_ref().map(|n| wit::Node {
            name: n.name.clone(),
            zone: n.zone.clone(),
            labels: labels(&n.labels),
        }),
        now: timestamp(s.now),
    }
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
