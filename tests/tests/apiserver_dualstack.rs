//! The test API server as a dual-stack cluster with topology hints, and its
//! lagging-watch fault, through kube-rs: Services get the families their
//! `ipFamilyPolicy` asks for (a single-stack cluster refuses
//! `RequireDualStack`), pods get an address of each family, the EndpointSlice
//! controller writes a set of slices per family and the hints
//! `trafficDistribution` asks for, and a lagged client's watch falls behind
//! another's while its reads stay current.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use ipvs_operator_tests::apiserver::{Config, NodeConfig, TestApiServer, WatchLag};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

type Slices = Vec<EndpointSlice>;
type Arrivals = tokio::sync::mpsc::UnboundedReceiver<(String, tokio::time::Instant)>;

fn config_map(name: &str) -> ConfigMap {
    ConfigMap { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, ..Default::default() }
}

/// The 422 (or other refusal) a write got.
fn refusal<T: std::fmt::Debug>(r: kube::Result<T>) -> kube::core::Status {
    match r {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn service(name: &str, spec: Value) -> Service {
    let mut full = json!({"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]});
    for (k, v) in spec.as_object().into_iter().flatten() {
        full[k] = v.clone();
    }
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": full}))
        .expect("a Service")
}

fn families_and_ips(svc: &Service) -> (Vec<String>, Vec<String>, Option<String>) {
    let spec = svc.spec.clone().unwrap_or_default();
    (spec.ip_families.unwrap_or_default(), spec.cluster_ips.unwrap_or_default(), spec.ip_family_policy)
}

fn is_v6(ip: &str) -> bool {
    ip.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_ipv6())
}

/// Two pods of app `web`, one on each node.
const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-a, labels: {app: web}}
spec: {nodeName: node-a, containers: [{name: web, image: nginx, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, labels: {app: web}}
spec: {nodeName: node-b, containers: [{name: web, image: nginx, ports: [{containerPort: 8080}]}]}
"#;

/// A dual-stack cluster (the default) of two nodes in two zones.
async fn zoned_server() -> TestApiServer {
    let nodes = vec![
        NodeConfig::new("node-a", "192.0.2.1".parse().expect("ip")).with_zone("zone-a"),
        NodeConfig::new("node-b", "192.0.2.2".parse().expect("ip")).with_zone("zone-b"),
    ];
    TestApiServer::start(Config { nodes, ..Config::default() }).await.expect("server starts")
}

/// The slices of Service `name` once `done` holds for them.
async fn slices_when(client: &Client, name: &str, what: &str, done: impl Fn(&[EndpointSlice]) -> bool) -> Slices {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={name}"));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let items = api.list(&lp).await.expect("list slices").items;
        if done(&items) {
            return items;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {items:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn eps(slice: &EndpointSlice) -> &[Endpoint] {
    slice.endpoints.as_deref().unwrap_or_default()
}

fn endpoint_count(slices: &[EndpointSlice], address_type: &str) -> usize {
    slices.iter().filter(|s| s.address_type == address_type).map(|s| eps(s).len()).sum()
}

#[tokio::test]
async fn services_get_the_families_their_policy_asks_for() {
    let server = TestApiServer::start(Config::default()).await.expect("server starts");
    let api: Api<Service> = Api::namespaced(server.client().expect("client"), "default");
    let pp = PostParams::default();

    let dual = api.create(&pp, &service("dual", json!({"ipFamilyPolicy": "PreferDualStack"}))).await.expect("create");
    let (families, ips, policy) = families_and_ips(&dual);
    assert_eq!((families, policy.as_deref()), (vec!["IPv4".to_string(), "IPv6".to_string()], Some("PreferDualStack")));
    assert_eq!(ips.len(), 2, "{ips:?}");
    assert!(!is_v6(&ips[0]) && is_v6(&ips[1]), "IPv4 first: {ips:?}");
    assert!(ips[0].starts_with("10.") && ips[1].starts_with("fd00:10:96::"), "{ips:?}");
    let cluster_ip = dual.spec.as_ref().and_then(|s| s.cluster_ip.clone());
    assert_eq!(cluster_ip, Some(ips[0].clone()), "clusterIP is clusterIPs[0]");

    let single = api.create(&pp, &service("single", json!({}))).await.expect("create");
    let (families, ips, policy) = families_and_ips(&single);
    assert_eq!((families, ips.len(), policy.as_deref()), (vec!["IPv4".to_string()], 1, Some("SingleStack")));

    // ipFamilies order decides the primary family.
    let v6_first = service("v6-first", json!({"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv6", "IPv4"]}));
    let (families, ips, _) = families_and_ips(&api.create(&pp, &v6_first).await.expect("create"));
    assert_eq!(families, ["IPv6", "IPv4"]);
    assert!(is_v6(&ips[0]) && !is_v6(&ips[1]), "{ips:?}");

    // Raising the policy on an update adds the second family, lowering it releases it.
    let policy = |p: &str| Patch::Merge(json!({"spec": {"ipFamilyPolicy": p}}));
    let up = api.patch("single", &PatchParams::default(), &policy("PreferDualStack")).await.expect("upgrade");
    let (families, ips, _) = families_and_ips(&up);
    assert_eq!((families.len(), ips.len()), (2, 2), "{ips:?}");
    let down = api.patch("single", &PatchParams::default(), &policy("SingleStack")).await.expect("downgrade");
    let (families, ips2, _) = families_and_ips(&down);
    assert_eq!((families, ips2), (vec!["IPv4".to_string()], vec![ips[0].clone()]));

    // A requested address is checked against its family's range.
    let outside = service("outside", json!({"ipFamilyPolicy": "PreferDualStack", "clusterIP": "10.96.0.50",
        "clusterIPs": ["10.96.0.50", "fd00:1::1"]}));
    let status = refusal(api.create(&pp, &outside).await);
    assert_eq!(status.code, 422);
    assert!(status.message.contains("The range of valid IPs is fd00:10:96::/112"), "{}", status.message);
}

#[tokio::test]
async fn a_single_stack_cluster_refuses_require_dual_stack() {
    let config = Config { service_cidr_v6: None, pod_cidr_v6: None, ..Config::default() };
    let server = TestApiServer::start(config).await.expect("server starts");
    let api: Api<Service> = Api::namespaced(server.client().expect("client"), "default");
    let pp = PostParams::default();
    let status = refusal(api.create(&pp, &service("req", json!({"ipFamilyPolicy": "RequireDualStack"}))).await);
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"), "{status:?}");
    assert_eq!(
        status.message,
        "Service \"req\" is invalid: spec.ipFamilyPolicy: Invalid value: \"RequireDualStack\": \
         this cluster is not configured for dual-stack services"
    );
    let status = refusal(api.create(&pp, &service("v6", json!({"ipFamilies": ["IPv6"]}))).await);
    let want = "spec.ipFamilies[0]: Invalid value: \"IPv6\": not configured on this cluster";
    assert!(status.message.ends_with(want), "{}", status.message);
    // PreferDualStack settles for one family there.
    let prefer = service("prefer", json!({"ipFamilyPolicy": "PreferDualStack"}));
    let prefer = api.create(&pp, &prefer).await.expect("create");
    assert_eq!(families_and_ips(&prefer).0, ["IPv4"]);
}

#[tokio::test]
async fn a_dual_stack_service_gets_a_slice_per_family() {
    let server = zoned_server().await;
    server.handle().load_manifests(PODS).expect("pods");
    let client = server.client().expect("client");
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let web = service("web", json!({"ipFamilyPolicy": "PreferDualStack"}));
    api.create(&PostParams::default(), &web).await.expect("create");

    let slices = slices_when(&client, "web", "two slices of two endpoints", |s| {
        s.len() == 2 && endpoint_count(s, "IPv4") == 2 && endpoint_count(s, "IPv6") == 2
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for name in ["web-a", "web-b"] {
        let pod = pods.get(name).await.expect("pod");
        let pod_ips = pod.status.and_then(|s| s.pod_ips).unwrap_or_default();
        let ips: Vec<String> = pod_ips.into_iter().map(|p| p.ip).collect();
        assert_eq!(ips.len(), 2, "{name}: {ips:?}");
        assert!(!is_v6(&ips[0]) && is_v6(&ips[1]), "{name}: IPv4 first, then IPv6: {ips:?}");
        for (address_type, ip) in [("IPv4", &ips[0]), ("IPv6", &ips[1])] {
            let slice = slices.iter().find(|s| s.address_type == address_type).expect("a slice of each type");
            let ep = eps(slice).iter().find(|e| e.target_ref.as_ref().and_then(|r| r.name.as_deref()) == Some(name));
            assert_eq!(ep.map(|e| e.addresses.clone()), Some(vec![ip.clone()]), "{name} in the {address_type} slice");
        }
    }
    for s in &slices {
        let generated = s.metadata.generate_name.as_deref() == Some("web-") && s.name_any().starts_with("web-");
        assert!(generated, "named as the real controller names slices: {:?}", s.metadata);
    }
}

#[tokio::test]
async fn prefer_close_gives_zone_hints() {
    let server = zoned_server().await;
    server.handle().load_manifests(PODS).expect("pods");
    let client = server.client().expect("client");
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();
    api.create(&pp, &service("close", json!({"trafficDistribution": "PreferClose"}))).await.expect("create");
    api.create(&pp, &service("plain", json!({}))).await.expect("create");

    let hinted = |s: &[EndpointSlice]| s.iter().flat_map(eps).filter(|e| e.hints.is_some()).count();
    let both_hinted = |s: &[EndpointSlice]| endpoint_count(s, "IPv4") == 2 && hinted(s) == 2;
    let slices = slices_when(&client, "close", "hints on both endpoints", both_hinted).await;
    for ep in slices.iter().flat_map(eps) {
        let zone = ep.zone.clone().expect("an endpoint's zone");
        assert_eq!(zone, if ep.node_name.as_deref() == Some("node-a") { "zone-a" } else { "zone-b" });
        let hints = ep.hints.as_ref().expect("hints");
        let zones: Vec<&str> = hints.for_zones.iter().flatten().map(|z| z.name.as_str()).collect();
        assert_eq!(zones, [zone.as_str()]);
        assert!(hints.for_nodes.is_none(), "PreferClose names no node: {hints:?}");
    }
    let plain = slices_when(&client, "plain", "two endpoints", |s| endpoint_count(s, "IPv4") == 2).await;
    assert_eq!(hinted(&plain), 0, "no hints without trafficDistribution");

    // PreferSameNode adds node hints; dropping trafficDistribution drops the hints.
    let same_node = Patch::Merge(json!({"spec": {"trafficDistribution": "PreferSameNode"}}));
    api.patch("close", &PatchParams::default(), &same_node).await.expect("patch");
    let node_hinted = |s: &[EndpointSlice]| {
        s.iter().flat_map(eps).filter(|e| e.hints.as_ref().is_some_and(|h| h.for_nodes.is_some())).count()
    };
    let slices = slices_when(&client, "close", "node hints", |s| node_hinted(s) == 2).await;
    for ep in slices.iter().flat_map(eps) {
        let for_nodes = ep.hints.iter().flat_map(|h| h.for_nodes.iter().flatten());
        let nodes: Vec<&str> = for_nodes.map(|n| n.name.as_str()).collect();
        assert_eq!(nodes, [ep.node_name.as_deref().unwrap_or_default()]);
    }
    let none = Patch::Merge(json!({"spec": {"trafficDistribution": null}}));
    api.patch("close", &PatchParams::default(), &none).await.expect("patch");
    slices_when(&client, "close", "no hints", |s| endpoint_count(s, "IPv4") == 2 && hinted(s) == 0).await;
}

/// Watches ConfigMaps from `rv` and sends each ADDED name with the instant it arrived.
fn record_watch(client: Client, rv: String) -> Arrivals {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let api: Api<ConfigMap> = Api::namespaced(client, "default");
        let mut events = api.watch(&WatchParams::default(), &rv).await.expect("watch").boxed();
        while let Ok(Some(e)) = events.try_next().await {
            if let WatchEvent::Added(cm) = e
                && tx.send((cm.name_any(), tokio::time::Instant::now())).is_err()
            {
                return;
            }
        }
    });
    rx
}

async fn next(rx: &mut Arrivals) -> (String, tokio::time::Instant) {
    tokio::time::timeout(WAIT, rx.recv()).await.expect("an event in time").expect("the watch goes on")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagged_watch_falls_behind_in_order_while_reads_stay_current() {
    let server = TestApiServer::start(Config { seed: Some(5), ..Config::default() }).await.expect("server starts");
    let (min, max) = (Duration::from_millis(300), Duration::from_millis(600));
    server.handle().lag_watches(Some(WatchLag { user_agent_prefix: "lagging-test/".into(), min, max }));
    let lagged_client = server.client_as("lagging-test/1.0").expect("client");
    let client = server.client().expect("client");
    let rv = server.handle().resource_version().to_string();
    let mut fresh = record_watch(client.clone(), rv.clone());
    let mut lagged = record_watch(lagged_client.clone(), rv);
    // Both watches are open before the first event.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let lagged_api: Api<ConfigMap> = Api::namespaced(lagged_client.clone(), "default");
    let names: Vec<String> = (0..8).map(|i| format!("cm-{i}")).collect();
    let mut created = BTreeMap::new();
    for name in &names {
        created.insert(name.clone(), tokio::time::Instant::now());
        api.create(&PostParams::default(), &config_map(name)).await.expect("create");
        // A read through the lagging client is current at once.
        assert!(lagged_api.get_opt(name).await.expect("get").is_some(), "{name} read at once");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for name in &names {
        let (got_fresh, at_fresh) = next(&mut fresh).await;
        let (got_lagged, at_lagged) = next(&mut lagged).await;
        assert_eq!((&got_fresh, &got_lagged), (name, name), "both in order");
        let since = at_lagged - created[name];
        assert!(since >= min, "{name} reached the lagged watch {since:?} after its create, under {min:?}");
        assert!(at_lagged > at_fresh, "{name}: the lagged watch after the other");
    }

    // The admin control sets a lag too, on watches already open.
    server.handle().lag_watches(None);
    let lag = json!({"userAgentPrefix": "lagging-test/", "minMillis": 400, "maxMillis": 400});
    let body = serde_json::to_vec(&lag).expect("json");
    let req = http::Request::post("/_test/faults/lag-watches").body(body).expect("request");
    client.request_text(req).await.expect("the admin control answers");
    let t0 = tokio::time::Instant::now();
    api.create(&PostParams::default(), &config_map("late")).await.expect("create");
    let (name, at_fresh) = next(&mut fresh).await;
    let (lagged_name, at_lagged) = next(&mut lagged).await;
    assert_eq!((name.as_str(), lagged_name.as_str()), ("late", "late"));
    assert!(at_lagged - t0 >= Duration::from_millis(400), "{:?}", at_lagged - t0);
    assert!(at_fresh < at_lagged, "the other watch does not lag");
    let stop = http::Request::post("/_test/faults/lag-watches").body(b"{}".to_vec()).expect("request");
    client.request_text(stop).await.expect("the admin control answers");
}
