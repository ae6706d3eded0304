//! Where one WeightedService's weights go on this node: which virtual services
//! belong to its Service, and which destination gets which weight.
//!
//! kube-proxy decides which virtual services exist (every ClusterIP, each
//! externalIP and LoadBalancer ingress IP, and a NodePort on each node address
//! it chose); the agent follows what is in the kernel rather than guessing
//! kube-proxy's choice of node addresses: a virtual service on a Service's
//! NodePort at any address not otherwise known is that Service's NodePort.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use ipvs::{DesiredService, ServiceEntry, ServiceKey};
use k8s_openapi::api::core::v1::Service;

use crate::snapshot::{protocol, Endpoint, Protocol, Snapshot};

/// The virtual services and destination weights of one Service on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServicePlan {
    /// The scheduler to set on each of its virtual services.
    pub scheduler: String,
    /// One entry per Service port.
    pub ports: Vec<PortPlan>,
}

/// One Service port: its virtual services and the weights of its destinations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPlan {
    /// TCP, UDP or SCTP.
    pub protocol: Protocol,
    /// The Service port.
    pub port: u16,
    /// The NodePort, if the Service has one.
    pub node_port: Option<u16>,
    /// ClusterIPs, externalIPs and LoadBalancer ingress IPs.
    pub addresses: Vec<IpAddr>,
    /// Weight per destination (endpoint address and target port). Only ready,
    /// non-terminating endpoints are here: kube-proxy drains the others.
    pub weights: BTreeMap<SocketAddr, u16>,
}

impl ServicePlan {
    /// The plan for `service`, whose endpoints are those of `snapshot`;
    /// `weight_of` gives each endpoint's weight, or `None` to leave it alone.
    pub fn new(
        service: &Service,
        snapshot: &Snapshot,
        scheduler: &str,
        weight_of: impl Fn(usize, &Endpoint) -> Option<u16>,
    ) -> Self {
        let spec = service.spec.clone().unwrap_or_default();
        let mut addresses: Vec<IpAddr> = Vec::new();
        let cluster_ips = spec.cluster_ips.clone().unwrap_or_else(|| spec.cluster_ip.clone().into_iter().collect());
        // kube-proxy programs an ingress IP only in VIP mode (`ipMode` unset or
        // `VIP`): a `Proxy` load balancer sends its traffic to the NodePorts.
        let ingress_ips = service
            .status
            .iter()
            .flat_map(|s| s.load_balancer.iter())
            .flat_map(|lb| lb.ingress.iter().flatten())
            .filter(|i| i.ip_mode.as_deref().is_none_or(|mode| mode == "VIP"))
            .filter_map(|i| i.ip.clone());
        for ip in cluster_ips.into_iter().chain(spec.external_ips.clone().unwrap_or_default()).chain(ingress_ips) {
            // "None" (headless) and "" are not addresses; kube-proxy programs nothing for them.
            if let Ok(ip) = ip.parse::<IpAddr>()
                && !addresses.contains(&ip)
            {
                addresses.push(ip);
            }
        }
        let has_node_ports = matches!(spec.type_.as_deref(), Some("NodePort") | Some("LoadBalancer"));
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|sp| {
                let protocol = protocol(sp.protocol.as_deref()).ok()?;
                let port = u16::try_from(sp.port).ok()?;
                let node_port = sp.node_port.filter(|_| has_node_ports).and_then(|p| u16::try_from(p).ok());
                let mut weights = BTreeMap::new();
                for (i, endpoint) in snapshot.endpoints.iter().enumerate() {
                    if !endpoint.ready || endpoint.terminating {
                        continue;
                    }
                    let Some(weight) = weight_of(i, endpoint) else { continue };
                    for ep in endpoint.ports.iter().filter(|p| p.service_port == port && p.protocol == protocol) {
                        weights.insert(SocketAddr::new(endpoint.address, ep.target_port), weight);
                    }
                }
                Some(PortPlan { protocol, port, node_port, addresses: addresses.clone(), weights })
            })
            .collect();
        ServicePlan { scheduler: scheduler.into(), ports }
    }
}

/// Finds which plan (and port) a virtual service of the kernel belongs to.
pub struct Matcher<'a, K> {
    by_address: HashMap<(Protocol, IpAddr, u16), Match<'a, K>>,
    by_node_port: HashMap<(Protocol, u16), Match<'a, K>>,
}

/// A virtual service's plan: whose, and which port.
pub struct Match<'a, K> {
    /// The plan's key.
    pub key: &'a K,
    /// The plan.
    pub plan: &'a ServicePlan,
    /// The Service port.
    pub port: &'a PortPlan,
}

impl<K> Clone for Match<'_, K> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K> Copy for Match<'_, K> {}

impl<'a, K> Matcher<'a, K> {
    /// An index over `plans`.
    pub fn new(plans: impl IntoIterator<Item = (&'a K, &'a ServicePlan)>) -> Self {
        let mut by_address = HashMap::new();
        let mut by_node_port = HashMap::new();
        for (key, plan) in plans {
            for port in &plan.ports {
                let m = Match { key, plan, port };
                for address in &port.addresses {
                    by_address.insert((port.protocol, *address, port.port), m);
                }
                if let Some(node_port) = port.node_port {
                    by_node_port.insert((port.protocol, node_port), m);
                }
            }
        }
        Matcher { by_address, by_node_port }
    }

    /// The plan and port of the virtual service `service`, if any.
    pub fn find(&self, service: &ServiceKey) -> Option<Match<'a, K>> {
        let ServiceKey::Address { protocol, address, port } = *service else {
            return None; // kube-proxy never uses fwmark services
        };
        self.by_address
            .get(&(protocol, address, port))
            .or_else(|| self.by_node_port.get(&(protocol, port)))
            .copied()
    }
}

/// The desired state of every virtual service in `dump` that belongs to one of
/// `plans`, each with the key of its plan.
pub fn desired<'a, K: 'a>(
    plans: impl IntoIterator<Item = (&'a K, &'a ServicePlan)>,
    dump: &[ServiceEntry],
) -> Vec<(&'a K, DesiredService)> {
    let matcher = Matcher::new(plans);
    dump.iter()
        .filter_map(|entry| {
            let m = matcher.find(&entry.service.key)?;
            let mut want = DesiredService::new(entry.service.key).with_scheduler(m.plan.scheduler.clone());
            want.weights = m.port.weights.clone();
            Some((m.key, want))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::WeightGroup;
    use crate::snapshot::{EndpointPort, ServiceMeta};
    use ipvs::{Destination, ForwardMethod, Service as VirtualService};
    use k8s_openapi::jiff::Timestamp;
    use std::sync::Arc;

    fn service(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).unwrap()
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
        }
    }

    fn snapshot(endpoints: Vec<Endpoint>) -> Snapshot {
        Snapshot {
            service: ServiceMeta::default(),
            groups: vec![WeightGroup::default()],
            config: "{}".into(),
            endpoints,
            node: None,
            now: Timestamp::UNIX_EPOCH,
        }
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
        ]);
        let plan = ServicePlan::new(&service(NODE_PORT_SERVICE), &snap, "wrr", |i, _| Some(10 + i as u16));
        assert_eq!(plan.ports.len(), 2);
        let http = &plan.ports[0];
        assert_eq!(http.node_port, Some(30080));
        let addresses: Vec<String> = http.addresses.iter().map(ToString::to_string).collect();
        // Not the Proxy-mode ingress IP: kube-proxy makes no virtual service for it.
        assert_eq!(addresses, ["10.96.0.10", "fd00::10", "192.0.2.7", "198.51.100.9", "198.51.100.11"]);
        // Terminating and unready endpoints are kube-proxy's to drain: not in the plan.
        assert_eq!(http.weights, [("10.244.1.5:8080".parse().unwrap(), 10)].into());
        assert_eq!(plan.ports[1].weights, [("10.244.1.5:9000".parse().unwrap(), 10)].into());
    }

    #[test]
    fn a_cluster_ip_service_has_no_node_port_and_headless_has_no_address() {
        let svc = service("metadata: {name: a}\nspec:\n  clusterIP: None\n  ports: [{port: 80, nodePort: 30001}]\n");
        let plan = ServicePlan::new(&svc, &snapshot(vec![]), "wrr", |_, _| Some(1));
        assert!(plan.ports[0].addresses.is_empty());
        assert_eq!(plan.ports[0].node_port, None);
    }

    #[test]
    fn endpoints_left_alone_are_not_planned() {
        let snap = snapshot(vec![endpoint("10.244.1.5", true, false, &[(80, 8080)])]);
        let plan = ServicePlan::new(&service(NODE_PORT_SERVICE), &snap, "wrr", |_, _| None);
        assert!(plan.ports[0].weights.is_empty());
    }

    #[test]
    fn kernel_services_are_matched_by_address_or_node_port() {
        let snap = snapshot(vec![endpoint("10.244.1.5", true, false, &[(80, 8080)])]);
        let plan = ServicePlan::new(&service(NODE_PORT_SERVICE), &snap, "wlc", |_, _| Some(7));
        let key = "default/web".to_string();
        let vs = |addr: &str| ServiceEntry {
            service: VirtualService::new(ServiceKey::tcp(addr.parse().unwrap()), "rr"),
            destinations: vec![Destination::new("10.244.1.5:8080".parse().unwrap(), ForwardMethod::Masquerade, 1)],
        };
        let dump = vec![
            vs("10.96.0.10:80"),
            vs("[fd00::10]:80"),
            vs("172.18.0.2:30080"), // a node address kube-proxy chose
            vs("10.96.0.99:80"),    // someone else's
            vs("10.96.0.10:81"),    // not a port of the service
        ];
        let plans = [(&key, &plan)];
        let want = desired(plans, &dump);
        let matched: Vec<String> = want.iter().map(|(_, d)| format!("{:?}", d.service)).collect();
        assert_eq!(want.len(), 3, "{matched:?}");
        for (k, d) in &want {
            assert_eq!(*k, &key);
            assert_eq!(d.scheduler.as_deref(), Some("wlc"));
            assert_eq!(d.weights, [("10.244.1.5:8080".parse().unwrap(), 7)].into());
        }
    }
}
