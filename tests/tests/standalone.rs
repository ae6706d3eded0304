//! The standalone `test-apiserver` binary: `--listen`, `--load`, and the test
//! controls over HTTP under `/_test/`.

use std::io::BufRead as _;
use std::process::{Child, Command, Stdio};

use ipvs_operator_tests::apiserver::{RequestRecord, client_for};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn admin(client: &kube::Client, method: &str, path: &str, body: Value) -> Value {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("/_test/{path}"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).unwrap_or_default())
        .expect("request");
    let text = client.request_text(req).await.unwrap_or_else(|e| panic!("{method} /_test/{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} /_test/{path} answered {text:?}: {e}"))
}

#[tokio::test]
async fn binary_loads_manifests_and_takes_controls_over_http() {
    let dir = std::env::temp_dir().join(format!("ipvs-operator-standalone-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let manifest = dir.join("app.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata:\n  name: backend\n  namespace: demo\n  labels: {app: b}\n  annotations: {test-apiserver.codesink.net/pod-ip: 10.9.0.7}\n\
         spec: {nodeName: vm, containers: [{name: c, image: x}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: demo}\nspec: {selector: {app: b}, ports: [{port: 80}]}\n",
    )
    .expect("manifest");
    let child = Command::new(env!("CARGO_BIN_EXE_test-apiserver"))
        .args(["--listen", "127.0.0.1:0", "--node", "vm=10.0.2.15", "--load"])
        .arg(&manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("test-apiserver starts");
    let mut child = Killed(child);
    let stdout = child.0.stdout.take().expect("stdout");
    let line = tokio::task::spawn_blocking(move || std::io::BufReader::new(stdout).lines().next())
        .await
        .expect("join")
        .expect("a line")
        .expect("readable");
    let url = line.strip_prefix("listening on ").expect("the address line").trim().to_string();
    let client = client_for(&url).expect("client");

    let pods: Api<Pod> = Api::namespaced(client.clone(), "demo");
    let pod = pods.get("backend").await.expect("loaded pod");
    let status = pod.status.expect("status");
    assert_eq!(status.pod_ip.as_deref(), Some("10.9.0.7"));
    assert_eq!(status.host_ip.as_deref(), Some("10.0.2.15"));

    let updated = admin(&client, "POST", "pods/demo/backend", json!({"ready": false})).await;
    assert_eq!(updated["metadata"]["name"], "backend");
    // The EndpointSlice controller follows a moment later.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "demo");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let items = slices.list(&ListParams::default()).await.expect("slices").items;
        let ready = items.first().and_then(|sl| sl.endpoints.as_deref()?.first()?.conditions.as_ref()?.ready);
        if ready == Some(false) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the slice never showed the pod unready: {items:?}");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }

    admin(&client, "POST", "faults/fail", json!({"count": 1, "code": 500, "resource": "pods"})).await;
    let err = pods.get("backend").await.expect_err("injected 500");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 500), "{err:?}");
    for fault in ["faults/close-watches", "faults/break-watches", "faults/expire"] {
        assert_eq!(admin(&client, "POST", fault, json!({})).await["ok"], true);
    }
    let deleted = admin(&client, "POST", "pods/demo/backend/delete", json!({})).await;
    assert!(deleted["metadata"]["deletionTimestamp"].is_string(), "terminating until finished");
    admin(&client, "POST", "pods/demo/backend/finish", json!({})).await;
    assert!(pods.get_opt("backend").await.expect("get").is_none());

    let record: Vec<RequestRecord> = serde_json::from_value(admin(&client, "GET", "requests", json!({})).await).expect("records");
    assert!(record.iter().any(|r| r.verb == "get" && r.resource == "pods" && r.code == 500));
    assert!(record.iter().any(|r| r.verb == "list" && r.resource == "endpointslices" && r.namespace == "demo"));
    let _ = std::fs::remove_dir_all(dir);
}
