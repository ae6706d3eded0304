//! kube-proxy's endpoint choice for one Service port (`pkg/proxy/topology.go`):
//! `CategorizeEndpoints`, `topologyModeFromHints` and `availableForTopology`,
//! and the IPVS proxier's use of the result in `syncEndpoint`.

use std::collections::BTreeSet;
use std::net::SocketAddr;

/// An endpoint of one Service port, as kube-proxy's EndpointSlice cache keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The first address of the endpoint with the slice's port for this Service port.
    pub addr: SocketAddr,
    /// `conditions.ready` (unset means ready).
    pub ready: bool,
    /// `conditions.serving` (unset means serving).
    pub serving: bool,
    /// `conditions.terminating` (unset means not).
    pub terminating: bool,
    /// Whether its `nodeName` is this node's.
    pub local: bool,
    /// `hints.forZones` names.
    pub zone_hints: BTreeSet<String>,
    /// `hints.forNodes` names.
    pub node_hints: BTreeSet<String>,
}

/// Which endpoints topology hints leave to this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologyMode {
    /// No topology: every ready endpoint.
    None,
    /// `PreferSameZone`: the endpoints hinted for this node's zone.
    PreferSameZone,
    /// `PreferSameNode`: the endpoints hinted for this node.
    PreferSameNode,
}

/// `topologyModeFromHints`: over the ready endpoints, PreferSameNode if every
/// one has node hints and one is for this node; else PreferSameZone if every
/// one has zone hints and one is for this node's zone; else none.
pub fn topology_mode(endpoints: &[Endpoint], node: &str, zone: &str) -> TopologyMode {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return TopologyMode::None;
    }
    if ready.iter().all(|e| !e.node_hints.is_empty()) && ready.iter().any(|e| e.node_hints.contains(node)) {
        return TopologyMode::PreferSameNode;
    }
    if ready.iter().all(|e| !e.zone_hints.is_empty()) && ready.iter().any(|e| e.zone_hints.contains(zone)) {
        return TopologyMode::PreferSameZone;
    }
    TopologyMode::None
}

/// `availableForTopology`.
fn available(e: &Endpoint, mode: TopologyMode, node: &str, zone: &str) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => e.node_hints.contains(node),
        TopologyMode::PreferSameZone => e.zone_hints.contains(zone),
    }
}

/// What a Service port's traffic policies ask of `CategorizeEndpoints`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PortPolicy {
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local` on an externally accessible Service
    /// (`apiservice.ExternalPolicyLocal`).
    pub external_local: bool,
    /// The port has a NodePort, or external or load-balancer IPs of the
    /// proxier's family (`ServicePort.ExternallyAccessible`).
    pub externally_accessible: bool,
}

impl PortPolicy {
    /// `UsesClusterEndpoints`.
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_local || self.externally_accessible
    }

    /// `UsesLocalEndpoints`.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_local || (self.external_local && self.externally_accessible)
    }
}

/// The endpoints `CategorizeEndpoints` returns for one Service port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Categorized {
    /// Cluster-policy endpoints: ready ones available for topology, else the
    /// serving-and-terminating ones (empty when the port never uses them).
    pub cluster: BTreeSet<SocketAddr>,
    /// Local-policy endpoints: ready ones on this node, else this node's
    /// serving-and-terminating ones (empty when the port never uses them).
    pub local: BTreeSet<SocketAddr>,
}

impl Categorized {
    /// The destinations `syncEndpoint` gives a virtual service: the local
    /// endpoints when `only_local` and there are some, else the cluster
    /// endpoints — kube-proxy's IPVS mode falls back to them when a Local
    /// policy finds no local endpoint (kubernetes#97081), which is empty
    /// unless the port also uses cluster endpoints.
    pub fn for_virtual_service(&self, only_local: bool) -> &BTreeSet<SocketAddr> {
        if only_local && !self.local.is_empty() { &self.local } else { &self.cluster }
    }
}

/// `CategorizeEndpoints` for a port with `policy` on node `node` in `zone`.
pub fn categorize(endpoints: &[Endpoint], policy: PortPolicy, node: &str, zone: &str) -> Categorized {
    let pick = |f: &dyn Fn(&Endpoint) -> bool| -> BTreeSet<SocketAddr> {
        endpoints.iter().filter(|e| f(e)).map(|e| e.addr).collect()
    };
    let mut out = Categorized::default();
    if policy.uses_cluster_endpoints() {
        let mode = topology_mode(endpoints, node, zone);
        out.cluster = pick(&|e| e.ready && available(e, mode, node, zone));
        if out.cluster.is_empty() {
            out.cluster = pick(&|e| e.serving && e.terminating);
        }
    }
    if policy.uses_local_endpoints() {
        out.local = pick(&|e| e.local && e.ready);
        if out.local.is_empty() {
            out.local = pick(&|e| e.local && !e.ready && e.serving && e.terminating);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(last: u8, ready: bool, local: bool, zones: &[&str], nodes: &[&str]) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([10, 1, 0, last], 8080)),
            ready,
            serving: true,
            terminating: !ready,
            local,
            zone_hints: zones.iter().map(|z| z.to_string()).collect(),
            node_hints: nodes.iter().map(|n| n.to_string()).collect(),
        }
    }

    fn addrs(lasts: &[u8]) -> BTreeSet<SocketAddr> {
        lasts.iter().map(|l| SocketAddr::from(([10, 1, 0, *l], 8080))).collect()
    }

    #[test]
    fn node_hints_win_over_zone_hints_when_every_ready_endpoint_has_one() {
        let eps =
            [ep(1, true, true, &["a"], &["n1"]), ep(2, true, false, &["a"], &["n2"]), ep(3, false, false, &[], &[])];
        assert_eq!(topology_mode(&eps, "n1", "a"), TopologyMode::PreferSameNode, "unready endpoints do not count");
        assert_eq!(topology_mode(&eps, "n3", "a"), TopologyMode::PreferSameZone, "no node hint for n3: zones");
        assert_eq!(topology_mode(&eps, "n3", "b"), TopologyMode::None);
        let c = categorize(&eps, PortPolicy::default(), "n1", "a");
        assert_eq!(c.cluster, addrs(&[1]));
        assert!(c.local.is_empty(), "a Cluster-only port computes no local endpoints");
    }

    #[test]
    fn local_endpoints_fall_back_to_local_serving_terminating_ones() {
        let eps = [ep(1, false, true, &[], &[]), ep(2, true, false, &[], &[]), ep(3, false, false, &[], &[])];
        let policy = PortPolicy { internal_local: true, ..PortPolicy::default() };
        let c = categorize(&eps, policy, "n1", "");
        assert_eq!(c.local, addrs(&[1]));
        assert!(c.cluster.is_empty(), "internal Local without external access uses no cluster endpoints");
        assert_eq!(c.for_virtual_service(true), &addrs(&[1]));
    }
}
