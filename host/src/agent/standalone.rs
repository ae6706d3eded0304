//! Standalone mode (`spec.proxy: ipvs-operator`): the agent serves the
//! Service itself, on clusters whose kube-proxy is not in IPVS mode (or has
//! none). The controller labels the Service
//! `service.kubernetes.io/service-proxy-name: ipvs-operator`, which kube-proxy
//! in every mode and the common replacements skip, and every agent makes the
//! Service's virtual services whole: this module says which, from the same
//! [`ServicePlan`] that decides the weights behind kube-proxy's.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use ipvs::constants::IP_VS_SVC_F_PERSISTENT;
use ipvs::{OwnedService, Service as VirtualService, ServiceKey};
use k8s_openapi::api::core::v1::Service;

use super::plan::{ServicePlan, Standalone, Weights};
use crate::crd::{DEFAULT_SCHEDULER, PROXY_NAME, SERVICE_PROXY_NAME_LABEL};
use crate::snapshot::Protocol;

/// The dummy interface that holds standalone Services' addresses, as
/// kube-proxy's `kube-ipvs0` holds those it serves.
pub const INTERFACE: &str = "ipvs-op0";

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when absent (Kubernetes' default: 3 hours).
pub const DEFAULT_AFFINITY_SECONDS: u32 = 10_800;

/// Whether `service` is labelled for the agents to serve:
/// `service.kubernetes.io/service-proxy-name: ipvs-operator`, which kube-proxy
/// (every mode) honours by leaving the Service alone.
pub fn serves(service: &Service) -> bool {
    service.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL)).is_some_and(|v| v == PROXY_NAME)
}

/// `sessionAffinity: ClientIP`'s timeout, or `None` without affinity.
pub fn affinity_seconds(service: &Service) -> Option<u32> {
    let spec = service.spec.as_ref()?;
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let configured = spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref()).and_then(|c| c.timeout_seconds);
    Some(configured.and_then(|s| u32::try_from(s).ok()).filter(|s| *s > 0).unwrap_or(DEFAULT_AFFINITY_SECONDS))
}

fn key(protocol: Protocol, address: IpAddr, port: u16) -> ServiceKey {
    ServiceKey::new(protocol, SocketAddr::new(address, port))
}

/// Every virtual service of a Service the agent serves on this node, whole:
/// per port, one at each ClusterIP, external and load-balancer IP (with the
/// weights `plan` gives behind each), and with a NodePort one at each of
/// `node_addresses` of the family (with the external weights); the scheduler
/// the plan names (`wrr` when none); `ClientIP` affinity as persistence with
/// its timeout. A destination the policy has not weighted keeps the weight
/// `current` (the kernel's) gives it, or gets kube-proxy's 1.
pub fn virtual_services(
    plan: &ServicePlan,
    standalone: Standalone,
    node_addresses: &BTreeSet<IpAddr>,
    current: impl Fn(&ServiceKey, &SocketAddr) -> Option<u16>,
) -> Vec<OwnedService> {
    let scheduler = plan.scheduler.clone().unwrap_or_else(|| DEFAULT_SCHEDULER.to_string());
    let make = |key: ServiceKey, weights: &Weights, address: &IpAddr| {
        let mut service = VirtualService::new(key, scheduler.clone());
        if let Some(seconds) = standalone.persistence {
            service.flags = IP_VS_SVC_F_PERSISTENT;
            service.timeout = seconds;
        }
        let mut destinations = weights.of(address).clone();
        for pending in weights.pending.iter().filter(|d| d.is_ipv4() == address.is_ipv4()) {
            destinations.insert(*pending, current(&key, pending).unwrap_or(1));
        }
        OwnedService { service, destinations }
    };
    let mut out = Vec::new();
    for port in &plan.ports {
        for address in &port.cluster_ips {
            out.push(make(key(port.protocol, *address, port.port), &port.internal, address));
        }
        for address in &port.external_ips {
            out.push(make(key(port.protocol, *address, port.port), &port.external, address));
        }
        if let Some(node_port) = port.node_port {
            for address in node_addresses {
                out.push(make(key(port.protocol, *address, node_port), &port.external, address));
            }
        }
    }
    // One virtual service per key: a Service listing an address twice gets one.
    let mut seen = BTreeSet::new();
    out.retain(|v| seen.insert(v.service.key));
    out
}

/// The addresses `plan`'s virtual services need on [`INTERFACE`]: its
/// ClusterIPs, external and load-balancer IPs (NodePorts use the node's own).
pub fn interface_addresses(plan: &ServicePlan) -> BTreeSet<IpAddr> {
    plan.ports.iter().flat_map(|p| p.addresses().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::plan::PortPlan;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn service(yaml: &str) -> Service {
        serde_saphyr::from_str(yaml).expect("a Service")
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("a socket address")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    fn plan() -> ServicePlan {
        let internal = Weights {
            ipv4: [(addr("10.244.1.5:8080"), 90), (addr("10.244.2.5:8080"), 10)].into(),
            ipv6: [(addr("[fd00:244::5]:8080"), 1)].into(),
            pending: [addr("10.244.3.5:8080")].into(),
        };
        let external = Weights { ipv4: [(addr("10.244.1.5:8080"), 90)].into(), ..Weights::default() };
        ServicePlan {
            scheduler: None,
            ports: vec![PortPlan {
                protocol: Protocol::Tcp,
                port: 80,
                node_port: Some(30080),
                cluster_ips: vec![ip("10.96.0.10"), ip("fd00::10")],
                external_ips: vec![ip("192.0.2.7")],
                internal: Arc::new(internal),
                external: Arc::new(external),
            }],
            restoring: false,
            standalone: Some(Standalone::default()),
        }
    }

    #[test]
    fn each_address_and_node_address_gets_a_virtual_service_with_its_weights() {
        let nodes: BTreeSet<IpAddr> = [ip("192.168.1.10"), ip("fd00:1::10")].into();
        // The kernel has the pending destination at 7 behind the ClusterIP only.
        let current = |key: &ServiceKey, d: &SocketAddr| {
            (*key == ServiceKey::tcp(addr("10.96.0.10:80")) && *d == addr("10.244.3.5:8080")).then_some(7)
        };
        let virtual_services = virtual_services(&plan(), Standalone::default(), &nodes, current);
        let found: BTreeMap<String, (String, Vec<(SocketAddr, u16)>)> = virtual_services
            .iter()
            .map(|v| {
                let ServiceKey::Address { address, port, .. } = v.service.key else { panic!("{v:?}") };
                let dests = v.destinations.iter().map(|(a, w)| (*a, *w)).collect();
                (SocketAddr::new(address, port).to_string(), (v.service.scheduler.clone(), dests))
            })
            .collect();
        let internal4 = vec![(addr("10.244.1.5:8080"), 90), (addr("10.244.2.5:8080"), 10), (addr("10.244.3.5:8080"), 7)];
        let external4 = vec![(addr("10.244.1.5:8080"), 90)];
        assert_eq!(found["10.96.0.10:80"], ("wrr".into(), internal4));
        assert_eq!(found["[fd00::10]:80"].1, [(addr("[fd00:244::5]:8080"), 1)]);
        assert_eq!(found["192.0.2.7:80"].1, external4, "external IPs: the external weights");
        assert_eq!(found["192.168.1.10:30080"].1, external4, "NodePorts too");
        assert_eq!(found["[fd00:1::10]:30080"].1, [], "no IPv6 endpoint outside");
        assert_eq!(found.len(), 5);
        assert!(virtual_services.iter().all(|v| v.service.flags == 0 && v.service.timeout == 0), "no affinity");
        let on_interface: Vec<IpAddr> = interface_addresses(&plan()).into_iter().collect();
        assert_eq!(on_interface, [ip("10.96.0.10"), ip("192.0.2.7"), ip("fd00::10")], "not the node's own");
    }

    #[test]
    fn only_services_labelled_for_ipvs_operator_are_served() {
        let labelled = |value: &str| {
            service(&format!("{{metadata: {{name: web, labels: {{service.kubernetes.io/service-proxy-name: {value}}}}}}}"))
        };
        assert!(serves(&labelled("ipvs-operator")));
        assert!(!serves(&labelled("cilium")), "another proxy's");
        assert!(!serves(&service("{metadata: {name: web}}")));
    }

    #[test]
    fn client_ip_affinity_is_persistence_with_its_timeout() {
        let default = service("{metadata: {name: web}, spec: {sessionAffinity: ClientIP}}");
        let set = service("{metadata: {name: web}, spec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}}}");
        let none = service("{metadata: {name: web}, spec: {sessionAffinity: None}}");
        assert_eq!((affinity_seconds(&default), affinity_seconds(&set), affinity_seconds(&none)), (Some(10_800), Some(60), None));
        let mut plan = plan();
        plan.scheduler = Some("sh".into());
        let standalone = Standalone { persistence: affinity_seconds(&set), ..Standalone::default() };
        for v in virtual_services(&plan, standalone, &BTreeSet::new(), |_, _| None) {
            assert_eq!((v.service.flags, v.service.timeout, v.service.scheduler.as_str()), (IP_VS_SVC_F_PERSISTENT, 60, "sh"));
        }
    }
}
