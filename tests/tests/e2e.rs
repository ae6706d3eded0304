//! End to end, on a real kernel's IPVS in the test VM: the real controller and
//! agent binaries against the test API server and the kube-proxy emulator, with
//! pods as network-namespace backends and real connections counted.
//!
//! `make test-kernel` runs this in the VM (tests/vm). Each test builds its own
//! testbed (namespaces, IPVS table, API server), so they run side by side.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use ipvs_operator_tests::testbed::{wait_until, Testbed, TestbedConfig};

/// The original project's example: two Deployments of 3 and the README's weights.
const SEED: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: demo-deployment-canary, labels: {app: demo, env: canary}}
spec:
  replicas: 3
  selector: {matchLabels: {app: demo, env: canary}}
  template:
    metadata: {labels: {app: demo, env: canary}}
    spec:
      containers:
      - name: demo
        image: justinbarrick/demo-server:latest
        ports: [{containerPort: 8080, name: www}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: demo-deployment-prod, labels: {app: demo, env: prod}}
spec:
  replicas: 3
  selector: {matchLabels: {app: demo, env: prod}}
  template:
    metadata: {labels: {app: demo, env: prod}}
    spec:
      containers:
      - name: demo
        image: justinbarrick/demo-server:latest
        ports: [{containerPort: 8080, name: www}]
---
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {name: example, namespace: default}
spec:
  selector: {app: demo}
  ports: [{protocol: TCP, port: 80, targetPort: www}]
  scheduler: wlc
  weights:
  - {weight: 10, selector: {env: prod}}
  - {weight: 1, selector: {env: canary}}
"#;

const TIMEOUT: Duration = Duration::from_secs(90);

/// Share of connections per group (pod names start with their Deployment's).
fn shares(counts: &BTreeMap<String, usize>) -> BTreeMap<&'static str, f64> {
    let total: usize = counts.values().sum();
    let mut out = BTreeMap::new();
    for (pod, n) in counts {
        let group = if pod.contains("canary") { "canary" } else { "prod" };
        *out.entry(group).or_insert(0.0) += *n as f64 / total as f64;
    }
    out
}

fn assert_split(counts: &BTreeMap<String, usize>, prod: f64, canary: f64) {
    let s = shares(counts);
    let (p, c) = (s.get("prod").copied().unwrap_or(0.0), s.get("canary").copied().unwrap_or(0.0));
    assert!(
        (p - prod).abs() <= 0.02 && (c - canary).abs() <= 0.02,
        "measured prod {:.2}% canary {:.2}%, expected {:.2}% / {:.2}% (counts {counts:?})",
        p * 100.0,
        c * 100.0,
        prod * 100.0,
        canary * 100.0
    );
}

/// The weights the kernel has for the VIP's destinations, by destination.
fn weights(bed: &Testbed, vip: SocketAddr) -> Option<(String, BTreeMap<SocketAddr, u32>)> {
    let entry = bed.ipvs().into_iter().find(|e| e.service.address() == Some(vip))?;
    let weights = entry.destinations.iter().map(|d| (d.socket_addr(), d.weight)).collect();
    Some((entry.service.scheduler, weights))
}

/// Wait until the VIP has 6 destinations at 10 (prod) and 1 (canary) under `scheduler`.
fn wait_for_seed_weights(bed: &Testbed, vip: SocketAddr, scheduler: &str) {
    let pod_ips: BTreeMap<String, String> = bed
        .handle()
        .list("pods", Some("default"))
        .iter()
        .filter_map(|p| Some((p["status"]["podIP"].as_str()?.to_string(), p["metadata"]["name"].as_str()?.to_string())))
        .collect();
    wait_until(TIMEOUT, "the agent's weights in the kernel", || {
        let (sched, w) = weights(bed, vip)?;
        let ok = sched == scheduler
            && w.len() == 6
            && w.iter().all(|(dest, weight)| {
                let pod = pod_ips.get(&dest.ip().to_string()).map(String::as_str).unwrap_or("");
                *weight == if pod.contains("canary") { 1 } else { 10 }
            });
        ok.then_some(())
    });
}

#[test]
fn the_seed_weighted_service_splits_real_connections_30_to_3() {
    let mut bed = Testbed::new(TestbedConfig::default());
    bed.load(SEED);
    bed.start_all();
    let vip = SocketAddr::new(bed.cluster_ip("default", "example"), 80);
    wait_for_seed_weights(&bed, vip, "wlc");
    let counts = bed.connect(vip, 5000);
    assert_split(&counts, 30.0 / 33.0, 3.0 / 33.0);
    // The status says the same.
    let ws = bed.get("weightedservices", "default", "example").expect("the WeightedService");
    let ready = ws["status"]["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == "Ready")).cloned();
    assert_eq!(ready.as_ref().map(|c| c["status"].clone()), Some("True".into()), "{ws}");
    assert!((ws["status"]["groups"][0]["share"].as_f64().unwrap_or(0.0) - 0.9091).abs() < 1e-3, "{ws}");
}
