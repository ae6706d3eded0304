//! End to end, in the test VM: the agent beside kube-proxy in every Service
//! topology, and its state derived from the cluster and the kernel rather
//! than its memory — dual-stack Services with Local traffic policies, NodePorts
//! matched on the node's addresses only, weight 1 restored by an agent that
//! restarted, and draining destinations never revived by a lagging watch.
//!
//! `make test-kernel` runs this in the VM (tests/vm).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipvs_operator_tests::apiserver::{Grace, WatchLag};
use ipvs_operator_tests::testbed::{
    dual_stack_pod_manifest, pod_manifest, wait_until, Testbed, TestbedConfig, NODE_IP, NODE_IP6,
};

const TIMEOUT: Duration = Duration::from_secs(90);

/// kube-proxy with the scheduler the WeightedServices ask for: its syncs then
/// revert nothing, and any sweep difference is the agent's own doing.
fn kube_proxy_agrees() -> TestbedConfig {
    TestbedConfig { proxy_scheduler: "wrr".into(), ..TestbedConfig::default() }
}

/// Pod name by pod IP (either family), in `default`.
fn pods_by_ip(bed: &Testbed) -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    for pod in bed.handle().list("pods", Some("default")) {
        let Some(name) = pod["metadata"]["name"].as_str() else { continue };
        for ip in pod["status"]["podIPs"].as_array().into_iter().flatten() {
            if let Some(ip) = ip["ip"].as_str().and_then(|ip| ip.parse().ok()) {
                out.insert(ip, name.to_string());
            }
        }
    }
    out
}

/// The scheduler and weights by pod name of the virtual service at `vip`.
fn virtual_service(bed: &Testbed, vip: SocketAddr) -> Option<(String, BTreeMap<String, u32>)> {
    let entry = bed.ipvs().into_iter().find(|e| e.service.address() == Some(vip))?;
    let by_ip = pods_by_ip(bed);
    let weights = entry
        .destinations
        .iter()
        .map(|d| (by_ip.get(&d.socket_addr().ip()).cloned().unwrap_or_else(|| d.socket_addr().to_string()), d.weight))
        .collect();
    Some((entry.service.scheduler, weights))
}

/// Wait until `vip` has exactly these weights by pod, under `scheduler`.
fn wait_for_weights(bed: &Testbed, vip: SocketAddr, scheduler: &str, want: &[(&str, u32)]) {
    let want: BTreeMap<String, u32> = want.iter().map(|(p, w)| (p.to_string(), *w)).collect();
    let what = format!("{vip} at {want:?} under {scheduler}");
    wait_until(TIMEOUT, &what, || {
        let (s, w) = virtual_service(bed, vip)?;
        (s == scheduler && w == want).then_some(())
    });
}

fn cluster_ips(bed: &Testbed, name: &str) -> Vec<IpAddr> {
    // The controller creates the Service: until it has, there are none.
    let Some(svc) = bed.get("services", "default", name) else { return Vec::new() };
    svc["spec"]["clusterIPs"].as_array().into_iter().flatten().filter_map(|ip| ip.as_str()?.parse().ok()).collect()
}

/// The share of connections each pod answered.
fn shares(counts: &BTreeMap<String, usize>) -> BTreeMap<String, f64> {
    let total: usize = counts.values().sum();
    counts.iter().map(|(p, n)| (p.clone(), *n as f64 / total as f64)).collect()
}

fn assert_shares(what: &str, counts: &BTreeMap<String, usize>, want: &[(&str, f64)]) {
    let got = shares(counts);
    for (pod, share) in want {
        let measured = got.get(*pod).copied().unwrap_or(0.0);
        assert!((measured - share).abs() <= 0.04, "{what}: {pod} got {:.1}%, expected {:.1}% ({counts:?})", measured * 100.0, share * 100.0);
    }
    assert!(got.keys().all(|p| want.iter().any(|(w, _)| w == p)), "{what}: unexpected pods in {counts:?}");
}

const DUAL_STACK_LOCAL: &str = r#"
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  ipFamilyPolicy: PreferDualStack
  externalTrafficPolicy: Local
  selector: {app: web}
  ports: [{protocol: TCP, port: 80, targetPort: www, nodePort: 30080}]
  scheduler: wrr
  weights:
  - {weight: 3, selector: {env: prod}}
  - {weight: 1, selector: {env: canary}}
"#;

#[test]
fn a_dual_stack_node_port_with_local_external_traffic_gets_its_split_everywhere_and_converges() {
    let mut bed = Testbed::new(kube_proxy_agrees());
    for (name, env, node, n) in [("prod-a", "prod", "node-1", 11), ("prod-b", "prod", "node-1", 12), ("canary-a", "canary", "node-1", 13), ("prod-c", "prod", "node-2", 14)] {
        let labels = [("app", "web"), ("env", env)];
        bed.load(&dual_stack_pod_manifest(name, &labels, node, &format!("10.244.0.{n}"), &format!("fd00:10:244::{n}")));
    }
    bed.load(DUAL_STACK_LOCAL);
    bed.start_all();
    let ips = wait_until(TIMEOUT, "two ClusterIPs", || {
        let ips = cluster_ips(&bed, "web");
        (ips.len() == 2).then_some(ips)
    });
    assert!(ips[0].is_ipv4() && ips[1].is_ipv6(), "{ips:?}");
    // Behind each ClusterIP every endpoint of its family; behind the NodePorts
    // (externalTrafficPolicy: Local) only this node's.
    let everywhere = [("canary-a", 1), ("prod-a", 3), ("prod-b", 3), ("prod-c", 3)];
    let local = [("canary-a", 1), ("prod-a", 3), ("prod-b", 3)];
    for ip in &ips {
        wait_for_weights(&bed, SocketAddr::new(*ip, 80), "wrr", &everywhere);
    }
    wait_for_weights(&bed, SocketAddr::new(IpAddr::V4(NODE_IP), 30080), "wrr", &local);
    wait_for_weights(&bed, SocketAddr::new(IpAddr::V6(NODE_IP6), 30080), "wrr", &local);

    // Converged: sweeps find nothing to fix, although no virtual service holds
    // every endpoint of both families and both nodes.
    let differences = || bed.agent_metric("ipvs_operator_sweep_differences_total", "").expect("the agent's metric");
    std::thread::sleep(Duration::from_secs(2));
    let before = differences();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(differences(), before, "sweeps kept finding differences: {}", bed.log("agent"));

    let cluster = [("prod-a", 0.3), ("prod-b", 0.3), ("prod-c", 0.3), ("canary-a", 0.1)];
    for ip in &ips {
        assert_shares(&format!("ClusterIP {ip}"), &bed.connect(SocketAddr::new(*ip, 80), 1000), &cluster);
    }
    let node_port = [("prod-a", 3.0 / 7.0), ("prod-b", 3.0 / 7.0), ("canary-a", 1.0 / 7.0)];
    for ip in [IpAddr::V4(NODE_IP), IpAddr::V6(NODE_IP6)] {
        assert_shares(&format!("NodePort {ip}"), &bed.connect(SocketAddr::new(ip, 30080), 700), &node_port);
    }
}

#[test]
fn a_node_port_is_matched_on_the_nodes_addresses_only() {
    // kube-proxy's scheduler (rr) is not the WeightedService's: a scheduler
    // the agent writes on the other Service would show.
    let mut bed = Testbed::new(TestbedConfig::default());
    bed.load(&pod_manifest("web-1", &[("app", "web")], "node-1", "10.244.0.21"));
    bed.load(&pod_manifest("other-1", &[("app", "other")], "node-1", "10.244.0.22"));
    bed.load(
        r#"
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{protocol: TCP, port: 80, targetPort: www, nodePort: 30080}]
  scheduler: wrr
  weights: [{weight: 7, selector: {app: web}}]
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: default}
spec:
  selector: {app: other}
  ports: [{protocol: TCP, port: 30080, targetPort: www}]
"#,
    );
    bed.start_all();
    let node_port = SocketAddr::new(IpAddr::V4(NODE_IP), 30080);
    wait_for_weights(&bed, node_port, "wrr", &[("web-1", 7)]);
    let other = SocketAddr::new(bed.cluster_ip("default", "other"), 30080);
    wait_until(TIMEOUT, "the other Service's virtual service", || virtual_service(&bed, other));
    // Several passes and sweeps: the other Service's ClusterIP on the same port
    // number is not the weighted NodePort.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let (scheduler, weights) = virtual_service(&bed, other).expect("the other Service's virtual service");
        assert_eq!((scheduler.as_str(), weights.get("other-1")), ("rr", Some(&1)), "{}", bed.ipvsadm());
        std::thread::sleep(Duration::from_millis(100));
    }
}

const SEED: &str = r#"
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{protocol: TCP, port: 80, targetPort: www}]
  scheduler: wrr
  weights:
  - {weight: 10, selector: {env: prod}}
  - {weight: 1, selector: {env: canary}}
"#;

fn seed_bed(config: TestbedConfig) -> (Testbed, SocketAddr) {
    let mut bed = Testbed::new(config);
    for (name, env, n) in [("prod-a", "prod", 31), ("prod-b", "prod", 32), ("canary-a", "canary", 33)] {
        bed.load(&pod_manifest(name, &[("app", "web"), ("env", env)], "node-1", &format!("10.244.0.{n}")));
    }
    bed.load(SEED);
    bed.start_all();
    let vip = SocketAddr::new(bed.cluster_ip("default", "web"), 80);
    wait_for_weights(&bed, vip, "wrr", &[("canary-a", 1), ("prod-a", 10), ("prod-b", 10)]);
    (bed, vip)
}

#[test]
fn an_agent_restarted_after_a_weight_change_restores_weight_one_on_an_orphaning_delete() {
    use ipvs_operator::crd::WeightedService;
    use kube::api::{Api, DeleteParams, Patch, PatchParams};
    let (mut bed, vip) = seed_bed(kube_proxy_agrees());
    let api: Api<WeightedService> = Api::namespaced(bed.client(), "default");
    let patch = serde_json::json!({"spec": {"weights": [{"weight": 10, "selector": {"env": "prod"}}, {"weight": 4, "selector": {"env": "canary"}}]}});
    bed.block_on(api.patch("web", &PatchParams::default(), &Patch::Merge(&patch))).expect("patching the WeightedService");
    wait_for_weights(&bed, vip, "wrr", &[("canary-a", 4), ("prod-a", 10), ("prod-b", 10)]);
    // A DaemonSet upgrade: the new agent process never wrote these weights.
    bed.kill("agent");
    bed.start_agent();
    wait_until(TIMEOUT, "the restarted agent to be ready", || bed.agent_ready().then_some(()));
    // `kubectl delete --cascade=orphan`: the Service stays, without its owner.
    bed.block_on(api.delete("web", &DeleteParams::orphan())).expect("deleting the WeightedService");
    wait_until(TIMEOUT, "the Service without its owner reference", || {
        let svc = bed.get("services", "default", "web")?;
        svc["metadata"]["ownerReferences"].as_array().is_none_or(|o| o.is_empty()).then_some(())
    });
    // kube-proxy's weight 1 again; the scheduler is kube-proxy's to revert.
    wait_until(TIMEOUT, "weight 1 on every destination", || {
        let (_, w) = virtual_service(&bed, vip)?;
        (w.len() == 3 && w.values().all(|w| *w == 1)).then_some(())
    });
    assert!(bed.log("agent").contains("restoring weight 1"), "{}", bed.log("agent"));
}

#[test]
fn a_lagging_agent_never_raises_a_destination_kube_proxy_is_draining() {
    let (bed, vip) = seed_bed(kube_proxy_agrees());
    // Connections give prod-a something to drain: kube-proxy deletes an idle
    // destination at once, and keeps one with connections at weight 0.
    let answered = bed.connect(vip, 42);
    assert!(answered.get("prod-a").is_some_and(|n| *n > 0), "prod-a answered none of {answered:?}");
    // The agent's watch events come 1.5-2 s late: longer than its drift interval (1 s).
    bed.handle().lag_watches(Some(WatchLag {
        user_agent_prefix: "ipvs-operator-agent/".into(),
        min: Duration::from_millis(1500),
        max: Duration::from_millis(2000),
    }));
    bed.handle().delete_pod("default", "prod-a", Grace::UntilFinished).expect("deleting the pod");
    wait_until(TIMEOUT, "kube-proxy to drain prod-a at weight 0", || {
        (virtual_service(&bed, vip)?.1.get("prod-a") == Some(&0)).then_some(())
    });
    // Until the agent's view has long caught up, prod-a stays at 0.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let (_, w) = virtual_service(&bed, vip).expect("the virtual service");
        assert_eq!(w.get("prod-a"), Some(&0), "the draining destination was raised: {w:?}\n{}", bed.log("agent"));
        std::thread::sleep(Duration::from_millis(50));
    }
    bed.handle().lag_watches(None);
    let refused = bed.agent_metric("ipvs_operator_zero_raises_refused_total", "").expect("the agent's metric");
    assert!(refused >= 1.0, "the agent never wanted to raise the drained destination: the test did not lag it");
    bed.handle().finish_pod_termination("default", "prod-a").expect("finishing the termination");
    // kube-proxy deletes prod-a once its connections expire (minutes for
    // TIME_WAIT); until then it stays at 0 beside the others' weights.
    wait_until(TIMEOUT, "prod-a gone or at 0 beside canary-a at 1 and prod-b at 10", || {
        // Once the pod is gone its destination is named by address.
        let (_, mut w) = virtual_service(&bed, vip)?;
        w.retain(|_, w| *w != 0);
        (w == BTreeMap::from([("canary-a".to_string(), 1), ("prod-b".to_string(), 10)])).then_some(())
    });
}
