//! The node agent: evaluates each WeightedService's policy for this node and
//! writes weights and schedulers into the kernel's IPVS table, beside kube-proxy.
//!
//! Watches feed [`Change`]s to one work loop (a thread: netlink and wasmtime are
//! synchronous). A pass rebuilds the snapshots of what changed, evaluates the
//! policies whose input changed (or that asked to be evaluated again), reads the
//! kernel's virtual services of those WeightedServices, and writes only the
//! difference. Besides passes after changes — and short retries after
//! EndpointSlice changes, since kube-proxy acts asynchronously — a periodic
//! sweep compares everything with the kernel and repairs what kube-proxy
//! reverted (IPVS has no change notifications, so polling is the only way). See
//! DESIGN.md, "Coexisting with kube-proxy".
//!
//! What a pass costs follows what changed, not the cluster's size: a change
//! rebuilds only the snapshots it touches and reads only their virtual services
//! (by key, when no NodePort is involved: no listing of the node's table). The
//! sweep only reads and compares (inputs that did not change are not rebuilt):
//! it reads the whole table in pieces — through IPVS's `getsockopt` interface
//! ([`ipvs::SockoptTable`]), or from `/proc/net/ip_vs` when the plans have
//! IPv6 virtual services, which that interface does not show — and goes
//! through netlink only for the WeightedServices that differ there (or for all
//! of them when the table cannot be read), in chunks between which changes are
//! handled, so an edit never waits behind a sweep of thousands of virtual
//! services.
//!
//! The parts: [`schedule`] decides what to do when, [`evaluate`] turns the
//! caches into plans (evaluating policies), [`plan`] and [`drift`] are the pure
//! comparison of plans with the kernel, and [`kernel`] reads and writes IPVS.
//! Services labelled for the agent to serve itself (`spec.proxy:
//! ipvs-operator`) go to [`serving`] instead, which makes their addresses
//! ([`interface`]) and virtual services ([`standalone`]) whole.

pub mod confirm;
pub mod drift;
pub mod interface;
pub mod nftables;
pub mod node_addresses;
pub mod plan;
pub mod procfs;
pub mod serving;
pub mod standalone;
mod evaluate;
mod kernel;
mod schedule;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;

use crate::cluster::{Change, Stores};
use crate::events::{EventSink, Notice};
use crate::metrics::{Health, Metrics};
use crate::policy::{Catalog, PolicyError};
use confirm::{ApiEndpointReader, EndpointReader};
use evaluate::Evaluator;
use kernel::{InScope, Kernel};
use node_addresses::Cidr;
use schedule::{Dirty, Sweeper};
use serving::Serving;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name (the Node object's).
    pub node_name: String,
    /// How often everything is compared with the kernel (kube-proxy's reverts are
    /// repaired within this long).
    pub drift_interval: Duration,
    /// How the sweep reads the kernel's table.
    pub table_reader: TableReader,
    /// After an EndpointSlice changes, look again after these delays: kube-proxy
    /// creates the new destinations asynchronously.
    pub slice_retries: Vec<Duration>,
    /// Gather the changes of this long into one pass.
    pub debounce: Duration,
    /// `--nodeport-addresses`: NodePorts are matched only on node addresses in
    /// these ranges (none: every node address), as kube-proxy's same setting.
    pub node_port_addresses: Vec<Cidr>,
    /// How long a fresh read of EndpointSlices (before raising a weight of 0) may take.
    pub confirm_timeout: Duration,
    /// In a Service the agent serves itself, a removed endpoint's destination
    /// drains at weight 0 until its connections end, or this long.
    pub drain_timeout: Duration,
    /// A Service switched back to kube-proxy is still served here until
    /// kube-proxy has its addresses on `kube-ipvs0`, or this long.
    pub handover_timeout: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            node_name: String::new(),
            drift_interval: Duration::from_secs(2),
            table_reader: TableReader::Auto,
            slice_retries: vec![Duration::from_millis(200), Duration::from_millis(1000), Duration::from_millis(3000)],
            debounce: Duration::from_millis(5),
            node_port_addresses: Vec::new(),
            confirm_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(120),
            handover_timeout: Duration::from_secs(30),
        }
    }
}

/// A WeightedService, or its labelled Service (of the same name), by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WsKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for WsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The outcome of one pass, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassReport {
    /// WeightedServices whose policy was evaluated.
    pub evaluated: usize,
    /// Writes sent.
    pub writes: usize,
    /// Writes the kernel refused.
    pub errors: usize,
    /// Desired virtual services or destinations the kernel does not have yet.
    pub missing: usize,
}

/// The work loop's state: when to do what ([`schedule`]), the plans
/// ([`evaluate`]), and the kernel ([`kernel`]).
pub struct Worker {
    config: AgentConfig,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    events: EventSink,
    evaluator: Evaluator,
    kernel: Kernel,
    serving: Serving,
    /// The plans' generation the served Services were last synced at.
    served_plans: Option<u64>,
    /// A sweep began: the served Services are compared whole with the kernel
    /// (the sweep's comparison only sees weights and schedulers).
    serving_due: bool,
    sweeper: Sweeper,
}

impl Worker {
    /// A worker over these caches; call [`Worker::run`] once they are ready.
    /// `reader` reads EndpointSlices fresh from the API server.
    pub fn new(
        config: AgentConfig,
        stores: Stores,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        events: EventSink,
        reader: Box<dyn EndpointReader>,
    ) -> Self {
        let evaluator = Evaluator::new(config.node_name.clone(), stores, catalog, metrics.clone(), events.clone());
        let kernel = Kernel::new(metrics.clone(), reader, config.node_port_addresses.clone());
        let sweeper = Sweeper::new(config.table_reader);
        let serving = Serving::new(metrics.clone(), config.drain_timeout, config.handover_timeout);
        Worker { config, metrics, health, events, evaluator, kernel, serving, served_plans: None, serving_due: true, sweeper }
    }

    /// One pass: rebuild what changed, then compare what is in scope with the kernel.
    fn pass(&mut self, dirty: &Dirty) -> PassReport {
        let mut report = PassReport::default();
        if dirty.all && self.kernel.refresh_node_addresses() {
            self.evaluator.plans_changed += 1;
        }
        report.evaluated = self.evaluator.rebuild(dirty, Timestamp::now(), Instant::now());
        let (served, in_scope): (Vec<InScope>, Vec<InScope>) = self
            .evaluator
            .states
            .iter()
            .filter(|(k, _)| dirty.in_scope(k))
            .filter_map(|(k, s)| Some(InScope { key: k.clone(), plan: s.plan.clone()?, applied: s.plan_applied }))
            .partition(|s| s.plan.standalone.is_some());
        let mut failed = HashMap::new();
        // The Services served here, whole, when one of them or the set of plans changed.
        let generation = Some(self.evaluator.plans_changed);
        if (!served.is_empty() || dirty.all || self.serving_due || self.served_plans != generation)
            && self.serving.needed(self.evaluator.plans())
        {
            match self.serving.sync(self.evaluator.plans(), &self.kernel.node_addresses) {
                Ok(outcome) => {
                    self.served_plans = generation;
                    self.serving_due = false;
                    report.writes += outcome.writes;
                    report.errors += outcome.errors;
                    failed.extend(outcome.failed);
                    for (key, note) in outcome.deleted_by_others {
                        if let Some(reference) = self.evaluator.reference(&key) {
                            self.events.send(Notice {
                                reference,
                                type_: EventType::Warning,
                                reason: "VirtualServiceDeleted".into(),
                                note: format!("on node {}: {note}", self.config.node_name),
                            });
                        }
                    }
                    for scope in &served {
                        if !failed.contains_key(&scope.key)
                            && let Some(state) = self.evaluator.states.get_mut(&scope.key)
                        {
                            state.plan_applied = true;
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "serving Services here: tried again at the next pass"),
            }
        }
        let kernel_synced = match self.kernel.sync(&in_scope, dirty.is_sweep_chunk()) {
            Some(outcome) => {
                report.writes += outcome.writes;
                report.errors += outcome.errors;
                report.missing = outcome.missing;
                failed.extend(outcome.failed);
                true
            }
            None => false,
        };
        for (key, error) in &failed {
            if let Some(reference) = self.evaluator.reference(key) {
                self.events.send(Notice {
                    reference,
                    type_: EventType::Warning,
                    reason: "IpvsWriteFailed".into(),
                    note: format!("on node {}: {error}", self.config.node_name),
                });
            }
        }
        for scope in in_scope.iter().filter(|_| kernel_synced) {
            if !failed.contains_key(&scope.key)
                && let Some(state) = self.evaluator.states.get_mut(&scope.key)
            {
                state.plan_applied = true;
            }
        }
        report
    }
}

/// How the periodic sweep reads the kernel's table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TableReader {
    /// Through IPVS's getsockopt interface (the cheapest; it shows IPv4 only),
    /// or from /proc/net/ip_vs when a WeightedService has IPv6 virtual services.
    #[default]
    Auto,
    /// Always from /proc/net/ip_vs.
    Proc,
}

/// Run the agent: watch, wait for the first full sync, then run passes until
/// the process ends. Events are published as `ipvs-operator-agent` on this node.
pub async fn run(
    client: kube::Client,
    config: AgentConfig,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> Result<(), AgentError> {
    let (tx, rx) = std::sync::mpsc::channel();
    // A policy module compiled, refused or deleted: look at everything again;
    // only the WeightedServices whose module (or its error) changed are
    // evaluated again. (A retry after host trouble changes nothing yet.)
    let reload = std::sync::Mutex::new(tx.clone());
    catalog.subscribe(move |event| {
        if !matches!(event, crate::policy::CatalogEvent::Retrying { .. }) {
            let _ = reload
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send(Change::All);
        }
    });
    let (stores, watches) = crate::cluster::watch(client.clone(), Some(config.node_name.clone()), metrics.clone(), move |c| {
        let _ = tx.send(c);
    });
    tokio::spawn(watches);
    let reporter = kube::runtime::events::Reporter {
        controller: "ipvs-operator-agent".into(),
        instance: Some(config.node_name.clone()),
    };
    let reader = ApiEndpointReader::new(client.clone(), tokio::runtime::Handle::current(), config.confirm_timeout);
    let (events, publisher) = crate::events::publisher(client, reporter);
    tokio::spawn(publisher);
    tracing::info!(node = %config.node_name, "waiting for the first full sync of the watch caches");
    stores.wait_until_ready().await.map_err(|_| AgentError::WatchesStopped)?;
    tracing::info!(
        weighted_services = stores.weighted_services.len(),
        services = stores.services.len(),
        endpoint_slices = stores.slices.len(),
        pod_info_slices = stores.pod_infos.len(),
        "watch caches synced"
    );
    let worker = Worker::new(config, stores, catalog, metrics, health, events, Box::new(reader));
    let thread = std::thread::Builder::new()
        .name("agent-passes".into())
        .spawn(move || worker.run(rx))
        .map_err(|e| AgentError::Worker(format!("could not start: {e}")))?;
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .map_err(|e| AgentError::Worker(format!("could not be joined: {e}")))?
        .map_err(|_| AgentError::Worker("panicked".into()))?;
    Ok(())
}

/// The Event reason for a policy failure.
pub fn reason_for(error: &PolicyError) -> &'static str {
    match error {
        PolicyError::NotFound { .. } => "PolicyNotFound",
        PolicyError::PinMismatch { .. } => "PolicyPinMismatch",
        PolicyError::InvalidDecision { .. } => "PolicyDecisionInvalid",
        PolicyError::ConfigInvalid { .. } => "PolicyConfigInvalid",
        PolicyError::TooLarge { .. }
        | PolicyError::Compile { .. }
        | PolicyError::CompileTimeout { .. }
        | PolicyError::CompileMemory { .. }
        | PolicyError::Limits { .. }
        | PolicyError::Imports { .. }
        | PolicyError::Interface { .. }
        | PolicyError::VersionMismatch { .. }
        | PolicyError::Refused { .. } => "PolicyModuleRefused",
        PolicyError::Host { .. } | PolicyError::Loading { .. } => "PolicyUnavailable",
        _ => "PolicyFailed",
    }
}

/// Return the allocator's free pages to the kernel (glibc keeps what was freed
/// in its arenas, so the buffers of the first full lists would stay resident).
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        let before = resident_kib();
        // SAFETY: malloc_trim only walks glibc's own arenas; no preconditions.
        unsafe {
            malloc_trim(0);
        }
        tracing::debug!(before_kib = before, after_kib = resident_kib(), "released free memory");
    }
}

/// This process's resident memory (VmRSS), in KiB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok()))
        .unwrap_or(0)
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The watch caches went away before their first sync.
    #[error("the watch caches stopped before their first sync")]
    WatchesStopped,
    /// The work loop could not start or died.
    #[error("the agent's work loop {0}")]
    Worker(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_failures_have_event_reasons() {
        let missing = PolicyError::NotFound { name: "canary".into(), known: String::new() };
        assert_eq!(reason_for(&missing), "PolicyNotFound");
        assert_eq!(WsKey { namespace: "shop".into(), name: "web".into() }.to_string(), "shop/web");
        let config = AgentConfig::default();
        assert!(config.node_port_addresses.is_empty(), "every node address by default, as kube-proxy");
        assert!(config.confirm_timeout < config.drift_interval * 5);
    }
}
