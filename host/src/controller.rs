//! The controller: for each WeightedService, keeps the Service it owns (server-side
//! apply, a controller owner reference, so deleting the WeightedService
//! garbage-collects it), evaluates the policy once with a cluster-wide view, and
//! writes `status`. Two controllers running at once (during a rollout) do no
//! harm: the apply is idempotent and an unchanged status is not written.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hasher;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{predicates, watcher, Predicate, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::cluster::{
    is_controlled_by, reflect_pod_infos, watch_config, reflect_pods, reflect_slices, selects, strip, FullPodCache, PodInfoCache, SliceCache,
    OWNER_LABEL, SERVICE_NAME_LABEL,
};
use crate::crd::{PodInfo, PodInfoSlice, PolicyStatus, Proxy, WeightedService, WeightedServiceStatus, PROXY_NAME, SERVICE_PROXY_NAME_LABEL};
use crate::pod_info::Slices;
use crate::events::{EventSink, Notice};
use crate::metrics::{Health, Metrics};
use crate::leader::{ElectionConfig, LeaderElector};
use crate::policy::{Catalog, CatalogEvent, PolicyError};
use crate::snapshot::{ReadySince, Snapshot};
use crate::status::{self, PolicyOutcome, ServiceOutcome};

/// The field manager of the controller's server-side applies.
pub const FIELD_MANAGER: &str = "ipvs-operator";

/// Without changes, a WeightedService is looked at again this often.
const RESYNC: Duration = Duration::from_secs(300);

/// Why one reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// An API request failed.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The policy evaluation task could not run.
    #[error("evaluating the policy: {0}")]
    Task(String),
    /// A watch stopped before its first full list (the process is ending).
    #[error("the watch caches stopped before their first full list")]
    NotSynced,
}

/// What every reconcile shares.
pub struct Context {
    client: Client,
    catalog: Arc<Catalog>,
    /// The Controller's cache of WeightedServices.
    weighted_services: Store<WeightedService>,
    slices: SliceCache,
    /// Whole pods: their Ready condition's transition time is the ready-since
    /// policies see, here and (published in PodInfoSlices) on every node.
    pods: FullPodCache,
    /// The PodInfoSlices published, and what was last written of them.
    pod_infos: PodInfoCache,
    published: PublishedSlices,
    metrics: Arc<Metrics>,
    events: EventSink,
    ready_since: Mutex<ReadySince>,
    /// True once every watch cache has had its first full list: reconciles wait for it.
    synced: tokio::sync::watch::Receiver<bool>,
    applied: AppliedServices,
    written: Arc<WrittenStatuses>,
    failures: Failures,
}

/// What the controller last applied to each WeightedService's Service. When
/// neither that nor the Service has changed since, applying again would change
/// nothing, and the request is saved: a reconcile whose WeightedService and
/// Service are as before only reads the Service. (The Services are not cached:
/// at 5,000 that took 20 MiB more than a request per reconcile is worth.)
#[derive(Debug, Default)]
struct AppliedServices(Mutex<HashMap<ObjectRef<WeightedService>, Applied>>);

/// One WeightedService's last apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Applied {
    /// A hash of the Service applied.
    desired: u64,
    /// A hash of the Service the API server answered with ([`strip`]ped): a
    /// read shows the same until someone changes it.
    result: u64,
}

impl AppliedServices {
    /// Whether `desired` is what was last applied for `key`, and `current` (the
    /// Service as it is now, [`strip`]ped) is what the API server answered then.
    fn unchanged(&self, key: &ObjectRef<WeightedService>, desired: &Service, current: &Service) -> bool {
        lock(&self.0).get(key) == Some(&Applied { desired: json_hash(desired), result: json_hash(current) })
    }

    /// `desired` was applied for `key`, and the API server answered `result` ([`strip`]ped).
    fn record(&self, key: &ObjectRef<WeightedService>, desired: &Service, result: &Service) {
        lock(&self.0).insert(key.clone(), Applied { desired: json_hash(desired), result: json_hash(result) });
    }

    /// Forget the WeightedServices for which `keep` is false.
    fn retain(&self, keep: impl Fn(&ObjectRef<WeightedService>) -> bool) {
        lock(&self.0).retain(|key, _| keep(key));
    }
}

/// The last status written to each WeightedService, until the cache has it.
/// The cache sees a write only when its watch event arrives; a reconcile that
/// runs before (another trigger came meanwhile) would compare with the status
/// before the write, and write the same again. A record lives from the write
/// to that event.
#[derive(Debug, Default)]
struct WrittenStatuses(Mutex<HashMap<ObjectRef<WeightedService>, Written>>);

/// A status written, and the version of the WeightedService it replaced.
#[derive(Debug, Clone)]
struct Written {
    /// The resourceVersion of the WeightedService the status was computed from.
    replaced: String,
    /// The status written.
    status: WeightedServiceStatus,
}

impl WrittenStatuses {
    /// `ws` (the cache's latest copy), with the status last written to it if
    /// the cache does not show that write yet. (A record goes when the watch
    /// brings a newer version, after the cache has it: without a record, the
    /// cache's copy is new enough.)
    fn latest(&self, ws: Arc<WeightedService>) -> Arc<WeightedService> {
        let key = ObjectRef::from_obj(ws.as_ref());
        let mut written = lock(&self.0);
        let Some(last) = written.get(&key) else { return ws };
        if ws.metadata.resource_version.as_ref() == Some(&last.replaced) {
            let mut newer = (*ws).clone();
            newer.status = Some(last.status.clone());
            return Arc::new(newer);
        }
        // The cache has the write (or something newer): it is the truth again.
        written.remove(&key);
        ws
    }

    /// The watch brought `ws`: a record of a write over an older version is done with.
    fn seen(&self, ws: &WeightedService) {
        let key = ObjectRef::from_obj(ws);
        let mut written = lock(&self.0);
        if written.get(&key).is_some_and(|last| ws.metadata.resource_version.as_ref() != Some(&last.replaced)) {
            written.remove(&key);
        }
    }

    /// `status` was written over `ws` (the version it was computed from).
    fn record(&self, ws: &WeightedService, status: WeightedServiceStatus) {
        // Without a resourceVersion (never from the API server) nothing tells the versions apart.
        if let Some(replaced) = ws.metadata.resource_version.clone() {
            lock(&self.0).insert(ObjectRef::from_obj(ws), Written { replaced, status });
        }
    }

    /// Forget the WeightedServices for which `keep` is false.
    fn retain(&self, keep: impl Fn(&ObjectRef<WeightedService>) -> bool) {
        lock(&self.0).retain(|key, _| keep(key));
    }
}

/// The PodInfoSlices last written for each WeightedService, until the cache
/// shows them: a reconcile that runs before the watch brings a write would
/// plan from the slices before it (and write again, or place a pod twice).
#[derive(Debug, Default)]
struct PublishedSlices(Mutex<HashMap<ObjectRef<WeightedService>, Slices>>);

impl PublishedSlices {
    /// The slices of `key` as they are: what was written last, until `cached`
    /// (the cache's, sorted as written) shows the same (then the cache is the
    /// truth again, and changes others make are seen and repaired).
    fn current(&self, key: &ObjectRef<WeightedService>, cached: Slices) -> Slices {
        let mut published = lock(&self.0);
        let Some(written) = published.get(key) else { return cached };
        if *written == cached {
            published.remove(key);
            return cached;
        }
        written.clone()
    }

    /// `slices` (sorted by name) are what `key` has after a write.
    fn record(&self, key: &ObjectRef<WeightedService>, slices: Slices) {
        lock(&self.0).insert(key.clone(), slices);
    }

    /// Forget the WeightedServices for which `keep` is false.
    fn retain(&self, keep: impl Fn(&ObjectRef<WeightedService>) -> bool) {
        lock(&self.0).retain(|key, _| keep(key));
    }
}

/// Triggers of one WeightedService within this long make one reconcile: a
/// rollout's pod events come in bursts. Short, because agents wait for the
/// PodInfoSlices a reconcile publishes.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Reconciles at once. Unbounded (kube-runtime's default), 5,000
/// WeightedServices made 5,000 connections to the API server at start and
/// failed to connect; each also needs one of the policy engine's 64 instance slots.
const CONCURRENCY: u16 = 16;

/// How often the controller forgets endpoints no EndpointSlice has, and what
/// it remembers of WeightedServices that are gone.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Run the controller until the process gets SIGTERM or SIGINT: follow
/// until this process holds the Lease of `election`, then reconcile while it
/// holds it. Losing the Lease stops every reconcile and write of this
/// process at once; it then follows again. On a signal the leader lets its
/// reconciles end and gives the Lease up, for a follower to take over at once.
pub async fn run(client: Client, catalog: Arc<Catalog>, metrics: Arc<Metrics>, health: Arc<Health>, election: ElectionConfig) {
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        stop_tx.send_replace(true);
    });
    // The catalog tells its listeners for the whole process; each term of
    // leadership listens from its start.
    let (catalog_events, _) = tokio::sync::broadcast::channel::<CatalogEvent>(64);
    let forward = catalog_events.clone();
    catalog.subscribe(move |event| {
        let _ = forward.send(event.clone());
    });
    let heartbeat = health.clone();
    tokio::spawn(async move {
        loop {
            heartbeat.beat();
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
    // A follower does what it should: stand by, ready to take over.
    health.set_ready();
    let mut elector = LeaderElector::new(client.clone(), election);
    loop {
        let mut stopping = stop.clone();
        tokio::select! {
            () = elector.acquire() => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        metrics.leader.set(1);
        let term = lead(client.clone(), catalog.clone(), metrics.clone(), health.clone(), catalog_events.subscribe(), stop.clone());
        let lost = tokio::select! {
            () = term => None,
            lost = elector.renew_until_lost() => Some(lost),
        };
        metrics.leader.set(0);
        match lost {
            None => {
                elector.release().await;
                return;
            }
            Some(why) => tracing::error!(%why, identity = elector.identity(), "lost the lease: stopped reconciling and writing; following"),
        }
    }
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM: only SIGINT stops the controller");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Tasks of one term of leadership: aborted when it ends, so that nothing
/// of it writes after the Lease is lost.
#[derive(Default)]
struct TermTasks(Vec<tokio::task::JoinHandle<()>>);

impl TermTasks {
    fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.0.push(tokio::spawn(task));
    }
}

impl Drop for TermTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// One term of leadership: reconcile every WeightedService until `stop`
/// turns true (then in-flight reconciles end) or the caller drops it.
async fn lead(
    client: Client,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    mut catalog_events: tokio::sync::broadcast::Receiver<CatalogEvent>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tasks = TermTasks::default();
    let (slices, slice_changes) = reflect_slices(
        watcher(Api::<EndpointSlice>::all(client.clone()), watch_config().labels(SERVICE_NAME_LABEL)),
        metrics.clone(),
    );
    let (pods, pod_changes) = reflect_pods(watcher(Api::<Pod>::all(client.clone()), watch_config()), metrics.clone());
    // The controller's own PodInfoSlices. Their changes trigger nothing (most
    // are its own writes); one deleted or edited by someone else is repaired
    // at the WeightedService's next reconcile (at most RESYNC away).
    let (pod_infos, pod_info_changes) = reflect_pod_infos(
        watcher(Api::<PodInfoSlice>::all(client.clone()), watch_config().labels(OWNER_LABEL)),
        metrics.clone(),
    );
    tasks.spawn(pod_info_changes.for_each(|_| async {}));
    let reporter = Reporter { controller: "ipvs-operator".into(), instance: std::env::var("POD_NAME").ok() };
    let (events, publisher) = crate::events::publisher(client.clone(), reporter);
    tasks.spawn(publisher);

    // WeightedServices trigger a reconcile when what it reads of them changes:
    // the spec (generation), labels and annotations (policy input), not the
    // status the reconcile itself writes (that would reconcile every
    // WeightedService once more after each status write).
    let (weighted_services, ws_writer) = reflector::store();
    let written = Arc::new(WrittenStatuses::default());
    let written_seen = written.clone();
    let selectors = Arc::new(SelectorIndex::new(weighted_services.clone()));
    let ws_changed = selectors.clone();
    let ws_triggers = watcher(Api::<WeightedService>::all(client.clone()), watch_config())
        .default_backoff()
        .reflect(ws_writer)
        .inspect(move |_| ws_changed.stale())
        .applied_objects()
        .inspect_ok(move |ws| written_seen.seen(ws))
        .predicate_filter(
            predicates::generation.combine(predicates::labels).combine(predicates::annotations),
            Default::default(),
        );
    let controller = Controller::for_stream(ws_triggers, weighted_services.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(CONCURRENCY).debounce(DEBOUNCE));
    let (synced_tx, synced_rx) = tokio::sync::watch::channel(false);
    let ctx = Arc::new(Context {
        client: client.clone(),
        catalog,
        weighted_services: weighted_services.clone(),
        slices: slices.clone(),
        pods: pods.clone(),
        pod_infos: pod_infos.clone(),
        published: PublishedSlices::default(),
        metrics,
        events,
        ready_since: Mutex::new(ReadySince::default()),
        synced: synced_rx,
        applied: AppliedServices::default(),
        written,
        failures: Failures::default(),
    });

    // Ready once every cache has its first list; reconciles wait for it (a
    // snapshot from half a list would be missing endpoints). kube-runtime's
    // `Store::wait_until_ready` wakes only one of several tasks waiting on the
    // same store, so a waiter that missed its wake-up asks again: an
    // already-ready store answers at once.
    let (ws_ready, slices_ready, pods_ready, infos_ready) =
        (weighted_services.clone(), slices.clone(), pods.clone(), pod_infos.clone());
    let ready_health = health.clone();
    tasks.spawn(async move {
        if synced(&ws_ready).await
            && slices_ready.wait_until_ready().await.is_ok()
            && pods_ready.wait_until_ready().await.is_ok()
            && infos_ready.wait_until_ready().await.is_ok()
        {
            ready_health.set_ready();
            tracing::info!("watch caches synced: ready");
            synced_tx.send_replace(true);
        }
    });
    let prune_ctx = ctx.clone();
    tasks.spawn(async move {
        let mut every = tokio::time::interval_at(tokio::time::Instant::now() + PRUNE_EVERY, PRUNE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            prune_ctx.prune();
        }
    });

    // Policy modules: a compile, refusal or removal reconciles everything (the
    // status names the module's hash, or why there is none); a refused module
    // is reported on each WeightedService using it. (A retry after host
    // trouble changes nothing yet.)
    let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let relist_tx = reload_tx.clone();
    let ws_for_policies = weighted_services.clone();
    let policy_events = ctx.events.clone();
    let catalog = Arc::downgrade(&ctx.catalog);
    tasks.spawn(async move {
        loop {
            let event = match catalog_events.recv().await {
                Ok(event) => event,
                // Missed some: whatever they were, everything is looked at again.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    let _ = reload_tx.send(());
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            if let CatalogEvent::Failed { name, error } = &event {
                let in_use = catalog.upgrade().is_some_and(|c| c.ready(name, None).is_ok());
                let outcome = if in_use {
                    "the module in use stays"
                } else {
                    "no module of that name is in use: WeightedServices naming it keep the weights nodes have"
                };
                // Once, not once per WeightedService using it (1,000 of them
                // made 1,000 Events): on the first by namespace and name; the
                // status of each says it too (PolicyReady).
                let mut users: Vec<_> = ws_for_policies.state().into_iter().filter(|ws| ws.policy_key() == *name).collect();
                users.sort_by_key(|ws| (ws.namespace(), ws.name_any()));
                if let Some(reference) = users.first().map(|ws| ws.object_ref(&())) {
                    policy_events.send(Notice {
                        reference,
                        type_: EventType::Warning,
                        reason: "PolicyModuleRefused".into(),
                        note: format!("policy {name}: {error}; {outcome} ({} WeightedServices use it)", users.len()),
                    });
                }
            }
            if !matches!(event, CatalogEvent::Retrying { .. }) {
                let _ = reload_tx.send(());
            }
        }
    });
    let reloads = futures::stream::unfold(reload_rx, |mut rx| async move { rx.recv().await.map(|()| ((), rx)) });

    let slice_triggers = slice_changes.filter_map(triggers(relist_tx.clone()));
    let pod_triggers = pod_changes.filter_map(triggers(relist_tx));
    controller
        .owns(Api::<Service>::all(client), watch_config().labels(OWNER_LABEL))
        .watches_stream(slice_triggers, |slice: EndpointSlice| {
            let namespace = slice.namespace().unwrap_or_default();
            slice
                .labels()
                .get(SERVICE_NAME_LABEL)
                .map(|service| ObjectRef::<WeightedService>::new(service).within(&namespace))
        })
        .watches_stream(pod_triggers, move |pod: Pod| {
            // Pod labels decide groups: every WeightedService in the namespace whose selector matches.
            selectors.matching(&pod.namespace().unwrap_or_default(), pod.labels())
        })
        .reconcile_all_on(reloads)
        .graceful_shutdown_on(async move {
            let mut stop = stop;
            let _ = stop.wait_for(|s| *s).await;
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok(_) => {}
                // Reconcile errors are logged by `error_policy`; these are the controller's own.
                Err(error) => tracing::debug!(%error, "controller event"),
            }
        })
        .await;
}

/// WeightedServices by namespace, with their selectors: which ones a pod's
/// event concerns, without going through every WeightedService of the cluster.
/// Rebuilt from the store at the first lookup after a WeightedService changed.
struct SelectorIndex {
    store: Store<WeightedService>,
    /// Bumped at every WeightedService watch event.
    changes: std::sync::atomic::AtomicU64,
    /// The index, and the `changes` it was built at.
    built: Mutex<(u64, Selectors)>,
}

/// By namespace: each WeightedService with its selector.
type Selectors = HashMap<String, Vec<(ObjectRef<WeightedService>, std::collections::BTreeMap<String, String>)>>;

impl SelectorIndex {
    fn new(store: Store<WeightedService>) -> Self {
        SelectorIndex { store, changes: std::sync::atomic::AtomicU64::new(1), built: Mutex::new((0, HashMap::new())) }
    }

    /// A WeightedService changed: rebuild before the next lookup.
    fn stale(&self) {
        self.changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The WeightedServices of `namespace` whose (non-empty) selector matches `labels`.
    fn matching(&self, namespace: &str, labels: &std::collections::BTreeMap<String, String>) -> Vec<ObjectRef<WeightedService>> {
        let changes = self.changes.load(std::sync::atomic::Ordering::Relaxed);
        let mut built = lock(&self.built);
        if built.0 != changes {
            let mut by_namespace: HashMap<String, Vec<_>> = HashMap::new();
            for ws in self.store.state() {
                if let Some(selector) = ws.spec.service.selector.as_ref().filter(|s| !s.is_empty()) {
                    let entry = (ObjectRef::from_obj(ws.as_ref()), selector.clone());
                    by_namespace.entry(ws.namespace().unwrap_or_default()).or_default().push(entry);
                }
            }
            *built = (changes, by_namespace);
        }
        built
            .1
            .get(namespace)
            .into_iter()
            .flatten()
            .filter(|(_, selector)| selects(Some(selector), labels))
            .map(|(key, _)| key.clone())
            .collect()
    }
}

/// Watch changes as reconcile triggers. A relist (after a watch broke or
/// expired) brings no per-object events, and a change made while the watch was
/// down would reach no reconcile (nor the PodInfoSlices agents read): each
/// relist but the first (every WeightedService is reconciled then) sends on
/// `relists`, which reconciles everything.
fn triggers<K: Send + 'static>(
    relists: tokio::sync::mpsc::UnboundedSender<()>,
) -> impl FnMut(Option<K>) -> std::future::Ready<Option<Result<K, watcher::Error>>> {
    let mut lists = 0u64;
    move |change| {
        if change.is_none() {
            lists += 1;
            if lists > 1 {
                let _ = relists.send(());
            }
        }
        std::future::ready(change.map(Ok))
    }
}

/// Reconcile one WeightedService.
pub async fn reconcile(ws: Arc<WeightedService>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    let key = ObjectRef::from_obj(ws.as_ref());
    let result = reconcile_once(ws, ctx.clone()).await;
    if result.is_ok() {
        ctx.failures.succeeded(&key);
    }
    result
}

/// One reconcile of `ws`; [`reconcile`] keeps count of failures.
async fn reconcile_once(ws: Arc<WeightedService>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    // Reconciles queue up from the WeightedService list while the other
    // caches fill: a snapshot from half a list would be wrong (and written).
    ctx.synced.clone().wait_for(|synced| *synced).await.map_err(|_| ControllerError::NotSynced)?;
    let started = Instant::now();
    if ws.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // The cache's copy now may be newer than the one this reconcile was
    // started with (a status written meanwhile).
    let ws = ctx.written.latest(ctx.weighted_services.get(&ObjectRef::from_obj(ws.as_ref())).unwrap_or(ws));
    let namespace = ws.namespace().unwrap_or_else(|| "default".into());
    let name = ws.name_any();

    let (service_outcome, service) = apply_service(&ctx, &ws).await?;
    publish_pod_infos(&ctx, &ws).await?;
    let now = Timestamp::now();
    let mut action = Action::requeue(RESYNC);

    let (snapshot, pending) = match &service {
        None => (None, "waiting for the Service".to_string()),
        Some(service) => match build_snapshot(&ctx, &ws, service, now) {
            Ok(snapshot) => (Some(snapshot), String::new()),
            Err(incomplete) => {
                action = Action::requeue(Duration::from_secs(1));
                (None, format!("waiting: {incomplete}"))
            }
        },
    };

    // Policy evaluation is synchronous (wasmtime, bounded by its deadline).
    let evaluated = match &snapshot {
        Some(snapshot) => {
            let catalog = ctx.catalog.clone();
            let (policy_name, pin) = (ws.policy_key(), ws.policy_sha256().map(str::to_string));
            let input = snapshot.clone();
            let started = Instant::now();
            let outcome =
                tokio::task::spawn_blocking(move || -> Result<_, crate::policy::PolicyError> {
                    // Never waits for a compile: the catalog's Loaded event reconciles again.
                    let policy = catalog.ready(&policy_name, pin.as_deref())?;
                    let evaluation = policy.evaluate(&input)?;
                    let (name, version) = crate::policy::split_key(policy.name());
                    Ok((
                        PolicyStatus {
                            name: name.into(),
                            version: version.map(Into::into),
                            sha256: policy.sha256().into(),
                        },
                        evaluation,
                    ))
                })
                .await
                .map_err(|e| ControllerError::Task(e.to_string()))?;
            ctx.metrics.attempted(&ws.policy_key(), outcome.as_ref().map(drop), started.elapsed());
            Some(outcome)
        }
        // Nothing to evaluate yet (no Service, or its endpoints incomplete):
        // the config is checked all the same, so that a bad one is reported
        // when it is written, not when the Service comes.
        None => {
            let catalog = ctx.catalog.clone();
            let (key, pin, config) = (ws.policy_key(), ws.policy_sha256().map(str::to_string), ws.policy_config());
            let refusal = tokio::task::spawn_blocking(move || {
                catalog.ready(&key, pin.as_deref()).ok().and_then(|policy| policy.validate_config(&config).err())
            })
            .await
            .map_err(|e| ControllerError::Task(e.to_string()))?;
            refusal.filter(|e| matches!(e, PolicyError::ConfigInvalid { .. })).map(Err)
        }
    };

    let policy_outcome = match (&evaluated, &snapshot) {
        (Some(Ok((policy, evaluation))), Some(snapshot)) => {
            if let Some(after) = evaluation.requeue_after {
                action = Action::requeue(after.min(RESYNC));
            }
            PolicyOutcome::Evaluated { policy: policy.clone(), snapshot, evaluation }
        }
        (Some(Err(PolicyError::Loading { policy })), _) => {
            PolicyOutcome::Pending(format!("compiling policy {policy:?}"))
        }
        (Some(Err(error)), _) => PolicyOutcome::Failed(error),
        _ => PolicyOutcome::Pending(pending),
    };

    let new_status = status::compute(&ws, &service_outcome, &policy_outcome, now);
    let old_status = ws.status.clone().unwrap_or_default();
    if !status::same(&old_status, &new_status) {
        publish_transitions(&ctx, &ws, &old_status, &new_status);
        let patch = json!({
            "status": {
                "observedGeneration": new_status.observed_generation,
                "serviceName": new_status.service_name,
                "policy": new_status.policy,
                "conditions": new_status.conditions,
                "groups": new_status.groups,
                "message": new_status.message,
            }
        });
        Api::<WeightedService>::namespaced(ctx.client.clone(), &namespace)
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| ControllerError::Api { action: format!("writing the status of WeightedService {namespace}/{name}"), source })?;
        ctx.written.record(&ws, new_status);
    }
    ctx.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
    Ok(action)
}

impl Context {
    /// Forget the ready-since times of endpoints no EndpointSlice has (under
    /// churn the map would grow for ever), and what is remembered of
    /// WeightedServices that are gone. Runs every [`PRUNE_EVERY`]: it looks at
    /// every slice.
    fn prune(&self) {
        {
            // The slices are read under the `ready_since` lock, so an address a
            // reconcile records meanwhile is in them (it took its slices before).
            let mut ready_since = lock(&self.ready_since);
            self.slices.with_all(|slices| ready_since.forget_absent(slices));
        }
        self.applied.retain(|key| self.weighted_services.get(key).is_some());
        self.written.retain(|key| self.weighted_services.get(key).is_some());
        self.failures.retain(|key| self.weighted_services.get(key).is_some());
        self.published.retain(|key| self.weighted_services.get(key).is_some());
    }
}

/// `mutex`, locked. A lock poisoned by a panic elsewhere is used as is: these
/// maps hold independent entries, none left half written.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A hash of `value`'s JSON form (k8s-openapi types have no `Hash`; their
/// JSON is deterministic: fields in declaration order, maps sorted).
fn json_hash(value: &impl serde::Serialize) -> u64 {
    /// Feeds what is written to a hasher.
    struct HashWriter<'a>(&'a mut std::collections::hash_map::DefaultHasher);
    impl std::io::Write for HashWriter<'_> {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.write(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    // Serialising k8s-openapi types (string-keyed maps only) cannot fail; were it
    // to, the hash would differ from the last one and the Service would be applied.
    let _ = serde_json::to_writer(HashWriter(&mut hasher), value);
    hasher.finish()
}

/// The cluster-wide snapshot of `ws` from the watch caches.
fn build_snapshot(ctx: &Context, ws: &WeightedService, service: &Service, now: Timestamp) -> Result<Snapshot, crate::snapshot::Incomplete> {
    let namespace = ws.namespace().unwrap_or_default();
    let slices = ctx.slices.slices_of(&namespace, &ws.name_any());
    let mut ready_since = lock(&ctx.ready_since);
    Snapshot::from_cluster(
        ws,
        service,
        slices.iter().map(|s| s.as_ref()),
        |ns, pod| ctx.pods.get(ns, pod),
        None,
        now,
        &mut ready_since,
    )
}

/// What agents need of the pods behind `ws`: those its selector matches, and
/// any other pod its EndpointSlices name (a Service without a selector).
fn pod_infos_of(ctx: &Context, ws: &WeightedService) -> Vec<PodInfo> {
    let namespace = ws.namespace().unwrap_or_default();
    let mut infos: std::collections::BTreeMap<String, PodInfo> = std::collections::BTreeMap::new();
    if let Some(selector) = ws.spec.service.selector.as_ref().filter(|s| !s.is_empty()) {
        for (name, meta) in ctx.pods.matching(&namespace, |labels| selects(Some(selector), labels)) {
            infos.insert(name.clone(), crate::pod_info::pod_info(&name, &meta));
        }
    }
    for slice in ctx.slices.slices_of(&namespace, &ws.name_any()) {
        for target in slice.endpoints.iter().flatten().filter_map(|e| e.target_ref.as_ref()) {
            let Some(name) = target.name.as_deref().filter(|_| target.kind.as_deref() == Some("Pod")) else { continue };
            if infos.contains_key(name) || target.namespace.as_deref().is_some_and(|n| n != namespace) {
                continue;
            }
            if let Some(meta) = ctx.pods.get(&namespace, name) {
                infos.insert(name.to_string(), crate::pod_info::pod_info(name, &meta));
            }
        }
    }
    infos.into_values().collect()
}

/// Write the PodInfoSlices of `ws` whose content changed, and delete those
/// left without pods.
async fn publish_pod_infos(ctx: &Context, ws: &WeightedService) -> Result<(), ControllerError> {
    let key = ObjectRef::from_obj(ws);
    let (namespace, name) = (ws.namespace().unwrap_or_default(), ws.name_any());
    let existing = ctx.published.current(&key, ctx.pod_infos.slices_of(&namespace, &name));
    let plan = crate::pod_info::plan_slices(&name, &existing, pod_infos_of(ctx, ws));
    if plan.is_empty() {
        return Ok(());
    }
    let api = Api::<PodInfoSlice>::namespaced(ctx.client.clone(), &namespace);
    let mut after: std::collections::BTreeMap<String, Vec<PodInfo>> = existing.into_iter().collect();
    for (slice, pods) in plan.writes {
        let object = crate::pod_info::slice_object(ws, &slice, pods.clone());
        api.patch(&slice, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&object)).await.map_err(|source| {
            ControllerError::Api { action: format!("writing PodInfoSlice {namespace}/{slice} of WeightedService {name}"), source }
        })?;
        after.insert(slice, pods);
    }
    for slice in plan.deletes {
        match api.delete(&slice, &Default::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(source) => {
                return Err(ControllerError::Api {
                    action: format!("deleting PodInfoSlice {namespace}/{slice} of WeightedService {name}"),
                    source,
                });
            }
        }
        after.remove(&slice);
    }
    ctx.published.record(&key, after.into_iter().collect());
    Ok(())
}

/// Apply the owned Service unless a Service of that name belongs to someone
/// else. The apply is left out when the Service is what this controller's last
/// apply left and the WeightedService wants the same.
async fn apply_service(ctx: &Context, ws: &WeightedService) -> Result<(ServiceOutcome, Option<Service>), ControllerError> {
    let key = ObjectRef::from_obj(ws);
    let name = ws.name_any();
    let namespace = ws.namespace().unwrap_or_else(|| "default".into());
    let services = Api::<Service>::namespaced(ctx.client.clone(), &namespace);
    let existing = services
        .get_opt(&name)
        .await
        .map_err(|source| ControllerError::Api { action: format!("reading Service {name}"), source })?;
    if let Some(existing) = &existing
        && !is_controlled_by(existing, ws)
    {
        return Ok((ServiceOutcome::Conflict { name }, None));
    }
    let Some(owner) = ws.controller_owner_ref(&()) else {
        return Ok((ServiceOutcome::Failed { name, message: "the WeightedService has no uid yet".into() }, None));
    };
    let mut labels: BTreeMap<String, String> = [
        (OWNER_LABEL.to_string(), name.clone()),
        ("app.kubernetes.io/managed-by".to_string(), "ipvs-operator".to_string()),
    ]
    .into();
    // kube-proxy skips a Service that names another proxy; applying without
    // the label (switching back) removes it, since this field manager owned it.
    if ws.proxy() == Proxy::IpvsOperator {
        labels.insert(SERVICE_PROXY_NAME_LABEL.to_string(), PROXY_NAME.to_string());
    }
    let desired = Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: ws.namespace(),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        // Fields the spec leaves out (clusterIP among them) are not claimed, so the
        // API server's assignment is never fought over.
        spec: Some(ws.spec.service.clone()),
        status: None,
    };
    if let Some(mut existing) = existing {
        strip(&mut existing);
        if ctx.applied.unchanged(&key, &desired, &existing) {
            return Ok((ServiceOutcome::Applied { cluster_ip: cluster_ip(&existing), name }, Some(existing)));
        }
    }
    match services.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&desired)).await {
        Ok(mut service) => {
            strip(&mut service);
            ctx.applied.record(&key, &desired, &service);
            Ok((ServiceOutcome::Applied { cluster_ip: cluster_ip(&service), name }, Some(service)))
        }
        // The API server refused the spec (validation): that is the user's to fix, not a retry.
        Err(kube::Error::Api(status)) if status.code == 422 || status.code == 400 => {
            Ok((ServiceOutcome::Failed { name, message: status.message }, None))
        }
        Err(source) => Err(ControllerError::Api { action: format!("applying Service {name}"), source }),
    }
}

/// The ClusterIP of `service`, unless headless.
fn cluster_ip(service: &Service) -> Option<String> {
    service.spec.as_ref().and_then(|s| s.cluster_ip.clone()).filter(|ip| ip != "None")
}

/// Events for conditions that turned bad (or good again).
fn publish_transitions(ctx: &Context, ws: &WeightedService, old: &crate::crd::WeightedServiceStatus, new: &crate::crd::WeightedServiceStatus) {
    for condition in &new.conditions {
        let before = old.conditions.iter().find(|c| c.type_ == condition.type_);
        if before.is_some_and(|b| b.status == condition.status && b.reason == condition.reason && b.message == condition.message) {
            continue;
        }
        // Pending (a new WeightedService whose Service or endpoints are not
        // there yet) is transient and expected: not worth an Event.
        if condition.reason == status::PENDING {
            continue;
        }
        let warning = match condition.type_.as_str() {
            status::READY => continue,
            status::SERVICE_READY | status::POLICY_READY => condition.status != "True",
            _ => condition.status == "True",
        };
        // A warning condition that was never raised: nothing to say. (The first
        // Applied and Evaluated are said: `kubectl describe` shows what happened.)
        if !warning && before.is_none() && !matches!(condition.type_.as_str(), status::SERVICE_READY | status::POLICY_READY) {
            continue;
        }
        ctx.events.send(Notice {
            reference: ws.object_ref(&()),
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: condition.reason.clone(),
            note: condition.message.clone(),
        });
    }
}

/// Whether `store` had its first full list (false: its writer is gone).
async fn synced<K>(store: &Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(result) = tokio::time::timeout(Duration::from_millis(200), store.wait_until_ready()).await {
            return result.is_ok();
        }
    }
}

/// A failed reconcile is logged and retried.
pub fn error_policy(ws: Arc<WeightedService>, error: &ControllerError, ctx: Arc<Context>) -> Action {
    let retry = ctx.failures.failed(&ObjectRef::from_obj(ws.as_ref()));
    tracing::warn!(
        weighted_service = %format!("{}/{}", ws.namespace().unwrap_or_default(), ws.name_any()),
        %error,
        retry_in_s = retry.as_secs_f64(),
        "reconcile failed; retrying"
    );
    Action::requeue(retry)
}

/// The first retry of a failed reconcile comes after this long…
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// …each next one after twice as long, up to this.
const RETRY_MAX: Duration = Duration::from_secs(300);

/// Failures in a row per WeightedService, for exponential backoff: a
/// WeightedService that keeps failing (a forbidden Service name, an API
/// server that refuses) costs the API server less and less.
#[derive(Debug, Default)]
struct Failures(Mutex<HashMap<ObjectRef<WeightedService>, u32>>);

impl Failures {
    /// Count a failure of `key`; how long until it is tried again.
    fn failed(&self, key: &ObjectRef<WeightedService>) -> Duration {
        let mut failures = lock(&self.0);
        let count = failures.entry(key.clone()).or_insert(0);
        *count = count.saturating_add(1);
        RETRY_FIRST.saturating_mul(2u32.saturating_pow(*count - 1)).min(RETRY_MAX)
    }

    /// `key` reconciled: its next failure is a first one again.
    fn succeeded(&self, key: &ObjectRef<WeightedService>) {
        lock(&self.0).remove(key);
    }

    /// Forget the WeightedServices for which `keep` is false.
    fn retain(&self, keep: impl Fn(&ObjectRef<WeightedService>) -> bool) {
        lock(&self.0).retain(|key, _| keep(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;

    #[test]
    fn failed_reconciles_back_off_exponentially_until_one_succeeds() {
        let failures = Failures::default();
        let web = ObjectRef::<WeightedService>::new("web").within("shop");
        let api = ObjectRef::<WeightedService>::new("api").within("shop");
        let delays: Vec<u64> = (0..12).map(|_| failures.failed(&web).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(failures.failed(&api), RETRY_FIRST, "each WeightedService counts its own");
        failures.succeeded(&web);
        assert_eq!(failures.failed(&web), RETRY_FIRST, "a success starts again");
    }

    fn ws(resource_version: &str) -> Arc<WeightedService> {
        let mut ws: WeightedService = serde_json::from_value(json!({
            "apiVersion": "codesink.net/v1alpha1", "kind": "WeightedService",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u-1", "generation": 1},
            "spec": {"selector": {"app": "web"}, "weights": []},
        }))
        .expect("a WeightedService");
        ws.metadata.resource_version = Some(resource_version.into());
        Arc::new(ws)
    }

    fn status(message: &str) -> WeightedServiceStatus {
        WeightedServiceStatus { observed_generation: Some(1), message: Some(message.into()), ..Default::default() }
    }

    fn service(cluster_ip: &str) -> Service {
        Service {
            metadata: ObjectMeta { name: Some("web".into()), namespace: Some("shop".into()), ..Default::default() },
            spec: Some(ServiceSpec { cluster_ip: Some(cluster_ip.into()), ..Default::default() }),
            status: None,
        }
    }

    #[test]
    fn a_written_status_stands_in_until_the_cache_has_the_write() {
        let written = WrittenStatuses::default();
        // Nothing written: the cache's copy as it is.
        let cached = ws("10");
        assert!(Arc::ptr_eq(&written.latest(cached.clone()), &cached));

        written.record(&cached, status("evaluated"));
        // The cache still has version 10, the one the write replaced.
        let latest = written.latest(ws("10"));
        assert_eq!(latest.status.as_ref().and_then(|s| s.message.as_deref()), Some("evaluated"));

        // The cache has moved on (the write, or a newer change): it is the truth,
        // and the record is gone for good.
        let mut newer = (*ws("11")).clone();
        newer.status = Some(status("someone else's"));
        let newer = Arc::new(newer);
        assert!(Arc::ptr_eq(&written.latest(newer.clone()), &newer));
        assert_eq!(written.latest(ws("10")).status, None);
    }

    #[test]
    fn written_statuses_of_deleted_weighted_services_are_forgotten() {
        let written = WrittenStatuses::default();
        written.record(&ws("10"), status("evaluated"));
        written.retain(|_| false);
        assert_eq!(written.latest(ws("10")).status, None);
    }

    #[test]
    fn an_apply_is_skipped_only_when_neither_side_changed() {
        let applied = AppliedServices::default();
        let key = ObjectRef::from_obj(ws("10").as_ref());
        let (desired, answered) = (service(""), service("10.96.0.10"));
        assert!(!applied.unchanged(&key, &desired, &answered), "never applied");

        applied.record(&key, &desired, &answered);
        assert!(applied.unchanged(&key, &desired, &answered));
        // The WeightedService wants something else.
        assert!(!applied.unchanged(&key, &service("None"), &answered));
        // Someone changed the Service since.
        assert!(!applied.unchanged(&key, &desired, &service("10.96.0.11")));
        // Another WeightedService.
        let other = ObjectRef::new("db").within("shop");
        assert!(!applied.unchanged(&other, &desired, &answered));

        applied.retain(|_| false);
        assert!(!applied.unchanged(&key, &desired, &answered), "forgotten");
    }

    #[test]
    fn json_hashes_tell_values_apart() {
        assert_eq!(json_hash(&service("10.96.0.10")), json_hash(&service("10.96.0.10")));
        assert_ne!(json_hash(&service("10.96.0.10")), json_hash(&service("10.96.0.11")));
    }
}
