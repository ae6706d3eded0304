//! Evaluating: what each labelled Service should weigh on this node. The
//! watch caches give, per Service labelled `codesink.net/weighted-service`,
//! either the WeightedService that controls it — its snapshot is built, its
//! policy evaluated when its input changed or it asked to be, and its plan
//! made from the last good weights — or no controller at all (an orphaning
//! delete, a lost owner reference), whose plan puts kube-proxy's weight 1 back.
//! Both come from the cluster's state, not from what this process did before:
//! an agent restarted after a weight change restores weight 1 just the same.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::plan::ServicePlan;
use super::schedule::Dirty;
use super::{reason_for, WsKey};
use crate::cluster::{is_controlled_by, Stores};
use crate::crd::WeightedService;
use crate::events::{EventSink, Notice};
use crate::metrics::Metrics;
use crate::policy::{Catalog, PolicyError};
use crate::snapshot::{NodeInfo, PodMeta, ReadySince, Snapshot};

/// A failed policy is tried again after this long even if nothing changed
/// (a timeout under load may pass).
const FAILED_RETRY: Duration = Duration::from_secs(30);

/// An endpoint whose pod no PodInfoSlice names for this long (the controller
/// is down or behind) is weighted as a pod without labels, with an Event,
/// rather than freezing the WeightedService's weights.
pub(super) const UNKNOWN_POD_GRACE: Duration = Duration::from_secs(30);

/// A policy failure on this node is reported (an Event) once it has lasted
/// this long while the controller's status does not show the same failure:
/// the controller, evaluating the same module, writes its status a moment
/// after the agents fail.
const NODE_FAILURE_GRACE: Duration = Duration::from_secs(30);

/// Whether the controller reports the policy of `ws` failing for `reason`
/// (its `PolicyReady` condition, as the agent's trimmed copy keeps it).
fn controller_reports(ws: &WeightedService, reason: &str) -> bool {
    ws.status.iter().flat_map(|s| &s.conditions).any(|c| {
        c.type_ == crate::status::POLICY_READY && c.status == "False" && c.reason == reason
    })
}

/// What the agent knows about one labelled Service.
pub(super) struct WsState {
    /// The controlling WeightedService's uid; empty when nothing controls it.
    pub(super) uid: String,
    /// Hash of the last snapshot evaluated (without `now`) and the policy module.
    input_hash: Option<u64>,
    /// When the policy asked to be evaluated again (or a failed one is retried).
    pub(super) due: Option<Instant>,
    /// The last good weights, by endpoint address: what stays when the policy fails.
    weights: Option<HashMap<IpAddr, u16>>,
    /// The last policy error, not to repeat its log line or Event.
    error: Option<String>,
    /// Since when the policy has failed with that error.
    failing_since: Option<Instant>,
    /// Whether an Event about that error was sent.
    error_reported: bool,
    /// Where the weights go, from the current snapshot.
    pub(super) plan: Option<Arc<ServicePlan>>,
    /// The plan has been written once; later writes for it repair drift.
    pub(super) plan_applied: bool,
    /// The reference Events about it attach to.
    pub(super) reference: ObjectReference,
    /// Since when an endpoint's pod has been unknown (no PodInfoSlice names it).
    unknown_since: Option<Instant>,
    /// Whether the Event about pods weighted without labels was sent.
    unknown_reported: bool,
}

/// What controls a labelled Service, as the caches have it now.
pub(super) enum Source {
    /// Its WeightedService: weights from the policy.
    Weighted(Arc<WeightedService>, Arc<Service>),
    /// No WeightedService controls it: weight 1 goes back.
    Orphan(Arc<Service>),
    /// Neither a WeightedService with its Service nor a labelled Service.
    Nothing,
}

impl Source {
    /// What controls the Service `service` (labelled as ours), given the
    /// WeightedService of the same name.
    pub(super) fn of(ws: Option<Arc<WeightedService>>, service: Option<Arc<Service>>) -> Source {
        match (ws, service) {
            (Some(ws), Some(service)) if is_controlled_by(&service, &ws) => Source::Weighted(ws, service),
            (_, Some(service)) => Source::Orphan(service),
            (_, None) => Source::Nothing,
        }
    }

    /// The uid its state is kept under (empty for an orphan).
    fn uid(&self) -> Option<&str> {
        match self {
            Source::Weighted(ws, _) => Some(ws.metadata.uid.as_deref().unwrap_or_default()),
            Source::Orphan(_) => Some(""),
            Source::Nothing => None,
        }
    }
}

/// The snapshot a restore plan is made from: the Service's endpoints as its
/// EndpointSlices have them (no policy looks at it, so no pod metadata).
fn orphan_snapshot(
    service: &Service,
    slices: &[Arc<EndpointSlice>],
    node: &NodeInfo,
    now: Timestamp,
    ready_since: &mut ReadySince,
) -> Option<Snapshot> {
    let mut ws = WeightedService::new(&service.name_any(), Default::default());
    ws.metadata.namespace = service.namespace();
    Snapshot::from_cluster(
        &ws,
        service,
        slices.iter().map(|s| s.as_ref()),
        |_, _| Some(PodMeta::default()),
        Some(node.clone()),
        now,
        ready_since,
    )
    .ok()
}

/// The evaluating part of the agent: the state of every labelled Service.
pub(super) struct Evaluator {
    node_name: String,
    stores: Stores,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
    events: EventSink,
    pub(super) states: HashMap<WsKey, WsState>,
    ready_since: ReadySince,
    /// Counts changes to the plans (set, replaced, dropped).
    pub(super) plans_changed: u64,
}

impl Evaluator {
    pub(super) fn new(node_name: String, stores: Stores, catalog: Arc<Catalog>, metrics: Arc<Metrics>, events: EventSink) -> Self {
        Evaluator {
            node_name,
            stores,
            catalog,
            metrics,
            events,
            states: HashMap::new(),
            ready_since: ReadySince::default(),
            plans_changed: 0,
        }
    }

    /// The plans, with their keys.
    pub(super) fn plans(&self) -> impl Iterator<Item = (&WsKey, &ServicePlan)> + Clone {
        self.states.iter().filter_map(|(k, s)| Some((k, s.plan.as_deref()?)))
    }

    /// The labelled Services the caches have: every WeightedService's and
    /// every labelled Service's key.
    fn cached_keys(&self) -> HashSet<WsKey> {
        let key_of = |namespace: Option<String>, name: String| WsKey { namespace: namespace.unwrap_or_default(), name };
        let mut keys: HashSet<WsKey> =
            self.stores.weighted_services.state().iter().map(|ws| key_of(ws.namespace(), ws.name_any())).collect();
        keys.extend(self.stores.services.state().iter().map(|s| key_of(s.namespace(), s.name_any())));
        keys
    }

    fn source(&self, key: &WsKey) -> Source {
        let ws = self.stores.weighted_services.get(&ObjectRef::new(&key.name).within(&key.namespace));
        Source::of(ws, self.stores.services.get(&ObjectRef::new(&key.name).within(&key.namespace)))
    }

    /// Rebuild the snapshots and plans of what `dirty` names (everything with
    /// `dirty.all`), evaluating the policies whose input changed or that are
    /// due; a state whose source went or was replaced is dropped first.
    /// Returns how many were evaluated.
    pub(super) fn rebuild(&mut self, dirty: &Dirty, now: Timestamp, instant: Instant) -> usize {
        let mut keys: HashSet<WsKey> = dirty.keys.clone();
        if dirty.all {
            keys.extend(self.cached_keys());
            keys.extend(self.states.keys().cloned());
        }
        if keys.is_empty() {
            return 0;
        }
        let node = self.stores.node_info(&self.node_name);
        let mut evaluated = 0;
        for key in keys {
            let source = self.source(&key);
            if self.states.get(&key).is_some_and(|s| Some(s.uid.as_str()) != source.uid()) {
                self.states.remove(&key);
                self.plans_changed += 1;
                tracing::info!(service = %key, "WeightedService gone or replaced: planning again from the cluster");
            }
            match source {
                Source::Weighted(ws, service) => {
                    let Some(slices) = self.stores.slices_of(&ws) else {
                        // Its slices' watch has not listed yet: keep the last plan, look again soon.
                        if let Some(state) = self.states.get_mut(&key) {
                            state.due = Some(instant + Duration::from_millis(200));
                        }
                        continue;
                    };
                    if self.refresh(&key, &ws, &service, &slices, &node, now, instant) {
                        evaluated += 1;
                    }
                }
                Source::Orphan(service) => {
                    let slices = self.stores.slices.slices_of(&key.namespace, &key.name);
                    self.refresh_orphan(&key, &service, &slices, &node, now);
                }
                Source::Nothing => {}
            }
        }
        evaluated
    }

    fn set_plan(&mut self, key: &WsKey, plan: ServicePlan) {
        let Some(state) = self.states.get_mut(key) else { return };
        if state.plan.as_deref() != Some(&plan) {
            state.plan_applied = false;
            state.plan = Some(Arc::new(plan));
            self.plans_changed += 1;
        }
    }

    /// The plan of a Service no WeightedService controls: weight 1 back on
    /// its ready destinations.
    fn refresh_orphan(&mut self, key: &WsKey, service: &Service, slices: &[Arc<EndpointSlice>], node: &NodeInfo, now: Timestamp) {
        let state = self.states.entry(key.clone()).or_insert_with(|| {
            tracing::info!(service = %key, "no WeightedService controls this Service: restoring weight 1");
            WsState::new(String::new(), service.object_ref(&()))
        });
        state.due = None;
        let Some(snapshot) = orphan_snapshot(service, slices, node, now, &mut self.ready_since) else { return };
        self.set_plan(key, ServicePlan::restore(service, &snapshot));
    }

    /// Rebuild the snapshot and plan of one WeightedService, evaluating its
    /// policy if its input changed or it is due. True if it was evaluated.
    #[allow(clippy::too_many_arguments)]
    fn refresh(
        &mut self,
        key: &WsKey,
        ws: &WeightedService,
        service: &Service,
        slices: &[Arc<EndpointSlice>],
        node: &NodeInfo,
        now: Timestamp,
        instant: Instant,
    ) -> bool {
        let uid = ws.metadata.uid.clone().unwrap_or_default();
        let state = self.states.entry(key.clone()).or_insert_with(|| WsState::new(uid, ws.object_ref(&())));
        let stores = &self.stores;
        // After the grace period, unknown pods count as pods without labels.
        let lenient = state.unknown_since.is_some_and(|since| instant.duration_since(since) >= UNKNOWN_POD_GRACE);
        let unknown = std::cell::RefCell::new(Vec::new());
        let snapshot = match Snapshot::from_cluster(
            ws,
            service,
            slices.iter().map(|s| s.as_ref()),
            |ns, name| {
                stores.pod(ns, &key.name, name).or_else(|| {
                    lenient.then(|| {
                        unknown.borrow_mut().push(format!("{ns}/{name}"));
                        PodMeta::default()
                    })
                })
            },
            Some(node.clone()),
            now,
            &mut self.ready_since,
        ) {
            Ok(snapshot) => snapshot,
            Err(incomplete) => {
                // Evaluating now could give wrong weights: keep the last plan, look again soon.
                tracing::debug!(weighted_service = %key, %incomplete, "snapshot incomplete");
                let since = *state.unknown_since.get_or_insert(instant);
                let again = if instant.duration_since(since) < Duration::from_secs(2) { 200 } else { 1000 };
                state.due = Some((instant + Duration::from_millis(again)).min(since + UNKNOWN_POD_GRACE));
                return false;
            }
        };
        let unknown = unknown.into_inner();
        if unknown.is_empty() {
            state.unknown_since = None;
            state.unknown_reported = false;
        } else if !state.unknown_reported {
            state.unknown_reported = true;
            tracing::warn!(weighted_service = %key, pods = ?unknown, "pods unknown for 30 s: weighted as pods without labels");
            self.events.send(Notice {
                reference: state.reference.clone(),
                type_: EventType::Warning,
                reason: "PodInfoMissing".into(),
                note: format!(
                    "on node {}: no PodInfoSlice has had pod {}{} for {} s (is the controller running?): weighted as pods without labels",
                    self.node_name,
                    unknown.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                    if unknown.len() > 5 { format!(" and {} more", unknown.len() - 5) } else { String::new() },
                    UNKNOWN_POD_GRACE.as_secs()
                ),
            });
        }

        // Never waits for a compile: a policy being compiled is `Loading`, and
        // the catalog's `Loaded` event brings this WeightedService back.
        let policy = self.catalog.ready(&ws.policy_key(), ws.policy_sha256());
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
                    self.metrics.attempted(policy.name(), Ok(()), took);
                    state.weights =
                        Some(snapshot.endpoints.iter().zip(&evaluation.weights).map(|(e, w)| (e.address, *w)).collect());
                    state.due = evaluation.requeue_after.map(|d| instant + d);
                    if state.error.take().is_some() {
                        tracing::info!(weighted_service = %key, policy = policy.name(), "policy works again");
                    }
                    state.failing_since = None;
                    state.error_reported = false;
                }
                Err(PolicyError::Loading { .. }) => {
                    // Not the policy's failure: the weights in the kernel stay
                    // until it is compiled, and its Loaded event comes.
                    tracing::debug!(weighted_service = %key, policy = ws.policy_key(), "policy being compiled");
                }
                Err(error) => {
                    self.metrics.attempted(&ws.policy_key(), Err(&error), took);
                    state.due = Some(instant + FAILED_RETRY);
                    let text = error.to_string();
                    if state.error.as_deref() != Some(text.as_str()) {
                        tracing::warn!(weighted_service = %key, %error, "policy failed: the last good weights stay");
                        state.error = Some(text.clone());
                        state.failing_since = Some(instant);
                        state.error_reported = false;
                    }
                    // An Event only for what is particular to this node: a
                    // failure the controller reports too (in the status) is
                    // the module's, reported once, by the controller. Its
                    // status may lag: a failure is particular once it has
                    // lasted NODE_FAILURE_GRACE without the status showing it.
                    let lasted = state.failing_since.is_some_and(|since| instant.duration_since(since) >= NODE_FAILURE_GRACE);
                    if lasted && !state.error_reported && !controller_reports(ws, reason_for(&error)) {
                        state.error_reported = true;
                        self.events.send(Notice {
                            reference: state.reference.clone(),
                            type_: EventType::Warning,
                            reason: reason_for(&error).into(),
                            note: format!("on node {} only: {text}; the last good weights stay", self.node_name),
                        });
                    } else if !lasted {
                        let since = state.failing_since.unwrap_or(instant);
                        state.due = Some(since + NODE_FAILURE_GRACE);
                    }
                }
            }
        }
        let weights = state.weights.as_ref();
        let plan = ServicePlan::new(service, &snapshot, Some(ws.scheduler()), |_, endpoint| {
            weights.and_then(|w| w.get(&endpoint.address).copied())
        });
        self.set_plan(key, plan);
        evaluated
    }

    /// Any labelled Services that the caches and the agent's states disagree
    /// on (new, gone, or replaced under the same name), should a change have
    /// been missed.
    pub(super) fn cross_check(&self, dirty: &mut Dirty) {
        let cached = self.cached_keys();
        for key in &cached {
            let uid = self.source(key).uid().map(String::from);
            if self.states.get(key).map(|s| s.uid.clone()) != uid {
                dirty.keys.insert(key.clone());
            }
        }
        dirty.keys.extend(self.states.keys().filter(|k| !cached.contains(*k)).cloned());
    }

    /// Forget what was remembered about endpoints no EndpointSlice has any
    /// more (when their addresses became ready): under churn it would grow for
    /// ever. An address that comes back later is new again (ready since its
    /// pod's creation), as it is after a restart.
    pub(super) fn forget_gone_endpoints(&mut self, present: &HashSet<IpAddr>) {
        self.ready_since.retain(|address| present.contains(address));
    }

    /// Every endpoint address the EndpointSlice caches have.
    pub(super) fn endpoint_addresses(&self) -> HashSet<IpAddr> {
        let addresses = |slices: &mut dyn Iterator<Item = &EndpointSlice>| -> HashSet<IpAddr> {
            slices.flat_map(|s| s.endpoints.iter().flatten()).filter_map(|e| e.addresses.first()?.parse().ok()).collect()
        };
        let mut all = self.stores.slices.with_all(addresses);
        all.extend(self.stores.selectorless_slices.with_all(addresses));
        all
    }

    /// Whether any plan has an IPv6 virtual service or destination.
    pub(super) fn plans_have_ipv6(&self) -> bool {
        self.plans().flat_map(|(_, p)| &p.ports).any(|port| {
            port.addresses().any(IpAddr::is_ipv6) || !port.internal.ipv6.is_empty() || !port.external.ipv6.is_empty()
        })
    }

    /// The reference Events about `key` attach to.
    pub(super) fn reference(&self, key: &WsKey) -> Option<ObjectReference> {
        self.states.get(key).map(|s| s.reference.clone())
    }
}

impl WsState {
    fn new(uid: String, reference: ObjectReference) -> Self {
        WsState {
            uid,
            input_hash: None,
            due: None,
            weights: None,
            error: None,
            plan: None,
            plan_applied: false,
            reference,
            unknown_since: None,
            unknown_reported: false,
            failing_since: None,
            error_reported: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn weighted(uid: &str) -> Arc<WeightedService> {
        let mut ws = WeightedService::new("web", Default::default());
        ws.metadata.namespace = Some("shop".into());
        ws.metadata.uid = Some(uid.into());
        Arc::new(ws)
    }

    fn service(owner_uid: Option<&str>) -> Arc<Service> {
        let mut svc = Service::default();
        svc.metadata.name = Some("web".into());
        svc.metadata.namespace = Some("shop".into());
        svc.metadata.owner_references = owner_uid.map(|uid| {
            vec![OwnerReference {
                api_version: "codesink.net/v1alpha1".into(),
                kind: "WeightedService".into(),
                name: "web".into(),
                uid: uid.into(),
                controller: Some(true),
                ..Default::default()
            }]
        });
        Arc::new(svc)
    }

    #[test]
    fn a_service_without_a_controlling_weighted_service_is_an_orphan() {
        assert!(matches!(Source::of(Some(weighted("u1")), Some(service(Some("u1")))), Source::Weighted(..)));
        // An orphaning delete removes the WeightedService and its owner reference.
        assert!(matches!(Source::of(None, Some(service(None))), Source::Orphan(_)));
        assert!(matches!(Source::of(None, Some(service(Some("u1")))), Source::Orphan(_)));
        // Recreated under the same name: the old owner reference controls nothing.
        assert!(matches!(Source::of(Some(weighted("u2")), Some(service(Some("u1")))), Source::Orphan(_)));
        assert!(matches!(Source::of(Some(weighted("u1")), None), Source::Nothing));
        assert_eq!(Source::of(None, Some(service(None))).uid(), Some(""));
    }

    #[test]
    fn an_orphan_snapshot_has_the_slices_endpoints_without_pod_metadata() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.1.5"], "targetRef": {"kind": "Pod", "name": "web-a", "namespace": "shop"}}],
        }))
        .unwrap();
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]},
        }))
        .unwrap();
        let node = NodeInfo { name: "node-1".into(), ..Default::default() };
        let snapshot = orphan_snapshot(&svc, &[Arc::new(slice)], &node, Timestamp::UNIX_EPOCH, &mut ReadySince::default())
            .expect("a snapshot, although no pod is known");
        assert_eq!(snapshot.endpoints.len(), 1);
        assert_eq!(snapshot.service.namespace, "shop");
        let plan = ServicePlan::restore(&svc, &snapshot);
        assert_eq!(plan.ports[0].internal.ipv4.values().copied().collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn a_failure_the_controller_reports_is_not_the_nodes_to_report() {
        let mut ws = (*weighted("u1")).clone();
        assert!(!controller_reports(&ws, "PolicyPinMismatch"), "no status yet");
        let condition = |status: &str, reason: &str| k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: crate::status::POLICY_READY.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH),
            observed_generation: None,
        };
        ws.status = Some(crate::crd::WeightedServiceStatus { conditions: vec![condition("False", "PolicyPinMismatch")], ..Default::default() });
        assert!(controller_reports(&ws, "PolicyPinMismatch"));
        assert!(!controller_reports(&ws, "PolicyFailed"), "another failure: this node's");
        ws.status = Some(crate::crd::WeightedServiceStatus { conditions: vec![condition("True", "Evaluated")], ..Default::default() });
        assert!(!controller_reports(&ws, "PolicyPinMismatch"), "works for the controller: this node's");
    }
}
