//! Where one WeightedService's weights go on this node: which virtual services
//! belong to its Service, and which destination gets which weight in each.
//!
//! A virtual service holds what kube-proxy puts there (`CategorizeEndpoints`
//! in kube-proxy's `pkg/proxy/topology.go`): the endpoints of its IP family
//! only (each family has its own proxier); behind a ClusterIP, this node's
//! endpoints under `internalTrafficPolicy: Local`; behind external and
//! load-balancer IPs and NodePorts, this node's endpoints under
//! `externalTrafficPolicy: Local`; and otherwise the hinted ones when every
//! ready endpoint has topology hints and one is for this node (or its zone).
//! A NodePort virtual service is matched by the node's own addresses and the
//! node port, never by the port alone: another Service's ClusterIP may use the
//! same number.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipvs::{DesiredService, ServiceEntry, ServiceKey};
use k8s_openapi::api::core::v1::Service;

use crate::snapshot::{protocol, Endpoint, NodeInfo, Protocol, Snapshot};

/// The virtual services and destination weights of one Service on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServicePlan {
    /// The scheduler to set on each of its virtual services; `None` leaves it
    /// (a Service being restored: kube-proxy reverts it on its next sync).
    pub scheduler: Option<String>,
    /// One entry per Service port.
    pub ports: Vec<PortPlan>,
    /// Put back kube-proxy's weight (1) on a Service no WeightedService
    /// controls: only destinations with another non-zero weight are changed,
    /// since a 0 there is kube-proxy draining an endpoint.
    pub restoring: bool,
    /// The Service is labelled for ipvs-operator to serve (standalone mode):
    /// the agent makes its virtual services and destinations itself.
    pub standalone: Option<Standalone>,
}

/// What the agent needs, beyond the weights, to serve a Service itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standalone {
    /// `sessionAffinity: ClientIP`'s timeout in seconds: persistence.
    pub persistence: Option<u32>,
    /// `externalTrafficPolicy: Local`: NodePort and external traffic keeps
    /// its client address (it is not masqueraded).
    pub external_local: bool,
}

/// One Service port: its virtual services and the weights of their destinations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPlan {
    /// TCP, UDP or SCTP.
    pub protocol: Protocol,
    /// The Service port.
    pub port: u16,
    /// The NodePort, if the Service has one.
    pub node_port: Option<u16>,
    /// ClusterIPs (reached from inside the cluster).
    pub cluster_ips: Vec<IpAddr>,
    /// External IPs and VIP-mode load-balancer ingress IPs.
    pub external_ips: Vec<IpAddr>,
    /// The weights behind the ClusterIPs.
    pub internal: Arc<Weights>,
    /// The weights behind external IPs, load-balancer IPs and NodePorts.
    pub external: Arc<Weights>,
}

impl PortPlan {
    /// ClusterIPs, external IPs and load-balancer IPs.
    pub fn addresses(&self) -> impl Iterator<Item = &IpAddr> {
        self.cluster_ips.iter().chain(&self.external_ips)
    }
}

/// Weight per destination (endpoint address and target port), by IP family.
/// Only ready, non-terminating endpoints are here: kube-proxy drains the others.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Weights {
    /// Behind IPv4 virtual services.
    pub ipv4: BTreeMap<SocketAddr, u16>,
    /// Behind IPv6 virtual services.
    pub ipv6: BTreeMap<SocketAddr, u16>,
    /// Ready destinations (of either family) the policy has not weighted
    /// (not evaluated yet on this node, or new since its last good decision).
    /// Behind kube-proxy they are left alone; in a Service the agent serves
    /// itself they keep the kernel's weight, or get kube-proxy's 1 when new.
    pub pending: BTreeSet<SocketAddr>,
}

impl Weights {
    /// The weights behind a virtual service at `address`.
    pub fn of(&self, address: &IpAddr) -> &BTreeMap<SocketAddr, u16> {
        if address.is_ipv4() { &self.ipv4 } else { &self.ipv6 }
    }

    /// Every destination of either family.
    pub fn iter(&self) -> impl Iterator<Item = (&SocketAddr, &u16)> {
        self.ipv4.iter().chain(&self.ipv6)
    }
}

/// Which endpoints kube-proxy uses behind a kind of virtual service.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Every ready endpoint (narrowed by topology hints).
    Cluster,
    /// This node's ready endpoints (a `Local` traffic policy); when this node
    /// has none, `Cluster`'s if `fallback` (kube-proxy's IPVS mode does so,
    /// kubernetes#97081, when the port uses cluster endpoints anyway).
    Local { fallback: bool },
}

impl ServicePlan {
    /// The plan for `service`, whose endpoints are those of `snapshot` and
    /// whose node (for Local policies and topology) is the snapshot's;
    /// `weight_of` gives each endpoint's weight, or `None` to leave it alone.
    pub fn new(
        service: &Service,
        snapshot: &Snapshot,
        scheduler: Option<&str>,
        weight_of: impl Fn(usize, &Endpoint) -> Option<u16>,
    ) -> Self {
        let spec = service.spec.clone().unwrap_or_default();
        let parse = |ips: Vec<String>| -> Vec<IpAddr> {
            let mut out: Vec<IpAddr> = Vec::new();
            // "None" (headless) and "" are not addresses; kube-proxy programs nothing for them.
            for ip in ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()) {
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
            out
        };
        let cluster_ips = parse(spec.cluster_ips.clone().unwrap_or_else(|| spec.cluster_ip.clone().into_iter().collect()));
        // kube-proxy programs an ingress IP only in VIP mode (`ipMode` unset or
        // `VIP`): a `Proxy` load balancer sends its traffic to the NodePorts.
        let ingress_ips = service
            .status
            .iter()
            .flat_map(|s| s.load_balancer.iter())
            .flat_map(|lb| lb.ingress.iter().flatten())
            .filter(|i| i.ip_mode.as_deref().is_none_or(|mode| mode == "VIP"))
            .filter_map(|i| i.ip.clone());
        let mut external_ips = parse(spec.external_ips.clone().unwrap_or_default().into_iter().chain(ingress_ips).collect());
        external_ips.retain(|ip| !cluster_ips.contains(ip));
        let has_node_ports = matches!(spec.type_.as_deref(), Some("NodePort") | Some("LoadBalancer"));
        let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
        // kube-proxy's `UsesClusterEndpoints`: whether some virtual service of
        // a port has the cluster's endpoints.
        let externally_reached = has_node_ports || !external_ips.is_empty();
        let fallback = !internal_local || (externally_reached && !external_local);
        let reach = |local: bool| if local { Reach::Local { fallback } } else { Reach::Cluster };
        let (internal_reach, external_reach) = (reach(internal_local), reach(external_local));
        let node = snapshot.node.as_ref();
        let standalone = super::standalone::serves(service)
            .then(|| Standalone { persistence: super::standalone::affinity_seconds(service), external_local });
        // Serving it, the agent is the proxy: with no ready endpoint it uses
        // the serving and terminating ones, as kube-proxy does.
        let fallback_to_terminating = standalone.is_some();
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|sp| {
                let protocol = protocol(sp.protocol.as_deref()).ok()?;
                let port = u16::try_from(sp.port).ok()?;
                let node_port = sp.node_port.filter(|_| has_node_ports).and_then(|p| u16::try_from(p).ok());
                let weights_for = |reach: Reach| {
                    let mut pending = BTreeSet::new();
                    let mut of = |ipv4| {
                        let ready = weights(snapshot, protocol, port, ipv4, reach, node, &weight_of);
                        if ready.is_empty() && fallback_to_terminating {
                            return terminating(snapshot, protocol, port, ipv4, reach, node);
                        }
                        let mut weighted = BTreeMap::new();
                        for (destination, weight) in ready {
                            match weight {
                                Some(weight) => {
                                    weighted.insert(destination, weight);
                                }
                                None => {
                                    pending.insert(destination);
                                }
                            }
                        }
                        weighted
                    };
                    let (ipv4, ipv6) = (of(true), of(false));
                    Weights { ipv4, ipv6, pending }
                };
                let internal = Arc::new(weights_for(internal_reach));
                let external = if external_reach == internal_reach {
                    internal.clone()
                } else {
                    Arc::new(weights_for(external_reach))
                };
                Some(PortPlan {
                    protocol,
                    port,
                    node_port,
                    cluster_ips: cluster_ips.clone(),
                    external_ips: external_ips.clone(),
                    internal,
                    external,
                })
            })
            .collect();
        ServicePlan { scheduler: scheduler.map(String::from), ports, restoring: false, standalone }
    }

    /// The plan that puts kube-proxy's weight 1 back on `service`'s ready
    /// destinations, leaving its scheduler and any weight 0 alone.
    pub fn restore(service: &Service, snapshot: &Snapshot) -> Self {
        ServicePlan { restoring: true, ..ServicePlan::new(service, snapshot, None, |_, _| Some(1)) }
    }
}

/// The weights of one family's destinations of one Service port that
/// kube-proxy puts behind a virtual service reached as `reach` (`None`:
/// `weight_of` has none for it).
fn weights(
    snapshot: &Snapshot,
    protocol: Protocol,
    port: u16,
    ipv4: bool,
    reach: Reach,
    node: Option<&NodeInfo>,
    weight_of: &impl Fn(usize, &Endpoint) -> Option<u16>,
) -> BTreeMap<SocketAddr, Option<u16>> {
    let has_port = |e: &Endpoint| e.ports.iter().any(|p| p.service_port == port && p.protocol == protocol);
    // Ready endpoints of this port and family (kube-proxy's `IsReady`): the
    // serving-and-terminating ones it falls back to are left alone.
    let ready: Vec<(usize, &Endpoint)> = snapshot
        .endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| e.address.is_ipv4() == ipv4 && e.ready && !e.terminating && has_port(e))
        .collect();
    let on_node = |e: &Endpoint, node: &NodeInfo| e.node_name.as_deref() == Some(node.name.as_str());
    // The local endpoints kube-proxy uses: the ready ones, else the serving
    // and terminating ones (which are left alone).
    let has_local = |node: &NodeInfo| {
        snapshot.endpoints.iter().any(|e| {
            e.address.is_ipv4() == ipv4 && has_port(e) && on_node(e, node) && (e.ready || (e.serving && e.terminating))
        })
    };
    let used: Box<dyn Fn(&Endpoint) -> bool> = match (reach, node) {
        (Reach::Local { fallback }, Some(node)) if has_local(node) || !fallback => {
            Box::new(move |e: &Endpoint| on_node(e, node))
        }
        (_, Some(node)) => topology_filter(ready.iter().map(|(_, e)| *e), node),
        (_, None) => Box::new(|_: &Endpoint| true),
    };
    let mut out = BTreeMap::new();
    for (i, endpoint) in ready.iter().copied().filter(|(_, e)| used(e)) {
        let weight = weight_of(i, endpoint);
        out.extend(destinations(endpoint, protocol, port).map(|d| (d, weight)));
    }
    out
}

/// The destinations of `endpoint` behind Service port `port`: its address at
/// each target port the EndpointSlice resolved for it.
fn destinations(endpoint: &Endpoint, protocol: Protocol, port: u16) -> impl Iterator<Item = SocketAddr> + '_ {
    endpoint
        .ports
        .iter()
        .filter(move |p| p.service_port == port && p.protocol == protocol)
        .map(|p| SocketAddr::new(endpoint.address, p.target_port))
}

/// The serving and terminating endpoints kube-proxy falls back to when no
/// endpoint is ready (the local ones under a `Local` policy), at weight 1:
/// what the agent puts behind a virtual service it serves itself.
fn terminating(
    snapshot: &Snapshot,
    protocol: Protocol,
    port: u16,
    ipv4: bool,
    reach: Reach,
    node: Option<&NodeInfo>,
) -> BTreeMap<SocketAddr, u16> {
    let local_only = match (reach, node) {
        (Reach::Local { .. }, Some(node)) => Some(node.name.as_str()),
        _ => None,
    };
    let mut out = BTreeMap::new();
    for endpoint in snapshot.endpoints.iter().filter(|e| {
        e.address.is_ipv4() == ipv4
            && e.serving
            && e.terminating
            && local_only.is_none_or(|node| e.node_name.as_deref() == Some(node))
    }) {
        out.extend(destinations(endpoint, protocol, port).map(|d| (d, 1)));
    }
    out
}

/// kube-proxy's `topologyModeFromHints`: node hints when every ready
/// endpoint has them and one is for this node, else zone hints when every
/// ready endpoint has them and one is for this node's zone, else none.
fn topology_filter<'e>(ready: impl Iterator<Item = &'e Endpoint> + Clone, node: &NodeInfo) -> Box<dyn Fn(&Endpoint) -> bool> {
    let mut all_node_hints = true;
    let mut for_node = false;
    let mut all_zone_hints = true;
    let mut for_zone = false;
    let zone = node.zone.clone().unwrap_or_default();
    for e in ready {
        if e.hints.for_nodes.is_empty() {
            all_node_hints = false;
        } else if e.hints.for_nodes.contains(&node.name) {
            for_node = true;
        }
        if e.hints.for_zones.is_empty() {
            all_zone_hints = false;
        } else if !zone.is_empty() && e.hints.for_zones.contains(&zone) {
            for_zone = true;
        }
    }
    if all_node_hints && for_node {
        let name = node.name.clone();
        return Box::new(move |e: &Endpoint| e.hints.for_nodes.contains(&name));
    }
    if all_zone_hints && for_zone {
        return Box::new(move |e: &Endpoint| e.hints.for_zones.contains(&zone));
    }
    Box::new(|_: &Endpoint| true)
}

/// Finds which plan (and which of its weights) a virtual service of the kernel belongs to.
pub struct Matcher<'a, K> {
    by_address: HashMap<(Protocol, IpAddr, u16), Match<'a, K>>,
    by_node_port: HashMap<(Protocol, u16), (&'a K, &'a ServicePlan, &'a PortPlan)>,
    node_addresses: &'a HashSet<IpAddr>,
}

/// A virtual service's plan: whose, and what its destinations should weigh.
pub struct Match<'a, K> {
    /// The plan's key.
    pub key: &'a K,
    /// The plan.
    pub plan: &'a ServicePlan,
    /// The weights of this virtual service's destinations.
    pub weights: &'a BTreeMap<SocketAddr, u16>,
}

impl<K> Clone for Match<'_, K> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K> Copy for Match<'_, K> {}

impl<'a, K> Matcher<'a, K> {
    /// An index over `plans`; NodePorts are matched on `node_addresses` only.
    pub fn new(plans: impl IntoIterator<Item = (&'a K, &'a ServicePlan)>, node_addresses: &'a HashSet<IpAddr>) -> Self {
        let mut by_address = HashMap::new();
        let mut by_node_port = HashMap::new();
        for (key, plan) in plans {
            for port in &plan.ports {
                for address in &port.cluster_ips {
                    let weights = port.internal.of(address);
                    by_address.insert((port.protocol, *address, port.port), Match { key, plan, weights });
                }
                for address in &port.external_ips {
                    let weights = port.external.of(address);
                    by_address.insert((port.protocol, *address, port.port), Match { key, plan, weights });
                }
                if let Some(node_port) = port.node_port {
                    by_node_port.insert((port.protocol, node_port), (key, plan, port));
                }
            }
        }
        Matcher { by_address, by_node_port, node_addresses }
    }

    /// The plan and weights of the virtual service `service`, if any.
    pub fn find(&self, service: &ServiceKey) -> Option<Match<'a, K>> {
        let ServiceKey::Address { protocol, address, port } = *service else {
            return None; // kube-proxy never uses fwmark services
        };
        if let Some(m) = self.by_address.get(&(protocol, address, port)) {
            return Some(*m);
        }
        if !self.node_addresses.contains(&address) {
            return None;
        }
        let (key, plan, port) = self.by_node_port.get(&(protocol, port))?;
        Some(Match { key, plan, weights: port.external.of(&address) })
    }
}

/// The desired state of every virtual service in `dump` that belongs to one of
/// `plans`, each with the key of its plan.
pub fn desired<'a, K: 'a>(
    plans: impl IntoIterator<Item = (&'a K, &'a ServicePlan)>,
    node_addresses: &'a HashSet<IpAddr>,
    dump: &[ServiceEntry],
) -> Vec<(&'a K, DesiredService)> {
    let matcher = Matcher::new(plans, node_addresses);
    dump.iter()
        .filter_map(|entry| {
            let m = matcher.find(&entry.service.key)?;
            let mut want = DesiredService::new(entry.service.key);
            want.scheduler = m.plan.scheduler.clone();
            want.weights = if m.plan.restoring {
                // Only where another weight than 0 is: a 0 is kube-proxy draining.
                entry
                    .destinations
                    .iter()
                    .filter(|d| d.weight != 0)
                    .filter_map(|d| Some((d.socket_addr(), *m.weights.get(&d.socket_addr())?)))
                    .collect()
            } else {
                m.weights.clone()
            };
            Some((m.key, want))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::WeightGroup;
    use crate::snapshot::{EndpointPort, Hints, ServiceMeta};
    use ipvs::{Destination, ForwardMethod, Service as VirtualService};
    use k8s_openapi::jiff::Timestamp;

    fn service(yaml: &str) -> Service {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn endpoint(address: &str, ready: bool, terminating: bool, ports: &[(u16, u16)]) -> Endpoint {
        Endpoint {
            pod_name: Some(address.into()),
            address: address.parse().unwrap(),
            node_name: None,
            zone: None,
            labels: Arc::default(),
            ready,
            serving: ready || terminating,
            terminating,
            created: None,
            ready_since: None,
            ports: ports
                .iter()
                .map(|(s, t)| EndpointPort { service_port: *s, target_port: *t, protocol: Protocol::Tcp })
                .collect(),
            hints: Hints::default(),
        }
    }

    fn on(mut e: Endpoint, node: &str, zones: &[&str]) -> Endpoint {
        e.node_name = Some(node.into());
        e.hints.for_zones = zones.iter().map(|z| z.to_string()).collect();
        e
    }

    fn snapshot(endpoints: Vec<Endpoint>) -> Snapshot {
        Snapshot {
            service: ServiceMeta::default(),
            groups: vec![WeightGroup::default()],
            config: "{}".into(),
            endpoints,
            node: Some(NodeInfo { name: "node-1".into(), zone: Some("a".into()), labels: Default::default() }),
            now: Timestamp::UNIX_EPOCH,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const NODE_PORT_SERVICE: &str = r#"
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00::10"]
  externalIPs: [192.0.2.7]
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: www, nodePort: 30080}
  - {name: admin, protocol: TCP, port: 9000, targetPort: 9000, nodePort: 30900}
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.9}, {ip: 198.51.100.10, ipMode: Proxy}, {ip: 198.51.100.11, ipMode: VIP}]
"#;

    #[test]
    fn every_address_and_the_node_port_belong_to_the_service() {
        let snap = snapshot(vec![
            endpoint("10.244.1.5", true, false, &[(80, 8080), (9000, 9000)]),
            endpoint("10.244.1.6", false, true, &[(80, 8080)]),
            endpoint("10.244.1.7", false, false, &[(80, 8080)]),
            endpoint("fd00:244::5", true, false, &[(80, 8080)]),
        ]);
        let plan = ServicePlan::new(&service(NODE_PORT_SERVICE), &snap, Some("wrr"), |i, _| Some(10 + i as u16));
        assert_eq!(plan.ports.len(), 2);
        let http = &plan.ports[0];
        assert_eq!(http.node_port, Some(30080));
        let addresses: Vec<String> = http.addresses().map(ToString::to_string).collect();
        // Not the Proxy-mode ingress IP: kube-proxy makes no virtual service for it.
        assert_eq!(addresses, ["10.96.0.10", "fd00::10", "192.0.2.7", "198.51.100.9", "198.51.100.11"]);
        // Terminating and unready endpoints are kube-proxy's to drain: not in the plan;
        // each family's virtual services get that family's endpoints.
        assert_eq!(http.internal.ipv4, [(addr("10.244.1.5:8080"), 10)].into());
        assert_eq!(http.internal.ipv6, [(addr("[fd00:244::5]:8080"), 13)].into());
        assert!(Arc::ptr_eq(&http.internal, &http.external), "Cluster policies share one set");
        assert_eq!(plan.ports[1].internal.ipv4, [(addr("10.244.1.5:9000"), 10)].into());
        assert!(plan.ports[1].internal.ipv6.is_empty());
    }

    #[test]
    fn a_cluster_ip_service_has_no_node_port_and_headless_has_no_address() {
        let svc = service("metadata: {name: a}\nspec:\n  clusterIP: None\n  ports: [{port: 80, nodePort: 30001}]\n");
        let plan = ServicePlan::new(&svc, &snapshot(vec![]), Some("wrr"), |_, _| Some(1));
        assert_eq!(plan.ports[0].addresses().count(), 0);
        assert_eq!(plan.ports[0].node_port, None);
    }

    #[test]
    fn endpoints_left_alone_are_not_planned() {
        let snap = snapshot(vec![endpoint("10.244.1.5", true, false, &[(80, 8080)])]);
        let plan = ServicePlan::new(&service(NODE_PORT_SERVICE), &snap, Some("wrr"), |_, _| None);
        assert!(plan.ports[0].internal.ipv4.is_empty());
    }

    #[test]
    fn endpoints_left_alone_are_pending_and_only_a_served_service_falls_back_to_terminating_ones() {
        let snap = snapshot(vec![
            endpoint("10.244.1.5", true, false, &[(80, 8080)]),
            endpoint("10.244.1.6", false, true, &[(80, 8080)]),
        ]);
        let plan = ServicePlan::new(&service(NODE_PORT_SERVICE), &snap, Some("wrr"), |_, _| None);
        assert_eq!(plan.ports[0].internal.pending, [addr("10.244.1.5:8080")].into(), "ready, not weighted");
        assert_eq!(plan.standalone, None, "kube-proxy serves it");
        // Only the terminating one left: behind kube-proxy it is left alone;
        // served here it is used at weight 1, as kube-proxy would.
        let terminating_only = snapshot(vec![endpoint("10.244.1.6", false, true, &[(80, 8080)])]);
        let behind_kube_proxy = ServicePlan::new(&service(NODE_PORT_SERVICE), &terminating_only, Some("wrr"), |_, _| Some(5));
        assert!(behind_kube_proxy.ports[0].internal.ipv4.is_empty());
        let labelled = NODE_PORT_SERVICE.replace(
            "metadata: {name: web, namespace: default}",
            "metadata: {name: web, namespace: default, labels: {service.kubernetes.io/service-proxy-name: ipvs-operator}}",
        );
        assert_ne!(labelled, NODE_PORT_SERVICE);
        let served = ServicePlan::new(&service(&labelled), &terminating_only, Some("wrr"), |_, _| Some(5));
        assert_eq!(served.standalone, Some(Standalone { persistence: None, external_local: false }));
        assert_eq!(served.ports[0].internal.ipv4, [(addr("10.244.1.6:8080"), 1)].into());
        let both = ServicePlan::new(&service(&labelled), &snap, Some("wrr"), |_, _| Some(5));
        assert_eq!(both.ports[0].internal.ipv4, [(addr("10.244.1.5:8080"), 5)].into(), "a ready one: terminating ones unused");
    }

    #[test]
    fn local_traffic_policies_keep_this_nodes_endpoints() {
        let snap = snapshot(vec![
            on(endpoint("10.244.1.5", true, false, &[(80, 8080)]), "node-1", &[]),
            on(endpoint("10.244.2.5", true, false, &[(80, 8080)]), "node-2", &[]),
        ]);
        let external_local = service(&NODE_PORT_SERVICE.replace("type: NodePort", "type: NodePort\n  externalTrafficPolicy: Local"));
        let plan = ServicePlan::new(&external_local, &snap, Some("wrr"), |_, _| Some(5));
        let http = &plan.ports[0];
        assert_eq!(http.internal.ipv4.len(), 2, "the ClusterIP keeps every endpoint");
        assert_eq!(http.external.ipv4, [(addr("10.244.1.5:8080"), 5)].into(), "external ones only this node's");
        let internal_local = service(&NODE_PORT_SERVICE.replace("type: NodePort", "type: NodePort\n  internalTrafficPolicy: Local"));
        let plan = ServicePlan::new(&internal_local, &snap, Some("wrr"), |_, _| Some(5));
        assert_eq!(plan.ports[0].internal.ipv4, [(addr("10.244.1.5:8080"), 5)].into());
        assert_eq!(plan.ports[0].external.ipv4.len(), 2);
    }

    #[test]
    fn local_policies_without_local_endpoints_fall_back_as_kube_proxys_ipvs_mode_does() {
        let snap = snapshot(vec![
            on(endpoint("10.244.2.5", true, false, &[(80, 8080)]), "node-2", &[]),
            on(endpoint("10.244.2.6", true, false, &[(80, 8080)]), "node-2", &[]),
        ]);
        let with = |policies: &str| {
            let plan = ServicePlan::new(&service(&NODE_PORT_SERVICE.replace("type: NodePort", policies)), &snap, Some("wrr"), |_, _| Some(5));
            (plan.ports[0].internal.ipv4.len(), plan.ports[0].external.ipv4.len())
        };
        let both_local = "type: NodePort\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local";
        assert_eq!(with("type: NodePort\n  externalTrafficPolicy: Local"), (2, 2), "the ClusterIP uses cluster endpoints");
        assert_eq!(with("type: NodePort\n  internalTrafficPolicy: Local"), (2, 2), "the NodePort uses cluster endpoints");
        assert_eq!(with(both_local), (0, 0), "no port uses cluster endpoints: nothing to fall back to");
        let internal_only = NODE_PORT_SERVICE.split("status:").next().unwrap_or_default().replace("  externalIPs: [192.0.2.7]\n", "");
        let internal_only = service(&internal_only.replace("type: NodePort", "type: ClusterIP\n  internalTrafficPolicy: Local"));
        let plan = ServicePlan::new(&internal_only, &snap, Some("wrr"), |_, _| Some(5));
        assert!(plan.ports[0].internal.ipv4.is_empty(), "not reached from outside: {:?}", plan.ports[0].internal);
        // A local endpoint that is serving and terminating is what kube-proxy uses: no fallback.
        let mut terminating = on(endpoint("10.244.1.5", false, true, &[(80, 8080)]), "node-1", &[]);
        terminating.serving = true;
        let snap = snapshot(vec![terminating, on(endpoint("10.244.2.5", true, false, &[(80, 8080)]), "node-2", &[])]);
        let plan = ServicePlan::new(&service(&NODE_PORT_SERVICE.replace("type: NodePort", "type: NodePort\n  externalTrafficPolicy: Local")), &snap, Some("wrr"), |_, _| Some(5));
        assert!(plan.ports[0].external.ipv4.is_empty(), "{:?}", plan.ports[0].external);
    }

    #[test]
    fn topology_hints_narrow_only_when_every_ready_endpoint_has_them_and_one_is_ours() {
        let svc = service(NODE_PORT_SERVICE);
        let plan_of = |endpoints: Vec<Endpoint>| {
            let plan = ServicePlan::new(&svc, &snapshot(endpoints), Some("wrr"), |_, _| Some(2));
            plan.ports[0].internal.ipv4.keys().map(ToString::to_string).collect::<Vec<_>>()
        };
        let a = || on(endpoint("10.244.1.5", true, false, &[(80, 8080)]), "node-1", &["a"]);
        let b = || on(endpoint("10.244.2.5", true, false, &[(80, 8080)]), "node-2", &["b"]);
        assert_eq!(plan_of(vec![a(), b()]), ["10.244.1.5:8080"], "this node's zone is a");
        let unhinted = on(endpoint("10.244.2.6", true, false, &[(80, 8080)]), "node-2", &[]);
        assert_eq!(plan_of(vec![a(), b(), unhinted]).len(), 3, "one ready endpoint without hints: no topology");
        let unhinted_unready = on(endpoint("10.244.2.6", false, true, &[(80, 8080)]), "node-2", &[]);
        assert_eq!(plan_of(vec![a(), b(), unhinted_unready]), ["10.244.1.5:8080"], "only ready endpoints count");
        assert_eq!(plan_of(vec![b()]), ["10.244.2.5:8080"], "no endpoint for our zone: no topology");
        let mut c = a();
        c.hints.for_nodes = vec!["node-2".into()];
        let mut d = b();
        d.hints.for_nodes = vec!["node-1".into()];
        assert_eq!(plan_of(vec![c, d]), ["10.244.2.5:8080"], "node hints before zone hints");
    }

    #[test]
    fn a_restore_plan_sets_weight_one_leaves_zeros_and_the_scheduler() {
        let snap = snapshot(vec![
            endpoint("10.244.1.5", true, false, &[(80, 8080)]),
            endpoint("10.244.1.6", true, false, &[(80, 8080)]),
            endpoint("10.244.1.7", true, false, &[(80, 8080)]),
        ]);
        let plan = ServicePlan::restore(&service(NODE_PORT_SERVICE), &snap);
        let key = "default/web".to_string();
        let dump = vec![ServiceEntry {
            service: VirtualService::new(ServiceKey::tcp(addr("10.96.0.10:80")), "wrr"),
            destinations: vec![
                Destination::new(addr("10.244.1.5:8080"), ForwardMethod::Masquerade, 10),
                Destination::new(addr("10.244.1.6:8080"), ForwardMethod::Masquerade, 0), // kube-proxy draining it
                Destination::new(addr("10.244.1.7:8080"), ForwardMethod::Masquerade, 1),
                Destination::new(addr("10.244.9.9:8080"), ForwardMethod::Masquerade, 4), // no endpoint of ours
            ],
        }];
        let nowhere = HashSet::new();
        let want = desired([(&key, &plan)], &nowhere, &dump);
        assert_eq!(want.len(), 1);
        assert_eq!(want[0].1.scheduler, None, "kube-proxy reverts the scheduler on its next sync");
        assert_eq!(want[0].1.weights, [(addr("10.244.1.5:8080"), 1), (addr("10.244.1.7:8080"), 1)].into());
    }

    #[test]
    fn kernel_services_are_matched_by_address_or_node_address_and_port() {
        let snap = snapshot(vec![
            endpoint("10.244.1.5", true, false, &[(80, 8080)]),
            endpoint("fd00:244::5", true, false, &[(80, 8080)]),
        ]);
        let plan = ServicePlan::new(&service(NODE_PORT_SERVICE), &snap, Some("wlc"), |_, _| Some(7));
        let key = "default/web".to_string();
        let vs = |a: &str| ServiceEntry {
            service: VirtualService::new(ServiceKey::tcp(addr(a)), "rr"),
            destinations: vec![Destination::new(addr("10.244.1.5:8080"), ForwardMethod::Masquerade, 1)],
        };
        let dump = vec![
            vs("10.96.0.10:80"),
            vs("[fd00::10]:80"),
            vs("172.18.0.2:30080"),   // a node address kube-proxy chose
            vs("[fd00:18::2]:30080"), // and the node's IPv6 one
            vs("10.96.0.99:30080"),   // another Service's ClusterIP on the same port number
            vs("10.96.0.99:80"),      // someone else's
            vs("10.96.0.10:81"),      // not a port of the service
        ];
        let node_addresses: HashSet<IpAddr> = ["172.18.0.2".parse().unwrap(), "fd00:18::2".parse().unwrap()].into();
        let want = desired([(&key, &plan)], &node_addresses, &dump);
        let matched: Vec<String> = want.iter().map(|(_, d)| d.service.to_string()).collect();
        assert_eq!(want.len(), 4, "{matched:?}");
        for (k, d) in &want {
            assert_eq!(*k, &key);
            assert_eq!(d.scheduler.as_deref(), Some("wlc"));
            let v6 = matches!(d.service, ServiceKey::Address { address: IpAddr::V6(_), .. });
            let expected = if v6 { addr("[fd00:244::5]:8080") } else { addr("10.244.1.5:8080") };
            assert_eq!(d.weights, [(expected, 7)].into(), "{}", d.service);
        }
    }
}
