//! Dual-stack Services end to end, on a real kernel's IPVS in the test VM:
//! pods with an IPv4 and an IPv6 address (network namespaces answering on
//! both), a Service with `ipFamilyPolicy: PreferDualStack` (an IPv4 and an
//! IPv6 ClusterIP, one EndpointSlice per family), the kube-proxy emulator's
//! IPv4 and IPv6 virtual services, and real connections over IPv6 from the
//! client.
//!
//! `make test-kernel` runs this in the VM (tests/vm), as it runs e2e.rs.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipvs_operator_tests::testbed::{
    dual_stack_pod_manifest, wait_until, Testbed, TestbedConfig, NODE_IP, NODE_IP6, NODE_NAME,
};

const TIMEOUT: Duration = Duration::from_secs(90);

/// The pods: name, group, IPv4 and IPv6 address.
const PODS: [(&str, &str, &str, &str); 2] = [
    ("web-prod-1", "prod", "10.244.9.21", "fd00:10:244::9:21"),
    ("web-canary-1", "canary", "10.244.9.22", "fd00:10:244::9:22"),
];

fn pods() -> String {
    PODS.iter()
        .map(|(name, env, ip, ip6)| dual_stack_pod_manifest(name, &[("app", "web"), ("env", env)], NODE_NAME, ip, ip6))
        .collect()
}

/// A plain dual-stack NodePort Service in front of the pods.
const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  ipFamilyPolicy: PreferDualStack
  selector: {app: web}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: www}]
"#;

/// The same as a WeightedService: prod weight 3, canary weight 1.
const WEIGHTED: &str = r#"
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  ipFamilyPolicy: PreferDualStack
  selector: {app: web}
  ports: [{name: http, protocol: TCP, port: 80, targetPort: www}]
  scheduler: wrr
  weights:
  - {weight: 3, selector: {env: prod}}
  - {weight: 1, selector: {env: canary}}
"#;

/// The pods' addresses of one family, with the target port, by pod name.
fn destinations(ipv6: bool) -> BTreeMap<SocketAddr, &'static str> {
    PODS.iter()
        .map(|(name, _, ip, ip6)| (SocketAddr::new(if ipv6 { ip6 } else { ip }.parse().unwrap(), 8080), *name))
        .collect()
}

/// The kernel's weights on `vs`, by destination, once it has a virtual service there.
fn weights(bed: &Testbed, vs: SocketAddr) -> Option<BTreeMap<SocketAddr, u32>> {
    let entry = bed.ipvs().into_iter().find(|e| e.service.address() == Some(vs))?;
    Some(entry.destinations.iter().map(|d| (d.socket_addr(), d.weight)).collect())
}

/// The Service's node port.
fn node_port(bed: &Testbed, name: &str) -> u16 {
    wait_until(TIMEOUT, "a node port", || {
        let service = bed.get("services", "default", name)?;
        u16::try_from(service["spec"]["ports"][0]["nodePort"].as_u64()?).ok()
    })
}

/// Every virtual service of the dual-stack Service `name`: both ClusterIPs and
/// the NodePort on the node's IPv4 and IPv6 address, each with whether it is IPv6.
fn virtual_services(bed: &Testbed, name: &str) -> Vec<(SocketAddr, bool)> {
    let ip6 = IpAddr::V6(bed.cluster_ip6("default", name));
    let ips = bed.cluster_ips("default", name);
    assert!(ips.iter().any(IpAddr::is_ipv4) && ips.contains(&ip6), "the Service's ClusterIPs: {ips:?}");
    let port = node_port(bed, name);
    let mut out: Vec<(SocketAddr, bool)> = ips.iter().map(|ip| (SocketAddr::new(*ip, 80), ip.is_ipv6())).collect();
    out.push((SocketAddr::new(IpAddr::V4(NODE_IP), port), false));
    out.push((SocketAddr::new(IpAddr::V6(NODE_IP6), port), true));
    out
}

/// kube-proxy alone: the IPv6 ClusterIP's virtual service has the pods' IPv6
/// addresses, and connections to it, and to the IPv6 NodePort, reach both pods
/// over IPv6 — as those to the IPv4 ClusterIP and NodePort do over IPv4.
#[test]
fn connections_to_the_ipv6_cluster_ip_of_a_dual_stack_service_reach_both_pods() {
    let mut bed = Testbed::new(TestbedConfig::default());
    bed.load(&(pods() + "---" + SERVICE));
    bed.start_emulator();
    for (vs, ipv6) in virtual_services(&bed, "web") {
        let expected: BTreeMap<SocketAddr, u32> = destinations(ipv6).into_keys().map(|d| (d, 1)).collect();
        wait_until(TIMEOUT, &format!("kube-proxy's virtual service {vs} with the pods' {} addresses", family(ipv6)), || {
            (weights(&bed, vs)? == expected).then_some(())
        });
        let counts = bed.connect(vs, 200);
        // kube-proxy's scheduler here is rr: one connection each in turn.
        for (_, pod) in destinations(ipv6) {
            let n = counts.get(pod).copied().unwrap_or(0);
            assert!((90..=110).contains(&n), "{pod} answered {n} of 200 connections to {vs}: {counts:?}");
        }
    }
}

/// The controller copies `ipFamilyPolicy` to the Service it makes, and the
/// agent sets the weights on the IPv6 virtual services as on the IPv4 ones:
/// connections over IPv6 split 3:1 too.
#[test]
fn a_dual_stack_weighted_service_splits_ipv6_connections_as_weighted() {
    let mut bed = Testbed::new(TestbedConfig { proxy_scheduler: "wrr".into(), ..TestbedConfig::default() });
    bed.load(&(pods() + "---" + WEIGHTED));
    bed.start_all();
    for (vs, ipv6) in virtual_services(&bed, "web") {
        let expected: BTreeMap<SocketAddr, u32> =
            destinations(ipv6).into_iter().map(|(d, pod)| (d, if pod.contains("canary") { 1 } else { 3 })).collect();
        wait_until(TIMEOUT, &format!("the agent's weights on {vs}"), || (weights(&bed, vs)? == expected).then_some(()));
        let counts = bed.connect(vs, 400);
        let canary = counts.iter().filter(|(pod, _)| pod.contains("canary")).map(|(_, n)| n).sum::<usize>();
        let share = canary as f64 / 400.0;
        assert!((share - 0.25).abs() <= 0.02, "canary got {:.1}% of the connections to {vs}: {counts:?}", share * 100.0);
    }
}

fn family(ipv6: bool) -> &'static str {
    if ipv6 { "IPv6" } else { "IPv4" }
}
