//! The real controller (`ipvs-operator controller`, the binary) against a
//! Service whose endpoints the test API server's EndpointSlice controller
//! splits over several slices of at most 100, writes a moment after the pods
//! change, and writes out of order: the status must count every endpoint once,
//! whatever the slices' order and however a change reaches them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ipvs_operator_tests::apiserver::{Config, Handle, TestApiServer, kubeconfig_yaml};
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
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_yaml(server.url())).expect("a kubeconfig");
    let log = dir.path().join("controller.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port");
    let child = Command::new(project_binary("ipvs-operator").expect("the operator binary"))
        .args(["controller", "--listen", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", &kubeconfig)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("a log file"))
        .spawn()
        .expect("ipvs-operator controller starts");
    let _controller = Killed(child);

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
