//! A `Snapshot` is everything one policy evaluation sees for one WeightedService:
//! the Service, the weight groups, the config, the endpoints with their pod
//! labels and ports, the evaluating node, and `now`. The agent builds it from
//! EndpointSlices and pod metadata; `ipvs-operator eval` builds it from a file of
//! Pods with [`Snapshot::from_pods`].

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

use crate::crd::{WeightGroup, WeightedService};

/// Labels, annotations and equality selectors.
pub type Labels = BTreeMap<String, String>;

/// The input of one policy evaluation, plus each endpoint's ports (which the
/// policy does not see, but which map its weights to IPVS destinations).
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The Service being weighted.
    pub service: ServiceMeta,
    /// `spec.weights`, in order.
    pub groups: Vec<WeightGroup>,
    /// `spec.policy.config` as JSON text.
    pub config: String,
    /// The Service's endpoints, one per pod address.
    pub endpoints: Vec<Endpoint>,
    /// The evaluating node; `None` for the cluster-wide view.
    pub node: Option<NodeInfo>,
    /// The time of evaluation.
    pub now: Timestamp,
}

/// The Service's identity and labels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ServiceMeta {
    /// Namespace.
    pub namespace: String,
    /// Name (the WeightedService's name).
    pub name: String,
    /// `spec.selector`.
    pub selector: Labels,
    /// `metadata.labels`.
    pub labels: Labels,
    /// `metadata.annotations`.
    pub annotations: Labels,
}

/// One backend address of the Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The pod behind the address, if known.
    pub pod_name: Option<String>,
    /// The pod IP.
    pub address: IpAddr,
    /// The node it runs on.
    pub node_name: Option<String>,
    /// That node's zone.
    pub zone: Option<String>,
    /// The pod's labels; endpoints whose pods have the same labels share one map.
    pub labels: Arc<Labels>,
    /// Ready and not terminating.
    pub ready: bool,
    /// Able to serve, possibly while terminating.
    pub serving: bool,
    /// Being deleted.
    pub terminating: bool,
    /// Pod creation time.
    pub created: Option<Timestamp>,
    /// Since when the pod has been Ready.
    pub ready_since: Option<Timestamp>,
    /// The Service ports this endpoint serves, each with its resolved target port.
    pub ports: Vec<EndpointPort>,
    /// Its EndpointSlice's topology hints (not policy input: they decide
    /// which virtual services kube-proxy puts it behind).
    pub hints: Hints,
}

/// The topology hints of an endpoint: which zones and nodes should use it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Hints {
    /// `hints.forZones[].name`.
    pub for_zones: Vec<String>,
    /// `hints.forNodes[].name`.
    pub for_nodes: Vec<String>,
}

impl Hints {
    /// The hints of an EndpointSlice endpoint.
    pub fn of(hints: Option<&k8s_openapi::api::discovery::v1::EndpointHints>) -> Self {
        let Some(hints) = hints else { return Hints::default() };
        Hints {
            for_zones: hints.for_zones.iter().flatten().map(|z| z.name.clone()).collect(),
            for_nodes: hints.for_nodes.iter().flatten().map(|n| n.name.clone()).collect(),
        }
    }
}

/// A Service port as served by one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointPort {
    /// The Service port (`spec.ports[].port`).
    pub service_port: u16,
    /// The port on the pod: the IPVS destination port.
    pub target_port: u16,
    /// The transport protocol.
    pub protocol: Protocol,
}

/// The evaluating node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
    /// Node labels.
    pub labels: Labels,
}

/// The label that holds a node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The transport protocol of a Service port (the IPVS crate's type, so that
/// endpoints and virtual services compare directly).
pub use ipvs::Protocol;

/// A Kubernetes protocol name (`TCP` when absent) as a [`Protocol`].
pub fn protocol(name: Option<&str>) -> Result<Protocol, String> {
    match name.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)")),
    }
}

/// Something `from_pods` skipped, for the user to know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The pod.
    pub pod: String,
    /// Why.
    pub reason: String,
}

impl ServiceMeta {
    /// The identity and labels of a WeightedService's Service.
    pub fn of(ws: &WeightedService) -> Self {
        ServiceMeta {
            namespace: ws.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            name: ws.metadata.name.clone().unwrap_or_default(),
            selector: ws.spec.service.selector.clone().unwrap_or_default(),
            labels: ws.metadata.labels.clone().unwrap_or_default(),
            annotations: ws.metadata.annotations.clone().unwrap_or_default(),
        }
    }
}

impl Snapshot {
    /// The snapshot of `ws` as the endpoints controller would derive it from `pods`:
    /// pods in the same namespace that match `spec.selector` and have an IP; ready
    /// from their Ready condition; terminating when they have a deletion timestamp;
    /// one port per Service port, with named target ports resolved through the
    /// pod's container ports (a pod without that port is skipped for it).
    pub fn from_pods(
        ws: &WeightedService,
        pods: &[Pod],
        node: Option<NodeInfo>,
        now: Timestamp,
    ) -> (Snapshot, Vec<Skipped>) {
        let service = ServiceMeta::of(ws);
        let service_ports = ws.spec.service.ports.clone().unwrap_or_default();
        let mut endpoints = Vec::new();
        let mut skipped = Vec::new();
        let mut label_sets = LabelSets::default();
        let mut pods: Vec<&Pod> = pods.iter().collect();
        pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        for pod in pods {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
            let labels = pod.metadata.labels.clone().unwrap_or_default();
            if namespace != service.namespace
                || service.selector.is_empty()
                || !service.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            {
                continue;
            }
            let status = pod.status.as_ref();
            let Some(ip) = status.and_then(|s| s.pod_ip.as_deref()) else {
                skipped.push(Skipped { pod: name, reason: "has no pod IP yet".into() });
                continue;
            };
            let Ok(address) = ip.parse::<IpAddr>() else {
                skipped.push(Skipped { pod: name, reason: format!("pod IP {ip:?} is not an IP address") });
                continue;
            };
            let ready_condition = status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
            let pod_ready = ready_condition.is_some_and(|c| c.status == "True");
            let terminating = pod.metadata.deletion_timestamp.is_some();
            let mut ports = Vec::new();
            for sp in &service_ports {
                match resolve_target_port(sp, pod) {
                    Ok(port) => ports.push(port),
                    Err(reason) => skipped.push(Skipped { pod: name.clone(), reason }),
                }
            }
            if ports.is_empty() && !service_ports.is_empty() {
                continue;
            }
            endpoints.push(Endpoint {
                pod_name: Some(name),
                address,
                node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                zone: None,
                labels: label_sets.share(labels),
                ready: pod_ready && !terminating,
                serving: pod_ready,
                terminating,
                created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
                ready_since: ready_condition
                    .filter(|_| pod_ready)
                    .and_then(|c| c.last_transition_time.as_ref())
                    .map(|t| t.0),
                ports,
                hints: Hints::default(),
            });
        }
        let snapshot = Snapshot {
            service,
            groups: ws.spec.weights.clone(),
            config: ws.policy_config(),
            endpoints,
            node,
            now,
        };
        (snapshot, skipped)
    }
}

/// What the snapshot needs of a pod.
#[derive(Debug, Clone, Default)]
pub struct PodMeta {
    /// The pod's labels (shared by the pods that have the same).
    pub labels: Arc<Labels>,
    /// Its creation time.
    pub created: Option<Timestamp>,
    /// Since when it has been Ready (its Ready condition's transition time),
    /// when the watch carries it (whole pods); `None` from a metadata watch.
    pub ready_since: Option<Timestamp>,
}

/// A snapshot that cannot be built yet: evaluating it would give wrong weights.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Incomplete {
    /// An EndpointSlice names a pod whose metadata has not arrived yet.
    #[error("pod {namespace}/{name} (endpoint {address}) is not known yet")]
    UnknownPod {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
        /// The endpoint's address.
        address: IpAddr,
    },
}

/// Since when each endpoint address has been ready, as this process saw it.
///
/// EndpointSlices carry no times and the agent watches pod metadata only, so
/// the transition is observed: an address seen not ready, then ready, became
/// ready then. An address that is ready the first time it is seen — everything
/// when the process starts, and every endpoint of a Service that appears later
/// (a new WeightedService over a Deployment running for hours) — is taken as
/// ready since its pod's creation (a lower bound: long-running pods count as
/// warm, a pod that was ready as soon as it was created counts from then).
#[derive(Debug, Default)]
pub struct ReadySince {
    /// Since when each address has been ready; `None`: seen, not ready.
    since: HashMap<IpAddr, Option<Timestamp>>,
}

impl ReadySince {
    /// Record what was seen of `address` at `now`; its ready-since time if ready.
    pub fn observe(&mut self, address: IpAddr, ready: bool, created: Option<Timestamp>, now: Timestamp) -> Option<Timestamp> {
        if !ready {
            self.since.insert(address, None);
            return None;
        }
        let since = match self.since.get(&address) {
            Some(Some(since)) => *since,
            // Seen not ready before: it became ready now.
            Some(None) => now,
            // Ready at first sight.
            None => created.unwrap_or(now),
        };
        self.since.insert(address, Some(since));
        Some(since)
    }

    /// The initial state has been seen. (Nothing to do any more: whether an
    /// address was seen before decides; kept for the callers.)
    pub fn mark_started(&mut self) {}

    /// Forget addresses for which `keep` is false.
    pub fn retain(&mut self, keep: impl Fn(&IpAddr) -> bool) {
        self.since.retain(|a, _| keep(a));
    }

    /// Forget addresses none of `slices` has any more: under churn (pods come
    /// and go) the map would grow for ever. An address that comes back later
    /// is new again (ready since its pod's creation), as after a restart.
    pub fn forget_absent<'a>(&mut self, slices: impl IntoIterator<Item = &'a EndpointSlice>) {
        let present: std::collections::HashSet<IpAddr> = slices
            .into_iter()
            .flat_map(|slice| slice.endpoints.iter().flatten())
            .filter_map(|endpoint| endpoint.addresses.first()?.parse().ok())
            .collect();
        self.retain(|address| present.contains(address));
    }
}

/// Hands out one shared map per distinct label set, so that the pods of one
/// ReplicaSet share theirs (and the policy input passes each set once).
#[derive(Debug, Default)]
pub struct LabelSets {
    seen: std::collections::HashSet<Arc<Labels>>,
    /// Changes noted since the last prune (see [`LabelSets::changed`]).
    changes: u64,
}

impl LabelSets {
    /// The shared map equal to `labels`.
    pub fn share(&mut self, labels: Labels) -> Arc<Labels> {
        if let Some(shared) = self.seen.get(&labels) {
            return shared.clone();
        }
        let shared = Arc::new(labels);
        self.seen.insert(shared.clone());
        shared
    }

    /// Forget the maps no one else holds any more.
    pub fn prune(&mut self) {
        self.seen.retain(|labels| Arc::strong_count(labels) > 1);
        self.changes = 0;
    }

    /// Notes one change of the cache that holds these maps, and prunes
    /// after every `every` of them (pruning visits every map).
    pub fn changed(&mut self, every: u64) {
        self.changes += 1;
        if self.changes >= every {
            self.prune();
        }
    }

    /// How many distinct maps are kept.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

impl Snapshot {
    /// The snapshot of `ws` from the cluster's state: its Service, the
    /// EndpointSlices of that Service, and pod metadata (`pod(namespace, name)`).
    /// Endpoints are merged across slices by address; each slice port is matched
    /// to the Service port of the same name and protocol.
    pub fn from_cluster<'a>(
        ws: &WeightedService,
        service: &Service,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        pod: impl Fn(&str, &str) -> Option<PodMeta>,
        node: Option<NodeInfo>,
        now: Timestamp,
        ready_since: &mut ReadySince,
    ) -> Result<Snapshot, Incomplete> {
        let meta = ServiceMeta::of(ws);
        let service_ports: Vec<&ServicePort> = service.spec.iter().flat_map(|s| s.ports.iter().flatten()).collect();
        let mut endpoints: Vec<Endpoint> = Vec::new();
        let mut by_address: HashMap<IpAddr, usize> = HashMap::new();
        for slice in slices {
            if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                continue;
            }
            // (service port, target port, protocol) for each port of this slice.
            let ports: Vec<EndpointPort> = slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    let proto = protocol(p.protocol.as_deref()).ok()?;
                    let target_port = u16::try_from(p.port?).ok()?;
                    let sp = service_ports.iter().find(|sp| {
                        sp.name.as_deref().unwrap_or("") == p.name.as_deref().unwrap_or("")
                            && protocol(sp.protocol.as_deref()).ok() == Some(proto)
                    })?;
                    Some(EndpointPort { service_port: u16::try_from(sp.port).ok()?, target_port, protocol: proto })
                })
                .collect();
            for ep in slice.endpoints.iter().flatten() {
                let Some(address) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                    continue;
                };
                // EndpointSlice semantics: an unknown `ready` is ready, `serving` defaults to `ready`.
                let conditions = ep.conditions.clone().unwrap_or_default();
                let ready = conditions.ready.unwrap_or(true);
                let serving = conditions.serving.unwrap_or(ready);
                let terminating = conditions.terminating.unwrap_or(false);
                if let Some(&i) = by_address.get(&address) {
                    let existing = &mut endpoints[i];
                    for port in &ports {
                        if !existing.ports.contains(port) {
                            existing.ports.push(*port);
                        }
                    }
                    // An address in two slices (it moves between them): the
                    // ready copy wins, whichever slice came first, as in
                    // kube-proxy's EndpointSlice cache.
                    if ready && !terminating && !existing.ready {
                        existing.ready = true;
                        existing.serving = serving;
                        existing.terminating = false;
                        existing.hints = Hints::of(ep.hints.as_ref());
                    }
                    continue;
                }
                let pod_ref = ep.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod"));
                let pod_meta = match pod_ref {
                    Some(r) => {
                        let namespace = r.namespace.clone().unwrap_or_else(|| meta.namespace.clone());
                        let name = r.name.clone().unwrap_or_default();
                        match pod(&namespace, &name) {
                            Some(m) => Some((name, m)),
                            None => return Err(Incomplete::UnknownPod { namespace, name, address }),
                        }
                    }
                    None => None,
                };
                let (pod_name, pod_meta) = match pod_meta {
                    Some((name, m)) => (Some(name), m),
                    None => (None, PodMeta::default()),
                };
                let ready_now = ready && !terminating;
                by_address.insert(address, endpoints.len());
                endpoints.push(Endpoint {
                    pod_name,
                    address,
                    node_name: ep.node_name.clone(),
                    zone: ep.zone.clone(),
                    labels: pod_meta.labels,
                    ready: ready_now,
                    serving,
                    terminating,
                    created: pod_meta.created,
                    // The pod's own word where there is one (the controller's
                    // whole pods); otherwise what this process observed.
                    ready_since: match pod_meta.ready_since {
                        Some(since) if ready_now => Some(since),
                        _ => ready_since.observe(address, ready_now, pod_meta.created, now),
                    },
                    ports: ports.clone(),
                    hints: Hints::of(ep.hints.as_ref()),
                });
            }
        }
        // A stable order: the policy's input, and so its decision, does not depend
        // on the order slices arrived in.
        endpoints.sort_by(|a, b| (&a.pod_name, a.address).cmp(&(&b.pod_name, b.address)));
        Ok(Snapshot {
            service: meta,
            groups: ws.spec.weights.clone(),
            config: ws.policy_config(),
            endpoints,
            node,
            now,
        })
    }

    /// A hash of everything but `now`: equal hashes, equal policy input (for a
    /// policy that does not look at the time).
    pub fn input_hash(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.service.hash(&mut h);
        self.groups.hash(&mut h);
        self.config.hash(&mut h);
        self.endpoints.hash(&mut h);
        self.node.hash(&mut h);
        h.finish()
    }
}

/// The port on `pod` that Service port `sp` sends to: `targetPort` as a number, a
/// name looked up among the pod's container ports (with the same protocol), or
/// `port` when absent — as the Kubernetes endpoints controller resolves it.
pub fn resolve_target_port(sp: &ServicePort, pod: &Pod) -> Result<EndpointPort, String> {
    let protocol = protocol(sp.protocol.as_deref())?;
    let service_port = u16::try_from(sp.port).map_err(|_| format!("service port {} is out of range", sp.port))?;
    let target = match &sp.target_port {
        None | Some(IntOrString::Int(0)) => i32::from(service_port),
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(name)) => pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()) && p.protocol.as_deref().unwrap_or("TCP") == protocol.to_string())
            .map(|p| p.container_port)
            .ok_or_else(|| format!("has no container port named {name:?} for service port {service_port}"))?,
    };
    let target_port = u16::try_from(target).ok().filter(|p| *p != 0).ok_or_else(|| format!("target port {target} is out of range"))?;
    Ok(EndpointPort { service_port, target_port, protocol })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn ws() -> WeightedService {
        serde_saphyr::from_str(
            r#"
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {name: example}
spec:
  selector: {app: demo}
  ports:
  - {protocol: TCP, port: 80, targetPort: www}
  - {protocol: TCP, port: 443, targetPort: 8443}
  - {protocol: UDP, port: 53}
  weights:
  - {weight: 10, selector: {env: prod}}
"#,
        )
        .unwrap()
    }

    const READY_POD: &str = r#"
metadata:
  name: demo-1
  namespace: default
  labels: {app: demo, env: prod}
  creationTimestamp: "2026-01-01T00:00:00Z"
spec:
  nodeName: node-a
  containers:
  - name: demo
    ports:
    - {name: www, containerPort: 8080}
status:
  podIP: 10.1.0.5
  conditions:
  - {type: Ready, status: "True", lastTransitionTime: "2026-01-01T00:01:00Z"}
"#;

    #[test]
    fn ports_resolve_by_number_name_and_default() {
        let (snap, skipped) = Snapshot::from_pods(&ws(), &[pod(READY_POD)], None, Timestamp::UNIX_EPOCH);
        assert!(skipped.is_empty(), "{skipped:?}");
        let ep = &snap.endpoints[0];
        assert_eq!(ep.address.to_string(), "10.1.0.5");
        assert!(ep.ready && ep.serving && !ep.terminating);
        assert_eq!(ep.node_name.as_deref(), Some("node-a"));
        assert_eq!(ep.ready_since.unwrap().to_string(), "2026-01-01T00:01:00Z");
        let ports: Vec<(u16, u16, Protocol)> = ep.ports.iter().map(|p| (p.service_port, p.target_port, p.protocol)).collect();
        assert_eq!(ports, vec![(80, 8080, Protocol::Tcp), (443, 8443, Protocol::Tcp), (53, 53, Protocol::Udp)]);
    }

    #[test]
    fn pods_outside_the_selector_or_namespace_are_not_endpoints() {
        let other_app = READY_POD.replace("app: demo", "app: other");
        let other_ns = READY_POD.replace("namespace: default", "namespace: prod");
        let (snap, _) = Snapshot::from_pods(&ws(), &[pod(&other_app), pod(&other_ns)], None, Timestamp::UNIX_EPOCH);
        assert!(snap.endpoints.is_empty());
    }

    #[test]
    fn ready_since_is_the_pods_creation_at_first_sight_and_now_after_a_seen_transition() {
        let t = |s: i64| Timestamp::from_second(1_767_225_600 + s).unwrap();
        let (a, b): (IpAddr, IpAddr) = ("10.1.0.5".parse().unwrap(), "10.1.0.6".parse().unwrap());
        let mut since = ReadySince::default();
        since.mark_started();
        // A pod running for an hour whose Service the process sees only now: warm.
        assert_eq!(since.observe(a, true, Some(t(-3600)), t(0)), Some(t(-3600)));
        assert_eq!(since.observe(a, true, Some(t(-3600)), t(10)), Some(t(-3600)));
        // A new pod, seen not ready, then ready: since then.
        assert_eq!(since.observe(b, false, Some(t(5)), t(6)), None);
        assert_eq!(since.observe(b, true, Some(t(5)), t(20)), Some(t(20)));
        assert_eq!(since.observe(b, true, Some(t(5)), t(30)), Some(t(20)));
        // Not ready again, and back: from the new transition.
        assert_eq!(since.observe(a, false, Some(t(-3600)), t(40)), None);
        assert_eq!(since.observe(a, true, Some(t(-3600)), t(50)), Some(t(50)));
    }

    #[test]
    fn ready_since_forgets_addresses_no_endpoint_slice_has() {
        let t = |s: i64| Timestamp::from_second(1_767_225_600 + s).unwrap();
        let (kept, gone): (IpAddr, IpAddr) = ("10.1.0.5".parse().unwrap(), "10.1.0.6".parse().unwrap());
        let mut since = ReadySince::default();
        since.observe(kept, true, None, t(0));
        since.observe(gone, true, None, t(0));
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s"}, "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.5"]}],
        }))
        .unwrap();
        since.forget_absent([&slice]);
        // The one still there keeps its time; the one that went is new when it comes back.
        assert_eq!(since.observe(kept, true, None, t(100)), Some(t(0)));
        assert_eq!(since.observe(gone, true, None, t(100)), Some(t(100)));
    }

    #[test]
    fn terminating_and_unready_pods() {
        let terminating = READY_POD.replace("  creationTimestamp", "  deletionTimestamp: \"2026-01-01T01:00:00Z\"\n  creationTimestamp");
        let unready = READY_POD.replace("status: \"True\"", "status: \"False\"").replace("demo-1", "demo-2");
        let (snap, _) = Snapshot::from_pods(&ws(), &[pod(&terminating), pod(&unready)], None, Timestamp::UNIX_EPOCH);
        let t = &snap.endpoints[0];
        assert!(!t.ready && t.serving && t.terminating);
        let u = &snap.endpoints[1];
        assert!(!u.ready && !u.serving && !u.terminating && u.ready_since.is_none());
    }

    #[test]
    fn a_pod_without_the_named_port_is_skipped_for_that_port() {
        let no_www = READY_POD.replace("name: www", "name: web");
        let (snap, skipped) = Snapshot::from_pods(&ws(), &[pod(&no_www)], None, Timestamp::UNIX_EPOCH);
        assert_eq!(snap.endpoints[0].ports.len(), 2);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].reason.contains("\"www\""), "{skipped:?}");
    }

    #[test]
    fn a_pod_without_ip_is_skipped() {
        let no_ip = READY_POD.replace("  podIP: 10.1.0.5\n", "");
        let (snap, skipped) = Snapshot::from_pods(&ws(), &[pod(&no_ip)], None, Timestamp::UNIX_EPOCH);
        assert!(snap.endpoints.is_empty());
        assert!(skipped[0].reason.contains("no pod IP"));
    }
}
