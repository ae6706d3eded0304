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

pub mod drift;
pub mod plan;
pub mod procfs;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipvs::{DesiredService, IpvsClient, IpvsError, ServiceEntry, ServiceKey, SockoptTable, Write};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use crate::cluster::{Change, Stores};
use crate::crd::WeightedService;
use crate::events::{EventSink, Notice};
use crate::metrics::{Health, Metrics};
use crate::policy::{Catalog, PolicyError};
use crate::snapshot::{NodeInfo, ReadySince, Snapshot};
use plan::{desired, ServicePlan};

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
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            node_name: String::new(),
            drift_interval: Duration::from_secs(2),
            table_reader: TableReader::Auto,
            slice_retries: vec![Duration::from_millis(200), Duration::from_millis(1000), Duration::from_millis(3000)],
            debounce: Duration::from_millis(5),
        }
    }
}

/// A WeightedService, by namespace and name.
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

/// A failed policy is tried again after this long even if nothing changed
/// (a timeout under load may pass).
const FAILED_RETRY: Duration = Duration::from_secs(30);

/// WeightedServices compared with the kernel in one chunk of the periodic
/// sweep; changes that arrived meanwhile are handled between chunks.
const SWEEP_CHUNK: usize = 50;

/// Up to this many virtual services, a pass reads them one by one by key
/// rather than listing every virtual service of the node.
const TARGETED_READS: usize = 32;

/// What the agent knows about one WeightedService.
struct WsState {
    uid: String,
    /// Hash of the last snapshot evaluated (without `now`) and the policy module.
    input_hash: Option<u64>,
    /// When the policy asked to be evaluated again (or a failed one is retried).
    due: Option<Instant>,
    /// The last good weights, by endpoint address: what stays when the policy fails.
    weights: Option<HashMap<IpAddr, u16>>,
    /// The last policy error, not to repeat its Event.
    error: Option<String>,
    /// Where the weights go, from the current snapshot.
    plan: Option<Arc<ServicePlan>>,
    /// The plan has been written once; later writes for it repair drift.
    plan_applied: bool,
    /// The reference Events about it attach to.
    reference: k8s_openapi::api::core::v1::ObjectReference,
}

/// What the agent changed in the kernel for one WeightedService, to put back
/// when the WeightedService goes away.
#[derive(Default)]
struct Changed {
    /// Destinations whose weight we set to something other than 1.
    weights: HashSet<(ServiceKey, SocketAddr)>,
    /// Virtual services whose scheduler we changed, with the one they had.
    schedulers: HashMap<ServiceKey, String>,
}

/// Which WeightedServices a pass looks at.
#[derive(Default)]
struct Dirty {
    /// Rebuild and compare everything (the first pass, relists, the Node, policies).
    all: bool,
    /// Rebuild and compare these.
    keys: HashSet<WsKey>,
    /// Labels of pods that changed, by namespace: the WeightedServices whose
    /// selectors match them are rebuilt (see [`Worker::resolve_pods`]).
    pods: HashMap<String, HashSet<BTreeMap<String, String>>>,
    /// Only compare these with the kernel (a chunk of the periodic sweep): their
    /// inputs did not change.
    check: HashSet<WsKey>,
}

impl Dirty {
    fn add(&mut self, change: Change) {
        match change {
            Change::WeightedService(namespace, name) | Change::Service(namespace, name) | Change::Slices(namespace, name) => {
                self.keys.insert(WsKey { namespace, name });
            }
            Change::Pod(namespace, labels) => {
                // A burst of changes to pods of one Deployment carries the same labels.
                self.pods.entry(namespace).or_default().insert(labels);
            }
            Change::Node | Change::All => self.all = true,
        }
    }

    /// Whether the WeightedService's snapshot is rebuilt.
    fn contains(&self, key: &WsKey) -> bool {
        self.all || self.keys.contains(key)
    }

    /// Whether the WeightedService is compared with the kernel.
    fn in_scope(&self, key: &WsKey) -> bool {
        self.contains(key) || self.check.contains(key)
    }

    fn is_empty(&self) -> bool {
        !self.all && self.keys.is_empty() && self.pods.is_empty() && self.check.is_empty()
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

/// The work loop's state.
pub struct Worker {
    config: AgentConfig,
    stores: Stores,
    catalog: Arc<Catalog>,
    ipvs: Option<IpvsClient>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    events: EventSink,
    states: HashMap<WsKey, WsState>,
    changed: HashMap<WsKey, Changed>,
    ready_since: ReadySince,
    /// The node's virtual services as listed for the sweep under way: its
    /// chunks read only their destinations. Dropped when a sweep starts and
    /// when a pass writes.
    listed: Option<Vec<ipvs::Service>>,
    /// Sweeps started, for the occasional cross-check of the cache and the state.
    sweeps: u64,
    /// The last text of `/proc/net/ip_vs`: its buffer is reused by the next sweep.
    table_text: String,
    /// The reader of the IPv4 table; `None` until the first sweep, or when it
    /// cannot be opened (the sweep then reads `/proc/net/ip_vs`).
    sockopt: Option<SockoptTable>,
    /// Whether the plans have IPv6 virtual services, as of [`Worker::plans_changed`].
    plans_have_ipv6: Option<(u64, bool)>,
    /// Counts changes to the plans (set, replaced, dropped).
    plans_changed: u64,
    /// The last sweep that found nothing to repair: a sweep that reads the
    /// same text while the plans are the same has nothing to repair either.
    quiet_sweep: Option<QuietSweep>,
}

/// What a sweep that found no drift saw.
#[derive(Clone, Copy, PartialEq, Eq)]
struct QuietSweep {
    /// A hash of the table as read (text or IPv4 structs).
    table: u64,
    /// [`Worker::plans_changed`] then.
    plans: u64,
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

/// A sweep's read of the kernel's table, under way.
enum TableReading {
    /// The IPv4 table through `getsockopt`: [`Worker::sockopt`].
    Sockopt,
    /// `/proc/net/ip_vs`, into [`Worker::table_text`].
    Proc(procfs::TableRead),
}

/// What the sweep wants of a virtual service that `m` matched.
fn wanted<'a>(m: plan::Match<'a, WsKey>) -> drift::Wanted<'a, WsKey> {
    drift::Wanted { owner: m.key, scheduler: &m.plan.scheduler, weights: &m.port.weights }
}

/// How many virtual services' destinations one piece of a `getsockopt` read
/// gets (about 1.5 ms under emulation, for 10 destinations each).
const SOCKOPT_PIECE: usize = 200;

/// Every this many sweeps, the WeightedServices in the cache and those the
/// agent knows are cross-checked (watch events normally keep them the same).
const CROSS_CHECK_EVERY: u64 = 15;

impl Worker {
    /// A worker over these caches; call [`Worker::run`] once they are ready.
    pub fn new(
        config: AgentConfig,
        stores: Stores,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        events: EventSink,
    ) -> Self {
        Worker {
            config,
            stores,
            catalog,
            ipvs: None,
            metrics,
            health,
            events,
            states: HashMap::new(),
            changed: HashMap::new(),
            ready_since: ReadySince::default(),
            listed: None,
            sweeps: 0,
            table_text: String::new(),
            sockopt: None,
            plans_have_ipv6: None,
            plans_changed: 0,
            quiet_sweep: None,
        }
    }

    /// Run passes until `changes` is closed.
    pub fn run(mut self, changes: Receiver<Change>) {
        let mut dirty = Dirty { all: true, ..Dirty::default() };
        // The first pass compares everything: the first sweep comes one interval later.
        let mut next_sweep = Instant::now() + self.config.drift_interval;
        // What is left of the current sweep, and its read of the table under way.
        let mut sweep: Vec<WsKey> = Vec::new();
        let mut reading: Option<TableReading> = None;
        let mut retries: BTreeSet<Instant> = BTreeSet::new();
        let mut retry_keys: HashSet<WsKey> = HashSet::new();
        // Changes and sweep chunks take turns when both wait, so that a stream of
        // changes cannot hold drift repairs back for ever.
        let mut chunk_turn = false;
        loop {
            self.health.beat();
            let now = Instant::now();
            if dirty.is_empty() && (!sweep.is_empty() || reading.is_some()) {
                // Between two chunks of a sweep: what changed meanwhile goes first.
                loop {
                    match changes.try_recv() {
                        Ok(change) => self.note(change, &mut dirty, &mut retries, &mut retry_keys),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => return,
                    }
                }
            } else if dirty.is_empty() {
                let due = self.states.values().filter_map(|s| s.due).min();
                let wake =
                    [Some(next_sweep), due, retries.first().copied()].into_iter().flatten().min().unwrap_or(next_sweep);
                if wake > now {
                    match changes.recv_timeout(wake - now) {
                        Ok(change) => {
                            self.note(change, &mut dirty, &mut retries, &mut retry_keys);
                            // Gather a burst of watch events into one pass.
                            std::thread::sleep(self.config.debounce);
                            while let Ok(change) = changes.try_recv() {
                                self.note(change, &mut dirty, &mut retries, &mut retry_keys);
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            }
            let now = Instant::now();
            if now >= next_sweep {
                next_sweep = now + self.config.drift_interval;
                // A sweep still going (slower than the interval) is not restarted.
                if sweep.is_empty() && reading.is_none() {
                    reading = self.begin_sweep(&mut dirty);
                    if reading.is_none() {
                        sweep = self.states.keys().cloned().collect();
                    }
                }
            }
            while retries.first().is_some_and(|r| *r <= now) {
                retries.pop_first();
                dirty.keys.extend(retry_keys.iter().cloned());
            }
            if retries.is_empty() {
                retry_keys.clear();
            }
            for (key, state) in &self.states {
                if state.due.is_some_and(|d| d <= now) {
                    dirty.keys.insert(key.clone());
                }
            }
            let sweep_waits = !sweep.is_empty() || reading.is_some();
            let mut work = if !dirty.is_empty() && (!chunk_turn || !sweep_waits) {
                chunk_turn = true;
                std::mem::take(&mut dirty)
            } else if let Some(read) = reading.as_mut() {
                chunk_turn = false;
                match self.read_piece(read) {
                    Ok(false) => {}
                    Ok(true) => {
                        let drifted = match read {
                            TableReading::Sockopt => self.drifted_in_sockopt_table(),
                            TableReading::Proc(_) => self.drifted_in_text(),
                        };
                        reading = None;
                        sweep = match drifted {
                            Some(drifted) => drifted.into_iter().collect(),
                            None => self.states.keys().cloned().collect(),
                        };
                    }
                    Err(error) => {
                        tracing::debug!(%error, "cannot read the IPVS table: the sweep reads everything through netlink");
                        reading = None;
                        sweep = self.states.keys().cloned().collect();
                    }
                }
                continue;
            } else if !sweep.is_empty() {
                chunk_turn = false;
                let chunk = sweep.split_off(sweep.len().saturating_sub(SWEEP_CHUNK));
                Dirty { check: chunk.into_iter().collect(), ..Dirty::default() }
            } else {
                continue;
            };
            if work.all {
                // This pass compares everything: the sweep under way is done with it.
                sweep.clear();
                reading = None;
            }
            self.resolve_pods(&mut work);
            let started = Instant::now();
            let report = self.pass(&work);
            self.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
            if self.ipvs.is_none() {
                // The kernel could not be opened or read: the next sweep tries again.
                sweep.clear();
                reading = None;
            }
            if report.writes > 0 || report.errors > 0 || report.evaluated > 0 {
                tracing::info!(
                    evaluated = report.evaluated,
                    writes = report.writes,
                    errors = report.errors,
                    missing = report.missing,
                    took_ms = started.elapsed().as_secs_f64() * 1e3,
                    "pass"
                );
            }
            if report.missing > 0 && retries.is_empty() {
                // Not created by kube-proxy yet: look again soon (the periodic sweep
                // keeps looking after these).
                retry_keys.extend(work.keys.iter().cloned());
                for delay in &self.config.slice_retries {
                    retries.insert(Instant::now() + *delay);
                }
            }
            if self.ipvs.is_some() && !self.health.is_ready() {
                self.ready_since.mark_started();
                self.health.set_ready();
                tracing::info!("first pass done: ready");
            }
            if work.all {
                // The first lists of every watch and the first pass leave the
                // allocator's arenas full of freed buffers: give them back.
                release_free_memory();
            }
        }
    }

    /// Start a sweep: start reading the table (in pieces, between changes;
    /// then it is compared with the plans), or `None` if it cannot be read
    /// (the sweep then reads every virtual service through netlink). Now and
    /// then, any WeightedServices that the cache and the agent's state disagree
    /// on (new, gone, or replaced under the same name) are made dirty, should a
    /// change have been missed.
    fn begin_sweep(&mut self, dirty: &mut Dirty) -> Option<TableReading> {
        self.listed = None;
        self.sweeps += 1;
        if self.sweeps.is_multiple_of(CROSS_CHECK_EVERY) {
            let mut seen = HashSet::with_capacity(self.states.len());
            for ws in self.stores.weighted_services.state() {
                let key = WsKey { namespace: ws.namespace().unwrap_or_default(), name: ws.name_any() };
                if self.states.get(&key).map(|s| s.uid.as_str()) != ws.metadata.uid.as_deref() {
                    dirty.keys.insert(key.clone());
                }
                seen.insert(key);
            }
            dirty.keys.extend(self.states.keys().filter(|k| !seen.contains(*k)).cloned());
            self.forget_gone_endpoints();
            // And the table is compared in full, whatever its hash.
            self.quiet_sweep = None;
        }
        if self.config.table_reader == TableReader::Auto && !self.plans_have_ipv6() {
            if self.sockopt.is_none() {
                match SockoptTable::new() {
                    Ok(table) => self.sockopt = Some(table),
                    Err(error) => tracing::warn!(%error, "cannot open a socket to read the IPVS table: the sweep reads /proc/net/ip_vs"),
                }
            }
            if let Some(table) = self.sockopt.as_mut() {
                match table.list_services() {
                    Ok(()) => return Some(TableReading::Sockopt),
                    Err(error) => tracing::debug!(%error, "cannot list the IPVS table through getsockopt: the sweep reads /proc/net/ip_vs"),
                }
            }
        }
        match procfs::TableRead::open(&mut self.table_text) {
            Ok(read) => Some(TableReading::Proc(read)),
            Err(error) => {
                tracing::debug!(%error, "cannot read /proc/net/ip_vs: the sweep reads everything through netlink");
                None
            }
        }
    }

    /// Read the next piece of the table; `true` once it is all read.
    fn read_piece(&mut self, reading: &mut TableReading) -> Result<bool, Box<dyn std::error::Error>> {
        Ok(match reading {
            TableReading::Sockopt => match self.sockopt.as_mut() {
                Some(table) => table.read_destinations(SOCKOPT_PIECE)?,
                None => true,
            },
            TableReading::Proc(read) => read.next_piece(&mut self.table_text)?,
        })
    }

    /// Whether any plan has an IPv6 virtual service or destination: the
    /// `getsockopt` interface would not show it (kube-proxy programs IPv6
    /// NodePorts only for IPv6 Services, whose ClusterIPs are IPv6).
    fn plans_have_ipv6(&mut self) -> bool {
        if let Some((seen, answer)) = self.plans_have_ipv6
            && seen == self.plans_changed
        {
            return answer;
        }
        let answer = self.states.values().filter_map(|s| s.plan.as_deref()).flat_map(|p| &p.ports).any(|port| {
            port.addresses.iter().any(IpAddr::is_ipv6) || port.weights.keys().any(SocketAddr::is_ipv6)
        });
        self.plans_have_ipv6 = Some((self.plans_changed, answer));
        answer
    }

    /// Forget what was remembered about endpoints no EndpointSlice has any
    /// more: when their addresses became ready, and label sets no pod has —
    /// under churn (pods come and go, labels change) both would grow for ever.
    /// An address that comes back later is new again (ready since its pod's
    /// creation), as it is after a restart.
    fn forget_gone_endpoints(&mut self) {
        let ready_since = &mut self.ready_since;
        self.stores.slices.with_all(|slices| ready_since.forget_absent(slices));
    }

    /// The WeightedServices whose virtual services differ from their plans in
    /// the table just read through `getsockopt`: a scheduler, a weight, or a
    /// destination the kernel does not have (yet).
    fn drifted_in_sockopt_table(&mut self) -> Option<HashSet<WsKey>> {
        let table = self.sockopt.as_ref()?;
        let hash = drift::sockopt_table_hash(table);
        self.unless_quiet(hash, |worker| {
            let table = worker.sockopt.as_ref()?;
            let matcher = worker.matcher();
            let drifted = drift::drifted_in_sockopt_table(table, |key| Some(wanted(matcher.find(key)?)));
            Some(drifted.into_iter().cloned().collect())
        })
    }

    /// The same, in the text of `/proc/net/ip_vs` just read (`table_text`);
    /// `None` when the text is not in the kernel's format.
    fn drifted_in_text(&mut self) -> Option<HashSet<WsKey>> {
        let text = std::mem::take(&mut self.table_text);
        let drifted = self.unless_quiet(procfs::table_hash(&text), |worker| {
            let matcher = worker.matcher();
            let Some(drifted) = procfs::drifted(&text, |key| Some(wanted(matcher.find(key)?))) else {
                tracing::warn!("/proc/net/ip_vs is not in the expected format: the sweep reads everything through netlink");
                return None;
            };
            Some(drifted.into_iter().cloned().collect())
        });
        // The buffer is reused by the next sweep.
        self.table_text = text;
        drifted
    }

    /// `compare`'s answer, unless the table hashes as it did at the last
    /// sweep that found nothing and the plans are the same: an idle node reads
    /// the same table every sweep, and hashing it costs a fraction of
    /// comparing it with every plan.
    fn unless_quiet(
        &mut self,
        table_hash: u64,
        compare: impl FnOnce(&Self) -> Option<HashSet<WsKey>>,
    ) -> Option<HashSet<WsKey>> {
        let seen = QuietSweep { table: table_hash, plans: self.plans_changed };
        if self.quiet_sweep == Some(seen) {
            return Some(HashSet::new());
        }
        let drifted = compare(self);
        self.quiet_sweep = drifted.as_ref().filter(|d| d.is_empty()).map(|_| seen);
        drifted
    }

    /// An index of the plans by virtual service.
    fn matcher(&self) -> plan::Matcher<'_, WsKey> {
        plan::Matcher::new(self.states.iter().filter_map(|(k, s)| Some((k, s.plan.as_deref()?))))
    }

    fn note(&self, change: Change, dirty: &mut Dirty, retries: &mut BTreeSet<Instant>, retry_keys: &mut HashSet<WsKey>) {
        if let Change::Slices(namespace, name) = &change {
            retry_keys.insert(WsKey { namespace: namespace.clone(), name: name.clone() });
            let now = Instant::now();
            for delay in &self.config.slice_retries {
                retries.insert(now + *delay);
            }
        }
        dirty.add(change);
    }

    /// Turn pod changes into the WeightedServices they can matter to: those of
    /// the pod's namespace whose Service selector matches its labels (or that
    /// have no selector). A pod that stops or starts matching also changes an
    /// EndpointSlice, which names its WeightedService; rebuilding every
    /// WeightedService of a busy namespace on each pod change was most of the
    /// agent's work under churn.
    fn resolve_pods(&self, dirty: &mut Dirty) {
        if dirty.pods.is_empty() {
            return;
        }
        let pods = std::mem::take(&mut dirty.pods);
        if dirty.all {
            return;
        }
        for key in self.states.keys() {
            let Some(changed) = pods.get(&key.namespace) else { continue };
            if dirty.keys.contains(key) {
                continue;
            }
            let Some(ws) = self.stores.weighted_services.get(&ObjectRef::new(&key.name).within(&key.namespace)) else {
                continue;
            };
            let selector = ws.spec.service.selector.as_ref().filter(|s| !s.is_empty());
            let matches = |labels: &BTreeMap<String, String>| {
                selector.is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
            };
            if changed.iter().any(matches) {
                dirty.keys.insert(key.clone());
            }
        }
    }

    /// One pass: rebuild what changed, then compare what is in scope with the kernel.
    fn pass(&mut self, dirty: &Dirty) -> PassReport {
        let mut report = PassReport::default();
        let now = Timestamp::now();
        let instant = Instant::now();

        // The WeightedServices to rebuild, as the cache has them now (None: gone).
        let store = &self.stores.weighted_services;
        let candidates: Vec<(WsKey, Option<Arc<WeightedService>>)> = if dirty.all {
            let current: HashMap<WsKey, Arc<WeightedService>> = store
                .state()
                .into_iter()
                .map(|ws| (WsKey { namespace: ws.namespace().unwrap_or_default(), name: ws.name_any() }, ws))
                .collect();
            let gone: Vec<(WsKey, Option<Arc<WeightedService>>)> =
                self.states.keys().filter(|k| !current.contains_key(*k)).map(|k| (k.clone(), None)).collect();
            current.into_iter().map(|(k, ws)| (k, Some(ws))).chain(gone).collect()
        } else {
            dirty
                .keys
                .iter()
                .map(|k| (k.clone(), store.get(&ObjectRef::new(&k.name).within(&k.namespace))))
                .collect()
        };
        let mut gone = Vec::new();
        for (key, ws) in &candidates {
            let uid = ws.as_ref().and_then(|ws| ws.metadata.uid.as_deref());
            if self.states.get(key).is_some_and(|s| Some(s.uid.as_str()) != uid) {
                self.states.remove(key);
                self.plans_changed += 1;
                tracing::info!(weighted_service = %key, "WeightedService gone: restoring what it changed");
                gone.push(key.clone());
            }
        }

        let rebuilding = candidates.iter().filter(|(_, ws)| ws.is_some()).count();
        if rebuilding > 0 {
            let node = self.stores.node_info(&self.config.node_name);
            for (key, ws) in &candidates {
                let Some(ws) = ws else { continue };
                let slices = self.stores.slices.slices_of(&key.namespace, &key.name);
                if self.refresh(key, ws, &slices, &node, now, instant) {
                    report.evaluated += 1;
                }
            }
        }

        let mut ipvs = match self.ipvs.take() {
            Some(client) => client,
            None => match IpvsClient::new() {
                Ok(client) => client,
                Err(error) => {
                    tracing::error!(%error, "cannot open IPVS; retrying at the next pass");
                    return report;
                }
            },
        };
        match self.sync_kernel(&mut ipvs, dirty, &gone, &mut report) {
            Ok(()) => self.ipvs = Some(ipvs),
            // A fresh socket next time.
            Err(error) => tracing::warn!(%error, "reading the IPVS table"),
        }
        report
    }

    /// Read the kernel's virtual services of what is in scope (or restored) and
    /// write the difference.
    fn sync_kernel(&mut self, ipvs: &mut IpvsClient, dirty: &Dirty, gone: &[WsKey], report: &mut PassReport) -> Result<(), IpvsError> {
        let in_scope: Vec<(WsKey, Arc<ServicePlan>)> = if dirty.all {
            self.states
                .iter()
                .filter(|(k, _)| dirty.in_scope(k))
                .filter_map(|(k, s)| s.plan.clone().map(|p| (k.clone(), p)))
                .collect()
        } else {
            dirty
                .keys
                .iter()
                .chain(&dirty.check)
                .collect::<HashSet<_>>()
                .into_iter()
                .filter_map(|k| self.states.get(k)?.plan.clone().map(|p| (k.clone(), p)))
                .collect()
        };
        if in_scope.is_empty() && gone.is_empty() {
            return Ok(());
        }
        let matcher = plan::Matcher::new(in_scope.iter().map(|(k, p)| (k, &**p)));
        let restoring: HashSet<ServiceKey> = gone
            .iter()
            .filter_map(|k| self.changed.get(k))
            .flat_map(|c| c.weights.iter().map(|(s, _)| *s).chain(c.schedulers.keys().copied()))
            .collect();
        let wanted = |service: &ipvs::Service| matcher.find(&service.key).is_some() || restoring.contains(&service.key);
        let sweeping = !dirty.all && dirty.keys.is_empty() && gone.is_empty();
        let entries = if sweeping {
            // A chunk of the sweep: the listing made for the sweep, fresh destinations.
            let listed = match self.listed.take() {
                Some(listed) => listed,
                None => ipvs.services()?,
            };
            let mut entries = Vec::new();
            for service in listed.iter().filter(|s| wanted(s)) {
                let destinations = ipvs.destinations(&service.key)?;
                entries.push(ServiceEntry { service: service.clone(), destinations });
            }
            self.listed = Some(listed);
            entries
        } else {
            match targeted_keys(&in_scope, &restoring) {
                Some(keys) => read_services(ipvs, keys)?,
                None => ipvs.dump_services(wanted)?,
            }
        };

        let mut wanted: Vec<(WsKey, DesiredService)> = desired(in_scope.iter().map(|(k, p)| (k, &**p)), &entries)
            .into_iter()
            .map(|(k, d)| (k.clone(), d))
            .collect();
        for key in gone {
            if let Some(changed) = self.changed.remove(key) {
                wanted.extend(restore(&changed, &entries).into_iter().map(|d| (key.clone(), d)));
            }
        }
        let owner: HashMap<ServiceKey, WsKey> = wanted.iter().map(|(k, d)| (d.service, k.clone())).collect();
        let desired_services: Vec<DesiredService> = wanted.into_iter().map(|(_, d)| d).collect();
        let plan = ipvs::plan(&desired_services, &entries);
        report.missing = plan.missing_services.len() + plan.missing_destinations.len();
        let originals: HashMap<ServiceKey, String> =
            entries.iter().map(|e| (e.service.key, e.service.scheduler.clone())).collect();
        let results = if plan.writes.is_empty() {
            Vec::new()
        } else {
            // What the sweep listed may be out of date now.
            self.listed = None;
            ipvs.apply(&plan.writes)
        };
        report.writes = plan.writes.len();
        let mut failed: HashSet<WsKey> = HashSet::new();
        for (write, result) in plan.writes.iter().zip(results) {
            let (service, kind) = match write {
                Write::EditService(s) => (s.key, "scheduler"),
                Write::EditDestination { service, .. } => (*service, "weight"),
                _ => continue,
            };
            let Some(key) = owner.get(&service) else { continue };
            match result {
                Ok(()) => {
                    Metrics::count(&self.metrics.netlink_writes, kind, 1);
                    if self.states.get(key).is_some_and(|s| s.plan_applied) {
                        Metrics::count(&self.metrics.drift_repairs, kind, 1);
                    }
                    self.record(key, write, &originals);
                }
                Err(error) => {
                    report.errors += 1;
                    Metrics::count(&self.metrics.netlink_errors, kind, 1);
                    match error {
                        // Gone between the read and the write: kube-proxy's business, not an error.
                        IpvsError::ServiceNotFound { .. } | IpvsError::DestinationNotFound { .. } => {
                            tracing::debug!(weighted_service = %key, %error, "IPVS entry vanished before the write");
                        }
                        error => {
                            tracing::warn!(weighted_service = %key, %error, "IPVS write failed");
                            if failed.insert(key.clone())
                                && let Some(state) = self.states.get(key)
                            {
                                self.events.send(Notice {
                                    reference: state.reference.clone(),
                                    type_: EventType::Warning,
                                    reason: "IpvsWriteFailed".into(),
                                    note: format!("on node {}: {error}", self.config.node_name),
                                });
                            }
                        }
                    }
                }
            }
        }
        for (key, _) in &in_scope {
            if !failed.contains(key)
                && let Some(state) = self.states.get_mut(key)
            {
                state.plan_applied = true;
            }
        }
        Ok(())
    }

    /// Remember what a successful write changed, to put it back later.
    fn record(&mut self, key: &WsKey, write: &Write, originals: &HashMap<ServiceKey, String>) {
        let changed = self.changed.entry(key.clone()).or_default();
        match write {
            Write::EditService(s) => {
                if let Some(original) = originals.get(&s.key) {
                    changed.schedulers.entry(s.key).or_insert_with(|| original.clone());
                }
            }
            Write::EditDestination { service, destination } => {
                let id = (*service, destination.socket_addr());
                if destination.weight == 1 {
                    changed.weights.remove(&id);
                } else {
                    changed.weights.insert(id);
                }
            }
            _ => {}
        }
    }

    /// Rebuild the snapshot and plan of one WeightedService, evaluating its
    /// policy if its input changed or it is due. True if it was evaluated.
    fn refresh(
        &mut self,
        key: &WsKey,
        ws: &WeightedService,
        slices: &[Arc<EndpointSlice>],
        node: &NodeInfo,
        now: Timestamp,
        instant: Instant,
    ) -> bool {
        let uid = ws.metadata.uid.clone().unwrap_or_default();
        let state = self.states.entry(key.clone()).or_insert_with(|| WsState {
            uid,
            input_hash: None,
            due: None,
            weights: None,
            error: None,
            plan: None,
            plan_applied: false,
            reference: ws.object_ref(&()),
        });
        let Some(service) = self.stores.owned_service(ws) else {
            // The controller has not created it (or it is someone else's): nothing to program.
            if state.plan.take().is_some() {
                self.plans_changed += 1;
            }
            return false;
        };
        let stores = &self.stores;
        let snapshot = match Snapshot::from_cluster(
            ws,
            &service,
            slices.iter().map(|s| s.as_ref()),
            |ns, name| stores.pod(ns, name),
            Some(node.clone()),
            now,
            &mut self.ready_since,
        ) {
            Ok(snapshot) => snapshot,
            Err(incomplete) => {
                // Evaluating now could give wrong weights: keep the last plan, look again soon.
                tracing::debug!(weighted_service = %key, %incomplete, "snapshot incomplete");
                state.due = Some(instant + Duration::from_millis(200));
                return false;
            }
        };

        // Never waits for a compile: a policy being compiled is `Loading`, and
        // the catalog's `Loaded` event brings this WeightedService back.
        let policy = self.catalog.ready(ws.policy_name(), ws.policy_sha256());
        let input_hash = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            snapshot.input_hash().hash(&mut h);
            match &policy {
                Ok(policy) => policy.sha256().hash(&mut h),
                Err(error) => error.kind().hash(&mut h),
            }
            h.finish()
        };
        let changed_input = state.input_hash != Some(input_hash);
        let is_due = state.due.is_some_and(|d| d <= instant);
        let mut evaluated = false;
        if changed_input || is_due {
            state.input_hash = Some(input_hash);
            state.due = None;
            evaluated = true;
            let started = Instant::now();
            let outcome = policy.and_then(|p| p.evaluate(&snapshot).map(|e| (p, e)));
            let took = started.elapsed();
            match outcome {
                Ok((policy, evaluation)) => {
                    self.metrics.evaluated(policy.name(), "ok", took);
                    state.weights = Some(
                        snapshot
                            .endpoints
                            .iter()
                            .zip(&evaluation.weights)
                            .map(|(e, w)| (e.address, *w))
                            .collect(),
                    );
                    state.due = evaluation.requeue_after.map(|d| instant + d);
                    if state.error.take().is_some() {
                        tracing::info!(weighted_service = %key, policy = policy.name(), "policy works again");
                    }
                }
                Err(PolicyError::Loading { .. }) => {
                    // Not the policy's failure: the weights in the kernel stay
                    // until it is compiled, and its Loaded event comes.
                    tracing::debug!(weighted_service = %key, policy = ws.policy_name(), "policy being compiled");
                }
                Err(error) => {
                    self.metrics.evaluated(ws.policy_name(), error.kind(), took);
                    state.due = Some(instant + FAILED_RETRY);
                    let text = error.to_string();
                    if state.error.as_deref() != Some(text.as_str()) {
                        tracing::warn!(weighted_service = %key, %error, "policy failed: the last good weights stay");
                        self.events.send(Notice {
                            reference: state.reference.clone(),
                            type_: EventType::Warning,
                            reason: reason_for(&error).into(),
                            note: format!("on node {}: {text}; the last good weights stay", self.config.node_name),
                        });
                        state.error = Some(text);
                    }
                }
            }
        }
        let weights = state.weights.as_ref();
        let plan = ServicePlan::new(&service, &snapshot, ws.scheduler(), |_, endpoint| {
            weights.and_then(|w| w.get(&endpoint.address).copied())
        });
        if state.plan.as_deref() != Some(&plan) {
            state.plan_applied = false;
            state.plan = Some(Arc::new(plan));
            self.plans_changed += 1;
        }
        evaluated
    }
}

/// Return the allocator's free pages to the kernel (glibc keeps what was freed
/// in its arenas, so the buffers of the first full lists would stay resident).
fn release_free_memory() {
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

/// The virtual services to read by key, when that is cheaper than listing the
/// node's: a few, and none of them a NodePort (whose addresses are the node's,
/// as kube-proxy chose them: only a listing finds them).
fn targeted_keys(in_scope: &[(WsKey, Arc<ServicePlan>)], restoring: &HashSet<ServiceKey>) -> Option<BTreeSet<ServiceKey>> {
    let mut keys: BTreeSet<ServiceKey> = restoring.iter().copied().collect();
    for (_, plan) in in_scope {
        for port in &plan.ports {
            if port.node_port.is_some() {
                return None;
            }
            keys.extend(port.addresses.iter().map(|a| ServiceKey::new(port.protocol, SocketAddr::new(*a, port.port))));
            if keys.len() > TARGETED_READS {
                return None;
            }
        }
    }
    Some(keys)
}

/// These virtual services and their destinations, one by one; those the
/// kernel does not have are left out.
fn read_services(ipvs: &mut IpvsClient, keys: BTreeSet<ServiceKey>) -> Result<Vec<ServiceEntry>, IpvsError> {
    let mut entries = Vec::with_capacity(keys.len());
    for key in keys {
        let service = match ipvs.service(&key) {
            Ok(service) => service,
            Err(IpvsError::ServiceNotFound { .. }) => continue,
            Err(error) => return Err(error),
        };
        let destinations = ipvs.destinations(&key)?;
        entries.push(ServiceEntry { service, destinations });
    }
    Ok(entries)
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
    let (events, publisher) = crate::events::publisher(client, reporter);
    tokio::spawn(publisher);
    tracing::info!(node = %config.node_name, "waiting for the first full sync of the watch caches");
    stores.wait_until_ready().await.map_err(|_| AgentError::WatchesStopped)?;
    tracing::info!(
        weighted_services = stores.weighted_services.len(),
        services = stores.services.len(),
        endpoint_slices = stores.slices.len(),
        pods = stores.pods.len(),
        "watch caches synced"
    );
    let worker = Worker::new(config, stores, catalog, metrics, health, events);
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
        PolicyError::TooLarge { .. }
        | PolicyError::Compile { .. }
        | PolicyError::CompileTimeout { .. }
        | PolicyError::CompileMemory { .. }
        | PolicyError::Limits { .. }
        | PolicyError::Imports { .. }
        | PolicyError::Interface { .. }
        | PolicyError::Refused { .. } => "PolicyModuleRefused",
        PolicyError::Host { .. } | PolicyError::Loading { .. } => "PolicyUnavailable",
        _ => "PolicyFailed",
    }
}

/// What to write to put back what we changed: weight 1 on destinations we set
/// otherwise (unless kube-proxy is draining them at 0), and the scheduler each
/// virtual service had.
fn restore(changed: &Changed, entries: &[ServiceEntry]) -> Vec<DesiredService> {
    let mut out: HashMap<ServiceKey, DesiredService> = HashMap::new();
    for entry in entries {
        let key = entry.service.key;
        if let Some(original) = changed.schedulers.get(&key) {
            out.entry(key).or_insert_with(|| DesiredService::new(key)).scheduler = Some(original.clone());
        }
        for destination in &entry.destinations {
            let address = destination.socket_addr();
            if changed.weights.contains(&(key, address)) && destination.weight != 0 {
                out.entry(key).or_insert_with(|| DesiredService::new(key)).weights.insert(address, 1);
            }
        }
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipvs::{Destination, ForwardMethod, Service as VirtualService};

    #[test]
    fn restore_puts_back_weight_one_and_the_scheduler_but_not_drained_destinations() {
        let vip = ServiceKey::tcp("10.96.0.10:80".parse().unwrap());
        let a: SocketAddr = "10.244.1.5:8080".parse().unwrap();
        let b: SocketAddr = "10.244.1.6:8080".parse().unwrap();
        let c: SocketAddr = "10.244.1.7:8080".parse().unwrap();
        let changed = Changed {
            weights: [(vip, a), (vip, b)].into(),
            schedulers: [(vip, "rr".to_string())].into(),
        };
        let entries = vec![ServiceEntry {
            service: VirtualService::new(vip, "wrr"),
            destinations: vec![
                Destination::new(a, ForwardMethod::Masquerade, 10),
                Destination::new(b, ForwardMethod::Masquerade, 0), // kube-proxy is draining it
                Destination::new(c, ForwardMethod::Masquerade, 5), // never ours
            ],
        }];
        let desired = restore(&changed, &entries);
        assert_eq!(desired.len(), 1);
        assert_eq!(desired[0].scheduler.as_deref(), Some("rr"));
        assert_eq!(desired[0].weights, [(a, 1)].into());
    }

    #[test]
    fn dirty_tracks_keys_pods_and_everything() {
        let mut dirty = Dirty::default();
        assert!(dirty.is_empty());
        dirty.add(Change::Slices("shop".into(), "web".into()));
        let labels: BTreeMap<String, String> = [("app".to_string(), "blog".to_string())].into();
        dirty.add(Change::Pod("blog".into(), labels.clone()));
        dirty.add(Change::Pod("blog".into(), labels.clone()));
        let key = |ns: &str, n: &str| WsKey { namespace: ns.into(), name: n.into() };
        assert!(dirty.contains(&key("shop", "web")));
        // Pods are resolved to WeightedServices by the worker, with the cache.
        assert!(!dirty.contains(&key("blog", "anything")));
        assert_eq!(dirty.pods["blog"], HashSet::from([labels]), "the same labels are kept once");
        assert!(!dirty.contains(&key("shop", "api")));
        dirty.add(Change::All);
        assert!(dirty.contains(&key("shop", "api")));
    }
}
