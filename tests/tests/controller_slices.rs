//! The real controller (`ipvs-operator controller`, the binary) against a
//! Service whose endpoints the test API server's EndpointSlice controller
//! splits over several slices of at most 100, writes a moment after the pods
//! change, and writes out of order: the status must count every endpoint once,
//! whatever the slices' order and however a change reaches them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ipvs_operator_tests::apiserver::{Config, Handle, PodUpdate, TestApiServer, kubeconfig_yaml};
use ipvs_operator_tests::project_binary;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The controller binary against `server`, its log in `dir`; killed on drop.
fn start_controller(server: &TestApiServer, dir: &Path) -> (Killed, PathBuf) {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_yaml(server.url())).expect("a kubeconfig");
    let log = dir.join("controller.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port");
    let child = Command::new(project_binary("ipvs-operator").expect("the operator binary"))
        .args(["controller", "--listen", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", &kubeconfig)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("a log file"))
        .spawn()
        .expect("ipvs-operator controller starts");
    (Killed(child), log)
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repository").to_path_buf()
}

fn deployment(name: &str, env: &str, replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: big, env: {env}}}}}\n  template:\n\
         \x20   metadata: {{labels: {{app: big, env: {env}}}}}\n\
         \x20   spec: {{containers: [{{name: web, image: nginx, ports: [{{name: www, containerPort: 8080}}]}}]}}\n"
    )
}

const WS: &str = r#"
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {name: big, namespace: default}
spec:
  selector: {app: big}
  ports: [{protocol: TCP, port: 80, targetPort: www}]
  weights:
  - {weight: 10, selector: {env: prod}}
  - {weight: 1, selector: {env: canary}}
"#;

/// The ready endpoints per group of the `big` WeightedService's status, once
/// it describes its current generation.
fn groups(h: &Handle) -> Option<Vec<(String, u64)>> {
    let ws = h.get("weightedservices", "default", "big")?;
    (ws["status"]["observedGeneration"] == ws["metadata"]["generation"]).then_some(())?;
    let groups = ws["status"]["groups"].as_array()?;
    Some(
        groups
            .iter()
            .map(|g| (g["selector"]["env"].as_str().unwrap_or_default().to_string(), g["endpoints"].as_u64().unwrap_or_default()))
            .collect(),
    )
}

async fn wait_for_groups(h: &Handle, log: &Path, want: &[(&str, u64)]) {
    let want: Vec<(String, u64)> = want.iter().map(|(g, n)| (g.to_string(), *n)).collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = groups(h);
        if got.as_ref() == Some(&want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the status never counted {want:?}: {got:?}\ncontroller log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The slices of Service `big`: how many, and the ready endpoints in all of them.
fn slices(h: &Handle) -> (usize, usize) {
    let slices: Vec<Value> =
        h.list("endpointslices", Some("default")).into_iter().filter(|s| s["metadata"]["labels"]["kubernetes.io/service-name"] == "big").collect();
    let ready = slices
        .iter()
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["conditions"]["ready"] == true)
        .count();
    (slices.len(), ready)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_counts_endpoints_over_several_slices() {
    let server = TestApiServer::start(Config::default()).await.expect("the test API server starts");
    let h = server.handle().clone();
    h.load_file(&repo().join("deploy/crd.yaml")).expect("the CRD loads");
    h.load_manifests(&(deployment("prod", "prod", 230) + "---\n" + &deployment("canary", "canary", 20))).expect("the pods load");
    h.load_manifests(WS).expect("the WeightedService loads");

    let dir = tempfile::tempdir().expect("a temporary directory");
    let (_controller, log) = start_controller(&server, dir.path());

    // 250 endpoints: three slices.
    wait_for_groups(&h, &log, &[("prod", 230), ("canary", 20)]).await;
    assert_eq!(slices(&h), (3, 250), "the Service's endpoints over three slices");

    // Scale prod down and canary up: slices change one by one, out of order.
    h.load_manifests(&(deployment("prod", "prod", 90) + "---\n" + &deployment("canary", "canary", 60))).expect("scaling");
    wait_for_groups(&h, &log, &[("prod", 90), ("canary", 60)]).await;
    let (n, ready) = slices(&h);
    assert_eq!(ready, 150);
    assert!(n >= 2, "{n} slices");
}

/// The PodInfoSlices the controller published for `big`.
fn pod_info_slices(h: &Handle) -> Vec<Value> {
    h.list("podinfoslices", Some("default"))
        .into_iter()
        .filter(|s| s["metadata"]["labels"]["codesink.net/weighted-service"] == "big")
        .collect()
}

/// Every pod entry of `big`'s PodInfoSlices, by pod name.
fn published_pods(h: &Handle) -> std::collections::BTreeMap<String, Value> {
    pod_info_slices(h)
        .iter()
        .flat_map(ipvs_operator_tests::consistency::pod_info_entries)
        .collect()
}

/// Writes the controller made to PodInfoSlices.
fn pod_info_writes(h: &Handle) -> usize {
    h.requests()
        .iter()
        .filter(|r| r.resource == "podinfoslices" && matches!(r.verb.as_str(), "create" | "update" | "patch" | "delete"))
        .count()
}

async fn wait_for(what: &str, log: &Path, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never: {what}\ncontroller log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_publishes_what_agents_need_of_pods_and_writes_only_changes() {
    let server = TestApiServer::start(Config::default()).await.expect("the test API server starts");
    let h = server.handle().clone();
    h.load_file(&repo().join("deploy/crd.yaml")).expect("the CRDs load");
    h.load_manifests(&(deployment("prod", "prod", 150) + "---\n" + &deployment("canary", "canary", 20))).expect("the pods load");
    h.load_manifests(WS).expect("the WeightedService loads");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (_controller, log) = start_controller(&server, dir.path());

    // Every selected pod, with its labels and its Ready condition's time, in slices of at most 100.
    wait_for("170 pods published, all with readySince", &log, || {
        let pods = published_pods(&h);
        pods.len() == 170 && pods.values().all(|p| p["readySince"].is_string())
    })
    .await;
    let ws_uid = h.get("weightedservices", "default", "big").expect("the WeightedService")["metadata"]["uid"].clone();
    let slices = pod_info_slices(&h);
    assert_eq!(slices.len(), 2, "170 pods: two slices");
    for slice in &slices {
        assert!(slice["spec"]["pods"].as_array().map_or(0, Vec::len) <= 100);
        let owner = &slice["metadata"]["ownerReferences"][0];
        assert_eq!((owner["kind"].as_str(), &owner["uid"], owner["controller"].as_bool()), (Some("WeightedService"), &ws_uid, Some(true)));
    }
    let published = published_pods(&h);
    for pod in h.list("pods", Some("default")) {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let info = &published[name];
        assert_eq!(info["labels"], pod["metadata"]["labels"], "{name}'s labels");
        assert_eq!(info["created"], pod["metadata"]["creationTimestamp"], "{name}'s creation");
        let ready = pod["status"]["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == "Ready")).cloned();
        assert_eq!(info["readySince"], ready.expect("a Ready condition")["lastTransitionTime"], "{name}'s ready-since");
    }

    // Status churn that changes no label and no readiness (a new pod IP) writes nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = pod_info_writes(&h);
    let names: Vec<String> = published.keys().cloned().collect();
    for (i, name) in names.iter().take(20).enumerate() {
        let ip: std::net::IpAddr = format!("10.250.0.{}", i + 1).parse().expect("an address");
        h.update_pod("default", name, &PodUpdate { ip: Some(ip), ..Default::default() }).expect("a status update");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(pod_info_writes(&h), before, "status updates that change nothing agents read are not published");

    // A label change rewrites the one slice that has the pod.
    let relabelled = &names[0];
    h.set_pod_label("default", relabelled, "track", Some("blue")).expect("relabelling");
    wait_for("the new label published", &log, || published_pods(&h)[relabelled]["labels"]["track"] == "blue").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(pod_info_writes(&h), before + 1, "one slice written");

    // Readiness lost: no ready-since any more.
    let unready = &names[1];
    h.set_pod_ready("default", unready, false).expect("unready");
    wait_for("the lost readiness published", &log, || published_pods(&h)[unready].get("readySince").is_none()).await;

    // The WeightedService deleted: its slices are collected with it.
    let api: kube::Api<ipvs_operator::crd::WeightedService> = kube::Api::namespaced(server.client().expect("a client"), "default");
    api.delete("big", &Default::default()).await.expect("deleting the WeightedService");
    wait_for("the slices collected", &log, || pod_info_slices(&h).is_empty()).await;
}
