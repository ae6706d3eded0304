//! The controller: for each WeightedService, keeps the Service it owns (server-side
//! apply, a controller owner reference, so deleting the WeightedService
//! garbage-collects it), evaluates the policy once with a cluster-wide view, and
//! writes `status`. Two controllers running at once (during a rollout) do no
//! harm: the apply is idempotent and an unchanged status is not written.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::cluster::{is_controlled_by, reflect, reflect_pods, PodCache, OWNER_LABEL, SERVICE_NAME_LABEL};
use crate::crd::{PolicyStatus, WeightedService};
use crate::events::{EventSink, Notice};
use crate::metrics::{Health, Metrics};
use crate::policy::Catalog;
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
}

/// What every reconcile shares.
pub struct Context {
    client: Client,
    catalog: Arc<Catalog>,
    slices: Store<EndpointSlice>,
    pods: PodCache,
    metrics: Arc<Metrics>,
    events: EventSink,
    ready_since: Mutex<ReadySince>,
    /// When `ready_since` was last pruned.
    pruned: Mutex<Instant>,
}

/// Reconciles at once. Unbounded (kube-runtime's default), 5,000
/// WeightedServices made 5,000 connections to the API server at start and
/// failed to connect; each also needs one of the policy engine's 64 instance slots.
const CONCURRENCY: u16 = 16;

/// How often the controller forgets endpoints no EndpointSlice has.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Run the controller until the process gets a signal.
pub async fn run(client: Client, catalog: Arc<Catalog>, metrics: Arc<Metrics>, health: Arc<Health>) {
    let (slices, slice_changes) = reflect(
        "EndpointSlice",
        watcher(Api::<EndpointSlice>::all(client.clone()), watcher::Config::default().labels(SERVICE_NAME_LABEL)),
        metrics.clone(),
    );
    let (pods, pod_changes) =
        reflect_pods(watcher(Api::<PartialObjectMeta<Pod>>::all(client.clone()), watcher::Config::default()), metrics.clone());
    let reporter = Reporter { controller: "ipvs-operator".into(), instance: std::env::var("POD_NAME").ok() };
    let (events, publisher) = crate::events::publisher(client.clone(), reporter);
    tokio::spawn(publisher);

    let controller = Controller::new(Api::<WeightedService>::all(client.clone()), watcher::Config::default())
        .with_config(kube::runtime::controller::Config::default().concurrency(CONCURRENCY));
    let weighted_services = controller.store();
    let ctx = Arc::new(Context {
        client: client.clone(),
        catalog,
        slices: slices.clone(),
        pods: pods.clone(),
        metrics,
        events,
        ready_since: Mutex::new(ReadySince::default()),
        pruned: Mutex::new(Instant::now()),
    });

    // Ready once every cache has its first list. kube-runtime's
    // `Store::wait_until_ready` wakes only one of several tasks waiting on the
    // same store (the Controller waits on the WeightedService store too), so a
    // waiter that missed its wake-up asks again: an already-ready store answers
    // at once.
    let (ws_ready, slices_ready, pods_ready) = (weighted_services.clone(), slices.clone(), pods.clone());
    let ready_health = health.clone();
    tokio::spawn(async move {
        if synced(&ws_ready).await && synced(&slices_ready).await && pods_ready.wait_until_ready().await.is_ok() {
            ready_health.set_ready();
            tracing::info!("watch caches synced: ready");
        }
    });
    let heartbeat = health.clone();
    tokio::spawn(async move {
        loop {
            heartbeat.beat();
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });

    // Policy modules: a reload reconciles everything (the status names the
    // module's hash); a refused module is reported on each WeightedService using it.
    let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let ws_for_policies = weighted_services.clone();
    let policy_events = ctx.events.clone();
    ctx.catalog.subscribe(move |event| match event {
        crate::policy::CatalogEvent::Failed { name, error } => {
            for ws in ws_for_policies.state().into_iter().filter(|ws| ws.policy_name() == name) {
                policy_events.send(Notice {
                    reference: ws.object_ref(&()),
                    type_: EventType::Warning,
                    reason: "PolicyModuleRefused".into(),
                    note: format!("{error}; the module in use stays"),
                });
            }
        }
        _ => {
            let _ = reload_tx.send(());
        }
    });
    let reloads = futures::stream::unfold(reload_rx, |mut rx| async move { rx.recv().await.map(|()| ((), rx)) });

    let slice_triggers = slice_changes.filter_map(|slice| async move { slice.map(Ok::<_, watcher::Error>) });
    let pod_triggers = pod_changes.filter_map(|pod| async move { pod.map(Ok::<_, watcher::Error>) });
    let ws_store_for_pods = weighted_services.clone();
    controller
        .owns(Api::<Service>::all(client), watcher::Config::default().labels(OWNER_LABEL))
        .watches_stream(slice_triggers, |slice: EndpointSlice| {
            let namespace = slice.namespace().unwrap_or_default();
            slice
                .labels()
                .get(SERVICE_NAME_LABEL)
                .map(|service| ObjectRef::<WeightedService>::new(service).within(&namespace))
        })
        .watches_stream(pod_triggers, move |pod: PartialObjectMeta<Pod>| {
            // Pod labels decide groups: every WeightedService in the namespace whose selector matches.
            let namespace = pod.namespace().unwrap_or_default();
            let labels = pod.labels().clone();
            ws_store_for_pods
                .state()
                .into_iter()
                .filter(|ws| ws.namespace().as_deref() == Some(namespace.as_str()))
                .filter(|ws| {
                    let selector = ws.spec.service.selector.clone().unwrap_or_default();
                    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                })
                .map(|ws| ObjectRef::from_obj(ws.as_ref()))
                .collect::<Vec<_>>()
        })
        .reconcile_all_on(reloads)
        .shutdown_on_signal()
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

/// Reconcile one WeightedService.
pub async fn reconcile(ws: Arc<WeightedService>, ctx: Arc<Context>) -> Result<Action, ControllerError> {
    let started = Instant::now();
    if ws.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = ws.namespace().unwrap_or_else(|| "default".into());
    let name = ws.name_any();
    let services = Api::<Service>::namespaced(ctx.client.clone(), &namespace);

    let (service_outcome, service) = apply_service(&ws, &services).await?;
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
            let (policy_name, pin) = (ws.policy_name().to_string(), ws.policy_sha256().map(str::to_string));
            let input = snapshot.clone();
            let started = Instant::now();
            let outcome = tokio::task::spawn_blocking(move || -> Result<_, crate::policy::PolicyError> {
                let policy = catalog.get_pinned(&policy_name, pin.as_deref())?;
                let evaluation = policy.evaluate(&input)?;
                Ok((PolicyStatus { name: policy.name().into(), sha256: policy.sha256().into() }, evaluation))
            })
            .await
            .map_err(|e| ControllerError::Task(e.to_string()))?;
            let result_kind = match &outcome {
                Ok(_) => "ok",
                Err(e) => e.kind(),
            };
            ctx.metrics.evaluated(ws.policy_name(), result_kind, started.elapsed());
            Some(outcome)
        }
        None => None,
    };

    let policy_outcome = match (&evaluated, &snapshot) {
        (Some(Ok((policy, evaluation))), Some(snapshot)) => {
            if let Some(after) = evaluation.requeue_after {
                action = Action::requeue(after.min(RESYNC));
            }
            PolicyOutcome::Evaluated { policy: policy.clone(), snapshot, evaluation }
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
    }
    ctx.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
    Ok(action)
}

/// The cluster-wide snapshot of `ws` from the watch caches.
fn build_snapshot(ctx: &Context, ws: &WeightedService, service: &Service, now: Timestamp) -> Result<Snapshot, crate::snapshot::Incomplete> {
    let namespace = ws.namespace().unwrap_or_default();
    let name = ws.name_any();
    let slices: Vec<Arc<EndpointSlice>> = ctx
        .slices
        .state()
        .into_iter()
        .filter(|s| s.metadata.namespace.as_deref() == Some(namespace.as_str()) && s.labels().get(SERVICE_NAME_LABEL) == Some(&name))
        .collect();
    let mut ready_since = ctx.ready_since.lock().unwrap_or_else(|p| p.into_inner());
    {
        let mut pruned = ctx.pruned.lock().unwrap_or_else(|p| p.into_inner());
        if pruned.elapsed() >= PRUNE_EVERY {
            ready_since.forget_absent(ctx.slices.state().iter().map(|slice| slice.as_ref()));
            *pruned = Instant::now();
        }
    }
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

/// Apply the owned Service unless a Service of that name belongs to someone else.
async fn apply_service(ws: &WeightedService, services: &Api<Service>) -> Result<(ServiceOutcome, Option<Service>), ControllerError> {
    let name = ws.name_any();
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
    let desired = Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: ws.namespace(),
            labels: Some(
                [
                    (OWNER_LABEL.to_string(), name.clone()),
                    ("app.kubernetes.io/managed-by".to_string(), "ipvs-operator".to_string()),
                ]
                .into(),
            ),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        // Fields the spec leaves out (clusterIP among them) are not claimed, so the
        // API server's assignment is never fought over.
        spec: Some(ws.spec.service.clone()),
        status: None,
    };
    match services.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&desired)).await {
        Ok(service) => {
            let cluster_ip = service.spec.as_ref().and_then(|s| s.cluster_ip.clone()).filter(|ip| ip != "None");
            Ok((ServiceOutcome::Applied { name, cluster_ip }, Some(service)))
        }
        // The API server refused the spec (validation): that is the user's to fix, not a retry.
        Err(kube::Error::Api(status)) if status.code == 422 || status.code == 400 => {
            Ok((ServiceOutcome::Failed { name, message: status.message }, None))
        }
        Err(source) => Err(ControllerError::Api { action: format!("applying Service {name}"), source }),
    }
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
pub fn error_policy(ws: Arc<WeightedService>, error: &ControllerError, _ctx: Arc<Context>) -> Action {
    tracing::warn!(weighted_service = %format!("{}/{}", ws.namespace().unwrap_or_default(), ws.name_any()), %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}
