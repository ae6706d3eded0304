//! The cluster as the agent and the controller see it: watch caches
//! (reflectors) of WeightedServices, their Services, EndpointSlices, the
//! PodInfoSlices the controller publishes (the agent does not watch pods) and
//! the agent's Node, and a stream of what changed.

use std::fmt::Debug;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

mod indexed;
mod pod_infos;
mod pods;
mod selectorless;
mod slices;
pub use indexed::{Index, Indexed, WatchStopped};
pub use pod_infos::{PodInfoCache, PodInfos, reflect_pod_infos};
pub use pods::{FullPodCache, Pods, reflect_pods};
pub use selectorless::SelectorlessSlices;
pub use slices::{SliceCache, Slices, reflect_slices};

use crate::crd::{PodInfoSlice, WeightedService};
use crate::metrics::{KindLabels, Metrics};
use crate::snapshot::{PodMeta, ZONE_LABEL};

/// The label the controller puts on the Services and PodInfoSlices it owns; its
/// value is the WeightedService's name. The agent watches only objects with it.
pub const OWNER_LABEL: &str = "codesink.net/weighted-service";

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What changed in the cluster, for the work loop to look at again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Change {
    /// A WeightedService (namespace, name).
    WeightedService(String, String),
    /// The Service of the WeightedService of that name.
    Service(String, String),
    /// An EndpointSlice of the Service of that name.
    Slices(String, String),
    /// A PodInfoSlice of the WeightedService of that name.
    PodInfo(String, String),
    /// The agent's Node.
    Node,
    /// A watch (re)listed everything of a kind: look at everything again.
    All,
}

/// Read access to the watch caches.
#[derive(Clone)]
pub struct Stores {
    /// WeightedServices, all namespaces.
    pub weighted_services: Store<WeightedService>,
    /// Services the controller owns (label [`OWNER_LABEL`]).
    pub services: Store<Service>,
    /// EndpointSlices of the Services the controller owns (label
    /// [`OWNER_LABEL`], which the EndpointSlice controller copies from them), by Service.
    pub slices: SliceCache,
    /// EndpointSlices of WeightedServices without a selector (written by
    /// their owners, without our label), by Service.
    pub selectorless_slices: SelectorlessSlices,
    /// What the controller published of the pods behind each WeightedService.
    pub pod_infos: PodInfoCache,
    /// The agent's own Node, if watched.
    pub node: Option<Store<Node>>,
}

impl Stores {
    /// Wait until every cache has had its first full list.
    pub async fn wait_until_ready(&self) -> Result<(), WatchesStopped> {
        let stopped = |_| WatchesStopped;
        self.weighted_services.wait_until_ready().await.map_err(stopped)?;
        self.services.wait_until_ready().await.map_err(stopped)?;
        self.slices.wait_until_ready().await.map_err(|_| WatchesStopped)?;
        self.pod_infos.wait_until_ready().await.map_err(|_| WatchesStopped)?;
        if let Some(node) = &self.node {
            node.wait_until_ready().await.map_err(stopped)?;
        }
        Ok(())
    }

    /// The Service of `ws`, if it exists and `ws` controls it.
    pub fn owned_service(&self, ws: &WeightedService) -> Option<Arc<Service>> {
        let service = self
            .services
            .get(&ObjectRef::new(&ws.name_any()).within(&ws.namespace().unwrap_or_default()))?;
        is_controlled_by(&service, ws).then_some(service)
    }

    /// The EndpointSlices of `ws`'s Service; `None` while a WeightedService
    /// without a selector waits for the watch of its slices to list.
    pub fn slices_of(&self, ws: &WeightedService) -> Option<Vec<Arc<EndpointSlice>>> {
        let (namespace, name) = (ws.namespace().unwrap_or_default(), ws.name_any());
        let mut slices = self.slices.slices_of(&namespace, &name);
        if ws.spec.service.selector.as_ref().is_none_or(|s| s.is_empty()) {
            slices.extend(self.selectorless_slices.slices_of(&namespace, &name)?);
        }
        Some(slices)
    }

    /// Labels, creation and ready-since time of a pod behind the
    /// WeightedService `ws`, as the controller published them.
    pub fn pod(&self, namespace: &str, ws: &str, name: &str) -> Option<PodMeta> {
        self.pod_infos.get(namespace, ws, name)
    }

    /// The agent's Node: name, zone and labels.
    pub fn node_info(&self, name: &str) -> crate::snapshot::NodeInfo {
        let labels = self
            .node
            .as_ref()
            .and_then(|s| s.get(&ObjectRef::new(name)))
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        crate::snapshot::NodeInfo {
            name: name.into(),
            zone: labels.get(ZONE_LABEL).cloned(),
            labels,
        }
    }
}

/// Whether a Service selector selects a pod with `labels` (no selector: any pod).
pub fn selects(selector: Option<&std::collections::BTreeMap<String, String>>, labels: &std::collections::BTreeMap<String, String>) -> bool {
    selector.filter(|s| !s.is_empty()).is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// A watch stopped before its first full list (the process is ending).
#[derive(Debug, thiserror::Error)]
#[error("the watches stopped before their first full list")]
pub struct WatchesStopped;

/// Whether `ws` is the controlling owner of `service`.
pub fn is_controlled_by(service: &Service, ws: &WeightedService) -> bool {
    let Some(uid) = ws.metadata.uid.as_deref() else {
        return false;
    };
    service
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.uid == uid && o.kind == WeightedService::kind(&()))
}

/// What the agent last saw of each WeightedService, as a hash of the trimmed
/// object ([`Trim`]: no status, no resourceVersion): the controller's status
/// writes (shares, messages, at every rollout step) then reach every agent as
/// watch events that change nothing here, and are not turned into work.
#[derive(Debug, Default)]
pub struct Fingerprints(std::collections::HashMap<(String, String), u64>);

impl Fingerprints {
    /// Whether `object` (`None`: deleted) differs from what was last seen
    /// under `key`; remembers it.
    pub fn changed(&mut self, key: (String, String), object: Option<&impl serde::Serialize>) -> bool {
        let Some(object) = object else {
            self.0.remove(&key);
            return true;
        };
        let Ok(bytes) = serde_json::to_vec(object) else { return true };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&bytes, &mut hasher);
        let fingerprint = std::hash::Hasher::finish(&hasher);
        self.0.insert(key, fingerprint) != Some(fingerprint)
    }
}

/// How every watch here lists: from the API server's watch cache
/// (`resourceVersion=0`), not with a consistent read from etcd. After an API
/// server restart every agent relists at once; served from the cache, that
/// costs etcd nothing. (The watcher's retries already back off with jitter.)
pub fn watch_config() -> watcher::Config {
    watcher::Config::default().any_semantic()
}

/// Start watching. Returns the caches and the future that drives the watches
/// (it runs until the process ends); every change is passed to `changed`.
pub fn watch(
    client: Client,
    node_name: Option<String>,
    metrics: Arc<Metrics>,
    changed: impl Fn(Change) + Send + Sync + 'static,
) -> (Stores, impl std::future::Future<Output = ()> + Send) {
    let changed = Arc::new(changed);
    let config = watch_config();

    let (weighted_services, ws_stream) = reflect(
        "WeightedService",
        watcher(Api::<WeightedService>::all(client.clone()), config.clone()),
        metrics.clone(),
    );
    let (services, svc_stream) = reflect(
        "Service",
        watcher(Api::<Service>::all(client.clone()), config.clone().labels(OWNER_LABEL)),
        metrics.clone(),
    );
    let (slices, slice_stream) = reflect_slices(
        watcher(Api::<EndpointSlice>::all(client.clone()), config.clone().labels(OWNER_LABEL)),
        metrics.clone(),
    );
    let selectorless_slices = SelectorlessSlices::default();
    let (selectorless_names, names_rx) = tokio::sync::watch::channel(std::collections::BTreeSet::new());
    let selectorless_watch = selectorless::drive(
        client.clone(),
        selectorless_slices.clone(),
        names_rx,
        metrics.clone(),
        changed.clone(),
    );
    let (pod_infos, pod_info_stream) =
        reflect_pod_infos(watcher(Api::<PodInfoSlice>::all(client.clone()), config.clone().labels(OWNER_LABEL)), metrics.clone());
    let node_watch = node_name.map(|name| {
        reflect(
            "Node",
            watcher(Api::<Node>::all(client.clone()), config.clone().fields(&format!("metadata.name={name}"))),
            metrics.clone(),
        )
    });
    let node = node_watch.as_ref().map(|(store, _)| store.clone());

    let stores = Stores { weighted_services, services, slices, selectorless_slices, pod_infos, node };
    let c = changed.clone();
    let ws_cache = stores.weighted_services.clone();
    let mut fingerprints = Fingerprints::default();
    let ws_changes = ws_stream.for_each(move |ws| {
        let changed = match ws {
            None => {
                c(Change::All);
                true
            }
            Some(ws) => {
                let (namespace, name) = (ws.namespace().unwrap_or_default(), ws.name_any());
                // Deleted when the cache no longer has it.
                let present = ws_cache.get(&ObjectRef::new(&name).within(&namespace));
                let changed = fingerprints.changed((namespace.clone(), name.clone()), present.as_deref());
                if changed {
                    c(Change::WeightedService(namespace, name));
                }
                changed
            }
        };
        if changed {
            let names = selectorless::selectorless_names(ws_cache.state().iter().map(|ws| ws.as_ref()));
            selectorless_names.send_if_modified(|current| std::mem::replace(current, names.clone()) != names);
        }
        async {}
    });
    let c = changed.clone();
    let svc_changes = svc_stream.for_each(move |svc| {
        c(svc.map_or(Change::All, |svc| Change::Service(svc.namespace().unwrap_or_default(), svc.name_any())));
        async {}
    });
    let c = changed.clone();
    let slice_changes = slice_stream.for_each(move |slice| {
        if let Some(change) = slice_change(slice) {
            c(change);
        }
        async {}
    });
    let c = changed.clone();
    let pod_info_changes = pod_info_stream.for_each(move |slice| {
        match slice {
            None => c(Change::All),
            Some(slice) => {
                if let Some(ws) = slice.labels().get(OWNER_LABEL) {
                    c(Change::PodInfo(slice.namespace().unwrap_or_default(), ws.clone()));
                }
            }
        }
        async {}
    });
    let c = changed;
    let node_changes = async move {
        if let Some((_, stream)) = node_watch {
            stream
                .for_each(|_| {
                    c(Change::Node);
                    async {}
                })
                .await;
        }
    };
    let drive = async move {
        futures::join!(ws_changes, svc_changes, slice_changes, pod_info_changes, node_changes, selectorless_watch);
    };
    (stores, drive)
}

/// What an EndpointSlice watch's change (`None`: a relist) means for the work loop.
pub(crate) fn slice_change(slice: Option<EndpointSlice>) -> Option<Change> {
    let Some(slice) = slice else { return Some(Change::All) };
    let service = slice.labels().get(SERVICE_NAME_LABEL)?;
    Some(Change::Slices(slice.namespace().unwrap_or_default(), service.clone()))
}

/// Dropping, before an object is cached, the fields the agent and the
/// controller never read. Every node runs an agent that caches the
/// EndpointSlices of our Services, and the controller caches every pod: what a real cluster puts in them
/// (annotations, owner references, uids, hostnames) would be most of the
/// agent's memory.
pub trait Trim {
    /// Drop what is never read.
    fn trim(&mut self);
}

/// Metadata no one here reads: the cache is keyed by namespace and name.
fn trim_bookkeeping(meta: &mut ObjectMeta) {
    meta.generate_name = None;
    meta.uid = None;
    meta.resource_version = None;
    meta.generation = None;
    meta.finalizers = None;
}

/// What the pod cache does not read of a pod's metadata.
fn trim_pod_meta(meta: &mut ObjectMeta) {
    trim_bookkeeping(meta);
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
}

impl Trim for Pod {
    /// Labels, creation (and deletion) time, and the Ready condition.
    fn trim(&mut self) {
        trim_pod_meta(&mut self.metadata);
        self.spec = None;
        if let Some(status) = self.status.take() {
            let ready = status
                .conditions
                .into_iter()
                .flatten()
                .filter(|c| c.type_ == "Ready")
                .collect();
            self.status = Some(k8s_openapi::api::core::v1::PodStatus {
                conditions: Some(ready),
                ..Default::default()
            });
        }
    }
}

impl Trim for EndpointSlice {
    /// Addresses, ports, conditions, node, zone, topology hints (they decide
    /// which virtual services kube-proxy puts an endpoint behind) and which
    /// pod: not the slice's own bookkeeping or the pod's uid.
    fn trim(&mut self) {
        trim_bookkeeping(&mut self.metadata);
        self.metadata.annotations = None;
        self.metadata.owner_references = None;
        for endpoint in self.endpoints.iter_mut().flatten() {
            endpoint.hostname = None;
            endpoint.deprecated_topology = None;
            if let Some(target) = endpoint.target_ref.as_mut() {
                target.uid = None;
                target.resource_version = None;
                target.api_version = None;
                target.field_path = None;
            }
        }
    }
}

impl Trim for Service {
    /// The spec, load-balancer addresses and the owner reference are read;
    /// the WeightedService's annotations (not the Service's) go to policies.
    fn trim(&mut self) {
        trim_bookkeeping(&mut self.metadata);
        self.metadata.annotations = None;
        if let Some(status) = self.status.as_mut() {
            status.conditions = None;
        }
    }
}

impl Trim for WeightedService {
    /// The agent reads the spec, and of the status the controller writes only
    /// whether the policy works cluster-wide (`PolicyReady`'s status and
    /// reason, the module's hash): a failure the controller reports already
    /// is not reported again by every node. Shares and messages, which change
    /// at every rollout step, are dropped (the controller keeps its own
    /// cache). The uid is kept: it tells a WeightedService from one re-created
    /// under the same name.
    fn trim(&mut self) {
        if let Some(status) = self.status.take() {
            let conditions: Vec<_> = status
                .conditions
                .into_iter()
                .filter(|c| c.type_ == crate::status::POLICY_READY)
                .map(|c| k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                    message: String::new(),
                    last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                    ),
                    observed_generation: None,
                    ..c
                })
                .collect();
            if !conditions.is_empty() || status.policy.is_some() {
                self.status = Some(crate::crd::WeightedServiceStatus { policy: status.policy, conditions, ..Default::default() });
            }
        }
        self.metadata.resource_version = None;
        self.metadata.finalizers = None;
    }
}

impl Trim for Node {
    /// Only the Node's labels (zone, and what policies match) are read; its
    /// status (images, conditions, capacity) is large on real nodes.
    fn trim(&mut self) {
        trim_bookkeeping(&mut self.metadata);
        self.metadata.annotations = None;
        self.spec = None;
        self.status = None;
    }
}

/// Drop from `object`, before it is cached, what no one here reads: managed
/// fields, kubectl's last-applied annotation, and what [`Trim`] drops.
pub(crate) fn strip<K: Resource + Trim>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    object.trim();
}

/// A reflector over `stream`: the cache, and the changes (objects applied or
/// deleted as `Some`, a completed relist as `None`), with watch errors logged and
/// counted (the watcher retries with backoff). Fields no one here reads are
/// dropped before caching ([`Trim`]): this runs on every node.
pub fn reflect<K>(
    kind: &'static str,
    stream: impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    metrics: Arc<Metrics>,
) -> (Store<K>, impl Stream<Item = Option<K>> + Send)
where
    K: Resource + Trim + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let count = reader.clone();
    let gauge = metrics.watched_objects.get_or_create(&KindLabels { kind: kind.into() }).clone();
    let changes = stream
        .default_backoff()
        .modify(strip)
        .reflect(writer)
        .filter_map(move |event| {
            let result = match event {
                Ok(event) => {
                    gauge.set(count.len() as i64);
                    match event {
                        watcher::Event::Apply(o) | watcher::Event::Delete(o) => Some(Some(o)),
                        // The cache is swapped in at InitDone: that is when to look again.
                        watcher::Event::InitDone => {
                            Metrics::count(&metrics.watch_lists, kind, 1);
                            Some(None)
                        }
                        watcher::Event::Init | watcher::Event::InitApply(_) => None,
                    }
                }
                Err(error) => {
                    tracing::warn!(kind, %error, "watch failed; retrying with backoff");
                    Metrics::count(&metrics.watch_errors, kind, 1);
                    None
                }
            };
            async move { result }
        });
    (reader, changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws(weight: u16, status_message: &str) -> WeightedService {
        let mut ws: WeightedService = serde_json::from_value(serde_json::json!({
            "apiVersion": "codesink.net/v1alpha1", "kind": "WeightedService",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u-1", "resourceVersion": status_message},
            "spec": {"selector": {"app": "web"}, "weights": [{"weight": weight, "selector": {"env": "prod"}}]},
            "status": {"message": status_message, "groups": [{"endpoints": 2, "share": 0.5}], "conditions": [{
                "type": "PolicyReady", "status": "True", "reason": "Evaluated", "message": status_message,
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }]},
        }))
        .expect("a WeightedService");
        strip(&mut ws);
        ws
    }

    #[test]
    fn selectors_match_labels() {
        let labels: std::collections::BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        let selector: std::collections::BTreeMap<String, String> = labels.clone();
        assert!(selects(Some(&selector), &labels));
        assert!(selects(None, &labels));
        assert!(selects(Some(&std::collections::BTreeMap::new()), &labels));
        assert!(!selects(Some(&[("app".to_string(), "db".to_string())].into()), &labels));
    }

    #[test]
    fn a_status_write_is_not_a_change_for_the_agent() {
        let mut seen = Fingerprints::default();
        let key = || ("shop".to_string(), "web".to_string());
        assert!(seen.changed(key(), Some(&ws(10, "1"))), "first seen");
        assert!(!seen.changed(key(), Some(&ws(10, "2"))), "only the status message and resourceVersion changed");
        assert!(seen.changed(key(), Some(&ws(20, "3"))), "the spec changed");
        assert!(seen.changed(key(), None::<&WeightedService>), "deleted");
        assert!(seen.changed(key(), Some(&ws(20, "4"))), "created again");
        let mut failing = ws(20, "5");
        failing.status.as_mut().expect("the PolicyReady condition is kept").conditions[0].status = "False".into();
        assert!(seen.changed(key(), Some(&failing)), "the policy fails cluster-wide: the agent needs to know");
        assert!(ws(20, "6").status.expect("kept").groups.is_empty(), "shares are dropped");
    }
}
