//! The kube-proxy emulator's behaviour, against the test API server and an
//! in-memory IPVS table (the kernel test is `kube_proxy_kernel.rs`, in the VM).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipvs::{ForwardMethod, Protocol, ServiceEntry, ServiceKey};
use ipvs_operator_tests::apiserver::{Config, Grace, NodeConfig, TestApiServer};
use ipvs_operator_tests::kube_proxy::{
    DesiredVirtualService, DualStackProxier, FakeIpvs, InterfaceAddress, IpFamily, KubeProxyEmulator, NodeInfo,
    ProxyConfig, ZONE_LABEL, desired_state, node_port_addresses,
};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

const WAIT: Duration = Duration::from_secs(10);

const MANIFEST: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: a
  labels: {app: web}
  annotations: {test-apiserver.codesink.net/pod-ip: 10.1.0.10}
spec: {nodeName: node-1, containers: [{name: c, image: x, ports: [{name: www, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: b
  labels: {app: web}
  annotations: {test-apiserver.codesink.net/pod-ip: 10.1.0.11}
spec: {nodeName: node-1, containers: [{name: c, image: x, ports: [{name: www, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  externalIPs: [192.0.2.50]
  sessionAffinity: ClientIP
  ports:
  - {name: http, port: 80, targetPort: www}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
"#;

type Shared = Arc<Mutex<FakeIpvs>>;

fn cfg() -> ProxyConfig {
    ProxyConfig {
        node_name: "node-1".into(),
        node_addresses: Some(vec![std::net::IpAddr::from([192, 0, 2, 1])]),
        sync_period: Duration::from_millis(300),
        graceful_check_interval: Duration::from_millis(100),
        ..ProxyConfig::default()
    }
}

fn table(f: &Shared) -> Vec<ServiceEntry> {
    f.lock().map(|f| f.entries.clone()).unwrap_or_default()
}

fn entry(f: &Shared, addr: &str, proto: Protocol) -> Option<ServiceEntry> {
    let key = ServiceKey::new(proto, addr.parse().ok()?);
    table(f).into_iter().find(|e| e.service.key == key)
}

fn dests(e: &ServiceEntry) -> Vec<(String, u32)> {
    let mut d: Vec<(String, u32)> = e.destinations.iter().map(|d| (d.socket_addr().to_string(), d.weight)).collect();
    d.sort();
    d
}

async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every virtual service has both pods as destinations: the
/// EndpointSlices come a moment after the pods, and the emulator follows them.
async fn both_pods_programmed(f: &Shared) {
    eventually("both pods programmed", || {
        let t = table(f);
        (t.len() == 6 && t.iter().all(|e| e.destinations.len() == 2)).then_some(())
    })
    .await;
}

fn edit(f: &Shared, addr: &str, proto: Protocol, change: impl FnOnce(&mut ServiceEntry)) {
    let key = ServiceKey::new(proto, addr.parse().expect("address"));
    if let Ok(mut t) = f.lock()
        && let Some(e) = t.entries.iter_mut().find(|e| e.service.key == key)
    {
        change(e);
    }
}

#[tokio::test]
async fn programs_services_reverts_schedulers_and_resets_weights_on_restart() {
    let server = TestApiServer::start(Config::default()).await.expect("server");
    server.handle().load_manifests(MANIFEST).expect("manifest");
    let svc = server.handle().get("services", "default", "web").expect("service");
    let vip = svc["spec"]["clusterIP"].as_str().expect("clusterIP").to_string();
    let node_port = svc["spec"]["ports"][0]["nodePort"].as_u64().expect("nodePort");
    let fake: Shared = Arc::default();
    let emu = KubeProxyEmulator::start(cfg(), server.client().expect("client"), Box::new(fake.clone()));
    assert!(emu.wait_for_syncs(1, WAIT).await);
    both_pods_programmed(&fake).await;

    let want = vec![("10.1.0.10:8080".to_string(), 1), ("10.1.0.11:8080".to_string(), 1)];
    for addr in [format!("{vip}:80"), "192.0.2.50:80".into(), format!("192.0.2.1:{node_port}")] {
        let e = entry(&fake, &addr, Protocol::Tcp).unwrap_or_else(|| panic!("virtual service {addr}: {:#?}", table(&fake)));
        assert_eq!(e.service.scheduler, "rr");
        assert_eq!((e.service.flags & 1, e.service.timeout), (1, 10_800), "ClientIP affinity: persistent, 3 h");
        assert_eq!(dests(&e), want, "{addr}");
        assert!(e.destinations.iter().all(|d| d.forward == ForwardMethod::Masquerade));
    }
    let udp = entry(&fake, &format!("{vip}:53"), Protocol::Udp).expect("UDP service");
    assert_eq!(dests(&udp), [("10.1.0.10:5353".to_string(), 1), ("10.1.0.11:5353".to_string(), 1)]);
    assert_eq!(table(&fake).len(), 6, "ClusterIP, external IP and NodePort for each of two ports");

    // Someone changes the scheduler and a weight: the next sync reverts the
    // scheduler, and leaves the weight (kube-proxy resets weights only at start).
    let http = format!("{vip}:80");
    edit(&fake, &http, Protocol::Tcp, |e| {
        e.service.scheduler = "wrr".into();
        e.destinations[0].weight = 5;
    });
    let n = emu.status().syncs;
    emu.sync_now();
    assert!(emu.wait_for_syncs(n + 1, WAIT).await);
    let e = entry(&fake, &http, Protocol::Tcp).expect("service");
    assert_eq!(e.service.scheduler, "rr", "scheduler reverted");
    assert!(dests(&e).iter().any(|(_, w)| *w == 5), "weights untouched by a later sync: {:?}", dests(&e));

    // The periodic sync alone (no change, no request) reverts too.
    edit(&fake, &http, Protocol::Tcp, |e| e.service.scheduler = "wlc".into());
    eventually("the periodic sync", || (entry(&fake, &http, Protocol::Tcp)?.service.scheduler == "rr").then_some(())).await;

    emu.stop().await.expect("stop");
    let emu = KubeProxyEmulator::start(cfg(), server.client().expect("client"), Box::new(fake.clone()));
    assert!(emu.wait_for_syncs(1, WAIT).await);
    assert_eq!(dests(&entry(&fake, &http, Protocol::Tcp).expect("service")), want, "restart resets weights to 1");

    // A deleted Service takes its virtual services with it.
    let client = server.client().expect("client");
    kube::Api::<k8s_openapi::api::core::v1::Service>::namespaced(client, "default")
        .delete("web", &Default::default())
        .await
        .expect("delete service");
    eventually("virtual services deleted", || table(&fake).is_empty().then_some(())).await;
    emu.stop().await.expect("stop");
}

#[tokio::test]
async fn drains_tcp_destinations_with_connections_and_falls_back_to_terminating_endpoints() {
    let server = TestApiServer::start(Config::default()).await.expect("server");
    server.handle().load_manifests(MANIFEST).expect("manifest");
    let vip = server.handle().get("services", "default", "web").expect("service")["spec"]["clusterIP"]
        .as_str()
        .expect("clusterIP")
        .to_string();
    let (http, dns) = (format!("{vip}:80"), format!("{vip}:53"));
    let fake: Shared = Arc::default();
    let emu = KubeProxyEmulator::start(cfg(), server.client().expect("client"), Box::new(fake.clone()));
    assert!(emu.wait_for_syncs(1, WAIT).await);
    both_pods_programmed(&fake).await;

    // Pod a has connections on both ports; it leaves the ready set.
    for (addr, proto) in [(&http, Protocol::Tcp), (&dns, Protocol::Udp)] {
        edit(&fake, addr, proto, |e| {
            for d in &mut e.destinations {
                if d.address.to_string() == "10.1.0.10" {
                    d.active_connections = 2;
                }
            }
        });
    }
    server.handle().set_pod_ready("default", "a", false).expect("unready");
    eventually("TCP destination drained at weight 0", || {
        let e = entry(&fake, &http, Protocol::Tcp)?;
        (dests(&e) == [("10.1.0.10:8080".to_string(), 0), ("10.1.0.11:8080".to_string(), 1)]).then_some(())
    })
    .await;
    let udp = entry(&fake, &dns, Protocol::Udp).expect("UDP service");
    assert_eq!(dests(&udp), [("10.1.0.11:5353".to_string(), 1)], "UDP deleted at once, connections or not");

    // Its connections end: the graceful-termination check deletes it.
    edit(&fake, &http, Protocol::Tcp, |e| e.destinations.iter_mut().for_each(|d| d.active_connections = 0));
    eventually("drained destination deleted", || {
        (dests(&entry(&fake, &http, Protocol::Tcp)?) == [("10.1.0.11:8080".to_string(), 1)]).then_some(())
    })
    .await;

    // Back to ready: added afresh with weight 1.
    server.handle().set_pod_ready("default", "a", true).expect("ready");
    eventually("destination back", || (entry(&fake, &http, Protocol::Tcp)?.destinations.len() == 2).then_some(())).await;

    // Both pods terminating but serving: with no ready endpoint, kube-proxy uses them.
    server.handle().delete_pod("default", "a", Grace::UntilFinished).expect("terminate a");
    server.handle().delete_pod("default", "b", Grace::UntilFinished).expect("terminate b");
    let n = emu.status().syncs;
    emu.sync_now();
    assert!(emu.wait_for_syncs(n + 1, WAIT).await);
    let e = entry(&fake, &http, Protocol::Tcp).expect("service");
    assert_eq!(dests(&e), [("10.1.0.10:8080".to_string(), 1), ("10.1.0.11:8080".to_string(), 1)]);
    // One finishes: a connection-less destination goes at once.
    server.handle().finish_pod_termination("default", "b").expect("finish b");
    eventually("b deleted", || (dests(&entry(&fake, &http, Protocol::Tcp)?) == [("10.1.0.10:8080".to_string(), 1)]).then_some(())).await;
    emu.stop().await.expect("stop");
}

// Service topologies, on `desired_state` and the proxiers directly (no API
// server): what each IP family's proxier wants for one node.

/// Services and EndpointSlices from YAML documents.
fn objects(yaml: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
    let (mut services, mut slices) = (Vec::new(), Vec::new());
    for v in serde_saphyr::from_multiple::<serde_json::Value>(yaml).expect("YAML") {
        match v.get("kind").and_then(serde_json::Value::as_str) {
            Some("Service") => services.push(serde_json::from_value(v).expect("a Service")),
            Some("EndpointSlice") => slices.push(serde_json::from_value(v).expect("an EndpointSlice")),
            other => panic!("unexpected kind {other:?}"),
        }
    }
    (services, slices)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// A config for `node`, NodePorts on the given addresses.
fn node_cfg(node: &str, addresses: &[&str]) -> ProxyConfig {
    ProxyConfig { node_name: node.into(), node_addresses: Some(addresses.iter().map(|a| ip(a)).collect()), ..cfg() }
}

/// A node in `zone` (none when empty).
fn in_zone(zone: &str) -> NodeInfo {
    let labels = BTreeMap::from([(ZONE_LABEL.to_string(), zone.to_string())]);
    NodeInfo { labels: if zone.is_empty() { BTreeMap::new() } else { labels }, ..NodeInfo::default() }
}

type Desired = BTreeMap<ServiceKey, DesiredVirtualService>;

/// The destinations of TCP virtual service `addr`, as strings.
fn want(d: &Desired, addr: &str) -> Vec<String> {
    let key = ServiceKey::tcp(addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}")));
    let vs = d.get(&key).unwrap_or_else(|| panic!("no virtual service {addr} in {:#?}", d.keys().collect::<Vec<_>>()));
    vs.destinations.iter().map(ToString::to_string).collect()
}

fn addresses(d: &Desired) -> Vec<String> {
    d.values().filter_map(|v| v.service.address()).map(|a| a.to_string()).collect()
}

const DUAL_STACK: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv6, IPv4]
  clusterIP: "fd00:10:96::10"
  clusterIPs: ["fd00:10:96::10", 10.96.0.10]
  externalIPs: [192.0.2.50, "2001:db8::50"]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.7}, {ip: "2001:db8::7"}, {ip: 198.51.100.8, ipMode: Proxy}]
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: default}
spec:
  clusterIP: 10.96.0.11
  ports: [{port: 81, targetPort: 8081}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v4, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.1.0.10], nodeName: node-1}
- {addresses: [10.1.0.20], nodeName: node-2}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: ["fd00:1::10"], nodeName: node-1}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: legacy-x, namespace: default, labels: {kubernetes.io/service-name: legacy}}
addressType: IPv4
ports: [{name: "", port: 8081, protocol: TCP}]
endpoints:
- {addresses: [10.1.0.10, 10.1.0.99], nodeName: node-1}
"#;

#[test]
fn each_family_proxier_sees_only_its_family() {
    let (svcs, slices) = objects(DUAL_STACK);
    let cfg = node_cfg("node-1", &["192.0.2.1", "2001:db8::1"]);
    let node = NodeInfo::default();
    let v4 = desired_state(&cfg, IpFamily::V4, &node, &svcs, &slices);
    assert_eq!(
        addresses(&v4),
        ["10.96.0.10:80", "10.96.0.11:81", "192.0.2.1:30080", "192.0.2.50:80", "198.51.100.7:80"],
        "ClusterIPs, the external IP, the VIP-mode load-balancer IP and the NodePort of IPv4"
    );
    let web4 = ["10.1.0.10:8080", "10.1.0.20:8080"];
    for vs in ["10.96.0.10:80", "192.0.2.50:80", "198.51.100.7:80", "192.0.2.1:30080"] {
        assert_eq!(want(&v4, vs), web4, "{vs}");
    }
    assert_eq!(want(&v4, "10.96.0.11:81"), ["10.1.0.10:8081"], "an endpoint's first address only");
    let v6 = desired_state(&cfg, IpFamily::V6, &node, &svcs, &slices);
    assert_eq!(addresses(&v6), ["[2001:db8::1]:30080", "[2001:db8::7]:80", "[2001:db8::50]:80", "[fd00:10:96::10]:80"]);
    for vs in v6.values() {
        assert_eq!(vs.destinations.iter().map(ToString::to_string).collect::<Vec<_>>(), ["[fd00:1::10]:8080"]);
    }

    // Both proxiers on one table: every virtual service holds its own family only.
    let mut table = FakeIpvs::default();
    let report = DualStackProxier::new(cfg).sync(&mut table, &svcs, &slices, &node).expect("sync");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!((report.services, table.entries.len()), (9, 9));
    for e in &table.entries {
        let family = e.service.family();
        assert!(e.destinations.iter().all(|d| d.family() == family), "{e:?}");
        assert!(!e.destinations.is_empty(), "{e:?}");
    }
}

#[test]
fn each_proxier_deletes_its_familys_virtual_services_no_service_wants_except_excluded_ones() {
    let (svcs, slices) = objects(DUAL_STACK);
    let cfg = ProxyConfig { exclude_cidrs: vec!["172.16.0.0/16".parse().expect("CIDR")], ..node_cfg("node-1", &[]) };
    let stray = |addr: &str| ServiceEntry {
        service: ipvs::Service::new(ServiceKey::tcp(addr.parse().expect("address")), "rr"),
        destinations: vec![],
    };
    let fwmark = ipvs::Service::new(ServiceKey::Fwmark { family: ipvs::AddressFamily::Inet, mark: 7 }, "rr");
    let mut table = FakeIpvs {
        entries: vec![
            stray("10.200.0.1:80"),
            stray("[2001:db8::99]:80"),
            stray("172.16.0.1:80"),
            ServiceEntry { service: fwmark, destinations: vec![] },
        ],
    };
    let mut proxier = DualStackProxier::new(cfg);
    proxier.sync(&mut table, &svcs, &slices, &NodeInfo::default()).expect("sync");
    let left: Vec<String> = table.entries.iter().map(|e| format!("{:?}", e.service.key)).collect();
    assert!(!left.iter().any(|k| k.contains("10.200.0.1") || k.contains("2001:db8::99")), "{left:?}");
    assert!(left.iter().any(|k| k.contains("172.16.0.1")), "--ipvs-exclude-cidrs keeps it: {left:?}");
    assert!(left.iter().any(|k| k.contains("Fwmark")), "fwmark services stay: {left:?}");
}

const POLICIES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  clusterIP: 10.96.0.10
  externalIPs: [192.0.2.50]
  ports: [{name: http, port: 80, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.7}]}}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: default}
spec:
  internalTrafficPolicy: Local
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  internalTrafficPolicy: Local
  clusterIP: 10.96.0.30
  ports: [{name: http, port: 80, nodePort: 30081}]
---
apiVersion: v1
kind: Service
metadata: {name: inside, namespace: default}
spec:
  externalTrafficPolicy: Local
  clusterIP: 10.96.0.40
  ports: [{name: http, port: 80}]
"#;

/// One slice per Service of [`POLICIES`]: `node-1` has 10.1.0.10 (in the
/// given state), `node-2` 10.1.0.20 and 10.1.0.30 has no node.
fn policy_slices(local_ready: bool) -> Vec<EndpointSlice> {
    ["web", "api", "np", "inside"]
        .iter()
        .flat_map(|svc| {
            let (ready, terminating) = if local_ready { (true, false) } else { (false, true) };
            objects(&format!(
                r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {svc}-1, namespace: default, labels: {{kubernetes.io/service-name: {svc}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- {{addresses: [10.1.0.10], nodeName: node-1,
   conditions: {{ready: {ready}, serving: true, terminating: {terminating}}}}}
- {{addresses: [10.1.0.20], nodeName: node-2}}
- {{addresses: [10.1.0.30]}}
"#
            ))
            .1
        })
        .collect()
}

/// What the IPv4 proxier of `node` wants for [`POLICIES`].
fn policies_on(node: &str, local_ready: bool) -> Desired {
    let (svcs, _) = objects(POLICIES);
    let cfg = node_cfg(node, &["192.0.2.1"]);
    desired_state(&cfg, IpFamily::V4, &NodeInfo::default(), &svcs, &policy_slices(local_ready))
}

#[test]
fn external_traffic_policy_local_keeps_this_nodes_endpoints_on_external_addresses_only() {
    let all = ["10.1.0.10:8080", "10.1.0.20:8080", "10.1.0.30:8080"];
    let d = policies_on("node-1", true);
    assert_eq!(want(&d, "10.96.0.10:80"), all, "the ClusterIP: every endpoint");
    for vs in ["192.0.2.50:80", "198.51.100.7:80", "192.0.2.1:30080"] {
        assert_eq!(want(&d, vs), ["10.1.0.10:8080"], "{vs}: this node's endpoints");
    }
    assert_eq!(want(&d, "10.96.0.40:80"), all, "externalTrafficPolicy means nothing without external access");

    // This node's endpoint terminating but serving: the local ones fall back to it,
    // while the cluster's are the ready ones.
    let d = policies_on("node-1", false);
    assert_eq!(want(&d, "10.96.0.10:80"), ["10.1.0.20:8080", "10.1.0.30:8080"]);
    assert_eq!(want(&d, "192.0.2.1:30080"), ["10.1.0.10:8080"]);

    // No endpoint on this node: kube-proxy's IPVS mode uses the cluster's
    // endpoints for external traffic too (kubernetes#97081).
    let d = policies_on("node-3", true);
    for vs in ["192.0.2.50:80", "198.51.100.7:80", "192.0.2.1:30080"] {
        assert_eq!(want(&d, vs), all, "{vs}");
    }
}

#[test]
fn internal_traffic_policy_local_keeps_this_nodes_endpoints_on_the_cluster_ip() {
    let all = ["10.1.0.10:8080", "10.1.0.20:8080", "10.1.0.30:8080"];
    let d = policies_on("node-1", true);
    assert_eq!(want(&d, "10.96.0.20:80"), ["10.1.0.10:8080"]);
    assert_eq!(want(&d, "10.96.0.30:80"), ["10.1.0.10:8080"]);
    assert_eq!(want(&d, "192.0.2.1:30081"), all, "externalTrafficPolicy Cluster: the NodePort has every endpoint");

    // No endpoint on this node: a ClusterIP-only Service has none to fall back
    // to; one that also takes external traffic falls back to the cluster's.
    let d = policies_on("node-3", true);
    assert!(want(&d, "10.96.0.20:80").is_empty());
    assert_eq!(want(&d, "10.96.0.30:80"), all);
}

/// A NodePort Service whose endpoints have the given hints: `(last octet,
/// node, ready, zone hints, node hints)`.
fn hinted(endpoints: &[(u8, &str, bool, &[&str], &[&str])]) -> (Vec<Service>, Vec<EndpointSlice>) {
    let list = |names: &[&str]| names.iter().map(|n| format!("{{name: {n}}}")).collect::<Vec<_>>().join(", ");
    let eps: String = endpoints
        .iter()
        .map(|(last, node, ready, zones, nodes)| {
            let mut hints = Vec::new();
            if !zones.is_empty() {
                hints.push(format!("forZones: [{}]", list(zones)));
            }
            if !nodes.is_empty() {
                hints.push(format!("forNodes: [{}]", list(nodes)));
            }
            let hints = if hints.is_empty() { String::new() } else { format!(", hints: {{{}}}", hints.join(", ")) };
            format!("- {{addresses: [10.1.0.{last}], nodeName: {node}, conditions: {{ready: {ready}}}{hints}}}\n")
        })
        .collect();
    objects(&format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  trafficDistribution: PreferSameZone
  ports: [{{name: http, port: 80, nodePort: 30080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
{eps}"#
    ))
}

/// The ClusterIP's and the NodePort's destinations (the same under hints),
/// as last octets.
fn hinted_dests(node: &str, zone: &str, objs: &(Vec<Service>, Vec<EndpointSlice>)) -> Vec<String> {
    let d = desired_state(&node_cfg(node, &["192.0.2.1"]), IpFamily::V4, &in_zone(zone), &objs.0, &objs.1);
    let cluster_ip = want(&d, "10.96.0.10:80");
    assert_eq!(cluster_ip, want(&d, "192.0.2.1:30080"));
    cluster_ip.iter().map(|a| a.trim_start_matches("10.1.0.").trim_end_matches(":8080").to_string()).collect()
}

#[test]
fn zone_hints_filter_only_when_every_ready_endpoint_has_one_and_one_is_for_this_zone() {
    let (a, b) = (&["zone-a"][..], &["zone-b"][..]);
    let zonal = hinted(&[(10, "node-1", true, a, &[]), (20, "node-2", true, b, &[]), (30, "node-3", true, a, &[])]);
    assert_eq!(hinted_dests("node-1", "zone-a", &zonal), ["10", "30"]);
    assert_eq!(hinted_dests("node-2", "zone-b", &zonal), ["20"]);
    assert_eq!(hinted_dests("node-4", "zone-c", &zonal), ["10", "20", "30"], "no hint for this zone: all");
    assert_eq!(hinted_dests("node-4", "", &zonal), ["10", "20", "30"], "a node without a zone: all");

    let one_unhinted =
        hinted(&[(10, "node-1", true, a, &[]), (20, "node-2", true, b, &[]), (40, "node-4", true, &[], &[])]);
    assert_eq!(hinted_dests("node-1", "zone-a", &one_unhinted), ["10", "20", "40"], "a ready endpoint without hints");
    let unready_unhinted =
        hinted(&[(10, "node-1", true, a, &[]), (20, "node-2", true, b, &[]), (40, "node-4", false, &[], &[])]);
    assert_eq!(hinted_dests("node-1", "zone-a", &unready_unhinted), ["10"], "only ready endpoints count");
}

#[test]
fn node_hints_filter_before_zone_hints_when_every_ready_endpoint_has_one() {
    let by_node = hinted(&[
        (10, "node-1", true, &["zone-a"], &["node-1"]),
        (20, "node-2", true, &["zone-a"], &["node-2"]),
        (30, "node-3", true, &["zone-b"], &["node-3"]),
    ]);
    assert_eq!(hinted_dests("node-1", "zone-a", &by_node), ["10"]);
    assert_eq!(hinted_dests("node-4", "zone-a", &by_node), ["10", "20"], "no hint for this node: zone hints");
    assert_eq!(hinted_dests("node-4", "zone-c", &by_node), ["10", "20", "30"]);

    let one_without_node_hint = hinted(&[
        (10, "node-1", true, &["zone-a"], &["node-1"]),
        (20, "node-2", true, &["zone-a"], &["node-2"]),
        (30, "node-3", true, &["zone-b"], &[]),
    ]);
    assert_eq!(hinted_dests("node-1", "zone-a", &one_without_node_hint), ["10", "20"], "node hints off, zone hints on");
}

#[test]
fn node_ports_live_on_interface_addresses_but_loopback_link_local_and_the_dummy_interfaces() {
    let interfaces = [
        ("lo", "127.0.0.1"),
        ("lo", "::1"),
        ("eth0", "192.0.2.1"),
        ("eth0", "2001:db8::1"),
        ("eth0", "fe80::1"),
        ("kube-ipvs0", "10.96.0.10"),
        ("kube-ipvs0", "fd00:10:96::10"),
        ("veth-pod", "169.254.1.1"),
    ];
    let node = NodeInfo {
        interfaces: interfaces.iter().map(|(i, a)| InterfaceAddress::new(*i, ip(a))).collect(),
        ..NodeInfo::default()
    };
    let picked = |cidrs: &[&str], family| -> Vec<String> {
        let cfg = ProxyConfig {
            node_addresses: None,
            nodeport_addresses: cidrs.iter().map(|c| c.parse().expect("CIDR")).collect(),
            ..ProxyConfig::default()
        };
        node_port_addresses(&cfg, family, &node).iter().map(ToString::to_string).collect()
    };
    // IPv4 link-local is an address like any other to kube-proxy.
    assert_eq!(picked(&[], IpFamily::V4), ["169.254.1.1", "192.0.2.1"]);
    assert_eq!(picked(&[], IpFamily::V6), ["2001:db8::1"]);
    assert_eq!(picked(&["192.0.2.0/24"], IpFamily::V4), ["192.0.2.1"]);
    assert_eq!(picked(&["192.0.2.0/24"], IpFamily::V6), ["2001:db8::1"], "no IPv6 CIDR: every IPv6 node address");
    assert_eq!(picked(&["192.0.2.0/24", "::/0"], IpFamily::V6), ["2001:db8::1"]);
    assert_eq!(picked(&["198.51.100.0/24"], IpFamily::V4), Vec::<String>::new());
    assert_eq!(picked(&["127.0.0.0/8", "192.0.2.1/32"], IpFamily::V4), ["192.0.2.1"], "never loopback");
    // With CIDRs kube-proxy (GetNodeIPs) keeps what they cover, link-local and dummy addresses too.
    assert_eq!(picked(&["fe80::/10"], IpFamily::V6), ["fe80::1"]);
    assert_eq!(picked(&["10.96.0.0/12"], IpFamily::V4), ["10.96.0.10"]);

    // The same through desired_state; an external IP that is a node address is not bound.
    let (svcs, slices) = objects(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  externalIPs: [192.0.2.1, 192.0.2.50]
  ports: [{port: 80, nodePort: 30080}]
"#,
    );
    let cfg = ProxyConfig { dummy_interface: Some("kube-ipvs0".into()), ..ProxyConfig::default() };
    let d = desired_state(&cfg, IpFamily::V4, &node, &svcs, &slices);
    let node_ports = ["169.254.1.1:30080", "192.0.2.1:30080"];
    assert_eq!(addresses(&d), ["10.96.0.10:80", node_ports[0], "192.0.2.1:80", node_ports[1], "192.0.2.50:80"]);
    let bound: Vec<String> =
        d.values().filter(|v| v.bind).filter_map(|v| v.service.address()).map(|a| a.ip().to_string()).collect();
    assert_eq!(bound, ["10.96.0.10", "192.0.2.50"]);
}

#[test]
fn services_kube_proxy_does_not_proxy_get_no_virtual_services() {
    let (svcs, slices) = objects(
        r#"
apiVersion: v1
kind: Service
metadata: {name: own, namespace: default, labels: {service.kubernetes.io/service-proxy-name: ipvs-operator}}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: default}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec: {type: ExternalName, externalName: example.com, clusterIP: "", ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: pending, namespace: default}
spec: {ports: [{port: 80}]}
"#,
    );
    let d = desired_state(&node_cfg("node-1", &["192.0.2.1"]), IpFamily::V4, &NodeInfo::default(), &svcs, &slices);
    assert!(d.is_empty(), "{d:#?}");
}

#[tokio::test]
async fn the_zone_comes_from_this_nodes_node_object() {
    let server = TestApiServer::start(Config::default()).await.expect("server");
    let zoned = |zone: &str| NodeConfig {
        name: "node-1".into(),
        address: ip("192.0.2.1"),
        labels: BTreeMap::from([(ZONE_LABEL.to_string(), zone.to_string())]),
    };
    server.handle().add_node(&zoned("zone-a")).expect("node");
    server
        .handle()
        .load_manifests(
            r#"
apiVersion: v1
kind: Service
metadata: {name: zonal}
spec: {ports: [{name: http, port: 80}]}
"#,
        )
        .expect("service");
    let vip = server.handle().get("services", "default", "zonal").expect("service")["spec"]["clusterIP"]
        .as_str()
        .expect("clusterIP")
        .to_string();
    let (_, slices) = hinted(&[(10, "node-1", true, &["zone-a"], &[]), (20, "node-2", true, &["zone-b"], &[])]);
    let mut slice = slices.into_iter().next().expect("a slice");
    slice.metadata.labels = Some(BTreeMap::from([("kubernetes.io/service-name".to_string(), "zonal".to_string())]));
    slice.metadata.name = Some("zonal-1".into());
    kube::Api::<EndpointSlice>::namespaced(server.client().expect("client"), "default")
        .create(&Default::default(), &slice)
        .await
        .expect("create the EndpointSlice");
    // Configured labels count only while there is no Node: this one says zone-a.
    let cfg = ProxyConfig { node_labels: BTreeMap::from([(ZONE_LABEL.to_string(), "zone-b".to_string())]), ..cfg() };
    let fake: Shared = Arc::default();
    let emu = KubeProxyEmulator::start(cfg, server.client().expect("client"), Box::new(fake.clone()));
    let vs = format!("{vip}:80");
    let only = |dest: &str| dests(&entry(&fake, &vs, Protocol::Tcp)?).eq(&[(dest.to_string(), 1)]).then_some(());
    eventually("zone-a's endpoint only", || only("10.1.0.10:8080")).await;
    server.handle().add_node(&zoned("zone-b")).expect("relabel the node");
    eventually("zone-b's endpoint only", || only("10.1.0.20:8080")).await;
    emu.stop().await.expect("stop");
}
