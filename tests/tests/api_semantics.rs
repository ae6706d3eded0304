//! What a real API server does that the operator meets, on the test API
//! server: it refuses what a real one refuses, in the real one's words — a
//! WeightedService out of its CRD's bounds is refused at `kubectl apply`,
//! unknown fields are pruned, and a Service the API server will not take (two
//! ports with the same port and protocol) puts the WeightedService's
//! `ServiceReady` condition to `False, ApplyFailed` with the server's reason,
//! then back to `True` once fixed — and it keeps field ownership: the
//! operator's server-side apply owns what it sets of its Service (not the
//! ClusterIP), and takes back a field someone else edited. Runs on the host:
//! the controller needs no IPVS.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipvs_operator_tests::apiserver::{Config, TestApiServer, kubeconfig_yaml};
use ipvs_operator_tests::project_binary;
use k8s_openapi::api::core::v1::{Event, Service};
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

fn weighted_services(client: kube::Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("codesink.net", "v1alpha1", "WeightedService");
    Api::namespaced_with(client, "default", &ApiResource::from_gvk(&gvk))
}

fn object(v: Value) -> DynamicObject {
    serde_json::from_value(v).expect("a DynamicObject")
}

/// The 422 a create got, as kube-rs reports it.
fn refusal(r: Result<DynamicObject, kube::Error>) -> kube::core::Status {
    match r {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_resources_are_validated_pruned_and_defaulted_by_their_crd() {
    let server = TestApiServer::start(Config::default()).await.expect("test API server");
    let api = weighted_services(server.client().expect("client"));

    let out_of_bounds = json!({"apiVersion": "codesink.net/v1alpha1", "kind": "WeightedService", "metadata": {"name": "big"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}], "weights": [{"weight": 70000, "selector": {"env": "prod"}}]}});
    let status = refusal(api.create(&PostParams::default(), &object(out_of_bounds)).await);
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"), "{status:?}");
    assert_eq!(
        status.message,
        "WeightedService.codesink.net \"big\" is invalid: spec.weights[0].weight: Invalid value: 70000: \
         spec.weights[0].weight in body should be less than or equal to 65535"
    );

    let no_weight = json!({"apiVersion": "codesink.net/v1alpha1", "kind": "WeightedService", "metadata": {"name": "none"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}], "weights": [{"selector": {"env": "prod"}}], "scheduler": "fastest"}});
    let status = refusal(api.create(&PostParams::default(), &object(no_weight)).await);
    assert!(status.message.starts_with("WeightedService.codesink.net \"none\" is invalid: ["), "{}", status.message);
    assert!(status.message.contains("spec.weights[0].weight: Required value"), "{}", status.message);
    assert!(status.message.contains("spec.scheduler: Unsupported value: \"fastest\": supported values: "), "{}", status.message);

    // kube-rs names no fieldValidation: the server's default (Warn) drops the
    // unknown fields and stores the rest, with defaults filled in.
    let typo = json!({"apiVersion": "codesink.net/v1alpha1", "kind": "WeightedService", "metadata": {"name": "typo"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}], "weigths": [{"weight": 1}], "weights": [{"weight": 3}]}});
    let stored = api.create(&PostParams::default(), &object(typo)).await.expect("stored");
    let spec = &stored.data["spec"];
    assert_eq!(spec.get("weigths"), None, "unknown field pruned: {spec}");
    assert_eq!(spec["weights"], json!([{"weight": 3, "selector": {}}]), "default filled in: {spec}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_are_validated_as_the_real_server_does() {
    let server = TestApiServer::start(Config::default()).await.expect("test API server");
    let services: Api<Service> = Api::namespaced(server.client().expect("client"), "default");
    let svc: Service = serde_json::from_value(json!({"metadata": {"name": "web"}, "spec": {"selector": {"app": "web"},
        "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80, "targetPort": 8080}]}}))
    .expect("a Service");
    let Err(kube::Error::Api(status)) = services.create(&PostParams::default(), &svc).await else { panic!("a duplicate port is refused") };
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert!(status.message.starts_with("Service \"web\" is invalid: spec.ports[1]: Duplicate value: core.ServicePort{"), "{}", status.message);
    let causes = status.details.map(|d| d.causes).unwrap_or_default();
    assert_eq!(causes.len(), 1, "{causes:?}");
    assert_eq!((causes[0].reason.as_str(), causes[0].field.as_str()), ("FieldValueDuplicate", "spec.ports[1]"));
    server.shutdown().await;
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `f` every 100 ms until it gives `Some`, for at most `timeout`.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn service_ready(ws: &DynamicObject) -> Option<(String, String, String)> {
    let c = ws.data.pointer("/status/conditions")?.as_array()?.iter().find(|c| c["type"] == "ServiceReady")?;
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    Some((s("status"), s("reason"), s("message")))
}

/// `ipvs-operator controller` against `server`; its log is `dir/controller.log`.
fn start_controller(server: &TestApiServer, dir: &std::path::Path) -> Running {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_yaml(server.url())).expect("kubeconfig");
    let log = std::fs::File::create(dir.join("controller.log")).expect("log file");
    Running(
        Command::new(project_binary("ipvs-operator").expect("the operator binary"))
            .args(["controller", "--listen", "127.0.0.1:0"])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("ipvs-operator starts"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_the_server_refuses_is_reported_as_apply_failed_until_fixed() {
    let server = TestApiServer::start(Config::default()).await.expect("test API server");
    let client = server.client().expect("client");
    let dir = tempfile::tempdir().expect("temp dir");
    let log_path = dir.path().join("controller.log");
    let _controller = start_controller(&server, dir.path());

    // The CRD takes it (it has no rule against it); the Service registry does not.
    let api = weighted_services(client.clone());
    let ws = json!({"apiVersion": "codesink.net/v1alpha1", "kind": "WeightedService", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}, {"name": "alt", "port": 80, "targetPort": 8080}],
            "weights": [{"weight": 1, "selector": {"env": "prod"}}]}});
    api.create(&PostParams::default(), &object(ws)).await.expect("the WeightedService is stored");
    let (status, reason, message) = eventually("ServiceReady False", Duration::from_secs(30), || async {
        service_ready(&api.get("web").await.ok()?).filter(|(s, _, _)| s == "False")
    })
    .await;
    let controller_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "ApplyFailed"), "{message}\n{}", controller_log());
    assert!(
        message.starts_with("applying Service web: Service \"web\" is invalid: spec.ports[1]: Duplicate value: core.ServicePort{"),
        "the server's words reach the condition: {message}"
    );
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    assert!(services.get_opt("web").await.expect("get").is_none(), "no Service was stored");
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    eventually("an ApplyFailed Event", Duration::from_secs(10), || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items.iter().any(|e| e.reason.as_deref() == Some("ApplyFailed")).then_some(())
    })
    .await;

    // Fixed: the second port moves to 8080; the Service is applied.
    let fixed = json!({"spec": {"ports": [{"name": "http", "port": 80}, {"name": "alt", "port": 8080}]}});
    api.patch("web", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&fixed)).await.expect("patched");
    let (status, reason, message) = eventually("ServiceReady True", Duration::from_secs(30), || async {
        service_ready(&api.get("web").await.ok()?).filter(|(s, _, _)| s == "True")
    })
    .await;
    assert_eq!(reason, "Applied", "{status} {message}\n{}", controller_log());
    let svc = services.get("web").await.expect("the Service exists now");
    let ports: Vec<i32> = svc.spec.and_then(|s| s.ports).unwrap_or_default().iter().map(|p| p.port).collect();
    assert_eq!(ports, [80, 8080]);
    server.shutdown().await;
}

/// The `fieldsV1` of `manager`'s entry of `operation` in the Service's managedFields.
fn owned(svc: &Service, manager: &str, operation: &str) -> Option<Value> {
    let entries = svc.metadata.managed_fields.as_ref()?;
    let e = entries.iter().find(|e| e.manager.as_deref() == Some(manager) && e.operation.as_deref() == Some(operation))?;
    serde_json::to_value(e.fields_v1.as_ref()?).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_owns_what_it_applies_of_its_service_and_takes_back_edits() {
    let server = TestApiServer::start(Config::default()).await.expect("test API server");
    let client = server.client().expect("client");
    let dir = tempfile::tempdir().expect("temp dir");
    let _controller = start_controller(&server, dir.path());
    let api = weighted_services(client.clone());
    let ws = json!({"apiVersion": "codesink.net/v1alpha1", "kind": "WeightedService", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}, {"name": "dns", "port": 53, "protocol": "UDP"}],
            "weights": [{"weight": 1, "selector": {"env": "prod"}}]}});
    api.create(&PostParams::default(), &object(ws)).await.expect("the WeightedService is stored");
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc = eventually("the Service", Duration::from_secs(30), || async { services.get_opt("web").await.ok().flatten() }).await;

    let mine = owned(&svc, "ipvs-operator", "Apply").expect("an Apply entry of the operator");
    let ports = &mine["f:spec"]["f:ports"];
    assert!(ports.get("k:{\"port\":80,\"protocol\":\"TCP\"}").is_some() && ports.get("k:{\"port\":53,\"protocol\":\"UDP\"}").is_some(), "{mine}");
    assert!(mine["f:spec"].get("f:selector").is_some(), "{mine}");
    assert!(mine["f:spec"].get("f:clusterIP").is_none(), "the allocated ClusterIP is nobody's: {mine}");
    let cluster_ip = svc.spec.as_ref().and_then(|s| s.cluster_ip.clone()).expect("a ClusterIP");

    // `kubectl edit` of the selector: an Update that takes the field over…
    let edit = kube::api::PatchParams { field_manager: Some("kubectl-edit".into()), ..Default::default() };
    let edited = services
        .patch("web", &edit, &kube::api::Patch::Merge(json!({"spec": {"selector": {"app": "hijacked"}}})))
        .await
        .expect("edited");
    assert!(owned(&edited, "kubectl-edit", "Update").is_some_and(|f| f["f:spec"].get("f:selector").is_some()));
    // …which the operator's forced apply takes back, ClusterIP unchanged.
    let back = eventually("the selector back", Duration::from_secs(30), || async {
        let s = services.get("web").await.ok()?;
        (s.spec.as_ref()?.selector.as_ref()?.get("app").map(String::as_str) == Some("web")).then_some(s)
    })
    .await;
    assert!(owned(&back, "kubectl-edit", "Update").is_none_or(|f| f["f:spec"].get("f:selector").is_none()), "{:?}", back.metadata.managed_fields);
    assert_eq!(back.spec.as_ref().and_then(|s| s.cluster_ip.clone()), Some(cluster_ip));

    // A port the WeightedService drops goes; the other stays, merged by key.
    let one_port = json!({"spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}});
    api.patch("web", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&one_port)).await.expect("patched");
    let svc = eventually("one port", Duration::from_secs(30), || async {
        let s = services.get("web").await.ok()?;
        (s.spec.as_ref()?.ports.as_ref()?.len() == 1).then_some(s)
    })
    .await;
    assert_eq!(svc.spec.and_then(|s| s.ports).map(|p| p[0].port), Some(80));
    server.shutdown().await;
}
